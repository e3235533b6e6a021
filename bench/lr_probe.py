"""``--lr auto`` against fixed rates: what the probe chooses, what that scores, and what it costs.

For each task, method and seed, three kinds of run through :func:`sapp_compress.prune` (the CLI's fine-tune):

- ``fixed``: the fine-tune at each fixed peak rate of ``--lrs`` (default 1e-4, 3e-4, 1e-3, 3e-3, 1e-2);
- ``auto``: the default (``lr="auto"``): the probe, then the fine-tune at its choice; the row has the choice,
  the probe's scores, its seconds and the fine-tune's seconds (measured in the same process, one thread);
- ``probe``: the probe alone with other settings (``--probe '{"strategy": "grid"}'``, any ``LRProbeConfig``
  field), to compare designs: the fine-tune at its choice is the ``fixed`` run at that rate, bit for bit (the
  probe leaves the RNG as it found it), so a design is scored without fine-tuning again.

One JSON line per run in bench/results/lr_probe.jsonl; runs already there are skipped (the sweep resumes).

    python bench/lr_probe.py --tasks digits_mlp,ctr --methods sapp,magnitude --seeds 0,1,2 --kinds fixed,auto
    python bench/lr_probe.py --kinds probe --probe '{"strategy": "grid"}'
    python bench/lr_probe.py --table

Tasks (``--block`` / ``--sparsity`` default B = 16, s = 0.8):
- ``digits_mlp``, ``digits_cnn``, ``ctr``: bench/accuracy.py's tasks, pretrained models and budgets (600 steps
  x 64, 400 x 64, 300 x 256), held-out 20 % chosen by the seed; ``ctr_cli``: the CTR task at the CLI's default
  budget (10 epochs at batch 64: 7500 steps); ``ctr_trained``: the CTR model pretrained to its best validation
  log-loss (bench/ctr_pretrain.py; BENCHMARKS.md section 15.7), at ``ctr``'s budget;
- ``tiny_bert``: examples/models/tiny_bert on its own held-out split (bench/lr_family.py), 300 steps x 32;
- ``stdlib_bert``: the trained examples/models/stdlib_bert on its own test passages, 300 steps x 32;
- ``digits_resnet18``: bench/structured_accuracy.py's torchvision resnet18 trained on the digits,
  ``--structure channels`` at s = 0.5 (``--block`` / ``--sparsity`` do not apply), the default budget (300
  steps of 32);
- ``planted``: the planted block-sparse regression of BENCHMARKS.md section 3 (tests/engine/planted.py, noise
  30, B = 8, 560 steps x 128, coupled l2 1e-2, no clipping); score R^2 on the held-out 20 %, and the share of
  planted blocks kept.
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import harness
import torch
from harness import ROOT

sys.path.insert(0, str(ROOT / "tests" / "engine"))
import sapp_compress.pruning as api  # noqa: E402
from calib_data.shards import Shard, load_shard, shipped_shard  # noqa: E402
from sapp_compress import PruneConfig, TrainConfig, prune  # noqa: E402
from sapp_compress.config import LRProbeConfig  # noqa: E402

RATES = "1e-4,3e-4,1e-3,3e-3,1e-2"


@dataclass
class Case:
    """One task at one seed: the model, the data and the configs (``lr`` left to the run)."""

    model: torch.nn.Module
    train: Shard
    eval: Shard | None
    prune: dict
    train_cfg: dict
    digest: str
    extra: Callable[[object], dict] = lambda res: {}


def _accuracy_task(name: str, seed: int) -> Case:
    import accuracy

    shard_name, _, _, ft, extra = accuracy.TASKS[name]
    model = accuracy.pretrain(name)
    return Case(model, load_shard(shipped_shard(shard_name)), None, dict(extra), dict(ft),
                accuracy.model_digest(model))


def _ctr_cli(seed: int) -> Case:
    """bench/accuracy.py's CTR model and shard at the CLI's default budget: 10 epochs of the training rows at
    batch 64 (7500 steps), instead of that grid's 300 steps at batch 256."""
    case = _accuracy_task("ctr", seed)
    case.train_cfg = {"batch_size": 64}
    return case


@functools.lru_cache(maxsize=1)
def _tiny_bert_shards() -> tuple[Shard, Shard, str]:
    import lr_family

    tmp = Path(tempfile.mkdtemp(prefix="lr_probe_"))
    train, ev, _ = lr_family.make_shards(tmp, 64)
    return load_shard(train), load_shard(ev), lr_family.model_digest(lr_family.MODEL)


def _tiny_bert(seed: int) -> Case:
    import lr_family

    from sapp_compress.io.loading import load_model

    train, ev, digest = _tiny_bert_shards()
    return Case(load_model(lr_family.MODEL), train, ev, {}, dict(steps=300, batch_size=32), digest)


STDLIB_BERT = ROOT / "examples" / "models" / "stdlib_bert"


@functools.lru_cache(maxsize=1)
def _stdlib_shards() -> tuple[Shard, Shard, str]:
    """examples/models/stdlib_bert's training and test shards (its own tokenizer, 128 tokens)."""
    from calib_data.text import text_shard

    tmp = Path(tempfile.mkdtemp(prefix="lr_probe_"))
    out = {}
    for part in ("train", "test"):
        out[part] = tmp / f"{part}.npz"
        text_shard(STDLIB_BERT, ROOT / "calib_data" / "text" / f"stdlib_areas.{part}.jsonl", out[part],
                   label_field="label")
    return load_shard(out["train"]), load_shard(out["test"]), _file_digest(STDLIB_BERT / "model.safetensors")


def _stdlib_bert(seed: int) -> Case:
    """The trained BERT classifier (4 layers, hidden 128, 0.875 test accuracy) on its own test passages, 300
    steps x 32 (tiny_bert's budget)."""
    from sapp_compress.io.loading import load_model

    train, ev, digest = _stdlib_shards()
    return Case(load_model(STDLIB_BERT), train, ev, {}, dict(steps=300, batch_size=32), digest)


def _planted(seed: int) -> Case:
    from planted import planted_problem, recovery

    torch.manual_seed(seed)
    student, shard, planted = planted_problem(seed, noise=30.0)
    return Case(student, shard, None, {"block": "8", "min_blocks": 1},
                dict(steps=560, batch_size=128, weight_decay=1e-2, grad_clip=None), f"planted-{seed}",
                lambda res: {"recovered": recovery(res.layers[0].kept, planted)})


def _digits_resnet18(seed: int) -> Case:
    """bench/structured_accuracy.py's torchvision resnet18 trained on the digits (3 x 32 x 32), ``--structure
    channels --sparsity 0.5`` at the default budget (300 steps), scored on its 20 % test split."""
    import structured_accuracy

    path, train, test = structured_accuracy.digits_resnet18()
    model = torch.load(path, weights_only=False)
    return Case(model, load_shard(train), load_shard(test),
                {"block": "8", "sparsity": 0.5, "structure": "channels"}, {}, _file_digest(path))


def _file_digest(path: Path) -> str:
    """A short sha256 of a model file (rows are comparable only when they fine-tuned the same model)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


TASKS: dict[str, Callable[[int], Case]] = {
    "digits_mlp": functools.partial(_accuracy_task, "digits_mlp"),
    "digits_cnn": functools.partial(_accuracy_task, "digits_cnn"),
    "ctr": functools.partial(_accuracy_task, "ctr"),
    "ctr_cli": _ctr_cli,
    "ctr_trained": functools.partial(_accuracy_task, "ctr_trained"),
    "tiny_bert": _tiny_bert,
    "stdlib_bert": _stdlib_bert,
    "planted": _planted,
    "digits_resnet18": _digits_resnet18,
}


class _Stop(Exception):
    pass


def _probe_only(case: Case, cfg: PruneConfig, tc: TrainConfig):
    """Run prune() up to its fine-tune (the probe included) and return the probe's result."""
    seen = {}
    real_choose, real_fine_tune = api.choose_lr, api.fine_tune

    def choose(*a, **k):
        seen["lr"] = real_choose(*a, **k)
        return seen["lr"]

    def stop(*a, **k):
        raise _Stop

    api.choose_lr, api.fine_tune = choose, stop
    try:
        prune(case.model, case.train, cfg, tc, eval_shard=case.eval)
    except _Stop:
        pass
    finally:
        api.choose_lr, api.fine_tune = real_choose, real_fine_tune
    return seen["lr"]


def setup(task: str, method: str, seed: int, kind: str, lr,
          args) -> tuple[Case, PruneConfig, TrainConfig, dict]:
    """The run's case and configs, and its row so far (enough for its key)."""
    case = TASKS[task](seed)
    cfg = PruneConfig(**{"block": str(args.block), "sparsity": args.sparsity, "method": method, **case.prune})
    probe = LRProbeConfig(**json.loads(args.probe)) if kind == "probe" else LRProbeConfig()
    over = json.loads(args.train)
    tc = TrainConfig(**{**case.train_cfg, **over, "lr": lr, "seed": seed, "log_every": 10**9, "device": "cpu",
                        "lr_probe": probe})
    row = {"task": task, "dense_model": case.digest, "method": method, "seed": seed, "kind": kind,
           "block": str(cfg.block), "sparsity": cfg.sparsity, "steps": tc.steps, "batch_size": tc.batch_size,
           "lr": lr}
    if kind == "probe":
        row["probe_config"] = json.loads(args.probe)
    if over:
        row["train"] = over
    return case, cfg, tc, row


def run(case: Case, cfg: PruneConfig, tc: TrainConfig, row: dict) -> dict:
    kind = row["kind"]
    t0 = time.perf_counter()
    if kind == "probe":
        choice = _probe_only(case, cfg, tc)
        row.update(lr=choice.value, probe=choice.to_json(),
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    res = prune(case.model, case.train, cfg, tc, eval_shard=case.eval)
    row.update(lr=res.lr, lr_source=res.lr_source, score=res.metrics["pruned_torch"]["score"],
               dense=res.metrics["dense"]["score"], metrics=res.metrics["pruned_torch"], **case.extra(res),
               seconds=round(time.perf_counter() - t0, 2))
    if kind == "auto":
        row["probe"] = res.lr_choice.to_json()
    return row


def key(r: dict) -> tuple:
    return (r["task"], r["dense_model"], r["method"], r["seed"], r["kind"], r["block"], r["sparsity"],
            r["lr"] if r["kind"] == "fixed" else None,
            json.dumps(r.get("probe_config", {}), sort_keys=True) if r["kind"] == "probe" else None,
            json.dumps(r.get("train", {}), sort_keys=True))


# ------------------------------------------------------------------------------------------------------ table
def score_of(r: dict) -> float:
    """Higher is better: the task's score, or minus the log-loss on CTR (the metric its section 4 reads)."""
    return -r["metrics"]["log_loss"] if r["task"].startswith("ctr") else r["score"]


def table(rows: list[dict], args) -> None:
    # tasks with their own geometry
    own = {"planted": ("8x8", args.sparsity), "digits_resnet18": ("8x8", 0.5)}
    rows = [r for r in rows if (r["block"], r["sparsity"])
            == own.get(r["task"], (f"{args.block}x{args.block}", args.sparsity))
            and r.get("train", {}) == json.loads(args.train)]
    metric = {"ctr": "log-loss (lower is better)", "ctr_cli": "log-loss (lower is better)",
              "ctr_trained": "log-loss (lower is better)",
              "planted": "R^2 [planted blocks kept]"}
    for task in [t for t in TASKS if any(r["task"] == t for r in rows)]:
        print(f"\n#### {task}: {metric.get(task, 'accuracy')}\n")
        rates = sorted({r["lr"] for r in rows if r["task"] == task and r["kind"] == "fixed"})
        print("| method | " + " | ".join(f"{lr:g}" for lr in rates) + " | best fixed | auto (default) | "
              "auto's choices | within spread | probe / fine-tune: CPU time / wall time |")
        print("|---" * (len(rates) + 6) + "|")
        for method in sorted({r["method"] for r in rows if r["task"] == task}):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            cells, means = [], {}
            for lr in rates:
                v = [r for r in mine if r["kind"] == "fixed" and r["lr"] == lr]
                means[lr] = _stats(v)
                cells.append(_fmt(task, v))
            best = max((lr for lr in means if lr in harness.floats(RATES)), key=lambda lr: means[lr][0],
                       default=None)
            auto = [r for r in mine if r["kind"] == "auto"]
            a = _stats(auto)
            spread = max(means[best][1], a[1]) if best is not None and auto else float("nan")
            within = "-" if not auto or best is None else (
                "yes" if a[0] >= means[best][0] - spread else f"no ({means[best][0] - a[0]:+.4f})")
            frac_s = " / ".join(_fractions(auto, k)
                                for k in ("cpu_fraction_of_fine_tune", "fraction_of_fine_tune"))
            choices = ", ".join(f"{r['lr']:g}" for r in sorted(auto, key=lambda r: r["seed"]))
            best_s = "-" if best is None else f"{best:g}"
            print(f"| {method} | " + " | ".join(cells) +
                  f" | {best_s} | {_fmt(task, auto)} | {choices} | {within} | "
                  f"{frac_s} |")
        probes = [r for r in rows if r["task"] == task and r["kind"] == "probe"]
        for cfg in sorted({json.dumps(r["probe_config"], sort_keys=True) for r in probes}):
            for method in sorted({r["method"] for r in probes}):
                mine = sorted((r for r in probes if r["method"] == method
                               and json.dumps(r["probe_config"], sort_keys=True) == cfg),
                              key=lambda r: r["seed"])
                fixed = {(r["lr"], r["seed"]): r for r in rows if r["task"] == task and r["method"] == method
                         and r["kind"] == "fixed"}
                got = [fixed.get((r["lr"], r["seed"])) for r in mine]
                print(f"  probe {cfg} {method}: choices {[r['lr'] for r in mine]} -> "
                      + (_fmt(task, got) if all(got) else "(a choice without a fixed run)"))


def _fractions(auto: list[dict], key: str) -> str:
    """Mean (min-max) of the probe's cost as a fraction of the fine-tune's, over the runs that probed."""
    v = [r["probe"]["probe"][key] for r in auto if key in r["probe"].get("probe", {})]
    return f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-"


def _stats(rs: list[dict]) -> tuple[float, float]:
    v = [score_of(r) for r in rs]
    return (statistics.mean(v), statistics.pstdev(v)) if v else (float("-inf"), 0.0)


def _fmt(task: str, rs: list[dict]) -> str:
    if not rs:
        return "-"
    sign = -1.0 if task.startswith("ctr") else 1.0
    m, s = _stats(rs)
    out = f"{sign * m:.4f} ± {s:.4f}"
    if task == "planted":
        out += f" [{statistics.mean(r['recovered'] for r in rs):.2f}]"
    return out


def main() -> None:
    ap = harness.parser(__doc__, out="lr_probe.jsonl")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default="sapp,magnitude")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="fixed,auto", help="fixed, auto and/or probe")
    ap.add_argument("--lrs", default=RATES, help="the fixed rates")
    ap.add_argument("--probe", default="{}", help="JSON LRProbeConfig fields for --kinds probe")
    ap.add_argument("--train", default="{}", help="JSON TrainConfig overrides (e.g. weight_decay), kept in "
                                                  "the row")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only print the tables from the results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table:
        print(f"machine: {harness.machine_line()}", flush=True)
        done = {key(r) for r in harness.read_rows(args.out)}
        for task in harness.names(args.tasks):
            for method in harness.names(args.methods):
                for seed in harness.ints(args.seeds):
                    for kind in harness.names(args.kinds):
                        for lr in harness.floats(args.lrs) if kind == "fixed" else ["auto"]:
                            case, cfg, tc, row = setup(task, method, seed, kind, lr, args)
                            if key(row) in done:
                                continue
                            row = run(case, cfg, tc, row)
                            harness.append_row(args.out, row)
                            done.add(key(row))
                            print(f"{task:10s} {method:9s} seed {seed} {kind:5s} lr {row['lr']:g}: "
                                  f"{row.get('score', float('nan')):.4f} ({row['seconds']:.1f}s)", flush=True)
    table(harness.read_rows(args.out), args)


if __name__ == "__main__":
    main()
