"""What a shard asks the model to do: the loss to fine-tune with and the score to gate on.

The task follows from the shard's ``y`` and the model's output width, never from a flag:

============================  =====================================  ======================================
shard ``y``                   loss                                   score (higher is better, in [0, 1]*)
============================  =====================================  ======================================
int, output width C > 1       cross-entropy                          top-1 accuracy
int in {0, 1}, width 1        BCE with logits                        accuracy at p = 0.5 (+ log-loss, AUC)
float                         MSE                                    R^2 (* can be negative)
absent, width C > 1           distillation: KL(teacher || student)   top-1 agreement with the original model
absent, width 1 / regression  distillation: MSE to teacher outputs   R^2 against the original's outputs
absent, a feature output      distillation: cosine + scaled MSE      mean cosine similarity to the original's
============================  =====================================  ======================================

Outputs with a token axis (``[N, T, C]``, a language model's logits) are scored per token: cross-entropy or
KL over every position, top-1 accuracy or agreement over every position (labels ``-100`` are ignored). A
*feature* output (``last_hidden_state``, ``pooler_output``, embeddings: see :mod:`sapp_compress.io.adapters`)
is never scored as classes: its argmax over features means nothing.

A feature output is distilled by what it is scored by: one minus the mean cosine similarity of each position's
feature vector to the teacher's, plus their mean squared difference over the teacher's mean square (so the
magnitudes stay too, and both terms are free of the features' scale). Plain MSE, which it replaced, weighs the
few large outlier features of a transformer's hidden state over the rest: on all-MiniLM-L6-v2 at half width it
kept 0.716 of the embeddings' cosine and 0.307 retrieval recall@1 where this loss keeps 0.774 and 0.340
(BENCHMARKS.md section 22).

The accuracy gate compares ``score`` of the dense model with ``score`` of the ONNX model, so "accuracy" in the
report means the task's score. For distillation tasks the dense model's score is 1 by definition (fidelity).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from calib_data.shards import IGNORE_INDEX

from ..errors import DataError


@dataclass(frozen=True)
class Task:
    """One of ``classification``, ``binary``, ``regression``, ``distill_classification``,
    ``distill_regression``, ``distill_features``."""

    name: str
    n_outputs: int

    @property
    def distill(self) -> bool:
        return self.name.startswith("distill")

    @property
    def score_name(self) -> str:
        return {
            "classification": "accuracy",
            "binary": "accuracy",
            "regression": "r2",
            "distill_classification": "top1_fidelity",
            "distill_regression": "r2_fidelity",
            "distill_features": "cosine_fidelity",
        }[self.name]

    @property
    def fidelity_name(self) -> str:
        """What :meth:`metrics`' ``fidelity`` measures: how close the model stays to the original, whatever
        the task's labels say (for a distillation task it is the score itself)."""
        return {"classification": "top1_agreement", "binary": "agreement",
                "regression": "r2_to_original"}.get(self.name, self.score_name)

    @property
    def is_classifier(self) -> bool:
        return self.name in ("classification", "distill_classification")

    def loss(self, out: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Loss of model output ``out`` against ``target`` (labels, or the teacher's outputs)."""
        out = out.float()
        if self.name == "classification":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if self.name == "binary":
            return F.binary_cross_entropy_with_logits(out.reshape(-1), target.float().reshape(-1))
        if self.name == "regression":
            return F.mse_loss(out.reshape(target.shape), target.float())
        if self.name == "distill_classification":
            t = temperature
            out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1, target.shape[-1])
            return F.kl_div(
                F.log_softmax(out / t, dim=-1), F.log_softmax(target.float() / t, dim=-1),
                reduction="batchmean", log_target=True,
            ) * (t * t)
        if self.name == "distill_features":  # what it is scored by (the module docstring)
            t = target.float()
            return (F.mse_loss(out, t) / (t.pow(2).mean() + 1e-12)
                    + (1 - F.cosine_similarity(out, t, dim=-1, eps=1e-8).mean()))
        return F.mse_loss(out, target.float())

    def metrics(self, out: np.ndarray, y: np.ndarray | None, reference: np.ndarray | None = None) -> dict:
        """Metrics of outputs ``out`` against labels ``y`` (or, for distillation, the original model's
        outputs ``reference``). Always has ``score``; with ``reference``, ``fidelity`` too
        (:attr:`fidelity_name`: what a labelled score does not show, how far the model moved from the
        original)."""
        m = self._metrics(np.asarray(out, dtype=np.float64), y, reference)
        if reference is not None:
            m["fidelity"] = m["score"] if self.distill else self._fidelity(out, np.asarray(reference), y)
        return m

    def _fidelity(self, out: np.ndarray, ref: np.ndarray, y: np.ndarray | None) -> float:
        out = np.asarray(out, dtype=np.float64)
        ref = ref.astype(np.float64)
        if self.name == "classification":
            same = out.argmax(-1) == ref.argmax(-1)
            keep = (y != IGNORE_INDEX) if y is not None and np.shape(y) == same.shape else np.ones_like(same)
            return float(np.mean(same[keep]))
        if self.name == "binary":
            return float(np.mean((out.reshape(-1) > 0) == (ref.reshape(-1) > 0)))
        return _r2(out.reshape(ref.shape), ref)

    def _metrics(self, out: np.ndarray, y: np.ndarray | None, reference: np.ndarray | None) -> dict:
        if self.distill:
            if reference is None:
                raise ValueError("distillation metrics need the original model's outputs")
            ref = np.asarray(reference, dtype=np.float64)
            if self.name == "distill_classification":
                agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
                return {"score": agree, "top1_fidelity": agree}
            if self.name == "distill_features":
                a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
                cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                                     1e-12)
                cosine = float(np.mean(cos))
                return {"score": cosine, "cosine_fidelity": cosine, "r2_fidelity": _r2(a, b),
                        "mse_to_original": float(np.mean((a - b) ** 2))}
            r2 = _r2(out, ref)
            return {"score": r2, "r2_fidelity": r2, "mse_to_original": float(np.mean((out - ref) ** 2))}
        assert y is not None
        if self.name == "classification":
            keep = y != IGNORE_INDEX
            acc = float(np.mean((out.argmax(-1) == y)[keep]))
            return {"score": acc, "accuracy": acc}
        if self.name == "binary":
            logit = out.reshape(-1)
            p = 1.0 / (1.0 + np.exp(-logit))
            yy = y.reshape(-1).astype(np.float64)
            eps = 1e-7
            ll = float(-np.mean(yy * np.log(p + eps) + (1 - yy) * np.log(1 - p + eps)))
            acc = float(np.mean((p > 0.5) == (yy > 0.5)))
            return {"score": acc, "accuracy": acc, "log_loss": ll, "auc": auc(yy, logit)}
        r2 = _r2(out.reshape(y.shape), y.astype(np.float64))
        return {"score": r2, "r2": r2, "mse": float(np.mean((out.reshape(y.shape) - y) ** 2))}


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    ss_res = float(np.sum((pred - target) ** 2))
    ss_tot = float(np.sum((target - target.mean(axis=0)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0.0)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get average ranks)."""
    y = np.asarray(y).reshape(-1) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    s = np.asarray(score)[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def infer_task(y: np.ndarray | None, output: np.ndarray, kind: str = "classes") -> Task:
    """Pick the task from the labels' dtype/values, the model's output ``[N, (T,) width]`` and whether that
    output holds classes or features (``kind``, from :func:`sapp_compress.io.adapters.adapt`)."""
    width = int(output.shape[-1]) if output.ndim > 1 else 1
    if kind == "features":
        if y is not None:
            raise DataError("labels: the model's output is a feature output (not logits), which labels "
                            "cannot score; drop y to distil the features, or use a model with a head")
        return Task("distill_features", width)
    if y is None:
        return Task("distill_classification" if width > 1 else "distill_regression", width)
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        if y.ndim == 2 and output.ndim != 3:
            raise DataError(f"labels: per-token labels [N, T] need a per-token output [N, T, C], got output "
                            f"shape {list(output.shape)}")
        valid = y[y != IGNORE_INDEX] if y.ndim == 2 else y
        lo, hi = (int(valid.min()), int(valid.max())) if valid.size else (0, 0)
        if width == 1:
            if lo < 0 or hi > 1:
                raise DataError("labels: expected 0/1 for a model with one output, got values in "
                                f"[{lo}, {hi}]")
            return Task("binary", 1)
        if lo < 0 or hi >= width:
            raise DataError(
                f"labels: expected class indices in [0, {width - 1}] for a model with {width} outputs, "
                f"got values in [{lo}, {hi}]"
            )
        return Task("classification", width)
    if np.issubdtype(y.dtype, np.floating):
        return Task("regression", width)
    raise DataError(f"labels: expected int (classes) or float (regression) y, got dtype {y.dtype}")
