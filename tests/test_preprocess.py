"""Preprocessing: invariance, the hyperplane basis, dead kernels, and the loss geometry."""
import numpy as np
import pytest

from dwjax.model import dataset, preprocess
from tests.helpers import make_data_dir


@pytest.mark.parametrize("k", [3, 5, 7])
def test_basis_is_orthonormal_and_round_trips(k):
    b = preprocess.hyperplane_basis(k)
    assert b.shape == (k * k, k * k - 1)
    np.testing.assert_allclose(b.T @ b, np.eye(k * k - 1), atol=1e-6)
    np.testing.assert_allclose(b.sum(axis=0), 0, atol=1e-6)  # every column lies in 1ᵀr = 0
    x = np.random.default_rng(0).normal(size=(50, k, k)).astype(np.float32)
    coords = np.asarray(preprocess.embed(x))
    np.testing.assert_allclose(np.linalg.norm(coords, axis=1), 1, atol=1e-5)
    back = np.asarray(preprocess.unembed(coords, k))
    np.testing.assert_allclose(
        back, np.asarray(preprocess.centre_and_normalise(x)).reshape(x.shape), atol=1e-5
    )


def test_embedding_and_loss_invariant_to_affine_maps():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5, 5)).astype(np.float32)
    y = rng.normal(size=(100, 5, 5)).astype(np.float32)
    a = rng.uniform(0.01, 100, size=(100, 1, 1)).astype(np.float32)
    shift = rng.uniform(-5, 5, size=(100, 1, 1)).astype(np.float32)
    e1, e2 = np.asarray(preprocess.embed(x)), np.asarray(preprocess.embed(a * x + shift))
    np.testing.assert_allclose(e1, e2, atol=2e-4)
    l1 = np.asarray(preprocess.cosine_dissimilarity(preprocess.embed(x), preprocess.embed(y)))
    l2 = np.asarray(
        preprocess.cosine_dissimilarity(
            preprocess.embed(a * x + shift), preprocess.embed(3 * y - 7)
        )
    )
    np.testing.assert_allclose(l1, l2, atol=2e-4)


def test_coordinate_cosine_equals_pixel_centred_cosine_and_recentring_is_wrong():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 7, 7))
    y = rng.normal(size=(200, 7, 7))
    ref = preprocess.centred_cosine_dissimilarity_pixels(x, y)
    cx, cy = np.asarray(preprocess.embed(x)), np.asarray(preprocess.embed(y))
    np.testing.assert_allclose(np.asarray(preprocess.cosine_dissimilarity(cx, cy)), ref, atol=1e-5)
    # The coordinates are not zero-mean: centring them again measures a different angle.
    assert np.abs(cx.mean(axis=1)).max() > 1e-2
    wrong = preprocess.centred_cosine_dissimilarity_pixels(cx, cy)
    assert np.abs(wrong - ref).max() > 1e-3


def test_dead_kernels_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(3)
    live = rng.normal(size=(40, 5, 5)).astype(np.float32)
    dead = np.stack([np.zeros((5, 5)), np.full((5, 5), 0.37), np.full((5, 5), -1e3)]).astype(
        np.float32
    )
    kernels = np.concatenate([live[:20], dead, live[20:]])
    mask = preprocess.valid_mask(kernels)
    assert mask.sum() == 40 and not mask[20:23].any()
    d = make_data_dir(tmp_path, {"mixed": kernels})
    ds = dataset.KernelDataset(d, 5)
    assert (len(ds), ds.num_dropped, ds.num_total) == (40, 3, 43)
    assert np.isfinite(np.asarray(preprocess.embed(ds.gather(ds.valid_index)))).all()
    # and the jit path never yields NaN even if a dead kernel slips through
    assert np.isfinite(np.asarray(preprocess.embed(dead))).all()


def test_dead_rule_is_relative_for_constants_and_absolute_for_negligible_kernels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 5))
    kernels = np.stack([x[0], x[1] * 1e-9, x[2] * 1e-20, np.full((5, 5), 3.0) + 1e-9 * x[3],
                        np.zeros((5, 5))])
    np.testing.assert_array_equal(preprocess.valid_mask(kernels), [True, True, False, False, False])
