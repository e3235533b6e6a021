"""Real library architectures end to end through the CLI: small configs, random weights, a few steps.

Each case must exit 0; ONNX Runtime must match the pruned PyTorch model at batch sizes other than the
export's (the default tolerance); the report must list as pruned at least 90 % of the parameters of the
layers that can be pruned (Linear / Conv1D / groups-1 conv / fused in_proj weights that the block divides and
that are not embeddings or tied heads), counted here from the model itself, not from the tool's plan; and the
graph must carry no unused initializer.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from helpers import needs  # noqa: E402
from real_models import MODELS, Case, _tokens, distilbert, gpt2  # noqa: E402

from sapp_compress.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
BLOCK = 16
FAST = ["--block", str(BLOCK), "--sparsity", "0.8", "--steps", "4", "--batch-size", "16", "--min-blocks", "1",
        "--onnx-format", "blocked"]


#: the optional library each matrix case needs (the extras hf / vision)
LIBRARY = {"bert": "transformers", "distilbert": "transformers", "roberta": "transformers",
           "gpt2": "transformers", "vit": "transformers", "resnet18": "torchvision",
           "mobilenet_v3_small": "torchvision", "torchvision_vit": "torchvision", "convnext": "timm",
           "efficientnet": "timm", "transformer_encoder": None}





def run(case: Case, tmp: Path, *args) -> tuple[int, str, dict]:
    np.savez(tmp / "shard.npz", **case.arrays)
    rep = tmp / "report.json"
    res = CliRunner().invoke(main, [str(case.path), "--data", str(tmp / "shard.npz"), "-o",
                                    str(tmp / "m.onnx"), "--report", str(rep), *case.args, *map(str, args)])
    return res.exit_code, res.output, json.loads(rep.read_text()) if rep.exists() else {}


def prunable_params(model: nn.Module, block: int) -> dict[str, int]:
    """name -> size of every weight the tool should prune: matmul weights the block divides, not shared with
    another module (tied heads, embeddings)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            w, rows, cols, pname = m.in_proj_weight, *m.in_proj_weight.shape, "in_proj_weight"
        elif isinstance(m, nn.Linear):
            w, rows, cols, pname = m.weight, *m.weight.shape, "weight"
        elif type(m).__name__ == "Conv1D":  # transformers' transposed linear
            w, pname = m.weight, "weight"
            cols, rows = w.shape
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1:
            w, rows, cols, pname = m.weight, *m.weight.shape[:2], "weight"
        else:
            continue
        if uses[id(w)] > 1 or rows % block or cols % block:
            continue
        out[f"{name}.{pname}"] = w.numel()
    return out


def assert_no_unused_initializers(path: Path) -> None:
    m = onnx.load(str(path))
    used = {i for n in m.graph.node for i in n.input}
    unused = [t.name for t in m.graph.initializer if t.name not in used]
    assert not unused, unused


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_end_to_end(name, tmp_path):
    needs(LIBRARY[name])
    case = MODELS[name](tmp_path)
    code, out, rep = run(case, tmp_path, *FAST, *(["--indivisible", "pad"] if name == "gpt2" else []))
    assert code == 0, out
    ver = rep["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 + 1e-3 * 100  # the default tolerance, output-scaled
    assert ver["export_batch_size"] not in ver["batch_sizes"] and 1 in ver["batch_sizes"]
    expected = prunable_params(case.model, BLOCK)
    pruned = {lay["name"]: int(np.prod(lay["shape"])) for lay in rep["layers"]}
    share = sum(v for k, v in expected.items() if k in pruned) / sum(expected.values())
    print(f"{name}: pruned share {share:.3f} of {sum(expected.values())} prunable parameters, "
          f"verification {ver['max_abs_diff']:.2e}, size {rep['onnx_bytes'] / rep['dense_onnx_bytes']:.3f}")
    assert share >= 0.9, sorted(set(expected) - set(pruned))
    assert_no_unused_initializers(tmp_path / "m.onnx")


def test_gpt2_tied_head_stays_dense_and_its_bytes_identical(tmp_path):
    """GPT-2's lm_head is the token embedding: it is never pruned, whatever --indivisible says, the report
    says why, and the embedding in the ONNX is byte-identical to the dense model's."""
    needs("transformers")
    case = gpt2(tmp_path)
    code, out, rep = run(case, tmp_path, *FAST, "--indivisible", "pad")
    assert code == 0, out
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "tied to transformer.wte.weight (an embedding)" in reasons["lm_head.weight"]
    assert "lm_head.weight" not in {lay["name"] for lay in rep["layers"]}
    wte = case.model.transformer.wte.weight.detach().numpy()
    m = onnx.load(str(tmp_path / "m.onnx"))
    held = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if tuple(t.dims) == wte.shape]
    assert any(a.tobytes() == wte.tobytes() for a in held)
    # the Conv1D layers (transposed linears) were pruned: c_attn, c_proj, c_fc, mlp c_proj in each block
    assert sum("c_attn" in lay["name"] or "c_fc" in lay["name"] for lay in rep["layers"]) == 4


def test_int32_token_shard_runs(tmp_path):
    needs("transformers")
    case = MODELS["bert"](tmp_path)
    case.arrays = {k: (v.astype(np.int32) if k != "y" else v) for k, v in case.arrays.items()}
    code, out, rep = run(case, tmp_path, *FAST)
    assert code == 0, out
    assert rep["inputs"] == ["input_ids", "attention_mask"]
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == \
        ["input_ids", "attention_mask"]


def test_feature_output_is_scored_as_features(tmp_path):
    """DistilBertModel returns last_hidden_state: distilled and scored by cosine similarity, not classes."""
    transformers = needs("transformers")
    cfg = transformers.DistilBertConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                        max_position_embeddings=64)
    model = transformers.DistilBertModel(cfg).eval()
    model.save_pretrained(tmp_path / "distil")
    case = Case(tmp_path / "distil", _tokens(labels=None), [], model)
    code, out, rep = run(case, tmp_path, *FAST)
    assert code == 0, out
    assert rep["output"]["key"] == "last_hidden_state" and rep["output"]["kind"] == "features"
    assert rep["task"] == "distill_features" and rep["score_name"] == "cosine_fidelity"
    assert rep["accuracy"]["dense"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < rep["accuracy"]["onnx"] <= 1.0 + 1e-6
    assert "top1_fidelity" not in rep["metrics"]["onnx"]


def test_torch_saved_transformers_module_with_trust(tmp_path):
    """A transformers model saved with torch.save(module): loaded with --trust-model, its ModelOutput's
    logits used, and the report says so."""
    needs("transformers")
    case = distilbert(tmp_path)
    torch.save(case.model, tmp_path / "distil.pt")
    case = Case(tmp_path / "distil.pt", case.arrays, ["--trust-model"], case.model)
    code, out, rep = run(case, tmp_path, *FAST)
    assert code == 0, out
    assert rep["output"] == {"key": "logits", "kind": "classes", "type": "SequenceClassifierOutput"}
    # 4 steps: no probe
    assert rep["lr"]["value"] == pytest.approx(1e-3) and rep["lr"]["source"] == "fallback"


class Unlocatable(nn.Module):
    """Uses its Linear's weight through an expression, so the graph holds W + 1, never W."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(nn.functional.linear(x, self.fc.weight + 1.0))


class FixedBatch(nn.Module):
    """Its code fixes the batch axis (adds a constant of batch 2)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.register_buffer("offset", torch.zeros(2, 32))

    def forward(self, x):
        return self.fc(x) + self.offset


@pytest.mark.parametrize("model, message", [
    # fc.weight is left dense by the pre-check (a model with other layers goes on: test_rim_models.py), and
    # then no layer is left to prune
    (Unlocatable(), "no layer can be pruned at block 8x8: head.weight: block 8x8 larger than the 4x32 linear "
                    "view; fc.weight: no initializer of the exported graph holds this weight "
                    "(shape (32, 32), as is, transposed or BatchNorm-scaled): the graph only holds a tensor "
                    "computed from it, e.g. folded with a constant input: left dense"),
    (FixedBatch(), "cannot export the model to ONNX: the model's graph cannot keep axis 0 (batch) of input x "
                   "dynamic: its code fixes it to 2"),
])
def test_unconvertible_model_fails_before_the_fine_tune(tmp_path, model, message):
    """A budget of 100000 steps would take hours: the failure must come from the pre-check, in seconds."""
    torch.save(model, tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    case = Case(tmp_path / "m.pt", {"x": rng.standard_normal((40, 32)).astype(np.float32),
                                    "y": rng.integers(0, 4, 40)}, ["--trust-model"])
    t = time.perf_counter()
    code, out, rep = run(case, tmp_path, "--block", "8", "--steps", "100000")
    took = time.perf_counter() - t
    assert code == 2, out
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("Error:")]
    assert lines == [f"Error: {message}"], out
    assert "\x1b" not in out
    assert "fine_tune" not in rep["timings"] and took < 60, (took, rep["timings"])
    assert not (tmp_path / "m.onnx").exists()


def test_collapsing_fine_tune_warns(tmp_path):
    """An absurd learning rate wrecks the fine-tune: no gate was asked for, but the run warns loudly."""
    case = MODELS["transformer_encoder"](tmp_path)
    del case.arrays["y"]  # distillation: the dense model's fidelity to itself is 1
    code, out, rep = run(case, tmp_path, "--block", "16", "--sparsity", "0.9", "--steps", "6", "--lr", "50",
                         "--onnx-format", "dense")
    assert code == 0, out
    assert rep["warnings"] and "the fine-tune collapsed" in rep["warnings"][0]
    assert "the fine-tune collapsed" in out


def test_named_input_eval_shard(tmp_path):
    """--eval-data with named inputs (input_ids, attention_mask) is checked and scored like the training
    shard."""
    needs("transformers")
    case = MODELS["bert"](tmp_path)
    half = {k: v[24:] for k, v in case.arrays.items()}
    np.savez(tmp_path / "eval.npz", **half)
    case.arrays = {k: v[:24] for k, v in case.arrays.items()}
    code, out, rep = run(case, tmp_path, *FAST, "--eval-data", tmp_path / "eval.npz")
    assert code == 0, out
    assert rep["data"]["eval"] == str(tmp_path / "eval.npz")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet", "distilbert", "vit"])
def test_real_model_int8(name, tmp_path):
    """``--quantize int8`` on library models: exit 0, every pruned layer int8 (convs in the static QDQ form
    with the rest of a conv net, linears dynamic), the three verification stages passed, and ORT's int8
    kernels within the default kernel tolerance of the model's own quantization reference."""
    needs(LIBRARY[name])
    case = MODELS[name](tmp_path)
    args = [a if a != "blocked" else "compact" for a in FAST]
    code, out, rep = run(case, tmp_path, *args, "--quantize", "int8")
    assert code == 0, out
    assert rep["layers"] and all(lay["precision"] == "int8" for lay in rep["layers"])
    for lay in rep["layers"]:
        conv = len(lay["shape"]) > 2
        assert lay["int8"]["activation"] == ("static" if conv else "dynamic"), lay["name"]
    ver = rep["verification"]
    assert ver["passed"] and ver["precision"] == "int8"
    assert ver["stages"]["fp32"]["passed"] and ver["stages"]["int8_kernels"]["passed"]
    assert rep["bytes"]["sparse"] < rep["bytes"]["sparse_fp32"]
    print(f"{name} int8: kernels {ver['stages']['int8_kernels']['max_rel_diff']:.2e}, vs torch "
          f"{ver['max_rel_diff']:.2e}, size {rep['bytes']['sparse'] / rep['bytes']['dense_fp32']:.3f}")
