"""The failure model: bad values, failed starts, corrupted checkpoints, paths that are not
writable directories, disk full, Ctrl-C, and two copies of a stage on one directory."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from dwjax.configs import train as train_configs

from dwjax import train
from dwjax.patterns import templates
from tests.helpers import train_briefly, make_data_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)


def _run(*args, env=None, timeout=300, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, **(env or {})),
                          preexec_fn=preexec_fn)


def _one_line(p, stage, *words):
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{stage}: "), p.stderr[-3000:]
    for w in words:
        assert w in p.stderr, p.stderr
    return p.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    kernels = templates.sample_dog_init(600, 5, rng) + 0.05 * rng.normal(size=(600, 5, 5))
    return make_data_dir(tmp_path_factory.mktemp("fail"), {"dogs": kernels.astype(np.float32)})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    return train_briefly(data, str(tmp_path_factory.mktemp("trained") / "run"))


def _listing(path):
    if not os.path.exists(path):
        return None
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path)
                  for f in fs if f != ".lock")


@pytest.mark.parametrize(
    "override,word",
    [
        ("--config.learning_rate=inf", "learning_rate"),
        ("--config.learning_rate=nan", "learning_rate"),
        ("--config.end_learning_rate_fraction=nan", "end_learning_rate_fraction"),
        ("--config.model.hidden=()", "hidden"),
        ("--config.seed=-1", "seed"),
        ("--config.model.negative_slope=nan", "negative_slope"),
        ("--config.batch_size=0", "batch_size"),
        ("--config.nosuchfield=1", "unknown config field"),
        ("--config.learning_rat=0.1", "did you mean --config.learning_rate"),
    ],
)
def test_bad_train_values_fail_before_anything_is_written(data, trained, tmp_path, override, word):
    before = _listing(trained)
    p = _run("dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={trained}",
             override)
    _one_line(p, "train", word)
    assert _listing(trained) == before  # a failed start leaves the run as it was
    fresh = str(tmp_path / "fresh")
    p = _run("dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={fresh}",
             override)
    _one_line(p, "train", word)
    assert not os.path.exists(fresh)


def test_a_failed_start_does_not_block_the_next_correct_command(data, trained):
    p = _run("dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={trained}",
             "--config.learning_rate=nan")
    _one_line(p, "train", "learning_rate")
    # the correct command resumes the finished run: nothing to do, and no refusal
    p = _run("dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={trained}",
             "--config.num_epochs=2", "--config.batch_size=64", "--config.eval_batch_size=512")
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_diverging_run_stops_without_checkpointing_nan(data, tmp_path):
    c = train_configs.get_config("5")
    c.num_epochs, c.batch_size, c.learning_rate, c.schedule = 3, 64, 1e30, "constant"
    w = str(tmp_path / "w")
    with pytest.raises(train.TrainingDiverged, match="loss became"):
        train.run(c, w, data, **QUIET)
    assert not os.path.exists(os.path.join(w, "checkpoints")) or not [
        d for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()]


def _copy_with_params_files(trained: str, tmp_path) -> tuple[str, list[str]]:
    """A copy of the trained run, and the array files of its latest checkpoint's params."""
    import shutil

    w = str(tmp_path / "w")
    shutil.copytree(trained, w)
    ckpt = os.path.join(w, "checkpoints")
    latest = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
    return w, [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt, str(latest), "params"))
               for f in fs]


def test_a_corrupted_checkpoint_is_refused_by_every_reader(data, trained, tmp_path):

    w, files = _copy_with_params_files(trained, tmp_path)
    # flip bytes inside an array file: orbax reads it, the digest does not match
    files = [f for f in files if os.path.getsize(f) > 2000]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(target) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    # model.npz (what inference reads) is intact: it answers; damaged, it is refused ...
    p = _run("dwjax.spectrum", f"--workdir={w}")
    assert p.returncode == 0, p.stderr
    with open(os.path.join(w, "model.npz"), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(w, "model.npz")) // 2)
        f.write(b"\xff" * 32)
    for stage in ("spectrum", "assign"):
        p = _run(f"dwjax.{stage}", f"--workdir={w}", f"--data_dir={data}"
                 if stage == "assign" else "--config.relabel=false")
        _one_line(p, stage, "model.npz: corrupt")
    # ... and without it, the orbax checkpoint is read and its corruption found
    os.remove(os.path.join(w, "model.npz"))
    for stage in ("spectrum", "assign"):
        p = _run(f"dwjax.{stage}", f"--workdir={w}", f"--data_dir={data}"
                 if stage == "assign" else "--config.relabel=false")
        _one_line(p, stage, "corrupt checkpoint")


@pytest.mark.parametrize("stage", ["convert", "train", "spectrum", "assign", "report"])
@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_paths_that_are_not_directories(data, tmp_path, stage, where):
    blocker = str(tmp_path / "file")
    with open(blocker, "w") as f:
        f.write("x")
    path = blocker if where == "is_a_file" else os.path.join(blocker, "sub")
    npz = str(tmp_path / "k.npz")
    np.savez(npz, kernels=np.random.default_rng(0).normal(size=(8, 5, 5)))
    args = {"convert": [f"--kernels_npz={npz}", f"--data_dir={path}"],
            "train": ["--kernel_size=5", f"--data_dir={data}", f"--workdir={path}",
                      "--config.batch_size=64", "--config.num_epochs=1"],
            "spectrum": [f"--workdir={path}"],
            "assign": [f"--workdir={path}", f"--data_dir={data}"],
            "report": [f"--workdir={path}"]}[stage]
    p = _run(f"dwjax.{stage}", *args)
    _one_line(p, stage, path)
    assert open(blocker).read() == "x"


def _small_file_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_disk_full_is_one_line_and_leaves_nothing_partial(trained, data, tmp_path):
    """A file-size limit stands in for a full disk: every write past it fails with EFBIG."""
    big = str(tmp_path / "big.npz")
    np.savez(big, kernels=np.random.default_rng(0).normal(size=(4000, 5, 5)).astype(np.float32))
    out = str(tmp_path / "data")
    p = _run("dwjax.convert", f"--kernels_npz={big}", f"--data_dir={out}",
             preexec_fn=_small_file_limit)
    _one_line(p, "convert", "File too large")
    assert (
        [n for n in os.listdir(out) if n not in (".lock",)] == [] if os.path.exists(out) else True
    )
    w = str(tmp_path / "w")
    import shutil

    shutil.copytree(trained, w)
    big_data = str(tmp_path / "bigdata")
    p = _run("dwjax.convert", f"--kernels_npz={big}", f"--data_dir={big_data}")
    assert p.returncode == 0
    p = _run("dwjax.assign", f"--workdir={w}", f"--data_dir={big_data}", "--config.format=csv",
             preexec_fn=_small_file_limit,  # its own compile cache: the shared one stays whole
             env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")})
    _one_line(p, "assign", "File too large")
    rows = os.path.join(w, "assignments")
    assert not [f for f in os.listdir(rows) if f.endswith(".csv")]
    assert not [f for f in os.listdir(rows) if f.startswith(".tmp-")]


def test_ctrl_c_in_train_is_one_line_and_exit_130(data, tmp_path):
    w = str(tmp_path / "w")
    # Ctrl-C at a terminal: SIGINT at its default, even when this suite runs as a background job
    # of a script (whose shell starts it with SIGINT ignored, which children inherit)
    proc = subprocess.Popen([sys.executable, "-m", "dwjax.train", "--kernel_size=5",
                             f"--data_dir={data}", f"--workdir={w}", "--config.batch_size=64",
                             "--config.num_epochs=100000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(w, "metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err == "train: interrupted\n", err[-3000:]


def test_two_trainings_on_one_run_dir_never_interleave(data, tmp_path):
    w = str(tmp_path / "w")
    common = ["-m", "dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={w}",
              "--config.batch_size=64"]
    first = subprocess.Popen([sys.executable, *common, "--config.num_epochs=60"], cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(w, "config.json")):
        time.sleep(0.1)
    second = _run(*common[1:], "--config.num_epochs=30", "--config.learning_rate=0.01")
    _one_line(second, "train", "already running", str(first.pid))
    # another architecture is refused whether or not the first is still running
    other = _run(*common[1:], "--config.model.hidden=(64,32)")
    _one_line(other, "train", "workdir was trained with")
    first.communicate(timeout=600)
    assert first.returncode == 0
    with open(os.path.join(w, "config.json")) as f:
        saved = json.load(f)
    assert saved["architecture"]["hidden"] == [256, 128, 64, 32]
    assert saved["config"]["num_epochs"] == 60 and saved["config"]["learning_rate"] != 0.01


def test_two_converts_of_different_sources_into_one_dir_both_land(tmp_path):
    srcs = []
    for i in range(2):
        path = str(tmp_path / f"s{i}.npz")
        np.savez(path, kernels=np.random.default_rng(i).normal(size=(5000, 7, 7)))
        srcs.append(path)
    out = str(tmp_path / "data")
    procs = [subprocess.Popen([sys.executable, "-m", "dwjax.convert", f"--kernels_npz={s}",
                               f"--data_dir={out}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in srcs]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert [s["id"] for s in manifest["sources"]] == ["s0", "s1"]
    assert manifest["totals"] == {"7x7": 10000}


def test_two_assigns_on_one_run_dir_both_finish_with_single_rows(trained, data, tmp_path):
    import shutil

    import pandas as pd

    w = str(tmp_path / "w")
    shutil.copytree(trained, w)
    procs = [subprocess.Popen([sys.executable, "-m", "dwjax.assign", f"--workdir={w}",
                               f"--data_dir={data}", "--config.job.part_size=100"], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = pd.read_parquet(os.path.join(w, "assignments"))
    assert len(rows) == 600 and not rows.duplicated(["source", "layer", "channel"]).any()
    assert not [f for f in os.listdir(os.path.join(w, "assignments")) if f.startswith(".tmp-")]


def test_a_corrupt_source_json_does_not_block_later_converts(tmp_path):
    out = str(tmp_path / "data")
    paths = []
    for name in ("a", "b"):
        paths.append(str(tmp_path / f"{name}.npz"))
        np.savez(paths[-1], kernels=np.random.default_rng(0).normal(size=(10, 3, 3)))
    assert _run("dwjax.convert", f"--kernels_npz={paths[0]}", f"--data_dir={out}").returncode == 0
    with open(os.path.join(out, "a", "source.json"), "w") as f:
        f.write("{torn")
    p = _run("dwjax.convert", f"--kernels_npz={paths[1]}", f"--data_dir={out}")
    assert p.returncode == 0, p.stderr
    with open(os.path.join(out, "manifest.json")) as f:
        assert [s["id"] for s in json.load(f)["sources"]] == ["b"]
    # converting the damaged source again repairs it
    assert _run("dwjax.convert", f"--kernels_npz={paths[0]}", f"--data_dir={out}").returncode == 0
    with open(os.path.join(out, "manifest.json")) as f:
        assert [s["id"] for s in json.load(f)["sources"]] == ["a", "b"]


def test_a_corrupt_statistics_file_is_named_by_report(trained, data, tmp_path):
    import glob
    import shutil

    w = str(tmp_path / "w")
    shutil.copytree(trained, w)
    assert _run("dwjax.assign", f"--workdir={w}", f"--data_dir={data}").returncode == 0
    (stats,) = glob.glob(os.path.join(w, "assignments", "_meta", "dogs.*.json"))
    with open(stats, "w") as f:
        f.write("{not json")
    _one_line(_run("dwjax.report", f"--workdir={w}"), "report", stats)


def _train_args(data, w, epochs):
    return ("dwjax.train", "--kernel_size=5", f"--data_dir={data}", f"--workdir={w}",
            f"--config.num_epochs={epochs}", "--config.batch_size=64",
            "--config.eval_batch_size=512")


def _files(path):
    """Every file of a run directory with its mtime and bytes: what a refusal must keep."""
    out = {}
    for name in _listing(path):
        full = os.path.join(path, name)
        with open(full, "rb") as f:
            out[name] = (os.stat(full).st_mtime_ns, f.read())
    return out


def test_fewer_epochs_than_trained_is_refused_and_more_extend_the_run(data, trained, tmp_path):
    import shutil

    w = str(tmp_path / "w")
    shutil.copytree(trained, w)  # `trained` is shared: this test extends its own copy
    before = _files(w)
    p = _run(*_train_args(data, w, 1))
    _one_line(p, "train", "--config.num_epochs=1", "2 epochs")
    assert _files(w) == before  # config.json still says 2 epochs; no checkpoint touched
    p = _run(*_train_args(data, w, 2))  # as many as trained: nothing to do
    assert p.returncode == 0, p.stderr[-2000:]
    p = _run(*_train_args(data, w, 3))
    assert p.returncode == 0, p.stderr[-2000:]
    with open(os.path.join(w, "config.json")) as f:
        assert json.load(f)["config"]["num_epochs"] == 3
    with open(os.path.join(w, "metrics.jsonl")) as f:
        assert max(json.loads(line).get("epoch", 0) for line in f) == 3


def test_a_truncated_checkpoint_is_one_line_on_stderr(data, trained, tmp_path):

    w, files = _copy_with_params_files(trained, tmp_path)
    target = max(files, key=os.path.getsize)
    os.truncate(target, os.path.getsize(target) // 2)
    # orbax's other reads still in flight when one fails used to print tracebacks into stderr,
    # not on every run: a few runs catch it
    for _ in range(3):
        _one_line(_run(*_train_args(data, w, 3)), "train", "corrupt checkpoint")


def test_jax_before_0_10_runs_without_the_persistent_cache(monkeypatch):
    """jax 0.9's XLA:CPU logs an error line for every cached program it loads: there the cache
    is off, so a failing command's stderr stays one line (the floor run checks the commands)."""
    import jax

    from dwjax import runtime

    before = jax.config.jax_enable_compilation_cache
    try:
        monkeypatch.setattr(jax, "__version__", "0.9.0")
        assert runtime.jax_version() == (0, 9, 0) < runtime.NO_CACHE_BEFORE
        runtime.enable_compilation_cache()
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
    monkeypatch.setattr(jax, "__version__", "0.10.2")
    assert runtime.jax_version() >= runtime.NO_CACHE_BEFORE


def test_ctrl_c_during_a_checkpoint_save_is_held_until_it_ends():
    """An interrupt inside orbax's save could leave the trainer waiting on its threads: it is
    raised only once the save block ends."""
    from dwjax import runtime

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with runtime.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes: here; it only records
                pass
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
