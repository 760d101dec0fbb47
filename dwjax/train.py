"""Stage 2: train the 1-D-code autoencoder.  `python -m dwjax.train --kernel_size=5`

Drives dwjax.model.steps (the jitted, data-parallel math) over memmapped shards
(dwjax.model.dataset), with checkpoints (dwjax.io.run_checkpoints), curves (dwjax.io.metrics) and
config.json (dwjax.io.workdir). Resumes from the run directory's latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dwjax import cli
from dwjax.errors import ConfigError, UserError
from dwjax.io import locks, metrics, paths, run_checkpoints
from dwjax.io import workdir as workdir_lib
from dwjax.model import autoencoder as model_lib
from dwjax.model import dataset as dataset_lib
from dwjax.model import mesh as mesh_lib
from dwjax.model import steps


@dataclasses.dataclass
class TrainResult:
    model: model_lib.Autoencoder   # trained, ready for encode/decode
    params: dict                   # pure-dict parameters (host arrays)
    workdir: str
    eval_loss: float               # mean cosine dissimilarity over every valid kernel
    num_kernels: int
    num_dropped: int
    rows_read: int                 # kernels this process read from the shards (its batch slices)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
                       log: Callable[[str], None] = print,
                       stop_after_epochs: int | None = None) -> TrainResult:
    """Trains (resuming from `workdir`'s latest checkpoint if any) and evaluates; the notebook API.

    `stop_after_epochs` ends the run early without a final save (tests use it to simulate a kill).
    """
    # Everything a user can get wrong is checked before the run directory is touched.
    steps.validate_config(config)
    run = workdir_lib.RunDir(workdir)
    workdir_lib.check_architecture(run, workdir_lib.architecture(config))
    mesh = mesh_lib.data_mesh()
    dataset = dataset_lib.KernelDataset(data_dir, config.kernel_size)
    steps.check_fits(config, mesh.devices.size, len(dataset))
    workdir_lib.ensure_dir(run)
    # One training per run directory: a second is refused (a killed one's lock is gone with it).
    # Every process of a multi-host job shares the directory, so process 0 alone holds it.
    lock = (locks.exclusive(run.lock, "training", wait=False) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _train(config, run, dataset, mesh, log, stop_after_epochs)


def _train(config: ml_collections.ConfigDict, run: workdir_lib.RunDir,
           dataset: dataset_lib.KernelDataset, mesh, log: Callable[[str], None],
           stop_after_epochs: int | None) -> TrainResult:
    arch = workdir_lib.architecture(config)
    workdir_lib.check_architecture(run, arch)  # again: another run may have finished meanwhile
    steps_per_epoch = len(dataset) // config.batch_size
    graphdef, params = model_lib.init_params(config.kernel_size, config.model.hidden,
                                             config.model.negative_slope, config.seed)
    tx = steps.make_optimizer(config, steps_per_epoch)
    opt_state = tx.init(params)
    mngr = run_checkpoints.manager(run.checkpoints, config.max_to_keep)
    restored, restored_opt, meta = run_checkpoints.restore_latest(mngr, params, opt_state, arch)
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
    with metrics.MetricsWriter(run.metrics_jsonl, run.tensorboard, resume_step, primary) as out:
        for epoch in range(start_epoch, config.num_epochs):
            t0 = time.perf_counter()
            losses = []
            batches = [b for _, b in dataset.epoch_batches(epoch, config.seed, config.batch_size)]
            for a in range(0, len(batches), config.steps_per_call):
                # Every host draws the same global batches and reads only its slice of each
                # (sorted first, so the slices are those of the sorted global batch).
                stack = np.sort(np.stack(batches[a:a + config.steps_per_call]), axis=-1)
                kernels = dataset.gather(stack[:, rows])
                params, opt_state, loss = step_fn(params, opt_state,
                                                  mesh_lib.shard_steps(mesh, kernels))
                losses.append(loss)
            losses = np.concatenate(jax.device_get(losses)).astype(np.float64)
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
                run_checkpoints.save(mngr, step, params, opt_state,
                                     {"architecture": arch, "epoch": epoch + 1, "step": step})
                if primary:  # a kill between the two writes leaves model.npz stale: not used then
                    run_checkpoints.save_inference(run.model_npz, params, arch, step)
            if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and not done:
                break
    mngr.wait_until_finished()
    mngr.close()
    eval_loss = steps.evaluate(graphdef, params, dataset, config.eval_batch_size, mesh)
    log(f"process {jax.process_index()} read {dataset.rows_read:,} kernel rows from the shards")
    params = jax.device_get(params)
    return TrainResult(model_lib.merge(graphdef, params), params, run.path, eval_loss,
                       len(dataset), dataset.num_dropped, dataset.rows_read)


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


def define_flags(kernel_size: int) -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_string("data_dir", None,
                        "Kernel shards (default: the embedded default, converted if missing).")
    flags.DEFINE_string("workdir", None, "Run directory (default $DWJAX_HOME/runs/k<k>).")
    config_flags.DEFINE_config_file("config", paths.train_config_file(kernel_size),
                                    "Train config file (default configs/train.py:<kernel_size>).")
    cli.define_distributed_flags()


def main(argv):
    del argv
    cli.setup()
    with cli.user_errors("train"):
        cli.init_distributed()
        config = FLAGS.config
        if FLAGS.kernel_size is not None and config.kernel_size != FLAGS.kernel_size:
            raise ConfigError(f"--kernel_size {FLAGS.kernel_size} disagrees with "
                              f"--config.kernel_size {config.kernel_size}")
        workdir = FLAGS.workdir or paths.default_workdir(config.kernel_size)
        result = train_and_evaluate(config, workdir, cli.data_dir_or_default(FLAGS.data_dir))
    print(f"done: mean cosine dissimilarity {result.eval_loss:.4f} over {result.num_kernels:,} "
          f"kernels; run in {workdir}")


def run() -> None:
    # --kernel_size picks the config file's argument (configs/train.py:K), so it is parsed, by
    # absl, before the --config flag is defined with that default.
    flags.DEFINE_integer(
        "kernel_size", None, "Kernel size k; picks configs/train.py:k (default 5).", lower_bound=2
    )
    try:
        FLAGS(sys.argv, known_only=True)
    except flags.Error as e:
        cli.fail("train", str(e), 1)
    kernel_size = FLAGS.kernel_size or 5
    FLAGS.unparse_flags()  # app.run parses everything once more, the config flag included
    try:  # config_flags reads the --config.<field> overrides in sys.argv as it is defined
        define_flags(kernel_size)
    except (AttributeError, KeyError):
        cli.fail("train", _unknown_field(sys.argv, kernel_size), 1)

    def parse(argv: list[str]) -> list[str]:
        try:
            return FLAGS(argv)
        except flags.Error as e:
            cli.fail("train", str(e), 1)
        except (AttributeError, KeyError):  # ml_collections: an unknown --config.<field>
            cli.fail("train", _unknown_field(argv, kernel_size), 1)

    app.run(main, flags_parser=parse)


def _unknown_field(argv: list[str], kernel_size: int) -> str:
    """The first `--config.<field>` the config does not have, with the nearest known names."""
    from dwjax.configs import train as train_configs

    def fields(d, prefix=""):
        for key, value in d.items():
            yield prefix + key
            if isinstance(value, ml_collections.ConfigDict):
                yield from fields(value, f"{prefix}{key}.")

    known = list(fields(train_configs.get_config(str(kernel_size))))
    for arg in argv[1:]:
        if arg.startswith("--config."):
            name = arg[len("--config."):].split("=", 1)[0]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=2)
                hint = f" (did you mean {' or '.join('--config.' + c for c in close)}?)"
                return f"--config.{name}: unknown config field{hint if close else ''}"
    return "--config: unknown config field"


if __name__ == "__main__":
    run()
