"""Planted-class kernels (dwjax.patterns.planted) and the labeller measured on them: names from
fitting the kernels themselves, and names through a small trained autoencoder's spectrum."""
import collections

import numpy as np
import pytest
from dwjax.configs import train as train_configs

from dwjax import train
from dwjax.io import workdir as workdir_lib
from dwjax.model import decoder, preprocess, restore
from dwjax.patterns import family_fit, planted
from dwjax.patterns import labels as L
from dwjax.patterns import templates as T
from tests.helpers import make_data_dir

CLUSTER_THRESHOLD = {5: 0.2, 7: 0.3}  # the paper's, as assign uses them


def test_plant_draws_known_classes_in_exact_shares():
    p = planted.plant(1000, 5, 0, noise=0.2)
    assert p.kernels.shape == p.clean.shape == (1000, 5, 5)
    assert p.kernels.dtype == p.clean.dtype == np.float32 and np.all(np.isfinite(p.kernels))
    assert set(p.names.tolist()) <= set(T.class_names(5)) - {"High-frequency", "Others"}
    counts = collections.Counter(p.names.tolist())
    shares = planted.default_shares(5)
    for group, share in shares.items():
        n = sum(v for c, v in counts.items()
                if c == group or (group == planted.FIRST and "1st derivative" in c))
        assert n == round(share * 1000), group  # largest-remainder counts
    assert {"On-Square", "Off-Square"} <= set(counts) and set(p.family.tolist()) == set(
        family_fit.FAMILIES)
    # Clean kernels are centred unit vectors; the noise is `noise` × their pixel RMS (1/k).
    flat = p.clean.reshape(1000, -1)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-6)
    resid = preprocess.embed(p.kernels) @ preprocess.embed(p.clean).T
    assert 0.95 < np.median(np.diag(np.asarray(resid))) < 0.99  # cos ≈ 1/√(1 + 0.2²)
    same = planted.plant(1000, 5, 0, noise=0.2)
    np.testing.assert_array_equal(same.kernels, p.kernels)
    seven = planted.plant(200, 7, 1)
    assert not {"On-Square", "Off-Square"} & set(seven.names.tolist())  # squares are 5×5 only
    with pytest.raises(ValueError, match="On-Square"):
        planted.plant(10, 7, 0, shares={"On-Square": 1.0})


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize("noise", [0.1, 0.25])
def test_fitted_names_carry_the_planted_class(k, noise):
    """Each planted kernel named by the labeller's rule for one code (`labels.name_kernels`):
    ≥ 90 % overall and ≥ 80 % per class. Measured (seed 1, 3000 kernels): 97–98 % (5×5), 99.6 %
    (7×7); the lowest class is On-/Off-Square at 82–87 %: a 2×2 block half a pixel off-centre is
    also a DoG centred between four pixels (another class fits 15–16 % of the clean squares within
    0.01 of their own), and the misnamed squares are those."""
    p = planted.plant(3000, k, 1, noise=noise)
    got, _ = L.name_kernels(p.kernels, k)
    assert np.mean(got == p.names) >= 0.9
    for c in set(p.names.tolist()):
        assert np.mean(got[p.names == c] == c) >= 0.8, (c, collections.Counter(
            got[p.names == c].tolist()).most_common(3))
    if k == 5:
        names = T.class_names(k)
        fits = family_fit.fit(p.clean, k)
        own = np.array([names.index(n) for n in p.names])
        at = np.arange(len(own))
        other = fits.score.copy()
        other[at, own] = -1
        tie = other.max(axis=1) >= fits.score[at, own] - 0.01
        squares = np.char.endswith(p.names, "Square")
        wrong = squares & (got != p.names)
        assert 0.05 < tie[squares].mean() < 0.25
        assert tie[wrong].mean() >= 0.8  # the misnamed squares are the ambiguous ones


# -------------------------------------------------------------------------- through an autoencoder


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The project's 5×5 autoencoder trained briefly on 8000 planted kernels (real-network shares,
    noise 0.1), its 500-code spectrum and the labeller's labels for it."""
    tmp = tmp_path_factory.mktemp("planted")
    p = planted.plant(8000, 5, 0, noise=0.1)
    data = make_data_dir(tmp, {"planted": p.kernels})
    c = train_configs.get_config("5")
    c.num_epochs, c.batch_size, c.checkpoint_every_epochs, c.eval_batch_size = 60, 128, 60, 4096
    train.run(c, str(tmp / "run"), data, log=lambda *_: None)
    params, config = restore.load_params(workdir_lib.RunDir(str(tmp / "run")))
    codes, coords = decoder.decode_codes(params, config.model.negative_slope, 500)
    kernels = preprocess.coords_to_kernels(coords, 5)
    return p, codes, kernels, L.propose_labels(kernels, codes, 5)


def test_autoencoder_route_names_the_clustered_planted_kernels(planted_run):
    """Planted kernels → nearest decoded code → its interval's label, as assign does it.

    Names are compared by family, the four 1st-derivative subtypes merged as in the paper's Fig. 7
    (`templates.merged_class`): the subtype is a 90° bin of a continuous angle, and a kernel a few
    degrees past a bin edge may take its nearest code from the next bin. A class is exempt when
    ≥ 20 % of its clustered kernels sit at codes whose decoded pattern best fits another family:
    they lie within the clustering threshold of that family, so no labelling of the code axis can
    name them. Measured (seed 0): crosses, 2nd derivatives and Off-Square 100 % (a 1-D code this
    briefly trained gives these minority classes no codes of their own: they cluster onto
    On/Off-Centre), On-Square 41 %; every other class ≤ 3 %, and of those 99.2 % carry their
    family (On/Off-Centre 100 %, 1st derivatives 96.8 %; exact subtypes 68–95 %).
    """
    p, codes, kernels, labels = planted_run
    k = 5
    family = np.vectorize(T.merged_class)
    emb, dec = np.asarray(preprocess.embed(p.kernels)), np.asarray(preprocess.embed(kernels))
    sim = emb @ dec.T
    nearest = sim.argmax(axis=1)
    clustered = 1.0 - sim.max(axis=1) < CLUSTER_THRESHOLD[k]
    names = L.label_names(labels)
    got = family(np.asarray(names)[L.label_index(labels, codes[nearest], names)])
    truth = family(p.names)
    code_family = family(np.asarray(T.class_names(k))[
        family_fit.fit(kernels, k).score.argmax(axis=1)])
    assert clustered.mean() > 0.6
    kept, exempt = np.zeros(len(truth), bool), {}
    for c in sorted(set(truth.tolist())):
        m = clustered & (truth == c)
        overlap = np.mean(code_family[nearest[m]] != c) if m.any() else 1.0
        if overlap >= 0.2:
            exempt[c] = round(float(overlap), 2)
            continue
        kept |= m
        assert np.mean(got[m] == c) >= 0.8, (c, collections.Counter(got[m].tolist()))
    assert np.mean(got[kept] == truth[kept]) >= 0.9
    # The exemption stays the exception: the paper's main classes are never exempt, and what is
    # kept is most of what is clustered.
    assert not {"On-Centre", "Off-Centre", T.FIRST_DERIVATIVE} & set(exempt), exempt
    assert kept.sum() >= 0.75 * clustered.sum(), exempt
    # Every code has a name, and the labels file is valid as written.
    assert labels["intervals"][0]["start"] == 0.0 and labels["intervals"][-1]["end"] == 1.0
    assert L.validate_labels(labels) == labels
