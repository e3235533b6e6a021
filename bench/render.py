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
    """Rows of a results file that fine-tuned the task's current dense model (the one named by the file's
    last row for that task); rows of an older pretrained model are dropped with a note on stderr."""
    p = RESULTS / name if not Path(name).is_absolute() else Path(name)
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
    current = {r["task"]: r.get("dense_model") for r in rows}
    seen: set = set()
    kept = []
    for r in rows:  # one row per cell and seed (two processes sharing a file may both run a cell)
        k = (r["task"], r.get("dense_model"), r["method"], r["block"], r["sparsity"], r["seed"],
             json.dumps(r.get("options", {}), sort_keys=True))
        if r.get("dense_model") == current[r["task"]] and k not in seen:
            seen.add(k)
            kept.append(r)
    if len(kept) < len(rows):
        print(f"note: {len(rows) - len(kept)} rows of {name} fine-tuned an older dense model or repeat a "
              "cell; not shown",
              file=sys.stderr)
    return kept


#: the CTR tasks: log-loss (lower is better), and their AUC as the pseudo-task ``<task>_auc``
CTR_TASKS = ("ctr", "ctr_trained")


def _auc_of(task: str) -> str | None:
    """The CTR task whose AUC the pseudo-task ``task`` (``<ctr task>_auc``) reads; None for any other task."""
    base = task[:-4] if task.endswith("_auc") else None
    return base if base in CTR_TASKS else None


def _metric(task: str) -> tuple[str, bool]:
    """(metric key in the results, higher is better)."""
    return ("log_loss", False) if task in CTR_TASKS else ("accuracy", True)


def accuracy_tables(rows: list[dict], options: str = "{}") -> str:
    rows = [r for r in rows if json.dumps(r.get("options", {}), sort_keys=True) == options]
    cells: dict = defaultdict(list)
    dense: dict = defaultdict(list)
    for r in rows:
        key, _ = _metric(r["task"])
        cells[(r["task"], r["block"], r["sparsity"], r["method"])].append(r["pruned"][key])
        dense[r["task"]].append(r["dense"][key])
        if r["task"] in CTR_TASKS:
            cells[(r["task"] + "_auc", r["block"], r["sparsity"], r["method"])].append(r["pruned"]["auc"])
            dense[r["task"] + "_auc"].append(r["dense"]["auc"])
    out = []
    for task in sorted({k[0] for k in cells}):
        higher = task not in CTR_TASKS
        methods = sorted({k[3] for k in cells if k[0] == task})
        configs = sorted({(k[1], k[2]) for k in cells if k[0] == task})
        metric = "log-loss (lower is better)" if task in CTR_TASKS else "AUC" if _auc_of(task) else "accuracy"
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
            row = [f"{vals[m][0]:.4f} ± {vals[m][1]:.4f} (n={vals[m][2]})" if m in vals else "-"
                   for m in methods]
            out.append(f"| {b} | {s:g} | " + " | ".join(row) + f" | {best} |")
    return "\n".join(out)


def _cells(rows: list[dict], task: str, options: str) -> dict:
    """{(block, sparsity, method): [scores]} for one task (``ctr_auc`` reads the AUC of ``ctr``)."""
    base, key = (_auc_of(task), "auc") if _auc_of(task) else (task, _metric(task)[0])
    out: dict = defaultdict(list)
    for r in rows:
        if r["task"] == base and json.dumps(r.get("options", {}), sort_keys=True) == options:
            out[(r["block"], r["sparsity"], r["method"])].append(r["pruned"][key])
    return out


def verdict(rows: list[dict], sapp_options: str = "{}", min_block: int = 8, min_sparsity: float = 0.8) -> str:
    """SA++ (with ``sapp_options``) against the best baseline (default options) in every cell with
    B >= ``min_block`` and s >= ``min_sparsity``: a win or loss when the gap of the means exceeds the larger
    of the two seed stds, a tie otherwise."""
    out = []
    tasks = sorted({r["task"] for r in rows})
    tasks += [t + "_auc" for t in CTR_TASKS if t in tasks]
    seeds_of: dict = defaultdict(dict)
    for r in rows:
        auc = ((r["task"] + "_auc", "auc"),) if r["task"] in CTR_TASKS else ()
        for t, key in ((r["task"], _metric(r["task"])[0]),) + auc:
            seeds_of[(t, r["block"], r["sparsity"], r["method"],
                      json.dumps(r.get("options", {}), sort_keys=True))][r["seed"]] = r["pruned"][key]
    for task in tasks:
        higher = task not in CTR_TASKS
        base = _cells(rows, task, "{}")
        mine = _cells(rows, task, sapp_options)
        tally = {"wins": 0, "ties": 0, "loses": 0}
        lines = []
        for (b, s, m) in sorted(k for k in mine if k[2] == "sapp"):
            if b < min_block or s < min_sparsity - 1e-9:
                continue
            rivals = {mm: v for (bb, ss, mm), v in base.items() if bb == b and ss == s and mm != "sapp"}
            if not rivals:
                continue
            pick = max if higher else min
            best = pick(rivals, key=lambda mm: statistics.mean(rivals[mm]))
            a, r = mine[(b, s, "sapp")], rivals[best]
            gap = (statistics.mean(a) - statistics.mean(r)) * (1 if higher else -1)
            spread = max(statistics.pstdev(a), statistics.pstdev(r))
            word = "wins" if gap > spread else "loses" if gap < -spread else "ties"
            tally[word] += 1
            # paired by seed (same split, same data order): on how many seeds SA++ is ahead
            sa, sr = seeds_of[(task, b, s, "sapp", sapp_options)], seeds_of[(task, b, s, best, "{}")]
            both = sorted(set(sa) & set(sr))
            ahead = sum(((sa[k] - sr[k]) * (1 if higher else -1)) > 0 for k in both)
            level = sum(sa[k] == sr[k] for k in both)
            lines.append(f"  - B={b} s={s:g}: SA++ {statistics.mean(a):.4f} vs best baseline {best} "
                         f"{statistics.mean(r):.4f} -> {word} ({gap:+.4f}, seed std up to {spread:.4f}; "
                         f"n = {len(a)} / {len(r)}; ahead on {ahead} of {len(both)} seeds"
                         f"{f', level on {level}' if level else ''})")
        out.append(f"- **{task}**: SA++ wins {tally['wins']}, ties {tally['ties']}, loses {tally['loses']} "
                   f"of {sum(tally.values())} cells")
        out += lines
    return "\n".join(out)


def options_table(rows: list[dict], baselines: list[dict] | None = None) -> str:
    """One line per SA++ option set (rows of an ablation file), one column per (task, B, s) cell: mean ± std
    over seeds; with ``baselines`` (the accuracy grid) a last column counts the cells where the variant is
    ahead of the best baseline in the mean."""
    cols = sorted({(r["task"], r["block"], r["sparsity"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    if len(methods) > 1:  # several methods: one line per (method, options), the method named in the label
        return "\n\n".join(options_table([r for r in rows if r["method"] == m], baselines).replace(
            "| defaults |", f"| {m} |").replace("| `{", f"| {m} `{{") for m in methods)
    opts = sorted({json.dumps(r.get("options", {}), sort_keys=True) for r in rows},
                  key=lambda o: (o != "{}", o))
    head = "| options | " + " | ".join(f"{t} B={b} s={s:g}" for t, b, s in cols) + (
        " | ahead of best baseline |" if baselines else " |")
    out = [head, "|---|" + "---|" * (len(cols) + (1 if baselines else 0))]
    for o in opts:
        cells, ahead, total = [], 0, 0
        for t, b, s in cols:
            key, higher = _metric(t)
            v = [r["pruned"][key] for r in rows if (r["task"], r["block"], r["sparsity"]) == (t, b, s)
                 and json.dumps(r.get("options", {}), sort_keys=True) == o]
            cells.append(f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}" if v else "-")
            if baselines and v:  # the baselines on the same seeds
                seeds = {r["seed"] for r in rows if (r["task"], r["block"], r["sparsity"]) == (t, b, s)
                         and json.dumps(r.get("options", {}), sort_keys=True) == o}
                base = _cells([r for r in baselines if r["seed"] in seeds], t, "{}")
                rivals = [statistics.mean(x) for (bb, ss, mm), x in base.items()
                          if (bb, ss) == (b, s) and mm != "sapp"]
                if rivals:
                    total += 1
                    best = max(rivals) if higher else min(rivals)
                    ahead += (statistics.mean(v) > best) if higher else (statistics.mean(v) < best)
        label = "defaults" if o == "{}" else f"`{o}`"
        out.append(f"| {label} | " + " | ".join(cells) + (f" | {ahead}/{total} |" if baselines else " |"))
    return "\n".join(out)


def best_of(rows: list[dict], seeds: set | None = None) -> list[dict]:
    """For every (task, B, s, method): the rows of whichever option set (e.g. learning-rate scales) has the
    best mean, relabelled as defaults, so :func:`verdict` compares every method at its own best setting.
    Only settings run on all of ``seeds`` compete (default: the seeds every setting of the cell has)."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["block"], r["sparsity"], r["method"],
                json.dumps(r.get("options", {}), sort_keys=True))].append(r)
    cells: dict = defaultdict(dict)
    for (t, b, s, m, o), rs in groups.items():
        cells[(t, b, s, m)][o] = rs
    out = []
    for (t, b, s, m), by_opt in cells.items():
        common = seeds or set.intersection(*({r["seed"] for r in rs} for rs in by_opt.values()))
        key, higher = _metric(t)
        scored = {o: [r for r in rs if r["seed"] in common] for o, rs in by_opt.items()}
        scored = {o: rs for o, rs in scored.items() if rs}
        pick = (max if higher else min)(scored,
                                        key=lambda o: statistics.mean(r["pruned"][key] for r in scored[o]))
        out += [{**r, "options": {}, "picked": pick} for r in scored[pick]]
    return out


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
        out.append(f"| {r['case']} | {r['batch']} | {r['block']} | {r['plain_ms']:.2f} | {r['sapp_ms']:.2f} "
                   f"| {r['ratio_of_medians']:.2f}x | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} |")
    return "\n".join(out)


def _worst_blocked_pick(layers: list[dict]) -> float | None:
    """Of the layers ``auto`` made ``blocked``: the largest ratio of blocked's time to the best time of the
    dense op (dense, compact and sparse-initializer all run it), as ``auto`` measured them. None when every
    layer runs the dense op."""
    worst = None
    for c in layers:
        lat = c.get("latencies_ms") or {}
        group = [lat[n] for n in ("dense", "compact", "sparse-initializer") if n in lat]
        if c["fmt"] == "blocked" and group:
            v = lat["blocked"] / min(group)
            worst = v if worst is None else max(worst, v)
    return worst


def speed_table(name: str = "onnx_speed.json") -> str:
    p = RESULTS / name
    if not p.exists():
        return f"(no results: run bench/onnx_speed.py --out bench/results/{name})"
    d = json.loads(p.read_text())
    m = d["meta"]
    out = [f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, {m.get('utc', '')} UTC, median "
           f"of {m['rounds']} interleaved rounds (7 for the large models at N = 256)", "",
           "| model | B | s | N | threads | dense ms | blocked ms | blocked speedup | auto speedup | FLOP "
           "limit 1/d (whole model) | auto, of 1/d | auto: worst blocked layer vs dense op | size vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        w = _worst_blocked_pick(r["auto_layers"])
        worst = "dense op" if w is None else f"{w:.2f}"
        out.append(f"| {r['case']}{'' if r['balanced'] else ' (free masks)'} | {r['block']} | "
                   f"{r['sparsity']} | {r['batch']} | {r['threads']} | {r['dense_ms']:.3f} | "
                   f"{r['blocked_ms']:.3f} | {r['speedup_blocked']:.2f}x | {r['speedup_auto']:.2f}x | "
                   f"{r['flop_limit']:.0f}x ({r.get('model_flop_limit', r['flop_limit']):.1f}x) | "
                   f"{r['speedup_auto'] / r['flop_limit']:.0%} | {worst} | "
                   f"{r['bytes']['blocked'] / r['bytes']['dense']:.3f} |")
    return "\n".join(out)


def speed_plot(name: str = "onnx_speed.json") -> Path | None:
    """Speedup of auto over dense against N, one panel per model and (B, s), a line per thread count, with
    the FLOP limit 1/d and 60 % of it."""
    p = RESULTS / name
    if not p.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(p.read_text())["rows"]
    panels = sorted({(r["case"], r["block"], r["sparsity"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    cols = 3
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, (case, b, s) in zip(axes.flat, panels):
        for t in sorted({r["threads"] for r in rows}):
            pts = sorted((r["batch"], r["speedup_auto"]) for r in rows
                         if (r["case"], r["block"], r["sparsity"], r["threads"]) == (case, b, s, t))
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"auto, {t} thread(s)")
        ax.axhline(1 / (1 - s), color="gray", ls="--", lw=1, label="FLOP limit 1/d")
        ax.axhline(0.6 / (1 - s), color="gray", ls=":", lw=1, label="60 % of the limit")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{case}\nB={b}, s={s}", fontsize=9)
        ax.set_xlabel("batch N")
        ax.set_ylabel("speedup over dense")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = PLOTS / name.replace(".json", ".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def planted_table() -> str:
    """SA++'s variants (rows without a method are SA++'s); then, if measured (``--methods baselines``), the
    other methods."""
    p = RESULTS / "planted.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []
    sapp = [r for r in rows if r.get("method", "sapp") == "sapp"]
    out = ["| SA++ options | noise | recovered (seeds) | mean |", "|---|---|---|---|"]
    for o, noise in sorted({(r["options"], r["noise"]) for r in sapp}, key=lambda k: (k[0] != "{}", k)):
        v = [r["recovered"] for r in sorted(sapp, key=lambda r: r["seed"])
             if (r["options"], r["noise"]) == (o, noise)]
        label = "defaults" if o == "{}" else f"`{o}`"
        out.append(f"| {label} | {noise:g} | {' / '.join(f'{x:.2f}' for x in v)} | "
                   f"{statistics.mean(v):.2f} |")
    others = [r for r in rows if r.get("method", "sapp") != "sapp"]
    if others:
        out += ["", "| method | options | noise | recovered (seeds) | mean |", "|---|---|---|---|---|"]
        for m, o, noise in sorted({(r["method"], r["options"], r["noise"]) for r in others}):
            v = [r["recovered"] for r in sorted(others, key=lambda r: r["seed"])
                 if (r["method"], r["options"], r["noise"]) == (m, o, noise)]
            label = "defaults" if o == "{}" else f"`{o}`"
            out.append(f"| {m} | {label} | {noise:g} | {' / '.join(f'{x:.2f}' for x in v)} | "
                       f"{statistics.mean(v):.2f} |")
    return "\n".join(out)


def balanced_table() -> str:
    """Free (the accuracy grid) vs balanced selection (balanced.jsonl) for the methods and cells run."""
    bal, acc = _rows("balanced.jsonl"), _rows("accuracy.jsonl")
    out = ["| task | B | s | method | free | balanced |", "|---|---|---|---|---|---|"]
    for t, b, s, m in sorted({(r["task"], r["block"], r["sparsity"], r["method"]) for r in bal}):
        key = _metric(t)[0]
        f = [r["pruned"][key] for r in acc if (r["task"], r["block"], r["sparsity"],
                                               r["method"]) == (t, b, s, m)
             and not r.get("options")]
        v = [r["pruned"][key] for r in bal if (r["task"], r["block"], r["sparsity"],
                                               r["method"]) == (t, b, s, m)]
        cell = lambda x: f"{statistics.mean(x):.4f} ± {statistics.pstdev(x):.4f}" if x else "-"  # noqa: E731
        out.append(f"| {t} | {b} | {s:g} | {m} | {cell(f)} | {cell(v)} |")
    return "\n".join(out)


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "accuracy"
    if what == "accuracy":
        rows = _rows("accuracy.jsonl")
        print(accuracy_tables(rows))
        print("\n### Verdict (B >= 8, s >= 0.8)\n")
        print(verdict(rows))
        for p in accuracy_plots(rows):
            print(f"\nwrote {p.relative_to(ROOT)}")
    elif what == "ablations":  # the ablations, then the logits' learning-rate study
        print(options_table(_rows("ablations.jsonl")))
        print()
        print(options_table(_rows("logit_lr.jsonl"), _rows("accuracy.jsonl")))
    elif what == "verdict":  # render.py verdict FILE '{"logit_lr": 10}': SA++ with options vs baselines
        rows = _rows(sys.argv[2])
        print(verdict(rows, sys.argv[3] if len(sys.argv) > 3 else "{}"))
    elif what == "lr":  # the learning-rate study
        print(options_table(_rows("lr.jsonl") + [r for r in _rows("accuracy.jsonl") if r["method"] in
              {r2["method"] for r2 in _rows("lr.jsonl")} and (r["task"], r["block"], r["sparsity"]) in
              {(r2["task"], r2["block"], r2["sparsity"]) for r2 in _rows("lr.jsonl")}]))
    elif what == "lr-verdict":  # every method at its best learning-rate scale (x1 or as run in lr.jsonl)
        lr_rows = _rows("lr.jsonl")
        cells = {(r["task"], r["block"], r["sparsity"]) for r in lr_rows}
        base = [r for r in _rows("accuracy.jsonl") if (r["task"], r["block"], r["sparsity"]) in cells]
        picked = best_of(base + [r for r in lr_rows if r["options"].keys() == {"lr_scale"}])
        print(verdict(picked))
        print("\npicked: " + ", ".join(sorted({f"{r['task']} B={r['block']} s={r['sparsity']:g} "
                                                f"{r['method']}: {r['picked']}" for r in picked})))
    elif what == "balanced":
        print(balanced_table())
    elif what == "planted":
        print(planted_table())
    elif what == "overhead":
        print(overhead_table())
    elif what == "speed":
        name = sys.argv[2] if len(sys.argv) > 2 else "onnx_speed.json"
        print(speed_table(name))
        plot = speed_plot(name)
        if plot:
            print(f"\nwrote {plot.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
