"""The ``sapp-compress`` command: a thin click layer over :func:`sapp_compress.pipeline.compress`.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage or input; 3 ONNX Runtime differs from the pruned
PyTorch model beyond tolerance; 4 accuracy gate failed; 130 interrupted.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import click

from ._version import __version__
from .config import CONV_LAYOUTS, DEFAULT_MIN_BLOCKS, INDIVISIBLE_POLICIES, STRUCTURES, BlockSpec
from .errors import SappError, UsageError

log = logging.getLogger("sapp_compress")


class BlockType(click.ParamType):
    """``8`` (8x8) or ``RxC`` (rows = outputs x cols = inputs of the layer's 2-D view)."""

    name = "B|RxC"

    def convert(self, value, param, ctx):
        if isinstance(value, BlockSpec):
            return value
        try:
            return BlockSpec.parse(value)
        except SappError as e:
            self.fail(str(e), param, ctx)


class MethodOptionType(click.ParamType):
    """``KEY=VALUE`` for one method option; VALUE is read as JSON (``4``, ``true``, ``"keep"``) or else as
    text."""

    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, sep, raw = value.partition("=")
        if not sep or not key.strip():
            self.fail(f"expected KEY=VALUE, got {value!r}", param, ctx)
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return key.strip(), parsed


class LRType(click.ParamType):
    """``auto`` (measured by a short probe on the training shard) or a positive number."""

    name = "auto|RATE"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not rate > 0:
            self.fail(f"expected auto or a positive number, got {value!r}", param, ctx)
        return rate


def _methods() -> list[str]:
    from .engine.methods import METHODS

    return sorted(METHODS)


def _formats() -> list[str]:
    from converters import FORMATS

    return list(FORMATS)


def _runtimes() -> list[str]:
    from converters.runtimes import RUNTIMES

    return list(RUNTIMES)


class Progress:
    """What the run is doing, on stderr: a tqdm bar on a terminal (each stage with steps its own bar), plain
    lines otherwise (CI logs): one when a stage starts, one every ``every`` seconds while it runs, with the
    time it has taken and, where it counts steps, an estimate of the time left.

    Events (dicts, from :func:`sapp_compress.pipeline.compress`): ``{"event": "phase", "phase": name}`` starts
    a stage; ``{"event": "step", "step": i, "total": n, "stage": name, ...}`` advances one (the fine-tune's
    also carry its method ``phase`` and ``loss``)."""

    def __init__(self, quiet: bool, every: float = 30.0, tty: bool | None = None) -> None:
        import threading

        self.quiet, self.every = quiet, every
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        self.stage, self.started, self.step, self.total, self.extra = None, time.monotonic(), None, None, ""
        self.first: tuple[int, float] | None = None  # the stage's first step seen, and when
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.beat = None
        if not quiet and not self.tty:
            self.beat = threading.Thread(target=self._heartbeat, daemon=True)
            self.beat.start()

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        with self.lock:
            if ev.get("event") == "phase":
                self._start(ev["phase"])
            elif ev.get("event") == "step":
                stage = ev.get("stage", "fine-tune")
                if stage != self.stage:
                    self._start(stage)
                self.step, self.total = ev["step"], ev["total"]
                if self.first is None:
                    self.first = (ev["step"], time.monotonic())
                if "loss" in ev:  # the last loss read, with its phase (not every step reads it)
                    self.extra = f"phase {ev['phase']} loss {ev['loss']:.4f}"
                if self.tty:
                    self._bar(ev)
                elif time.monotonic() - self.last >= min(self.every, 10.0) or ev["step"] == ev["total"]:
                    self._line()

    def _start(self, stage: str) -> None:
        self._close_bar()
        self.stage, self.started, self.step, self.total, self.extra = stage, time.monotonic(), None, None, ""
        self.first = None
        if not self.tty:
            self.last = time.monotonic()
            click.echo(f"{stage} ...", err=True)

    def _bar(self, ev: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=ev["total"], desc=self.stage, unit="step", file=sys.stderr, leave=False)
        self.bar.n = ev["step"]
        if "loss" in ev:
            self.bar.set_postfix(phase=ev["phase"], loss=f"{ev['loss']:.4f}", refresh=False)
        self.bar.refresh()

    def _line(self) -> None:
        self.last = time.monotonic()
        spent = self.last - self.started
        text = f"{self.stage}: {spent:.0f} s"
        if self.step is not None and self.total:
            text += f", step {self.step}/{self.total}"
            s0, t0 = self.first
            if self.step > s0:
                text += f", about {(self.last - t0) / (self.step - s0) * (self.total - self.step):.0f} s left"
        click.echo(text + (f" ({self.extra})" if self.extra else ""), err=True)

    def _heartbeat(self) -> None:
        while not self.done.wait(min(1.0, self.every)):
            with self.lock:
                if self.stage is not None and time.monotonic() - self.last >= self.every:
                    self._line()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.done.set()
        with self.lock:
            self._close_bar()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write the ONNX model.")
@click.option("--block", default="8", type=BlockType(), show_default=True,
              help="Block shape: B (BxB) or RxC (rows = outputs, cols = inputs of the layer's 2-D view).")
@click.option("--sparsity", default=0.8, type=float, show_default=True,
              help="Fraction of blocks removed in each pruned layer (with --structure channels: of each "
                   "family's heads, neurons or channels), 0 < s < 1.")
@click.option("--target-speedup", type=float,
              help="With --structure channels, instead of --sparsity: each layer's width is chosen so the "
                   "model runs this many times faster than the dense model in ONNX Runtime on this machine, "
                   "at --export-batch-size and --threads (measured; exit 5 if missed by more than 10 %).")
@click.option("--accept-missed-target", is_flag=True,
              help="With --target-speedup: write the model even if its measured speed-up misses the target "
                   "(a warning instead of exit 5).")
@click.option("--structure", default="blocks", type=click.Choice(STRUCTURES), show_default=True,
              help="What is removed: blocks of each layer's weight, or whole attention heads, FFN neurons "
                   "and conv channels from every tensor they touch (a smaller dense model).")
@click.option("--method", default="sapp", type=click.Choice(_methods()), show_default=True,
              help="Pruning method: SA++ or one of the paper's baselines.")
@click.option("--method-option", "method_option", multiple=True, type=MethodOptionType(),
              help="A method option, e.g. cycles=3 or logit_lr=1.0 (repeatable; see each method's Options).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Training shard (.npz). Default: a shipped shard that fits.")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Evaluation shard. Default: held out from --data.")
@click.option("--epochs", type=float, help="Fine-tuning budget in epochs (default 10, at least 300 steps).")
@click.option("--steps", type=int, help="Fine-tuning budget in optimizer steps (instead of --epochs).")
@click.option("--batch-size", default=64, type=int, show_default=True, help="Mini-batch size (per process).")
@click.option("--lr", default="auto", type=LRType(), show_default=True,
              help="Peak learning rate (Adam, cosine, warm-up); auto: the best of 1e-5..1e-2 in a short "
                   "probe on held-out rows of the training shard (about 10 % of the fine-tune's steps; the "
                   "report's lr).")
@click.option("--weight-decay", default=1e-4, type=float, show_default=True,
              help="Coupled l2 on the masked weights and SA++ logits.")
@click.option("--layer-distill", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="Weight of layer-wise distillation: each repeated block's output (a transformer's layers) "
                   "held to the original model's, added to the loss; 0: off.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True,
              help="Where to fine-tune; auto = CUDA when available.")
@click.option("--amp", default="auto", type=click.Choice(["auto", "bf16", "fp16", "off"]), show_default=True,
              help="Mixed precision on CUDA.")
@click.option("--seed", default=0, type=int, show_default=True, help="Seed for data order, split and init.")
@click.option("--onnx-format", default="auto", type=click.Choice(_formats()), show_default=True,
              help="How pruned layers are stored; auto times the candidates per layer in ORT.")
@click.option("--export-batch-size", default=1, type=int, show_default=True,
              help="Batch size auto times formulations at (your serving batch).")
@click.option("--threads", type=int, help="Runtime threads for timing and checks.")
@click.option("--runtime", default="ort", type=click.Choice(_runtimes()), show_default=True,
              help="Where the output is timed, verified and put in int8: ONNX Runtime, or OpenVINO (pip "
                   "install 'sapp-compress[openvino]': NNCF's int8, f32 precision set explicitly); -o "
                   "model.xml writes OpenVINO IR.")
@click.option("--plan", "plan", type=click.Path(path_type=Path),
              help="Replay the choices in this earlier run's report: per-layer formulations, or with "
                   "--structure channels the graph passes and int8 form (no timing; same bytes for the same "
                   "masks).")
@click.option("--cache/--no-cache", "use_cache", default=True, show_default=True,
              help="Reuse auto's timings measured on this machine (--no-cache: measure again and refresh "
                   "them). Location: $SAPP_COMPRESS_CACHE, else $XDG_CACHE_HOME or ~/.cache, sapp-compress/.")
@click.option("--quantize", default="none", type=click.Choice(["none", "int8"]), show_default=True,
              help="int8: the pruned layers' kept blocks stored and computed in int8 (linears: dynamic "
                   "activation scales; convs: static, calibrated on the training shard, with the rest of a "
                   "conv net), where auto measures them faster; verified at --int8-kernel-rtol and "
                   "--int8-rtol.")
@click.option("--int8-rtol", default=0.2, type=float, show_default=True,
              help="With --quantize int8: ORT passes when max|diff| <= atol + this * max|output|.")
@click.option("--int8-kernel-rtol", default=0.1, type=float, show_default=True,
              help="With --quantize int8: ORT's integer kernels must match the model's own "
                   "quantize/dequantize reference to atol + this * max|output|.")
@click.option("--min-top1-agreement", default=0.8, type=click.FloatRange(0, 1), show_default=True,
              help="With --quantize int8, a classifier: ORT's top-1 must agree with the pruned PyTorch model "
                   "on at least this share of the evaluation rows (else exit 3).")
@click.option("--max-accuracy-drop", type=float,
              help="Gate: fail (exit 4) if dense score - ONNX score exceeds this (0.01 = one point).")
@click.option("--atol", default=1e-4, type=float, show_default=True,
              help="ORT vs PyTorch absolute tolerance.")
@click.option("--rtol", default=1e-3, type=float, show_default=True,
              help="ORT vs PyTorch tolerance relative to max|output|.")
@click.option("--report", type=click.Path(path_type=Path),
              help="Write the JSON report here (also on failure).")
@click.option("--save-torch", type=click.Path(path_type=Path),
              help="Also save the pruned, folded nn.Module here.")
@click.option("--trust-model", is_flag=True,
              help="Load MODEL with the full unpickler (runs its code: trusted files only).")
@click.option("--arch", help="module:callable building the model when MODEL is a state_dict, with keyword "
                             "arguments as module:callable(num_classes=10); or a transformers class name.")
@click.option("--balanced/--no-balanced", default=False, show_default=True,
              help="Keep the same number of blocks in every block-row (fastest ONNX graph).")
@click.option("--min-blocks", default=DEFAULT_MIN_BLOCKS, type=int, show_default=True,
              help="Leave layers with fewer blocks dense.")
@click.option("--indivisible", default="skip", type=click.Choice(INDIVISIBLE_POLICIES), show_default=True,
              help="When the block does not divide a layer: leave it dense, pad, or fail.")
@click.option("--include", multiple=True, help="Only prune weights matching this pattern (repeatable).")
@click.option("--exclude", multiple=True, help="Never prune weights matching this pattern (repeatable).")
@click.option("--conv-layout", default="channel", type=click.Choice(CONV_LAYOUTS), show_default=True,
              help="Conv blocks over channels (fast in ORT) or over the paper's (kh*kw*C) x O view.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Write periodic checkpoints here.")
@click.option("--checkpoint-every", default=0, type=int, help="Steps between checkpoints (0: every 5 %).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug); tracebacks on failures.")
@click.version_option(__version__, "--version")
def main(model, output, block, sparsity, target_speedup, accept_missed_target, structure, method,
         method_option, data, eval_data, epochs, steps, batch_size, lr, weight_decay, layer_distill, device,
         amp, seed, onnx_format, export_batch_size, threads, runtime, plan, use_cache, quantize, int8_rtol,
         int8_kernel_rtol,
         min_top1_agreement, max_accuracy_drop, atol, rtol, report,
         save_torch, trust_model, arch, balanced, min_blocks, indivisible, include, exclude, conv_layout,
         checkpoint_dir, checkpoint_every, resume, quiet, verbose):
    """Prune MODEL (a torch.save(module) file) with block sparsity and write a block-sparse ONNX model.

    \b
    Example:
      sapp-compress model.pt --block 8 --sparsity 0.8 -o model.onnx --max-accuracy-drop 0.01
    """
    shown = _Stderr()
    logging.basicConfig(level=logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                        logging.INFO if verbose else logging.WARNING), handlers=[shown])
    progress = Progress(quiet)
    started = False  # compress writes the report itself, on every exit, once it has started
    try:
        from .config import OutputConfig, PruneConfig, TrainConfig
        from .granularity import resolve
        from .pipeline import compress
        from .report import summary

        _warn_not_applicable(structure, resolve(structure).ignored_options)
        if target_speedup is not None and _given("sparsity"):
            raise UsageError("give --target-speedup or --sparsity, not both (the target chooses each layer's "
                             "sparsity)")
        prune_cfg = PruneConfig(block=block, sparsity=sparsity, method=method,
                                method_options=dict(method_option), balanced=balanced, structure=structure,
                                target_speedup=target_speedup, min_blocks=min_blocks, indivisible=indivisible,
                                include=include, exclude=exclude, conv_layout=conv_layout)
        train_cfg = TrainConfig(steps=steps, epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, device=device, amp=amp, seed=seed,
                                layer_distill=layer_distill,
                                checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                                checkpoint_every=checkpoint_every, resume=resume)
        out = OutputConfig(output=output, report=report, save_torch=save_torch, onnx_format=onnx_format,
                           max_accuracy_drop=max_accuracy_drop, atol=atol, rtol=rtol, threads=threads,
                           export_batch_size=export_batch_size, quantize=quantize, int8_rtol=int8_rtol,
                           int8_kernel_rtol=int8_kernel_rtol, plan=plan,
                           cache="use" if use_cache else "refresh", accept_missed_target=accept_missed_target,
                           min_top1_agreement=min_top1_agreement, runtime=runtime)
        started = True
        result = compress(model, prune_cfg, train_cfg, out, data=data, eval_data=eval_data,
                          trust_model=trust_model, arch=arch, progress=progress)
    except KeyboardInterrupt:
        progress.close()
        if report is not None and not started:
            _failure_report(report, 130, "interrupted (SIGINT)")
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 -- every failure becomes one line and its exit code
        progress.close()
        if isinstance(e, SystemExit):
            raise
        from converters.export import one_line

        from .errors import exit_code_of

        code = exit_code_of(e)
        msg = one_line(e)  # the first line, without terminal colour codes
        if report is not None and not started:  # a bad option: no run, but the report promised for every exit
            _failure_report(report, code, msg)
        if code == 1 and verbose:
            traceback.print_exc()
        click.echo(f"Error: {msg}" if code != 1 else f"Error: {type(e).__name__}: {msg}", err=True)
        sys.exit(code)
    progress.close()
    for w in [] if quiet else result.get("warnings") or []:
        if w not in shown.messages:  # a warning logged as it happened is not repeated
            click.echo(f"WARNING: {w}", err=True)  # also in the report's "warnings"
    if not quiet and result.get("onnx_bytes"):
        click.echo(summary(result), err=True)
        click.echo(f"wrote {output}", err=True)


def _failure_report(path: Path, code: int, error: str) -> None:
    """The report of a run that failed before it started (a bad option): how it ended, and the versions."""
    import contextlib

    from .io.outputs import write_json
    from .report import empty_report

    rep = empty_report()
    rep.update(exit_code=code, error=error)
    with contextlib.suppress(OSError):
        write_json(path, rep)


class _Stderr(logging.StreamHandler):
    """The command's log on stderr: a warning as ``WARNING: message`` (as the end of the run says the report's
    warnings), anything else with its level and logger. Remembers the warnings it printed, so the end of the
    run does not say them twice (where the root logger already had its handlers, this one is not installed
    and remembers nothing: the end of the run says them all)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.messages: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            return f"WARNING: {record.getMessage()}"
        return f"{record.levelname} {record.name}: {record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.messages.add(record.getMessage())
        super().emit(record)


def _given(name: str) -> bool:
    """Whether option ``name`` was given on the command line (not its default)."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _warn_not_applicable(structure: str, names: tuple[str, ...]) -> None:
    """Options given on the command line that ``--structure`` ignores: say so, once each."""
    for n in [n for n in names if _given(n)]:
        click.echo(f"WARNING: --{n.replace('_', '-')} does not apply to --structure {structure} (whole "
                   "heads, neurons and channels are removed; the ONNX is a smaller dense graph): ignored",
                   err=True)


if __name__ == "__main__":
    main()
