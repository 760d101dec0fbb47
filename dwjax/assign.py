"""Stage 4: give every kernel a code, a dissimilarity and a label.
`python -m dwjax.assign --workdir=… [--data_dir=…]`

Autoencoder path (paper §4.2): decode 10,000 evenly spaced codes; each kernel takes the code whose
reconstruction is nearest in cosine dissimilarity (dwjax.search.nearest: jitted, chunked, spread
over every device) and is *clustered* if that minimum is below the threshold for k (0.3 for 7×7, 0.2
for 5×5). 3×3 path (paper §5): k-means with 10 clusters on min-max-encoded kernels
(dwjax.search.kmeans); the code is the cluster id and the dissimilarity the distance to its
centroid.

Configured by `configs/assign.py` (`--config.<field>=…`). Output (dwjax.io.assignment_files): one
Parquet file of rows per shard, or per row range of a shard larger than `job.part_size`, written as
it streams and renamed into place when complete, so a killed job re-run skips finished parts and
writes nothing twice; `_meta/settings.json` pins the config they were made with. Read a whole job
with `pyarrow.parquet.read_table("<workdir>/assignments")`. `--config.job.num_workers` and
`--config.job.worker_index` split a job over independent processes; `--distributed` over the hosts
of one JAX job.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
from typing import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from dwjax import cli, runtime
from dwjax.errors import ConfigError, UserError
from dwjax.io import assignment_files, assignment_rows, atomic, part_stream, paths, shards, sources
from dwjax.io import workdir as workdir_lib
from dwjax.model import decoder, preprocess, restore
from dwjax.model import mesh as mesh_lib
from dwjax.patterns import labels as labels_lib
from dwjax.patterns import templates
from dwjax.search import kmeans, nearest

# Paper §4.2: 0.3 for 7×7, 0.2 for 5×5 ("lower dimensional spaces tend to have closer vectors
# angularly"). Other sizes: 0.2 below 7, 0.3 from 7 up, until someone measures better.
PAPER_THRESHOLDS = {5: 0.2, 7: 0.3}
UNCLUSTERED, DEAD = assignment_rows.UNCLUSTERED, assignment_rows.DEAD
Rows = assignment_rows.Rows


class AssignError(UserError):
    """The workdir, data or settings are inconsistent (one-line message)."""


def default_threshold(kernel_size: int) -> float:
    return PAPER_THRESHOLDS.get(kernel_size, 0.2 if kernel_size < 7 else 0.3)


def default_method(kernel_size: int) -> str:
    return "kmeans" if kernel_size == 3 else "autoencoder"


# ----------------------------------------------------------------------------- the two classifiers
class AutoencoderClassifier:
    """Nearest of `num_codes` decoded codes; labels from `<workdir>/labels.json` (proposed if
    absent)."""

    def __init__(self, run: workdir_lib.RunDir, num_codes: int, threshold: float, chunk_size: int,
                 log: Callable[[str], None] = print, method: str = "auto", sample=None,
                 readers: int = 1):
        params, config = restore.load_params(run)
        self.kernel_size = k = int(config.kernel_size)
        slope = config.model.negative_slope
        if not os.path.exists(run.labels_json):
            proposal = labels_lib.propose_from_params(params, slope, k)
            labels_lib.save_labels(run.labels_json, proposal)
            log(f"no labels.json: proposed {len(proposal['intervals'])} labelled intervals from "
                f"{labels_lib.SPECTRUM_CODES} decoded codes → {run.labels_json} (run "
                "`python -m dwjax.spectrum` for the figures)")
        self.labels = labels_lib.load_labels(run.labels_json, k)
        self.codes, self.recon = decoder.decode_codes(params, slope, num_codes)
        # label dictionary: the classes, the file's own names ("Unnamed pattern N", renames), then
        # the two verdicts that are not a class
        names = labels_lib.label_names(self.labels)
        self.label_names = names + [UNCLUSTERED, DEAD]
        self.code_label = labels_lib.label_index(self.labels, self.codes, names).astype(np.int32)
        self.unclustered = self.label_names.index(UNCLUSTERED)
        self.dead = self.label_names.index(DEAD)
        self.threshold = threshold
        # per code, one slot past the last for a dead kernel (index -1): its code value, and its
        # label when unclustered (first M + 1) or clustered (next M + 1)
        dead_slot = [self.dead]
        self._code_of = np.append(self.codes, np.nan)
        self._label_of = np.concatenate([np.full(len(self.codes), self.unclustered), dead_slot,
                                         self.code_label, dead_slot]).astype(np.int32)
        # This process's devices: each process of a multi-host job searches its own parts. One
        # compiled shape for every call, so no answer depends on how the job was cut into parts.
        self.search = nearest.Searcher(self.recon, k, mesh_lib.local_mesh(), chunk_size=chunk_size,
                                       fixed_shape=True, method=method, sample=sample,
                                       readers=readers, log=log)
        # how the rows were searched: other backends or methods may round near-ties differently
        self.search_record = {"backend": self.search.backend, "method": self.search.method,
                              "tile_m": self.search.tile_m, "jax": jax.__version__}
        # the decoded codes identify the trained decoder (and the number of codes); the labels'
        # naming (intervals and names, not the scores or name checks written into the file later)
        codes_sha = hashlib.sha256(self.recon.tobytes()).hexdigest()
        self.digests = {"labels_naming_sha256": labels_lib.naming_digest(self.labels),
                        "decoded_codes_sha256": codes_sha}

    def stream(self, kernels, start: int = 0, stop: int | None = None) -> Iterator[Rows]:
        """Rows `[start, stop)` of `kernels [N, k, k]`, one compiled call's worth at a time."""
        for _, rows in self.stream_segments([(kernels, start, stop)]):
            yield rows

    def stream_segments(self, spans: Sequence[tuple]) -> Iterator[tuple[int, Rows]]:
        """`(span index, Rows)` for every `(kernels, start, stop)` span, in order; the devices
        search the next calls (packed across spans) while the caller writes
        (nearest.Searcher.stream_segments)."""
        for i, chunk in self.search.stream_segments(spans):
            idx, dis = chunk.idx, chunk.dis  # idx -1: dead
            live = idx >= 0
            clustered = live & (dis < self.threshold)
            label = self._label_of.take(np.where(clustered, idx + len(self._code_of), idx))
            yield i, Rows(self._code_of.take(idx), np.where(live, dis, np.float32(np.nan)),
                          clustered, label, chunk.raw_sum, chunk.raw_norm)

    def __call__(self, kernels) -> Rows:
        """`[n, k, k]` → its `Rows`."""
        return Rows.concat(list(self.stream(kernels)))


class KMeansClassifier:
    """The paper's 3×3 path: k-means (10 clusters, k-means++, seeded) on min-max-encoded kernels.

    The centroids are fitted once on the live k×k kernels of `data_dir` (up to `max_fit` of them
    drawn with the seed, streamed from the shards: memory does not grow with the data) and kept in
    `<workdir>/kmeans_k<k>.npz` with the clustering threshold calibrated against random kernels
    (`kmeans.calibrated_threshold`); each cluster is named after the template-bank class nearest
    its centroid when that match is convincing, else "cluster <i>".
    """

    def __init__(self, run: workdir_lib.RunDir, data_dir: str, kernel_size: int,
                 n_clusters: int = 10, seed: int = 0, max_fit: int = 1_000_000,
                 chunk_size: int = kmeans.DEFAULT_CHUNK, log: Callable[[str], None] = print):
        self.kernel_size, self.chunk_size = kernel_size, chunk_size
        path = run.kmeans_npz(kernel_size)
        if os.path.exists(path):
            with np.load(path) as z:
                self.centroids, names = z["centroids"], [str(n) for n in z["names"]]
                threshold = float(z["threshold"]) if "threshold" in z else None
        else:
            threshold = None
            x = kmeans.sample_valid([s.kernels for s in shards.iter_shards(data_dir, kernel_size)],
                                    max_fit, seed, chunk_size)
            if len(x) < n_clusters:
                raise AssignError(f"--data_dir {data_dir}: {len(x)} live "
                                  f"{kernel_size}x{kernel_size} kernels, fewer than {n_clusters} "
                                  "clusters")
            log(
                f"fitting k-means ({n_clusters} clusters) on {len(x):,} "
                f"{kernel_size}x{kernel_size} kernels"
            )
            self.centroids, _ = kmeans.fit_kmeans(x, n_clusters, seed)
            names = self._names(self.centroids)
        if threshold is None:  # fitted now, or centroids kept from before the threshold existed
            threshold = kmeans.calibrated_threshold(self.centroids, kernel_size, seed)
            atomic.save_npz(path, centroids=self.centroids, names=np.array(names),
                            threshold=np.float64(threshold))
        self.threshold = threshold
        # label dictionary: each distinct cluster name once (two clusters may share a class), then
        # the two verdicts that are not a class
        self.label_names = list(dict.fromkeys(names)) + [UNCLUSTERED, DEAD]
        self.cluster_label = np.array([self.label_names.index(n) for n in names], np.int32)
        centroids_sha = hashlib.sha256(np.asarray(self.centroids).tobytes()).hexdigest()
        self.search_record = {"backend": jax.default_backend(), "method": "kmeans",
                              "jax": jax.__version__}
        self.digests = {"centroids_sha256": centroids_sha, "kmeans_threshold": threshold}
        # One worker thread for every part: a fresh thread per part would each get a malloc arena
        # and keep its freed blocks, and the resident set would grow with the number of parts.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kmeans")

    def _names(self, centroids: np.ndarray) -> list[str]:
        k = self.kernel_size
        cls, sim = labels_lib.match_templates(centroids.reshape(-1, k, k), k)
        names = templates.class_names(k)
        ok = sim >= labels_lib.default_min_similarity(k)
        return [names[c] if good and c >= 0 else f"cluster {i}"
                for i, (c, good) in enumerate(zip(cls, ok))]

    def __call__(self, kernels) -> Rows:
        """As AutoencoderClassifier's: the code is the cluster id and the dissimilarity the
        Euclidean distance to its centroid in min-max space; a live kernel is clustered when that
        distance is below the calibrated threshold (`kmeans.calibrated_threshold`)."""
        kernels = np.asarray(kernels, np.float32)
        x = kmeans.minmax_encode(kernels)
        live = preprocess.valid_mask(kernels)
        cluster, dist = kmeans.assign_kmeans(x, self.centroids, self.chunk_size)
        clustered = live & (dist < self.threshold)
        label = np.where(clustered, self.cluster_label[cluster],
                         self.label_names.index(UNCLUSTERED))
        label[~live] = self.label_names.index(DEAD)
        total, norm, _ = (np.asarray(v) for v in _raw_statistics(kernels))
        return Rows(np.where(live, cluster, np.nan),
                    np.where(live, dist, np.nan).astype(np.float32), clustered,
                    label.astype(np.int32), total, norm)

    def stream(self, kernels, start: int = 0, stop: int | None = None) -> Iterator[Rows]:
        """As AutoencoderClassifier's: the next block is classified (in a worker thread, on the
        devices) while the caller writes this one."""
        stop = len(kernels) if stop is None else min(stop, len(kernels))
        starts = list(range(start, stop, self.chunk_size))

        def classify(a: int) -> Rows:
            b = min(a + self.chunk_size, stop)
            rows = self(kernels[a:b])
            shards.release_pages(kernels, a, b)
            return rows

        pool = self._pool
        pending = pool.submit(classify, starts[0]) if starts else None
        try:
            for i in range(len(starts)):
                rows = pending.result()
                pending = pool.submit(classify, starts[i + 1]) if i + 1 < len(starts) else None
                yield rows
        finally:  # a stream left early (an error downstream) leaves no block running
            if pending is not None:
                pending.cancel() or pending.exception()

    def stream_segments(self, spans: Sequence[tuple]) -> Iterator[tuple[int, Rows]]:
        """As AutoencoderClassifier's; blocks do not run over spans (k-means has no compiled
        shape to fill)."""
        for i, (kernels, start, stop) in enumerate(spans):
            for rows in self.stream(kernels, start, stop):
                yield i, rows


# the rows' raw statistics for the k-means path (the autoencoder's come with its search)
_raw_statistics = jax.jit(preprocess.raw_statistics)


def run(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None, *,
        log: Callable[[str], None] = print,
        wait_for_workers: Callable[[], None] | None = None) -> dict:
    """Assigns every k×k kernel of `data_dir` (default: the embedded default's shards), this
    worker's parts of it; returns the summary (also in assignments/_meta/summary.json), or, while
    other workers' parts are missing, `{"complete": False, "parts_done", "parts_total"}`.

    `config` is `configs/assign.py`'s. Workers: the shards, cut into parts of at most
    `job.part_size` rows, are dealt round-robin; worker `job.worker_index` of `job.num_workers`
    takes every `num_workers`-th part. The summary is written by whichever worker finds every part
    done (after `wait_for_workers`, when given: a barrier across the processes of one distributed
    job, after which worker 0 alone writes it).
    """
    job = config.job
    _check_config(config)
    rundir = workdir_lib.RunDir(workdir)
    k = workdir_lib.resolve_kernel_size(rundir, config.kernel_size, "3×3 k-means needs none")
    k_saved = workdir_lib.saved_kernel_size(rundir)
    method = config.method or default_method(k)
    data_dir = sources.data_dir_or_default(data_dir, log)
    shard_list = list(shards.iter_shards(data_dir, k))
    if not shard_list:
        raise AssignError(f"--data_dir {data_dir}: no {k}x{k} kernels")
    settings = {"kernel_size": k, "method": method, "format": config.format}
    if method == "autoencoder":
        if k_saved is None:
            raise AssignError(f"--workdir {workdir}: no trained autoencoder (config.json missing)")
        thr = default_threshold(k) if config.threshold is None else float(config.threshold)
        settings.update(threshold=thr, num_codes=config.num_codes)
        clf = AutoencoderClassifier(rundir, config.num_codes, thr, job.chunk_size, log,
                                    method=config.search, sample=_sample(shard_list),
                                    readers=_threads(job) - 1)
    else:
        if job.overwrite:  # refit on this data, not the centroids of an earlier job
            with contextlib.suppress(FileNotFoundError):
                os.remove(rundir.kmeans_npz(k))
        km = config.kmeans
        settings.update(kmeans=km.to_dict())
        clf = KMeansClassifier(rundir, data_dir, k, km.n_clusters, km.seed, km.max_fit, log=log)
    out_dir = rundir.assignments
    assignment_files.check_settings(out_dir, {**settings, **clf.digests}, job.overwrite,
                                    clf.search_record, job.allow_mixed)
    atomic.clean_stale(out_dir)  # row files a killed worker left half-written
    # each part says where it was searched; device kind and count never change a row
    devices = jax.local_devices()
    part_record = {**clf.search_record, "device_kind": devices[0].device_kind,
                   "device_count": len(devices)}
    plan = assignment_files.plan_parts(shard_list, job.part_size)
    mine = plan[job.worker_index::job.num_workers]
    finished = [assignment_files.is_done(out_dir, p, k, config.format) for p in mine]
    progress = part_stream.Progress(
        sum(p.stop - p.start for p, f in zip(mine, finished) if not f), log)
    block = max(1, job.chunk_size) * 4  # rows per Parquet row group (at least; whole chunks)
    # one writer thread: a part's blocks stay in order, and pyarrow writes without the GIL
    with contextlib.ExitStack() as stack:
        write_pool = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
                      if _threads(job) > 1 else None)
        for part, already in zip(mine, finished):
            if already:
                log(f"{part.shard.source}{_rows_note(part)}: already assigned, skipped")
        todo = [part for part, already in zip(mine, finished) if not already]
        # one stream for every part: the search's chunks run over parts (search.chunks)
        stream = stack.enter_context(contextlib.closing(clf.stream_segments(
            [(p.shard.kernels, p.start, p.stop) for p in todo])))
        for i, part in enumerate(todo):
            with assignment_files.open_part(out_dir, part, k, config.format, data_dir,
                                            clf.label_names, part_record) as writer:
                part_stream.write_part(part_stream.rows_of(stream, i, part.stop - part.start),
                                       part, writer, block, progress, write_pool)
            stats = writer.stats()
            log(f"{part.shard.source}{_rows_note(part)}: {stats['clustered']:,}/"
                f"{stats['kernels']:,} clustered "
                f"({100 * stats['clustered'] / max(1, stats['kernels']):.1f}%)")
    if wait_for_workers is not None:
        wait_for_workers()
        if job.worker_index != 0:
            return {"complete": False, "parts_done": None, "parts_total": len(plan)}
    done = sum(assignment_files.is_done(out_dir, p, k, config.format) for p in plan)
    if done < len(plan):
        log(f"{done} of {len(plan)} parts done; the summary is written once every part is")
        return {"complete": False, "parts_done": done, "parts_total": len(plan)}
    assignment_files.remove_stale(out_dir, plan, k)
    return {"complete": True, **assignment_files.write_summary(out_dir, k)}


def _rows_note(part: assignment_files.Part) -> str:
    return "" if part.whole else f" rows [{part.start:,}, {part.stop:,})"


def _threads(job: ml_collections.ConfigDict) -> int:
    """Host threads of the job: `job.threads`, or the machine's cores when 0."""
    return job.threads or os.cpu_count() or 1


def _sample(shard_list: list[shards.Shard], n: int = 2048) -> np.ndarray:
    """`[≤ n, k, k]` kernels spread evenly over the job's shards (the search method's evidence)."""
    total = sum(len(s.kernels) for s in shard_list)
    picks = []
    for s in shard_list:
        m = max(1, round(n * len(s.kernels) / max(total, 1)))
        idx = np.unique(np.linspace(0, len(s.kernels) - 1, min(m, len(s.kernels))).astype(int))
        # Released every few rows: each far-apart read maps a large folio of the file, and over
        # the whole sample those would map most of it at once.
        picks.append(shards.take_rows(s.kernels, idx, block=128))
    return np.concatenate(picks)


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses values that cannot make a job, before anything is read or written."""
    job = config.job
    if config.search not in nearest.METHODS:
        raise ConfigError(f"--config.search {config.search!r}: expected one of "
                          f"{', '.join(nearest.METHODS)}")
    if config.method not in (None, "autoencoder", "kmeans"):
        raise ConfigError(f"--config.method {config.method!r}: expected autoencoder or kmeans")
    if config.format not in assignment_files.FORMATS:
        formats = ", ".join(assignment_files.FORMATS)
        raise ConfigError(f"--config.format {config.format!r}: expected one of {formats}")
    if config.num_codes < 2:
        raise ConfigError(f"--config.num_codes {config.num_codes}: need at least 2")
    if config.threshold is not None and not 0.0 <= config.threshold <= 2.0:
        raise ConfigError(f"--config.threshold {config.threshold}: a cosine dissimilarity is in "
                          "[0, 2]")
    if config.kmeans.n_clusters < 2 or config.kmeans.max_fit < config.kmeans.n_clusters:
        raise ConfigError(f"--config.kmeans: need n_clusters ≥ 2 and max_fit ≥ n_clusters (got "
                          f"{config.kmeans.n_clusters}, {config.kmeans.max_fit})")
    if job.part_size < 1:
        raise ConfigError(f"--config.job.part_size {job.part_size}: must be at least 1")
    if job.chunk_size < 1:
        raise ConfigError(f"--config.job.chunk_size {job.chunk_size}: must be at least 1")
    if job.num_workers < 1 or not 0 <= job.worker_index < job.num_workers:
        raise ConfigError(f"--config.job.worker_index {job.worker_index}: must be in [0, "
                          f"--config.job.num_workers {job.num_workers})")
    if job.threads < 0:
        raise ConfigError(f"--config.job.threads {job.threads}: must be ≥ 0 (0: every core)")
    if job.overwrite and job.num_workers > 1:
        raise ConfigError("--config.job.overwrite: not with several workers (it clears their "
                          "rows); run it once alone")


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags() -> None:
    cli.define_workdir_flags("Kernel shards to assign")
    runtime.define_distributed_flags()


def main(argv):
    del argv
    cli.setup()
    runtime.use_every_cpu_core()
    with cli.user_errors("assign"):
        config = cli.stage_config()
        workdir = FLAGS.workdir or paths.default_workdir(config.kernel_size or 5)
        runtime.init_distributed()
        barrier = None
        if runtime.distributed_requested():
            import jax
            from jax.experimental import multihost_utils

            if config.job.num_workers != 1:
                raise ConfigError("--config.job.num_workers: not with --distributed (every "
                                  "process is a worker)")
            config.job.num_workers, config.job.worker_index = (jax.process_count(),
                                                               jax.process_index())
            barrier = lambda: multihost_utils.sync_global_devices("dwjax.assign")  # noqa: E731
        summary = run(config, workdir, FLAGS.data_dir, wait_for_workers=barrier)
    rows = workdir_lib.RunDir(workdir).assignments
    cli.end_job(summary, lambda s: f"{s['clustered']:,} of {s['kernels']:,} kernels clustered "
                f"({100 * s['clustered_fraction']:.1f}%); per-kernel rows in {rows}/",
                config.job.worker_index, rows, "assigned")


if __name__ == "__main__":
    cli.run_config_stage("assign", main, define_flags)
