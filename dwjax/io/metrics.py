"""The training curves: one writer for `metrics.jsonl` and the TensorBoard event files.

The loop calls `write(record)` once per record (`{"step", "loss"}` per step, `{"step", "epoch",
"epoch_loss", "kernels_per_s"}` per epoch). Opening the writer for a resumed run first drops the
JSON lines past the restored step (and a line torn by a kill), so a killed run resumed ends with
the same file as an uninterrupted one. Only one process writes (the others get a no-op writer).
"""
from __future__ import annotations

import json
import os

from dwjax.io import atomic, tb_events

_NOT_SCALARS = ("step", "epoch")


class MetricsWriter:
    """JSON lines plus TensorBoard scalars `train/<key>` for every numeric field but step/epoch."""

    def __init__(self, jsonl_path: str, tensorboard_dir: str, resume_step: int | None,
                 enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            if os.path.exists(jsonl_path):
                os.remove(jsonl_path)
        else:
            _truncate(jsonl_path, resume_step)
        self._jsonl = open(jsonl_path, "a")
        self._tb = tb_events.ScalarWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in _NOT_SCALARS:
                self._tb.scalar(f"train/{key}", value, record["step"])

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate(path: str, step: int) -> None:
    """Keeps the lines up to `step`; drops later ones and lines torn by a kill."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    with atomic.atomic_open(path) as f:
        f.writelines(keep)
