"""`python -m dwjax.bench`: its table and JSON, BENCHMARKS.md's latest section, the torch-free
path, and the one-line error rule (a full run is not a test: BENCHMARKS.md records its table)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwjax import bench
from dwjax.configs import train as train_configs
from dwjax.io import shards
from dwjax.io import workdir as workdir_lib
from dwjax.perf import (assign_jobs, assign_speed, convert_speed, host_ceiling, machine, results,
                        search_speed, search_work, train_speed)
from dwjax.search import device_programs, nearest
from tests.conftest import run_module
from tests.reference import curve_kernels, template_curve


def test_without_torch_the_torch_parts_say_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "has_torch", lambda: False)
    assert convert_speed.run(log=lambda *_: None)["skipped"] == "skipped (torch not installed)"
    entry = train_speed.run(epochs=2, batch_size=256, synthetic=4096, tmp=str(tmp_path),
                            log=lambda *_: None)
    gemm, row = entry["rows"]
    assert row["ratio"] is None and row["target"] == "skipped (torch not installed)"
    assert gemm["unit"] == "GFLOP/s" and 0 < gemm["ratio"] < 2
    assert entry["figures"]["dwjax_steady_kernels_per_s"] > 0
    result = {"machine": machine.describe(), "benchmarks": [
        machine.skipped("convert", "skipped (torch not installed)"), entry],
        "load_average_end": [0.0, 0.0, 0.0], "seconds": 1.0, "quick": True}
    text = results.table(result)
    assert text.count("skipped (torch not installed)") == 2
    assert "load average" in text and "device: " in text
    json.dumps(result, allow_nan=False)


def test_train_part_measures_both_sides_and_writes_json(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from dwjax.perf import torch_autoencoder

    # torch.compile's first compile alone takes longer than the rest of this test: the bench runs it
    monkeypatch.setattr(torch_autoencoder, "VARIANTS", ("eager", "eager_fused_adam"))
    path = str(tmp_path / "out" / "bench.json")
    result = bench.run_bench(["train"], quick=True, json_path=path, log=lambda *_: None,
                             train_epochs=2, train_synthetic=4096)
    with open(path) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    assert saved["machine"]["device_count"] >= 1 and len(saved["machine"]["load_average"]) == 3
    (entry,) = saved["benchmarks"]
    assert entry["benchmark"] == "train" and entry["skipped"] is None
    assert [r["ratio"] > 0 for r in entry["rows"]] == [True] * 5  # GEMM peak, 2 steady, 2 e2e
    assert [r["target"] for r in entry["rows"]].count(">= 2x") == 1
    assert set(entry["figures"]["torch_medians"]) == {"eager", "eager_fused_adam"}
    # torch's end to end is its program's process, timed from outside: more than its loop alone
    for runs in entry["figures"]["torch_runs"].values():
        assert all(r["seconds"] > r["loop_seconds"] > 0 for r in runs)
    assert entry["figures"]["flops_per_kernel_step"] == 590_208  # 5x5: 98,368 MACs per pass


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


# ------------------------------------------------------------------ the assign benchmark's parts

def test_bad_sizes_are_one_line_before_any_run(tmp_path):
    for args, start in (
        (["--kmeans_n=100", "--kmeans_small_n=100"],
         "bench: --kmeans_small_n 100: must be below --kmeans_n 100"),
        (["--assign_n=-1"], "bench: --assign_n -1: must be at least 1"),
        (["--assign_n=1000000000000"], "bench: --assign_n 1000000000000, --kmeans_n"),
    ):
        p = run_module("dwjax.bench", "--parts=assign", *args,
                       f"--json={tmp_path / 'bench.json'}", timeout=120)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith(start), p.stderr
    assert not (tmp_path / "bench.json").exists()
    assert "need about" in p.stderr and "GB free in" in p.stderr


def test_a_ratio_between_two_methods_needs_the_same_rows():
    idx = np.arange(6, dtype=np.int32)
    dis = np.linspace(0, 1, 6, dtype=np.float32)
    assert search_speed.same_rows((idx, dis), (idx.copy(), dis.copy())) == 0
    other = dis.copy()
    other[2] = np.nextafter(other[2], np.float32(2))  # one ulp is a different row
    assert search_speed.same_rows((idx, dis), (idx, other)) == 1
    notes = []
    row = assign_speed.compared_row("pruned vs brute", 2.0, 1.0, "kernels/s", ">= 2x", 3, notes,
                                    10)
    assert row["ratio"] is None and row["target"] == "refused"
    assert notes == ["pruned vs brute: rows differ in 3 of 10 kernels: no ratio given"]
    row = assign_speed.compared_row("pruned vs brute", 2.0, 1.0, "kernels/s", ">= 2x", 0, notes,
                                    10)
    assert row["ratio"] == 2.0 and len(notes) == 1


def test_interleaved_rounds_give_each_rounds_own_ratio():
    """Two methods timed in turn: rates at the median times, the ratio the median of each
    round's own (a round where the machine ran slow counts once, on both sides)."""
    calls = []
    times, last = search_speed.interleaved(
        {"brute": lambda: calls.append("b") or "B", "pruned": lambda: calls.append("p") or "P"},
        3)
    assert calls == ["b", "p"] * 3 and last == {"brute": "B", "pruned": "P"}
    assert [len(t) for t in times.values()] == [3, 3]
    rates = search_speed.method_rates({"brute": [2.0, 8.0, 3.0], "pruned": [1.0, 4.0, 3.0]}, 6)
    assert rates["brute"] == 2.0 and rates["pruned"] == 2.0  # 6 / median time
    assert rates["pruned_over_brute"] == 2.0  # rounds: 2, 2, 1


def test_notes_wrap_under_the_table_within_100_columns():
    result = _result()
    result["benchmarks"][2]["notes"] = ["brute-force-equiv.: 2·N·48·10,000 flops " * 6]
    text = results.table(result)
    notes = [line for line in text.splitlines() if line.startswith("assign   note: ")]
    assert len(notes) == 1 and all(len(line) <= 100 for line in text.splitlines())
    assert text.splitlines()[text.splitlines().index(notes[0]) + 1].startswith(" " * 15 + "b")


def test_kernel_sets_stream_into_one_npz_that_convert_reads(tmp_path):
    whole = assign_jobs.synthetic_kernels(120_001, seed=4, k=3)
    assert whole.shape == (120_001, 3, 3) and whole.dtype == np.float32
    assert len({tuple(np.round(k.ravel(), 6)) for k in whole[:1000]}) == 1000  # no repeats
    path = str(tmp_path / "k.npz")
    assign_jobs.write_npz(path, len(whole), assign_jobs.synthetic_blocks(120_001, 4, 3), 3)
    with np.load(path) as z:
        assert np.array_equal(z["kernels"], whole)
    data = assign_jobs.convert_set(str(tmp_path), "set", 5000, dict(os.environ), seed=2)
    (shard,) = shards.iter_shards(data, 7)
    assert np.array_equal(shard.kernels, assign_jobs.synthetic_kernels(5000, seed=2))
    assert not os.path.exists(tmp_path / "set.npz")
    assert assign_speed.disk_bytes(10_000_000, 1_000_000) > 10_000_000 * 196 * 2
    assert [assign_speed.count(n) for n in (10_000_000, 250_000, 23_855)] == [
        "10M", "250k", "23,855"]


def test_distinct_keeps_first_appearances_in_order():
    a = np.arange(4 * 9, dtype=np.float32).reshape(4, 3, 3)
    rep = np.concatenate([a[2:3], a, a[::-1], a[1:2]])
    assert np.array_equal(search_speed.distinct(rep), a[[2, 0, 1, 3]])


def test_naive_numpy_is_chunked_and_agrees_with_the_search():
    recon = template_curve(7, 2000, seed=1)
    kernels = curve_kernels(recon, 3000, seed=2)
    whole = search_speed.naive_assign(kernels, recon, chunk=len(kernels))
    chunked = search_speed.naive_assign(kernels, recon, chunk=256)
    assert np.array_equal(whole[0], chunked[0])
    assert np.allclose(whole[1], chunked[1], atol=1e-6)
    ours, dis = nearest.nearest_codes(kernels, recon)
    assert np.allclose(dis, chunked[1], atol=1e-5)
    found = search_speed.disagreements(kernels, recon, ours, chunked[0])
    assert found["beyond_ties"] == 0
    wrong = ours.copy()
    wrong[:5] = (wrong[:5] + 1000) % len(recon)
    assert search_speed.disagreements(kernels, recon, ours, wrong)["beyond_ties"] == 5


def test_count_windows_follows_the_window_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_tiles, window = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        need = rng.random(n_tiles) < rng.random()
        visits, h = 0, max(np.flatnonzero(need), default=-1)
        while h >= 0:  # highest needed tile first, `window` tiles per step
            visits += 1
            start = max(h - window + 1, 0)
            h = max(np.flatnonzero(need[:start]), default=-1)
        assert int(search_work.count_windows(jnp.asarray(need), window)) == visits


def test_pruned_flops_count_what_the_search_visits():
    rng = np.random.default_rng(3)
    # random codes form no curve: no sub-tile is ever pruned, every block visits every window
    recon = rng.standard_normal((1000, 48)).astype(np.float32)
    kernels = rng.standard_normal((3000, 7, 7)).astype(np.float32)
    work = search_work.pruned_gemm_flops(kernels, recon)
    n_tiles = -(-1000 // nearest.DEFAULT_TILE_M)
    per_block = -(-n_tiles // device_programs.WINDOW_TILES)
    per_device = work["chunk"] // jax.device_count()  # padding rows fill the last blocks
    real_blocks = sum(-(-min(max(3000 - i * per_device, 0), per_device) // work["block"])
                      for i in range(jax.device_count()))
    assert work["windows"] == real_blocks * per_block
    assert work["flops"]["windows"] == (2.0 * work["windows"] * work["block"]
                                        * work["window_rows"] * 48)
    assert work["flops"]["reps"] == 2.0 * work["chunk"] * 48 * 64  # 16 tiles padded to 64 rows
    # a decoder-like curve with kernels near it: most of the work is pruned
    curve = template_curve(7, 10_000, seed=2)
    near = curve_kernels(curve, 4096, seed=5, near=1.0)
    work = search_work.pruned_gemm_flops(near, curve)
    assert 0 < work["visited_fraction"] < 0.5
    assert work["flops"]["total"] < search_work.brute_equivalent_flops(4096, 48, 10_000)
    # the count was a traced copy: the real program still searches, and as brute force does
    pruned = nearest.nearest_codes(near, curve, method="pruned")
    brute = nearest.nearest_codes(near, curve, method="brute")
    assert search_speed.same_rows(pruned, brute) == 0 and pruned[0].min() >= 0


@pytest.fixture(scope="module")
def tiny_7x7_run(tmp_path_factory):
    """A 7×7 run trained one epoch on 2,048 random kernels, and 6,000 kernels to assign."""
    from dwjax import train

    d = str(tmp_path_factory.mktemp("tiny7"))
    env = dict(os.environ)
    noise = np.random.default_rng(1).standard_normal((2048, 7, 7)).astype(np.float32)
    train_data = assign_jobs.convert_set(d, "noise", 2048, env, blocks=[noise])
    workdir = os.path.join(d, "run")
    config = train_configs.get_config("7")
    config.num_epochs = 1
    train.run(config, workdir, train_data, log=lambda *_: None)
    return d, workdir, assign_jobs.convert_set(d, "set", 6000, env), env


def test_host_ceiling_runs_the_stage_with_a_trivial_search(tiny_7x7_run):
    import pyarrow.parquet as pq

    d, workdir, data, env = tiny_7x7_run
    digests, timed = [], []
    for threads in (1, 0):
        r = assign_jobs.run_command(workdir, data, env, (f"--config.job.threads={threads}",),
                                    wrapper=host_ceiling.WRAPPER)
        assert 0 < r["run_s"] < r["wall"] and r["rss_mib"] > 0
        digests.append(assign_jobs.rows_digest(workdir))
        timed.append(r)
    assert digests[0] == digests[1]  # one thread or several: the same rows
    table = pq.read_table(workdir_lib.RunDir(workdir).assignments)
    kernels = assign_jobs.synthetic_kernels(6000)
    bits = kernels.reshape(6000, -1)[:, 0].view(np.int32) & 0x7FFFFFFF
    codes = np.linspace(0.0, 1.0, 10_000)  # the trivial answer: code index from a weight's bits
    assert table.num_rows == 6000
    assert np.allclose(table.column("code").to_numpy(), codes[bits % 10_000])
    assert np.array_equal(table.column("total_activation").to_numpy(), kernels[:, 0, 2])
    # the real search writes other rows (and the digest sees it)
    real = assign_jobs.run_command(workdir, data, env)
    assert real["run_s"] is None and assign_jobs.rows_digest(workdir) != digests[0]
