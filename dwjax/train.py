"""Stage 2: train the 1-D-code autoencoder.  `python -m dwjax.train --kernel_size=5`

Drives dwjax.model.steps (the jitted, data-parallel math) over memmapped shards
(dwjax.model.dataset), with checkpoints (dwjax.io.run_checkpoints), curves (dwjax.io.metrics) and
config.json (dwjax.io.workdir). Resumes from the run directory's latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import flags

from dwjax import cli, runtime
from dwjax.errors import ConfigError, UserError
from dwjax.io import locks, metrics, paths, run_checkpoints, sources
from dwjax.io import workdir as workdir_lib
from dwjax.model import autoencoder as model_lib
from dwjax.model import dataset as dataset_lib
from dwjax.model import mesh as mesh_lib
from dwjax.model import steps


# Calls dispatched ahead of the one the host waits for: enough to keep the device fed while the
# host reads the next stack, few enough that memory does not grow with the epoch.
IN_FLIGHT = 2


@dataclasses.dataclass
class TrainResult:
    model: model_lib.Autoencoder   # trained, ready for encode/decode
    params: dict                   # pure-dict parameters (host arrays)
    workdir: str
    eval_loss: float               # mean cosine dissimilarity over every valid kernel
    num_kernels: int
    num_dropped: int
    rows_read: int                 # kernels this process read from the shards (its batch slices)


def run(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None, *,
        log: Callable[[str], None] = print, stop_after_epochs: int | None = None) -> TrainResult:
    """Trains (resuming from `workdir`'s latest checkpoint if any) and evaluates; the notebook API.

    `stop_after_epochs` ends the run early without a final save (tests use it to simulate a kill).
    """
    # Everything a user can get wrong is checked before the run directory is touched.
    steps.validate_config(config)
    rundir = workdir_lib.RunDir(workdir)
    workdir_lib.check_architecture(rundir, workdir_lib.architecture(config))
    mesh = mesh_lib.data_mesh()
    dataset = dataset_lib.KernelDataset(sources.data_dir_or_default(data_dir, log),
                                        config.kernel_size)
    steps.check_fits(config, mesh.devices.size, len(dataset))
    workdir_lib.ensure_dir(rundir)
    # One training per run directory: a second is refused (a killed one's lock is gone with it).
    # Every process of a multi-host job shares the directory, so process 0 alone holds it.
    lock = (locks.exclusive(rundir.lock, "training", wait=False) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _train(config, rundir, dataset, mesh, log, stop_after_epochs)


def _train(config: ml_collections.ConfigDict, run: workdir_lib.RunDir,
           dataset: dataset_lib.KernelDataset, mesh, log: Callable[[str], None],
           stop_after_epochs: int | None) -> TrainResult:
    arch = workdir_lib.architecture(config)
    workdir_lib.check_architecture(run, arch)  # again: another run may have finished meanwhile
    steps_per_epoch = len(dataset) // config.batch_size
    graphdef, params = model_lib.init_params(config.kernel_size, config.model.hidden,
                                             config.model.negative_slope, config.seed)
    tx = steps.make_optimizer(config, steps_per_epoch)
    # one program (its compile cached), not an eager op per leaf, each compiled in every run
    opt_state = jax.jit(tx.init)(params)
    mngr = run_checkpoints.manager(run.checkpoints, config.max_to_keep)
    try:
        restored, restored_opt, meta = run_checkpoints.restore_latest(mngr, params, opt_state,
                                                                      arch)
        if meta is not None:
            _check_epochs_not_fewer(config, int(meta["epoch"]))
    except BaseException:
        mngr.close()  # a refused start leaves no orbax thread behind
        raise
    primary = jax.process_index() == 0  # one writer of the plain files, also on a shared filesystem
    if primary:
        workdir_lib.write_config(run, config, arch)  # only once the checkpoint is known to fit
    start_epoch, resume_step = 0, None
    if restored is not None:
        params, opt_state = restored, restored_opt
        start_epoch, resume_step = int(meta["epoch"]), int(meta["step"])
        log(f"resumed from {run.checkpoints}/{resume_step} (epoch {start_epoch})")
    rep = mesh_lib.replicated(mesh)
    params, opt_state = jax.device_put(params, rep), jax.device_put(opt_state, rep)
    step_fn = steps.make_train_steps(graphdef, tx, mesh)
    log(f"training k={config.kernel_size} on {len(dataset):,} kernels ({dataset.num_dropped} dead "
        f"dropped), {mesh.devices.size} device(s), batch {config.batch_size}, "
        f"{steps_per_epoch} steps/epoch")
    rows = steps.host_rows(config.batch_size)
    calls = steps.call_sizes(steps_per_epoch, config.steps_per_call)
    with metrics.MetricsWriter(run.metrics_jsonl, run.tensorboard, resume_step, primary) as out:
        for epoch in range(start_epoch, config.num_epochs):
            t0 = time.perf_counter()
            losses = []
            batches = [b for _, b in dataset.epoch_batches(epoch, config.seed, config.batch_size)]
            a = 0
            for size in calls:
                # Every host draws the same global batches and reads only its slice of each
                # (sorted first, so the slices are those of the sorted global batch).
                stack = np.sort(np.stack(batches[a:a + size]), axis=-1)
                a += size
                kernels = dataset.gather(stack[:, rows])
                params, opt_state, loss = step_fn(params, opt_state,
                                                  mesh_lib.shard_steps(mesh, kernels))
                losses.append(loss)
                if len(losses) > IN_FLIGHT:
                    # dispatch is asynchronous: unchecked, the host would queue the whole
                    # epoch's batches on the device's queue (memory growing with the data)
                    losses[-1 - IN_FLIGHT].block_until_ready()
            losses = np.concatenate(jax.device_get(losses)).astype(np.float64)
            dataset.release_pages()
            _check_finite(losses, epoch * steps_per_epoch, config)  # before any checkpoint
            rate = steps_per_epoch * config.batch_size / (time.perf_counter() - t0)
            step = (epoch + 1) * steps_per_epoch
            for i, loss in enumerate(losses):
                out.write({"step": epoch * steps_per_epoch + i + 1, "loss": float(loss)})
            out.write({"step": step, "epoch": epoch + 1, "epoch_loss": float(losses.mean()),
                       "kernels_per_s": rate})
            out.flush()
            log(f"epoch {epoch + 1:>4}/{config.num_epochs}  loss {losses.mean():.4f}  "
                f"{rate:,.0f} kernels/s")
            done = epoch + 1 == config.num_epochs
            if done or (epoch + 1) % config.checkpoint_every_epochs == 0:
                with runtime.interrupts_deferred():
                    run_checkpoints.save(mngr, step, params, opt_state,
                                         {"architecture": arch, "epoch": epoch + 1, "step": step})
                    if primary:  # a kill between the writes leaves model.npz stale: not used then
                        run_checkpoints.save_inference(run.model_npz, params, arch, step)
            if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and not done:
                break
    with runtime.interrupts_deferred():
        mngr.wait_until_finished()
        mngr.close()
    eval_loss = steps.evaluate(graphdef, params, dataset, config.eval_batch_size, mesh)
    log(f"process {jax.process_index()} read {dataset.rows_read:,} kernel rows from the shards")
    params = jax.device_get(params)
    return TrainResult(model_lib.merge(graphdef, params), params, run.path, eval_loss,
                       len(dataset), dataset.num_dropped, dataset.rows_read)


def _check_epochs_not_fewer(config: ml_collections.ConfigDict, trained: int) -> None:
    """Refuses a num_epochs below what the run has done: config.json would then claim less
    training than the checkpoint holds."""
    if config.num_epochs < trained:
        raise ConfigError(
            f"--config.num_epochs={config.num_epochs} is fewer than the {trained} epochs this run "
            f"has already trained; pass --config.num_epochs={trained} or more, or use another "
            "--workdir")


def _check_finite(losses: np.ndarray, first_step: int, config: ml_collections.ConfigDict) -> None:
    """Stops a diverged run before it checkpoints non-finite parameters."""
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
        raise TrainingDiverged(
            f"loss became {losses[bad[0]]} at step {first_step + bad[0] + 1}; nothing of this "
            f"epoch was saved (lower --config.learning_rate, now {config.learning_rate})")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_string("data_dir", None,
                        "Kernel shards (default: the embedded default, converted if missing).")
    flags.DEFINE_string("workdir", None, "Run directory (default $DWJAX_HOME/runs/k<k>).")
    runtime.define_distributed_flags()


def main(argv):
    del argv
    cli.setup()
    with cli.user_errors("train"):
        runtime.init_distributed()
        config = cli.stage_config()
        workdir = FLAGS.workdir or paths.default_workdir(config.kernel_size)
        result = run(config, workdir, FLAGS.data_dir)
    print(f"done: mean cosine dissimilarity {result.eval_loss:.4f} over {result.num_kernels:,} "
          f"kernels; run in {workdir}")


if __name__ == "__main__":
    cli.run_config_stage("train", main, define_flags, default_kernel_size=5)
