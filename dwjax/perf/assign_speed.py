"""Assign benchmark (`python -m dwjax.bench --parts=assign`), all measured in one run on N
synthetic 7×7 kernels against M = 10,000 codes decoded by a 7×7 run trained for the purpose. Each
kernel set is written as one `.npz` and converted by `python -m dwjax.convert --kernels_npz` (one
shard), in a temporary directory (`tmp`, default the system's).

  command   `python -m dwjax.assign` end to end, as a user runs it (imports, model load, decoding,
            search, row writing, summary), after one warm-up run (compilation and page cache);
            peak RSS (VmHWM) at N and at a smaller N: memory should be flat in N. From the two
            sizes: the command's rate per extra kernel, (N − n)/(t_N − t_n), and its fixed cost
            t_N − N/that rate, set against a bare `python -c "import jax"` (what any command
            using jax pays before its first line)
  search    `nearest.nearest_codes` in this process on the same memmapped kernels and codes,
            compiled, brute force and pruned in turn, three rounds (`perf.search_speed`; rates
            at the median times, their ratio the median of the rounds'); "search alone" is the
            method the command picks (`--config.search=auto` with the same evidence: a spread
            sample of the kernels). Brute force and pruned must return the same rows (index and
            dissimilarity of every kernel) or no ratio between them is given. The headline's
            three times (the command at N, at n, the search alone) are taken in five
            interleaved rounds; each round's command is set against the search run beside it
            and the median of those five ratios is the row's, so a drift in the shared
            machine's speed falls on both sides of each ratio (rates: the median times)
  peak      numpy's fp32 4096³ GEMM in a subprocess with OPENBLAS_CORETYPE/L2_SIZE unset. The
            command's brute-force-equivalent rate is 2·N·48·10⁴ / time (the flops brute force
            would do); beside it the GEMM flops the pruned search really does
            (`search_work.pruned_gemm_flops`) over its own time
  naive     the plain numpy program a user would write: chunks of kernels embedded, one
            `[chunk, M]` similarity GEMM each, argmax; the fastest of a few chunk sizes, on
            `naive_n` kernels; its rows must agree with the search's up to float32 near-ties
  5×5       brute force vs the pruned search with a 5×5 decoder trained on the embedded default
            (`train_5x5_epochs`) on its distinct real kernels (up to `n_5x5`: the embedded
            default has fewer, and the table says so); skipped when its weights are not installed
  host      the host's ceiling (`host_ceiling`): the command with the search replaced by a
            trivial answer, rows/s of `dwjax.assign.run` at 1 host thread and at every core, per
            extra row between the two sizes (fixed costs cancel), set against the search alone;
            the rows of the two thread counts must be equal
  packing   the command with brute force on the small set as one part and as 50 parts
            (`--config.job.part_size`): chunks run over parts, so the many-part job should cost
            what the one-part job does
  degenerate  a decoder trained one epoch on random kernels (its codes all decode nearly alike:
            cap radius ~0, which alone would say "pruned"): the command with
            `--config.search=auto`, brute and pruned (best of `reps`, interleaved) on
            `n_degenerate` kernels; auto against the faster, once all three gave the same rows
  k-means   peak RSS of `python -m dwjax.assign --kernel_size=3` (fit and assignment) at
            `n_kmeans` synthetic 3×3 kernels against `small_kmeans`
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from typing import Callable

import numpy as np

from dwjax.io import shards
from dwjax.perf import assign_jobs, host_ceiling, machine, search_speed, search_work
from dwjax.perf.assign_jobs import K
from dwjax.perf.search_speed import D, M


def command_vs_search(workdir: str, big: str, small: str, small_n: int, env: dict, kernels,
                      recon, method: str, reps: int = 5) -> dict:
    """The headline's three measurements in `reps` interleaved rounds
    (`search_speed.interleaved`): the command on the `big` set, on the `small` set (`small_n`
    kernels), then `nearest_codes` alone with `method` on `kernels` (the big set's). Each round
    gives its own ratios (command vs the search run beside it, end to end and per extra kernel),
    so a drift of the shared machine's speed falls on both sides of each; the medians of those
    ratios, the median times, every time, and the commands' largest peak RSS."""
    from dwjax.search import nearest

    nearest.nearest_codes(kernels[:nearest.DEFAULT_CHUNK], recon, method=method)  # compile
    big_runs: list[dict] = []
    small_runs: list[dict] = []
    times, _ = search_speed.interleaved({
        "command": lambda: big_runs.append(assign_jobs.run_command(workdir, big, env)),
        "command_small": lambda: small_runs.append(assign_jobs.run_command(workdir, small, env)),
        "search": functools.partial(nearest.nearest_codes, kernels, recon, method=method)}, reps)
    big_n, search_s = len(kernels), times["search"]
    # the commands' own walls (run_command times the subprocess alone, not the clean-up before)
    walls = {"command": [r["wall"] for r in big_runs],
             "command_small": [r["wall"] for r in small_runs], "search": search_s}
    e2e = [s / w for s, w in zip(search_s, walls["command"])]
    per_extra = [(big_n - small_n) / max(w - ws, 1e-9) * s / big_n
                 for s, w, ws in zip(search_s, walls["command"], walls["command_small"])]
    return {"wall": float(np.median(walls["command"])),
            "wall_small": float(np.median(walls["command_small"])),
            "search_s": float(np.median(search_s)), "times": walls,
            "e2e_ratio": float(np.median(e2e)), "per_extra_ratio": float(np.median(per_extra)),
            "e2e_ratios": e2e, "rss_mib": max(r["rss_mib"] for r in big_runs),
            "rss_mib_small": max(r["rss_mib"] for r in small_runs)}


# --------------------------------------------------------- host ceiling, degenerate curve, k-means

def host_rates(workdir: str, big: str, small: str, env: dict, n: int, small_n: int,
               reps: int = 2) -> dict:
    """Rows/s of `dwjax.assign.run` with the trivial search (`host_ceiling`), at one host thread
    and at every core, after a warm-up: per extra row between the `small` (`small_n` kernels) and
    the `big` set (`n`), where the job's fixed costs cancel (each size's best of `reps` runs),
    and over the whole `big` job; and whether the two thread counts wrote the same rows."""
    def job(data: str, threads: int) -> float:
        return assign_jobs.run_command(workdir, data, env, (f"--config.job.threads={threads}",),
                                       wrapper=host_ceiling.WRAPPER)["run_s"]

    job(small, 0)  # warm-up: the compilation cache, the page cache
    out: dict = {}
    for threads in (1, 0):
        t_small = min(job(small, threads) for _ in range(reps))
        t_big = min(job(big, threads) for _ in range(reps))
        out[threads] = {"rows_per_s": (n - small_n) / max(t_big - t_small, 1e-9),
                        "whole_job_rows_per_s": n / t_big, "run_s": t_big,
                        "run_small_s": t_small, "digest": assign_jobs.rows_digest(workdir)}
    out["same_rows"] = out[1]["digest"] == out[0]["digest"]
    return out


def degenerate_curve(tmp: str, env: dict, data: str, n: int, reps: int = 3) -> dict:
    """The command on a degenerate decoder (one epoch on random kernels) with
    `--config.search=auto|brute|pruned`: best wall of `reps` interleaved runs each (after one
    warm-up run each, so no method pays a compilation), auto's own log line, the decoder's median
    cap radius and the share of brute force's products the pruned search does on these kernels,
    and whether all three wrote the same rows."""
    from dwjax.search import device_programs, nearest

    noise = assign_jobs.convert_set(tmp, "noise", 20_000, env, blocks=[
        np.random.default_rng(5).standard_normal((20_000, K, K)).astype(np.float32)])
    workdir = assign_jobs.train_decoder(tmp, env, 1, name="run_degenerate", data=noise)
    recon = search_speed.decoded_codes(workdir)
    tables = device_programs.pruned_tables(device_programs.tiles(recon, nearest.DEFAULT_TILE_M))
    (shard,) = shards.iter_shards(data, K)
    out: dict = {"n": n, "median_cap_radius": float(tables.radius),
                 "pruned_visited_fraction":
                     search_work.pruned_gemm_flops(shard.kernels, recon)["visited_fraction"]}
    del shard
    walls: dict = {m: [] for m in ("auto", "brute", "pruned")}
    digests = {}
    for method in walls:  # warm-up: each method's program into the compilation cache
        assign_jobs.run_command(workdir, data, env, (f"--config.search={method}",))
    for _ in range(reps):
        for method in walls:
            r = assign_jobs.run_command(workdir, data, env, (f"--config.search={method}",))
            walls[method].append(r["wall"])
            digests[method] = assign_jobs.rows_digest(workdir)
            if method == "auto":
                out["auto_choice"] = " ".join(
                    line.strip() for line in r["stdout"].splitlines()
                    if line.startswith("nearest-code search:"))
    out["wall"] = {m: min(w) for m, w in walls.items()}
    out["walls"] = walls
    out["same_rows"] = len(set(digests.values())) == 1
    return out


def packing(workdir: str, data: str, env: dict, n: int, parts: int = 50, reps: int = 2) -> dict:
    """The command with brute force on `data` (`n` kernels) as one part and as `parts` parts
    (`job.part_size`), best of `reps` each after a warm-up: chunks packed across parts make
    the many-part job cost what the one-part job does (padded per part, it searched up to
    `parts` × chunk_size rows)."""
    brute = ("--config.search=brute",)
    cut = brute + (f"--config.job.part_size={-(-n // parts)}",)
    assign_jobs.run_command(workdir, data, env, brute)  # warm-up: brute force's program
    return {"parts": parts,
            "one": min(assign_jobs.run_command(workdir, data, env, brute)["wall"]
                       for _ in range(reps)),
            "many": min(assign_jobs.run_command(workdir, data, env, cut)["wall"]
                        for _ in range(reps))}


def kmeans_rss(tmp: str, env: dict, n: int, small_n: int) -> dict:
    """Peak RSS and wall of `python -m dwjax.assign --kernel_size=3` (k-means fit and
    assignment, fresh workdir) at `n` and `small_n` synthetic 3×3 kernels, after a warm-up."""
    big = assign_jobs.convert_set(tmp, "k3_big", n, env, seed=6, k=3)
    small = assign_jobs.convert_set(tmp, "k3_small", small_n, env, seed=7, k=3)
    workdir = os.path.join(tmp, "run_k3")
    assign_jobs.run_command(workdir, small, env, ("--kernel_size=3",), fresh=True)  # warm-up
    out = {}
    for name, data, size in (("big", big, n), ("small", small, small_n)):
        r = assign_jobs.run_command(workdir, data, env, ("--kernel_size=3",), fresh=True)
        out[name] = {"n": size, "wall": r["wall"], "rss_mib": r["rss_mib"]}
    shutil.rmtree(big, ignore_errors=True)
    return out


def disk_bytes(n: int, small_n: int, n_kmeans: int = 0, small_kmeans: int = 0) -> int:
    """About the most temporary disk `run` holds at once: the 7×7 sets (shard and metadata, the
    larger one's `.npz` while it converts, rows), then the 3×3 sets the same way."""
    def phase(big: int, small: int, k: int) -> float:
        shard = 4 * k * k + 8  # kernel and metadata bytes per kernel
        return (big + small) * shard + 4 * k * k * big + 48 * big  # rows: under 48 B each
    return int(1.2 * max(phase(n, small_n, K), phase(n_kmeans, small_kmeans, 3)) + 2**30)


# ------------------------------------------------------------------------------------- the table

def _seconds(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def count(n: int) -> str:
    """A kernel count as a short label: 10M, 250k, 23,854."""
    for unit, name in ((1_000_000, "M"), (1_000, "k")):
        if n >= unit and n % unit == 0:
            return f"{n // unit:,}{name}"
    return f"{n:,}"


def compared_row(what: str, ours: float, reference: float, unit: str, target: str,
                 differ: int, notes: list[str], n: int, ratio: float | None = None) -> dict:
    """A ratio between two methods (`ratio`, else ours / reference), given only when they
    returned the same rows (`differ` == 0); otherwise the row says "refused" and a note says how
    many rows differed."""
    if differ:
        notes.append(f"{what}: rows differ in {differ:,} of {n:,} kernels: no ratio given")
        return machine.row(what, ours, reference, unit, None, "refused")
    return machine.row(what, ours, reference, unit,
                       ours / reference if ratio is None else ratio, target)


def run(n: int = 1_000_000, small_n: int = 250_000, naive_n: int = 100_000,
        train_epochs: int = 10, train_5x5_epochs: int = 50, n_5x5: int = 500_000,
        n_degenerate: int = 1_000_000, n_kmeans: int = 0, small_kmeans: int = 0,
        tmp: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The benchmark's entry (see the module docstring); `n_5x5`, `n_degenerate` or `n_kmeans`
    0 skips that part."""
    d = tempfile.mkdtemp(prefix="dwjax-bench-assign-", dir=tmp)
    env = dict(os.environ, DWJAX_HOME=os.path.join(d, "home"))
    notes: list[str] = []
    t0 = time.perf_counter()

    def step(what: str) -> None:
        log(f"assign: {what} ({time.perf_counter() - t0:.0f} s, load {machine.load_average()})")

    try:
        step("training the 7x7 decoder, converting the kernel sets")
        workdir = assign_jobs.train_decoder(d, env, train_epochs)
        sets = {n: assign_jobs.convert_set(d, "big", n, env, seed=0)}
        sets.setdefault(small_n, assign_jobs.convert_set(d, "small", small_n, env, seed=2))
        big, small = sets[n], sets[small_n]
        step("the search by method")
        recon = search_speed.decoded_codes(workdir)
        (shard,) = shards.iter_shards(big, K)
        search = search_speed.search_rates(recon, shard.kernels)
        step("the command and the search alone, interleaved")
        assign_jobs.run_command(workdir, small, env)  # warm-up: compilation and page caches
        peak = machine.gemm_peak_gflops()
        headline = command_vs_search(workdir, big, small, small_n, env, shard.kernels, recon,
                                     search["auto_method"])
        alone = n / headline["search_s"]
        del shard
        bare = assign_jobs.bare_jax_start(env)
        step("the host ceiling")
        host = host_rates(workdir, big, small, env, n, small_n)
        step("packing: many parts vs one, brute force")
        packed = packing(workdir, small, env, small_n)
        step("the naive numpy program")
        naive = search_speed.naive_rate(recon, naive_n)
        step("pruned vs brute force, 5x5")
        five = (search_speed.pruned_vs_brute_5x5(d, env, train_5x5_epochs, n_5x5)
                if n_5x5 else None)
        degenerate = None
        if n_degenerate:
            step("the degenerate curve")
            if n_degenerate not in sets:
                sets[n_degenerate] = assign_jobs.convert_set(d, "degenerate", n_degenerate, env,
                                                             seed=4)
            degenerate = degenerate_curve(d, env, sets[n_degenerate], n_degenerate)
        for data in sets.values():
            shutil.rmtree(data, ignore_errors=True)
        km = None
        if n_kmeans:
            step("3x3 k-means")
            km = kmeans_rss(d, env, n_kmeans, small_kmeans)
        step("done")
    finally:
        shutil.rmtree(d, ignore_errors=True)

    wall, wall_small = headline["wall"], headline["wall_small"]
    e2e = n / wall
    bf_gflops = search_work.brute_equivalent_flops(n, D, M) / wall / 1e9
    work = search["pruned_work"]
    pruned_gflops = work["flops"]["total"] * search["pruned"] / n / 1e9
    per_kernel = (n - small_n) / max(wall - wall_small, 1e-9)  # the fixed cost cancels
    fixed = wall - n / per_kernel
    log(f"assign: command {wall:.2f} s for {n:,} 7x7 kernels x {M:,} codes "
        f"({e2e:,.0f} kernels/s, {bf_gflops:.0f} GFLOP/s brute-force-equivalent); search "
        f"{alone:,.0f} kernels/s ({search['auto_method']}); GEMM peak {peak:.0f} "
        "GFLOP/s")
    notes.append(f"search alone: {search['auto_method']}, as the command picks it "
                 f"({search['auto_choice'] or 'no log line'})")
    times = headline["times"]
    notes.append(f"headline: {len(times['search'])} interleaved rounds (seconds: command at "
                 f"{count(n)} {_seconds(times['command'])}, at {count(small_n)} "
                 f"{_seconds(times['command_small'])}, search alone {_seconds(times['search'])}); "
                 "rates are the median times', ratios the median of each round's own (end to "
                 f"end: {', '.join(f'{r:.0%}' for r in headline['e2e_ratios'])})")
    notes.append("brute-force-equiv.: 2·N·48·10,000 flops (every kernel times every code) "
                 "over the command's time; flops done: the GEMMs the pruned search runs "
                 f"(bounds, caps, {work['windows']:,} windows of {work['window_rows']} codes: "
                 f"{work['visited_fraction']:.1%} of brute force's products) over its time")
    rows = [
        machine.row("command end to end vs search alone", e2e, alone, "kernels/s",
                    headline["e2e_ratio"], ">= 90%"),
        machine.row("per extra kernel vs search alone", per_kernel, alone,
                    "kernels/s", headline["per_extra_ratio"], percent=True),
        machine.row("command fixed cost vs bare jax start", fixed, bare, "s", fixed / bare),
        machine.row("command, brute-force-equiv. vs peak", bf_gflops, peak, "GFLOP/s",
                    bf_gflops / peak, ">= 100%"),
        machine.row("pruned search, flops done vs peak", pruned_gflops, peak, "GFLOP/s",
                    pruned_gflops / peak, percent=True),
    ]
    naive_what = f"search vs chunked numpy, n={count(naive_n)}"
    rows.append(compared_row(naive_what, alone, naive["kernels_per_s"], "kernels/s",
                             "", naive["beyond_ties"], notes, naive_n))
    notes.append(f"chunked numpy: {naive['chunk']:,} kernels per chunk (fastest of "
                 f"{', '.join(map(str, search_speed.NAIVE_CHUNKS))}; "
                 f"{naive['temporary_mib']:.0f} MiB "
                 f"similarity block); codes differ from the search's on {naive['differ']:,} "
                 f"kernels, {naive['beyond_ties']:,} beyond float32 near-ties")
    rows.append(compared_row("pruned vs brute-force search, 7x7", search["pruned"],
                             search["brute"], "kernels/s", ">= 2x", search["differ"], notes, n,
                             search["pruned_over_brute"]))
    if five:
        rows.append(compared_row("pruned vs brute, 5x5 real distinct",
                                 five["pruned"], five["brute"], "kernels/s", ">= 2x",
                                 five["differ"], notes, five["n"], five["pruned_over_brute"]))
        notes.append(f"5x5: {five['n']:,} distinct real kernels of the embedded default, "
                     "none repeated" + ("" if five["n"] == five["asked"] else
                                        f" ({five['asked']:,} asked; it has "
                                        f"{five['distinct']:,} distinct 5x5 kernels of "
                                        f"{five['real_kernels']:,}: all used)"))
    else:
        rows.append(machine.row("pruned vs brute force, 5x5", None, None, "kernels/s", None,
                                "skipped"))
        notes.append("5x5: skipped (" + ("--assign_5x5_n=0" if not n_5x5 else
                                         "embedded default not installed") + ")")
    rss, rss_small = headline["rss_mib"], headline["rss_mib_small"]
    rows.append(machine.row(f"command peak RSS, N={count(n)} vs {count(small_n)}", rss,
                            rss_small, "MiB", rss / rss_small,
                            "<= 1.15x"))
    for threads, name in ((1, "1 thread"), (0, "all cores")):
        h = host[threads]["rows_per_s"]
        rows.append(machine.row(f"host ceiling, {name} vs search", h, alone,
                                "rows/s", h / alone, ">= 10x"))
    rows.append(machine.row(f"{packed['parts']} parts vs one, brute force, N={count(small_n)}",
                            packed["many"], packed["one"], "s", packed["many"] / packed["one"],
                            "<= 1.15x"))
    notes.append(f"packing: `--config.search=brute` on {small_n:,} kernels as one part "
                 f"{packed['one']:.2f} s, as {packed['parts']} parts (--config.job.part_size) "
                 f"{packed['many']:.2f} s: chunks run over parts, so the padding is paid once")
    notes.append(f"host ceiling: dwjax.assign.run with the search replaced by a trivial answer "
                 f"(perf.host_ceiling), per extra row from {small_n:,} to {n:,} kernels; over "
                 f"the whole {n:,}-kernel job {host[1]['whole_job_rows_per_s']:,.0f} rows/s at 1 "
                 f"thread, {host[0]['whole_job_rows_per_s']:,.0f} at all cores; rows at 1 "
                 "thread and all cores " + ("equal" if host["same_rows"] else "DIFFER"))
    if degenerate:
        w = degenerate["wall"]
        faster = min(w["brute"], w["pruned"])
        rows.append(compared_row("degenerate curve: auto vs faster method",
                                 w["auto"], faster, "s", "<= 1.05x",
                                 0 if degenerate["same_rows"] else n_degenerate, notes,
                                 n_degenerate))
        notes.append(f"degenerate curve: decoder trained 1 epoch on random kernels, median cap "
                     f"radius {degenerate['median_cap_radius']:.3f} rad; the pruned search's "
                     f"windows cover {degenerate['pruned_visited_fraction']:.0%} of brute force's "
                     f"products; commands on {n_degenerate:,} kernels: auto {w['auto']:.2f} s, "
                     f"brute {w['brute']:.2f} s, pruned {w['pruned']:.2f} s (best of 3); "
                     f"{degenerate.get('auto_choice', '')}")
    if km:
        b, s = km["big"], km["small"]
        rows.append(machine.row(f"3x3 k-means peak RSS, N={count(b['n'])} vs {count(s['n'])}",
                                b["rss_mib"], s["rss_mib"], "MiB", b["rss_mib"] / s["rss_mib"],
                                "<= 1.3x"))
        notes.append(f"3x3 k-means: `python -m dwjax.assign --kernel_size=3` {b['wall']:.1f} s "
                     f"for {b['n']:,} kernels, {s['wall']:.1f} s for {s['n']:,}")
    figures = {"n": n, "small_n": small_n, "naive_n": naive_n, "codes": M, "dim": D,
               "command_s": wall, "command_small_s": wall_small, "command_kernels_per_s": e2e,
               "command_per_extra_kernel_per_s": per_kernel, "command_fixed_s": fixed,
               "bare_jax_start_s": bare, "command_brute_equivalent_gflops": bf_gflops,
               "gemm_peak_gflops": peak, "pruned_gemm_gflops": pruned_gflops,
               "pruned_work": work,
               "search_kernels_per_s": {k: search[k] for k in ("auto", "brute", "pruned")},
               "search_alone_kernels_per_s": alone, "interleaved_s": headline["times"],
               "search_method": search["auto_method"], "search_choice": search["auto_choice"],
               "methods_differ": search["differ"], "naive": naive,
               "rss_mib": {str(n): rss, str(small_n): rss_small},
               "pruned_5x5": five,
               "host_ceiling": {str(k): v for k, v in host.items()},
               "degenerate": degenerate, "kmeans": km, "packing": packed}
    return {"benchmark": "assign", "skipped": None, "rows": rows, "figures": figures,
            "notes": notes,
            "seconds": {"command": wall, "command_small": wall_small,
                        "search": n / alone}}

