"""Code-interval labels: the labels file, code → class lookup, and the automatic labeller (paper
§4.2).

The autoencoder maps every kernel to a scalar code in [0, 1]; the paper decodes a spectrum of evenly
spaced codes, looks at it and labels intervals of the code axis by hand. Here `propose_labels`
proposes those intervals by matching each decoded kernel against the DoG-family template bank
(dwjax.patterns.templates); a person may then edit the file.

Labels file (JSON)::

    {"kernel_size": 7,
     "intervals": [{"start": 0.0, "end": 0.12, "label": "On-Centre", "auto": true, "score": 0.97},
     ...]}

Intervals are half-open ``[start, end)`` (the one ending at 1.0 also holds 1.0), inside [0, 1],
sorted and non-overlapping; touching is fine, gaps are unlabelled. ``label`` must be one of
``templates.class_names(kernel_size)``. ``auto`` (default false) marks machine-proposed intervals
and ``score`` (default null) is the run's mean best cosine similarity to the bank; both may be
omitted in hand-written files. A code in no interval is "Others": in the paper, a kernel that
reconstructs well but whose pattern is not one of the named clusters.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from dwjax.errors import UserError
from dwjax.io import atomic
from dwjax.model import decoder, preprocess
from dwjax.patterns import templates

# Least cosine similarity to the best template for a decoded code to be labelled. Mirrors the
# paper's reconstruction thresholds (dissimilarity 0.3 for 7×7, 0.2 for 5×5: "lower dimensional
# spaces tend to have closer vectors angularly"). They sit well above chance: the best match of an
# isotropic random kernel against the bank has 99.9th percentile ≈ 0.56 (7×7), 0.73 (5×5), while 95%
# of off-grid bank patterns with heavy noise (amplitude SNR 2) still score ≥ 0.85. For 3×3 chance
# reaches 0.95, so template labelling is nearly meaningless there (the paper uses k-means instead);
# 0.9 is only a guard.
DEFAULT_MIN_SIMILARITY = {3: 0.9, 5: 0.8, 7: 0.7}
# Runs shorter than this many consecutive codes are noise: at 500 spectrum codes, 3 codes = 0.6% of
# the axis, far below any cluster the paper labels.
DEFAULT_MIN_RUN = 3

# Codes decoded to propose labels (paper §4.2 looks at 500).
SPECTRUM_CODES = 500

_TOP_KEYS = {"kernel_size", "intervals"}


class LabelsError(UserError):
    """A labels file (or dict) breaks the schema or the interval geometry."""

_REQUIRED = {"start", "end", "label"}
_OPTIONAL = {"auto": False, "score": None}


def default_min_similarity(kernel_size: int) -> float:
    """`DEFAULT_MIN_SIMILARITY` for k; larger kernels than 7 use the 7×7 value (chance only
    drops)."""
    return DEFAULT_MIN_SIMILARITY.get(kernel_size, 0.7)


# ------------------------------------------------------------------------------------- file format


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_labels(labels: Any, kernel_size: int | None = None, source: str = "<labels>") -> dict:
    """Check a labels dict; return a normalised copy (defaults filled, intervals sorted by start).

    Raises:
      LabelsError: one line starting with ``source`` for any schema or geometry error.
    """
    def bad(msg: str) -> LabelsError:
        return LabelsError(f"{source}: {msg}")

    if not isinstance(labels, dict):
        raise bad(f"top level must be an object, got {type(labels).__name__}")
    if set(labels) != _TOP_KEYS:
        extra, missing = sorted(set(labels) - _TOP_KEYS), sorted(_TOP_KEYS - set(labels))
        raise bad(f"keys must be {sorted(_TOP_KEYS)} (unknown {extra}, missing {missing})")
    k = labels["kernel_size"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 3 or k % 2 == 0:
        raise bad(f"kernel_size must be an odd int >= 3, got {k!r}")
    if kernel_size is not None and k != kernel_size:
        raise bad(f"kernel_size is {k} but {kernel_size} was expected")
    if not isinstance(labels["intervals"], list):
        raise bad("intervals must be a list")
    names = templates.class_names(k)
    out = []
    for i, iv in enumerate(labels["intervals"]):
        if not isinstance(iv, dict):
            raise bad(f"interval {i} must be an object")
        if set(iv) - _REQUIRED - set(_OPTIONAL) or _REQUIRED - set(iv):
            raise bad(f"interval {i}: unknown keys {sorted(set(iv) - _REQUIRED - set(_OPTIONAL))}, "
                      f"missing keys {sorted(_REQUIRED - set(iv))}")
        iv = {**_OPTIONAL, **iv}
        if not (_is_number(iv["start"]) and _is_number(iv["end"])):
            raise bad(f"interval {i}: start/end must be finite numbers")
        if not (0.0 <= iv["start"] and iv["end"] <= 1.0):
            raise bad(f"interval {i}: [{iv['start']}, {iv['end']}] is outside [0, 1]")
        if iv["start"] >= iv["end"]:
            raise bad(f"interval {i}: start {iv['start']} >= end {iv['end']}")
        if iv["label"] not in names:
            raise bad(f"interval {i}: unknown label {iv['label']!r} for kernel_size {k}")
        if not isinstance(iv["auto"], bool):
            raise bad(f"interval {i}: auto must be true/false")
        if iv["score"] is not None and not _is_number(iv["score"]):
            raise bad(f"interval {i}: score must be a finite number or null")
        out.append(
            {
                "start": float(iv["start"]),
                "end": float(iv["end"]),
                "label": iv["label"],
                "auto": iv["auto"],
                "score": None if iv["score"] is None else float(iv["score"]),
            }
        )
    out.sort(key=lambda iv: iv["start"])
    for a, b in zip(out, out[1:]):
        if b["start"] < a["end"]:
            raise bad(f"intervals overlap: [{a['start']}, {a['end']}) {a['label']!r} and "
                      f"[{b['start']}, {b['end']}) {b['label']!r}")
    return {"kernel_size": k, "intervals": out}


def load_labels(path: str | os.PathLike, kernel_size: int) -> dict:
    """Read and validate a labels file. Raises a one-line LabelsError naming ``path`` if it is
    bad."""

    def _no_constant(name: str):  # NaN / Infinity are not JSON
        raise ValueError(f"non-finite constant {name}")

    try:
        with open(path, encoding="utf-8") as f:
            labels = json.load(f, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise LabelsError(f"{os.fspath(path)}: not valid JSON ({str(e).splitlines()[0]})") from None
    return validate_labels(labels, kernel_size, source=os.fspath(path))


def save_labels(path: str | os.PathLike, labels: dict) -> None:
    """Validate, then write atomically."""
    path = os.fspath(path)
    atomic.write_json(path, validate_labels(labels, source=path))


# -------------------------------------------------------------------------------------- lookup


def label_index(labels: dict, codes) -> np.ndarray:
    """``[N]`` int64: index into ``class_names(kernel_size)`` per code; no interval → "Others"."""
    labels = validate_labels(labels)
    codes = np.asarray(codes, np.float64).reshape(-1)
    if not np.all(np.isfinite(codes)):
        raise ValueError("codes must be finite")
    names = templates.class_names(labels["kernel_size"])
    ivs = labels["intervals"]
    out = np.full(codes.shape, names.index(templates.OTHERS), np.int64)
    if not ivs:
        return out
    starts = np.array([iv["start"] for iv in ivs])
    ends = np.array([iv["end"] for iv in ivs])
    idx = np.array([names.index(iv["label"]) for iv in ivs])
    j = np.searchsorted(starts, codes, side="right") - 1  # last interval starting at or before code
    jj = np.clip(j, 0, None)
    # Half-open [start, end); the interval ending at exactly 1.0 also owns code 1.0.
    inside = (j >= 0) & ((codes < ends[jj]) | ((ends[jj] == 1.0) & (codes == 1.0)))
    out[inside] = idx[jj[inside]]
    return out


def label_codes(labels: dict, codes) -> np.ndarray:
    """``[N]`` array of str: the class name per code (see `label_index`)."""
    names = np.asarray(templates.class_names(labels["kernel_size"]))
    return names[label_index(labels, codes)]


# ------------------------------------------------------------------------------------ labeller


def match_templates(decoded, kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Best template class and its cosine similarity for each kernel.

    Args:
      decoded: ``[M, k, k]`` kernels (any scale/offset; centred and normalised by
      `preprocess.embed`).
    Returns:
      class_index ``[M]`` int64 into ``class_names(k)`` (−1 for a dead kernel), similarity ``[M]``
      float32.
    """
    decoded = np.asarray(decoded, np.float32).reshape(-1, kernel_size, kernel_size)
    bank, bank_class, _ = templates.template_bank(kernel_size)
    sims = np.asarray(preprocess.embed(decoded)) @ np.asarray(preprocess.embed(bank)).T  # [M, T]
    best = sims.argmax(axis=1)
    cls, score = bank_class[best], sims[np.arange(len(best)), best].astype(np.float32)
    dead = ~preprocess.valid_mask(decoded)
    cls[dead], score[dead] = -1, 0.0
    return cls, score


def _runs(x: np.ndarray) -> list[tuple[int, int, int]]:
    """Run-length encoding ``[(value, first, last_exclusive), ...]`` of a 1-D int array."""
    if len(x) == 0:
        return []
    cuts = np.flatnonzero(np.diff(x)) + 1
    bounds = np.concatenate([[0], cuts, [len(x)]])
    return [(int(x[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _smooth(cls: np.ndarray, min_run: int) -> np.ndarray:
    """Short labelled runs: absorbed when both neighbours share a class, else unlabelled (−1)."""
    cls = cls.copy()
    runs = _runs(cls)
    for r, (v, a, b) in enumerate(runs):
        if v < 0 or b - a >= min_run:
            continue
        left = runs[r - 1] if r > 0 else None
        right = runs[r + 1] if r + 1 < len(runs) else None
        long_ = [n for n in (left, right) if n is not None and n[2] - n[1] >= min_run and n[0] >= 0]
        same = len(long_) == 2 and long_[0][0] == long_[1][0]
        cls[a:b] = long_[0][0] if same else -1
    return cls


def propose_labels(
    decoded, codes, kernel_size: int, min_similarity: float | None = None,
    min_run: int = DEFAULT_MIN_RUN,
) -> dict:
    """Propose labelled intervals from a decoded spectrum (the automatic version of paper §4.2).

    Each decoded kernel gets its best template's class (`match_templates`); codes whose best cosine
    similarity is below ``min_similarity`` stay unlabelled. Runs shorter than ``min_run`` codes are
    noise: absorbed into the surrounding run if both sides agree, else unlabelled. Every code owns
    the cell between the midpoints to its neighbours (the first from 0.0, the last to 1.0), so the
    intervals of a run are the union of its cells: they tile the axis without overlap.

    Args:
      decoded: ``[M, k, k]`` decoder outputs for ``codes``.
      codes: ``[M]`` codes in [0, 1], distinct (any order; sorted here).
      min_similarity: default `default_min_similarity(kernel_size)`.
      min_run: shortest run of codes kept as its own interval.
    Returns:
      A labels dict (see module doc), ``auto: true``, ``score`` = the run's mean best similarity (4
      d.p.).
    """
    codes = np.asarray(codes, np.float64).reshape(-1)
    decoded = np.asarray(decoded, np.float32).reshape(-1, kernel_size, kernel_size)
    if len(codes) != len(decoded):
        raise ValueError(f"{len(decoded)} decoded kernels but {len(codes)} codes")
    if len(codes) and (not np.all(np.isfinite(codes)) or codes.min() < 0 or codes.max() > 1):
        raise ValueError("codes must be finite and inside [0, 1]")
    order = np.argsort(codes, kind="stable")
    codes, decoded = codes[order], decoded[order]
    if np.any(np.diff(codes) <= 0):
        raise ValueError("codes must be distinct")
    thr = default_min_similarity(kernel_size) if min_similarity is None else float(min_similarity)
    if len(codes) == 0:
        return validate_labels({"kernel_size": kernel_size, "intervals": []})

    cls, score = match_templates(decoded, kernel_size)
    cls = np.where(score >= thr, cls, -1)
    cls = _smooth(cls, min_run)

    names = templates.class_names(kernel_size)
    mids = (codes[1:] + codes[:-1]) / 2.0
    edges = np.concatenate([[0.0], mids, [1.0]])  # code i owns [edges[i], edges[i+1])
    intervals = []
    for v, a, b in _runs(cls):
        if v < 0:
            continue
        intervals.append({"start": float(edges[a]), "end": float(edges[b]), "label": names[v],
                          "auto": True, "score": round(float(score[a:b].mean()), 4)})
    return validate_labels({"kernel_size": kernel_size, "intervals": intervals})


def propose_from_params(params: dict, negative_slope: float, kernel_size: int,
                        num_codes: int = SPECTRUM_CODES) -> dict:
    """`propose_labels` on `num_codes` evenly spaced codes decoded by a trained autoencoder's
    parameters (`workdir.load_params`)."""
    codes, coords = decoder.decode_codes(params, negative_slope, num_codes)
    return propose_labels(preprocess.coords_to_kernels(coords, kernel_size), codes, kernel_size)
