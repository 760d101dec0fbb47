"""The search side of the assign benchmark (`perf.assign_speed`, which describes every row):
`nearest_codes` by method on the same kernels, the plain numpy program a user would write, the
pruned search on the embedded default's distinct 5×5 kernels, and how two answers compare.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np

from dwjax.io import shards
from dwjax.perf import assign_jobs, search_work
from dwjax.perf.assign_jobs import K

D, M = 48, 10_000
# Chunk sizes tried for the naive numpy program (it is given its fastest); the largest one's
# similarity block is 4096 × 10,000 float32.
NAIVE_CHUNKS = (256, 1024, 4096)
# A naive row may differ from the search's only where both codes' float64 similarities are this
# close (float32 rounding of a near-tie).
NEAR_TIE = 1e-5


def same_rows(a: tuple, b: tuple) -> int:
    """Kernels whose `(idx, dis)` differ between two searches' answers (0: the same rows)."""
    return int(np.count_nonzero((a[0] != b[0]) | (a[1].view(np.int32) != b[1].view(np.int32))))


def even_sample(kernels, n: int = 2048) -> np.ndarray:
    """`[≤ n, k, k]` kernels evenly spread over `kernels` (the evidence `assign` gives
    `--config.search=auto`)."""
    idx = np.unique(np.linspace(0, len(kernels) - 1, min(n, len(kernels))).astype(int))
    return np.asarray(kernels[idx], np.float32)


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Each of `runs` (`{name: fn}`) called once per round, in turn, `rounds` rounds (a drift of
    the shared machine's speed falls on every one of a round alike): `({name: [seconds]},
    {name: the last call's result})`."""
    times: dict = {name: [] for name in runs}
    last: dict = {}
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t)
    return times, last


def method_rates(times: dict, n: int) -> dict:
    """From `interleaved` times of "brute" and "pruned" on n kernels: each one's kernels/s at
    its median time, and `pruned_over_brute`, the median of each round's own ratio."""
    return {"brute": n / float(np.median(times["brute"])),
            "pruned": n / float(np.median(times["pruned"])),
            "pruned_over_brute": float(np.median(np.divide(times["brute"], times["pruned"]))),
            "seconds": times}


def search_rates(recon: np.ndarray, kernels, rounds: int = 3) -> dict:
    """Kernels/s of `nearest_codes` brute force and pruned on `kernels` (compiled, `interleaved`
    rounds), the method `auto` picks with a sample's evidence (and its log line), how many rows
    the two methods disagree on, and the GEMM flops the pruned search does."""
    from dwjax.search import nearest

    n = len(kernels)
    lines: list[str] = []
    chooser = nearest.Searcher(recon, K, method="auto", sample=even_sample(kernels),
                               log=lines.append)
    out: dict = {"auto_method": chooser.method, "auto_choice": " ".join(lines)}
    for method in ("brute", "pruned"):
        nearest.nearest_codes(kernels[:nearest.DEFAULT_CHUNK], recon, method=method)  # compile
    times, answers = interleaved(
        {m: functools.partial(nearest.nearest_codes, kernels, recon, method=m)
         for m in ("brute", "pruned")}, rounds)
    out.update(method_rates(times, n))
    out["auto"] = out[out["auto_method"]]
    out["differ"] = same_rows(answers["brute"], answers["pruned"])
    out["pruned_work"] = search_work.pruned_gemm_flops(kernels, recon)
    return out


# ------------------------------------------------------------------------------------- naive

def naive_assign(kernels: np.ndarray, recon: np.ndarray, chunk: int) -> tuple:
    """The plain numpy program: per chunk of kernels, centre, normalise, project onto the
    hyperplane basis, one `[chunk, M]` similarity GEMM with the unit codes, argmax. Returns
    `(idx [n], dis [n])`."""
    from dwjax.model import preprocess

    n, k = len(kernels), kernels.shape[-1]
    basis = np.asarray(preprocess.hyperplane_basis(k), np.float32)
    r = np.asarray(recon, np.float32)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    idx, dis = np.empty(n, np.int64), np.empty(n, np.float32)
    for a in range(0, n, chunk):
        w = np.asarray(kernels[a:a + chunk], np.float32).reshape(-1, k * k)
        w = w - w.mean(axis=1, keepdims=True)
        x = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ basis
        sims = x @ r.T
        best = sims.argmax(axis=1)
        idx[a:a + len(w)] = best
        dis[a:a + len(w)] = 1.0 - sims[np.arange(len(w)), best]
    return idx, dis


def disagreements(kernels: np.ndarray, recon: np.ndarray, idx_a, idx_b) -> dict:
    """Kernels whose codes differ between two answers, and of those the ones that are not
    float32 near-ties (the two codes' float64 similarities more than NEAR_TIE apart)."""
    from dwjax.model import preprocess

    diff = np.flatnonzero(np.asarray(idx_a) != np.asarray(idx_b))
    if len(diff) == 0:
        return {"differ": 0, "beyond_ties": 0}
    k = kernels.shape[-1]
    x = np.asarray(preprocess.embed(np.asarray(kernels[diff], np.float64),
                                    np.asarray(preprocess.hyperplane_basis(k), np.float64)))
    r = np.asarray(recon, np.float64)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    sa = np.einsum("nd,nd->n", x, r[np.asarray(idx_a)[diff]])
    sb = np.einsum("nd,nd->n", x, r[np.asarray(idx_b)[diff]])
    return {"differ": int(len(diff)), "beyond_ties": int(np.sum(np.abs(sa - sb) > NEAR_TIE))}


def naive_rate(recon: np.ndarray, n: int, reps: int = 2) -> dict:
    """Kernels/s of `naive_assign` at its fastest chunk size, and how its rows compare with
    `nearest_codes`' on the same kernels."""
    from dwjax.search import nearest

    kernels = assign_jobs.synthetic_kernels(n, seed=3)
    times = {c: assign_jobs.best_of(lambda: naive_assign(kernels, recon, c), reps)
             for c in NAIVE_CHUNKS}
    chunk = min(times, key=lambda c: times[c][0])
    idx, _ = times[chunk][1]
    ours, _ = nearest.nearest_codes(kernels, recon)
    return {"kernels_per_s": n / times[chunk][0], "chunk": chunk,
            "by_chunk": {str(c): n / t for c, (t, _) in times.items()},
            "temporary_mib": chunk * M * 4 / 2**20,
            **disagreements(kernels, recon, ours, idx)}


# -------------------------------------------------------------------------------------- 5×5

def distinct(kernels: np.ndarray) -> np.ndarray:
    """The distinct kernels of `[n, k, k]`, in first-appearance order."""
    flat = np.ascontiguousarray(kernels).reshape(len(kernels), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    return kernels[np.sort(first)]


def pruned_vs_brute_5x5(tmp: str, env: dict, epochs: int, n: int,
                        rounds: int = 7) -> dict | None:
    """Kernels/s of both methods with a trained 5×5 decoder on up to `n` distinct real kernels
    of the embedded default, rows compared; None without its weights."""
    from dwjax.errors import UserError
    from dwjax.io import sources
    from dwjax.io import workdir as workdir_lib
    from dwjax.model import decoder, restore
    from dwjax.search import nearest

    data = os.path.join(tmp, "data_5x5")
    try:
        shards.add_sources(data, sources.embedded_sources(), log=lambda *_: None)
    except UserError:
        return None
    workdir = os.path.join(tmp, "run_5x5")
    assign_jobs.run_python(["-m", "dwjax.train", "--kernel_size=5", f"--workdir={workdir}",
                            f"--data_dir={data}", f"--config.num_epochs={epochs}"], env)
    params, config = restore.load_params(workdir_lib.RunDir(workdir))
    _, recon = decoder.decode_codes(params, config.model.negative_slope, M)
    real = np.concatenate([np.asarray(s.kernels) for s in shards.iter_shards(data, 5)])
    unique = distinct(real)
    kernels = unique[:n]
    out = {"asked": n, "real_kernels": len(real), "distinct": len(unique), "n": len(kernels)}
    searches = {m: nearest.Searcher(recon, 5, method=m) for m in ("brute", "pruned")}
    for search in searches.values():
        search(kernels)  # compile
    times, answers = interleaved({m: functools.partial(search, kernels)
                                  for m, search in searches.items()}, rounds)
    out.update(method_rates(times, len(kernels)))
    out["differ"] = same_rows(answers["brute"], answers["pruned"])
    return out


def decoded_codes(workdir: str) -> np.ndarray:
    """The `[M, d]` reconstructions of a run's M evenly spaced codes, as `assign` decodes them."""
    from dwjax.io import workdir as workdir_lib
    from dwjax.model import decoder, restore

    params, config = restore.load_params(workdir_lib.RunDir(workdir))
    return decoder.decode_codes(params, config.model.negative_slope, M)[1]
