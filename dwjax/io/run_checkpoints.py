"""The run's own checkpoints (orbax): periodic saves with max-to-keep, resume from the latest, a
parameters-only restore for inference, and refusal of a checkpoint that belongs to another
architecture or whose arrays changed on disk.

`<checkpoints>/<step>/` holds three orbax items: `params` and `opt_state` (StandardSave, apart so
inference restores the parameters without building an optimizer) and `meta` (JSON: architecture,
epoch, step and the sha256 of each array item, so a mismatch or a corrupted array is found before
the state is used).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import typing
import zipfile
from typing import Any

import jax
import numpy as np

from dwjax.errors import CheckpointError
from dwjax.io import atomic

if typing.TYPE_CHECKING:
    import orbax.checkpoint as ocp


def _ocp():
    # Imported when a checkpoint is written or read through orbax: inference from model.npz
    # (the usual spectrum/assign path) never pays for importing it.
    import orbax.checkpoint

    return orbax.checkpoint


def digest(tree: Any) -> str:
    """sha256 of a pytree's leaves (shapes, dtypes and bytes, in tree order)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def manager(directory: str, max_to_keep: int = 1, create: bool = True) -> ocp.CheckpointManager:
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    ocp = _ocp()
    meta = dict(meta, params_sha256=digest(params), opt_state_sha256=digest(opt_state))
    args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                              opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.JsonSave(meta))
    mngr.save(step, args=args, force=True)


def _path(mngr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(mngr.directory), str(step))


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its unfinished tasks end before it closes.

    orbax runs each restore in a fresh loop and closes it as soon as one read fails; the reads
    still in flight then complete into the closed loop, and tensorstore's threads print
    `RuntimeError: Event loop is closed` tracebacks. Cancelling them is not enough (tensorstore
    still calls back when the read ends), so they are awaited. Where orbax cancels every task
    before closing (orbax-checkpoint 0.11, through `asyncio.run`), nothing is left to await and
    the late callbacks arrive after the close: they are dropped, since nothing waits for them.
    """

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _draining_loops():
    """The loops orbax makes meanwhile are `_DrainingLoop`s: a failed restore leaves no read
    behind to write into stderr after the one-line error."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _read_meta(mngr: ocp.CheckpointManager, step: int, architecture: dict) -> dict:
    path = _path(mngr, step)
    ocp = _ocp()
    try:
        with _draining_loops():
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(
            f"{path}: corrupt checkpoint (metadata unreadable: {type(e).__name__})"
        )
    if not isinstance(meta, dict) or "params_sha256" not in meta:
        raise CheckpointError(
            f"{path}: not a checkpoint of this dwjax version (no parameter digest); "
            "train again in another --workdir"
        )
    if meta.get("architecture") != architecture:
        raise CheckpointError(
            f"{path}: checkpoint is for {json.dumps(meta.get('architecture'))}, this run is "
            f"{json.dumps(architecture)}; use another --workdir")
    return meta


def _restore(mngr: ocp.CheckpointManager, step: int, meta: dict, targets: dict) -> dict:
    """Restores the named items against their abstract targets and checks each digest."""
    path = _path(mngr, step)
    # Host arrays as targets: every process restores the full (replicated) values itself, with no
    # sharding to agree on; callers put them on devices.
    host = {k: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), v) for k, v in targets.items()}
    ocp = _ocp()
    args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in host.items()})
    try:
        with _draining_loops():
            restored = mngr.restore(step, args=args)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({_first_line(e)})")
    out = {}
    for name in targets:
        tree = restored[name]
        if digest(tree) != meta.get(f"{name}_sha256"):
            raise CheckpointError(f"{path}: corrupt checkpoint ({name} do not match their digest)")
        out[name] = tree
    return out


def restore_latest(mngr: ocp.CheckpointManager, params: Any, opt_state: Any, architecture: dict):
    """`(params, opt_state, meta)` of the newest checkpoint, or `(None, None, None)` if there is
    none.

    `params` and `opt_state` are targets (arrays or shape/dtype structs) giving the tree structure.
    Raises CheckpointError when the checkpoint is for another architecture or is corrupt.
    """
    step = mngr.latest_step()
    if step is None:
        return None, None, None
    meta = _read_meta(mngr, step, architecture)
    state = _restore(mngr, step, meta, {"params": params, "opt_state": opt_state})
    return state["params"], state["opt_state"], meta


def restore_params(directory: str, params: Any, architecture: dict):
    """`(params, meta)` of the newest checkpoint in `directory` for inference (no optimizer state
    is read), or `(None, None)` when there is none."""
    if not os.path.isdir(directory):
        return None, None
    mngr = manager(directory, create=False)
    try:
        step = mngr.latest_step()
        if step is None:
            return None, None
        meta = _read_meta(mngr, step, architecture)
        return _restore(mngr, step, meta, {"params": params})["params"], meta
    finally:
        mngr.close()


# ----------------------------------------------------------------------------- model.npz
def save_inference(path: str, params: Any, architecture: dict, step: int) -> None:
    """The trained parameters alone, for inference (spectrum, assign): the leaves in tree order,
    with the architecture, step and digest they must match."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(params))]
    meta = json.dumps({"architecture": architecture, "step": int(step),
                       "params_sha256": digest(params)})
    atomic.save_npz(path, meta=np.array(meta), **{f"leaf_{i:03d}": a for i, a in enumerate(leaves)})


def latest_step(directory: str) -> int | None:
    """The newest checkpoint step in `directory`, from its folder names (no orbax)."""
    try:
        steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return max(steps, default=None)


def load_inference(path: str, abstract: Any, architecture: dict, step: int | None):
    """Parameters from `save_inference`'s file, shaped like `abstract`; None when the file is
    missing or older than checkpoint `step` (a run killed between the two writes). Raises
    CheckpointError when it is for another architecture or does not match its digest."""
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            leaves = [z[f"leaf_{i:03d}"] for i in range(len(jax.tree.leaves(abstract)))]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt ({type(e).__name__}: {e}); delete it to use the "
                              "orbax checkpoint")
    if meta.get("architecture") != architecture:
        raise CheckpointError(f"{path}: parameters are for {json.dumps(meta.get('architecture'))}, "
                              f"this run is {json.dumps(architecture)}")
    if step is not None and meta.get("step") != step:
        return None
    params = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
    if digest(params) != meta.get("params_sha256"):
        raise CheckpointError(f"{path}: corrupt (parameters do not match their digest)")
    return params
