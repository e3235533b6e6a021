#!/usr/bin/env bash
# SA++ ablations and the logits' learning-rate study; results in bench/results/ablations.jsonl and
# bench/results/logit_lr.jsonl.   bash bench/ablations.sh    then: python bench/render.py ablations
#
# 1. Ablations on one task: digits_mlp, B = 16, s = 0.9 and 0.95, 5 seeds, every variant against the
#    defaults ({}), one switch at a time.
# 2. The logits' learning rate on two tasks (digits_mlp and ctr, B = 8 and 16, s = 0.8-0.95, 3 seeds): the
#    paper's setting (the weights' rate, logit_lr = 1), logit_travel 4 (the default) / 8 / 16 / 32, and plain
#    Adam on the logits (logit_norm element) at travel 16 and at the weights' rate.
set -euo pipefail
cd "$(dirname "$0")/.."
for o in '{}' '{"sparsification": false}' '{"c": 2.0}' '{"c": 8.0}' '{"reset_optimizer": false}' \
         '{"cycles": 0}' '{"cycles": 1}' '{"cycles": 3}' '{"revive": "keep"}' '{"logit_decay": false}' \
         '{"logit_lr": 1.0}' '{"logit_norm": "element"}' '{"score": "effective"}' '{"final_sparse": 0.3}' \
         '{"dense": 0.2}'; do
  python bench/accuracy.py --tasks digits_mlp --methods sapp --blocks 16 --sparsities 0.9,0.95 --seeds 0,1,2,3,4 \
    --options "$o" --out bench/results/ablations.jsonl
done
# balanced vs free selection is a PruneConfig switch, not a method option
python bench/accuracy.py --tasks digits_mlp --methods sapp --blocks 16 --sparsities 0.9,0.95 --seeds 0,1,2,3,4 \
  --balanced --out bench/results/ablations.jsonl
for o in '{}' '{"logit_lr": 1.0}' '{"logit_travel": 8.0}' '{"logit_travel": 16.0}' '{"logit_travel": 32.0}' \
         '{"logit_norm": "element", "logit_travel": 16.0}' '{"logit_norm": "element", "logit_lr": 1.0}'; do
  python bench/accuracy.py --tasks digits_mlp,ctr --methods sapp --blocks 8,16 --sparsities 0.8,0.9,0.95 \
    --seeds 0,1,2 --options "$o" --out bench/results/logit_lr.jsonl
done
# 3. The logits' optimiser on the CNN (where plain Adam at a faster rate collapsed on some seeds)
for o in '{}' '{"logit_norm": "element", "logit_travel": 16.0}' '{"logit_norm": "element", "logit_lr": 1.0}' \
         '{"logit_lr": 1.0}'; do
  python bench/accuracy.py --tasks digits_cnn --methods sapp --blocks 8,16 --sparsities 0.9,0.95 \
    --seeds 0,1,2 --options "$o" --out bench/results/logit_lr.jsonl
done
