"""Large-scale assignment jobs: Parquet rows equal the arrays they came from, CSV still works,
parts, independent workers, a two-process JAX job, and a worker killed mid-part."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from dwjax.configs import train as train_configs

from dwjax import assign, train
from dwjax.io import assignment_files, assignment_rows, part_stream, shards
from dwjax.patterns import templates
from tests.helpers import make_data_dir, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A briefly trained 5×5 run and a data dir of three sources (900 kernels, 2 dead)."""
    tmp = tmp_path_factory.mktemp("jobs")
    rng = np.random.default_rng(3)
    kernels = templates.sample_dog_init(900, 5, rng) + 0.05 * rng.normal(size=(900, 5, 5))
    kernels[[10, 20]] = 0.0  # dead
    layers = np.repeat(np.arange(3), 100)
    d = make_data_dir(tmp, {f"src{i}": kernels[i * 300:(i + 1) * 300].astype(np.float32)
                            for i in range(3)}, layers={f"src{i}": layers for i in range(3)})
    c = train_configs.get_config("5")
    c.num_epochs, c.batch_size, c.eval_batch_size = 3, 64, 512
    train.run(c, str(tmp / "run"), d, **QUIET)
    return str(tmp / "run"), d, kernels


def _fresh(run: str, tmp) -> str:
    """A run directory sharing `run`'s trained model, with no assignments yet."""
    fresh = str(tmp)
    os.makedirs(fresh, exist_ok=True)
    for f in ("config.json",):
        os.link(os.path.join(run, f), os.path.join(fresh, f))
    os.symlink(os.path.join(run, "checkpoints"), os.path.join(fresh, "checkpoints"))
    return fresh


def _sorted(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.astype({"source": str, "label": str, "layer_name": str})
    return rows.sort_values(["source", "layer", "channel"]).reset_index(drop=True)


def test_parquet_rows_equal_the_arrays_and_csv_agrees(small_run, tmp_path):
    run, d, kernels = small_run
    w = _fresh(run, tmp_path / "pq")
    summary = assign.run(stage_config("assign"), w, d, **QUIET)
    assert summary["complete"] and summary["kernels"] == 900
    rows = pd.read_parquet(os.path.join(w, "assignments"))
    assert list(rows.columns) == list(assignment_rows.COLUMNS) and len(rows) == 900
    assert rows["label"].dtype.name == "category"  # dictionary-encoded
    for f in os.listdir(os.path.join(w, "assignments")):  # every file has the one schema
        if f.endswith(".parquet"):
            schema = pq.read_schema(os.path.join(w, "assignments", f))
            assert schema.remove_metadata().equals(assignment_rows.ROW_SCHEMA)
            # min/max statistics where they skip row groups: not on the measured floats, nor on
            # the label (every row group spans nearly every label)
            group = pq.ParquetFile(os.path.join(w, "assignments", f)).metadata.row_group(0)
            with_stats = {group.column(i).path_in_schema for i in range(group.num_columns)
                          if group.column(i).is_stats_set}
            assert {"layer", "channel", "source", "layer_name"} <= with_stats
            assert not with_stats & {"code", "dissimilarity", "total_activation", "norm",
                                     "label"}
            # dictionary pages on the text columns and the code (≤ num_codes values), not on
            # the measured floats
            dictionary = {group.column(i).path_in_schema for i in range(group.num_columns)
                          if "RLE_DICTIONARY" in group.column(i).encodings}
            assert {"source", "layer_name", "label", "code"} <= dictionary
            # zstd on the label only; the integer ids delta-encoded instead
            columns = {group.column(i).path_in_schema: group.column(i)
                       for i in range(group.num_columns)}
            assert {n for n, c in columns.items() if c.compression != "UNCOMPRESSED"} == {"label"}
            assert all("DELTA_BINARY_PACKED" in columns[n].encodings
                       for n in ("layer", "channel", "kernel_size"))
            assert not dictionary & {"dissimilarity", "total_activation", "norm", "channel"}
    # the arrays they were written from: classifier outputs and raw statistics
    clf = assign.AutoencoderClassifier(assign.workdir_lib.RunDir(w), 10_000, 0.2, 1 << 15)
    code, dis, clustered, label, total, norm = clf(kernels.astype(np.float32))
    got = _sorted(rows)  # shard order: src0, src1, src2; layer; channel
    np.testing.assert_array_equal(got["code"].to_numpy(), code)
    np.testing.assert_array_equal(got["dissimilarity"].to_numpy(), dis.astype(np.float32))
    np.testing.assert_array_equal(got["clustered"].to_numpy(), clustered)
    np.testing.assert_array_equal(got["label"].to_numpy(),
                                  np.asarray(clf.label_names)[label])
    np.testing.assert_array_equal(got["total_activation"].to_numpy(), total)
    np.testing.assert_array_equal(got["norm"].to_numpy(), norm)
    # summed in float32 on the devices: within float32 rounding of the float64 sums (γ_n bounds)
    k64 = kernels.astype(np.float32).astype(np.float64).reshape(900, -1)
    gamma = k64.shape[1] * 2.0 ** -24 / (1 - k64.shape[1] * 2.0 ** -24)
    assert (np.abs(total - k64.sum(1)) <= gamma * np.abs(k64).sum(1) + 1e-30).all()
    np.testing.assert_allclose(norm, np.linalg.norm(k64, axis=1), rtol=2 * gamma)
    dead = got[got["label"] == assignment_rows.DEAD]
    assert len(dead) == 2 and dead["code"].isna().all() and dead["dissimilarity"].isna().all()
    assert not dead["clustered"].any()
    # --format=csv: today's CSV, the same values
    c = _fresh(run, tmp_path / "csv")
    assign.run(stage_config("assign", format="csv"), c, d, **QUIET)
    csv_rows = pd.concat(pd.read_csv(os.path.join(c, "assignments", f))
                         for f in sorted(os.listdir(os.path.join(c, "assignments")))
                         if f.endswith(".csv"))
    a, b = _sorted(rows), _sorted(csv_rows)
    assert len(b) == 900
    assert (a["clustered"] == (b["clustered"] == 1)).all()  # CSV keeps today's 0/1
    for col in ("layer", "channel", "label", "layer_name", "source"):
        assert (a[col].astype(str) == b[col].astype(str)).all(), col
    for col in ("code", "dissimilarity", "total_activation", "norm"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-5, atol=1e-7)
    # read back through the owner, CSV columns come in the Parquet columns' dtypes
    stats_pq = assignment_files.read_stats(os.path.join(w, "assignments"))[0]
    stats_csv = assignment_files.read_stats(os.path.join(c, "assignments"))[0]
    from_pq = assignment_files.read_rows(os.path.join(w, "assignments"), stats_pq,
                                         assignment_rows.COLUMNS)
    from_csv = assignment_files.read_rows(os.path.join(c, "assignments"), stats_csv,
                                          assignment_rows.COLUMNS)
    assert {n: v.dtype for n, v in from_pq.items()} == {n: v.dtype for n, v in from_csv.items()}


def test_parts_cover_each_shard_once_and_a_new_part_size_replaces_them(small_run, tmp_path):
    run, d, _ = small_run
    w = _fresh(run, tmp_path / "w")
    whole = _sorted(pd.read_parquet(os.path.join(
        assign.run(stage_config("assign"), _fresh(run, tmp_path / "ref"), d, **QUIET)
        and str(tmp_path / "ref"),
        "assignments")))
    assign.run(stage_config("assign", job__part_size=128), w, d, **QUIET)
    files = sorted(f for f in os.listdir(os.path.join(w, "assignments")) if f.endswith(".parquet"))
    assert len(files) == 9 and "src0.k5x5.r256-300.parquet" in files
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(os.path.join(w, "assignments"))), whole)
    # one part per shard now
    summary = assign.run(stage_config("assign", job__part_size=1000), w, d, **QUIET)
    files = sorted(f for f in os.listdir(os.path.join(w, "assignments")) if f.endswith(".parquet"))
    assert files == ["src0.k5x5.parquet", "src1.k5x5.parquet", "src2.k5x5.parquet"]
    assert summary["kernels"] == 900
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(os.path.join(w, "assignments"))), whole)


def _assign_cmd(w, d, *extra):
    return [sys.executable, "-m", "dwjax.assign", f"--workdir={w}", f"--data_dir={d}",
            "--config.job.part_size=128", *extra]


def test_two_workers_at_once_equal_one_process(small_run, tmp_path):
    run, d, _ = small_run
    ref = _fresh(run, tmp_path / "ref")
    assign.run(stage_config("assign", job__part_size=128), ref, d, **QUIET)
    w = _fresh(run, tmp_path / "w")
    procs = [subprocess.Popen(_assign_cmd(w, d, "--config.job.num_workers=2",
                                          f"--config.job.worker_index={i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = _sorted(pd.read_parquet(os.path.join(w, "assignments")))
    assert len(rows) == 900 and not rows.duplicated(["source", "layer", "channel"]).any()
    pd.testing.assert_frame_equal(rows, _sorted(pd.read_parquet(os.path.join(ref, "assignments"))))
    # the same command without worker flags: every part done, the summary written
    p = subprocess.run(_assign_cmd(w, d), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "900 kernels clustered" in p.stdout or "of 900 kernels clustered" in p.stdout
    assert os.path.exists(assignment_files.summary_path(os.path.join(w, "assignments")))


_KILL_AFTER_FIRST_BLOCK = r"""
import os, signal, sys
from dwjax import assign
from dwjax.io import assignment_files
from tests.helpers import stage_config
real = assignment_files.PartWriter.write
def write(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # dies with the part's row file half written
assignment_files.PartWriter.write = write
config = stage_config("assign", job__chunk_size=16, job__part_size=1000)
assign.run(config, sys.argv[1], sys.argv[2], log=print)
"""


def test_a_worker_killed_mid_part_reruns_to_single_rows(small_run, tmp_path):
    run, d, _ = small_run
    w = _fresh(run, tmp_path / "w")
    p = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_BLOCK, w, d], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode == -signal.SIGKILL
    out = os.path.join(w, "assignments")
    assert [f for f in os.listdir(out) if f.startswith(".tmp-")]  # the torn part, hidden
    assert not [f for f in os.listdir(out) if f.endswith(".parquet") and f[0] != "."]
    config = stage_config("assign", job__chunk_size=16, job__part_size=1000)
    summary = assign.run(config, w, d, **QUIET)
    assert summary["kernels"] == 900 and not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    rows = pd.read_parquet(out)
    assert len(rows) == 900 and not rows.duplicated(["source", "layer", "channel"]).any()


def test_two_process_distributed_job_equals_one_process(small_run, tmp_path):
    run, d, _ = small_run
    ref = _fresh(run, tmp_path / "ref")
    assign.run(stage_config("assign", job__part_size=128), ref, d, **QUIET)
    w = _fresh(run, tmp_path / "w")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]  # files: a full pipe blocks
    procs = [subprocess.Popen(_assign_cmd(w, d, f"--coordinator_address=localhost:{port}",
                                          "--num_processes=2", f"--process_id={i}"),
                              stdout=logs[i], stderr=subprocess.STDOUT, env=env, cwd=ROOT)
             for i in range(2)]
    for p in procs:
        p.wait(timeout=300)
    texts = [open(tmp_path / f"proc{i}.log").read() for i in range(2)]
    assert all(p.returncode == 0 for p in procs), texts
    assert "kernels clustered" in texts[0] and "worker 1" in texts[1]
    rows = _sorted(pd.read_parquet(os.path.join(w, "assignments")))
    pd.testing.assert_frame_equal(rows, _sorted(pd.read_parquet(os.path.join(ref, "assignments"))))
    # each process wrote its own parts: 9 parts dealt round-robin
    assert sum(" rows [" in line for line in texts[0].splitlines()) == 5
    assert sum(" rows [" in line for line in texts[1].splitlines()) == 4


@pytest.mark.parametrize("args,word", [
    (["--config.threshold=nan"], "--config.threshold"),
    (["--config.threshold=2.5"], "--config.threshold"),
    (["--config.num_codes=1"], "--config.num_codes"),
    (["--config.job.chunk_size=0"], "--config.job.chunk_size"),
    (["--config.job.num_workers=2", "--config.job.worker_index=2"], "--config.job.worker_index"),
    (["--config.job.num_workers=2", "--config.job.overwrite=true"], "--config.job.overwrite"),
    (["--config.job.part_size=0"], "--config.job.part_size"),
    (["--config.method=svm"], "--config.method"),
    (["--config.treshold=0.1"], "--config.treshold: unknown config field (did you mean "
                                "--config.threshold?)")])
def test_bad_job_flags_are_refused_before_anything_is_written(small_run, tmp_path, args, word):
    run, d, _ = small_run
    w = _fresh(run, tmp_path / "w")
    p = subprocess.run([sys.executable, "-m", "dwjax.assign", f"--workdir={w}", f"--data_dir={d}",
                        *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"assign: {word}")
    assert not os.path.exists(os.path.join(w, "assignments"))


def test_progress_line_reports_rate_and_eta():
    lines = []
    progress = part_stream.Progress(1000, lines.append, every=0.0)
    shard = shards.Shard("src", "src", np.zeros((1000, 5, 5)), None, {}, "x")
    progress.update(assignment_files.Part(shard, 0, 1000), 250, 250)
    (line,) = lines
    assert "250/1,000" in line and "job 250/1,000 (25%)" in line and "kernels/s" in line
    assert "ETA" in line


def test_negligible_kernels_are_dead_and_small_ones_keep_their_answer(small_run, tmp_path):
    """One dead rule, scale-aware: a ~1e-20 kernel is dead (not "live" with an arbitrary code);
    a 1e-6 copy of a kernel gets the answer of the kernel itself (to float32 rounding of the
    scaled copy: a near-tie may move to a nearby code of the same dissimilarity)."""
    run, _, kernels = small_run
    base = kernels[:50].astype(np.float32)
    mixed = np.concatenate([base, base * np.float32(1e-6), base * np.float32(1e-20)])
    d = make_data_dir(tmp_path / "d", {"scaled": mixed})
    w = _fresh(run, tmp_path / "w")
    assign.run(stage_config("assign"), w, d, **QUIET)
    rows = pd.read_parquet(os.path.join(w, "assignments")).sort_values("channel")
    first, small, tiny = (rows.iloc[i * 50:(i + 1) * 50] for i in range(3))
    assert (tiny["label"] == assignment_files.DEAD).all() and tiny["code"].isna().all()
    live = first["label"] != assignment_files.DEAD
    assert live.sum() == 48  # the two all-zero kernels of the fixture are dead at every scale
    a, b = small["code"].to_numpy()[live.to_numpy()], first["code"].to_numpy()[live.to_numpy()]
    # along a flat stretch of the curve neighbouring codes are within float32 rounding of each
    # other: ≤ 5 of 10,000 code steps, as for the float64 reference (test_assign)
    assert (a == b).mean() > 0.9 and np.abs(a - b).max() <= 5.5e-4
    np.testing.assert_allclose(small["dissimilarity"], first["dissimilarity"], atol=2e-6)
    # the raw statistics of a ~1e-20 kernel, whose squares underflow float32: its norm still
    np.testing.assert_allclose(tiny["norm"].to_numpy(), 1e-20 * first["norm"].to_numpy(),
                               rtol=1e-5)
    assert (tiny["norm"].to_numpy()[live.to_numpy()] > 0).all()


def test_arrow_columns_and_empty_rows(small_run):
    """Columns built from numpy buffers (pa.array would import pandas) round-trip: bools of any
    length (bit-packed), non-native byte order, any strings; a classifier given no kernels gives
    empty rows of the right dtypes."""
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 13):
        b = rng.random(n) < 0.5
        assert assignment_rows._arrow(b).to_pylist() == b.tolist()
    assert assignment_rows._arrow(np.arange(5, dtype=">i4")).to_pylist() == [0, 1, 2, 3, 4]
    words = ["", "a,b", "ünïcödé", "层", 'q"uote']
    assert assignment_rows._arrow_strings(words).to_pylist() == words
    run, _, _ = small_run
    clf = assign.AutoencoderClassifier(assign.workdir_lib.RunDir(run), 1000, 0.2, 256, **QUIET)
    rows = clf(np.zeros((0, 5, 5), np.float32))
    assert [len(c) for c in rows] == [0] * 6
    assert [c.dtype for c in rows] == [np.float64, np.float32, bool, np.int32, np.float32,
                                       np.float32]


def test_a_worker_searching_another_way_is_refused_unless_mixing_is_allowed(small_run, tmp_path):
    """settings.json records how the rows were searched; a worker on another backend or method
    (simulated: the job's record says gpu/brute) is refused in one line naming both, before any
    row is written; with allow_mixed it goes on and each part records its own search."""
    import json

    run, d, _ = small_run
    w = _fresh(run, tmp_path / "w")
    cfg = stage_config("assign", job__part_size=128, job__num_workers=2, job__worker_index=0)
    assign.run(cfg, w, d, **QUIET)
    out = os.path.join(w, "assignments")
    path = assignment_files.settings_path(out)
    with open(path) as f:
        settings = json.load(f)
    assert settings["search"]["backend"] == "cpu" and settings["search"]["method"] in (
        "brute", "pruned")
    settings["search"] = {**settings["search"], "backend": "gpu", "method": "brute"}
    with open(path, "w") as f:
        json.dump(settings, f)
    before = sorted(os.listdir(out))
    second = stage_config("assign", job__part_size=128, job__num_workers=2, job__worker_index=1)
    p = subprocess.run(_assign_cmd(w, d, "--config.job.num_workers=2",
                                   "--config.job.worker_index=1"),
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "backend gpu" in p.stderr and "backend cpu" in p.stderr and "allow_mixed" in p.stderr
    assert sorted(os.listdir(out)) == before
    second.job.allow_mixed = True
    summary = assign.run(second, w, d, **QUIET)
    assert summary["complete"] and summary["kernels"] == 900
    records = [json.load(open(os.path.join(out, "_meta", f)))["search"]
               for f in os.listdir(os.path.join(out, "_meta")) if ".k5x5" in f]
    assert len(records) == 9 and {r["backend"] for r in records} == {"cpu"}
    assert all(r["device_count"] >= 1 and r["device_kind"] for r in records)


def test_lanes_on_two_cpu_devices_write_the_rows_of_one_device(small_run, tmp_path):
    """Two CPU devices search on their own lanes (search.lanes: whole chunks each, taken when
    free, so the order in which chunks finish varies): the rows are those of one device."""
    from dwjax.perf import assign_jobs
    from tests.conftest import run_module

    run, d, _ = small_run
    args = ("--config.job.chunk_size=64", "--config.job.part_size=128")
    one = _fresh(run, tmp_path / "one")
    assign.run(stage_config("assign", job__chunk_size=64, job__part_size=128), one, d, **QUIET)
    two = _fresh(run, tmp_path / "two")
    p = run_module("dwjax.assign", f"--workdir={two}", f"--data_dir={d}", *args,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                        "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    meta = os.path.join(two, "assignments", "_meta")
    records = [json.load(open(os.path.join(meta, f)))["search"]
               for f in os.listdir(meta) if ".k5x5" in f]
    assert len(records) == 9 and {r["device_count"] for r in records} == {2}
    assert assign_jobs.rows_digest(two) == assign_jobs.rows_digest(one)


def test_rows_are_byte_equal_with_and_without_the_host_threads(small_run, tmp_path):
    """Reading ahead on worker threads and writing parts on a writer thread move bytes, never
    change them: the same files as everything in one thread."""
    run, d, _ = small_run
    files = {}
    for threads in (1, 4):
        w = _fresh(run, tmp_path / f"t{threads}")
        cfg = stage_config("assign", job__threads=threads, job__chunk_size=64,
                           job__part_size=128)
        assign.run(cfg, w, d, **QUIET)
        out = os.path.join(w, "assignments")
        files[threads] = {f: open(os.path.join(out, f), "rb").read()
                          for f in sorted(os.listdir(out)) if f.endswith(".parquet")}
    assert len(files[1]) == 9 and files[1] == files[4]
