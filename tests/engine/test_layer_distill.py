"""Layer-wise distillation (``--layer-distill``): the blocks found on library models (a transformer's layers,
a CNN stage's blocks), the loss zero for a student that is the teacher, the blocks' outputs still the
teacher's shape after heads and neurons are removed, and a run through the CLI with it."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import needs
from torch import nn

from sapp_compress.cli import main
from sapp_compress.config import BlockSpec, PruneConfig
from sapp_compress.engine.distill import layer_loss, layer_names, taps
from sapp_compress.structure.plan import plan_families
from sapp_compress.structure.remove import random_keep, remove


def _bert():
    t = needs("transformers")
    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, num_labels=3)
    return t.BertForSequenceClassification(cfg).eval()


def test_blocks_found_on_library_models():
    assert layer_names(_bert()) == [f"bert.encoder.layer.{i}" for i in range(3)]
    t = needs("transformers")
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    assert layer_names(gpt2) == ["transformer.h.0", "transformer.h.1"]
    tv = needs("torchvision")
    assert layer_names(tv.models.resnet18(num_classes=4)) == ["layer1.0", "layer1.1"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert layer_names(mlp) == []  # no run of same-class blocks with weights: the output only


def test_the_loss_is_zero_for_the_teacher_and_the_outputs_keep_their_shape_after_removal():
    model = _bert()
    names = layer_names(model)
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    student = copy.deepcopy(model)
    with taps(student, names) as mine, taps(model, names) as theirs, torch.no_grad():
        student(input_ids=ids)
        model(input_ids=ids)
    assert len(mine) == len(theirs) == 3 and float(layer_loss(mine, theirs)) == 0.0

    class Out(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(input_ids=x).logits

    wrapped = Out(student)
    fams, _ = plan_families(wrapped, student, (ids,), PruneConfig(BlockSpec(1, 1), 0.5, structure="channels"),
                            inner_of=lambda m: m.inner)
    families = [p.family for p in fams]
    remove(student, families, random_keep(families, {f.name: f.kept_units(0.5) for f in families}))
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())
    with taps(student, names) as mine, taps(model, names) as theirs, torch.no_grad():
        student(input_ids=ids)
        model(input_ids=ids)
    assert [m.shape for m in mine] == [t.shape for t in theirs]
    assert 0.0 < float(layer_loss(mine, theirs)) < float("inf")


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_through_the_cli(tmp_path, weight):
    """A labelled shard: the blocks are held to the original's with a teacher made for them alone; weight 0
    (the default) leaves the run as it was."""
    _bert().save_pretrained(tmp_path / "bert")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input_ids=rng.integers(1, 100, (64, 8)), y=rng.integers(0, 3, 64))
    args = [tmp_path / "bert", "--data", tmp_path / "d.npz", "--structure", "channels", "--sparsity", "0.5",
            "--steps", "4", "--batch-size", "16", "--lr", "1e-3", "--layer-distill", weight, "-o",
            tmp_path / "m.onnx", "--report", tmp_path / "r.json"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["config"]["train"]["layer_distill"] == weight and r["task"] == "classification"
    assert r["verification"]["passed"]


def test_feature_distillation_loss_is_the_score_it_is_judged_by():
    """A feature output is distilled by 1 - mean cosine + MSE / mean(teacher^2): zero for the teacher itself,
    the same for any scale of the features, and exactly those two terms."""
    import torch.nn.functional as F

    from sapp_compress.io.tasks import Task

    task = Task("distill_features", 4)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 5, 4, generator=g)
    assert task.loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    s = t + 0.1 * torch.randn(8, 5, 4, generator=g)
    assert task.loss(100 * s, 100 * t).item() == pytest.approx(task.loss(s, t).item(), rel=1e-4)
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    mse = F.mse_loss(s, t) / t.pow(2).mean()
    assert task.loss(s, t).item() == pytest.approx((1 - cos + mse).item(), rel=1e-5)
