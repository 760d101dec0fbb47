"""nearest_codes against the float64 brute force, on 1 and on 8 simulated CPU devices, for both
methods; the pruned search against brute force on curves and adversarial inputs.

Near-ties are excluded explicitly: kernels whose float64 top-2 cosine gap is ≤ 1e-4 are dropped from
the random data (float32 may legitimately pick either of two reconstructions that close). Exact ties
are tested separately with duplicated reconstruction rows (lowest index must win). Pruned and brute
force are compared exactly everywhere (same index, same float32 dissimilarity): on XLA:CPU their
GEMMs round alike, so even near-ties must come out the same.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwjax.io import shards
from dwjax.model import preprocess
from dwjax.search import device_programs, nearest
from tests.helpers import cpu_only
from tests.reference import curve_kernels, nearest_codes_reference, similarities, template_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAP = 1e-4
# On the curve neighbouring codes are close: a smaller gap, still ~100× float32 rounding.
CURVE_GAP = 1e-5
# (name, kernel size, N before near-tie exclusion, M, {method: chunk sizes}). M is not a multiple
# of the 64-row tile (nearest.DEFAULT_TILE_M); chunks that do and do not divide N, and one larger
# than N. Random reconstructions are no curve: pruned degenerates to visiting every tile, still
# exact. "curve" is a decoder-like curve, where pruned skips most tiles.
CASES = [("k5", 5, 300, 1000, {"brute": (128, 100, 150, 4096), "pruned": (128,)}),
         ("k7", 7, 200, 2000, {"brute": (64,), "pruned": (64,)}),
         ("curve", 7, 600, 1001, {"brute": (256,), "pruned": (256,)})]


def _case(name, k, n, m):
    """Kernels `[n', k, k]` (near-ties dropped, dead kernels appended) and recon `[m, k*k-1]`."""
    rng = np.random.default_rng(1000 + k)  # fixed: the 8-device subprocess rebuilds the same data
    if name == "curve":
        recon = template_curve(k, m, seed=3) * rng.uniform(0.5, 2, (m, 1)).astype(np.float32)
        kern = curve_kernels(recon, n, seed=4).astype(np.float64)
    else:
        recon = rng.standard_normal((m, k * k - 1)).astype(np.float32) * rng.uniform(0.5, 2, (m, 1))
        # Half the kernels are noisy copies of reconstructions (realistic small dissimilarities),
        # half random; all get a random affine map a·x + b (a > 0) the dissimilarity must ignore.
        src = recon[rng.integers(0, m, n // 2)]
        near = np.asarray(preprocess.unembed(jnp.asarray(src), k))
        near = near + 0.05 * rng.standard_normal((n // 2, k, k))
        kern = np.concatenate([near, rng.standard_normal((n - n // 2, k, k))])
        kern = kern * rng.uniform(0.1, 10, (n, 1, 1)) + rng.uniform(-1, 1, (n, 1, 1))
    top2 = np.sort(similarities(kern, recon), axis=1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] > (CURVE_GAP if name == "curve" else GAP)
    assert keep.mean() > (0.6 if name == "curve" else 0.9)
    dead = np.stack([np.zeros((k, k)), np.full((k, k), 3.5),
                     np.full((k, k), -2.0) + 1e-12 * np.eye(k)])
    kern = np.concatenate([kern[keep][:5], dead, kern[keep][5:]]).astype(np.float32)
    return kern, recon


def _run_all() -> dict:
    """Every (case, method, chunk) result on this process's devices, as a flat dict of arrays."""
    out = {}
    for name, k, n, m, methods in CASES:
        kern, recon = _case(name, k, n, m)
        for method, chunks in methods.items():
            for c in chunks:
                i, d = nearest.nearest_codes(kern, recon, chunk_size=c, method=method)
                out[f"{name}/{method}/{c}/idx"], out[f"{name}/{method}/{c}/dis"] = i, d
    return out


def _check(results: dict):
    for name, k, n, m, methods in CASES:
        kern, recon = _case(name, k, n, m)
        ri, rd = nearest_codes_reference(kern, recon)
        assert (ri == -1).sum() == 3 and (ri[5:8] == -1).all()
        for method, chunks in methods.items():
            for c in chunks:
                i, d = results[f"{name}/{method}/{c}/idx"], results[f"{name}/{method}/{c}/dis"]
                msg = f"{name} {method} chunk={c}"
                assert i.dtype == np.int32 and d.dtype == np.float32
                assert i.shape == d.shape == (len(kern),)
                np.testing.assert_array_equal(i, ri, err_msg=msg)
                np.testing.assert_allclose(d, rd, atol=1e-5, rtol=0, err_msg=msg)
                assert (d[ri == -1] == nearest.DEAD_DISSIMILARITY).all() and np.isfinite(d).all()
        c = methods["pruned"][0]
        for part in ("idx", "dis"):
            np.testing.assert_array_equal(results[f"{name}/pruned/{c}/{part}"],
                                          results[f"{name}/brute/{methods['brute'][0]}/{part}"])


def test_matches_reference_one_device():
    _check(_run_all())


def test_eight_devices_match_one_device(tmp_path):
    """Same results with each chunk sharded over 8 simulated CPU devices (chunks round up to 8)."""
    path = str(tmp_path / "r8.npz")
    code = ("import sys, jax, numpy as np; assert jax.device_count() == 8, jax.devices(); "
            "from tests.test_nearest import _run_all; np.savez(sys.argv[1], **_run_all())")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(path) as f:
        r8 = dict(f)
    _check(r8)
    r1 = _run_all()
    for key in r1:  # idx exactly; dis to float32 rounding (per-device blocks round differently)
        if key.endswith("/idx"):
            np.testing.assert_array_equal(r8[key], r1[key], err_msg=key)
        else:
            np.testing.assert_allclose(r8[key], r1[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("method", ["brute", "pruned"])
@pytest.mark.parametrize("a,b", [(3, 7), (3, 200), (500, 999)])
def test_exact_tie_lowest_index_wins(a, b, method):
    """recon[b] = recon[a] (same 64-row tile, across tiles, in the last padded tile): → a."""
    rng = np.random.default_rng(2)
    recon = rng.standard_normal((1000, 24)).astype(np.float32)
    recon[b] = recon[a]
    base = np.asarray(preprocess.unembed(jnp.asarray(recon[a:a + 1]), 5))
    kern = np.concatenate([base, 3 * base - 1, base + 1e-3 * rng.standard_normal((4, 5, 5))])
    i, d = nearest.nearest_codes(kern.astype(np.float32), recon, chunk_size=8, method=method)
    assert (i == a).all(), i
    assert (d[:2] < 1e-6).all()


def test_tile_size_and_memmap(tmp_path):
    """Other M tilings give the same answer; an np.memmap input streams like an in-memory one."""
    kern, recon = _case("k5", 5, 300, 1000)
    ri, rd = nearest_codes_reference(kern, recon)
    mm = np.lib.format.open_memmap(str(tmp_path / "k.npy"), mode="w+", dtype=np.float32,
                                   shape=kern.shape)
    mm[:] = kern
    mm.flush()
    mm = np.load(str(tmp_path / "k.npy"), mmap_mode="r")
    for tile, method in [(1, "brute"), (7, "brute"), (7, "pruned"), (1000, "brute"),
                         (1024, "brute"), (128, "pruned")]:
        i, d = nearest.nearest_codes(mm, recon, chunk_size=128, tile_m=tile, method=method)
        np.testing.assert_array_equal(i, ri, err_msg=f"tile_m={tile} {method}")
        np.testing.assert_allclose(d, rd, atol=1e-5, rtol=0)


def test_dead_kernel_verdict_is_preprocess_valid_mask():
    """Near the dead threshold (centred/raw norm ≈ 1e-5) the verdict is valid_mask's, exactly."""
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((400, 5, 5))
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    noise /= np.linalg.norm(noise.reshape(400, -1), axis=1)[:, None, None]
    level = np.geomspace(0.2, 5.0, 400)[:, None, None] * preprocess.DEAD_RELATIVE_NORM * 5
    kern = (rng.uniform(0.5, 50, (400, 1, 1)) * (1 + noise * level)).astype(np.float32)
    valid = preprocess.valid_mask(kern)
    assert 0 < valid.sum() < 400
    recon = rng.standard_normal((100, 24)).astype(np.float32)
    for method in ("brute", "pruned"):
        i, d = nearest.nearest_codes(kern, recon, chunk_size=128, method=method)
        np.testing.assert_array_equal(i >= 0, valid)
        assert (d[~valid] == 1.0).all()


def test_edge_cases():
    recon = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    with pytest.raises(ValueError):
        nearest.nearest_codes(np.zeros((4, 3, 3), np.float32), recon, method="fast")
    i, d = nearest.nearest_codes(np.zeros((0, 3, 3), np.float32), recon)
    assert i.shape == d.shape == (0,)
    i, d = nearest.nearest_codes(np.ones((4, 3, 3), np.float32), recon)  # all dead
    assert (i == -1).all() and (d == 1.0).all()
    with pytest.raises(ValueError):
        nearest.nearest_codes(np.zeros((4, 3, 3), np.float32), recon[:, :5])
    with pytest.raises(ValueError):
        nearest.nearest_codes(np.zeros((4, 3, 3), np.float32), recon[:0])


# ------------------------------------------------------------------------------- pruned search

def _both(kern, recon, **kw):
    """(brute, pruned) results, asserted identical (index and float32 dissimilarity)."""
    ib, db = nearest.nearest_codes(kern, recon, method="brute", **kw)
    ip, dp = nearest.nearest_codes(kern, recon, method="pruned", **kw)
    np.testing.assert_array_equal(ip, ib)
    np.testing.assert_allclose(dp, db, atol=1e-6, rtol=0)
    return ib, db


def _kernels(coords, k):
    """Unit coordinates `[n, k*k-1]` (float64) → raw float32 kernels under a·x + b."""
    flat = np.asarray(coords, np.float64) @ preprocess._basis_np(k).T
    return (2.5 * flat + 0.3).reshape(-1, k, k).astype(np.float32)


@cpu_only
@pytest.mark.parametrize("k", [5, 7])
def test_pruned_equals_brute_on_a_decoder_curve(k):
    """10,000 codes on a smooth curve, near-curve and random kernels: identical, near-ties included
    (neighbouring codes differ by ~1e-6 in cosine, so nearly every kernel has one); the chosen row
    is a float64 maximum up to float32 rounding."""
    recon = template_curve(k, 10_000, seed=k)
    kern = curve_kernels(recon, 700, seed=k)
    i, d = _both(kern, recon, chunk_size=256)
    ri, rd = nearest_codes_reference(kern, recon)
    sims = similarities(kern, recon)
    assert (sims[np.arange(len(kern)), i] >= sims.max(axis=1) - 1e-6).all()
    np.testing.assert_allclose(d, rd, atol=1e-6, rtol=0)
    radius = float(nearest.pruned_tables(nearest.tiles(recon, 64)).radius)
    assert nearest.choose_method("cpu", len(kern), len(recon), radius) == "pruned"


@cpu_only
def test_pruned_adversarial():
    """Inputs built to catch a pruning or tie mistake; pruned and brute force must agree. One batch
    of 32 kernels throughout (one compiled shape per M)."""
    k, tm = 5, nearest.DEFAULT_TILE_M
    recon = template_curve(k, 1000, seed=1)
    r = recon.astype(np.float64)
    dup = recon.copy()
    dup[tm] = dup[tm - 1]  # a duplicated row across a tile boundary
    dup[2 * tm + 5:3 * tm + 5] = dup[2 * tm + 5]  # a run of equal rows spanning two tiles
    mid = r[tm - 1] + r[tm]  # exactly between the last row of tile 0 and the first of tile 1
    coords = [mid, mid + 1e-3 * r[5], r[tm - 1], r[-1], r[0], dup[2 * tm + 40].astype(np.float64)]
    coords += list(np.random.default_rng(0).standard_normal((23, k * k - 1)))
    coords = np.stack([c / np.linalg.norm(c) for c in coords])
    kern = np.concatenate([_kernels(coords, k), np.zeros((2, k, k), np.float32),
                           np.full((1, k, k), 7.0, np.float32)])
    assert len(kern) == 32
    i, d = _both(kern, recon, chunk_size=64)
    assert i[0] == tm - 1  # equidistant (up to rounding, far below TIE_TOL): the lower index
    assert i[2] == tm - 1 and i[4] == 0
    # The curve flattens at its end (rows 998 and 999 agree to < TIE_TOL): any of the top rows.
    sims = similarities(kern[:4], recon)
    assert i[3] >= len(recon) - 3 and sims[3, i[3]] >= sims[3].max() - 1e-6
    assert (i[-3:] == -1).all() and (d[-3:] == 1.0).all()

    i, _ = _both(kern, dup, chunk_size=64)
    assert i[0] == tm - 1 and i[2] == tm - 1
    assert i[5] == 2 * tm + 5  # inside the run of equal rows: its first row

    same = np.broadcast_to(recon[:1], (777, k * k - 1))  # all rows equal, M not a multiple of 64
    i, d = _both(kern, same, chunk_size=64)
    assert (i[:-3] == 0).all() and (i[-3:] == -1).all()
    i, d = _both(kern, recon[:1], chunk_size=64)  # M = 1
    assert (i[:-3] == 0).all()
    i, d = _both(kern, recon[:65], chunk_size=64)  # one row past a tile
    ri, rd = nearest_codes_reference(kern, recon[:65])
    np.testing.assert_allclose(d, rd, atol=1e-5, rtol=0)


@cpu_only
def test_pruned_bound_is_sound_and_prunes():
    """Every sub-tile the bound drops holds no row within TIE_TOL of the kernel's lower bound (so
    none that either method could pick), on the curve and on random rows; on the curve it drops
    most of them."""
    k = 7
    for recon, must_prune in ((template_curve(k, 3000, seed=2), 0.8),
                              (np.random.default_rng(1).standard_normal((500, 48)), 0.0)):
        r_tiles = nearest.tiles(recon, 64)
        tables = nearest.pruned_tables(r_tiles)
        kern = curve_kernels(np.asarray(recon, np.float32), 300, seed=5)
        x = preprocess.embed(jnp.asarray(kern))
        reps = np.asarray(device_programs._dot_t(x, tables.reps))
        lb = reps.max(axis=1)
        thr = lb - nearest.TIE_TOL - float(tables.thr_slack)
        aug = jnp.concatenate([x, thr[:, None], np.sqrt((1 - thr) * (1 + thr))[:, None]], axis=1)
        kept = np.asarray(device_programs._dot_t(aug, tables.caps)) >= -float(tables.cap_slack)
        rows = np.asarray(r_tiles, np.float64).reshape(-1, 48)
        sims = np.asarray(x, np.float64) @ rows.T  # [N, M_pad]
        sub = device_programs._sub_rows(64)
        best_in_sub = sims.reshape(len(kern), -1, sub).max(axis=2)
        dropped = ~kept[:, :best_in_sub.shape[1]]
        assert (best_in_sub[dropped] < np.broadcast_to(lb[:, None] - nearest.TIE_TOL,
                                                       dropped.shape)[dropped]).all()
        assert dropped.mean() >= must_prune, dropped.mean()


@cpu_only
def test_choose_method():
    assert nearest.choose_method("gpu", 10 ** 6, 10_000, 0.01) == "brute"
    assert nearest.choose_method("tpu", 10 ** 6, 10_000) == "brute"
    assert nearest.choose_method("cpu", 10 ** 6, 1000, 0.01) == "brute"
    assert nearest.choose_method("cpu", 10 ** 6, 10_000, 1.5) == "brute"
    assert nearest.choose_method("cpu", 10, 10_000, 0.01) == "pruned"
    lines = []
    recon = template_curve(5, 10_000)
    nearest.nearest_codes(curve_kernels(recon, 8), recon, log=lines.append)
    assert len(lines) == 1 and "pruned" in lines[0] and jax.default_backend() == "cpu"


def test_stream_is_the_whole_search_cut_at_any_rows_and_keeps_memory_flat(tmp_path):
    """Searcher.stream(start, stop) gives the rows of one whole call; the pages of a read-only
    memmap it has searched leave the resident set (and their values are untouched); a
    copy-on-write map is never released (its edits would be lost)."""
    rng = np.random.default_rng(4)
    recon = rng.standard_normal((300, 24)).astype(np.float32)
    path = str(tmp_path / "k.npy")
    np.save(path, rng.standard_normal((200_000, 5, 5)).astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    search = nearest.Searcher(recon, 5, chunk_size=4096, fixed_shape=True)
    idx, dis = search(mm[:20_000])
    chunks = list(search.stream(mm, 1000, 30_000_000))  # stop past the end: clipped
    assert chunks[0].start == 1000 and sum(len(c.idx) for c in chunks) == len(mm) - 1000
    got = np.concatenate([c.idx for c in chunks])
    np.testing.assert_array_equal(got[:19_000], idx[1000:])
    np.testing.assert_array_equal(np.concatenate([c.dis for c in chunks])[:19_000], dis[1000:])
    with pytest.raises(ValueError, match="start"):
        next(search.stream(mm, -1))

    def rss_file_kib() -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("RssFile:")).split()[1])

    whole = np.asarray(mm).sum()  # every page mapped
    before = rss_file_kib()
    shards.release_pages(mm, 0, len(mm))
    assert before - rss_file_kib() >= 0.9 * mm.nbytes / 1024  # ~19.5 MiB left the resident set
    assert np.asarray(mm).sum() == whole  # read again from the page cache, the same values
    cow = np.load(path, mmap_mode="c")
    cow[:] = 0.0
    shards.release_pages(cow, 0, len(cow))
    assert not cow.any()


def test_chunks_run_over_spans_and_rows_do_not_depend_on_the_packing(tmp_path):
    """stream_segments packs many small spans into full calls (the padding is paid once, in the
    last call) and gives every row what a search of its span alone gives, byte for byte."""
    from dwjax.search import chunks as chunks_lib

    rng = np.random.default_rng(6)
    recon = rng.standard_normal((300, 24)).astype(np.float32)
    sizes = [700, 1, 1500, 300, 0, 2049]
    paths = []
    for i, n in enumerate(sizes):
        paths.append(str(tmp_path / f"k{i}.npy"))
        np.save(paths[-1], rng.standard_normal((n, 5, 5)).astype(np.float32))
    mms = [np.load(p, mmap_mode="r") for p in paths]
    search = nearest.Searcher(recon, 5, chunk_size=1024, fixed_shape=True)
    calls = []
    fn = search.fn
    search.fn = lambda *a: calls.append(1) or fn(*a)
    spans = [(m, 0, None) for m in mms[:-1]] + [(mms[-1], 49, 2000)]
    packed = list(search.stream_segments(spans))
    want = [n for n in sizes[:-1]] + [2000 - 49]
    assert len(calls) == -(-sum(want) // 1024) == 5  # 9 calls searched one span at a time
    for i, (m, a, b) in enumerate(spans):
        got = [c for j, c in packed if j == i]
        assert sum(len(c.idx) for c in got) == want[i]
        alone = list(search.stream(m, a, b))
        for field in ("idx", "dis", "raw_sum", "raw_norm"):
            x = np.concatenate([getattr(c, field) for c in got] or [np.empty(0)])
            y = np.concatenate([getattr(c, field) for c in alone] or [np.empty(0)])
            assert x.tobytes() == y.tobytes(), (i, field)
        if got:
            assert got[0].start == (a or 0)
    assert [j for j, _ in packed] == sorted(j for j, _ in packed)  # spans in order
    plan = list(chunks_lib.plan(chunks_lib.segments(spans), 1024))
    assert [sum(p.stop - p.start for p in c) for c in plan] == [1024] * 4 + [sum(want) - 4096]


def test_a_job_smaller_than_a_chunk_per_lane_is_cut_so_every_lane_gets_one():
    """Lanes run whole calls: a job under one chunk per lane is cut into one call per lane, and
    gives the rows of one call; with a fixed shape it stays one whole chunk. Two lanes share
    this process's device here; which lane takes which call does not matter."""
    kern, recon = _case("k5", 5, 300, 1000)
    kern = kern[:100]
    for fixed, shapes in ((False, [64, 64]), (True, [1024])):
        search = nearest.Searcher(recon, 5, chunk_size=1024, fixed_shape=fixed)
        calls = []

        def counted(lane):
            mesh, fn, *constants = lane

            def call(x, *args):
                calls.append(x.shape[0])
                return fn(x, *args)
            return (mesh, call, *constants)

        device = jax.devices()[0]
        search.lanes = [counted(search._lane(device)) for _ in range(2)]
        idx, dis = search(kern)
        assert sorted(calls) == shapes
        ri, rd = nearest_codes_reference(kern, recon)
        np.testing.assert_array_equal(idx, ri)
        np.testing.assert_allclose(dis, rd, atol=1e-5, rtol=0)


@cpu_only
def test_auto_takes_brute_force_where_the_bound_would_keep_every_tile():
    """A degenerate decoder (every code decodes to nearly one kernel) has a tiny cap radius yet
    the bound prunes nothing: the job's own kernels show it, and auto picks brute force; on a
    smooth curve with kernels near it the same evidence keeps the pruned search."""
    rng = np.random.default_rng(7)
    k = 5
    one = template_curve(k, 1, seed=1)
    flat = np.repeat(one, 10_000, axis=0) + 1e-4 * rng.standard_normal((10_000, k * k - 1))
    flat = (flat / np.linalg.norm(flat, axis=1, keepdims=True)).astype(np.float32)
    sample = curve_kernels(template_curve(k, 10_000, seed=2), 512, seed=3)
    tables = nearest.pruned_tables(nearest.tiles(flat, 64))
    assert float(tables.radius) < nearest.PRUNED_MAX_RADIUS  # the radius alone says "pruned"
    visits = nearest.pruned_visit_fraction(tables, sample, 64)
    assert visits > 0.9
    lines = []
    search = nearest.Searcher(flat, k, method="auto", sample=sample, log=lines.append)
    assert search.method == "brute" and "tiles visited" in lines[0]
    curve = template_curve(k, 10_000, seed=2)
    near = nearest.pruned_visit_fraction(nearest.pruned_tables(nearest.tiles(curve, 64)),
                                         sample, 64)
    assert near < nearest.PRUNED_MAX_VISITS
    assert nearest.Searcher(curve, k, method="auto", sample=sample).method == "pruned"


@cpu_only
def test_auto_takes_brute_force_on_a_jax_whose_pruned_search_is_slow(monkeypatch):
    recon = template_curve(5, 10_000)
    assert nearest.choose_method("cpu", 10, 10_000, 0.01) == "pruned"
    monkeypatch.setattr(jax, "__version__", nearest.PRUNED_SLOW_JAX[0])
    assert nearest.choose_method("cpu", 10, 10_000, 0.01) == "brute"
    lines = []
    searcher = nearest.Searcher(recon, 5, log=lines.append)
    assert searcher.method == "brute" and "runs the pruned search slowly" in lines[0]
