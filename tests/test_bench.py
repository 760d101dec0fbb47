"""`python -m dwjax.bench`: its table and JSON, BENCHMARKS.md's latest section, the torch-free
path, and the one-line error rule (a full run is not a test: BENCHMARKS.md records its table)."""
import json
import os

import pytest

from dwjax import bench
from dwjax.perf import convert_speed, machine, results, train_speed
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
    text = results.table(result)
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


def _result(steady: float = 174_192.0) -> dict:
    """A hand-made result, as `bench.run_bench` returns it (no benchmark runs)."""
    return {
        "format": "dwjax-bench/1", "date": "2026-11-27",
        "command": "python -m dwjax.bench --quick --assign_n=1000000", "quick": True,
        "sizes": {"convert_model": "convnextv2_nano"},
        "machine": {"cpu": "Intel Xeon", "cpus": 2, "backend": "cpu", "device_kind": "cpu",
                    "device_count": 2, "python": "3.11", "jax": "0.10.2", "numpy": "2.4.6",
                    "torch": "2.14.1", "blas_env": {}, "load_average": [1.1, 0.5, 0.3]},
        "load_average_end": [1.9, 1.0, 0.5], "seconds": 75.2,
        "benchmarks": [
            machine.skipped("convert", "skipped (torch not installed)"),
            {"benchmark": "train", "skipped": None, "figures": {}, "seconds": {},
             "rows": [machine.row("steady vs plain torch loop", steady, 99_342.0, "kernels/s",
                                  steady / 99_342.0, ">= 2x")]},
            {"benchmark": "assign", "skipped": None, "figures": {}, "seconds": {},
             "rows": [machine.row("command end to end vs search alone", 376_863.0, 593_035.0,
                                  "kernels/s", 376_863.0 / 593_035.0, ">= 85%")]},
        ],
    }


HISTORY = "## History\n\n### 2026-11-26\n\nOld figures: 310,626 kernels/s.\n"


def test_benchmarks_md_rewrites_only_the_latest_section():
    before = (f"# BENCHMARKS\n\nIntro kept.\n\n{results.BEGIN}\n## Latest run\n\nstale table\n"
              f"{results.END}\n\n{HISTORY}")
    once = results.render(before, _result())
    assert once.startswith("# BENCHMARKS\n\nIntro kept.\n\n" + results.BEGIN)
    assert once.endswith(f"{results.END}\n\n{HISTORY}")  # the history, byte for byte
    assert "stale table" not in once
    latest = once[once.index(results.BEGIN):once.index(results.END)]
    assert "2026-11-27: `python -m dwjax.bench --quick --assign_n=1000000`" in latest
    assert "train    steady vs plain torch loop [kernels/s]" in latest and "1.75x  >= 2x" in latest
    assert "64%  >= 85%" in latest and "convert  skipped (torch not installed)" in latest
    assert results.table(_result()) in latest
    assert all(len(line) <= 100 for line in once.splitlines())
    # deterministic, and rendering over its own output changes nothing
    assert results.render(before, _result()) == once
    assert results.render(once, _result()) == once
    # a new run replaces the section and still keeps the rest
    again = results.render(once, _result(steady=200_000.0))
    assert "2.01x" in again and again.endswith(f"{results.END}\n\n{HISTORY}")


def test_benchmarks_md_is_written_atomically_and_needs_its_markers(tmp_path):
    path = str(tmp_path / "BENCHMARKS.md")
    results.check_benchmarks_md(path)  # a missing file is created
    results.write_benchmarks_md(path, _result())
    with open(path, "rb") as f:
        first = f.read()
    assert first.startswith(b"# BENCHMARKS\n") and first.count(results.BEGIN.encode()) == 1
    with open(path, "ab") as f:
        f.write(f"\n{HISTORY}".encode())
    results.write_benchmarks_md(path, _result())
    with open(path, "rb") as f:
        assert f.read() == first + f"\n{HISTORY}".encode()
    assert os.listdir(tmp_path) == ["BENCHMARKS.md"]  # no temp file left
    for broken in (HISTORY, f"{results.END}\n{results.BEGIN}\n",
                   f"{results.BEGIN}\n{results.BEGIN}\n{results.END}\n"):
        with open(path, "w") as f:
            f.write(broken)
        with pytest.raises(results.BenchmarksFileError, match="BENCHMARKS.md: expected one"):
            results.check_benchmarks_md(path)
        with pytest.raises(results.BenchmarksFileError):
            results.write_benchmarks_md(path, _result())
        with open(path) as f:
            assert f.read() == broken  # left as it was


def test_the_result_records_the_command_that_reruns_it():
    assert bench.command_line(bench.PARTS, False, {}) == "python -m dwjax.bench"
    sizes = {k: None for k in bench.SIZES} | {"assign_small_n": 250_000, "assign_n": 1_000_000}
    assert bench.command_line(["assign", "train"], True, sizes) == (
        "python -m dwjax.bench --parts=assign,train --quick --assign_n=1000000 "
        "--assign_small_n=250000")


def test_benchmarks_md_without_markers_is_one_line_before_any_run(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# notes without markers\n")
    p = run_module("dwjax.bench", "--parts=train", f"--benchmarks_md={path}",
                   f"--json={tmp_path / 'bench.json'}", timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"bench: {path}: expected one")
    assert path.read_text() == "# notes without markers\n"
    assert not (tmp_path / "bench.json").exists()
