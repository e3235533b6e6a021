"""Text -> shard with the shipped tiny_bert tokenizer: arrays, dtypes, labels; one-line errors, exit 2, no
partial output."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import needs

needs("transformers")

from calib_data.shards import DataError, load_shard  # noqa: E402
from calib_data.text import label_ids, main, text_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "tiny_bert"
DOCS = ROOT / "calib_data" / "text" / "stdlib_docs.jsonl"
CONFIG = json.loads((MODEL / "config.json").read_text())


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.suffix == ".npz" or ".tmp" in p.name)


def test_shipped_text_matches_its_manifest_and_model():
    entry = json.loads((DOCS.parent / "MANIFEST.json").read_text())["stdlib_docs"]
    assert hashlib.sha256(DOCS.read_bytes()).hexdigest() == entry["sha256"]
    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == entry["samples"] and DOCS.stat().st_size < 200_000
    counts = {k: sum(r["label"] == k for r in rows) for k in entry["label_counts"]}
    assert counts == entry["label_counts"] and entry["licence"].startswith("PSF")
    assert sorted(CONFIG["label2id"]) == sorted(counts)  # tiny_bert knows every label of the data
    assert sum(p.stat().st_size for p in MODEL.iterdir()) < 2_000_000


STDLIB_BERT = ROOT / "examples" / "models" / "stdlib_bert"


def test_shipped_stdlib_areas_match_their_manifest_and_model(tmp_path):
    manifest = json.loads((DOCS.parent / "MANIFEST.json").read_text())
    config = json.loads((STDLIB_BERT / "config.json").read_text())
    texts = {}
    for part in ("train", "test"):
        path = DOCS.parent / f"stdlib_areas.{part}.jsonl"
        entry = manifest[f"stdlib_areas_{part}"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"] and entry["split"] == part
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        counts = {k: sum(r["label"] == k for r in rows) for k in entry["label_counts"]}
        assert len(rows) == entry["samples"] and counts == entry["label_counts"]
        assert entry["licence"].startswith("PSF") and not entry["synthetic"]
        assert sorted(config["label2id"]) == sorted(counts)  # the model knows every label of the data
        texts[part] = {r["text"] for r in rows}
    assert not texts["train"] & texts["test"]  # no passage on both sides
    assert sum(p.stat().st_size for p in STDLIB_BERT.iterdir()) < 4_600_000
    r = text_shard(STDLIB_BERT, DOCS.parent / "stdlib_areas.test.jsonl", tmp_path / "t.npz",
                   label_field="label", limit=20)
    assert r.arrays["y"] == (20,) and r.label_source == "config.json label2id"


def test_jsonl_with_labels_uses_the_models_label2id(tmp_path):
    out = tmp_path / "docs.npz"
    r = text_shard(MODEL, DOCS, out, label_field="label", max_length=32, limit=50)
    rows = [json.loads(line) for line in DOCS.read_text(encoding="utf-8").splitlines()[:50]]
    z = np.load(out)
    assert sorted(z.files) == ["attention_mask", "input_ids", "token_type_ids", "y"]
    assert all(z[k].dtype == np.int64 for k in z.files)
    assert z["input_ids"].shape == z["attention_mask"].shape == z["token_type_ids"].shape == (50, 32)
    np.testing.assert_array_equal(z["y"], [CONFIG["label2id"][row["label"]] for row in rows])
    assert r.label2id == CONFIG["label2id"] and r.label_source == "config.json label2id"
    assert (z["input_ids"][:, 0] == 2).all()  # [CLS] first
    np.testing.assert_array_equal(z["attention_mask"], (z["input_ids"] != 0).astype(np.int64))  # [PAD] = 0
    shard = load_shard(out)  # the shard reader takes it as it is
    assert len(shard) == 50 and shard.y is not None


def test_txt_has_no_labels_and_skips_blank_lines(tmp_path):
    src = _write(tmp_path / "t.txt",
                 "Return the square root of x.\n\n  Open a socket.  \nSort a list in place.\n")
    r = text_shard(MODEL, src, tmp_path / "t.npz")
    z = np.load(tmp_path / "t.npz")
    assert "y" not in z.files and z["input_ids"].shape == (3, 128) and r.label2id is None
    assert z["attention_mask"].sum(1).tolist() == [9, 6, 10]  # [CLS] open a socket . [SEP] = 6 tokens
    assert r.filled == 0


def test_csv_with_a_named_text_column_quotes_and_limit(tmp_path):
    src = _write(tmp_path / "d.csv", 'label,doc\nmaths,"Return x, rounded."\nnetwork,Open a socket.\n'
                                     "text,Wrap a paragraph.\n")
    text_shard(MODEL, src, tmp_path / "d.npz", text_field="doc", label_field="label", max_length=8, limit=2)
    z = np.load(tmp_path / "d.npz")
    assert z["input_ids"].shape == (2, 8) and z["y"].tolist() == [CONFIG["label2id"]["maths"],
                                                                  CONFIG["label2id"]["network"]]


def test_jsonl_lines_split_at_newlines_only(tmp_path):
    src = _write(tmp_path / "d.jsonl", '{"text": "one\u2028still one"}\r\n\r\n{"text": "two"}\r\n')
    assert text_shard(MODEL, src, tmp_path / "d.npz").arrays["input_ids"][0] == 2


def test_truncation_is_counted(tmp_path):
    r = text_shard(MODEL, DOCS, tmp_path / "s.npz", max_length=4, limit=10)
    assert r.filled == 10 and r.arrays["input_ids"] == (10, 4)


@pytest.mark.parametrize("config,labels,ids,source", [
    ({"label2id": {"LABEL_0": 0, "LABEL_1": 1}, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}},
     ["1", "0", "1"], [1, 0, 1], "integer labels"),
    ({"label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}}, ["pos", "neg", "mid"], [2, 1, 0],
     "sorted labels"),
    ({}, ["b", "a"], [1, 0], "sorted labels"),
    ({"label2id": {"LABEL_0": 0, "LABEL_1": 1}}, ["LABEL_1", "LABEL_0"], [1, 0], "sorted labels"),
])
def test_label_ids_without_named_labels(config, labels, ids, source):
    y, mapping, how = label_ids(Path("d.csv"), [(k, i + 2) for i, k in enumerate(labels)], config)
    assert y.dtype == np.int64 and y.tolist() == ids and how == source
    assert all(mapping[k] == i for k, i in zip(labels, ids))


def test_more_classes_than_the_model_has_is_an_error():
    with pytest.raises(DataError, match=r"^d\.csv: line 4: label '7' is class 7, but the model has 2 labels "
                                        r"\(config\.json id2label\)$"):
        label_ids(Path("d.csv"), [("0", 2), ("1", 3), ("7", 4)], {"label2id": {"LABEL_0": 0, "LABEL_1": 1}})


BAD = [
    ("missing", lambda t: t / "missing.jsonl", [], "missing.jsonl: no such file"),
    ("empty", lambda t: _write(t / "empty.txt", "\n\n"), [],
     "empty.txt: no text rows found (the file is empty)"),
    ("suffix", lambda t: _write(t / "d.tsv", "a\tb\n"), [],
     "d.tsv: expected a .txt, .csv, .jsonl file, got '.tsv'"),
    ("column", lambda t: _write(t / "d.csv", "text\nhello\n"), ["--label-field", "label"],
     "d.csv: expected a column 'label', found columns ['text']"),
    ("field", lambda t: _write(t / "d.jsonl", '{"text": "a"}\n{"body": "b"}\n'), [],
     "d.jsonl: line 2: expected a field 'text', found fields ['body']"),
    ("json", lambda t: _write(t / "d.jsonl", '{"text": "a"}\n{"text": \n'), [],
     "d.jsonl: line 2: not valid JSON (Expecting value: line 1 column 10 (char 9))"),
    ("label", lambda t: _write(t / "d.jsonl", '{"text": "a", "y": "maths"}\n{"text": "b", "y": "poetry"}\n'),
     ["--label-field", "y"],
     "d.jsonl: line 2: label 'poetry' is not in the model's label2id (expected one of ['concurrency', "
     "'containers', 'files', 'maths', 'network', 'text'])"),
    ("no-label", lambda t: _write(t / "d.csv", "text,label\na,maths\nb,\n"), ["--label-field", "label"],
     "d.csv: line 3: expected a label (text or integer) in 'label', got ''"),
    ("txt-label", lambda t: _write(t / "d.txt", "a\n"), ["--label-field", "label"],
     "d.txt: a .txt file holds one text per line and no labels; use a .csv or .jsonl file for "
     "--label-field label"),
    ("utf8", lambda t: (t / "d.txt").write_bytes(b"ok\n\xff\n") and t / "d.txt", [],
     "d.txt: expected UTF-8 text, got undecodable bytes at offset 3"),
    ("positions", lambda t: DOCS, ["--max-length", "129"],
     "tiny_bert: max_length 129 is longer than the model's max_position_embeddings 128"),
]


@pytest.mark.parametrize("make,args,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_leaves_no_file(tmp_path, make, args, msg):
    out = tmp_path / "out.npz"
    res = CliRunner().invoke(main, [str(MODEL), str(make(tmp_path)), "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"Error: {msg}\n"
    assert _leftovers(tmp_path) == []


def test_bad_model_dir_and_output_name(tmp_path):
    src = _write(tmp_path / "t.txt", "a\n")
    res = CliRunner().invoke(main, [str(tmp_path / "nomodel"), str(src), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2 and res.stderr == ("Error: nomodel: expected a Hugging Face save_pretrained "
                                                 "directory, found no such directory\n")
    res = CliRunner().invoke(main, [str(tmp_path), str(src), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2 and \
        res.stderr.startswith(f"Error: {tmp_path.name}: no tokenizer could be loaded")
    assert res.stderr.count("\n") == 1
    res = CliRunner().invoke(main, [str(MODEL), str(src), "-o", str(tmp_path / "o.npy")])
    assert res.exit_code == 2 and \
        res.stderr == "Error: o.npy: expected an output name ending in .npz, got '.npy'\n"
    res = CliRunner().invoke(main, [str(MODEL), str(src), "-o", str(tmp_path / "no" / "o.npz")])
    assert res.exit_code == 2 and res.stderr.startswith("Error: o.npz: expected an existing output directory")
    assert _leftovers(tmp_path) == []


def test_cli_writes_the_shard_and_says_what(tmp_path):
    out = tmp_path / "text.npz"
    res = CliRunner().invoke(main, [str(MODEL), str(DOCS), "--label-field", "label", "--limit", "20", "-o",
                                    str(out)])
    assert res.exit_code == 0, res.output
    assert "labels (config.json label2id): concurrency=0, containers=1" in res.stderr
    assert np.load(out)["y"].shape == (20,) and _leftovers(tmp_path) == ["text.npz"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = _write(tmp_path / "t.npz", "old")
    src = _write(tmp_path / "t.txt", "a\nb\n")

    def broken_savez(f, **arrays):
        f.write(b"PK half")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(DataError, match=r"^t\.npz: cannot write the shard \(No space left on device\)$"):
        text_shard(MODEL, src, out)
    assert out.read_text() == "old" and _leftovers(tmp_path) == ["t.npz"]


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(DataError, match=r"^making a shard from text needs transformers: "
                                        r"pip install sapp-compress\[hf\]$"):
        text_shard(MODEL, _write(tmp_path / "t.txt", "a\n"), tmp_path / "t.npz")


def test_readme_text_example_runs_word_for_word(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Text data and Hugging Face models"):readme.index("### Exit codes")]
    line = next(s for s in section.splitlines() if s.startswith("sapp-compress-shard examples/"))
    args = line.split()[1:]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "calib_data").symlink_to(ROOT / "calib_data")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / args[args.index("-o") + 1]
    assert load_shard(out).y.shape == (json.loads((DOCS.parent / "MANIFEST.json").read_text())["stdlib_docs"]
                                       ["samples"],)


def test_model_dir_without_tokenizer_files_is_refused(tmp_path):
    """transformers builds an empty tokenizer from a directory with a config and no tokenizer files, which
    turned every token into [UNK], and the shard was written with exit 0."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((MODEL / "config.json").read_text())
    res = CliRunner().invoke(main, [str(bare), str(DOCS), "-o", str(tmp_path / "o.npz"), "--limit", "5"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("Error: bare: the tokenizer has no vocabulary beyond its 5 special tokens: "
                                 "the directory holds no tokenizer files (expected one of tokenizer.json, "
                                 "vocab.txt")
    assert res.stderr.count("\n") == 1 and _leftovers(tmp_path) == []


def test_text_the_tokenizer_cannot_read_is_refused_or_warned(tmp_path):
    """Mostly [UNK] (text in a script the vocabulary lacks): refused; a few [UNK]: written with a warning."""
    src = _write(tmp_path / "ru.txt", "Привет мир как дела\nЗдравствуй дорогой друг\n")
    res = CliRunner().invoke(main, [str(MODEL), str(src), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2, res.output
    assert res.stderr == ("Error: tiny_bert: the tokenizer maps 100% of the text's tokens to its unknown "
                          "token '[UNK]' (refused above 50%): it is not this text's tokenizer, or the "
                          "directory's tokenizer files are incomplete\n")
    assert _leftovers(tmp_path) == []
    src = _write(tmp_path / "mixed.txt", "Return the square root of x.\nOpen a socket \u2603 now.\n"
                                         "Sort a list in place \u265e quickly.\n")
    res = CliRunner().invoke(main, [str(MODEL), str(src), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 0, res.output
    assert "WARNING: the tokenizer maps 7.4% of the text's tokens to its unknown token '[UNK]'" in res.stderr
    assert text_shard(MODEL, DOCS, tmp_path / "d.npz", limit=100).unknown < 0.01  # the model's own text


def test_a_tokenizer_json_with_an_empty_vocabulary_is_named_as_such(tmp_path):
    """A directory that holds a tokenizer.json whose vocabulary has nothing but the special tokens: the error
    names that file, not "no tokenizer files"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (empty / name).write_text((MODEL / name).read_text())
    tok = json.loads((MODEL / "tokenizer.json").read_text())
    special = {t["content"] for t in tok["added_tokens"]}
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if k in special}
    (empty / "tokenizer.json").write_text(json.dumps(tok))
    res = CliRunner().invoke(main, [str(empty), str(DOCS), "-o", str(tmp_path / "o.npz"), "--limit", "5"])
    assert res.exit_code == 2, res.output
    assert "its tokenizer.json holds an empty vocabulary" in res.stderr, res.stderr
    assert "no tokenizer files" not in res.stderr and _leftovers(tmp_path) == []


def test_the_unknown_token_warning_is_said_once(tmp_path):
    """The warning of a text with a few unknown tokens: printed once, with its WARNING: (it was also logged
    without it)."""
    src = _write(tmp_path / "mixed.txt", "Return the square root of x.\nOpen a socket \u2603 now.\n")
    res = CliRunner().invoke(main, [str(MODEL), str(src), "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("of the text's tokens to its unknown token") == 1, res.stderr
