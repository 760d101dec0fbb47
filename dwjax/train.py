"""Stage 2: train the 1-D-code autoencoder.  `python -m dwjax.train --kernel_size=5`

Data-parallel over every device of every host: the global batch is sharded along the mesh's "data"
axis, parameters and optimizer state are replicated, and the jitted step's gradient mean is the
all-reduce. The same code runs on one CPU, 8 TPU cores or several hosts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dwjax import checkpointing, data, mesh as mesh_lib, model as model_lib, paths, preprocess, shards, tb_events


class TrainError(ValueError):
    """Training cannot start (bad config, data, or workdir): one-line message."""


@dataclasses.dataclass
class TrainResult:
    model: model_lib.Autoencoder   # trained, ready for encode/decode
    params: dict                   # pure-dict parameters (host arrays)
    workdir: str
    eval_loss: float               # mean cosine dissimilarity over every valid kernel
    num_kernels: int
    num_dropped: int


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    total = max(1, int(config.num_epochs * steps_per_epoch))
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup, total, config.learning_rate * config.end_learning_rate_fraction)
    elif config.schedule == "constant":
        lr = config.learning_rate
    else:
        raise TrainError(f"--config.schedule {config.schedule!r}: expected cosine or constant")
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise TrainError(f"--config.optimizer {config.optimizer!r}: expected adam, adamw or sgd")


def loss_fn(graphdef, params, kernels):
    """Mean cosine dissimilarity between kernels `[B, k, k]` and their reconstructions (scalar)."""
    coords = preprocess.embed(kernels)
    recon = nnx.merge(graphdef, nnx.State(params))(coords)
    return jnp.mean(preprocess.cosine_dissimilarity(coords, recon))


def make_train_steps(graphdef, tx, mesh):
    """`(params, opt_state, kernels [S, B, k, k]) → (params, opt_state, losses [S])`: S optimizer steps
    in one jitted call (a `lax.scan`), each on one global batch sharded along B.

    The network is tiny (~100 k parameters), so one step is ~1 ms of math; a call per step would spend
    as long again in dispatch and host-to-device copies. Scanning S steps per call amortises both and
    computes exactly the same sequence of updates.
    """
    rep, steps = mesh_lib.replicated(mesh), mesh_lib.steps_sharded(mesh)

    def step(carry, kernels):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, kernels))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def run(params, opt_state, kernels):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), kernels)
        return params, opt_state, losses

    return jax.jit(run, in_shardings=(rep, rep, steps), out_shardings=(rep, rep, rep), donate_argnums=(0, 1))


def evaluate(graphdef, params, dataset: data.KernelDataset, batch_size: int, mesh) -> float:
    """Mean dissimilarity over every valid kernel (padding masked out)."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    batch_size = min(batch_size, -(-len(dataset) // n_dev) * n_dev)  # no bigger than the data needs

    @jax.jit
    def batch_sum(params, kernels, weight):
        coords = preprocess.embed(kernels)
        recon = nnx.merge(graphdef, nnx.State(params))(coords)
        return jnp.sum(preprocess.cosine_dissimilarity(coords, recon) * weight)

    pid, npro = jax.process_index(), jax.process_count()
    local = batch_size // npro
    total = 0.0
    for index in dataset.all_batches(batch_size):
        kernels = dataset.gather(index)
        weight = np.ones(batch_size, np.float32)
        if len(kernels) < batch_size:  # pad to one compiled shape; the pad rows weigh 0
            weight[len(kernels):] = 0
            kernels = np.concatenate([kernels, np.repeat(kernels[:1], batch_size - len(kernels), 0)])
        part = slice(pid * local, (pid + 1) * local)  # each host loads its slice of the global batch
        total += float(batch_sum(params, mesh_lib.shard_batch(mesh, kernels[part]),
                                 mesh_lib.shard_batch(mesh, weight[part])))
    return total / len(dataset)


def _check_config(config, n_dev: int, n_valid: int) -> None:
    for name in ("batch_size", "num_epochs", "steps_per_call", "checkpoint_every_epochs", "max_to_keep",
                 "eval_batch_size"):
        if int(config[name]) < 1:
            raise TrainError(f"--config.{name} {config[name]}: must be at least 1")
    if not config.learning_rate > 0:
        raise TrainError(f"--config.learning_rate {config.learning_rate}: must be positive")
    if config.batch_size % n_dev:
        raise TrainError(f"--config.batch_size {config.batch_size}: not divisible by the {n_dev} devices")
    if n_valid < config.batch_size:
        raise TrainError(f"--config.batch_size {config.batch_size}: larger than the {n_valid} usable kernels")


def _check_workdir(workdir: str, arch: dict) -> None:
    """Refuses a workdir trained with another kernel size or architecture, before anything is read."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError as e:
            raise TrainError(f"{path}: corrupt ({e})")
        if old.get("architecture") != arch:
            raise TrainError(f"{path}: workdir was trained with {json.dumps(old.get('architecture'))}, "
                             f"this config is {json.dumps(arch)}; use another --workdir")


def _write_config(workdir: str, config, arch: dict) -> None:
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"architecture": arch, "config": json.loads(config.to_json_best_effort())}, f, indent=1)
    os.replace(tmp, path)


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metric lines past the restored step, so a resumed run writes nothing twice."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by the kill
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                       log=print, stop_after_epochs: int | None = None) -> TrainResult:
    """Trains (resuming from `workdir`'s latest checkpoint if any) and evaluates; the notebook API.

    `stop_after_epochs` ends the run early without a final save (tests use it to simulate a kill).
    """
    arch = model_lib.architecture(config)
    _check_workdir(workdir, arch)
    mesh = mesh_lib.data_mesh()
    dataset = data.KernelDataset(data_dir, config.kernel_size)
    _check_config(config, mesh.devices.size, len(dataset))
    steps_per_epoch = len(dataset) // config.batch_size
    graphdef, params = model_lib.init_params(config.kernel_size, config.model.hidden, config.model.negative_slope,
                                             config.seed)
    tx = make_optimizer(config, steps_per_epoch)
    train_state = {"params": params, "opt_state": tx.init(params)}
    mngr = checkpointing.manager(workdir, config.max_to_keep)
    restored, meta = checkpointing.restore_latest(mngr, train_state, arch)
    primary = jax.process_index() == 0  # one writer of the plain files, also on a shared filesystem
    if primary:
        _write_config(workdir, config, arch)  # only once the workdir's checkpoint is known to fit
    start_epoch = 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if restored is not None:
        train_state, start_epoch = restored, int(meta["epoch"])
        log(f"resumed from {workdir}/checkpoints/{meta['step']} (epoch {start_epoch})")
        if primary:
            _truncate_metrics(metrics_path, int(meta["step"]))
    elif primary and os.path.exists(metrics_path):
        os.remove(metrics_path)
    rep = mesh_lib.replicated(mesh)
    params = jax.device_put(train_state["params"], rep)
    opt_state = jax.device_put(train_state["opt_state"], rep)
    step_fn = make_train_steps(graphdef, tx, mesh)
    log(f"training k={config.kernel_size} on {len(dataset):,} kernels ({dataset.num_dropped} dead dropped), "
        f"{mesh.devices.size} device(s), batch {config.batch_size}, {steps_per_epoch} steps/epoch")
    pid, npro = jax.process_index(), jax.process_count()
    local = config.batch_size // npro
    tb = tb_events.ScalarWriter(os.path.join(workdir, "tensorboard")) if primary else None
    with open(metrics_path if primary else os.devnull, "a") as metrics:
        for epoch in range(start_epoch, config.num_epochs):
            t0 = time.perf_counter()
            losses = []
            batches = [index for _, index in dataset.epoch_batches(epoch, config.seed, config.batch_size)]
            for a in range(0, len(batches), config.steps_per_call):
                # Every host draws the same global batches and loads its own slice of each.
                stack = np.stack(batches[a:a + config.steps_per_call])  # [S, B] global indices
                kernels = dataset.gather(stack)[:, pid * local:(pid + 1) * local]
                params, opt_state, loss = step_fn(params, opt_state, mesh_lib.shard_steps(mesh, kernels))
                losses.append(loss)
            losses = np.concatenate(jax.device_get(losses)).astype(np.float64)
            dt = time.perf_counter() - t0
            step = (epoch + 1) * steps_per_epoch
            if pid == 0:
                for i, l in enumerate(losses):
                    metrics.write(json.dumps({"step": epoch * steps_per_epoch + i + 1, "loss": float(l)}) + "\n")
                metrics.write(json.dumps({"step": step, "epoch": epoch + 1, "epoch_loss": float(losses.mean()),
                                          "kernels_per_s": steps_per_epoch * config.batch_size / dt}) + "\n")
                metrics.flush()
                for i in range(0, len(losses), max(1, len(losses) // 10)):  # ~10 points per epoch suffice
                    tb.scalar("train/loss", losses[i], epoch * steps_per_epoch + i + 1)
                tb.scalar("train/epoch_loss", losses.mean(), step)
                tb.scalar("train/kernels_per_s", steps_per_epoch * config.batch_size / dt, step)
                tb.flush()
            log(f"epoch {epoch + 1:>4}/{config.num_epochs}  loss {losses.mean():.4f}  "
                f"{steps_per_epoch * config.batch_size / dt:,.0f} kernels/s")
            done = epoch + 1 == config.num_epochs
            if done or (epoch + 1) % config.checkpoint_every_epochs == 0:
                checkpointing.save(mngr, step, {"params": params, "opt_state": opt_state},
                                   {"architecture": arch, "epoch": epoch + 1, "step": step})
            if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and not done:
                break
    mngr.wait_until_finished()
    mngr.close()
    if tb is not None:
        tb.close()
    eval_loss = evaluate(graphdef, params, dataset, config.eval_batch_size, mesh)
    params = jax.device_get(params)
    return TrainResult(nnx.merge(graphdef, nnx.State(params)), params, workdir, eval_loss,
                       len(dataset), dataset.num_dropped)


def load_trained(workdir: str):
    """`(model, config)` from a workdir's latest checkpoint (for spectrum and assign)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        config = ml_collections.ConfigDict(saved["config"])
        _ = (config.kernel_size, config.model.hidden)  # the fields every stage needs
    except FileNotFoundError:
        raise TrainError(f"--workdir {workdir}: no config.json (not a dwjax training run)")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise TrainError(f"{path}: corrupt ({type(e).__name__}: {e})")
    graphdef, params = model_lib.init_params(config.kernel_size, config.model.hidden, config.model.negative_slope,
                                             config.seed)
    mngr = checkpointing.manager(workdir, config.max_to_keep)
    tx = make_optimizer(config, 1)
    restored, _ = checkpointing.restore_latest(mngr, {"params": params, "opt_state": tx.init(params)},
                                               model_lib.architecture(config))
    mngr.close()
    if restored is None:
        raise TrainError(f"--workdir {workdir}: no checkpoint (train first)")
    return nnx.merge(graphdef, nnx.State(jax.device_get(restored["params"]))), config


# ----------------------------------------------------------------------------- command line
def quiet_logs() -> None:
    """orbax logs every save at INFO; keep the terminal to our progress lines unless -v was given."""
    from absl import logging

    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_integer("kernel_size", None, "Kernel size k; picks configs/train.py:k (default 5).")
    flags.DEFINE_string("data_dir", None, "Kernel shards (default: the embedded default, converted if missing).")
    flags.DEFINE_string("workdir", None, "Run directory (default $DWJAX_HOME/runs/k<k>).")
    config_flags.DEFINE_config_file("config", None, "Train config file (default configs/train.py:<kernel_size>).")
    flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first (auto-detects "
                      "Cloud TPU pods and SLURM; else give the three flags below).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detection).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def _ensure_default_data(data_dir: str) -> None:
    """The no-flag path: convert the embedded default first if its shards are missing."""
    try:
        shards.read_manifest(data_dir)
    except shards.ShardError:
        from dwjax import convert, sources

        print(f"no kernel shards in {data_dir}: converting the embedded default first")
        convert.convert(data_dir, sources.embedded_sources())


def main(argv):
    del argv
    quiet_logs()
    paths.enable_compilation_cache()
    if FLAGS.distributed or FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    if FLAGS.kernel_size is not None and config.kernel_size != FLAGS.kernel_size:
        sys.exit(f"train: --kernel_size {FLAGS.kernel_size} disagrees with --config.kernel_size {config.kernel_size}")
    workdir = FLAGS.workdir or paths.default_workdir(config.kernel_size)
    try:
        if FLAGS.data_dir is None:
            data_dir = paths.default_data_dir()
            _ensure_default_data(data_dir)
        else:
            data_dir = FLAGS.data_dir
        result = train_and_evaluate(config, workdir, data_dir)
    except (TrainError, data.DataError, shards.ShardError, checkpointing.CheckpointMismatch) as e:
        sys.exit(f"train: {e}")
    print(f"done: mean cosine dissimilarity {result.eval_loss:.4f} over {result.num_kernels:,} kernels; "
          f"run in {workdir}")


def run() -> None:
    # `--kernel_size=K` selects configs/train.py:K unless --config names a file itself.
    argv = sys.argv
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        k = "5"
        for i, a in enumerate(argv):
            if a.startswith("--kernel_size="):
                k = a.split("=", 1)[1]
            elif a == "--kernel_size" and i + 1 < len(argv):
                k = argv[i + 1]
        if not k.isdigit():
            sys.exit(f"train: --kernel_size {k}: not a positive integer")
        argv = [argv[0], f"--config={os.path.join(paths.configs_dir(), 'train.py')}:{k}"] + argv[1:]
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
