"""Issue 16, the rim a new user hits on library models (small configs of the libraries' own classes, random
weights): a parametrized layer and --save-torch; layers the pre-check cannot place left dense with their
reason instead of failing the model (a pooler the output does not use, a layer shared across calls, a
projection the exporter folds into a constant, a norm whose scale starts at zero); the model's own
configuration errors and token ids beyond the vocabulary named as such; a --save-torch file of a torchvision
model loaded by a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from helpers import needs  # noqa: E402
from real_models import VOCAB, _images, _tokens  # noqa: E402

from calib_data.shards import Shard  # noqa: E402
from sapp_compress import PruneConfig, TrainConfig  # noqa: E402
from sapp_compress.cli import main  # noqa: E402
from sapp_compress.config import OutputConfig  # noqa: E402
from sapp_compress.errors import DataError, ModelLoadError  # noqa: E402
from sapp_compress.pruning import prepare, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPACT = ["--block", "16", "--sparsity", "0.8", "--steps", "2", "--batch-size", "16", "--min-blocks", "1",
           "--onnx-format", "compact"]


def _cli(model: Path, arrays: dict, tmp: Path, *args) -> tuple[int, str, dict]:
    np.savez(tmp / "shard.npz", **arrays)
    rep = tmp / "report.json"
    res = CliRunner().invoke(main, [str(model), "--data", str(tmp / "shard.npz"), "-o", str(tmp / "m.onnx"),
                                    "--report", str(rep), *map(str, args)])
    return res.exit_code, res.output, json.loads(rep.read_text()) if rep.exists() else {}


def _shard(arrays: dict) -> Shard:
    names = tuple(k for k in arrays if k != "y")
    return Shard(tuple(arrays[k] for k in names), arrays.get("y"), "shard.npz", names)


def _prune_with_precheck(model: nn.Module, arrays: dict):
    """:func:`prune` with the CLI's pre-check (one export) between its halves, one fine-tuning step."""
    shard = _shard(arrays)
    cfg = PruneConfig(block="16", sparsity=0.8, min_blocks=1)
    job = prepare(model, shard, cfg, TrainConfig(steps=1, batch_size=16))
    drop = job.plan.granularity.precheck(job.dense, job.plan, shard, OutputConfig(output=Path("unused.onnx")),
                                         cfg)
    job.plan = job.plan.leave_dense(drop, cfg)
    res = run(job)
    return res, {s.name: s.reason for s in res.skipped}, {lb.name for lb in res.layers}


@pytest.mark.slow
def test_weight_norm_layer_is_pruned_and_saved(tmp_path):
    """Item 1: a speech model's positional conv under parametrizations.weight_norm (groups 1 here, so it is
    pruned too): it ran to exit 1 (a parametrized weight cannot take the masks, and torch.save refuses a
    parametrized module); now the user's parametrization is folded first, --save-torch writes, and the saved
    model computes what the ONNX model does."""
    t = needs("transformers")
    cfg = t.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=1, num_labels=3)
    model = t.Wav2Vec2ForSequenceClassification(cfg).eval()
    assert torch.nn.utils.parametrize.is_parametrized(model.wav2vec2.encoder.pos_conv_embed.conv)
    model.save_pretrained(tmp_path / "w2v")
    rng = np.random.default_rng(0)
    arrays = {"input_values": rng.standard_normal((32, 400)).astype(np.float32), "y": rng.integers(0, 3, 32)}
    code, out, rep = _cli(tmp_path / "w2v", arrays, tmp_path, *COMPACT, "--block", "8",
                          "--save-torch", tmp_path / "pruned.pt")
    assert code == 0, out
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight" in {lay["name"] for lay in rep["layers"]}
    import converters
    from sapp_compress import load_pruned
    from sapp_compress.io.feeds import onnx_feed

    saved = load_pruned(tmp_path / "pruned.pt", trust=True)
    x = arrays["input_values"][:3]
    with torch.no_grad():
        want = saved(input_values=torch.from_numpy(x)).logits.numpy()
    got = converters.run_onnx((tmp_path / "m.onnx").read_bytes(), onnx_feed(_shard(arrays), (x,)))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_unpicklable_model_with_save_torch_fails_before_the_fine_tune(tmp_path):
    """Item 1, what folding cannot fix: a model torch.save cannot write fails in the pre-check (exit 2, one
    line), not after the fine-tune."""
    from sapp_compress.config import OutputConfig
    from sapp_compress.errors import UnsupportedModel
    from sapp_compress.pipeline import compress

    class Lambda(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head, self.act = nn.Linear(64, 64), nn.Linear(64, 10), lambda x: x.relu()

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    out = OutputConfig(output=tmp_path / "m.onnx", report=tmp_path / "r.json", save_torch=tmp_path / "m.pt",
                       onnx_format="compact")
    with pytest.raises(UnsupportedModel, match="--save-torch: torch.save cannot write this model"):
        compress(Lambda(), PruneConfig(block="8", sparsity=0.8), TrainConfig(steps=20), out,
                 data=ROOT / "calib_data" / "digits.npz")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["exit_code"] == 2 and "fine_tune" not in rep["timings"]
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_bert_model_pooler_unused_by_the_output_is_left_dense():
    """Item 3a: BertModel (feature extraction): its pooler does not feed last_hidden_state, the exporter drops
    it, and the pre-check refused the whole model; now it stays dense with that reason, naming the output."""
    t = needs("transformers")
    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64)
    res, skipped, pruned = _prune_with_precheck(t.BertModel(cfg).eval(), _tokens(labels=None))
    assert res.output.key == "last_hidden_state"
    assert "pooler.dense.weight" not in pruned
    assert "'last_hidden_state' does not depend on it" in skipped["pooler.dense.weight"]
    assert "encoder.layer.0.attention.self.query.weight" in pruned


@pytest.mark.slow
def test_layer_shared_across_calls_is_pruned_once_and_stored_once(tmp_path):
    """Item 3b: ALBERT calls one layer num_hidden_layers times; the exporter holds each of its weights in one
    transposed copy per call ("2 initializers hold this weight; refusing to guess", exit 2). Now the copies
    are one weight: pruned once, stored once (compact), every consumer reads it, ORT matches PyTorch."""
    t = needs("transformers")
    cfg = t.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                         num_labels=3)
    t.AlbertForSequenceClassification(cfg).eval().save_pretrained(tmp_path / "albert")
    code, out, rep = _cli(tmp_path / "albert", _tokens(), tmp_path, *COMPACT)
    assert code == 0, out
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    rows = {lay["name"]: lay for lay in rep["layers"]}
    for name in ("attention.query.weight", "ffn.weight", "ffn_output.weight"):
        assert rows[layer + name]["onnx_format"] == "compact"
    import onnx

    m = onnx.load(str(tmp_path / "m.onnx"))
    ffn = rows[layer + "ffn.weight"]
    held = [t for t in m.graph.initializer if list(t.dims) in (ffn["shape"], ffn["shape"][::-1])]
    assert not held  # no dense copy left: the one compact storage serves both calls
    assert rep["verification"]["passed"]


@pytest.mark.slow
def test_projection_folded_into_a_constant_is_left_dense():
    """Item 3c: DeBERTa-v2's relative-position projections of a fixed embedding: the exporter folds them into
    a constant, and the pre-check refused the whole model; now they stay dense with the reason."""
    t = needs("transformers")
    cfg = t.DebertaV2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, relative_attention=True,
                            position_buckets=16, pos_att_type=["p2c", "c2p"], num_labels=3)
    res, skipped, pruned = _prune_with_precheck(t.DebertaV2ForSequenceClassification(cfg).eval(), _tokens())
    for name in ("pos_key_proj", "pos_query_proj"):
        reason = skipped[f"deberta.encoder.layer.0.attention.self.{name}.weight"]
        assert "no initializer of the exported graph holds this weight" in reason and "left dense" in reason
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in pruned


class PartlyUnlocatable(nn.Module):
    """``fc`` used through an expression (the graph holds W + 1, never W), ``out`` a plain layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.out, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.out(nn.functional.linear(x, self.fc.weight + 1.0)))


def test_layer_the_graph_holds_only_computed_goes_dense_and_the_model_through(tmp_path):
    """Item 3: a layer the pre-check cannot place no longer fails the model (exit 2): it stays dense with the
    reason, and the other layers are pruned."""
    from test_real_models import Case, run

    torch.save(PartlyUnlocatable(), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    case = Case(tmp_path / "m.pt", {"x": rng.standard_normal((40, 32)).astype(np.float32),
                                    "y": rng.integers(0, 4, 40)}, ["--trust-model"])
    code, out, rep = run(case, tmp_path, "--block", "8", "--steps", "2", "--onnx-format", "compact")
    assert code == 0, out
    assert [lay["name"] for lay in rep["layers"]] == ["out.weight"]
    assert "no initializer of the exported graph holds this weight" in {s["name"]: s["reason"]
                                                                         for s in rep["skipped"]}["fc.weight"]


@pytest.mark.slow
def test_zero_init_last_resnet_goes_through(tmp_path):
    """Item 3d: a freshly built timm ResNet zero-initialises the last BatchNorm scale of every block, so its
    conv folds to zeros in the graph ("no initializer holds this weight ..., BatchNorm-scaled", exit 2). Now
    located by name: every such conv is pruned."""
    needs("timm")
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 16, 32, 32), stem_width=16, num_classes=10)
    assert not model.layer1[0].bn2.weight.any()
    torch.save(model.eval(), tmp_path / "resnet.pt")
    code, out, rep = _cli(tmp_path / "resnet.pt", _images(labels=10), tmp_path, "--trust-model", *COMPACT,
                          "--block", "8")
    assert code == 0, out
    pruned = {lay["name"] for lay in rep["layers"]}
    assert {f"layer{i}.0.conv2.weight" for i in (1, 2, 3, 4)} <= pruned


def test_model_config_error_is_the_models_not_the_shards():
    """Item 6: a T5 config without decoder_start_token_id fails inside the model: said to be the model's
    configuration, not "inputs ... do not fit the model"."""
    t = needs("transformers")
    from sapp_compress.io.adapters import adapt

    cfg = t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, num_labels=3,
                     decoder_start_token_id=None)
    with pytest.raises(ModelLoadError) as e:
        adapt(t.T5ForSequenceClassification(cfg).eval(), _shard(_tokens()))
    assert "the model fails on its own configuration, not on the shard shard.npz" in str(e.value)
    assert "decoder_start_token_id" in str(e.value) and "do not fit" not in str(e.value)


def test_token_ids_beyond_the_vocabulary_name_the_array_and_its_size():
    """Item 6: an id past the embedding ("index out of range in self") named with its array and the
    vocabulary size, whichever row holds it (not only the two the model is probed on)."""
    t = needs("transformers")
    from sapp_compress.io.adapters import adapt

    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, num_labels=3)
    arrays = _tokens()
    arrays["input_ids"][30, 5] = VOCAB + 7
    with pytest.raises(DataError) as e:
        adapt(t.BertForSequenceClassification(cfg).eval(), _shard(arrays))
    assert f"input_ids holds id {VOCAB + 7} (first in sample 30), outside the model's vocabulary of {VOCAB}" \
        in str(e.value)


def test_save_torch_file_of_a_torchvision_model_loads_in_a_fresh_interpreter(tmp_path):
    """Item 5: the torchvision wheel is built for another torch, so a fresh interpreter cannot import
    torchvision (nor timm, nor unpickle a torchvision model). ``import sapp_compress`` first, or
    ``sapp_compress.load_pruned``, makes all three work."""
    tv = needs("torchvision")
    from sapp_compress.io.saving import save_pruned
    save_pruned(tv.models.resnet18(num_classes=10).eval(), tmp_path / "pruned.pt")
    code = (f"import sapp_compress, torch\n"
            f"m = sapp_compress.load_pruned({str(tmp_path / 'pruned.pt')!r}, trust=True)\n"
            "import torchvision, timm\n"
            "assert isinstance(m, torchvision.models.ResNet)\n"
            "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(1, 10)"


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter of this environment, from a directory outside the checkout (so nothing
    but what the install put in site-packages runs before it)."""
    import os
    import tempfile

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir(), env={**os.environ, **env})


def test_users_own_code_imports_torchvision_without_importing_sapp_compress(tmp_path):
    """The install's start-up file (``sapp_compress_torchvision.pth``, setup.py) installs the torchvision hook
    in every interpreter of the environment: a user's script that never imports sapp_compress builds and runs
    a torchvision model, imports timm, and unpickles a torchvision model. Where torchvision's compiled ops do
    not load with this torch (the README's install), the same script fails with the start-up hook switched
    off, which shows it is the hook that makes it work; with a matching torchvision build both work."""
    tv = needs("torchvision")
    import importlib.metadata

    installs = list(importlib.metadata.distributions(name="sapp-compress"))  # an egg-info in the checkout too
    if not installs:
        pytest.skip("sapp-compress is not installed (pip install -e .): "
                    "the start-up file comes with the install")
    files = {str(f) for dist in installs for f in dist.files or ()}
    assert "sapp_compress_torchvision.pth" in files, \
        "the install did not put the start-up file in site-packages"
    torch.save(tv.models.resnet18(num_classes=10).eval(), tmp_path / "resnet.pt")
    code = ("import torch, torchvision, timm\n"
            f"m = torch.load({str(tmp_path / 'resnet.pt')!r}, weights_only=False)\n"
            "assert isinstance(m, torchvision.models.ResNet)\n"
            "y = torchvision.models.mobilenet_v3_small(num_classes=4).eval()(torch.zeros(1, 3, 32, 32))\n"
            "assert 'sapp_compress' not in __import__('sys').modules\n"
            "print(tuple(m(torch.zeros(1, 3, 32, 32)).shape), tuple(y.shape))\n")
    run = _fresh(code)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "(1, 10) (1, 4)"
    native = _fresh("import torch, torchvision; torch.ops.torchvision.nms",
                    SAPP_COMPRESS_NO_TORCHVISION_HOOK="1")
    if native.returncode != 0:  # the ops do not load here: without the hook the user's import fails
        assert "torchvision::nms does not exist" in native.stderr, native.stderr[-2000:]


def test_pruned_layer_whose_zeros_the_export_shares_is_stored_dense_not_fatal():
    """Seen on timm's mobilevit_xxs after a 4-step fine-tune: two same-shape layers whose kept blocks were
    still all zero (SA++ revives a block at zero) were stored by the exporter as one zero tensor, and the
    conversion, after the whole fine-tune, failed the run (exit 2). Now the layer the graph no longer holds
    under its own name stays as exported (its values are the pruned ones), with the reason, and the run goes
    on."""
    from types import SimpleNamespace

    from converters import LayerBlocks
    from sapp_compress.granularity.blocks import _store_unplaceable_dense
    from sapp_compress.io.export import export_model

    class TwoZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    model = TwoZero().eval()
    with torch.no_grad():
        model.a.weight.zero_()
        model.b.weight.zero_()
    proto = export_model(model, Shard((np.zeros((4, 16), np.float32),), None, "test"))
    layers = [LayerBlocks(f"{n}.weight", "linear", (16, 16), (8, 8), np.eye(2, dtype=bool),
                          weight=m.weight.detach().numpy().copy())
              for n, m in (("a", model.a), ("b", model.b))]
    res = SimpleNamespace(layers=list(layers), skipped=[])
    report = {"skipped": []}
    _store_unplaceable_dense(res, proto, report)
    names = {init.name for init in proto.graph.initializer}
    gone = [lb.name for lb in layers if lb.name not in names]
    assert gone, "the exporter kept both zero weights: nothing to test on this torch"
    assert [lb.name for lb in res.layers] == [lb.name for lb in layers if lb.name not in gone]
    assert [s["name"] for s in report["skipped"]] == gone
    assert "all zeros" in report["skipped"][0]["reason"] and "stored dense" in report["skipped"][0]["reason"]
    assert "stored dense" in report["warnings"][0]
