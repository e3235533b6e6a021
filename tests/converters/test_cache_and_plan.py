"""``auto`` is replayable and cached: its measurements go through a per-machine timing cache (a second run
reads them all and writes the same bytes), a conversion's plan replays it exactly with no timing, a plan made
for other layers or masks is refused saying what differs, and the cache survives corrupt entries and
concurrent writers."""
from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
from dataclasses import replace

import pytest
import torch
from zoo_cases import build_case, feed, names_for

import converters.runtime
from converters import Plan, PlanMismatch, TimingCache, TimingKey, convert, export_onnx
from converters.cache import ENV, default_root, mask_digest
from converters.int8 import default_weight_bits


@pytest.fixture()
def timings(monkeypatch):
    """Counts ONNX Runtime timing runs (every measurement ``auto`` makes goes through
    ``interleaved_samples``)."""
    calls = []
    real = converters.runtime.interleaved_samples

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(converters.runtime, "interleaved_samples", counting)
    return calls


@functools.lru_cache(maxsize=None)
def _case(name: str, seed: int = 0):
    """(dense export, manifest, input rows) of a zoo case, exported once per session."""
    torch.set_num_threads(1)
    model, manifest, _, xs = build_case(name, balanced=True, seed=seed)
    proto = export_onnx(model, tuple(x[:2] for x in xs), input_names=names_for(xs))
    return proto, manifest, feed(xs)


CASES = {"mlp": ("mlp", "none"), "cnn_int8": ("rescnn_bn", "int8")}


@pytest.fixture(scope="module")
def mlp_cache(tmp_path_factory):
    """A timing cache holding one auto conversion of the mlp case, and that conversion (copy it to change
    it)."""
    root = tmp_path_factory.mktemp("mlp_cache")
    proto, manifest, rows = _case("mlp")
    return root, convert(proto, manifest, cache=TimingCache.open("use", root), **_auto(rows))


def _auto(rows) -> dict:
    return dict(fmt="auto", timing_inputs={k: v[:4] for k, v in rows.items()})


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "cnn_int8" else c
                                  for c in CASES])
def test_second_auto_run_reads_every_timing_from_the_cache_and_writes_the_same_bytes(tmp_path, timings, case):
    name, quantize = CASES[case]
    proto, manifest, rows = _case(name)
    kw = dict(fmt="auto", timing_inputs={k: v[:4] for k, v in rows.items()}, quantize=quantize,
              calibration_inputs=rows)
    first = convert(proto, manifest, cache=TimingCache.open("use", tmp_path), **kw)
    timed_first = len(timings)
    assert timed_first > 0 and first.timing["measured"] > 0 and first.timing["from_cache"] == 0
    assert first.timing["whole_model"] is not None  # the whole-model stage ran, and is cached too
    second = convert(proto, manifest, cache=TimingCache.open("use", tmp_path), **kw)
    assert len(timings) == timed_first, "the second run timed something"
    assert second.timing["measured"] == 0 and second.timing["from_cache"] == first.timing["measured"]
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert second.plan == first.plan and second.timing["whole_model"] == first.timing["whole_model"]
    # the plan replays it on an empty cache, nothing timed
    replayed = convert(proto, manifest, plan=first.plan, cache=TimingCache.open("use", tmp_path / "empty"),
                       quantize=quantize, calibration_inputs=rows)
    assert len(timings) == timed_first
    assert replayed.timing["choices"] == "replayed" and replayed.timing["measured"] == 0
    assert replayed.model.SerializeToString() == first.model.SerializeToString()


def test_plan_round_trips_through_json_and_replays_the_int8_weight_bits_it_names():
    """A plan read on another machine keeps its int8 weight bits (7 or 8: the CPU check's choice), so the
    bytes do not depend on the replaying CPU."""
    proto, manifest, rows = _case("mlp")
    made = convert(proto, manifest, fmt="blocked", quantize="int8")
    plan = Plan.from_json(json.loads(json.dumps(made.plan.to_json())))
    assert plan == made.plan
    assert {c.weight_bits for c in plan.layers} == {default_weight_bits()}
    other = 15 - default_weight_bits()
    moved = Plan(tuple(replace(c, weight_bits=other) for c in plan.layers))
    res = convert(proto, manifest, plan=moved, quantize="int8")
    assert {o.int8["weight_bits"] for o in res.layers} == {other}
    assert any(f"_i8w{other}" in t.name for t in res.model.graph.initializer)
    assert res.plan == moved


def test_plan_for_other_layers_shapes_or_masks_is_refused_saying_what_differs():
    proto, manifest, rows = _case("mlp")
    plan = convert(proto, manifest, fmt="compact").plan
    with pytest.raises(PlanMismatch, match=r"not in the plan: 2\.weight"):
        convert(proto, manifest, plan=Plan(plan.layers[:1]))
    wrong = Plan((replace(plan.layers[0], shape=(64, 64)), *plan.layers[1:]))
    with pytest.raises(PlanMismatch,
                       match=r"0\.weight: weight shape: the plan has \[64, 64\], this model \[128, 64\]"):
        convert(proto, manifest, plan=wrong)
    _, other_masks, _ = _case("mlp", seed=1)
    with pytest.raises(PlanMismatch, match=r"0\.weight: kept blocks: the plan has mask digest"):
        convert(proto, other_masks, plan=plan)
    with pytest.raises(PlanMismatch, match=r"blocked-int8 is int8"):
        convert(proto, manifest,
                plan=Plan(tuple(replace(c, onnx_format="blocked-int8") for c in plan.layers)))


def test_refresh_measures_again_and_overwrites_the_cache(tmp_path, timings, mlp_cache):
    proto, manifest, rows = _case("mlp")
    kw = _auto(rows)
    shutil.copytree(mlp_cache[0], tmp_path, dirs_exist_ok=True)
    before = {p: json.loads(p.read_text())["value"] for p in tmp_path.rglob("*.json")}
    cache = TimingCache.open("refresh", tmp_path)
    res = convert(proto, manifest, cache=cache, **kw)
    assert len(timings) >= len(before)
    assert res.timing["measured"] == len(before) and res.timing["from_cache"] == 0
    assert cache.hits == 0 and cache.writes == len(before)
    after = {p: json.loads(p.read_text())["value"] for p in tmp_path.rglob("*.json")}
    assert set(after) == set(before) and after != before  # the same keys, new medians


def test_corrupt_cache_entries_are_ignored_with_a_warning_and_replaced(tmp_path, mlp_cache, caplog):
    proto, manifest, rows = _case("mlp")
    kw = _auto(rows)
    shutil.copytree(mlp_cache[0], tmp_path, dirs_exist_ok=True)
    entries = sorted(tmp_path.rglob("*.json"))
    entries[0].write_text('{"format": 1, "key": {"kind": "layer"}, "valu')  # cut short by a crash
    entries[1].write_text(json.dumps({"format": 1, "key": {"kind": "other"}, "value": {}}))
    for p in entries[2:]:
        p.write_bytes(b"\x00\xff garbage")
    with caplog.at_level(logging.WARNING, logger="converters.cache"):
        res = convert(proto, manifest, cache=TimingCache.open("use", tmp_path), **kw)
    assert res.timing["measured"] == len(entries) and res.timing["from_cache"] == 0
    warned = [r.getMessage() for r in caplog.records if "ignoring the corrupt entry" in r.getMessage()]
    assert len(warned) == len(entries)
    assert all(json.loads(p.read_text())["format"] == 1 for p in entries)  # rewritten whole


def _key(**kw) -> TimingKey:
    return TimingKey(**{"kind": "layer", "op": "Gemm:0", "shapes": "1x64", "batch": "1", "mask": "m",
                        "formulation": "compact,dense", "precision": "fp32", "threads": 1, **kw})


def test_concurrent_writers_and_readers_never_see_a_partial_entry(tmp_path, caplog):
    key = _key()
    errors = []

    def writer(i):
        c = TimingCache(tmp_path)
        for j in range(30):
            c.put(key, {"writer": i, "j": j, "pad": "x" * 20000})

    def reader():
        c = TimingCache(tmp_path)
        for _ in range(200):
            v = c.get(key)
            if v is not None and set(v) != {"writer", "j", "pad"}:
                errors.append(v)

    with caplog.at_level(logging.WARNING, logger="converters.cache"):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + \
                  [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not caplog.records
    assert TimingCache(tmp_path).get(key)["j"] == 29
    # no temporary file left
    assert [p.name for p in (tmp_path / "timings" / "layer").iterdir()] == [f"{key.sha256}.json"]


def test_key_is_named_fields_and_each_field_matters(tmp_path):
    key = _key()
    fields = key.to_json()
    assert set(fields) == {"kind", "op", "shapes", "batch", "mask", "formulation", "precision", "threads",
                           "code", "machine", "runtime"}
    assert fields["runtime"].startswith("ort ")
    assert set(fields["machine"]) == {"cpu", "cpu_flags", "cores", "onnxruntime"}
    c = TimingCache(tmp_path)
    c.put(key, {"v": 1})
    for change in (dict(threads=2), dict(shapes="16x64"), dict(mask="n"), dict(precision="int8/w8"),
                   dict(machine=replace(key.machine, cpu_flags="avx2")), dict(code="other"),
                   dict(runtime="openvino 2026.4.1 f32")):
        assert c.get(replace(key, **change)) is None, change
    assert c.get(key) == {"v": 1}
    _, manifest, _ = _case("mlp")
    assert mask_digest(manifest[0]) != mask_digest(_case("mlp", seed=1)[1][0])


def test_cache_location_env_then_xdg_then_home_and_an_unwritable_one_is_a_warning(tmp_path, monkeypatch,
                                                                                  caplog):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert default_root() == tmp_path / "mine"
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "sapp-compress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "sapp-compress"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="converters.cache"):
        c = TimingCache(blocker)  # its timings directory cannot be made
        c.put(_key(), {"v": 1})
        c.put(_key(threads=2), {"v": 1})
    assert c.get(_key()) is None and c.writes == 0
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1
