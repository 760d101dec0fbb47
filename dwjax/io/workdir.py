"""The run directory: the one owner of every path in it and of `config.json` (dwjax.model.restore
loads the trained model from it). Every stage asks here; none spells a run-directory path itself.

    <workdir>/config.json             {"architecture": {kernel_size, hidden, negative_slope},
                                       "config": the train config}
    <workdir>/checkpoints/<step>/     orbax: params, opt_state, meta (dwjax.io.run_checkpoints)
    <workdir>/model.npz               the newest checkpoint's parameters alone, for inference
    <workdir>/metrics.jsonl           training curves (dwjax.io.metrics), tensorboard/ beside it
    <workdir>/spectrum.npz            decoded codes (spectrum stage)
    <workdir>/labels.json             labelled code intervals (dwjax.patterns.labels)
    <workdir>/figures/                spectrum and template-bank figures
    <workdir>/kmeans_k<k>.npz         the 3×3 path's centroids
    <workdir>/assignments/            per-shard rows and statistics (dwjax.io.assignment_files)
    <workdir>/report/                 tables and figures (report stage)
    <workdir>/masterkeys/             master key filters and their rows (io.masterkey_files)
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from dwjax.errors import RunDirError
from dwjax.io import atomic


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created by building one)."""
    path: str

    @property
    def lock(self) -> str:
        """Held by a training run for its whole length (dwjax.io.locks)."""
        return os.path.join(self.path, ".lock")

    @property
    def config_json(self) -> str:
        return os.path.join(self.path, "config.json")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def model_npz(self) -> str:
        return os.path.join(self.path, "model.npz")

    @property
    def metrics_jsonl(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.path, "tensorboard")

    @property
    def spectrum_npz(self) -> str:
        return os.path.join(self.path, "spectrum.npz")

    @property
    def labels_json(self) -> str:
        return os.path.join(self.path, "labels.json")

    def figure(self, name: str) -> str:
        return os.path.join(self.path, "figures", name)

    def kmeans_npz(self, kernel_size: int) -> str:
        return os.path.join(self.path, f"kmeans_k{kernel_size}.npz")

    @property
    def assignments(self) -> str:
        return os.path.join(self.path, "assignments")

    @property
    def report(self) -> str:
        return os.path.join(self.path, "report")

    @property
    def masterkeys(self) -> str:
        """Master key filters: bank, coverage, rows (dwjax.io.masterkey_files)."""
        return os.path.join(self.path, "masterkeys")


def ensure_dir(run: RunDir) -> None:
    """Creates the run directory; one line when its path is not a writable directory."""
    try:
        os.makedirs(run.path, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"--workdir {run.path}: not a directory")
    except OSError as e:
        raise RunDirError(f"--workdir {run.path}: cannot create it ({e.strerror or e})")
    if not os.path.isdir(run.path):
        raise RunDirError(f"--workdir {run.path}: not a directory")
    if not os.access(run.path, os.W_OK):
        raise RunDirError(f"--workdir {run.path}: not writable")


def _read_saved(run: RunDir) -> dict | None:
    """config.json's content, or None when the file does not exist; one line when it is corrupt."""
    try:
        with open(run.config_json) as f:
            saved = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(f"{run.config_json}: corrupt ({type(e).__name__}: {e})")
    try:
        arch, config = saved["architecture"], saved["config"]
        k = config["kernel_size"]
        ok = (isinstance(k, int) and k >= 2 and arch.get("kernel_size") == k
              and isinstance(arch.get("hidden"), list) and config["model"]["hidden"] is not None)
    except (KeyError, TypeError, AttributeError) as e:
        raise RunDirError(f"{run.config_json}: corrupt (missing {e})")
    if not ok:
        raise RunDirError(f"{run.config_json}: corrupt (inconsistent architecture and config)")
    return saved


def saved_kernel_size(run: RunDir) -> int | None:
    """The kernel size the run was trained on, or None when it has no config.json."""
    saved = _read_saved(run)
    return None if saved is None else int(saved["config"]["kernel_size"])


def read_config(run: RunDir) -> ml_collections.ConfigDict:
    """The run's train config; refuses a directory that is not a training run."""
    saved = _read_saved(run)
    if saved is None:
        raise RunDirError(f"--workdir {run.path}: no config.json (not a dwjax training run; "
                          "train first)")
    return ml_collections.ConfigDict(saved["config"])


def check_architecture(run: RunDir, architecture: dict) -> None:
    """Refuses a run directory trained with another kernel size or architecture."""
    saved = _read_saved(run)
    if saved is not None and saved["architecture"] != architecture:
        raise RunDirError(f"{run.config_json}: workdir was trained with "
                          f"{json.dumps(saved['architecture'])}, this config is "
                          f"{json.dumps(architecture)}; use another --workdir")


def write_config(run: RunDir, config: ml_collections.ConfigDict, architecture: dict) -> None:
    atomic.write_json(run.config_json, {"architecture": architecture,
                                        "config": json.loads(config.to_json_best_effort())})


def architecture(config: ml_collections.ConfigDict) -> dict:
    """config.json's "architecture": what a checkpoint must match to be restored into this config
    (kernel size and widths)."""
    return {"kernel_size": int(config.kernel_size), "hidden": [int(h) for h in config.model.hidden],
            "negative_slope": float(config.model.negative_slope)}


def resolve_kernel_size(run: RunDir, kernel_size: int | None, hint: str) -> int:
    """The kernel size a stage works on: `kernel_size` when given (it must be the trained run's,
    if there is one), else the trained run's; `hint` says what to pass when there is neither."""
    saved = saved_kernel_size(run)
    if kernel_size is None and saved is None:
        raise RunDirError(f"--workdir {run.path}: no training run there; pass --kernel_size "
                          f"({hint})")
    if saved is not None and kernel_size is not None and saved != kernel_size:
        raise RunDirError(f"--kernel_size {kernel_size}: the run in {run.path} was trained on "
                          f"{saved}x{saved} kernels")
    return kernel_size or saved
