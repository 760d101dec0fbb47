"""One device mesh for data parallelism: axis "data" over every device of every process."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def local_mesh() -> Mesh:
    """This process's devices only: for work each process does on its own (assignment parts)."""
    return Mesh(np.array(jax.local_devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def steps_sharded(mesh: Mesh) -> NamedSharding:
    """`[S, B, ...]` stacks of batches: steps unsharded, each batch split along B."""
    return NamedSharding(mesh, P(None, "data"))


def shard_steps(mesh: Mesh, host_array: np.ndarray) -> jax.Array:
    """This process's rows `[S, B_local, ...]` of S global batches → a global `[S, B, ...]`
    array."""
    sharding = steps_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_array, sharding)
    return jax.make_array_from_process_local_data(sharding, host_array)


def shard_batch(mesh: Mesh, host_array: np.ndarray) -> jax.Array:
    """This process's rows of a global batch → a global array sharded along axis 0."""
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_array, sharding)
    return jax.make_array_from_process_local_data(sharding, host_array)
