"""What a new user hit, end to end: an encoder-decoder's decoder inputs from the shard, input axes the model
accepts at other sizes kept dynamic whatever they are called (or the report says which is fixed and why), the
widths of one rule with each family's sparsity in the summary, ``--plan`` replaying a structured run, a
report for every non-zero exit, and progress lines while each stage runs."""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from helpers import needs
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT  # noqa: E402

from sapp_compress.cli import Progress, main  # noqa: E402
from sapp_compress.config import OutputConfig, PruneConfig, TrainConfig  # noqa: E402
from sapp_compress.pipeline import compress  # noqa: E402

MLP = ROOT / "examples" / "models" / "digits_mlp.pt"


def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stderr


def test_encoder_decoder_takes_its_decoder_inputs_from_the_shard(tmp_path):
    """T5ForConditionalGeneration: ``decoder_input_ids`` is an input (it was dropped, then the model failed
    and the shard was blamed); an array that is neither input nor label is still said to be ignored, once,
    before the model runs; the encoder's, decoder's and cross-attention's heads go."""
    t = needs("transformers")
    torch.manual_seed(0)
    cfg = t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                     num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    t.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input_ids=rng.integers(1, 100, (48, 10)),
             decoder_input_ids=rng.integers(1, 100, (48, 6)), note=np.zeros(48))
    code, err = _cli(tmp_path / "t5", "--data", tmp_path / "d.npz", "--structure", "channels", "--sparsity",
                     "0.5", "--steps", "2", "--batch-size", "16", "-o", tmp_path / "m.onnx", "--report",
                     tmp_path / "r.json")
    assert code == 0, err
    assert err.count("arrays ['note'] are neither model inputs nor labels") == 1, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["inputs"] == ["input_ids", "decoder_input_ids"]
    heads = {row["name"]: (row["kept_units"], row["units"]) for row in r["layers"] if row["kind"] == "heads"}
    assert heads == {"encoder.block.0.layer.0.SelfAttention (heads)": (2, 4),
                     "decoder.block.0.layer.0.SelfAttention (heads)": (2, 4),
                     "decoder.block.0.layer.1.EncDecAttention (heads)": (2, 4)}


class TokensMean(nn.Module):
    """Token ids as ``x`` (not a Hugging Face name): embedding, mean over the sequence, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(50, 32), nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.emb(x).mean(1))))


class TokensGRU(TokensMean):
    """The same with a GRU over the sequence: its export unrolls the sequence at the shard's length."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(32, 32, batch_first=True)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.out(torch.relu(self.fc(h[:, -1])))


@pytest.mark.parametrize("model, dynamic", [(TokensMean, True), (TokensGRU, False)])
def test_sequence_axis_of_an_input_called_x(tmp_path, model, dynamic):
    """The sequence axis of token ids called ``x`` is dynamic in the ONNX when the model and the exporter
    allow it (it was fixed to the shard's length, silently); where the exporter cannot keep it, the report's
    ``input_axes`` and a warning say which axis is fixed and why."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 50, (128, 12)), y=rng.integers(0, 4, 128))
    out = OutputConfig(output=tmp_path / "m.onnx", onnx_format="compact")
    r = compress(model().eval(), PruneConfig(block="8", sparsity=0.5, min_blocks=1),
                 TrainConfig(steps=4, lr=1e-3), out, data=tmp_path / "d.npz")
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    if dynamic:
        assert r["input_axes"] == {"dynamic": {"x": [0, 1]}, "fixed": {}}
        assert s.run(None, {"x": np.zeros((3, 20), np.int64)})[0].shape == (3, 4)
    else:
        assert r["input_axes"]["dynamic"] == {"x": [0]}
        assert r["input_axes"]["fixed"]["x axis 1"].startswith("the exporter cannot keep it dynamic")
        assert any("takes x axis 1 only at the shard's size" in w for w in r["warnings"])


def test_audio_length_is_dynamic(tmp_path):
    """HuBERT's ``input_values``: its length axis was fixed to the shard's."""
    t = needs("transformers")
    torch.manual_seed(0)
    cfg = t.HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    audio = np.random.default_rng(0).standard_normal((32, 400)).astype("f4")
    np.savez(tmp_path / "d.npz", input_values=audio)
    out = OutputConfig(output=tmp_path / "m.onnx", onnx_format="compact")
    r = compress(t.HubertModel(cfg).eval(), PruneConfig(block="8", sparsity=0.5, min_blocks=1),
                 TrainConfig(steps=2, lr=1e-3), out, data=tmp_path / "d.npz")
    assert r["input_axes"]["dynamic"] == {"input_values": [0, 1]}
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert s.run(None, {"input_values": np.zeros((2, 520), np.float32)})[0].shape[:2] == (2, 25)


def test_widths_follow_the_rule_and_the_summary_gives_each_familys_sparsity(tmp_path):
    """A VGG-style conv stack at s = 0.5 keeps exactly the rule's widths (half, in multiples of 8: 16 of 32,
    32 of 64), never fewer (a kept unit that ended at zero is kept: dropping it took VGG11 to 248 of 512), and
    the summary shows each family's sparsity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(64, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4))
    torch.save(model, tmp_path / "vgg.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 1, 8, 8)).astype("f4"), y=rng.integers(0, 4, 64))
    code, err = _cli(tmp_path / "vgg.pt", "--data", tmp_path / "d.npz", "--structure", "channels",
                     "--sparsity", "0.5", "--steps", "6", "--batch-size", "16", "-o", tmp_path / "m.onnx",
                     "--report", tmp_path / "r.json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert {n: (row["kept_units"], row["units"]) for n, row in rows.items()} == {
        "0 (channels)": (16, 32), "2 (channels)": (32, 64), "4 (channels)": (8, 16)}
    assert all(row["sparsity"] == 0.5 for row in rows.values())
    assert "sparsity" in err and "   16 of 32       0.500" in err, err


def test_plan_replays_a_structured_run(tmp_path, monkeypatch):
    """``--plan`` with ``--structure channels``: the same seed replays the kept units and the graph passes
    untimed (an empty timing cache) and writes the same bytes; a plan of another run is refused (exit 2)."""
    base = [MLP, "--structure", "channels", "--sparsity", "0.5", "--steps", "8", "--seed", "3"]
    code, err = _cli(*base, "-o", tmp_path / "a.onnx", "--report", tmp_path / "a.json")
    assert code == 0, err
    monkeypatch.setenv("SAPP_COMPRESS_CACHE", str(tmp_path / "empty_cache"))
    code, err = _cli(*base, "-o", tmp_path / "b.onnx", "--report", tmp_path / "b.json", "--plan",
                     tmp_path / "a.json")
    assert code == 0, err
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert json.loads((tmp_path / "b.json").read_text())["plan"] == {"plan": str(tmp_path / "a.json")}
    code, err = _cli(*base[:-1], "4", "-o", tmp_path / "c.onnx", "--plan", tmp_path / "a.json")
    assert code == 2 and "the fine-tune kept other units" in err and not (tmp_path / "c.onnx").exists(), err


@pytest.mark.parametrize("args, says", [
    (["--sparsity", "1.0"], "sparsity: expected a number with 0 < s < 1"),
    (["--structure", "channels", "--target-speedup", "0.5"], "target speed-up: expected a number > 1"),
    (["--target-speedup", "2"], "needs --structure channels"),
])
def test_a_bad_option_still_writes_the_report(tmp_path, args, says):
    code, err = _cli(MLP, *args, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json")
    assert code == 2 and says in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["exit_code"] == 2 and says in r["error"] and r["versions"]["sapp_compress"]


def test_progress_says_each_stage_and_every_interval_with_an_estimate():
    """Without a terminal: a line when a stage starts, then one at least every interval while it runs (here
    0.2 s), with the time it has taken and, for a stage that counts steps, the time left."""
    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, err
    try:
        p = Progress(quiet=False, every=0.2, tty=False)
        p({"event": "phase", "phase": "plan"})
        time.sleep(0.5)
        for i in range(1, 5):
            p({"event": "step", "stage": "lr probe", "step": i, "total": 8})
            time.sleep(0.15)
        time.sleep(0.3)
        p.close()
    finally:
        sys.stderr = stderr
    lines = err.getvalue().splitlines()
    assert lines[0] == "plan ..." and "lr probe ..." in lines
    assert any(line.startswith("plan: ") and line.endswith(" s") for line in lines), lines
    assert any(line.startswith("lr probe: ") and "step 4/8" in line and "s left" in line
               for line in lines), lines


def test_the_cli_says_every_stage(tmp_path):
    res = CliRunner().invoke(main, [str(MLP), "--steps", "4", "--onnx-format", "compact", "-o",
                                    str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.stderr
    stages = [line[:-4] for line in res.stderr.splitlines() if line.endswith(" ...")]
    assert stages == ["load", "data", "plan", "pre-check", "lr probe", "fine-tune", "export", "convert",
                      "verify", "evaluate"], res.stderr


def test_a_text_model_without_data_is_told_how_to_make_a_shard(tmp_path):
    """No shipped shard holds token ids: a Hugging Face text model without --data gets exit 2 in seconds
    with the shard command (it used to run on CTR's columns by position and fail at the export)."""
    needs("transformers")
    t0 = time.perf_counter()
    code, err = _cli(ROOT / "examples" / "models" / "tiny_bert", "-o", tmp_path / "m.onnx")
    assert code == 2 and "sapp-compress-shard MODEL_DIR TEXT_FILE" in err, err
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "m.onnx").exists()
