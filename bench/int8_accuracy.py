"""int8 accuracy: the block-sparse int8 ONNX model against the fp32 ONNX model of the SAME fine-tune.

For each (task, seed): one ``sapp_compress.api.prune`` (SA++, the fine-tuning budget of bench/accuracy.py's
TASKS), one export (``pipeline.export_model``), then two conversions with ``fmt="blocked"`` (nothing timed):
``quantize="none"`` and ``quantize="int8"``. Both graphs run in ONNX Runtime on the evaluation shard (the
held-out 20 % that ``prune`` splits off with the seed, as in bench/accuracy.py) and are scored with the task's
metrics; so the two precisions share weights, masks, data and seed and differ only in the conversion.

    python bench/int8_accuracy.py                        # 4 tasks x seeds 0,1,2 at B = 8, s = 0.8
    python bench/int8_accuracy.py --tasks ctr --seeds 0  # one cell
    python bench/int8_accuracy.py --tasks digits_mlp,ctr_mlp02 --weight-bits 7
                                                         # the weights a CPU without VNNI gets
    python bench/int8_accuracy.py --table                # the table from the results file only

Models: the shipped pretrained examples (``examples/models/*.pt``), not bench/accuracy.py's own pretrained
task models (the MLP there is 64-512-512-10, the shipped one 64-256-256-10); the fine-tuning steps, batch,
rate and layer selection (CTR: only ``mlp.0``, padded) are bench/accuracy.py's; ``ctr_mlp02`` adds ``mlp.2``
(see MODELS). The digits CNN's convs take the static (QDQ) int8 form, calibrated on 64 training rows as the
CLI does (rows before 2026-12 predate int8 convs: they kept the CNN in fp32); CTR's padded ``mlp.0`` has no
int8 formulation and stays fp32. The shipped models were trained on the rows ``Shard.split(0.2, 0)`` keeps
for training, so for seeds other than 0 the evaluation rows include rows the dense model was trained on (as in
bench/accuracy.py, whose pretraining uses the same split); both precisions see the same rows.

One JSON line per (task, model digest, block, sparsity, seed, steps) in bench/results/int8_accuracy.jsonl;
cells already there are skipped (resumable).
"""
from __future__ import annotations

import statistics
import time

import accuracy  # bench/accuracy.py: the tasks' fine-tuning budgets and the model digest
import harness
import numpy as np
import torch
from harness import ROOT

import converters
import converters.int8 as int8_module
from calib_data.shards import load_shard, shipped_shard
from converters import FORMULATIONS
from converters.machine import cpu_model, has_vnni
from sapp_compress import PruneConfig, TrainConfig
from sapp_compress.io.export import export_model
from sapp_compress.io.feeds import calibration_feed, onnx_feed, to_tensors
from sapp_compress.io.loading import load_model
from sapp_compress.pruning import prune

#: task -> (shipped model file, bench/accuracy.py task whose shard and budget it uses, PruneConfig overrides).
#: ``ctr`` prunes only ``mlp.0`` (256 x 221, padded to whole 8x8 blocks), as bench/accuracy.py does; no int8
#: formulation takes a padded weight, so that layer stays fp32 (dense storage: ``blocked`` needs whole blocks)
#: in both graphs. ``ctr_mlp02`` also prunes ``mlp.2`` (128 x 256, whole blocks), the CTR layer int8 can take.
MODELS = {
    "digits_mlp": (ROOT / "examples" / "models" / "digits_mlp.pt", "digits_mlp", {}),
    "digits_cnn": (ROOT / "examples" / "models" / "digits_cnn.pt", "digits_cnn", {}),
    "ctr": (ROOT / "examples" / "models" / "ctr_mlp.pt", "ctr", {}),
    "ctr_mlp02": (ROOT / "examples" / "models" / "ctr_mlp.pt", "ctr",
                  {"include": ("mlp.0.weight", "mlp.2.weight")}),
}

#: the question's tolerance: |int8 - fp32| score (accuracy) within 0.5 points; CTR log-loss within 1 %
#: relative
SCORE_TOL = 0.005
LOGLOSS_REL_TOL = 0.01

#: --weight-bits: the int8 weights' bit width forced instead of the CPU's default (8 with VNNI, 7 without)
FORCED_BITS: int | None = None


def run_cell(task: str, block: int, sparsity: float, seed: int, steps: int | None, threads: int) -> dict:
    path, base, override = MODELS[task]
    shard_name, _, _, ft, extra = accuracy.TASKS[base]
    ft, extra = dict(ft), {**extra, **override}
    if steps is not None:
        ft["steps"] = steps
    model = load_model(path, trust=True)
    shard = load_shard(shipped_shard(shard_name))
    cfg = PruneConfig(block=str(block), sparsity=sparsity, method="sapp", **extra)
    t0 = time.perf_counter()
    res = prune(model, shard, cfg, TrainConfig(**ft, seed=seed, log_every=10**9))
    t_prune = time.perf_counter() - t0

    ev = res.eval_shard
    proto = export_model(res.model, ev)
    calib = calibration_feed(res.train_shard)  # as the CLI: int8 convs' static scales from the training rows
    convs = {q: converters.convert(proto, res.layers, fmt="blocked", quantize=q, calibration_inputs=calib)
             for q in ("none", "int8")}
    data = {q: c.model.SerializeToString() for q, c in convs.items()}
    feed = onnx_feed(ev, tuple(ev.inputs))
    outs = {q: converters.run_onnx(data[q], feed, threads=threads)[0].astype(np.float64) for q in data}
    with torch.no_grad():
        torch_out = res.model(*to_tensors(tuple(ev.inputs), torch.device("cpu"))).float().numpy().astype(
            np.float64)
    metrics = {q: res.task.metrics(outs[q], ev.y, res.dense_eval_outputs) for q in outs}

    fp32, int8 = outs["none"], outs["int8"]
    scale = float(np.abs(fp32).max())
    layers = []
    for lb, o32, o8 in zip(res.layers, convs["none"].layers, convs["int8"].layers):
        layers.append({"name": lb.name, "op": o8.op_type, "shape": list(lb.weight_shape),
                       "kept_blocks": int(lb.n_kept), "blocks": int(lb.n_blocks),
                       "fp32_format": o32.fmt, "int8_run_format": o8.fmt,
                       "precision": FORMULATIONS[o8.fmt].precision, "reason": o8.reason,
                       "bytes_fp32": o32.stored_bytes, "bytes_int8_run": o8.stored_bytes,
                       **({"int8": o8.int8} if o8.int8 else {})})
    row = {
        "task": task, "model": str(path.relative_to(ROOT)),
        "shard": shard_name,
        "prune_options": {k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()},
        "dense_model": accuracy.model_digest(model), "method": "sapp", "block": block, "sparsity": sparsity,
        "seed": seed, "steps": ft["steps"], "batch_size": ft["batch_size"], "lr": ft["lr"],
        "eval_rows": len(ev), "score_name": res.task.score_name, "dense": res.metrics["dense"],
        "pruned_torch": res.metrics["pruned_torch"], "onnx_fp32": metrics["none"],
        "onnx_int8": metrics["int8"],
        "bytes": {"dense_export": proto.ByteSize(), "fp32": len(data["none"]), "int8": len(data["int8"])},
        "layers": layers, "skipped": [s.to_json() for s in res.skipped],
        "int8_layers": [r["name"] for r in layers if r["precision"] == "int8"],
        "max_abs_int8_minus_fp32": float(np.abs(int8 - fp32).max()), "max_abs_fp32": scale,
        "rel_int8_vs_fp32": float(np.abs(int8 - fp32).max() / scale) if scale > 0 else 0.0,
        "max_abs_fp32_onnx_minus_torch": float(np.abs(fp32 - torch_out).max()),
        "top1_agree_int8_fp32": (float(np.mean(int8.argmax(-1) == fp32.argmax(-1))) if fp32.shape[-1] > 1
                                 else float(np.mean((int8.reshape(-1) > 0) == (fp32.reshape(-1) > 0)))),
        "achieved_block_sparsity": res.achieved_block_sparsity, "mask_digest": res.mask_digest,
        "weight_bits": next((r["int8"]["weight_bits"] for r in layers if "int8" in r),
                            int8_module.default_weight_bits()),
        "weight_bits_forced": FORCED_BITS is not None, "vnni": has_vnni(), "cpu": cpu_model(),
        "threads": threads, "seconds_prune": round(t_prune, 2), "seconds": round(time.perf_counter() - t0, 2),
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }
    return row


def key(r: dict) -> tuple:
    return (r["task"], r["dense_model"], r["block"], r["sparsity"], r["seed"], r["steps"], r["weight_bits"])


def _ms(xs: list[float], fmt: str = "{:.4f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.pstdev(xs))}"


def table(rows: list[dict]) -> str:
    """Markdown: per (task, B, s, steps), mean ± population std over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["block"], r["sparsity"], r["steps"], r["weight_bits"]), []).append(r)
    lines = ["| task (score) | B | s | weight bits | seeds | pruned torch | fp32 ONNX | int8 ONNX | int8 - "
             "fp32 (mean; worst seed) | within target | int8 layers | max abs out diff / max abs fp32 | "
             "top-1 agree | bytes fp32 -> int8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ctr_lines = []
    for (task, b, s, steps, bits), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        seeds = ",".join(str(r["seed"]) for r in rs)
        d = [r["onnx_int8"]["score"] - r["onnx_fp32"]["score"] for r in rs]
        worst = max(d, key=abs)
        ok_score = all(abs(x) <= SCORE_TOL + 1e-12 for x in d)
        verdict = f"{sum(abs(x) <= SCORE_TOL + 1e-12 for x in d)}/{len(d)} seeds"
        n8 = f"{len(rs[0]['int8_layers'])} of {len(rs[0]['layers'])}"
        rel = max(r["rel_int8_vs_fp32"] for r in rs)
        agree = min(r["top1_agree_int8_fp32"] for r in rs)
        by = (f"{statistics.mean(r['bytes']['fp32'] for r in rs) / 1e3:.1f} k -> "
              f"{statistics.mean(r['bytes']['int8'] for r in rs) / 1e3:.1f} k")
        lines.append(f"| {task} ({rs[0]['score_name']}) | {b} | {s:g} | {bits} | {seeds} | "
                     f"{_ms([r['pruned_torch']['score'] for r in rs])} | "
                     f"{_ms([r['onnx_fp32']['score'] for r in rs])} | "
                     f"{_ms([r['onnx_int8']['score'] for r in rs])} | {statistics.mean(d):+.4f}; "
                     f"{worst:+.4f} | {verdict}{'' if ok_score else ' (no)'} | {n8} | {rel:.2e} (worst seed) "
                     f"| {agree:.4f} (min) | {by} |")
        if "log_loss" in rs[0]["onnx_fp32"]:
            ll = [(r["onnx_int8"]["log_loss"] - r["onnx_fp32"]["log_loss"]) / r["onnx_fp32"]["log_loss"]
                  for r in rs]
            au = [r["onnx_int8"]["auc"] - r["onnx_fp32"]["auc"] for r in rs]
            ok = sum(abs(x) <= LOGLOSS_REL_TOL for x in ll)
            ctr_lines.append(
                f"| {task} | {b} | {s:g} | {bits} | {seeds} | "
                f"{_ms([r['pruned_torch']['log_loss'] for r in rs])} | "
                f"{_ms([r['onnx_fp32']['log_loss'] for r in rs])} | "
                f"{_ms([r['onnx_int8']['log_loss'] for r in rs])} | {100 * statistics.mean(ll):+.3f} %; "
                f"{100 * max(ll, key=abs):+.3f} % | {ok}/{len(ll)} seeds | "
                f"{_ms([r['onnx_fp32']['auc'] for r in rs])} | {_ms([r['onnx_int8']['auc'] for r in rs])} | "
                f"{statistics.mean(au):+.5f}; {max(au, key=abs):+.5f} |")
    if ctr_lines:
        lines += ["", "| task | B | s | weight bits | seeds | log-loss pruned torch | log-loss fp32 ONNX | "
                  "log-loss int8 ONNX | int8 vs fp32, relative (mean; worst seed) | within 1 % | AUC fp32 "
                  "ONNX | AUC int8 ONNX | AUC int8 - fp32 (mean; worst seed) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += ctr_lines
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, out="int8_accuracy.jsonl")
    ap.add_argument("--tasks", default=",".join(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=None, help="override every task's fine-tuning steps")
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--weight-bits", type=int, choices=(7, 8), default=None,
                    help="force the int8 weights' bit width (default: the CPU's: 8 with VNNI, 7 without); 7 "
                         "on a VNNI machine shows what a machine without VNNI computes "
                         "(its kernel is exact at 7 bits)")
    ap.add_argument("--table", action="store_true", help="print the table from the results file and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global FORCED_BITS
    if args.weight_bits is not None:
        FORCED_BITS = args.weight_bits
        int8_module.default_weight_bits = lambda flags=None: FORCED_BITS  # read by blocked_int8 at build time
    bits = int8_module.default_weight_bits()

    def rows() -> list[dict]:
        return harness.read_rows(args.out)

    tasks = harness.names(args.tasks)
    seeds = harness.ints(args.seeds)
    if not args.table:
        print(f"cpu: {cpu_model()}; VNNI: {has_vnni()}; int8 weight bits: {bits}", flush=True)
        for task in tasks:
            digest = accuracy.model_digest(load_model(MODELS[task][0], trust=True))
            steps = args.steps if args.steps is not None else accuracy.TASKS[MODELS[task][1]][3]["steps"]
            for seed in seeds:
                if (task, digest, args.block, args.sparsity, seed, steps, bits) in {key(r) for r in rows()}:
                    continue
                r = run_cell(task, args.block, args.sparsity, seed, args.steps, args.threads)
                harness.append_row(args.out, r)
                extra = (f" log-loss {r['onnx_fp32']['log_loss']:.4f} -> {r['onnx_int8']['log_loss']:.4f}"
                         if "log_loss" in r["onnx_fp32"] else "")
                print(f"{task:10s} seed={seed} {r['score_name']} torch {r['pruned_torch']['score']:.4f} "
                      f"fp32 {r['onnx_fp32']['score']:.4f} int8 {r['onnx_int8']['score']:.4f}{extra} "
                      f"rel {r['rel_int8_vs_fp32']:.2e} int8 layers {r['int8_layers']} {r['seconds']:.1f}s",
                      flush=True)
    sel = [r for r in rows() if r["task"] in tasks and r["seed"] in seeds and r["block"] == args.block
           and r["sparsity"] == args.sparsity and (args.steps is None or r["steps"] == args.steps)
           and (args.weight_bits is None or r["weight_bits"] == args.weight_bits)]
    print(table(sel))


if __name__ == "__main__":
    main()
