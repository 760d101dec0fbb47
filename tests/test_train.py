"""Train stage: separation of synthetic prototypes, device-count invariance, kill/resume, refusal of
bad checkpoints, and faithfulness to a plain PyTorch loop on the real EfficientNet-Lite kernels."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from dwjax.configs import train as train_configs

from dwjax import train
from dwjax.errors import CheckpointError
from dwjax.io import workdir
from dwjax.model import preprocess, restore, steps
from tests.conftest import run_module
from tests.helpers import make_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    c = train_configs.get_config("5")
    c.batch_size, c.num_epochs, c.checkpoint_every_epochs, c.eval_batch_size = 64, 4, 2, 512
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def prototype_kernels(n_per=600, noise=0.08, seed=0):
    """Four well-separated 5×5 prototypes (orthogonal in the hyperplane) plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(24, 4)))
    protos = preprocess.unembed(q.T.astype(np.float32), 5)
    labels = np.repeat(np.arange(4), n_per)
    x = np.asarray(protos)[labels] + noise * rng.normal(size=(len(labels), 5, 5))
    scale = rng.uniform(0.1, 3, size=(len(labels), 1, 1))
    return (x * scale + rng.normal(size=(len(labels), 1, 1))).astype(np.float32), labels


@pytest.fixture(scope="module")
def proto_dir(tmp_path_factory):
    x, labels = prototype_kernels()
    d = make_data_dir(tmp_path_factory.mktemp("protos"), {"protos": x})
    return d, x, labels


def test_short_training_separates_prototypes(proto_dir, tmp_path):
    d, x, labels = proto_dir
    res = train.run(
        small_config(num_epochs=30, learning_rate=3e-3), str(tmp_path), d, log=lambda *_: None
    )
    codes = np.asarray(res.model.encode(preprocess.embed(x)))
    intervals = sorted((codes[labels == i].min(), codes[labels == i].max()) for i in range(4))
    for (lo1, hi1), (lo2, hi2) in zip(intervals[:-1], intervals[1:]):
        assert hi1 < lo2, f"prototype code intervals overlap: {intervals}"
    # near the noise floor: the dissimilarity of each noisy kernel to its own clean prototype
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(24, 4)))
    floor = np.mean(np.asarray(preprocess.cosine_dissimilarity(preprocess.embed(x), q.T[labels])))
    assert floor - 0.02 < res.eval_loss < floor + 0.08, (res.eval_loss, floor)  # untrained: ~1


_MULTI_DEVICE = r"""
import json, sys
from dwjax.configs import train as train_configs
from dwjax import train
c = train_configs.get_config("5")
c.batch_size, c.num_epochs, c.checkpoint_every_epochs, c.eval_batch_size = 64, 3, 10, 512
import jax
res = train.run(c, sys.argv[1], sys.argv[2], log=lambda *_: None)
losses = [json.loads(l)["loss"] for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l]
print(json.dumps({"devices": jax.device_count(), "losses": losses, "eval": res.eval_loss}))
"""


def test_eight_devices_match_one_device(proto_dir, tmp_path):
    d = proto_dir[0]
    out = {}
    for n in (1, 8):
        env = dict(
            os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu"
        )
        p = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, str(tmp_path / f"w{n}"), d],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        out[n] = json.loads(p.stdout.strip().splitlines()[-1])
    assert out[1]["devices"] == 1 and out[8]["devices"] == 8
    assert len(out[1]["losses"]) == len(out[8]["losses"]) == 3 * (2400 // 64)
    # The same math, summed in another order: equal to fp32 rounding at first; over ~100 Adam steps
    # the rounding differences grow (chaotically, not systematically), so later steps get a looser
    # bound.
    np.testing.assert_allclose(out[8]["losses"][:32], out[1]["losses"][:32], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out[8]["losses"], out[1]["losses"], rtol=2e-2)
    np.testing.assert_allclose(out[8]["eval"], out[1]["eval"], rtol=1e-2)


def _metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    return [{k: v for k, v in r.items() if k != "kernels_per_s"} for r in rows]


def test_killed_run_resumes_to_identical_parameters(proto_dir, tmp_path):
    d = proto_dir[0]
    cfg = small_config(num_epochs=5, checkpoint_every_epochs=2)
    full = train.run(cfg, str(tmp_path / "full"), d, log=lambda *_: None)
    killed = str(tmp_path / "killed")
    # cut into other jitted calls (37 steps an epoch: 5+5+5+5+5+4+4+4, not 19+18): the same updates
    cfg = small_config(num_epochs=5, checkpoint_every_epochs=2, steps_per_call=5)
    train.run(
        cfg, killed, d, log=lambda *_: None, stop_after_epochs=3
    )  # dies after epoch 3
    with open(os.path.join(killed, "metrics.jsonl"), "a") as f:
        f.write('{"step": 999, "lo')  # ... in the middle of writing a line
    logs = []
    resumed = train.run(cfg, killed, d, log=logs.append)
    assert any("resumed" in l and "epoch 2" in l for l in logs)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    assert _metric_lines(killed) == _metric_lines(str(tmp_path / "full"))  # nothing lost or twice
    assert resumed.eval_loss == full.eval_loss
    # the latest checkpoint reloads into the same model
    model, config = restore.load_model(workdir.RunDir(killed))
    x = preprocess.embed(proto_dir[1][:10])
    np.testing.assert_array_equal(np.asarray(model.encode(x)), np.asarray(resumed.model.encode(x)))


def test_an_epoch_is_cut_into_as_few_and_as_even_calls_as_fit():
    assert steps.call_sizes(93, 32) == [31, 31, 31]  # the README default: one compiled program
    assert steps.call_sizes(37, 32) == [19, 18]
    assert steps.call_sizes(37, 5) == [5, 5, 5, 5, 5, 4, 4, 4]
    assert steps.call_sizes(64, 32) == [32, 32] and steps.call_sizes(3, 32) == [3]
    for n, s in ((1, 1), (97, 32), (1000, 7), (31, 32)):
        sizes = steps.call_sizes(n, s)
        assert sum(sizes) == n and max(sizes) <= s and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-n // s)


def test_the_cpu_step_program_has_its_own_options_and_makes_the_same_updates(monkeypatch):
    """On a CPU the train step compiles with CPU_STEP_OPTIONS (no YNNPACK fusion left in it) and
    takes the steps of the same program compiled with XLA's defaults, to fp32 rounding; GPU and
    TPU programs keep XLA's defaults."""
    from dwjax.model import autoencoder
    from dwjax.model import mesh as mesh_lib

    cfg = small_config()
    mesh = mesh_lib.data_mesh()
    graphdef, params = autoencoder.init_params(5, cfg.model.hidden, cfg.model.negative_slope, 0)
    tx = steps.make_optimizer(cfg, 10)
    kernels = np.random.default_rng(0).normal(size=(6, 64, 5, 5)).astype(np.float32)
    batches = jax.device_put(kernels, mesh_lib.steps_sharded(mesh))

    def train_six(make):
        fresh = jax.tree.map(np.array, params)  # the steps donate their inputs
        f = make(graphdef, tx, mesh)
        text = f.lower(fresh, jax.jit(tx.init)(fresh), batches).compile().as_text()
        p, _, losses = f(fresh, jax.jit(tx.init)(fresh), batches)
        return text, np.asarray(losses), np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])

    assert steps.step_compiler_options(mesh) == steps.CPU_STEP_OPTIONS
    ours_text, ours, ours_params = train_six(steps.make_train_steps)
    monkeypatch.setattr(steps, "step_compiler_options", lambda mesh: None)
    plain_text, plain, plain_params = train_six(steps.make_train_steps)
    assert "__ynn_fusion" not in ours_text and ours_text != plain_text
    np.testing.assert_allclose(ours, plain, rtol=1e-5)
    np.testing.assert_allclose(ours_params, plain_params, rtol=1e-4, atol=1e-6)
    assert ours[-1] < ours[0]

    class Device:
        platform = "tpu"

    tpu_mesh = type("Mesh", (), {"devices": np.array([Device()])})()
    assert steps.step_compiler_options(tpu_mesh) is None


def test_mismatched_and_corrupt_checkpoints_are_refused(proto_dir, tmp_path):
    d = proto_dir[0]
    wd = str(tmp_path / "w")
    train.run(small_config(num_epochs=2), wd, d, log=lambda *_: None)
    # another architecture, through the command line: one line, non-zero exit
    p = run_module("dwjax.train", "--kernel_size=5", f"--data_dir={d}", f"--workdir={wd}",
                   "--config.model.hidden=(64,32,16,8)", "--config.num_epochs=3")
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "config.json" in p.stderr and "hidden" in p.stderr
    # the same refusal from the checkpoint itself when config.json is gone
    os.remove(os.path.join(wd, "config.json"))
    c = small_config(num_epochs=3)
    c.model.hidden = (64, 32, 16, 8)
    with pytest.raises(CheckpointError, match="checkpoint is for"):
        train.run(c, wd, d, log=lambda *_: None)
    # corrupt the array data of the latest checkpoint
    ckpt = os.path.join(wd, "checkpoints")
    latest = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
    for root, _, files in os.walk(os.path.join(ckpt, str(latest), "params")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    p = run_module("dwjax.train", "--kernel_size=5", f"--data_dir={d}", f"--workdir={wd}",
                   "--config.batch_size=64", "--config.num_epochs=3")
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "corrupt checkpoint" in p.stderr, p.stderr[-500:]


def test_default_run_makes_the_updates_of_a_plain_pytorch_loop(default_run_k5, embedded_dir,
                                                               tmp_path):
    """The port is faithful: from the same initial weights and batches, a plain torch loop with the
    default config's network, optimizer and schedule takes the same steps (losses equal to fp32
    rounding until chaos amplifies it, after a few dozen steps); and the default run trains."""
    torch = pytest.importorskip("torch")
    from dwjax.io import shards
    from dwjax.model import autoencoder, dataset
    from dwjax.perf import torch_autoencoder

    torch.set_num_threads(2)
    assert default_run_k5.eval_loss < 0.2
    cfg = train_configs.get_config("5")
    cfg.num_epochs = 2  # a short schedule, both sides: its warm-up and decay still run
    w = str(tmp_path / "w")
    train.run(cfg, w, embedded_dir, log=lambda *_: None)
    with open(os.path.join(w, "metrics.jsonl")) as f:
        ours = [r["loss"] for r in map(json.loads, f) if "loss" in r and "step" in r]
    kernels = np.concatenate([s.kernels for s in shards.iter_shards(embedded_dir, 5)])
    coords = torch_autoencoder.embed_live(kernels)
    assert len(coords) == default_run_k5.num_kernels == 23854  # 23,856 5×5 minus 2 dead channels
    _, init = autoencoder.init_params(5, cfg.model.hidden, cfg.model.negative_slope, cfg.seed)
    steps = 30
    theirs = torch_autoencoder.train(
        coords, cfg.num_epochs, cfg.batch_size, cfg.learning_rate, cfg.warmup_epochs,
        cfg.end_learning_rate_fraction, max_steps=steps, variant="eager_fused_adam", init=init,
        epoch_order=lambda e: dataset.epoch_order(cfg.seed, e, len(coords))).losses
    assert len(ours) == 2 * (23854 // 256) and len(theirs) == steps
    np.testing.assert_allclose(ours[:steps], theirs, rtol=1e-5)
    assert theirs[-1] < 0.9 * theirs[0]  # and the steps compared do train


def test_torch_yardstick_variants_make_the_same_updates():
    """The bench's PyTorch variants differ in speed only: fused Adam's parameters after 30 steps
    equal the default Adam's to float32 rounding (torch.compile's, slow to compile, in the
    bench)."""
    torch = pytest.importorskip("torch")
    from dwjax.perf import torch_autoencoder

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    runs = {v: torch_autoencoder.train(x, 2, 64, 3e-3, max_steps=30, variant=v)
            for v in ("eager", "eager_fused_adam")}
    a, b = (torch.cat([p.detach().flatten() for p in r.model.parameters()])
            for r in runs.values())
    assert float((a - b).abs().max()) < 1e-5
    assert abs(runs["eager"].mean_loss - runs["eager_fused_adam"].mean_loss) < 1e-5
    with pytest.raises(ValueError, match="variant"):
        torch_autoencoder.train(x, 1, 64, 3e-3, variant="jit")


def test_two_processes_match_one_process(proto_dir, tmp_path):
    """Multi-host: two local processes (jax.distributed + gloo) train like one process with 2
    devices."""
    import socket

    d = proto_dir[0]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = ["-m", "dwjax.train", "--kernel_size=5", f"--data_dir={d}", "--config.batch_size=64",
              "--config.num_epochs=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Output to files, not pipes: a full pipe would block one process inside a collective, and the
    # other with it.
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *common,
                f"--workdir={tmp_path / 'multi'}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    for p in procs:
        p.wait(timeout=300)
    outs = [(open(tmp_path / f"proc{i}.log").read(),) for i in range(2)]
    assert all(p.returncode == 0 for p in procs), outs[0][0][-2000:]
    single = subprocess.run(
        [sys.executable, *common, f"--workdir={tmp_path / 'single'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    )
    assert single.returncode == 0, single.stderr[-2000:]
    assert "2 device(s)" in outs[0][0] and "2 device(s)" in single.stdout

    def losses(w):
        return [
            json.loads(l)["loss"] for l in open(tmp_path / w / "metrics.jsonl") if '"loss"' in l
        ]

    assert len(losses("multi")) == 2 * (2400 // 64)
    np.testing.assert_allclose(losses("multi"), losses("single"), rtol=2e-4, atol=2e-5)

    # each host reads only its own half of every batch (training and evaluation alike)
    def rows_read(text, pid):
        (line,) = [l for l in text.splitlines() if l.startswith(f"process {pid} read ")]
        return int(line.split()[3].replace(",", ""))

    single_rows = rows_read(single.stdout, 0)
    assert single_rows == 2 * (2400 // 64) * 64 + 2400  # every training batch, then one eval pass
    assert rows_read(outs[0][0], 0) == rows_read(outs[1][0], 1) == single_rows // 2
