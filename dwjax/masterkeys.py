"""Master key filters: a small bank every depthwise kernel is fitted to, its coverage, the fitted
rows, and checkpoints with every kernel replaced by its fit.
`python -m dwjax.masterkeys --workdir=… [--data_dir=…] [--replace=CKPT --out=FILE]`

The bank (`--config.bank`): `derive` (default) decodes `num_candidates` evenly spaced codes of the
run's autoencoder, centres and unit-normalises them, and chooses `num_filters` of them greedily,
each step the candidate that most raises the mean explained fraction over the job's kernels (a
sample of at most `sample` live ones; dwjax.patterns.master_keys); `kmeans` chooses among the
run's 3×3 k-means centroids the same way; `scale_space` takes idealised discrete scale-space
filters (dwjax.patterns.scale_space); a path reads a bank file in masterfiltmodel's text format.
The coverage curve (K = 1 … `curve`) sits beside PCA components and k-means centroids of the same
sample.

Every k×k kernel of `data_dir` is then fitted (best filter sign-free, scale, offset, explained
fraction r2) and streamed into Parquet rows under `<workdir>/masterkeys/rows/`, part by part as
`assign` does (dwjax.io.masterkey_files): a killed run re-run skips finished parts,
`--config.job.num_workers`/`worker_index` split a job. `--replace=CKPT --out=FILE` writes a copy of
a .pth/.safetensors with every k×k depthwise kernel replaced by its fit (every other byte kept,
dwjax.io.checkpoint_rewrite); `--config.check.enabled=true` measures what the replacement changes
in an ImageNet network of the embedded default (dwjax.perf.master_key_agreement).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import ml_collections
import numpy as np
from absl import flags

from dwjax import cli
from dwjax.errors import ConfigError, UserError
from dwjax.io import assignment_files, atomic, paths, shards, sources
from dwjax.io import checkpoint_rewrite
from dwjax.io import masterkey_files as mk_files
from dwjax.io import workdir as workdir_lib
from dwjax.model import decoder, preprocess, restore
from dwjax.patterns import master_keys, scale_space

MODES = ("derive", "kmeans", "scale_space")


class MasterKeysError(UserError):
    """The run, the data or the bank cannot make a job (one-line message)."""


def run(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None, *,
        log: Callable[[str], None] = print, replace: str | None = None,
        out: str | None = None) -> dict:
    """Chooses or reads the bank, fits this worker's parts of every k×k kernel of `data_dir`
    (default: the embedded default's shards), then writes `out` (`replace` with its kernels
    replaced) and the functional check when asked.

    `config` is `configs/masterkeys.py`'s. Returns the summary (also in
    `masterkeys/rows/_meta/summary.json`) with `bank`, `coverage` and, when made, `replaced` and
    `functional`; while other workers' parts are missing, `complete` is False.
    """
    _check_config(config, replace, out)
    job = config.job
    rundir = workdir_lib.RunDir(workdir)
    k = workdir_lib.resolve_kernel_size(rundir, config.kernel_size,
                                        "with a bank file or --config.bank=scale_space")
    data_dir = sources.data_dir_or_default(data_dir, log)
    shard_list = list(shards.iter_shards(data_dir, k))
    if not shard_list:
        raise MasterKeysError(f"--data_dir {data_dir}: no {k}x{k} kernels")
    units = _sample(shard_list, config.sample, config.seed)
    if not len(units):
        raise MasterKeysError(f"--data_dir {data_dir}: every {k}x{k} kernel is dead (constant)")
    bank, ranked, described = _bank(config, rundir, k, units, log)
    if config.check.enabled and _check_ks(config.check.ks)[-1] > len(ranked):
        raise ConfigError(f"--config.check.ks {config.check.ks}: the bank ranks only "
                          f"{len(ranked)} filters (raise --config.curve)")
    coverage = _coverage(units, ranked, min(config.curve, len(ranked)), config.seed, k)
    flat = bank.reshape(len(bank), -1)
    settings = {"kernel_size": k, "bank": described, "num_filters": len(bank),
                "bank_sha256": hashlib.sha256(bank.tobytes()).hexdigest()}
    workdir_lib.ensure_dir(rundir)
    folder = rundir.masterkeys
    out_dir = mk_files.rows_dir(folder)
    assignment_files.check_settings(out_dir, settings, job.overwrite)
    atomic.clean_stale(out_dir)
    mk_files.save_bank(folder, bank)
    mk_files.write_table(mk_files.coverage_csv(folder), list(coverage[0]),
                         [list(r.values()) for r in coverage])
    at_k = coverage[len(bank) - 1]["master_keys"] if len(bank) <= len(coverage) else None
    log(f"bank: {len(bank)} {k}x{k} filters ({described}) → {mk_files.bank_txt(folder)}; "
        + (f"mean explained fraction of {len(units):,} sampled kernels {at_k:.3f}"
           if at_k is not None else ""))
    plan = assignment_files.plan_parts(shard_list, job.part_size)
    mine = plan[job.worker_index::job.num_workers]
    for part in mine:
        where = "" if part.whole else f" rows [{part.start:,}, {part.stop:,})"
        if assignment_files.is_done(out_dir, part, k, mk_files.FORMAT):
            log(f"{part.shard.source}{where}: already fitted, skipped")
            continue
        with mk_files.open_part(out_dir, part, k, data_dir, len(bank)) as writer:
            for a in range(part.start, part.stop, job.chunk_size):
                b = min(a + job.chunk_size, part.stop)
                fit = master_keys.fit(np.asarray(part.shard.kernels[a:b]), flat)
                shards.release_pages(part.shard.kernels, a, b)
                writer.write(fit.filter, fit.scale, fit.offset, fit.r2)
        stats = writer.stats()
        log(f"{part.shard.source}{where}: {stats['clustered']:,} of {stats['kernels']:,} kernels "
            f"fitted, mean r2 {stats['r2_sum'] / max(1, stats['clustered']):.3f}")
    done = sum(assignment_files.is_done(out_dir, p, k, mk_files.FORMAT) for p in plan)
    result = {"complete": done == len(plan), "parts_done": done, "parts_total": len(plan)}
    if result["complete"]:
        assignment_files.remove_stale(out_dir, plan, k)
        result = mk_files.write_summary(out_dir, _summary(out_dir, plan, k, settings))
    else:
        log(f"{done} of {len(plan)} parts done; the summary is written once every part is")
    result = {**result, "bank": mk_files.bank_npy(folder), "coverage": coverage}
    if replace is not None:
        replaced = checkpoint_rewrite.rewrite_depthwise(
            replace, out, k, lambda name, kernels: master_keys.replaced_kernels(kernels, flat))
        log(f"{out}: {sum(replaced.values()):,} {k}x{k} depthwise kernels in {len(replaced)} "
            "tensors replaced by their fits; every other tensor byte-equal to the input's")
        result["replaced"] = out
    if config.check.enabled:
        result["functional"] = _functional_check(config, folder, k, ranked, log)
    return result


def _check_config(config: ml_collections.ConfigDict, replace: str | None,
                  out: str | None) -> None:
    """Refuses values that cannot make a job, before anything is read or written."""
    job = config.job
    if not isinstance(config.bank, str) or not config.bank:
        raise ConfigError("--config.bank: derive, kmeans, scale_space or a bank file")
    if config.bank in ("derive", "kmeans") and config.num_filters < 1:
        raise ConfigError(f"--config.num_filters {config.num_filters}: must be at least 1")
    if config.bank == "derive" and config.num_filters > config.num_candidates:
        raise ConfigError(f"--config.num_filters {config.num_filters}: larger than the "
                          f"candidates (--config.num_candidates {config.num_candidates})")
    if config.bank == "derive" and config.num_candidates < 2:
        raise ConfigError(f"--config.num_candidates {config.num_candidates}: need at least 2")
    if config.bank == "scale_space":
        try:
            scale_space.parse_spec(config.scale_space)
        except ValueError as e:
            raise ConfigError(f"--config.scale_space: {e}")
    if config.curve < 1 or config.sample < 1:
        raise ConfigError(f"--config.curve {config.curve}, --config.sample {config.sample}: "
                          "must be at least 1")
    if job.part_size < 1 or job.chunk_size < 1:
        raise ConfigError(f"--config.job.part_size {job.part_size}, chunk_size "
                          f"{job.chunk_size}: must be at least 1")
    if job.num_workers < 1 or not 0 <= job.worker_index < job.num_workers:
        raise ConfigError(f"--config.job.worker_index {job.worker_index}: must be in [0, "
                          f"--config.job.num_workers {job.num_workers})")
    if job.overwrite and job.num_workers > 1:
        raise ConfigError("--config.job.overwrite: not with several workers (it clears their "
                          "rows); run it once alone")
    if (replace is None) != (out is None):
        raise ConfigError("--replace and --out: give both (the checkpoint and its copy)")
    if config.check.enabled:
        _check_ks(config.check.ks)


def _check_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ConfigError(f"--config.check.ks {text!r}: bank sizes ≥ 1, comma-separated")
    return ks


def _sample(shard_list: list[shards.Shard], n: int, seed: int) -> np.ndarray:
    """`[≤ n, k*k]` float64 live kernels, centred and unit: every kernel when the job has at most
    `n`, else a seeded draw spread over the shards in proportion to their size."""
    total = sum(len(s.kernels) for s in shard_list)
    rng = np.random.default_rng(seed)
    out = []
    for s in shard_list:
        m = len(s.kernels)
        if total <= n:
            kern = np.asarray(s.kernels)
        else:
            take = min(m, int(np.ceil(n * m / total)))
            kern = shards.take_rows(s.kernels, np.sort(rng.choice(m, take, replace=False)))
        units, live = master_keys.unit_kernels(kern)
        out.append(units[live])
    return np.concatenate(out)[:n]


def _bank(config: ml_collections.ConfigDict, rundir: workdir_lib.RunDir, k: int,
          units: np.ndarray, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, str]:
    """`(bank [K, k, k] float32 unit centred, ranked [n, k*k], description)`: `ranked` holds the
    candidates (or a given bank's filters) in greedy order, for the coverage curve and the
    functional check's banks of each K."""
    mode = config.bank
    if mode in ("derive", "kmeans"):
        if mode == "derive":
            params, train_config = restore.load_params(rundir)
            _, coords = decoder.decode_codes(params, train_config.model.negative_slope,
                                             config.num_candidates)
            candidates = master_keys.candidates_from_coords(coords, k)
            what = f"greedy {config.num_filters} of {config.num_candidates} decoded codes"
        else:
            candidates = _kmeans_centroids(rundir, k)
            what = f"greedy {config.num_filters} of {len(candidates)} k-means centroids"
        if config.num_filters > len(candidates):
            raise MasterKeysError(f"--config.num_filters {config.num_filters}: larger than the "
                                  f"{len(candidates)} candidates with a direction")
        n = min(max(config.curve, config.num_filters), len(candidates))
        order = master_keys.greedy_select(units, candidates, n).order
        ranked = candidates[order]
        bank = ranked[:config.num_filters]
        return bank.reshape(-1, k, k).astype(np.float32), ranked, what
    if mode == "scale_space":
        raw = scale_space.bank(config.scale_space, k)
        what = f"scale-space filters {config.scale_space}"
    else:
        raw = mk_files.read_bank_text(mode)
        if raw.shape[1] != k:
            raise mk_files.BankFileError(f"{mode}: {raw.shape[1]}x{raw.shape[1]} filters, the "
                                         f"kernels are {k}x{k}")
        what = f"file {os.path.abspath(mode)} (sha256 {shards.sha256_file(mode)[:16]})"
    try:
        bank = master_keys.unit_filters(raw)
    except ValueError as e:
        raise mk_files.BankFileError(f"{mode}: {e}")
    order = master_keys.greedy_select(units, bank, len(bank)).order
    return bank.reshape(-1, k, k).astype(np.float32), bank[order], what


def _kmeans_centroids(rundir: workdir_lib.RunDir, k: int) -> np.ndarray:
    """The run's k-means centroids (min-max codes, an affine image of each cluster's kernels) as
    unit centred candidates `[M, k*k]`."""
    path = rundir.kmeans_npz(k)
    try:
        with np.load(path) as z:
            centroids = np.asarray(z["centroids"], np.float64)
    except (OSError, KeyError, ValueError):
        raise MasterKeysError(f"{path}: no k-means centroids (run `python -m dwjax.assign "
                              f"--kernel_size={k}` first)")
    keep = np.ptp(centroids, axis=1) > 0
    return master_keys.unit_filters(centroids[keep])


def _coverage(units: np.ndarray, ranked: np.ndarray, n: int, seed: int, k: int) -> list[dict]:
    """Rows `{K, master_keys, pca, pca_subspace, kmeans}` for K = 1 … n: the mean explained
    fraction of the sample by the first K ranked filters, by the K leading principal components
    taken as single filters and as a subspace (NaN past k*k-1 components), and by K k-means
    centroids (K a power of two; NaN elsewhere)."""
    from dwjax.search import kmeans  # jax programs: only when a curve is drawn

    # the kernels span k*k-1 dimensions (centred): no more principal components than that
    pcs = master_keys.principal_filters(units, min(n, k * k - 1))
    keys = master_keys.coverage(units, ranked[:n])
    pad = np.full(n - len(pcs), np.nan)
    pca = np.concatenate([master_keys.coverage(units, pcs), pad])
    sub = np.concatenate([master_keys.subspace_coverage(units, pcs), pad])
    coords = (units @ preprocess.hyperplane_basis(k)).astype(np.float32)
    rows = []
    for i in range(n):
        K = i + 1
        km = np.nan
        if K & (K - 1) == 0 and K <= len(units):
            centroids, _ = kmeans.fit_kmeans(coords, K, seed)
            km = float(master_keys.coverage(
                units, master_keys.candidates_from_coords(centroids, k))[-1])
        rows.append({"K": K, "master_keys": float(keys[i]), "pca": float(pca[i]),
                     "pca_subspace": float(sub[i]), "kmeans": km})
    return rows


def _summary(out_dir: str, plan: list, k: int, settings: dict) -> dict:
    """Totals over every part: kernels, fitted ones, mean r2, kernels per filter, per source."""
    per_source: dict[str, dict] = {}
    for part in plan:
        with open(assignment_files.stats_path(out_dir, part, k)) as f:
            s = json.load(f)
        d = per_source.setdefault(s["source"], {"source": s["source"], "kernels": 0, "fitted": 0,
                                                "r2_sum": 0.0, "labels": {}})
        d["kernels"] += s["kernels"]
        d["fitted"] += s["clustered"]
        d["r2_sum"] += s["r2_sum"]
        for name, v in s["labels"].items():
            d["labels"][name] = d["labels"].get(name, 0) + v
    sources_ = list(per_source.values())
    for d in sources_:
        d["mean_r2"] = d.pop("r2_sum") / max(1, d["fitted"])
    kernels = sum(d["kernels"] for d in sources_)
    fitted = sum(d["fitted"] for d in sources_)
    return {"complete": True, **settings, "kernels": kernels, "fitted": fitted,
            "mean_r2": sum(d["mean_r2"] * d["fitted"] for d in sources_) / max(1, fitted),
            "sources": sources_}


def _functional_check(config: ml_collections.ConfigDict, folder: str, k: int,
                      ranked: np.ndarray, log: Callable[[str], None]) -> str:
    from dwjax.perf import master_key_agreement  # torch: only when the check is asked for

    ks = _check_ks(config.check.ks)
    banks = {K: ranked[:K].reshape(K, k, k).astype(np.float32) for K in ks}
    rows = master_key_agreement.agreement(
        k, banks, seed=config.seed, images=config.check.images,
        views_per_image=config.check.views_per_image, batch_size=config.check.batch_size,
        log=log)
    header, table = master_key_agreement.table_rows(rows)
    return mk_files.write_table(mk_files.functional_csv(folder), header, table)


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def define_flags() -> None:
    cli.define_workdir_flags("Kernel shards to fit")
    replacement = {"replace": "A .pth/.safetensors whose depthwise kernels of the bank's size are "
                              "replaced by their fits (with --out).",
                   "out": "Where the replaced checkpoint is written."}
    for name, meaning in replacement.items():
        flags.DEFINE_string(name, None, meaning)


def main(argv):
    del argv
    cli.setup()
    with cli.user_errors("masterkeys"):
        config = cli.stage_config()
        workdir = FLAGS.workdir or paths.default_workdir(config.kernel_size or 5)
        summary = run(config, workdir, FLAGS.data_dir, replace=FLAGS.replace, out=FLAGS.out)
    rows = mk_files.rows_dir(workdir_lib.RunDir(workdir).masterkeys)
    cli.end_job(summary, lambda s: f"{s['fitted']:,} of {s['kernels']:,} kernels fitted to "
                f"{s['num_filters']} filters, mean explained fraction {s['mean_r2']:.3f}; "
                f"rows in {rows}/", config.job.worker_index, rows, "fitted")


if __name__ == "__main__":
    cli.run_config_stage("masterkeys", main, define_flags)
