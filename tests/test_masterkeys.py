"""Master key filters: the fit (planted banks, a float64 reference on the embedded default), the
bank file format, the stage's rows (resume, workers), bad input, the replaced checkpoints, the
frozen layers, the functional check and the report's section."""
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from dwjax import assign, masterkeys, report
from dwjax.errors import UserError
from dwjax.io import checkpoint_rewrite, shards
from dwjax.io import masterkey_files as mk_files
from dwjax.io import workdir as workdir_lib
from dwjax.patterns import master_keys as mk
from dwjax.patterns import scale_space
from tests.helpers import train_briefly, make_data_dir, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)
# five distinct patterns a planted kernel is drawn from (any k)
PLANTED_SPEC = "T-0.5lap 0.8 0.8; dx 0.9 0.9; dxx 1.0 1.0; dxy 1.0 1.0; T 1.2 0.5"


def planted(bank: np.ndarray, n: int, seed: int, noise: float) -> tuple[np.ndarray, dict]:
    """`[n, k, k]` float32 kernels y = s·(±x_j + noise) + b from a unit centred `bank [K, k*k]`:
    random filter, sign, scale s (0.1 … 3, log-uniform), offset b and Gaussian pixel noise of
    `noise` × the filter's pixel RMS (1/k); and the truth `{filter, sign, scale, offset}`."""
    rng = np.random.default_rng(seed)
    k = int(round(np.sqrt(bank.shape[1])))
    j = rng.integers(0, len(bank), n)
    sign = rng.choice([-1.0, 1.0], n)
    scale = np.exp(rng.uniform(np.log(0.1), np.log(3.0), n))
    offset = rng.normal(size=n) * 0.5 / k
    y = (bank[j] * sign[:, None] + rng.normal(size=(n, k * k)) * noise / k) * scale[:, None]
    return ((y + offset[:, None]).reshape(n, k, k).astype(np.float32),
            {"filter": j, "sign": sign, "scale": scale, "offset": offset})


def config(arg=None, **fields):
    return stage_config("masterkeys", arg, **fields)


# ------------------------------------------------------------------------------------ the fit
@pytest.mark.parametrize("k", [5, 7])
def test_a_given_bank_fits_planted_kernels_to_their_filter(k):
    """Known bank, low noise: ≥ 99 % to the right filter, and scale, offset, r2 as planted."""
    bank = mk.unit_filters(scale_space.bank("lindeberg_b", k))
    kern, truth = planted(bank, 4000, 0, noise=0.05)
    fit = mk.fit(kern, bank)
    right = fit.filter == truth["filter"]
    assert right.mean() >= 0.99, right.mean()
    # a = y_c·x = ±s·(1 + n·x), n·x ~ N(0, noise/k): within 5 σ; b = the planted offset + the
    # noise's mean
    np.testing.assert_allclose(np.abs(fit.scale[right]), truth["scale"][right],
                               rtol=5 * 0.05 / k)
    assert np.mean(np.sign(fit.scale[right]) == truth["sign"][right]) == 1.0
    np.testing.assert_allclose(fit.offset, truth["offset"], atol=0.05 * 3 / k)
    # r2 = cos² of the noisy kernel with its filter: about 1/(1 + noise²)
    assert 0.99 < np.median(fit.r2) <= 1.0
    # the replacement is the planted clean kernel up to the noise
    rebuilt = mk.replaced_kernels(kern, bank.reshape(-1, k, k))
    clean = (bank[truth["filter"]] * (truth["sign"] * truth["scale"])[:, None]
             + truth["offset"][:, None]).reshape(-1, k, k)
    err = np.linalg.norm((rebuilt - clean).reshape(len(kern), -1), axis=1) / truth["scale"]
    assert np.median(err[right]) < 0.02


def test_greedy_selection_recovers_a_planted_bank_among_decoys():
    """Candidates = the planted filters among random decoys: the greedy choice of K is exactly the
    planted set, and its curve reaches ~1 at K."""
    k = 5
    bank = mk.unit_filters(scale_space.bank(PLANTED_SPEC, k))
    kern, _ = planted(bank, 3000, 1, noise=0.05)
    units, live = mk.unit_kernels(kern)
    decoys = mk.unit_filters(np.random.default_rng(2).normal(size=(40, k * k)))
    candidates = np.concatenate([decoys[:20], bank, decoys[20:]])
    sel = mk.greedy_select(units[live], candidates, len(bank), chunk=700)
    assert sorted(sel.order.tolist()) == list(range(20, 20 + len(bank)))
    assert np.all(np.diff(sel.coverage) > 0) and sel.coverage[-1] > 0.99
    np.testing.assert_allclose(sel.coverage, mk.coverage(units[live], candidates[sel.order]))


def reference_fit(kernels: np.ndarray, bank: np.ndarray):
    """masterfiltmodel's formulation in numpy float64, written independently of dwjax: every
    filter's estimate (y·x)·x + mean(y), the nearest in pixel distance."""
    y = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
    x = np.asarray(bank, np.float64)
    a = y @ x.T                                            # [N, K]; x is centred, so y·x = y_c·x
    est = a[:, :, None] * x[None] + y.mean(axis=1)[:, None, None]
    dist = np.linalg.norm(y[:, None, :] - est, axis=2)
    j = dist.argmin(axis=1)
    at = np.arange(len(y))
    yc = y - y.mean(axis=1, keepdims=True)
    return j, a[at, j], y.mean(axis=1), a[at, j] ** 2 / np.sum(yc * yc, axis=1), dist


def test_the_fit_agrees_with_a_float64_reference_on_the_embedded_default(embedded_dir):
    """Every live kernel of the embedded default (5×5 and 3×3), a bank of each size: filter index,
    scale, offset and r2 as the reference computes them (near-ties in distance left out)."""
    for k in (5, 3):
        kern = np.concatenate([np.asarray(s.kernels) for s in shards.iter_shards(embedded_dir, k)])
        bank = mk.unit_filters(scale_space.bank("lindeberg_b", k)).astype(np.float32)
        fit = mk.fit(kern, bank.astype(np.float64))
        live = fit.filter >= 0
        assert live.sum() > 15_000 and (~live).sum() >= 1  # EfficientNet-Lite's dead channels
        assert np.all(np.isnan(fit.scale[~live])) and np.all(np.isnan(fit.r2[~live]))
        j, a, b, r2, dist = reference_fit(kern[live], bank)
        d = np.sort(dist, axis=1)
        clear = (d[:, 1] - d[:, 0]) > 1e-6 * d[:, 1]
        assert clear.mean() > 0.999
        np.testing.assert_array_equal(fit.filter[live][clear], j[clear])
        np.testing.assert_allclose(fit.scale[live][clear], a[clear], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fit.offset[live], b, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(fit.r2[live][clear], r2[clear], rtol=1e-6, atol=1e-7)
        # r2 is the share of centred energy the estimate removes: 1 − residual² / ‖y_c‖²
        y = kern[live].reshape(live.sum(), -1).astype(np.float64)
        yc = y - y.mean(axis=1, keepdims=True)
        res = dist[np.arange(len(y)), j] ** 2 / np.sum(yc * yc, axis=1)
        np.testing.assert_allclose(fit.r2[live][clear], 1 - res[clear], atol=1e-6)


def test_dead_and_constant_kernels():
    bank = mk.unit_filters(scale_space.bank("lindeberg_b", 5))
    kern = np.zeros((3, 5, 5), np.float32)
    kern[1] = 0.7  # constant
    kern[2, 2, 2] = 1.0
    fit = mk.fit(kern, bank)
    assert fit.filter.tolist()[:2] == [-1, -1] and fit.filter[2] >= 0
    np.testing.assert_array_equal(fit.offset[:2], np.float32([0.0, 0.7]))
    np.testing.assert_array_equal(mk.replaced_kernels(kern, bank.reshape(-1, 5, 5))[:2],
                                  kern[:2])  # a dead kernel becomes its (constant) mean
    with pytest.raises(ValueError, match="filter 2"):
        mk.unit_filters(np.stack([bank[0].reshape(5, 5), np.ones((5, 5))]))


# ------------------------------------------------------------------------------ scale-space bank
def test_scale_space_filters():
    g = scale_space.discrete_gaussian(1.5, 31)
    n = np.arange(31) - 15
    assert abs(g.sum() - 1) < 1e-12 and abs((g * n * n).sum() - 1.5 ** 2) < 1e-9  # variance σ²
    assert np.all(scale_space.discrete_gaussian(0.0, 5) == [0, 0, 1, 0, 0])
    b = scale_space.bank("lindeberg_b", 7)
    assert b.shape == (8, 7, 7)
    np.testing.assert_allclose(np.linalg.norm(b.reshape(8, -1), axis=1), 1.0)
    dx = scale_space.filter_kernel("dx", 1.0, 1.0, 5)
    np.testing.assert_allclose(dx, -dx[:, ::-1], atol=1e-15)       # odd in x
    np.testing.assert_allclose(scale_space.filter_kernel("dy", 1.0, 1.0, 5), dx.T, atol=1e-15)
    lap = scale_space.filter_kernel("lap", 0.8, 0.8, 5)
    assert lap[2, 2] < 0 and np.all(lap[0] == 0)                     # ∇²T, zero on the border
    np.testing.assert_allclose(lap, lap.T, atol=1e-15)
    for bad in ("dz 1 1", "dx 1", "dx -1 1", "dx nan 1", ""):
        with pytest.raises(ValueError):
            scale_space.parse_spec(bad)


# ------------------------------------------------------------------------------- the bank file
MASTERFILT_STYLE = """Filter 1:
-0.010366 -0.019109 0.014336
-0.018185 0.923806 -0.003971
-0.009972 -0.016889 0.006929

Filter 2:
0.050752 0.018862 -0.039537
0.036470 0.026162 -0.045467
0.096410 0.086563 -0.188319
"""


def test_bank_text_reads_masterfiltmodel_layout_and_round_trips(tmp_path):
    p = tmp_path / "bank.txt"
    p.write_text(MASTERFILT_STYLE)
    bank = mk_files.read_bank_text(str(p))
    assert bank.shape == (2, 3, 3) and bank[0, 1, 1] == 0.923806 and bank[1, 2, 2] == -0.188319
    unit = mk.unit_filters(scale_space.bank("lindeberg_b", 7)).reshape(8, 7, 7)
    mk_files.save_bank(str(tmp_path / "out"), unit)
    text = mk_files.read_bank_text(mk_files.bank_txt(str(tmp_path / "out")))
    np.testing.assert_array_equal(text.astype(np.float32), unit.astype(np.float32))
    np.testing.assert_array_equal(mk_files.read_bank(str(tmp_path / "out")),
                                  unit.astype(np.float32))
    assert open(mk_files.bank_txt(str(tmp_path / "out"))).read().startswith("Filter 1:\n")


@pytest.mark.parametrize("text, words", [
    ("", "no 'Filter i:' blocks"),
    ("Filter 1:\n1 2\n3\n", "not a square"),
    ("Filter 1:\n1 2\n3 nan\n", "non-finite"),
    ("Filter 1:\n1 2\n3 x\n", "not a row of numbers"),
    ("1 2\n3 4\n", "before the first"),
    ("Filter 1:\n1 2\n3 4\n\nFilter 2:\n1 2 3\n4 5 6\n7 8 9\n", "several sizes"),
])
def test_a_bad_bank_file_is_named(tmp_path, text, words):
    p = tmp_path / "b.txt"
    p.write_text(text)
    with pytest.raises(mk_files.BankFileError, match=words) as e:
        mk_files.read_bank_text(str(p))
    assert str(p) in str(e.value)


# ------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sources of planted 5×5 kernels (and a dead one), several layers each."""
    bank = mk.unit_filters(scale_space.bank(PLANTED_SPEC, 5))
    a, _ = planted(bank, 900, 3, noise=0.3)
    b, _ = planted(bank, 500, 4, noise=0.3)
    a[7] = 0.0
    layers = {"a": np.repeat(np.arange(3), 300), "b": np.repeat(np.arange(2), 250)}
    return make_data_dir(tmp_path_factory.mktemp("mk"), {"a": a, "b": b}, layers)


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    """A briefly trained 5×5 run on `data` (its decoder gives the candidates)."""
    return train_briefly(data, str(tmp_path_factory.mktemp("tiny") / "run"), epochs=3)


def _table(workdir):
    return pq.read_table(mk_files.rows_dir(workdir_lib.RunDir(workdir).masterkeys))


def test_stage_fits_every_kernel_resumes_and_splits_over_workers(tiny_run, data, tmp_path):
    one = str(tmp_path / "one")
    shutil.copytree(tiny_run, one)
    s = masterkeys.run(config(job__part_size=400), one, data, **QUIET)
    assert s["complete"] and s["kernels"] == 1400 and s["fitted"] == 1399
    assert s["num_filters"] == 8 and len(s["coverage"]) == 16
    t = _table(one)
    assert t.column_names == ["source", "layer", "channel", "filter", "scale", "offset", "r2"]
    assert t.num_rows == 1400
    folder = workdir_lib.RunDir(one).masterkeys
    bank = np.load(mk_files.bank_npy(folder))
    assert bank.shape == (8, 5, 5)
    np.testing.assert_allclose(np.linalg.norm(bank.reshape(8, -1), axis=1), 1, atol=1e-6)
    # the rows are the fit of the shards' kernels to the saved bank
    kern = np.concatenate([np.asarray(sh.kernels) for sh in shards.iter_shards(data, 5)])
    fit = mk.fit(kern, bank.reshape(8, -1))
    np.testing.assert_array_equal(t.column("filter").to_numpy(), fit.filter)
    np.testing.assert_array_equal(t.column("r2").to_numpy(zero_copy_only=False), fit.r2)
    assert fit.filter.min() == -1 and abs(s["mean_r2"] - np.nanmean(fit.r2)) < 1e-6
    # the coverage curve: the bank's mean explained fraction at K = 8 is the rows' mean r2
    cov = mk_files.read_table(mk_files.coverage_csv(folder))
    assert abs(float(cov[7]["master_keys"]) - s["mean_r2"]) < 1e-5
    assert float(cov[15]["pca_subspace"]) >= float(cov[15]["master_keys"])
    # a re-run skips every part and changes no byte
    before = {f: open(os.path.join(folder, "rows", f), "rb").read()
              for f in os.listdir(os.path.join(folder, "rows")) if f.endswith(".parquet")}
    assert len(before) == 5  # parts of 400 rows: a's 900 in 3, b's 500 in 2
    lines = []
    masterkeys.run(config(job__part_size=400), one, data, log=lines.append)
    assert sum("already fitted" in ln for ln in lines) == 5
    # a killed run: a part's row file gone and a stale temp beside it
    victim = sorted(before)[0]
    os.remove(os.path.join(folder, "rows", victim))
    open(os.path.join(folder, "rows", ".tmp-999999-x.parquet"), "w").close()
    masterkeys.run(config(job__part_size=400), one, data, **QUIET)
    after = {f: open(os.path.join(folder, "rows", f), "rb").read()
             for f in os.listdir(os.path.join(folder, "rows")) if f.endswith(".parquet")}
    assert after == before and not any(f.startswith(".tmp") for f in os.listdir(
        os.path.join(folder, "rows")))
    # two workers give the one-process rows
    two = str(tmp_path / "two")
    shutil.copytree(tiny_run, two)
    r0 = masterkeys.run(config(job__part_size=400, job__num_workers=2), two, data, **QUIET)
    assert not r0["complete"]
    r1 = masterkeys.run(config(job__part_size=400, job__num_workers=2, job__worker_index=1),
                        two, data, **QUIET)
    assert r1["complete"] and _table(two).to_pandas().equals(t.to_pandas())  # NaN = NaN
    # other settings are refused until overwrite
    with pytest.raises(Exception, match="other settings"):
        masterkeys.run(config(num_filters=4), one, data, **QUIET)
    masterkeys.run(config(num_filters=4, job__overwrite=True), one, data, **QUIET)
    assert _table(one).column("filter").to_numpy().max() == 3


def _one_line(p, *words):
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("masterkeys: "), p.stderr[-3000:]
    for w in words:
        assert w in p.stderr, p.stderr


def _stage(workdir, data, *args):
    return subprocess.run([sys.executable, "-m", "dwjax.masterkeys", f"--workdir={workdir}",
                           f"--data_dir={data}", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_bad_input_is_one_line_and_leaves_no_output(tiny_run, data, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    folder = workdir_lib.RunDir(run).masterkeys
    seven = tmp_path / "seven.txt"
    seven.write_text(mk_files.bank_text(scale_space.bank("lindeberg_b", 7)))
    nan = tmp_path / "nan.txt"
    nan.write_text("Filter 1:\n" + "\n".join(["1 2 3 4 5"] * 4 + ["1 2 nan 4 5"]) + "\n")
    flat = tmp_path / "flat.txt"
    flat.write_text("Filter 1:\n" + "\n".join(["1 1 1 1 1"] * 5) + "\n")
    # on the command line: one line, exit 1
    for args, words in [(("--config.bank=" + str(seven),), (str(seven), "7x7 filters", "5x5")),
                        (("--config.num_filters=60",), ("--config.num_filters 60",
                                                        "candidates")),
                        (("--config.num_filterz=3",), ("did you mean",))]:
        _one_line(_stage(run, data, *args), *words)
        assert not os.path.exists(folder), args
    # the same refusals in a notebook: a UserError naming the input, nothing written
    for fields, kw, words in [
            (dict(bank=str(nan)), {}, (str(nan), "non-finite")),
            (dict(bank=str(flat)), {}, (str(flat), "constant")),
            (dict(bank=str(tmp_path / "none.txt")), {}, ("cannot read",)),
            (dict(bank="scale_space", scale_space="dz 1 1"), {}, ("unknown operator",)),
            (dict(check__enabled=True, check__ks="1,x"), {}, ("--config.check.ks",)),
            (dict(check__enabled=True, check__ks="1,32"), {}, ("ranks only 16",)),
            ({}, dict(replace="/nonexistent.pth"), ("--replace and --out",))]:
        with pytest.raises(UserError) as e:
            masterkeys.run(config(**fields), run, data, **kw, **QUIET)
        assert all(w in str(e.value) for w in words), (str(e.value), words)
        assert not os.path.exists(folder), fields
    # a checkpoint that is not one: the bank and rows are made, the copy is not
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80not a checkpoint")
    _one_line(_stage(run, data, f"--replace={junk}", f"--out={tmp_path / 'o.pth'}"), str(junk))
    assert not os.path.exists(tmp_path / "o.pth")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


# ------------------------------------------------------------------------- replaced checkpoints
def _torch_net():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.Conv2d(8, 16, 5, padding=2, stride=2, groups=8),  # depth multiplier 2
        torch.nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)).eval()


def _save(torch, state, path, kind):
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)


def _spans(path, t):
    """Bytes `[lo, hi)` of a tensor's storage in the file (`weight_files` offsets)."""
    item = 2 if t.dtype in ("bfloat16", np.float16) else np.dtype(t.dtype).itemsize
    return t.file_offset + t.storage_offset * item, t.file_offset + (
        t.storage_offset + int(np.prod(t.shape))) * item


@pytest.mark.parametrize("kind, dtype", [("zip", "float32"), ("legacy", "float32"),
                                         ("safetensors", "float32"), ("safetensors", "bfloat16"),
                                         ("zip", "float16")])
def test_replaced_checkpoint_holds_the_fits_and_every_other_byte(tmp_path, kind, dtype):
    torch = pytest.importorskip("torch")
    from dwjax.io import weight_files

    net = _torch_net()
    state = {k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v)
             for k, v in net.state_dict().items()}
    src = str(tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth"))
    dst = str(tmp_path / ("r.safetensors" if kind == "safetensors" else "r.pth"))
    _save(torch, state, src, kind)
    bank = mk.unit_filters(scale_space.bank("lindeberg_b", 5)).reshape(8, 5, 5)
    done = checkpoint_rewrite.rewrite_depthwise(
        src, dst, 5, lambda name, kern: mk.replaced_kernels(kern, bank.reshape(8, -1)))
    assert done == {"2.weight": 8, "5.weight": 16, "6.weight": 16}  # not the 3×3 one
    old, new = open(src, "rb").read(), open(dst, "rb").read()
    assert len(old) == len(new)
    tensors = weight_files.open_checkpoint(src)
    spans = [_spans(src, tensors[n]) for n in done]
    changed = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))
    inside = np.zeros(len(changed), bool)
    for lo, hi in spans:
        inside |= (changed >= lo) & (changed < hi)
    if kind == "zip":  # the CRC-32s of the 3 rewritten storages (local header, data
        # descriptor, central directory), and nothing else
        assert (~inside).sum() <= 3 * 3 * 4
        with zipfile.ZipFile(dst) as zf:
            assert zf.testzip() is None
    else:
        assert inside.all()
    if kind == "safetensors":
        from safetensors.torch import load_file

        loaded = load_file(dst)
    else:
        loaded = torch.load(dst, weights_only=True)
    for name, v in state.items():
        if name in done:
            kern = v.float().numpy()[:, 0]
            want = mk.replaced_kernels(kern, bank.reshape(8, -1))
            got = loaded[name].float().numpy()[:, 0]
            np.testing.assert_array_equal(
                got, torch.from_numpy(want).to(getattr(torch, dtype)).float().numpy())
        else:
            assert torch.equal(loaded[name], v), name
    with pytest.raises(Exception, match="no 7x7 depthwise"):
        checkpoint_rewrite.rewrite_depthwise(src, dst, 7, lambda n, k: k)
    with pytest.raises(Exception, match="the checkpoint itself"):
        checkpoint_rewrite.rewrite_depthwise(src, src, 5, lambda n, k: k)


def test_frozen_layers_reproduce_the_replaced_checkpoint(tmp_path):
    """torch and Flax: a master-key layer fitted to a depthwise conv gives exactly the outputs of
    that conv with the replaced checkpoint's kernels; only scale and offset are trainable."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    from dwjax.patterns import master_key_layers as layers

    bank = mk.unit_filters(scale_space.bank("lindeberg_b", 5)).reshape(8, 5, 5)
    net = _torch_net()
    src, dst = str(tmp_path / "w.pth"), str(tmp_path / "r.pth")
    torch.save(net.state_dict(), src)
    checkpoint_rewrite.rewrite_depthwise(
        src, dst, 5, lambda name, kern: mk.replaced_kernels(kern, bank.reshape(8, -1)))
    replaced = _torch_net()
    replaced.load_state_dict(torch.load(dst, weights_only=True))
    frozen = _torch_net()
    done = layers.master_keys_(frozen, bank)
    assert done == {"2": 8, "5": 16, "6": 16}
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(frozen(x), replaced(x))
    trainable = {n for n, p in frozen.named_parameters() if n.startswith(("2.", "6."))}
    assert trainable == {"2.scale", "2.offset", "6.scale", "6.offset"}
    assert {n for n, _ in frozen.named_buffers() if n.startswith("2.")} == {"2.bank", "2.index"}
    # Flax NNX: a depthwise nnx.Conv holding the torch layer's kernels
    w = net[2].weight.detach().numpy()  # [8, 1, 5, 5]
    conv = nnx.Conv(8, 8, (5, 5), feature_group_count=8, use_bias=False, padding="SAME",
                    rngs=nnx.Rngs(0))
    conv.kernel[...] = np.transpose(w[:, 0], (1, 2, 0))[:, :, None, :]
    mkc = layers.MasterKeyConv.from_conv(conv, bank)
    reference = nnx.Conv(8, 8, (5, 5), feature_group_count=8, use_bias=False, padding="SAME",
                         precision="highest", rngs=nnx.Rngs(0))
    rk = replaced[2].weight.detach().numpy()
    reference.kernel[...] = np.transpose(rk[:, 0], (1, 2, 0))[:, :, None, :]
    np.testing.assert_array_equal(np.asarray(mkc.kernel()), np.asarray(reference.kernel[...]))
    xn = np.random.default_rng(0).normal(size=(2, 9, 9, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(mkc(xn)), np.asarray(reference(xn)))
    # and the same outputs as torch's (NCHW), to float32 rounding of the two convolutions
    with torch.no_grad():
        t_out = replaced[2](torch.from_numpy(np.transpose(xn, (0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(np.transpose(np.asarray(mkc(xn)), (0, 3, 1, 2)), t_out,
                               rtol=1e-5, atol=1e-5)
    params = nnx.to_flat_state(nnx.state(mkc, nnx.Param))
    assert {path for path, _ in params} == {("scale",), ("offset",)}
    model = nnx.Sequential(conv, nnx.relu)
    assert layers.master_keys_nnx_(model, bank) == {"layers.0": 8}
    assert isinstance(model.layers[0], layers.MasterKeyConv)


def test_stage_replaces_the_embedded_mobilenet_v2_file(tmp_path, data):
    """`--replace` on the embedded default's MobileNetV2 (a legacy-format .pth) with a 3×3
    scale-space bank: every 3×3 depthwise tensor is its fit, every other tensor is equal."""
    torch = pytest.importorskip("torch")
    from dwjax.perf import master_key_agreement

    try:
        src = master_key_agreement._embedded_path("mobilenet-v2")
    except Exception as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    d3 = make_data_dir(tmp_path / "d3", {"k3": rng.normal(size=(50, 3, 3)).astype(np.float32)})
    out = str(tmp_path / "mb.pth")
    masterkeys.run(config("3", bank="scale_space"), str(tmp_path / "run"), d3, replace=src,
                   out=out, **QUIET)
    bank = np.load(mk_files.bank_npy(workdir_lib.RunDir(str(tmp_path / "run")).masterkeys))
    a, b = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert len(changed) == 17 and all(tuple(a[n].shape[1:]) == (1, 3, 3) for n in changed)
    for n in changed:
        np.testing.assert_array_equal(
            b[n].numpy()[:, 0], mk.replaced_kernels(a[n].numpy()[:, 0], bank.reshape(8, -1)))


# ----------------------------------------------------------------------- the functional check
def test_functional_check_runs_offline_with_both_controls():
    pytest.importorskip("skimage")
    pytest.importorskip("torchvision")
    from dwjax.perf import master_key_agreement as agreement

    try:
        agreement.network(3)
    except Exception as e:
        pytest.skip(str(e))
    bank = mk.unit_filters(scale_space.bank("lindeberg_b", 3)).reshape(8, 3, 3)
    rows = agreement.agreement(3, {1: bank[:1], 8: bank}, images=2, views_per_image=3,
                               batch_size=6, **QUIET)
    assert [(r["K"], r["variant"]) for r in rows] == [(1, v) for v in agreement.VARIANTS] + [
        (8, v) for v in agreement.VARIANTS]
    assert all(r["views"] == 6 and 0 <= r["top1_agreement"] <= 1 and -1 <= r["logit_cosine"] <= 1
               for r in rows)
    by = {(r["K"], r["variant"]): r for r in rows}
    # one filter: shuffling changes nothing; eight: the bank explains more than random filters
    assert by[1, "shuffled filters"]["logit_cosine"] == by[1, "master keys"]["logit_cosine"]
    assert by[8, "master keys"]["mean_r2"] > by[8, "random bank"]["mean_r2"]
    assert by[8, "master keys"]["mean_r2"] > by[1, "master keys"]["mean_r2"]


# ----------------------------------------------------------------------------- the report
def test_report_gains_the_section_only_with_master_key_rows(tiny_run, data, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    assign.run(stage_config("assign"), run, data, **QUIET)
    rc = stage_config("report", formats="png")
    report.run(rc, run, **QUIET)
    page = open(os.path.join(run, "report", "index.html")).read()
    assert "Master key filters" not in page
    masterkeys.run(config(), run, data, **QUIET)
    result = report.run(rc, run, **QUIET)
    page = open(result["page"]).read()
    assert "Master key filters: 8 filters" in page and "The coverage curve" in page
    rep = os.path.join(run, "report")
    with open(os.path.join(rep, "masterkeys_by_source.csv")) as f:
        rows = [ln.strip().split(",") for ln in f][1:]
    t = _table(run).to_pandas()
    for r in rows:  # shares of all kernels per source, from the rows
        got = np.asarray(r[3:], float)
        sub = t[t["source"] == r[0]]
        want = np.bincount(sub["filter"][sub["filter"] >= 0], minlength=8) / len(sub)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert os.path.exists(os.path.join(rep, "masterkeys_coverage.png"))
    assert os.path.exists(os.path.join(rep, "masterkeys_layers_a.png"))


def test_the_layers_module_imports_neither_flax_nor_torch():
    """Until a layer is asked for (as `patterns.dog_init`)."""
    code = ("import sys; import dwjax.patterns.master_key_layers; "
            "print('flax' in sys.modules, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stdout.split() == ["False", "False"], p.stderr
