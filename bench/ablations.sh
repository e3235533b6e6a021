#!/usr/bin/env bash
# SA++ ablations on one task (digits_mlp, B = 16, s = 0.95, 3 seeds); results in bench/results/ablations.jsonl.
#   bash bench/ablations.sh        then: python bench/render.py ablations
set -euo pipefail
cd "$(dirname "$0")/.."
for o in '{}' '{"sparsification": false}' '{"c": 2.0}' '{"c": 8.0}' '{"reset_optimizer": false}' \
         '{"cycles": 0}' '{"cycles": 1}' '{"cycles": 3}' '{"revive": "keep"}' '{"logit_decay": false}'; do
  python bench/accuracy.py --tasks digits_mlp --methods sapp --blocks 16 --sparsities 0.95 --seeds 0,1,2 \
    --options "$o" --out bench/results/ablations.jsonl
done
# balanced vs free selection is a PruneConfig switch, not a method option
python bench/accuracy.py --tasks digits_mlp --methods sapp --blocks 16 --sparsities 0.95 --seeds 0,1,2 \
  --balanced --out bench/results/ablations.jsonl
