"""Names earned by kernels: does what an interval's kernels look like match its label's family?

The labeller names a code interval from the decoded codes; the kernels assigned to it are what a
reader sees. `check_names` fits each interval's assigned-kernel mean (and, if given, a sample of
them) against every class's family (dwjax.patterns.family_fit) and says whether the interval's own
class fits well and no other class fits clearly better.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dwjax.patterns import family_fit, labels as labels_lib, templates

OK, FLAGGED, UNCHECKED = "ok", "flagged", "unchecked"
# Another class may fit the mean this much better (cosine) before the name is flagged: below it
# the two are the same pattern at the fit's resolution (e.g. a 2×2 block half a pixel off-centre
# is both an On-Square and an On-Centre DoG).
TOLERANCE = 0.02
# Least share of a sample whose own best class is the interval's class. Below it most kernels are
# something else even if their mean is not (a mixture can average into a clean pattern).
MIN_SAMPLE_SHARE = 0.5


def check_names(labels: dict, means, counts, samples: Sequence | None = None,
                min_similarity: float | None = None) -> list[dict]:
    """A verdict per interval of ``labels`` on whether its kernels earn its label.

    Args:
      labels: a labels dict (`labels.validate_labels`); its intervals sorted by start, which is
        the order of ``means``, ``counts`` and ``samples``.
      means: ``[n_intervals, k, k]`` each interval's mean clustered kernel; best the mean of the
        centred unit kernels (`preprocess.centre_and_normalise`, what the clustering compares), so
        no kernel weighs by its norm. Any value for an empty interval.
      counts: ``[n_intervals]`` clustered kernels per interval.
      samples: optional, per interval ``[m_i, k, k]`` kernels drawn from it (or None for none).
      min_similarity: least cosine of the mean to its class; default
        `labels.default_min_similarity(k)`.
    Returns:
      One dict per interval: ``label``, ``start``, ``end``, ``count``; ``score`` (the mean's cosine
      to its label's family, or for "High-frequency" its `family_fit.high_frequency_share`; None
      if unchecked), ``best`` and ``best_score`` (the class that fits the mean best);
      ``sample_score`` (median cosine of the sample to the label's family) and ``sample_share``
      (share of the sample whose best class is the label), None without a sample; ``verdict``:
      "ok", "flagged" (another class fits clearly better, the mean fits its class worse than
      ``min_similarity``, or most of the sample is another class) or "unchecked" (no kernels, or a
      label without a family: an unnamed interval or a user's own name); ``reason``: one line.
    """
    labels = labels_lib.validate_labels(labels)
    k = labels["kernel_size"]
    ivs = labels["intervals"]
    means = np.asarray(means, np.float32).reshape(-1, k, k)
    counts = np.asarray(counts).reshape(-1)
    if len(means) != len(ivs) or len(counts) != len(ivs):
        raise ValueError(f"{len(ivs)} intervals but {len(means)} means and {len(counts)} counts")
    if samples is not None and len(samples) != len(ivs):
        raise ValueError(f"{len(ivs)} intervals but {len(samples)} samples")
    thr = labels_lib.default_min_similarity(k) if min_similarity is None else min_similarity
    names = templates.class_names(k)
    fitted = family_fit.fit(means, k)
    hf = family_fit.high_frequency_share(means)
    out = []
    for i, iv in enumerate(ivs):
        label = iv["label"]
        row = {"label": label, "start": iv["start"], "end": iv["end"], "count": int(counts[i]),
               "score": None, "best": None, "best_score": None, "sample_score": None,
               "sample_share": None}
        has_family = label in names and label != templates.OTHERS
        if counts[i] == 0 or not fitted.valid[i]:
            out.append({**row, "verdict": UNCHECKED, "reason": "no kernels"})
            continue
        best = int(fitted.score[i].argmax())
        row.update(best=names[best], best_score=round(float(fitted.score[i, best]), 4))
        if not has_family:
            why = ("no family to match: look at its kernels and name it in the labels file"
                   if label.startswith(labels_lib.UNNAMED) or label == templates.OTHERS
                   else "a label of the file's own: no family to match")
            out.append({**row, "verdict": UNCHECKED, "reason": why})
            continue
        if label == templates.HIGH_FREQUENCY:
            score = float(hf[i])
            hf_min = family_fit.high_frequency_min(k)
            ok = score >= hf_min
            reason = (f"high-frequency share {score:.2f} >= {hf_min:.2f}" if ok else
                      f"high-frequency share {score:.2f} < {hf_min:.2f}; mean fits "
                      f"{names[best]} ({fitted.score[i, best]:.2f})")
            out.append({**row, "score": round(score, 4), "verdict": OK if ok else FLAGGED,
                        "reason": reason})
            continue
        c = names.index(label)
        score = float(fitted.score[i, c])
        row["score"] = round(score, 4)
        problems = []
        if score < thr:
            problems.append(f"mean fits {label} at {score:.2f} < {thr:.2f}")
        if fitted.score[i, best] > score + TOLERANCE:
            problems.append(f"mean fits {names[best]} better ({fitted.score[i, best]:.2f} vs "
                            f"{score:.2f})")
        sample = None if samples is None or samples[i] is None else np.asarray(samples[i])
        if sample is not None and len(sample):
            sf = family_fit.fit(sample.reshape(-1, k, k), k)
            live = sf.valid
            if live.any():
                row["sample_score"] = round(float(np.median(sf.score[live, c])), 4)
                share = float(np.mean(sf.score[live].argmax(axis=1) == c))
                row["sample_share"] = round(share, 4)
                if share < MIN_SAMPLE_SHARE:
                    top = np.bincount(sf.score[live].argmax(axis=1), minlength=len(names))
                    rest = [j for j in np.argsort(-top, kind="stable") if top[j] and j != c][:2]
                    problems.append(
                        f"{share:.0%} of the sample is {label}, under half; the rest is mostly "
                        + ", ".join(f"{names[j]} ({top[j] / live.sum():.0%})" for j in rest))
        verdict = FLAGGED if problems else OK
        reason = "; ".join(problems) if problems else (
            f"mean fits {label} at {score:.2f}" + (
                "" if best == c else f" (≈ {names[best]} {fitted.score[i, best]:.2f})"))
        out.append({**row, "verdict": verdict, "reason": reason})
    return out


NOT_NAMED = "not named"  # the agreement table's row for kernels neither side names


def agreement(autoencoder, own_fit, classes: Sequence[str]) -> list[dict]:
    """Per class: how the autoencoder's names for kernels compare with each kernel's own fit.

    The autoencoder's name depends on the training draw (which classes get code space); a
    kernel's own fit (`labels.name_kernels`) does not, so the comparison says which class shares
    a run can trust and which classes its one-dimensional code lost.

    Args:
      autoencoder: ``[N]`` str, the run's name per kernel: a class, or anything else (unclustered,
        an unnamed interval, "Others") counted as `NOT_NAMED`.
      own_fit: ``[N]`` str, each kernel's own best class at the naming threshold, "High-frequency",
        or anything else (`labels.UNNAMED`) counted as `NOT_NAMED`.
      classes: the class names to report, in order (`templates.class_names(k)`).
    Returns:
      One dict per class in ``classes`` (those neither side names dropped) and a last one for
      `NOT_NAMED`: ``class``, ``autoencoder`` and ``own_fit`` (shares of the N kernels),
      ``both`` (share named that class by both), ``precision`` (both / autoencoder: of the
      kernels the run names so, the share that are so by their own fit; None when the run names
      none) and ``recall`` (both / own fit; None when no kernel fits the class).
    """
    ae = np.asarray(autoencoder, dtype=object)
    own = np.asarray(own_fit, dtype=object)
    if ae.shape != own.shape or ae.ndim != 1:
        raise ValueError(f"autoencoder {ae.shape} and own_fit {own.shape}: one name per kernel")
    named = [c for c in classes if c != templates.OTHERS]
    ae = np.where(np.isin(ae, named), ae, NOT_NAMED)
    own = np.where(np.isin(own, named), own, NOT_NAMED)
    n = max(1, len(ae))
    out = []
    for c in [*named, NOT_NAMED]:
        a, o = ae == c, own == c
        if c != NOT_NAMED and not (a.any() or o.any()):
            continue
        both = int((a & o).sum())
        out.append({"class": c, "autoencoder": float(a.sum() / n), "own_fit": float(o.sum() / n),
                    "both": both / n,
                    "precision": float(both / a.sum()) if a.any() else None,
                    "recall": float(both / o.sum()) if o.any() else None})
    return out
