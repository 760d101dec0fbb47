"""The report's labels sections: does each labelled interval's name hold for the kernels assigned
to it? (issue "names earned by the kernels"); and each class's share by the run's names beside its
share by every kernel's own fit (`own_fit_section`).

Per interval of labels.json: the clustered kernels whose code falls in it, their mean (of the
centred unit kernels, what the clustering compares) and a seeded sample, checked against the
label's family by `patterns.name_checks.check_names`. The verdicts go into labels.json (`check`,
beside the naming, which they never change) and onto the page: the decoded exemplar, the mean
assigned kernel and the best template of the label's family per interval, with score and count.
"""
from __future__ import annotations

import numpy as np

from dwjax.io import assignment_files, shards
from dwjax.model import preprocess
from dwjax.patterns import family_fit, name_checks, templates
from dwjax.patterns import labels as labels_lib
from dwjax.views import charts, plotting
from dwjax.views.sections import Context, Entry, write_csv

SAMPLE = 200  # kernels per interval for the sample check
CHUNK = 65536
# Kernels fitted one by one for the own-fit comparison: a seeded sample of every kernel beyond it
# (each costs a pass over the ~22,000-template bank).
OWN_FIT_KERNELS = 200_000


def _accumulate(ctx: Context, labels: dict, rng: np.random.Generator):
    """Per interval: sum of centred unit kernels `[n_iv, k*k]`, counts `[n_iv]`, sample lists."""
    k = labels["kernel_size"]
    n_iv = len(labels["intervals"])
    sums = np.zeros((n_iv, k * k), np.float64)
    counts = np.zeros(n_iv, np.int64)
    picked: list[list[np.ndarray]] = [[] for _ in range(n_iv)]
    for s in ctx.stats:
        kern = ctx.kernels(s)
        if kern is None:
            return None
        r = ctx.rows(s, ("code", "clustered"))
        rows = np.flatnonzero(r["clustered"])
        which = labels_lib.interval_index(labels, r["code"][rows])
        for a in range(0, len(rows), CHUNK):
            idx, iv = rows[a:a + CHUNK], which[a:a + CHUNK]
            unit = np.asarray(preprocess.centre_and_normalise(shards.take_rows(kern, idx)),
                              np.float64)
            inside = iv >= 0
            np.add.at(sums, iv[inside], unit[inside])
            counts += np.bincount(iv[inside], minlength=n_iv)
        for j in range(n_iv):
            members = rows[which == j]
            if len(members):
                take = np.sort(rng.choice(members, min(SAMPLE, len(members)), replace=False))
                picked[j].append(shards.take_rows(kern, take))
    samples = []
    for j in range(n_iv):
        pool = np.concatenate(picked[j]) if picked[j] else np.zeros((0, k, k), np.float32)
        if len(pool) > SAMPLE:
            pool = pool[np.sort(rng.choice(len(pool), SAMPLE, replace=False))]
        samples.append(pool)
    means = (sums / np.maximum(counts, 1)[:, None]).reshape(n_iv, k, k)
    return means, counts, samples


def _decoded(ctx: Context, codes: np.ndarray) -> np.ndarray | None:
    """`[n, k, k]` the spectrum's decoded kernels nearest `codes` (None without spectrum.npz)."""
    import os

    if not os.path.exists(ctx.run.spectrum_npz):
        return None
    with np.load(ctx.run.spectrum_npz) as z:
        spec_codes, kernels = z["codes"], z["kernels"]
    return kernels[np.abs(spec_codes[None, :] - codes[:, None]).argmin(axis=1)]


def _template(mean: np.ndarray, label: str, k: int) -> np.ndarray:
    """The best template of `label`'s family for `mean` `[k, k]` (zeros when it has none)."""
    names = templates.class_names(k)
    if label not in names:
        return np.zeros((k, k))
    c = names.index(label)
    fitted = family_fit.fit(mean[None], k)
    t = int(fitted.template[0, c])
    if t < 0:
        return np.zeros((k, k))
    bank = family_fit.family_bank(k)
    sign = 1.0 if bank.names[0, t] == c else -1.0
    return sign * preprocess.coords_to_kernels(bank.embedded[t:t + 1], k)[0]


def labels_section(ctx: Context) -> list[Entry]:
    """`labels.csv` and the per-interval figure; the verdicts written into labels.json."""
    if ctx.settings.get("method") != "autoencoder":
        return []
    labels = labels_lib.load_labels(ctx.run.labels_json, ctx.kernel_size)
    k = labels["kernel_size"]
    if not labels["intervals"]:
        return [Entry("Labels: names earned by the kernels",
                      "No interval is labelled in labels.json (e.g. an untrained control): every "
                      "clustered kernel is 'Others'.")]
    acc = _accumulate(ctx, labels, np.random.default_rng(ctx.seed))
    if acc is None:
        return []
    means, counts, samples = acc
    checks = name_checks.check_names(labels, means, counts, samples)
    labels_lib.record_checks(ctx.run.labels_json, checks)
    header = ["start", "end", "label", "count", "score", "best", "best_score", "sample_share",
              "verdict", "reason"]
    write_csv(ctx.path("labels.csv"), header,
              [[c.get(h) if c.get(h) is not None else "" for h in header] for c in checks])
    exemplar_codes = [iv["exemplar"] if iv.get("exemplar") is not None
                      else (iv["start"] + iv["end"]) / 2 for iv in labels["intervals"]]
    decoded = _decoded(ctx, np.asarray(exemplar_codes))
    groups = {}
    for i, (iv, c) in enumerate(zip(labels["intervals"], checks)):
        score = "" if c["score"] is None else f", score {c['score']:.2f}"
        title = (f"[{iv['start']:.3f}, {iv['end']:.3f}) {iv['label']}: {c['count']:,} kernels"
                 f"{score}, {c['verdict']}")
        row = [m for m in (decoded[i] if decoded is not None else None, means[i],
                           _template(means[i], iv["label"], k)) if m is not None]
        groups[title] = np.stack(row)
    fig = plotting.plot_gallery(groups, ctx.path("labels.png"),
                                "per interval: decoded exemplar, mean assigned kernel, best "
                                "template of its label", per_row=3,
                                formats=[f for f in ctx.formats if f != "png"])
    flagged = [c for c in checks if c["verdict"] == name_checks.FLAGGED]
    clustered = int(counts.sum())
    unnamed = sum(c["count"] for c in checks if c["verdict"] == name_checks.UNCHECKED)
    caption = (f"Every interval of labels.json with the clustered kernels assigned to it "
               f"({clustered:,} in all; {unnamed:,} in unnamed intervals). Each row: the decoded "
               "code at the interval's exemplar, the mean of its kernels (centred, unit), and the "
               "best template of its label's family; score is the mean's cosine to that family. "
               "ok: the family fits and no other clearly better, and most of a sample of "
               f"{SAMPLE} is that class; flagged: otherwise ({len(flagged)} here"
               + (": " + "; ".join(f"{c['label']} [{c['start']:.3f}, {c['end']:.3f}): "
                                   f"{c['reason']}" for c in flagged) if flagged else "")
               + "); unchecked: no family to match (unnamed intervals: rename them in "
               "labels.json). The verdicts are also written into labels.json.")
    return [Entry("Labels: names earned by the kernels", caption, [fig],
                  [ctx.path("labels.csv")])]


def _own_fit_sample(ctx: Context, labels: dict, limit: int):
    """A seeded uniform sample of the run's live kernels, at most `limit`: kernels `[n, k, k]`
    and the run's name for each `[n]` (its interval's label in ``labels`` if clustered, else
    "Unclustered"); None when a shard is gone. Every kernel when the run has at most `limit`."""
    sizes = [int(s["kernels"]) for s in ctx.stats]
    total = sum(sizes)
    take = np.arange(total) if total <= limit else np.sort(
        np.random.default_rng(ctx.seed).choice(total, limit, replace=False))
    kernels, names, start = [], [], 0
    for s, n in zip(ctx.stats, sizes):
        kern = ctx.kernels(s)
        if kern is None:
            return None
        idx = take[(take >= start) & (take < start + n)] - start
        start += n
        # the columns the labels section read (cached); the names follow from labels.json,
        # whose naming the rows' settings hash
        r = ctx.rows(s, ("code", "clustered"))
        x = shards.take_rows(kern, idx)
        live = preprocess.valid_mask(x)  # what assign calls dead
        idx = idx[live]
        kernels.append(x[live])
        names.append(np.where(r["clustered"][idx], labels_lib.label_codes(labels, r["code"][idx]),
                              assignment_files.UNCLUSTERED))
    return np.concatenate(kernels), np.concatenate(names)


def own_fit_section(ctx: Context, limit: int = OWN_FIT_KERNELS) -> list[Entry]:
    """`own_fit.csv` and its bars: each class's share by the run's names and by every kernel's own
    fit (`labels.name_kernels`), with their overlap (`name_checks.agreement`)."""
    if ctx.settings.get("method") != "autoencoder":
        return []
    labels = labels_lib.load_labels(ctx.run.labels_json, ctx.kernel_size)
    got = _own_fit_sample(ctx, labels, limit)
    if got is None:
        return []
    kernels, run_names = got
    k = ctx.kernel_size
    # in chunks: the fit's and the checkerboard test's temporaries grow with the batch
    own = np.concatenate([labels_lib.name_kernels(kernels[a:a + CHUNK], k)[0]
                          for a in range(0, len(kernels), CHUNK)] or [np.zeros(0, str)])
    rows = name_checks.agreement(run_names, own, templates.class_names(k))
    header = ["class", "autoencoder", "own_fit", "both", "precision", "recall"]
    write_csv(ctx.path("own_fit.csv"), header,
              [[r["class"], *("" if r[h] is None else f"{r[h]:.6f}" for h in header[1:])]
               for r in rows])
    figs = charts.plot_grouped_bars(
        [r["class"] for r in rows],
        {"autoencoder (this run)": np.array([r["autoencoder"] for r in rows]),
         "each kernel's own fit": np.array([r["own_fit"] for r in rows])},
        ctx.path("own_fit"), f"class shares of {len(own):,} live kernels", "share of kernels",
        formats=ctx.formats)
    thr = labels_lib.default_min_similarity(k)
    sampled = ("every live kernel" if sum(int(s["kernels"]) for s in ctx.stats) <= limit
               else f"a seeded sample of {len(own):,} live kernels (seed {ctx.seed})")
    caption = (
        f"Class shares over {sampled}: by the run (a clustered kernel's interval label) and by "
        f"the kernel's own fit (its best-fitting family at cosine >= {thr}, the naming "
        "threshold; 'High-frequency' by the checkerboard test), which does not depend on the "
        "training draw. 'not named': unclustered, unnamed intervals and 'Others' on the run's "
        "side; no family and not high-frequency on the other. In own_fit.csv, both: named that "
        "class by both; precision: of the kernels the run names so, the share that are so by "
        "their own fit; recall: of the kernels that fit the class, the share the run names so. "
        "A class with a share by own fit and none by the run got no code interval in this "
        "training draw (the one-dimensional code holds few minor classes).")
    return [Entry("Labels vs each kernel's own fit", caption, figs[:1],
                  [ctx.path("own_fit.csv")])]
