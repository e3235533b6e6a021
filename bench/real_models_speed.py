"""Speed and size of this tool's ONNX output on real library architectures at realistic sizes.

Every model is built by its own library's constructor with random weights (no download, no fine-tuning: the
speed of the output depends only on which blocks are kept), wrapped, planned, masked, exported and converted
through the same functions the CLI runs:

    sapp_compress.io.adapters.adapt(model, shard)         # ModelIO wrapper for keyword inputs / ModelOutput
    sapp_compress.blocks.geometry.plan_layers(unwrap(model), PruneConfig(block="16", sparsity=0.8,
                                                                         balanced=True, min_blocks=1))
    attach -> random balanced masks (k = round(0.2 * C) blocks in every block-row) -> fold
                                                          # as the zoo tests
    sapp_compress.io.export.export_model(model, shard)        # dense ONNX, the pipeline's export
    converters.convert(proto, manifest, fmt="auto", timing_inputs=onnx_feed(shard, 16 rows), threads=T)
    converters.convert(proto, manifest, fmt="blocked")

Both converted models are verified against PyTorch at batch 1 (converters.verify, the pipeline's tolerance).
Then dense, blocked and auto run interleaved in one process (harness.time_sessions; medians)
at every batch and thread count asked for, and the whole pass over the models is repeated (``--repeat``) so
the spread of the ratios over minutes shows.

The FLOP limit beside each speed-up: whole-model FLOPs of the dense model over the same with every pruned
weight's matmul at density 0.2, at batch 1. Total FLOPs are counted by ``torch.utils.flop_counter``
(matmuls, convolutions incl. depthwise, attention's batched matmuls / SDPA; elementwise ops, norms, softmax
and pooling are not counted); the pruned weights' share by forward hooks (Linear, HF Conv1D, Conv, and
nn.MultiheadAttention's in_proj / out_proj, which its module calls without going through the Linear's hook).
Those hooks also give the Linear/Conv-only limit (``flop_limit_layers``).

A model that fails anywhere on this path is recorded with the stage, the exception and where it was raised,
and the run goes on with the next model. ``--rss-cap-gb`` turns "the kernel's OOM killer ends the run" into
such a record: past that resident memory a MemoryError is raised in the main thread, with its stack.

    python bench/real_models_speed.py [--models resnet18,gpt2,gpt2:4,...] [--batches 1,16] [--threads 1]
        [--repeat 2] [--out bench/results/real_models_speed.json]
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import harness
import numpy as np
import torch
from harness import ROOT
from torch import nn

sys.path.insert(0, str(ROOT / "tests" / "models"))
from real_models import EncoderClassifier  # noqa: E402 -- the matrix's encoder, here at realistic sizes

import converters  # noqa: E402
from calib_data.shards import Shard  # noqa: E402
from converters.runtime import session  # noqa: E402
from sapp_compress.io import adapters, export, feeds  # noqa: E402
from sapp_compress.io.extras import require  # noqa: E402
from sapp_compress.io.feeds import to_tensors  # noqa: E402

SEQ = 128
ROWS = 16  # shard rows: the largest batch timed
BLOCK, SPARSITY = 16, 0.8


# ----------------------------------------------------------------------------------------------- the models
def _images(name: str, seed: int, size: int = 224) -> Shard:
    x = np.random.default_rng(seed).standard_normal((ROWS, 3, size, size)).astype(np.float32)
    return Shard(inputs=(x,), y=None, source=f"random images 3x{size}x{size}", names=(name,))


def _tokens(vocab: int, seed: int, seq: int = SEQ, mask: bool = True) -> Shard:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(ROWS, seq)).astype(np.int64)
    if not mask:
        return Shard(inputs=(ids,), y=None, source=f"random tokens, seq {seq}", names=("x",))
    am = np.ones((ROWS, seq), dtype=np.int64)
    return Shard(inputs=(ids, am), y=None, source=f"random tokens, seq {seq}",
                 names=("input_ids", "attention_mask"))


def resnet18(layers=None):
    tv = require("torchvision", "the resnet18 benchmark")
    return tv.models.resnet18(), _images("x", 0), "torchvision resnet18, 1000 classes, 224x224"


def mobilenet_v3_small(layers=None):
    tv = require("torchvision", "the mobilenet benchmark")
    return (tv.models.mobilenet_v3_small(), _images("x", 1),
            "torchvision mobilenet_v3_small, 1000 classes, 224x224")


def convnext_tiny(layers=None):
    timm = require("timm", "the convnext benchmark")
    return timm.create_model("convnext_tiny"), _images("x", 2), "timm convnext_tiny, 1000 classes, 224x224"


def convnext_nano(layers=None):
    timm = require("timm", "the convnext benchmark")
    return timm.create_model("convnext_nano"), _images("x", 2), "timm convnext_nano, 1000 classes, 224x224"


def efficientnet_b0(layers=None):
    timm = require("timm", "the efficientnet benchmark")
    return (timm.create_model("efficientnet_b0"), _images("x", 3),
            "timm efficientnet_b0, 1000 classes, 224x224")


def distilbert(layers=None):
    t = require("transformers", "the DistilBERT benchmark")
    cfg = t.DistilBertConfig(**({"n_layers": layers} if layers else {}))
    m = t.DistilBertForSequenceClassification(cfg)
    return m, _tokens(cfg.vocab_size, 4), (f"HF DistilBertForSequenceClassification, "
                                           f"{'default config' if not layers else 'default sizes'} "
                                           f"({cfg.n_layers} layers, d {cfg.dim}, ff {cfg.hidden_dim}), seq "
                                           f"{SEQ}")


def roberta(layers=None):
    t = require("transformers", "the RoBERTa benchmark")
    cfg = t.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                          num_hidden_layers=layers or 4)
    m = t.RobertaForSequenceClassification(cfg)
    return m, _tokens(cfg.vocab_size, 5), (f"HF RobertaForSequenceClassification, base sizes with "
                                           f"{cfg.num_hidden_layers} layers (d 768, ff 3072), seq {SEQ}")


def gpt2(layers=None):
    t = require("transformers", "the GPT-2 benchmark")
    cfg = t.GPT2Config(**({"n_layer": layers} if layers else {}))
    m = t.GPT2LMHeadModel(cfg)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    return m, _tokens(cfg.vocab_size, 6), ("HF GPT2LMHeadModel, "
                                           f"{'default config' if not layers else 'default sizes'} "
                                           f"({cfg.n_layer} layers, d {cfg.n_embd}, {n:.0f}M params; lm_head "
                                           f"tied, dense), seq {SEQ}")


def vit(layers=None):
    t = require("transformers", "the ViT benchmark")
    cfg = t.ViTConfig(num_hidden_layers=layers or 4)  # ViT-B/16 sizes: d 768, 12 heads, ff 3072, 224x224
    m = t.ViTForImageClassification(cfg)
    return m, _images("pixel_values", 7), (f"HF ViTForImageClassification, ViT-B/16 sizes with "
                                           f"{cfg.num_hidden_layers} layers, 224x224 (197 tokens)")


def transformer_encoder(layers=None):
    m = EncoderClassifier(vocab=8000, d=512, heads=8, ff=2048, layers=layers or 4, classes=2)
    return m, _tokens(8000, 8, mask=False), ("nn.TransformerEncoder(batch_first=True), d 512, 8 heads, ff "
                                             f"2048, {layers or 4} layers, vocab 8000, seq {SEQ}")


MODELS = {f.__name__: f for f in (resnet18, mobilenet_v3_small, convnext_tiny, convnext_nano, efficientnet_b0,
                                   distilbert, roberta, gpt2, vit, transformer_encoder)}
#: ``name:N`` builds the model with N layers (roberta and vit default to 4, the others to their library
#: default). The reduced variants stand beside the requested sizes because the converter's memory grows with
#: every layer it rewrites (about one copy of all initializers per rewritten layer; see BENCHMARKS.md), so the
#: full sizes of the large-vocabulary text models do not convert within --rss-cap-gb 11 on a 23 GiB machine.
DEFAULT = ("resnet18,mobilenet_v3_small,convnext_nano,efficientnet_b0,distilbert,distilbert:2,roberta:4,"
           "roberta:2,gpt2,gpt2:2,vit:4,transformer_encoder")


# ------------------------------------------------------------------------------------------------ helpers
class Failed(Exception):
    def __init__(self, stage: str, e: BaseException):
        tb = traceback.extract_tb(e.__traceback__)
        if isinstance(e, MemoryError) and GUARD is not None and GUARD.stack:
            tb = GUARD.stack
            e = MemoryError(f"resident memory passed the --rss-cap-gb {GUARD.cap:g} GB (peak so far "
                            f"{peak_rss_gb():.1f} GB); main thread was at "
                            f"{os.path.relpath(tb[-1].filename, ROOT)}:{tb[-1].lineno}")
        own = [f for f in tb if "/sapp_compress/" in f.filename or "/converters/" in f.filename]
        where = own[-1] if own else (tb[-1] if tb else None)
        self.record = {
            "stage": stage, "error": f"{type(e).__name__}: {str(e).strip()}"[:2000],
            "where": (f"{os.path.relpath(where.filename, ROOT)}:{where.lineno} in {where.name}"
                      if where else None),
            "raised_at": (f"{os.path.relpath(tb[-1].filename, ROOT)}:{tb[-1].lineno} in {tb[-1].name}"
                          if tb else None),
            "traceback": ("".join(traceback.format_list(tb)) if isinstance(e, MemoryError) else
                          "".join(traceback.format_exception(type(e), e, e.__traceback__)))[-6000:],
        }
        super().__init__(f"{stage}: {self.record['error']}")


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class RssGuard(threading.Thread):
    """Raises MemoryError in the main thread when this process's resident memory passes ``cap_gb`` (instead of
    the kernel's OOM killer ending the whole run), noting the main thread's stack at that moment."""

    def __init__(self, cap_gb: float):
        super().__init__(daemon=True)
        self.cap, self.main = cap_gb, threading.main_thread().ident
        self.stack: list | None = None
        self.armed = True

    def run(self):
        while True:
            time.sleep(0.1)
            if self.armed and rss_gb() > self.cap:
                frame = sys._current_frames().get(self.main)
                self.stack = traceback.extract_stack(frame) if frame is not None else []
                del frame  # a held frame would keep the converter's protos (all of its callers' locals) alive
                self.armed = False
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main),
                                                           ctypes.py_object(MemoryError))

    def rearm(self):
        self.stack, self.armed = None, True


GUARD: RssGuard | None = None


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Stage:
    def __init__(self, name: str, log: dict):
        self.name, self.log = name, log

    def __enter__(self):
        self.t = time.perf_counter()
        print(f"  [{time.strftime('%H:%M:%S', time.gmtime())}] {self.name} ...", flush=True)
        return self

    def __exit__(self, et, e, tb):
        self.log[self.name] = round(time.perf_counter() - self.t, 2)
        self.log.setdefault("peak_rss_gb", {})[self.name] = round(peak_rss_gb(), 2)
        if e is not None and not isinstance(e, Failed):
            raise Failed(self.name, e) from e
        return False


def unique_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415 -- only if transformers is loaded

        return Conv1D
    except Exception:  # noqa: BLE001
        return None


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """softmax(Q K^T) V on CPU (``torch.utils.flop_counter`` has no formula for the CPU flash kernel)."""
    *lead, l, e = q
    b = int(np.prod(lead))
    return 2 * b * l * k[-2] * e + 2 * b * l * k[-2] * v[-1]


_SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def flops(wrapped: nn.Module, inner: nn.Module, xs: tuple[torch.Tensor, ...], pruned: set[str]) -> dict:
    """FLOPs at the inputs ``xs`` (batch 1): the whole model (flop counter) and the Linear/Conv layers
    (hooks)."""
    from torch.utils.flop_counter import FlopCounterMode

    conv1d = _conv1d_cls()
    macs = {"layers": 0.0, "pruned": 0.0}
    mha_owned = set()
    for mname, mod in inner.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_owned.add(f"{mname}.out_proj" if mname else "out_proj")

    def hook(mname, mod):
        def f(m, inp, out):
            if isinstance(m, nn.MultiheadAttention):
                e = m.embed_dim
                tokens = inp[0].numel() // e
                for wname, mac in ((f"{mname}.in_proj_weight", tokens * 3 * e * e),
                                   (f"{mname}.out_proj.weight", tokens * e * e)):
                    macs["layers"] += mac
                    macs["pruned"] += mac if wname in pruned else 0
                return
            o = out[0] if isinstance(out, tuple) else out
            if isinstance(m, nn.Linear):
                mac = o.numel() * m.in_features
            elif conv1d is not None and isinstance(m, conv1d):
                mac = o.numel() * m.weight.shape[0]
            else:  # ConvNd
                mac = o.numel() * m.weight[0].numel()
            macs["layers"] += mac
            macs["pruned"] += mac if f"{mname}.weight" in pruned else 0
        return f

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention) + ((conv1d,) if conv1d else ())
    hs = [mod.register_forward_hook(hook(n, mod)) for n, mod in inner.named_modules()
          if isinstance(mod, kinds) and n not in mha_owned]
    # grad enabled: keeps nn.TransformerEncoderLayer / MHA off their fused inference kernels, which neither
    # the hooks nor the flop counter see into
    fc = FlopCounterMode(display=False, custom_mapping=_SDPA_CPU)
    try:
        with torch.enable_grad(), fc:
            wrapped(*xs)
    finally:
        for h in hs:
            h.remove()
    total = float(fc.get_total_flops())
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    layers, pr = 2 * macs["layers"], 2 * macs["pruned"]
    d = 1 - SPARSITY
    return {"total_flops": total, "layer_flops": layers, "pruned_flops": pr, "by_op": by_op,
            "rest_flops": total - layers,
            "flop_limit": total / (total - SPARSITY * pr) if total > 0 else None,
            "flop_limit_layers": layers / (layers - SPARSITY * pr) if layers > 0 else None,
            "density": d}


# ------------------------------------------------------------------------------------------------ stages
def prepare(spec: str, threads: list[int], workdir: Path, seed: int = 0) -> dict:
    """Build, mask, export, convert and verify one model (``name`` or ``name:layers``); the ONNX files are
    left in ``workdir``."""
    name, _, nl = spec.partition(":")
    layers = int(nl) if nl else None
    release()
    row: dict = {"model": spec, "stage_s": {}, "rss_before_gb": round(rss_gb(), 2)}
    log = row["stage_s"]
    torch.manual_seed(seed)
    try:
        with Stage("build", log):
            model, shard, config = MODELS[name](layers)
            model.eval()
            row["config"] = config
        with Stage("adapt", log):
            wrapped, info, _ = adapters.adapt(model, shard)
            row["output"] = info.to_json()
            inner = adapters.unwrap(wrapped)
        with Stage("plan_mask_fold", log):
            plans, skipped, manifest = harness.random_masks(inner, BLOCK, SPARSITY, seed=seed)
            row["planned_layers"] = len(plans)
            row["skipped"] = [s.to_json() for s in skipped]
            if not plans:
                raise RuntimeError("the planner chose no layer to prune")
            total = unique_params(inner)
            planned = sum(inner.get_parameter(p.name).numel() for p in plans)
            zeroed = sum(int((inner.get_parameter(p.name) == 0).sum()) for p in plans)
            row.update(params=total, planned_params=planned, zeroed_params=zeroed,
                       planned_share=planned / total, pruned_share=zeroed / total,
                       pruned_share_of_planned=zeroed / planned)
        with Stage("flops", log):
            xs1 = to_tensors(tuple(np.asarray(x[:1]) for x in shard.inputs), torch.device("cpu"))
            row["flops"] = flops(wrapped, inner, xs1, {lb.name for lb in manifest})
        with Stage("torch_reference", log):
            with torch.no_grad():
                expected = wrapped(*xs1).float().numpy()
        with Stage("export", log):
            dense = export.export_model(wrapped, shard)
        del model, inner, wrapped, plans
        gc.collect()
        files = {"dense": workdir / f"{name}{layers or ''}.dense.onnx"}
        files["dense"].write_bytes(dense.SerializeToString())
        feed16 = feeds.onnx_feed(shard, tuple(np.asarray(x[:ROWS]) for x in shard.inputs))
        feed1 = feeds.onnx_feed(shard, tuple(np.asarray(x[:1]) for x in shard.inputs))
        with Stage("convert_blocked", log):
            res = converters.convert(dense, manifest, fmt="blocked")
            files["blocked"] = workdir / f"{name}{layers or ''}.blocked.onnx"
            files["blocked"].write_bytes(res.model.SerializeToString())
            row["blocked_formats"] = _formats(res)
            del res
        for t in threads:
            with Stage(f"convert_auto_t{t}", log):
                res = converters.convert(dense, manifest, fmt="auto", timing_inputs=feed16, threads=t)
                files[f"auto_t{t}"] = workdir / f"{name}{layers or ''}.auto_t{t}.onnx"
                files[f"auto_t{t}"].write_bytes(res.model.SerializeToString())
                row[f"auto_t{t}_formats"] = _formats(res)
                row[f"auto_t{t}_layers"] = [o.to_json() for o in res.layers]
                del res
        del dense
        gc.collect()
        row["bytes"] = {k: f.stat().st_size for k, f in files.items()}
        row["size_ratio"] = {k: v / row["bytes"]["dense"] for k, v in row["bytes"].items()}
        for k in files:
            if k == "dense":
                continue
            with Stage(f"verify_{k}", log):
                v = converters.verify(files[k].read_bytes(), feed1, [expected], atol=1e-4, rtol=1e-3)
                row.setdefault("verify", {})[k] = {"max_abs_diff": v.max_abs_diff,
                                                   "max_rel_diff": v.max_rel_diff}
        row["files"] = {k: str(f) for k, f in files.items()}
        row["feeds"] = {1: feed1, ROWS: feed16}
    except (Failed, MemoryError) as f:
        if isinstance(f, MemoryError):
            f = Failed("between stages", f)
        row["failed"] = f.record
        row["failed"]["peak_rss_gb"] = round(peak_rss_gb(), 2)
        print(f"  FAILED at {f.record['stage']}: {f.record['error'][:400]}\n    where: {f.record['where']}",
              flush=True)
    release()
    row["rss_after_gb"] = round(rss_gb(), 2)
    if GUARD is not None:
        GUARD.rearm()
    return row


def release() -> None:
    """Collect, and hand freed heap back to the OS (glibc keeps it otherwise, and the RSS guard would then
    count the previous model's freed protobuf arenas against the next model)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _formats(res) -> dict:
    out: dict = {}
    for o in res.layers:
        out[o.fmt] = out.get(o.fmt, 0) + 1
    return out


def time_model(row: dict, batches: list[int], threads: list[int], min_rounds: int, budget_s: float,
               control: bool = False) -> list[dict]:
    """Interleaved medians of dense, blocked and auto at every batch and thread count (``control``: also a
    second session of the same dense bytes, whose ratio to the first is this measurement's noise floor)."""
    out = []
    for t in threads:
        names = ("dense", "blocked", f"auto_t{t}")
        try:
            sess = {k.split("_t")[0]: session(Path(row["files"][k]).read_bytes(), threads=t) for k in names}
            if control:
                sess["dense_copy"] = session(Path(row["files"]["dense"]).read_bytes(), threads=t)
        except Exception as e:  # noqa: BLE001
            rec = Failed(f"session_t{t}", e).record
            out.append({"threads": t, "failed": rec})
            continue
        for n in batches:
            feed = row["feeds"][n] if n in row["feeds"] else {
                k: np.ascontiguousarray(np.repeat(v[:1], n, axis=0)) for k, v in row["feeds"][1].items()}
            try:
                t0 = time.perf_counter()
                s = harness.time_sessions(sess, feed, min_rounds, loop_s=0.25, pause_s=0.02 if t > 1 else 0.0,
                                          budget_s=budget_s, max_rounds=41)
            except Exception as e:  # noqa: BLE001
                out.append({"threads": t, "batch": n, "failed": Failed("timing", e).record})
                continue
            med = {k: statistics.median(v) for k, v in s.items()}
            r = {"threads": t, "batch": n, "rounds": len(s["dense"]),
                 "wall_s": round(time.perf_counter() - t0, 1), "median_ms": med, "samples_ms": s,
                 "speedup": {k: med["dense"] / med[k] for k in med if k != "dense"}}
            out.append(r)
            print(f"    t={t} N={n}: dense {med['dense']:.2f} ms, blocked {med['blocked']:.2f} ms "
                  f"({r['speedup']['blocked']:.2f}x), auto {med['auto']:.2f} ms "
                  f"({r['speedup']['auto']:.2f}x), "
                  + (f"dense copy {med['dense_copy']:.2f} ms ({r['speedup']['dense_copy']:.2f}x), "
                     if control else "")
                  + f"{r['rounds']} rounds, {r['wall_s']} s", flush=True)
        del sess
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------------ report
def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def table(rows: list[dict], passes: list[list[dict]], batches: list[int], threads: list[int]) -> str:
    """Markdown: one line per model; speed-ups as the median over passes (range over passes)."""
    head = ["model (config)", "pruned / all params (planned)", "size blocked / auto",
            "FLOP limit (layers only)"]
    for t in threads:
        for n in batches:
            head += [f"blocked N={n}" + (f" t={t}" if len(threads) > 1 else ""),
                     f"auto N={n}" + (f" t={t}" if len(threads) > 1 else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = row["model"]
        if "failed" in row:
            f = row["failed"]
            err = f["error"].splitlines()[0][:300].replace("|", "\\|")
            lines.append(f"| {name} ({row.get('config', '?')}) | FAILED at {f['stage']}: `{err}` "
                         f"({f['where']}) |"
                         + " |" * (len(head) - 2))
            continue
        fl = row["flops"]
        cells = [f"{name} ({row['config']})",
                 f"{row['pruned_share']:.1%} ({row['planned_share']:.1%})",
                 f"{row['size_ratio']['blocked']:.3f} / {row['size_ratio'][f'auto_t{threads[0]}']:.3f}",
                 f"{_x(fl['flop_limit'])} ({_x(fl['flop_limit_layers'])})"]
        for t in threads:
            for n in batches:
                for k in ("blocked", "auto"):
                    vals = []
                    for p in passes:
                        for r in p:
                            if r["model"] == name and r.get("threads") == t and r.get("batch") == n and \
                                    "speedup" in r:
                                vals.append(r["speedup"][k])
                    if not vals:
                        cells.append("failed" if any(r["model"] == name and "failed" in r for p in passes
                                                     for r in p)
                                     else "-")
                    elif len(vals) == 1:
                        cells.append(f"{vals[0]:.2f}x")
                    else:
                        cells.append(f"{statistics.median(vals):.2f}x ({min(vals):.2f}-{max(vals):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    r = reason.lower()
    for pat, kind in (("tied to", "tied"), ("depthwise", "depthwise conv"), ("do not divide", "indivisible"),
                      ("grouped", "grouped conv"), ("does not divide", "indivisible"),
                      ("larger than", "smaller than a block"), ("= 0 blocks", "k = 0 per row"),
                      ("normalisation", "norm"), ("embedding", "embedding")):
        if pat in r:
            return kind
    return reason[:60]


def detail(rows: list[dict], passes: list[list[dict]]) -> str:
    """Dense latencies per pass, auto's formats, and what the FLOP counter saw outside the pruned layers."""
    lines = ["| model | dense ms per pass (N=1 / N=16, 1st thread count) | auto layer formats | blocked "
             "layer formats | GFLOP at N=1: total / Linear+Conv / pruned | skipped layers | convert s "
             "blocked / auto, process peak RSS so far GB |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            continue
        per = []
        for p in passes:
            ms = [f"{r['median_ms']['dense']:.1f}" for r in p
                  if r["model"] == row["model"] and "median_ms" in r
                  and r["threads"] == p[0].get("threads", 1)] if p else []
            per.append(" / ".join(ms))
        fl = row["flops"]
        auto = next(v for k, v in row.items() if k.startswith("auto_t") and k.endswith("_formats"))
        reasons: dict = {}
        for s in row["skipped"]:
            key = _reason_kind(s["reason"])
            reasons[key] = reasons.get(key, 0) + 1
        lines.append(f"| {row['model']} | {'; '.join(per)} | {auto} | {row['blocked_formats']} | "
                     f"{fl['total_flops']/1e9:.2f} / {fl['layer_flops']/1e9:.2f} / "
                     f"{fl['pruned_flops']/1e9:.2f} | "
                     f"{'; '.join(f'{v} {k}' for k, v in reasons.items()) or '-'} | "
                     f"{row['stage_s'].get('convert_blocked', 0):.0f} / "
                     f"{sum(v for k, v in row['stage_s'].items() if k.startswith('convert_auto')):.0f}, "
                     f"{max(row['stage_s']['peak_rss_gb'].values()):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = harness.parser(__doc__, out="real_models_speed.json")
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--repeat", type=int, default=2, help="passes of the timing over all models")
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=6.0,
                    help="seconds of interleaved rounds per (model, batch)")
    ap.add_argument("--rss-cap-gb", type=float, default=11.0,
                    help="record a model as failed (MemoryError, with its stack) past this resident memory")
    ap.add_argument("--control", action="store_true",
                    help="time a second session of the dense model too "
                         "(its ratio to the first is the noise floor)")
    ap.add_argument("--md", default="", help="also write the tables (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = harness.names(args.models)
    batches = harness.ints(args.batches)
    threads = harness.ints(args.threads)
    if max(batches) > ROWS:
        raise SystemExit(f"batches up to {ROWS}")
    machine = f"{harness.machine_line()}; torch {torch.__version__}, fp32"
    global GUARD
    if args.rss_cap_gb > 0:
        GUARD = RssGuard(args.rss_cap_gb)
        GUARD.start()
    print(machine, flush=True)
    t_start = time.time()
    meta = {"machine": machine, "python": platform.python_version(), "block": BLOCK, "sparsity": SPARSITY,
            "balanced": True, "batches": batches, "threads": threads, "seq": SEQ, "repeat": args.repeat,
            "min_rounds": args.min_rounds, "budget_s": args.budget, "rss_cap_gb": args.rss_cap_gb,
            "control": args.control,
            "command": "python bench/real_models_speed.py " + " ".join(sys.argv[1:]),
            "utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="real_models_") as d:
        rows = []
        for name in names:
            print(f"== {name}", flush=True)
            rows.append(prepare(name, threads, Path(d)))
        passes = []
        for p in range(args.repeat):
            print(f"== timing pass {p + 1}/{args.repeat}", flush=True)
            timed = []
            for row in rows:
                if "failed" in row:
                    continue
                print(f"  {row['model']}", flush=True)
                for r in time_model(row, batches, threads, args.min_rounds, args.budget, args.control):
                    timed.append({"model": row["model"], "pass": p + 1, **r})
            passes.append(timed)
    for row in rows:
        row.pop("feeds", None)
        row.pop("files", None)
    meta["utc_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["wall_s"] = round(time.time() - t_start, 1)
    md = (f"Machine: {machine}\n\n" + table(rows, passes, batches, threads) + "\n\n" + detail(rows, passes) +
          "\n")
    print("\n" + md, flush=True)
    harness.write_results(args.out, {"meta": meta, "models": rows, "timings": passes, "table_md": md})
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
