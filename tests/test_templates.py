"""Template bank, sign conventions, and the DoG initialisation (dwjax.patterns.templates)."""
import collections

import numpy as np
import pytest

from dwjax.model import preprocess
from dwjax.patterns import templates as T

DOG_CLASSES = [
    "On-Centre", "Off-Centre",
    "On-Centre 1st derivative (x)", "On-Centre 1st derivative (y)",
    "Off-Centre 1st derivative (x)", "Off-Centre 1st derivative (y)",
    "On-Centre 2nd derivative", "Off-Centre 2nd derivative",
    "On-Centre Cross", "Off-Centre Cross",
]


def _embed(x):
    return np.asarray(preprocess.embed(np.asarray(x, np.float32)))


def test_class_names():
    # Stable order: an assignment's label dictionary indexes into it.
    assert T.class_names(7) == DOG_CLASSES + ["High-frequency", "Others"]
    assert T.class_names(5) == DOG_CLASSES + ["On-Square", "Off-Square", "High-frequency", "Others"]
    assert T.class_names(3) == DOG_CLASSES + ["High-frequency", "Others"]
    for bad in (4, 1, 7.0):
        with pytest.raises(ValueError):
            T.class_names(bad)
    assert T.base_class("Off-Centre 1st derivative (y)") == "Off-Centre 1st derivative"
    assert T.merged_class("On-Centre 1st derivative (x)") == "1st derivative"
    assert T.merged_class("On-Centre Cross") == "On-Centre Cross"


@pytest.mark.parametrize("k", [3, 5, 7])
def test_bank_is_finite_valid_and_covers_every_class(k):
    kernels, cls, params = T.template_bank(k)
    assert kernels.dtype == np.float32 and kernels.shape[1:] == (k, k)
    assert len(kernels) == len(cls) == len(params) > 100
    assert np.all(np.isfinite(kernels))
    assert preprocess.valid_mask(kernels).all()
    names = T.class_names(k)
    # every class but "High-frequency" and "Others" (no DoG-family member)
    assert set(cls.tolist()) == set(range(len(names) - 2))
    assert {p["family"] for p in params} >= {"dog", "dog_dx", "dog_dy", "dog_dxx", "dog_dyy",
                                             "dog_dxy", "cross"}
    assert ("square" in {p["family"] for p in params}) == (k == 5)


def test_known_values():
    # DoG centre: 1/(2π σc²) − 1/(2π σs²) with σc = 1, σs = 1.6.
    assert T.dog(7, 1.0, 1.6)[3, 3] == pytest.approx(1 / (2 * np.pi) * (1 - 1 / 2.56), rel=1e-6)
    assert T.cross(7, 0.6)[3, 3] == pytest.approx(2.0)
    assert T.cross(7, 0.6)[3, 0] == pytest.approx(1.0 + np.exp(-9 / 0.72), rel=1e-6)
    # Analytic derivatives against central differences of the continuous DoG.
    x, y = T._grid(7)
    h = 1e-4
    g = lambda dx, dy, order: T._gaussian_derivative(x + dx, y + dy, 0.9, order)  # noqa: E731
    pairs = {"x": ((h, 0), ""), "y": ((0, h), ""), "xx": ((h, 0), "x"), "xy": ((0, h), "x"),
             "yy": ((0, h), "y")}
    for order, ((dx, dy), lower) in pairs.items():
        numeric = (g(dx, dy, lower) - g(-dx, -dy, lower)) / (2 * h)
        np.testing.assert_allclose(g(0, 0, order), numeric, atol=1e-7, err_msg=order)

def test_sign_conventions():
    k, c = 7, 3
    d = T.dog(k, 1.0)
    assert d[c, c] > 0 and d[c, c] == d.max() and d[0, 0] < 0  # On-Centre: positive centre
    assert T.dog_dx(k, 1.0)[c, c - 1] > 0 > T.dog_dx(k, 1.0)[c, c + 1]  # bright left
    assert T.dog_dy(k, 1.0)[c - 1, c] > 0 > T.dog_dy(k, 1.0)[c + 1, c]  # bright top
    assert T.dog_dxx(k, 1.0)[c, c] < 0 < T.dog_dxx(k, 1.0)[c, 0]
    assert T.dog_dyy(k, 1.0)[c, c] < 0 < T.dog_dyy(k, 1.0)[0, c]
    assert T.dog_dxy(k, 1.0)[c - 1, c - 1] > 0 > T.dog_dxy(k, 1.0)[c - 1, c + 1]
    assert T.cross(k, 0.6)[c, c] == T.cross(k, 0.6).max()
    # In the bank, sign decides On/Off; centred DoG/cross centres are positive for On, negative for
    # Off.
    for kk in (5, 7):
        kernels, cls, params = T.template_bank(kk)
        names = T.class_names(kk)
        cc = kk // 2
        centred = kernels - kernels.mean(axis=(1, 2), keepdims=True)
        for kern, ci, p in zip(centred, cls, params):
            name = names[ci]
            assert name.startswith("On") == (p["sign"] > 0), (name, p)
            if p["family"] in ("dog", "cross"):
                assert np.sign(kern[cc, cc]) == p["sign"], (name, p)


def test_square_only_for_k_at_least_5_and_placement():
    with pytest.raises(ValueError):
        T.square(3, 2)
    with pytest.raises(ValueError):
        T.square(5, 5)
    with pytest.raises(ValueError):
        T.square(5, 2, "top")
    rows = lambda s: sorted(set(np.nonzero(s)[0].tolist()))  # noqa: E731
    assert rows(T.square(5, 2, "upper-left")) == [1, 2]
    assert rows(T.square(5, 2, "bottom-right")) == [2, 3]
    assert rows(T.square(5, 3, "upper-left")) == [0, 1, 2]
    assert rows(T.square(5, 4, "bottom-right")) == [1, 2, 3, 4]
    sq = T.square(5, 3, "upper-left")
    assert sq.sum() == 9 and np.array_equal(sq, sq.T)
    _, _, params7 = T.template_bank(7)
    assert all(p["family"] != "square" for p in params7)


def _held_out(k):
    """Kernels at σ midway between the bank's grid points (and an off-grid surround ratio)."""
    grid, cg = T.sigma_grid(k), T.cross_sigma_grid()
    mids = np.sqrt(grid[1:] * grid[:-1])  # geometric midpoints: as far as possible from the grid
    fams = {T.dog: ("On-Centre", "Off-Centre"),
            T.dog_dx: ("On-Centre 1st derivative (x)", "Off-Centre 1st derivative (x)"),
            T.dog_dy: ("On-Centre 1st derivative (y)", "Off-Centre 1st derivative (y)"),
            T.dog_dxx: ("On-Centre 2nd derivative", "Off-Centre 2nd derivative"),
            T.dog_dyy: ("On-Centre 2nd derivative", "Off-Centre 2nd derivative"),
            T.dog_dxy: ("On-Centre 2nd derivative", "Off-Centre 2nd derivative")}
    xs, ys = [], []
    for f, (on, off) in fams.items():
        for s in mids:
            for ratio in (2.2, 3.0):
                xs += [f(k, s, ratio * s), -f(k, s, ratio * s)]
                ys += [on, off]
    for s in np.sqrt(cg[1:] * cg[:-1]):
        xs += [T.cross(k, s), -T.cross(k, s)]
        ys += ["On-Centre Cross", "Off-Centre Cross"]
    return np.stack(xs).astype(np.float64), np.array(ys)


@pytest.mark.parametrize("k", [5, 7])
def test_noisy_held_out_sigmas_are_classified(k):
    x, y = _held_out(k)
    rng = np.random.default_rng(1)
    reps = 10
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    rms = np.sqrt((centred ** 2).mean(axis=(1, 2)))
    # Amplitude SNR 5: noise std = signal RMS / 5.
    noise = rng.normal(size=(len(x) * reps, k, k)) * np.repeat(rms / 5, reps)[:, None, None]
    noisy = np.repeat(x, reps, 0) + noise
    truth = np.repeat(y, reps)
    bank, cls, _ = T.template_bank(k)
    pred = np.array(T.class_names(k))[cls[(_embed(noisy) @ _embed(bank).T).argmax(1)]]
    for name in set(truth):
        acc = np.mean(pred[truth == name] == name)
        assert acc >= 0.9, (name, acc)
    assert np.mean(pred == truth) >= 0.98


def test_dog_init_proportions_and_determinism():
    n, k = 10000, 7
    kern, fam, names = T.sample_dog_init_labelled(n, k, 0)
    assert kern.shape == (n, k, k) and kern.dtype == np.float32 and np.all(np.isfinite(kern))
    np.testing.assert_allclose(np.linalg.norm(kern.reshape(n, -1), axis=1), 1.0, rtol=1e-5)
    counts = collections.Counter(fam.tolist())
    for f, p in T.PAPER_INIT_MIX.items():
        assert abs(counts[f] / n - p) <= 0.03, (f, counts[f])
    # The named classes follow the families (random sign split for cross and derivatives).
    group = lambda s: "2nd derivative" if "2nd derivative" in s else T.merged_class(s)  # noqa: E731
    merged = collections.Counter(group(s) for s in names.tolist())
    assert merged["On-Centre"] == 4500 and merged["Off-Centre"] == 1000  # exact allocation
    assert abs((merged["On-Centre Cross"] + merged["Off-Centre Cross"]) / n - 0.15) <= 0.03
    assert abs(merged["1st derivative"] / n - 0.20) <= 0.03
    assert abs(merged["2nd derivative"] / n - 0.10) <= 0.03
    assert abs(merged["On-Centre Cross"] / n - 0.075) <= 0.03  # cross sign is a fair coin
    np.testing.assert_array_equal(kern, T.sample_dog_init(n, k, 0))
    np.testing.assert_array_equal(kern[:50], T.sample_dog_init(n, k, np.random.default_rng(0))[:50])
    assert not np.array_equal(kern, T.sample_dog_init(n, k, 1))
    # Each sample is recognised by the bank as the class it was drawn as.
    bank, cls, _ = T.template_bank(k)
    pred = np.array(T.class_names(k))[cls[(_embed(kern[:2000]) @ _embed(bank).T).argmax(1)]]
    assert np.mean(pred == names[:2000]) >= 0.99


def test_dog_init_mix_validation_and_small_n():
    kern, fam, _ = T.sample_dog_init_labelled(7, 5, 3, mix={"on_centre": 0.5, "cross": 0.5})
    assert kern.shape == (7, 5, 5) and set(fam.tolist()) <= {"on_centre", "cross"}
    assert sorted(collections.Counter(fam.tolist()).values()) == [3, 4]
    with pytest.raises(ValueError):
        T.sample_dog_init(10, 7, 0, mix={"on_centre": 0.5})
    with pytest.raises(ValueError):
        T.sample_dog_init(10, 7, 0, mix={"gabor": 1.0})
