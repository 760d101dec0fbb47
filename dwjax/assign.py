"""Stage 4: give every kernel a code, a dissimilarity and a label.
`python -m dwjax.assign --workdir=… [--data_dir=…]`

Autoencoder path (paper §4.2): decode 10,000 evenly spaced codes; each kernel takes the code whose
reconstruction is nearest in cosine dissimilarity (dwjax.nearest: jitted, chunked, spread over every
device) and is *clustered* if that minimum is below the threshold for k (0.3 for 7×7, 0.2 for 5×5).
3×3 path (paper §5): k-means with 10 clusters on min-max-encoded kernels (dwjax.kmeans); the code is
the cluster id and the dissimilarity the distance to its centroid.

Output: `<workdir>/assignments/<source>.k<k>x<k>.csv`, one per shard, written atomically, so a killed
job re-run skips finished shards and writes nothing twice; `settings.json` pins what they were made
with. Read them all with
`pd.concat(map(pd.read_csv, glob.glob("<workdir>/assignments/*.csv")))`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable

import numpy as np
from absl import app, flags

from dwjax import assignments, atomic, cli, kmeans, labels as labels_lib, model as model_lib
from dwjax import nearest, paths, preprocess, shards, templates, workdir as workdir_lib
from dwjax.errors import ConfigError, UserError

# Paper §4.2: 0.3 for 7×7, 0.2 for 5×5 ("lower dimensional spaces tend to have closer vectors
# angularly"). Other sizes: 0.2 below 7, 0.3 from 7 up, until someone measures better.
PAPER_THRESHOLDS = {5: 0.2, 7: 0.3}
UNCLUSTERED, DEAD = assignments.UNCLUSTERED, assignments.DEAD


class AssignError(UserError):
    """The workdir, data or settings are inconsistent (one-line message)."""


def default_threshold(kernel_size: int) -> float:
    return PAPER_THRESHOLDS.get(kernel_size, 0.2 if kernel_size < 7 else 0.3)


def default_method(kernel_size: int) -> str:
    return "kmeans" if kernel_size == 3 else "autoencoder"


# ----------------------------------------------------------------------------- the two classifiers
class AutoencoderClassifier:
    """Nearest of `num_codes` decoded codes; labels from `<workdir>/labels.json` (proposed if absent)."""

    def __init__(self, run: workdir_lib.RunDir, num_codes: int, threshold: float, chunk_size: int,
                 log: Callable[[str], None] = print):
        model, config = workdir_lib.load_model(run)
        self.kernel_size = k = int(config.kernel_size)
        if not os.path.exists(run.labels_json):
            proposal = labels_lib.propose_from_model(model, k)
            labels_lib.save_labels(run.labels_json, proposal)
            log(f"no labels.json: proposed {len(proposal['intervals'])} labelled intervals from "
                f"{labels_lib.SPECTRUM_CODES} decoded codes → {run.labels_json} (run "
                "`python -m dwjax.spectrum` for the figures)")
        self.labels = labels_lib.load_labels(run.labels_json, k)
        self.codes, self.recon = model_lib.decode_codes(model, num_codes)
        self.code_labels = labels_lib.label_codes(self.labels, self.codes)
        self.threshold, self.chunk_size = threshold, chunk_size
        with open(run.labels_json, "rb") as f:
            labels_sha = hashlib.sha256(f.read()).hexdigest()
        # the decoded codes identify the trained decoder (and the number of codes)
        codes_sha = hashlib.sha256(self.recon.tobytes()).hexdigest()
        self.settings = {"method": "autoencoder", "kernel_size": k, "threshold": threshold,
                         "num_codes": num_codes, "labels_sha256": labels_sha,
                         "decoded_codes_sha256": codes_sha}

    def __call__(self, kernels: np.ndarray):
        idx, dis = nearest.nearest_codes(kernels, self.recon, self.chunk_size)
        live = idx >= 0
        code = np.where(live, self.codes[np.maximum(idx, 0)], np.nan)
        clustered = live & (dis < self.threshold)
        label = np.where(clustered, self.code_labels[np.maximum(idx, 0)], UNCLUSTERED).astype(object)
        label[~live] = DEAD
        return code, dis, clustered, label


class KMeansClassifier:
    """The paper's 3×3 path: k-means (10 clusters, k-means++, seeded) on min-max-encoded kernels.

    The centroids are fitted once on every live k×k kernel of `data_dir` (up to `max_fit` drawn with
    the seed) and kept in `<workdir>/kmeans_k<k>.npz`; each cluster is named after the template-bank
    class nearest its centroid when that match is convincing, else "cluster <i>".
    """

    def __init__(self, run: workdir_lib.RunDir, data_dir: str, kernel_size: int,
                 n_clusters: int = 10, seed: int = 0, max_fit: int = 1_000_000,
                 chunk_size: int = kmeans.DEFAULT_CHUNK, log: Callable[[str], None] = print):
        self.kernel_size, self.chunk_size = kernel_size, chunk_size
        path = run.kmeans_npz(kernel_size)
        if os.path.exists(path):
            with np.load(path) as z:
                self.centroids, names = z["centroids"], [str(n) for n in z["names"]]
        else:
            x = np.concatenate([kmeans.encode_valid(s.kernels)[0]
                                for s in shards.iter_shards(data_dir, kernel_size)])
            if len(x) > max_fit:
                x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_fit, replace=False))]
            if len(x) < n_clusters:
                raise AssignError(f"--data_dir {data_dir}: {len(x)} live "
                                  f"{kernel_size}x{kernel_size} kernels, fewer than {n_clusters} "
                                  "clusters")
            log(f"fitting k-means ({n_clusters} clusters) on {len(x):,} {kernel_size}x{kernel_size} kernels")
            self.centroids, _ = kmeans.fit_kmeans(x, n_clusters, seed)
            names = self._names(self.centroids)
            atomic.save_npz(path, centroids=self.centroids, names=np.array(names))
        self.names = np.array(names, dtype=object)
        centroids_sha = hashlib.sha256(np.asarray(self.centroids).tobytes()).hexdigest()
        self.settings = {"method": "kmeans", "kernel_size": kernel_size, "n_clusters": n_clusters,
                         "seed": seed, "centroids_sha256": centroids_sha}

    def _names(self, centroids: np.ndarray) -> list[str]:
        k = self.kernel_size
        cls, sim = labels_lib.match_templates(centroids.reshape(-1, k, k), k)
        names = templates.class_names(k)
        ok = sim >= labels_lib.default_min_similarity(k)
        return [names[c] if good and c >= 0 else f"cluster {i}"
                for i, (c, good) in enumerate(zip(cls, ok))]

    def __call__(self, kernels: np.ndarray):
        x = kmeans.minmax_encode(kernels)
        live = preprocess.valid_mask(kernels)
        cluster, dist = kmeans.assign_kmeans(x, self.centroids, self.chunk_size)
        label = self.names[cluster].copy()
        label[~live] = DEAD
        return (np.where(live, cluster, -1).astype(np.float64),
                np.where(live, dist, np.nan).astype(np.float32), live, label)


def assign(workdir: str, data_dir: str, kernel_size: int | None = None, method: str | None = None,
           threshold: float | None = None, num_codes: int = 10_000,
           chunk_size: int = nearest.DEFAULT_CHUNK, overwrite: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Assigns every k×k kernel of `data_dir`; returns the summary (also in
    assignments/summary.json)."""
    run = workdir_lib.RunDir(workdir)
    k_saved = workdir_lib.saved_kernel_size(run)
    k = kernel_size or k_saved
    if k is None:
        raise AssignError(f"--workdir {workdir}: no training run there; pass --kernel_size "
                          "(3×3 k-means needs none)")
    if k_saved is not None and kernel_size is not None and k_saved != kernel_size:
        raise AssignError(f"--kernel_size {kernel_size}: the run in {workdir} was trained on "
                          f"{k_saved}x{k_saved} kernels")
    method = method or default_method(k)
    if num_codes < 2:
        raise ConfigError(f"--num_codes {num_codes}: need at least 2")
    if chunk_size < 1:
        raise ConfigError(f"--chunk_size {chunk_size}: must be at least 1")
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise ConfigError(f"--threshold {threshold}: a cosine dissimilarity is in [0, 2]")
    if not list(shards.iter_shards(data_dir, k)):
        raise AssignError(f"--data_dir {data_dir}: no {k}x{k} kernels")
    if method == "autoencoder":
        if k_saved is None:
            raise AssignError(f"--workdir {workdir}: no trained autoencoder (config.json missing)")
        thr = default_threshold(k) if threshold is None else float(threshold)
        clf = AutoencoderClassifier(run, num_codes, thr, chunk_size, log)
    elif method == "kmeans":
        if overwrite:  # refit on this data, not the centroids of an earlier job
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.kmeans_npz(k))
        clf = KMeansClassifier(run, data_dir, k, log=log)
    else:
        raise AssignError(f"--method {method!r}: expected autoencoder or kmeans")
    out_dir = run.assignments
    assignments.check_settings(out_dir, clf.settings, overwrite)
    for shard in shards.iter_shards(data_dir, k):
        if assignments.is_done(out_dir, shard, k):
            log(f"{shard.source}: already assigned, skipped")
            continue
        stats = assignments.write_shard(out_dir, shard, k, data_dir, *clf(shard.kernels))
        log(f"{shard.source}: {stats['clustered']:,}/{stats['kernels']:,} clustered "
            f"({100 * stats['clustered'] / max(1, stats['kernels']):.1f}%)")
    return assignments.write_summary(out_dir, k)


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory (default $DWJAX_HOME/runs/k<kernel_size>).")
    flags.DEFINE_string("data_dir", None, "Kernel shards to assign (default $DWJAX_HOME/data); any converted set.")
    flags.DEFINE_integer("kernel_size", None, "k (default: the run's; needed for 3×3 k-means without a run).")
    flags.DEFINE_enum("method", None, ["autoencoder", "kmeans"], "Default: kmeans for 3×3, else autoencoder.")
    flags.DEFINE_float("threshold", None, "Clustered if dissimilarity < this (default 0.3 for 7×7, 0.2 for 5×5).")
    flags.DEFINE_integer("num_codes", 10_000, "Evenly spaced codes to decode and compare against.")
    flags.DEFINE_integer("chunk_size", nearest.DEFAULT_CHUNK, "Kernels per compiled call (memory is flat in N).")
    flags.DEFINE_bool("overwrite", False, "Redo assignments made with other settings.")


def main(argv):
    del argv
    cli.setup()
    workdir = FLAGS.workdir or paths.default_workdir(FLAGS.kernel_size or 5)
    with cli.user_errors("assign"):
        summary = assign(workdir, FLAGS.data_dir or paths.default_data_dir(), FLAGS.kernel_size,
                         FLAGS.method, FLAGS.threshold, FLAGS.num_codes, FLAGS.chunk_size,
                         FLAGS.overwrite)
    print(f"{summary['clustered']:,} of {summary['kernels']:,} kernels clustered "
          f"({100 * summary['clustered_fraction']:.1f}%); per-kernel rows in "
          f"{workdir_lib.RunDir(workdir).assignments}/")


if __name__ == "__main__":
    define_flags()
    app.run(main)
