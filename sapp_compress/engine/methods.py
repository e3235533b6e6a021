"""Pruning methods behind one interface, found through :data:`METHODS`.

Every method is a *program*: a list of phases that cover the budget as fractions, plus a block score.

- ``dense``: every block active (a dense phase after a sparse one revives the pruned blocks, keeping their
  values or restarting them at zero);
- ``sparsify``: prune the lowest-scoring alive blocks until the layer reaches the target sparsity, following
  a schedule from :mod:`sapp_compress.engine.schedules` (monotone inside the phase; a zero-length sparsify
  phase is a one-shot prune);
- ``sparse``: the mask is frozen.

The optimizer state is reset at every phase boundary (``reset_optimizer``, on by default for every method).
Selection is per layer with uniform sparsity: a layer of ``n`` blocks keeps ``round((1 - s) * n)``, or with
``balanced`` exactly ``round((1 - s) * C)`` in each of its ``R`` block-rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import PruneConfig
from ..errors import ConfigError
from .schedules import SCHEDULES
from .units import Masked


@dataclass(frozen=True)
class Phase:
    kind: str  # "dense" | "sparsify" | "sparse"
    start: float
    end: float
    schedule: str = "one_shot"

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "sparsify", "sparse"):
            raise ConfigError(f"phase kind: expected dense|sparsify|sparse, got {self.kind!r}")
        if not (0.0 <= self.start <= self.end <= 1.0 + 1e-9):
            raise ConfigError(f"phase {self.kind}: expected 0 <= start <= end <= 1, got "
                              f"[{self.start}, {self.end}]")


@dataclass(frozen=True)
class CommonOptions:
    """Options every method has.

    Attributes:
        reset_optimizer: clear the optimizer state at every phase boundary.
        revive: at the start of a dense phase, pruned blocks come back as zeros (``zero``, as ACDC does) or
            with their last values (``keep``): revived blocks that restart from their noisy values crowd the
            next selection (BENCHMARKS.md section 20.3).
        prune_events: number of pruning events spread over a gradual sparsify phase.
        final_sparse: fraction of the budget for the final sparse fine-tune (the same for every method).
    """

    reset_optimizer: bool = True
    revive: str = "zero"
    prune_events: int = 20
    final_sparse: float = 0.3

    def __post_init__(self) -> None:
        if self.revive not in ("keep", "zero"):
            raise ConfigError(f"revive: expected keep|zero, got {self.revive!r}")
        if self.prune_events < 1:
            raise ConfigError(f"prune_events: expected >= 1, got {self.prune_events}")
        if not (0.0 <= self.final_sparse < 1.0):
            raise ConfigError(f"final_sparse: expected a fraction in [0, 1), got {self.final_sparse}")


def _check_option_type(method: str, f: dataclasses.Field, value) -> None:
    """Options come from JSON or the command line: check each against its field's type (bool, int, float,
    str, or float | None) before the method sees it."""
    ann = str(f.type)
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}
    base = ann.replace(" | None", "")
    if (value is None and "None" in ann) or base not in ok or ok[base](value):
        return
    raise ConfigError(f"method {method}: option {f.name}: expected {ann}, got {value!r}")


class PruningMethod:
    """Base class: subclasses set ``name``, ``Options`` and implement :meth:`program` (and may override
    :meth:`scores`)."""

    name: ClassVar[str]
    attention: ClassVar[bool] = False
    powerprop: ClassVar[bool] = False
    Options: ClassVar[type] = CommonOptions

    def __init__(self, cfg: PruneConfig, plan, total_steps: int) -> None:
        """``plan``: what to prune (:class:`sapp_compress.granularity.Plan`: a layer's blocks or a family's
        units, whichever granularity planned it); its ``attach`` registers the masks this method needs."""
        fields = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(cfg.method_options) - fields
        if unknown:
            raise ConfigError(f"method {self.name}: unknown options {sorted(unknown)}; expected some "
                              f"of {sorted(fields)}")
        for f in dataclasses.fields(self.Options):
            if f.name in cfg.method_options:
                _check_option_type(self.name, f, cfg.method_options[f.name])
        self.options = self.Options(**cfg.method_options)
        self.cfg = cfg
        self.total_steps = total_steps
        self.phases = self.program()
        self._check_program()
        self.layers: list[Masked] = plan.attach(attention=self.attention, powerprop=self.powerprop,
                                                density=cfg.density)
        self._bounds = [(round(p.start * total_steps), round(p.end * total_steps)) for p in self.phases]
        self._entered = -1  # index of the last phase entered
        #: layer name -> its own target sparsity where it is not ``cfg.sparsity``: a neuron or channel
        #: family's kept units rounded to a multiple of 8 (``uniform_target``), or a latency-aware
        #: allocation's width
        self.targets: dict[str, float] = {
            layer.name: t for layer in self.layers
            if (t := layer.uniform_target(cfg.sparsity)) != cfg.sparsity}
        #: called as ``before_sparsify(method, phase_index)`` when a sparsify phase starts, before it prunes:
        #: the place to set :attr:`targets` (a latency-aware allocation)
        self.before_sparsify = None

    # --- the two extension points -------------------------------------------------------------------
    def program(self) -> list[Phase]:
        raise NotImplementedError

    def scores(self, layer: Masked) -> torch.Tensor:
        """Importance of every block (or unit) ``[R, C]``; higher is kept. Default: the Frobenius norm of the
        pre-mask weight's block, or of a unit's slices of every tensor it touches."""
        return layer.norms()

    def state_dict(self) -> dict:
        """The schedule position and per-layer targets (masks and logits live in the model's state)."""
        return {"entered": self._entered, "total_steps": self.total_steps, "targets": dict(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        if state["total_steps"] != self.total_steps:
            raise ConfigError(f"method state: expected a budget of {self.total_steps} steps, "
                              f"got {state['total_steps']}")
        self._entered = int(state["entered"])
        self.targets = dict(state.get("targets", {}))

    def logit_lr_scale(self, lr: float) -> float:
        """The attention logits' learning rate as a multiple of the weights' ``lr`` (methods with logits)."""
        return 1.0

    def masks(self) -> list[torch.Tensor]:
        return [layer.masker.mask for layer in self.layers]

    @property
    def current_phase(self) -> int:
        """Index of the phase the last :meth:`begin_step` entered (-1 before the first step)."""
        return self._entered

    def schedule(self, phase: Phase):
        """The sparsity schedule of a gradual sparsify phase."""
        return SCHEDULES[phase.schedule]

    # --- the engine ----------------------------------------------------------------------------------
    def _check_program(self) -> None:
        ph = self.phases
        if not ph or abs(ph[0].start) > 1e-9 or abs(ph[-1].end - 1.0) > 1e-6:
            raise ConfigError(f"method {self.name}: phases must cover [0, 1], "
                              f"got {[(p.start, p.end) for p in ph]}")
        for a, b in zip(ph, ph[1:]):
            if abs(a.end - b.start) > 1e-9:
                raise ConfigError(f"method {self.name}: phases must be contiguous, got a gap at {a.end} "
                                  f"-> {b.start}")
        if ph[-1].kind != "sparse" or not any(p.kind == "sparsify" for p in ph):
            raise ConfigError(f"method {self.name}: the program must prune and end with a sparse phase")

    def begin_step(self, step: int) -> bool:
        """Apply the mask events due before ``step``'s forward pass. Returns True when a phase boundary was
        crossed (the caller resets the optimizer state if ``reset_optimizer``)."""
        boundary = False
        # Phases are contiguous and steps come in order, so entering every phase that starts at or before
        # `step` enters the one containing it, and any zero-length ones (one-shot prunes) on the way.
        while self._entered + 1 < len(self.phases) and self._bounds[self._entered + 1][0] <= step:
            self._enter(self._entered + 1)
            boundary = True
        i = self._entered
        phase = self.phases[i]
        a, b = self._bounds[i]
        if phase.kind == "sparsify" and a < b:
            n = b - a
            j = step - a
            every = max(1, n // self.options.prune_events)
            if j % every == 0 or j == n - 1:
                self._prune_to(self.schedule(phase)((j + 1) / n))
        return boundary

    def _enter(self, i: int) -> None:
        phase = self.phases[i]
        a, b = self._bounds[i]
        self._entered = i
        if phase.kind == "sparsify" and self.before_sparsify is not None:
            self.before_sparsify(self, i)
        if phase.kind == "dense":
            for layer in self.layers:
                layer.revive(zero=self.options.revive == "zero")
        elif phase.kind == "sparsify" and a == b:
            self._prune_to(1.0)
        elif phase.kind == "sparse":
            self._prune_to(1.0)  # a no-op after a completed sparsify; a one-shot prune otherwise

    def finish(self) -> None:
        """Make sure every layer ends exactly at the target (even with a tiny budget)."""
        while self._entered + 1 < len(self.phases):
            self._enter(self._entered + 1)
        self._prune_to(1.0)

    def target(self, layer) -> float:
        """The sparsity ``layer`` ends at: ``--sparsity``, unless :attr:`targets` names the layer (a per-layer
        width chosen by a latency-aware allocation)."""
        return self.targets.get(layer.name, self.cfg.sparsity)

    def kept_count(self, layer: Masked, frac: float) -> int:
        """Blocks (or units) to keep (per block-row when balanced) at ``frac`` of the layer's target
        sparsity."""
        R, C = layer.grid
        target = self.target(layer)
        s = target * frac
        n = C if self.cfg.balanced else R * C
        return max(1, int(round((1.0 - s) * n))) if frac < 1.0 else int(round((1.0 - target) * n))

    @torch.no_grad()
    def _prune_to(self, frac: float) -> None:
        for layer in self.layers:
            k = self.kept_count(layer, frac)
            alive = layer.alive()
            score = self.scores(layer).float()
            norms = layer.norms().to(score.device)
            layer.set_mask(select_top_k(score, norms, alive, k, per_row=self.cfg.balanced))


def select_top_k(score: torch.Tensor, tiebreak: torch.Tensor, alive: torch.Tensor, k: int,
                 per_row: bool) -> torch.Tensor:
    """Boolean keep-mask: the ``k`` alive blocks of highest ``score`` (ties broken by ``tiebreak``, then by
    index), over the whole grid or within every row. Never revives a dead block; keeps fewer only if fewer
    are alive."""
    s = score.masked_fill(~alive, float("-inf"))
    t = tiebreak.masked_fill(~alive, float("-inf"))
    if not per_row:
        s, t, alive_f = s.reshape(1, -1), t.reshape(1, -1), alive.reshape(1, -1)
    else:
        alive_f = alive
    order = torch.argsort(t, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(s.gather(1, order), dim=1, descending=True, stable=True))
    keep = torch.zeros_like(alive_f)
    keep.scatter_(1, order[:, :k], True)
    return (keep & alive_f).reshape(alive.shape)


# --- the methods -------------------------------------------------------------------------------------

METHODS: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class SAPPOptions(CommonOptions):
    """SA++: ``dense`` warm-up, ``cycles`` x (sparsify, sparse, dense) in equal thirds of what is left, a
    final sparsify of ``final_sparsify`` and a final sparse fine-tune of ``final_sparse``.

    ``c`` is the exponential schedule's steepness; ``logit_decay`` applies the coupled l2 penalty to the
    attention logits too; ``sparsification=False`` is the paper's ablation (plain sparse/dense halves with
    one-shot pruning, ending on a dense phase before the final one-shot prune).

    The logits' optimiser (the paper trains them with the weights' optimiser and rate). Under Adam every
    parameter moves by about its learning rate per step whatever its gradient's size, which for the logits
    has two costs in a short fine-tune: *too slow* (at a fine-tuning rate the logits end nearly equal and the
    first mask survives every cycle) and *the wrong signal* (Adam ranks how consistently a block's scale is
    pushed up, not how much the loss cares, so blocks revived as zeros can outrank the ones the model relies
    on); BENCHMARKS.md section 20.4. So by default (``logit_norm="layer"``) each layer's logits share one
    second moment (:class:`~sapp_compress.engine.training.LogitAdam`): the step keeps the relative sizes of
    the blocks' gradients, and the layer's scale invariance; and (``logit_lr=None``) their peak rate is
    ``max(lr, logit_travel / T)`` for a budget of ``T`` steps, so they can move a few nats over any budget.
    ``logit_lr`` (a multiple of ``lr``) overrides the rule, 1.0 being the paper's rate;
    ``logit_norm="element"`` is plain Adam. ``logit_travel = 4`` and the per-layer norm were chosen from
    BENCHMARKS.md section 5.

    ``score``: the paper ranks blocks by attention (``"attention"``, the default); ``"effective"`` ranks by
    the norm of the block as the model uses it, ``A_b * ||W_b||`` (an alternative measured in section 5).
    """

    dense: float = 0.1
    cycles: int = 2
    final_sparsify: float = 0.15
    final_sparse: float = 0.15
    c: float = 4.0
    logit_decay: bool = True
    logit_lr: float | None = None
    logit_travel: float = 4.0
    sparsification: bool = True
    score: str = "attention"
    logit_norm: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_lr is not None and not self.logit_lr > 0:
            raise ConfigError(f"logit_lr: expected a positive multiple of lr, got {self.logit_lr!r}")
        for name in ("dense", "final_sparsify", "final_sparse"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: expected a fraction of the budget in [0, 1], "
                                  f"got {getattr(self, name)!r}")
        if not self.c > 0:
            raise ConfigError(f"c: expected a positive schedule steepness, got {self.c!r}")
        if self.logit_norm not in ("layer", "element"):
            raise ConfigError(f"logit_norm: expected layer|element, got {self.logit_norm!r}")
        if self.score not in ("attention", "effective"):
            raise ConfigError(f"score: expected attention|effective, got {self.score!r}")
        if not self.logit_travel > 0:
            raise ConfigError(f"logit_travel: expected a positive number, got {self.logit_travel!r}")


@register
class SAPP(PruningMethod):
    """SequentialAttention++: softmax attention over blocks ranks them; ACDC-style alternation with gradual
    (exponential) sparsification phases."""

    name = "sapp"
    attention = True
    Options = SAPPOptions

    def program(self) -> list[Phase]:
        o = self.options
        if o.cycles < 0:
            raise ConfigError(f"cycles: expected >= 0, got {o.cycles}")
        ph = [Phase("dense", 0.0, o.dense)]
        t = o.dense
        cyc = 1.0 - o.dense - o.final_sparsify - o.final_sparse
        if cyc < -1e-9:
            raise ConfigError(f"sapp: dense + final_sparsify + final_sparse must be <= 1, got {1 - cyc:g}")
        for _ in range(o.cycles):
            if o.sparsification:
                third = cyc / o.cycles / 3.0
                ph += [Phase("sparsify", t, t + third, "exponential"),
                       Phase("sparse", t + third, t + 2 * third),
                       Phase("dense", t + 2 * third, t + 3 * third)]
                t += 3 * third
            else:
                half = cyc / o.cycles / 2.0
                ph += [Phase("sparsify", t, t), Phase("sparse", t, t + half),
                       Phase("dense", t + half, t + 2 * half)]
                t += 2 * half
        if o.sparsification:
            ph.append(Phase("sparsify", t, t + o.final_sparsify, "exponential"))
        else:  # the ablation: the last phase before the final prune is dense
            ph[-1] = Phase("dense", ph[-1].start, t + o.final_sparsify)
            ph.append(Phase("sparsify", t + o.final_sparsify, t + o.final_sparsify))
        t += o.final_sparsify
        ph.append(Phase("sparse", t, 1.0))
        return ph

    def logit_lr_scale(self, lr: float) -> float:
        o = self.options
        if o.logit_lr is not None:
            return float(o.logit_lr)
        return max(1.0, o.logit_travel / (lr * max(1, self.total_steps)))

    def schedule(self, phase: Phase):
        if phase.schedule != "exponential":
            return SCHEDULES[phase.schedule]
        c = self.options.c
        return lambda t: SCHEDULES["exponential"](t, c)

    def scores(self, layer: Masked) -> torch.Tensor:
        if self.options.score == "effective":  # the norm of W_eff's block: A_b * ||W_b||
            return layer.masker.attention().detach() * layer.norms()
        # Softmax is monotone, so ranking by logits = ranking by (unclipped) attention; clipping would
        # only create ties.
        return layer.masker.logits.detach()


@dataclass(frozen=True)
class ACDCOptions(CommonOptions):
    """ACDC: ``dense`` warm-up, ``cycles`` x (sparse, dense) halves, final sparse; magnitude-ranked
    one-shot support at each sparse phase; pruned weights return as zeros."""

    dense: float = 0.1
    cycles: int = 2


@register
class ACDC(PruningMethod):
    name = "acdc"
    Options = ACDCOptions

    def program(self) -> list[Phase]:
        o = self.options
        ph = [Phase("dense", 0.0, o.dense)]
        t = o.dense
        half = (1.0 - o.dense - o.final_sparse) / max(1, o.cycles) / 2.0
        for _ in range(o.cycles):
            ph += [Phase("sparsify", t, t), Phase("sparse", t, t + half),
                   Phase("dense", t + half, t + 2 * half)]
            t += 2 * half
        ph += [Phase("sparsify", t, t), Phase("sparse", t, 1.0)]
        return ph


@register
class Magnitude(PruningMethod):
    """One-shot block-magnitude pruning at the start, then sparse fine-tuning for the whole budget."""

    name = "magnitude"

    def program(self) -> list[Phase]:
        return [Phase("sparsify", 0.0, 0.0), Phase("sparse", 0.0, 1.0)]


@dataclass(frozen=True)
class GMPOptions(CommonOptions):
    """GMP: ``dense`` warm-up, cubic gradual pruning until ``1 - final_sparse``, then sparse."""

    dense: float = 0.1


@register
class GMP(PruningMethod):
    name = "gmp"
    Options = GMPOptions

    def program(self) -> list[Phase]:
        o = self.options
        end = 1.0 - o.final_sparse
        return [Phase("dense", 0.0, o.dense), Phase("sparsify", o.dense, end, "cubic"),
                Phase("sparse", end, 1.0)]


@dataclass(frozen=True)
class PowerPropOptions(GMPOptions):
    """Block Powerpropagation: GMP's program, with a longer dense phase for the reparametrization to
    concentrate norm in the important blocks."""

    dense: float = 0.4


@register
class PowerProp(GMP):
    """``W_b = ||V_b|| V_b`` throughout (group Powerpropagation = group LASSO), pruned by block norm along
    GMP's cubic schedule."""

    name = "powerprop"
    powerprop = True
    Options = PowerPropOptions
