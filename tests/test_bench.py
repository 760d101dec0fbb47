"""`python -m dwjax.bench`: its table and JSON, the torch-free path, and the one-line error rule
(the full --quick run takes minutes: BUILD_NOTES.md records its table)."""
import json

import pytest

from dwjax import bench
from dwjax.perf import convert_speed, machine, train_speed
from tests.conftest import run_module


def test_without_torch_the_torch_parts_say_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "has_torch", lambda: False)
    assert convert_speed.run(log=lambda *_: None)["skipped"] == "skipped (torch not installed)"
    entry = train_speed.run(epochs=2, batch_size=256, synthetic=4096, tmp=str(tmp_path),
                            log=lambda *_: None)
    (row,) = entry["rows"]
    assert row["ratio"] is None and row["target"] == "skipped (torch not installed)"
    assert entry["figures"]["dwjax_steady_kernels_per_s"] > 0
    result = {"machine": machine.describe(), "benchmarks": [
        machine.skipped("convert", "skipped (torch not installed)"), entry],
        "load_average_end": [0.0, 0.0, 0.0], "seconds": 1.0, "quick": True}
    text = bench.table(result)
    assert text.count("skipped (torch not installed)") == 2
    assert "load average" in text and "device: " in text
    json.dumps(result, allow_nan=False)


def test_train_part_measures_both_sides_and_writes_json(tmp_path):
    pytest.importorskip("torch")
    path = str(tmp_path / "out" / "bench.json")
    result = bench.run_bench(["train"], quick=True, json_path=path, log=lambda *_: None,
                             train_epochs=2, train_synthetic=4096)
    with open(path) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["machine"]["device_count"] >= 1 and len(saved["machine"]["load_average"]) == 3
    (entry,) = saved["benchmarks"]
    assert entry["benchmark"] == "train" and entry["skipped"] is None
    assert [r["ratio"] > 0 for r in entry["rows"]] == [True, True]
    assert entry["figures"]["torch_kernels_per_s"] > 0


def test_bad_parts_is_one_line():
    p = run_module("dwjax.bench", "--parts=convert,nonsense", timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("bench: --parts convert,nonsense: expected some of")
