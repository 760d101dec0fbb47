"""The autoencoder's training math: config checks, optimizer, loss, the jitted multi-step update
and evaluation. Pure functions of arrays; the train stage drives them and does all IO.

Data-parallel over every device of every host: each global batch is sharded along the mesh's
"data" axis, parameters and optimizer state are replicated, and the jitted step's gradient mean is
the all-reduce. The same code runs on one CPU, 8 TPU cores or several hosts.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dwjax.errors import ConfigError
from dwjax.model import (
    autoencoder as model_lib,
)
from dwjax.model import (
    dataset as dataset_lib,
)
from dwjax.model import (
    mesh as mesh_lib,
)
from dwjax.model import (
    preprocess,
)

# XLA:CPU options of the training step's program, and of no other: YNNPACK fusions off (this
# network's batch-256 GEMMs run faster as XLA's own dots, while the nearest-code search's larger
# ones run faster in YNNPACK) and copy insertion's region analysis (drops the scan's per-step
# copies of the carry). The same math at full float32 (BUILD_NOTES, "Autoencoder": "The step's
# own XLA:CPU options").
CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                    "xla_cpu_copy_insertion_use_region_analysis": True}

_POSITIVE_INTS = ("batch_size", "num_epochs", "steps_per_call", "checkpoint_every_epochs",
                  "max_to_keep", "eval_batch_size")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuses values that cannot train, before anything is written (one line naming the field)."""
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"--config.{name} {config[name]!r}: {why}")

    for name in _POSITIVE_INTS:
        if not isinstance(config[name], int) or config[name] < 1:
            raise bad(name, "must be an integer of at least 1")
    if not isinstance(config.kernel_size, int) or config.kernel_size < 2:
        raise bad("kernel_size", "must be an integer of at least 2")
    if not isinstance(config.seed, int) or config.seed < 0:
        raise bad("seed", "must be a non-negative integer")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise bad("learning_rate", "must be a finite positive number")
    for name, lo, hi in (("warmup_epochs", 0, math.inf), ("end_learning_rate_fraction", 0, 1),
                         ("weight_decay", 0, math.inf)):
        if not (math.isfinite(config[name]) and lo <= config[name] <= hi):
            raise bad(name, f"must be a finite number in [{lo}, {hi}]")
    hidden = config.model.hidden
    if (not isinstance(hidden, (tuple, list)) or not hidden
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)):
        raise ConfigError(f"--config.model.hidden {hidden!r}: must be a non-empty list of "
                          "positive integers")
    slope = config.model.negative_slope
    if not math.isfinite(slope):
        raise ConfigError(f"--config.model.negative_slope {slope!r}: must be finite")
    if config.schedule not in ("cosine", "constant"):
        raise bad("schedule", "expected cosine or constant")
    if config.optimizer not in ("adam", "adamw", "sgd"):
        raise bad("optimizer", "expected adam, adamw or sgd")


def check_fits(config: ml_collections.ConfigDict, num_devices: int, num_kernels: int) -> None:
    """Refuses a batch the devices cannot split or the data cannot fill."""
    if config.batch_size % num_devices:
        raise ConfigError(f"--config.batch_size {config.batch_size}: not divisible by the "
                          f"{num_devices} devices")
    if num_kernels < config.batch_size:
        raise ConfigError(f"--config.batch_size {config.batch_size}: larger than the "
                          f"{num_kernels} usable kernels")


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    total = max(1, int(config.num_epochs * steps_per_epoch))
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup, total,
            config.learning_rate * config.end_learning_rate_fraction)
    else:
        lr = config.learning_rate
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.sgd(lr, momentum=0.9)


def loss_fn(graphdef, params, kernels):
    """Mean cosine dissimilarity between kernels `[B, k, k]` and their reconstructions (scalar)."""
    coords = preprocess.embed(kernels)
    recon = model_lib.merge(graphdef, params)(coords)
    return jnp.mean(preprocess.cosine_dissimilarity(coords, recon))


def make_train_steps(graphdef, tx, mesh):
    """`(params, opt_state, kernels [S, B, k, k]) → (params, opt_state, losses [S])`: S optimizer
    steps in one jitted call (a `lax.scan`), each on one global batch sharded along B.

    The network is tiny (~100 k parameters), so a step is little math, and a call per step would
    spend about as long again in dispatch and host-to-device copies. Scanning S steps per call
    amortises both and computes exactly the same sequence of updates.
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

    return jax.jit(run, in_shardings=(rep, rep, steps), out_shardings=(rep, rep, rep),
                   donate_argnums=(0, 1), compiler_options=step_compiler_options(mesh))


def step_compiler_options(mesh) -> dict | None:
    """CPU_STEP_OPTIONS on a CPU mesh; None (XLA's defaults) on GPU and TPU."""
    return dict(CPU_STEP_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def call_sizes(steps_per_epoch: int, steps_per_call: int) -> list[int]:
    """The steps of each jitted call of an epoch: as few calls of at most `steps_per_call` as
    cover it, sizes as even as possible (at most two sizes, so two compiled programs; one when
    they divide evenly, e.g. 93 steps as 3 × 31, not 32 + 32 + 29). The same updates whatever
    the cut: the scan runs the steps in order."""
    n = -(-steps_per_epoch // steps_per_call)
    q, r = divmod(steps_per_epoch, n)
    return [q + 1] * r + [q] * (n - r)


def host_rows(global_rows: int) -> slice:
    """This process's slice of every global batch of `global_rows` rows."""
    local = global_rows // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def evaluate(graphdef, params, dataset: dataset_lib.KernelDataset, batch_size: int, mesh) -> float:
    """Mean dissimilarity over every valid kernel (padding masked out); each host reads only its
    own rows of every batch."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    batch_size = min(batch_size, -(-len(dataset) // n_dev) * n_dev)  # no bigger than the data needs

    @jax.jit
    def batch_sum(params, kernels, weight):
        coords = preprocess.embed(kernels)
        recon = model_lib.merge(graphdef, params)(coords)
        return jnp.sum(preprocess.cosine_dissimilarity(coords, recon) * weight)

    part = host_rows(batch_size)
    total = 0.0
    for index in dataset.all_batches(batch_size):
        weight = np.ones(batch_size, np.float32)
        if len(index) < batch_size:  # pad to one compiled shape; the pad rows weigh 0
            weight[len(index):] = 0
            # the last (largest) index: the batch stays sorted, so the pad rows stay at the end
            index = np.concatenate([index, np.repeat(index[-1:], batch_size - len(index))])
        kernels = dataset.gather(index[part])
        total += float(batch_sum(params, mesh_lib.shard_batch(mesh, kernels),
                                 mesh_lib.shard_batch(mesh, weight[part])))
    return total / len(dataset)
