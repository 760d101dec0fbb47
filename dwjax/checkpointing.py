"""orbax-checkpoint wrapper: periodic saves with max-to-keep, resume from the latest, and refusal of a
checkpoint that belongs to another kernel size or architecture.

`<workdir>/checkpoints/<step>/state` holds `{'params', 'opt_state'}`; `.../meta` (JSON) holds the
architecture, step and epoch, so a mismatch is found before any array is read.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The workdir's checkpoint cannot be restored into this config (one-line message)."""


def manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    path = os.path.join(str(mngr.directory), str(step))
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointMismatch(f"{path}: corrupt checkpoint (metadata unreadable: {type(e).__name__})")


def restore_latest(mngr: ocp.CheckpointManager, target: Any, architecture: dict):
    """Returns `(state, meta)` of the newest checkpoint, or `(None, None)` when there is none.

    Raises CheckpointMismatch when its architecture differs from `architecture` or it is unreadable.
    """
    step = mngr.latest_step()
    if step is None:
        return None, None
    path = os.path.join(str(mngr.directory), str(step))
    meta = read_meta(mngr, step)
    if meta.get("architecture") != architecture:
        raise CheckpointMismatch(
            f"{path}: checkpoint is for {json.dumps(meta.get('architecture'))}, this run is "
            f"{json.dumps(architecture)}; use another --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:
        raise CheckpointMismatch(f"{path}: corrupt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
    return restored.state, meta
