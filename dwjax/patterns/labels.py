"""Code-interval labels: the labels file, code → class lookup, and the automatic labeller (paper
§4.2).

The autoencoder maps every kernel to a scalar code in [0, 1]; the paper decodes a spectrum of evenly
spaced codes, looks at it and labels intervals of the code axis by hand. Here `propose_labels` names
the whole code axis: every decoded code is fitted by each of the paper's families with free scale,
elongation, orientation and centre offset (dwjax.patterns.family_fit), neighbouring codes of one
class merge into an interval, checkerboard-like codes are "High-frequency", and what matches no
family well becomes an explicit "Unnamed pattern N" with an exemplar code, for a person to look at
and rename.

Labels file (JSON)::

    {"kernel_size": 7,
     "intervals": [{"start": 0.0, "end": 0.12, "label": "On-Centre", "auto": true, "score": 0.97,
                    "margin": 0.05, "exemplar": 0.061, "fit": {"family": "dog", ...},
                    "nearest": null}, ...]}

Intervals are half-open ``[start, end)`` (the one ending at 1.0 also holds 1.0), inside [0, 1],
sorted and non-overlapping; touching is fine, gaps are unlabelled ("Others"). ``label`` is one of
``templates.class_names(kernel_size)`` or a name of the file's own ("Unnamed pattern 3", or
whatever a user renames it to; `label_names` lists them after the classes). Every other key is
optional (hand-written files may omit them; old files have only ``auto`` and ``score``):

* ``auto`` (default false): proposed by `propose_labels`.
* ``score``: for a class, the mean cosine (mean-centred, the clustering metric) of the interval's
  decoded codes to the best-fitting member of that class; for "High-frequency" the mean
  `family_fit.high_frequency_share`; for an unnamed interval the mean best cosine of any class.
* ``margin``: how decisively the label holds, in the same units: a class's mean lead over the best
  other class; "High-frequency"'s lead over `family_fit.high_frequency_min`; for an unnamed
  interval how far its best class falls short of the naming threshold (negative).
* ``exemplar``: the interval's most typical code (best fit; for an unnamed one the code closest
  to all others of the interval) — the one to look at in the spectrum.
* ``fit``: the fitted member at the exemplar: ``family`` (`family_fit.FAMILIES`), ``sign``, and
  its parameters (σ in px, angles in degrees, centre offset in px).
* ``nearest``: for an unnamed or high-frequency interval, the class that came closest.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from dwjax.errors import UserError
from dwjax.io import atomic
from dwjax.model import decoder, preprocess
from dwjax.patterns import family_fit, templates

# Least cosine similarity to the best-fitting family member for a decoded code to be named. Mirrors
# the paper's reconstruction thresholds (dissimilarity 0.3 for 7×7, 0.2 for 5×5: "lower
# dimensional spaces tend to have closer vectors angularly"): a code named X is as close to an X
# as a clustered kernel is to its code. Isotropic random kernels reach it against the fitted
# families in 0.2 % of draws (5×5) and never in 5,000 (7×7; tests/test_labels.py). For 3×3 a third
# of random kernels reach 0.9, so template naming means little there (the paper uses k-means);
# 0.9 is only a guard.
DEFAULT_MIN_SIMILARITY = {3: 0.9, 5: 0.8, 7: 0.7}
# Runs shorter than this many codes join a neighbour. One: `SWITCH_COST` already keeps weakly
# supported slivers out, and a single code can hold a real cluster (the axis ends collect every
# kernel the encoder saturates on: 3.5% of the README job's kernels sit at code 0).
DEFAULT_MIN_RUN = 1
# Cost, in summed cosine, of starting a new interval: a neighbouring class must fit a run of codes
# better by this much in total to split it off (e.g. 0.1 = ten codes 0.01 better each), so two
# near-tied classes do not chop the axis into slivers.
SWITCH_COST = 0.1
# "High-frequency" beats "Unnamed" by this much at a code that passes the high-frequency test: it
# names a code only where no class reaches min_similarity + this.
HIGH_FREQUENCY_BONUS = 0.02

# Codes decoded to propose labels (paper §4.2 looks at 500).
SPECTRUM_CODES = 500

UNNAMED = "Unnamed pattern"  # + " N", numbered along the code axis
# What an assignment reports besides the labels; never an interval's label.
_VERDICTS = ("Unclustered", "Dead")
_MAX_LABEL = 80

_TOP_KEYS = {"kernel_size", "intervals"}


class LabelsError(UserError):
    """A labels file (or dict) breaks the schema or the interval geometry."""


_REQUIRED = {"start", "end", "label"}
_OPTIONAL = {"auto": False, "score": None, "margin": None, "exemplar": None, "fit": None,
             "nearest": None, "check": None}


def default_min_similarity(kernel_size: int) -> float:
    """`DEFAULT_MIN_SIMILARITY` for k; larger kernels than 7 use the 7×7 value (chance only
    drops)."""
    return DEFAULT_MIN_SIMILARITY.get(kernel_size, 0.7)


def unnamed_label(n: int) -> str:
    """The n-th unnamed interval's label ("Unnamed pattern n")."""
    return f"{UNNAMED} {n}"


# ------------------------------------------------------------------------------------- file format


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _vocabulary() -> dict[str, str]:
    """casefolded → spelled: every class name of any kernel size and the assignment verdicts."""
    names = {n for k in (3, 5, 7) for n in templates.class_names(k)} | set(_VERDICTS)
    return {n.casefold(): n for n in names}


def _label_problem(label: Any, k: int) -> str | None:
    """Why ``label`` cannot name an interval of a k×k file (None if it can)."""
    if not isinstance(label, str):
        return f"label must be a string, got {type(label).__name__}"
    if label in templates.class_names(k):
        return None
    known = _vocabulary().get(label.strip().casefold())
    if known in _VERDICTS:
        return f"label {label!r} is an assignment verdict, not a pattern"
    if known is not None:
        return (f"unknown label {label!r} for kernel_size {k}" if known == label
                else f"unknown label {label!r} (did you mean {known!r}?)")
    if not label or label != label.strip() or len(label) > _MAX_LABEL or "\n" in label:
        return f"label {label!r} must be 1..{_MAX_LABEL} characters on one line, not padded"
    return None  # a name of the file's own ("Unnamed pattern 2", a user's rename)


def _check_fit(fit: Any) -> bool:
    return fit is None or (isinstance(fit, dict) and all(
        isinstance(key, str) and (isinstance(v, str) or _is_number(v)) for key, v in fit.items()))


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
        problem = _label_problem(iv["label"], k)
        if problem:
            raise bad(f"interval {i}: {problem}")
        if not isinstance(iv["auto"], bool):
            raise bad(f"interval {i}: auto must be true/false")
        for key in ("score", "margin", "exemplar"):
            if iv[key] is not None and not _is_number(iv[key]):
                raise bad(f"interval {i}: {key} must be a finite number or null")
        if iv["exemplar"] is not None and not 0.0 <= iv["exemplar"] <= 1.0:
            raise bad(f"interval {i}: exemplar {iv['exemplar']} is outside [0, 1]")
        if not _check_fit(iv["fit"]):
            raise bad(f"interval {i}: fit must be an object of numbers/strings or null")
        if iv["nearest"] is not None and not isinstance(iv["nearest"], str):
            raise bad(f"interval {i}: nearest must be a string or null")
        if iv["check"] is not None and not _check_fit(iv["check"]):
            raise bad(f"interval {i}: check must be an object of numbers/strings or null")
        out.append({
            "start": float(iv["start"]), "end": float(iv["end"]), "label": iv["label"],
            "auto": iv["auto"],
            **{key: None if iv[key] is None else float(iv[key])
               for key in ("score", "margin", "exemplar")},
            "fit": None if iv["fit"] is None else dict(iv["fit"]),
            "nearest": iv["nearest"],
            "check": None if iv["check"] is None else dict(iv["check"]),
        })
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


def naming_digest(labels: dict) -> str:
    """sha256 of what decides a row's label: each interval's start, end and label, and the kernel
    size. Scores, fits and name checks written into the file later do not change it."""
    labels = validate_labels(labels)
    naming = {"kernel_size": labels["kernel_size"],
              "intervals": [[iv["start"], iv["end"], iv["label"]] for iv in labels["intervals"]]}
    return hashlib.sha256(json.dumps(naming, sort_keys=True).encode()).hexdigest()


def record_checks(path: str | os.PathLike, checks: Sequence[dict]) -> dict:
    """Writes each interval's name check (`name_checks.check_names`, in interval order) into the
    labels file as its `check` {verdict, reason, score, count}; the naming is untouched."""
    labels = load_labels(path, None)
    for iv, c in zip(labels["intervals"], checks):
        check = {"verdict": c["verdict"], "reason": c.get("reason"), "score": c.get("score"),
                 "count": int(c.get("count") or 0)}
        iv["check"] = {key: v for key, v in check.items() if v is not None}
    save_labels(path, labels)
    return labels


# -------------------------------------------------------------------------------------- lookup


def label_names(labels: dict) -> list[str]:
    """The label dictionary of a labels file: ``templates.class_names(k)`` (fixed order), then the
    file's own names ("Unnamed pattern N", renames) in the order of their first interval."""
    labels = validate_labels(labels)
    names = templates.class_names(labels["kernel_size"])
    extra = [iv["label"] for iv in labels["intervals"] if iv["label"] not in names]
    return names + list(dict.fromkeys(extra))


def interval_index(labels: dict, codes) -> np.ndarray:
    """``[N]`` int64: the index (into ``labels["intervals"]``, sorted by start) of the interval
    holding each code, −1 for a code in none (half-open; the interval ending at 1.0 holds 1.0)."""
    labels = validate_labels(labels)
    codes = np.asarray(codes, np.float64).reshape(-1)
    if not np.all(np.isfinite(codes)):
        raise ValueError("codes must be finite")
    ivs = labels["intervals"]
    if not ivs:
        return np.full(codes.shape, -1, np.int64)
    starts = np.array([iv["start"] for iv in ivs])
    ends = np.array([iv["end"] for iv in ivs])
    j = np.searchsorted(starts, codes, side="right") - 1  # last interval starting at or before code
    jj = np.clip(j, 0, None)
    inside = (j >= 0) & ((codes < ends[jj]) | ((ends[jj] == 1.0) & (codes == 1.0)))
    return np.where(inside, j, -1).astype(np.int64)


def label_index(labels: dict, codes, names: Sequence[str] | None = None) -> np.ndarray:
    """``[N]`` int64: index into ``names`` of each code's label; a code in no interval is "Others".

    Args:
      names: the label dictionary; default ``templates.class_names(k)``, where a file's own names
        (unnamed intervals, renames) count as "Others". Pass `label_names(labels)` to give each its
        own index.
    """
    labels = validate_labels(labels)
    names = list(templates.class_names(labels["kernel_size"]) if names is None else names)
    if templates.OTHERS not in names:
        raise ValueError(f"names must hold {templates.OTHERS!r}")
    others = names.index(templates.OTHERS)
    per_interval = np.array([names.index(iv["label"]) if iv["label"] in names else others
                             for iv in labels["intervals"]] + [others], np.int64)
    return per_interval[interval_index(labels, codes)]  # −1 (no interval) → the last: "Others"


def label_codes(labels: dict, codes) -> np.ndarray:
    """``[N]`` array of str: each code's label, the file's own names included ("Others" outside
    every interval)."""
    names = label_names(labels)
    return np.asarray(names)[label_index(labels, codes, names)]


# ------------------------------------------------------------------------------------ labeller


def match_templates(decoded, kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fitting class and its cosine similarity for each kernel (`family_fit.fit`).

    Args:
      decoded: ``[M, k, k]`` kernels (any scale/offset; compared mean-centred).
    Returns:
      class_index ``[M]`` int64 into ``class_names(k)`` (−1 for a dead kernel), similarity ``[M]``
      float32.
    """
    decoded = np.asarray(decoded, np.float32).reshape(-1, kernel_size, kernel_size)
    fits = family_fit.fit(decoded, kernel_size)
    cls = fits.score.argmax(axis=1).astype(np.int64)
    score = fits.score.max(axis=1).astype(np.float32)
    cls[~fits.valid], score[~fits.valid] = -1, 0.0
    return cls, score


def name_kernels(kernels, kernel_size: int,
                 min_similarity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The labeller's verdict on single kernels, without a spectrum: the best-fitting class where
    its cosine reaches ``min_similarity``, else "High-frequency" where
    `family_fit.high_frequency_share` reaches `family_fit.high_frequency_min`, else
    "Unnamed pattern" (also for a dead kernel).

    Args:
      kernels: ``[N, k, k]``, any scale/offset.
    Returns:
      names ``[N]`` str, best class cosine ``[N]`` float32 (0 for a dead kernel).
    """
    k = kernel_size
    kernels = np.asarray(kernels, np.float32).reshape(-1, k, k)
    thr = default_min_similarity(k) if min_similarity is None else float(min_similarity)
    cls, score = match_templates(kernels, k)
    names = np.asarray(templates.class_names(k), dtype=object)
    hf = family_fit.high_frequency_share(kernels) >= family_fit.high_frequency_min(k)
    out = np.where(score >= thr, names[np.maximum(cls, 0)],
                   np.where(hf, templates.HIGH_FREQUENCY, UNNAMED))
    out[cls < 0] = UNNAMED
    return out.astype(str), score


def _runs(x: np.ndarray) -> list[tuple[int, int, int]]:
    """Run-length encoding ``[(value, first, last_exclusive), ...]`` of a 1-D int array."""
    if len(x) == 0:
        return []
    cuts = np.flatnonzero(np.diff(x)) + 1
    bounds = np.concatenate([[0], cuts, [len(x)]])
    return [(int(x[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _segment(score: np.ndarray, switch_cost: float) -> np.ndarray:
    """``[M]`` state per code maximising the summed ``score [M, S]`` less ``switch_cost`` per
    change of state (Viterbi; ties go to the lower state index)."""
    m, n_states = score.shape
    total = score[0].astype(np.float64).copy()
    back = np.zeros((m, n_states), np.int64)
    for i in range(1, m):
        best_prev = int(total.argmax())
        switch = total[best_prev] - switch_cost
        stay = total >= switch
        back[i] = np.where(stay, np.arange(n_states), best_prev)
        total = np.where(stay, total, switch) + score[i]
    path = np.empty(m, np.int64)
    path[-1] = int(total.argmax())
    for i in range(m - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    return path


def _absorb_short_runs(path: np.ndarray, score: np.ndarray, min_run: int) -> np.ndarray:
    """Runs shorter than ``min_run`` join the neighbouring run whose state fits them better."""
    path = path.copy()
    while True:
        runs = _runs(path)
        short = [r for r, (_, a, b) in enumerate(runs) if b - a < min_run]
        if not short or len(runs) == 1:
            return path
        r = min(short, key=lambda r: runs[r][2] - runs[r][1])  # the shortest first
        _, a, b = runs[r]
        options = [runs[j][0] for j in (r - 1, r + 1) if 0 <= j < len(runs)]
        path[a:b] = max(options, key=lambda s: score[a:b, s].sum())


def propose_labels(
    decoded, codes, kernel_size: int, min_similarity: float | None = None,
    min_run: int = DEFAULT_MIN_RUN, switch_cost: float = SWITCH_COST,
) -> dict:
    """Name the whole code axis from a decoded spectrum (the automatic version of paper §4.2).

    Every decoded kernel is fitted by each class's family (`family_fit.fit`). The axis is then cut
    into runs (`_segment`): a code scores its cosine to a class, ``min_similarity`` as "unnamed",
    and ``min_similarity`` + `HIGH_FREQUENCY_BONUS` as "High-frequency" where
    `family_fit.high_frequency_share` reaches `family_fit.high_frequency_min`; each new run costs
    ``switch_cost``, and runs shorter than ``min_run`` codes join the neighbour that fits them
    better. Every code owns the cell between the midpoints to its neighbours (the first from 0.0,
    the last to 1.0), so the intervals tile [0, 1]; unnamed runs are "Unnamed pattern 1", "… 2",
    along the axis.

    Args:
      decoded: ``[M, k, k]`` decoder outputs for ``codes``.
      codes: ``[M]`` codes in [0, 1], distinct (any order; sorted here).
      min_similarity: default `default_min_similarity(kernel_size)`.
      min_run: shortest run of codes kept as its own interval.
      switch_cost: see `SWITCH_COST`.
    Returns:
      A labels dict (see the module doc) with ``auto: true`` and every optional key filled.
    """
    k = kernel_size
    codes = np.asarray(codes, np.float64).reshape(-1)
    decoded = np.asarray(decoded, np.float32).reshape(-1, k, k)
    if len(codes) != len(decoded):
        raise ValueError(f"{len(decoded)} decoded kernels but {len(codes)} codes")
    if len(codes) and (not np.all(np.isfinite(codes)) or codes.min() < 0 or codes.max() > 1):
        raise ValueError("codes must be finite and inside [0, 1]")
    order = np.argsort(codes, kind="stable")
    codes, decoded = codes[order], decoded[order]
    if np.any(np.diff(codes) <= 0):
        raise ValueError("codes must be distinct")
    thr = default_min_similarity(k) if min_similarity is None else float(min_similarity)
    if len(codes) == 0:
        return validate_labels({"kernel_size": k, "intervals": []})

    names = templates.class_names(k)
    fits = family_fit.fit(decoded, k)
    n_cls = len(names)
    hf_col, unnamed_col = names.index(templates.HIGH_FREQUENCY), n_cls
    hf = family_fit.high_frequency_share(decoded)
    hf_min = family_fit.high_frequency_min(k)
    state = np.concatenate([fits.score.astype(np.float64),
                            np.full((len(codes), 1), thr)], axis=1)  # [M, classes + unnamed]
    state[:, names.index(templates.OTHERS)] = -np.inf
    state[:, hf_col] = np.where(hf >= hf_min, thr + HIGH_FREQUENCY_BONUS, -np.inf)
    state[~fits.valid, :n_cls] = -np.inf  # a dead decoded kernel is no pattern
    path = _absorb_short_runs(_segment(state, switch_cost), state, min_run)

    mids = (codes[1:] + codes[:-1]) / 2.0
    edges = np.concatenate([[0.0], mids, [1.0]])  # code i owns [edges[i], edges[i+1])
    cls_score = np.where(fits.valid[:, None], fits.score, -1.0)
    best_cls = cls_score.argmax(axis=1)
    intervals, n_unnamed = [], 0
    for v, a, b in _runs(path):
        sl = slice(a, b)
        live = best_cls[sl][fits.valid[sl]]
        # The class most codes of the run fit best (None when every code is dead).
        nearest_cls = int(np.bincount(live, minlength=n_cls).argmax()) if len(live) else None
        if v == unnamed_col:
            n_unnamed += 1
            label = unnamed_label(n_unnamed)
            best = cls_score[sl].max(axis=1)
            score, margin = best.mean(), best.mean() - thr
            # The code closest to all the others of the run: what the run looks like.
            emb = np.asarray(preprocess.embed(decoded[sl]))
            ex = a + int((emb @ emb.T).sum(axis=1).argmax())
            fit_cls = nearest_cls
        elif v == hf_col:
            label = templates.HIGH_FREQUENCY
            score, margin = hf[sl].mean(), hf[sl].mean() - hf_min
            ex = a + int(hf[sl].argmax())
            fit_cls = nearest_cls
        else:
            label = names[v]
            others = np.delete(cls_score[sl], v, axis=1).max(axis=1)
            score, margin = cls_score[sl, v].mean(), (cls_score[sl, v] - others).mean()
            ex = a + int(cls_score[sl, v].argmax())
            fit_cls = v
        nearest = None if v == fit_cls or fit_cls is None else names[fit_cls]
        row = -1 if fit_cls is None else int(fits.template[ex, fit_cls])  # −1: a dead exemplar
        intervals.append({
            "start": float(edges[a]), "end": float(edges[b]), "label": label, "auto": True,
            "score": round(float(score), 4), "margin": round(float(margin), 4),
            "exemplar": round(float(codes[ex]), 6),
            "fit": family_fit.describe(k, row, fit_cls) if row >= 0 else None,
            "nearest": nearest})
    return validate_labels({"kernel_size": k, "intervals": intervals})


def propose_from_params(params: dict, negative_slope: float, kernel_size: int,
                        num_codes: int = SPECTRUM_CODES) -> dict:
    """`propose_labels` on `num_codes` evenly spaced codes decoded by a trained autoencoder's
    parameters (`restore.load_params`)."""
    codes, coords = decoder.decode_codes(params, negative_slope, num_codes)
    return propose_labels(preprocess.coords_to_kernels(coords, kernel_size), codes, kernel_size)
