"""Render bench/results/*.json(l) into tables (markdown, printed or written to a file) and PNG plots.

    python bench/render.py accuracy          # prints the accuracy tables, writes bench/plots/accuracy_*.png
    python bench/render.py overhead

BENCHMARKS.md quotes these outputs; regenerate them with the commands it gives.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "bench" / "plots"


def _rows(name: str) -> list[dict]:
    p = RESULTS / name
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _metric(task: str) -> tuple[str, bool]:
    """(metric key in the results, higher is better)."""
    return ("log_loss", False) if task == "ctr" else ("accuracy", True)


def accuracy_tables(rows: list[dict], options: str = "{}") -> str:
    rows = [r for r in rows if json.dumps(r.get("options", {}), sort_keys=True) == options]
    cells: dict = defaultdict(list)
    dense: dict = defaultdict(list)
    for r in rows:
        key, _ = _metric(r["task"])
        cells[(r["task"], r["block"], r["sparsity"], r["method"])].append(r["pruned"][key])
        dense[r["task"]].append(r["dense"][key])
        if r["task"] == "ctr":
            cells[(r["task"] + "_auc", r["block"], r["sparsity"], r["method"])].append(r["pruned"]["auc"])
            dense[r["task"] + "_auc"].append(r["dense"]["auc"])
    out = []
    for task in sorted({k[0] for k in cells}):
        higher = not task == "ctr"
        methods = sorted({k[3] for k in cells if k[0] == task})
        configs = sorted({(k[1], k[2]) for k in cells if k[0] == task})
        metric = {"ctr": "log-loss (lower is better)", "ctr_auc": "AUC"}.get(task, "accuracy")
        out.append(f"\n#### {task}: {metric}; dense {statistics.mean(dense[task]):.4f}\n")
        out.append("| B | s | " + " | ".join(methods) + " | best |")
        out.append("|---|---|" + "---|" * (len(methods) + 1))
        for b, s in configs:
            vals = {}
            for m in methods:
                v = cells.get((task, b, s, m), [])
                if v:
                    vals[m] = (statistics.mean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v))
            best = (max if higher else min)(vals, key=lambda m: vals[m][0]) if vals else "-"
            row = [f"{vals[m][0]:.4f} ± {vals[m][1]:.4f} (n={vals[m][2]})" if m in vals else "-" for m in methods]
            out.append(f"| {b} | {s:g} | " + " | ".join(row) + f" | {best} |")
    return "\n".join(out)


def accuracy_plots(rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if not r.get("options")]
    paths = []
    for task in sorted({r["task"] for r in rows}):
        key, _ = _metric(task)
        blocks = sorted({r["block"] for r in rows if r["task"] == task})
        fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks), 3.6), squeeze=False)
        for ax, b in zip(axes[0], blocks):
            for m in sorted({r["method"] for r in rows if r["task"] == task}):
                pts = defaultdict(list)
                for r in rows:
                    if r["task"] == task and r["block"] == b and r["method"] == m:
                        pts[r["sparsity"]].append(r["pruned"][key])
                xs = sorted(pts)
                ax.errorbar(xs, [statistics.mean(pts[x]) for x in xs],
                            yerr=[statistics.pstdev(pts[x]) for x in xs], marker="o", capsize=3, label=m)
            d = [r["dense"][key] for r in rows if r["task"] == task]
            ax.axhline(statistics.mean(d), color="gray", ls="--", lw=1, label="dense")
            ax.set_title(f"{task}, block {b}x{b}")
            ax.set_xlabel("sparsity")
            ax.set_ylabel(key)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        p = PLOTS / f"accuracy_{task}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def overhead_table() -> str:
    p = RESULTS / "step_overhead.json"
    if not p.exists():
        return "(no results: run bench/step_overhead.py)"
    d = json.loads(p.read_text())
    out = [f"device {d['meta']['device']}, torch {d['meta']['torch']}, {d['meta']['threads']} threads, "
           f"median of {d['meta']['repeats']} interleaved rounds of {d['meta']['steps']} steps", "",
           "| model | batch | block | plain step (ms) | SA++ step (ms) | ratio | per-round range |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['case']} | {r['batch']} | {r['block']} | {r['plain_ms']:.2f} | {r['sapp_ms']:.2f} | "
                   f"{r['ratio_of_medians']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    return "\n".join(out)


def speed_table(name: str = "onnx_speed.json") -> str:
    p = RESULTS / name
    if not p.exists():
        return f"(no results: run bench/onnx_speed.py --out bench/results/{name})"
    d = json.loads(p.read_text())
    m = d["meta"]
    out = [f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, median of {m['rounds']} interleaved rounds",
           "", "| model | B | s | N | threads | dense ms | blocked ms | speedup | FLOP limit | of limit | auto speedup "
           "| auto: worst layer vs dense | size vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        worst = max((c["vs_dense"] for c in r["auto_layers"] if c["vs_dense"]), default=float("nan"))
        out.append(f"| {r['case']}{'' if r['balanced'] else ' (free masks)'} | {r['block']} | {r['sparsity']} | "
                   f"{r['batch']} | {r['threads']} | {r['dense_ms']:.2f} | {r['blocked_ms']:.2f} | "
                   f"{r['speedup_blocked']:.2f}x | {r['flop_limit']:.0f}x | {r['fraction_of_limit']:.0%} | "
                   f"{r['speedup_auto']:.2f}x | {worst:.2f} | {r['bytes']['blocked'] / r['bytes']['dense']:.3f} |")
    return "\n".join(out)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "accuracy"
    if what == "accuracy":
        rows = _rows("accuracy.jsonl")
        print(accuracy_tables(rows))
        for p in accuracy_plots(rows):
            print(f"\nwrote {p.relative_to(ROOT)}")
    elif what == "ablations":
        rows = _rows("ablations.jsonl")
        for opt in sorted({json.dumps(r.get("options", {}), sort_keys=True) for r in rows}):
            print(f"\n### options {opt}")
            print(accuracy_tables(rows, opt))
    elif what == "overhead":
        print(overhead_table())
    elif what == "speed":
        print(speed_table(sys.argv[2] if len(sys.argv) > 2 else "onnx_speed.json"))


if __name__ == "__main__":
    main()
