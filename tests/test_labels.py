"""Labels file, code lookup, the automatic labeller (dwjax.patterns.labels) and the check that an
interval's kernels earn its name (dwjax.patterns.name_checks)."""
import json
import os

import numpy as np
import pytest

from dwjax.patterns import family_fit, planted
from dwjax.patterns import labels as L
from dwjax.patterns import name_checks as N
from dwjax.patterns import templates as T

LABELS = {"kernel_size": 7, "intervals": [
    {"start": 0.5, "end": 0.75, "label": "Off-Centre", "auto": True, "score": 0.91},
    {"start": 0.0, "end": 0.25, "label": "On-Centre", "auto": False, "score": None},
    {"start": 0.25, "end": 0.4, "label": "On-Centre Cross"},  # hand-written: auto/score omitted
    {"start": 0.9, "end": 1.0, "label": "On-Centre 1st derivative (x)", "auto": True, "score": 0.8},
]}
NEW_KEYS = {"margin": None, "exemplar": None, "fit": None, "nearest": None, "check": None}


def test_round_trip(tmp_path):
    path = tmp_path / "labels_k7.json"
    L.save_labels(path, LABELS)
    assert os.listdir(tmp_path) == ["labels_k7.json"]  # no temp file left behind
    loaded = L.load_labels(path, 7)
    assert [iv["start"] for iv in loaded["intervals"]] == [0.0, 0.25, 0.5, 0.9]  # sorted
    assert loaded["intervals"][1] == {"start": 0.25, "end": 0.4, "label": "On-Centre Cross",
                                      "auto": False, "score": None, **NEW_KEYS}
    assert json.loads(path.read_text()) == loaded
    L.save_labels(path, loaded)  # overwrite in place
    assert L.load_labels(path, 7) == loaded


def test_old_files_load_and_new_keys_round_trip(tmp_path):
    """A file written before score/margin/exemplar/fit/nearest/check existed still loads; the new
    keys are kept when present."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kernel_size": 5, "intervals": [
        {"start": 0.0, "end": 0.5, "label": "On-Square"}]}))
    assert L.load_labels(old, 5)["intervals"][0] == {
        "start": 0.0, "end": 0.5, "label": "On-Square", "auto": False, "score": None, **NEW_KEYS}
    full = {"kernel_size": 5, "intervals": [
        {"start": 0.0, "end": 0.3, "label": "Unnamed pattern 1", "auto": True, "score": 0.61,
         "margin": -0.19, "exemplar": 0.12, "nearest": "Off-Centre",
         "fit": {"family": "dog", "sign": -1, "sigma": 0.5, "theta_deg": 0.0},
         "check": {"verdict": "unchecked", "count": 31}},
        {"start": 0.3, "end": 1.0, "label": "Diagonal bar", "auto": False}]}
    path = tmp_path / "new.json"
    L.save_labels(path, full)
    loaded = L.load_labels(path, 5)
    assert loaded["intervals"][0] == full["intervals"][0]
    assert loaded["intervals"][1]["label"] == "Diagonal bar"


def _iv(start, end, label="On-Centre", **kw):
    return {"start": start, "end": end, "label": label, **kw}


BAD = {
    "overlap": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.3), _iv(0.2, 0.5, "Off-Centre")]},
                "overlap"),
    "reversed": ({"kernel_size": 7, "intervals": [_iv(0.5, 0.2)]}, "start"),
    "empty": ({"kernel_size": 7, "intervals": [_iv(0.5, 0.5)]}, "start"),
    "outside": ({"kernel_size": 7, "intervals": [_iv(0.5, 1.2)]}, "outside [0, 1]"),
    "negative": ({"kernel_size": 7, "intervals": [_iv(-0.1, 0.2)]}, "outside [0, 1]"),
    "wrong_k": ({"kernel_size": 5, "intervals": []}, "kernel_size is 5"),
    "top_key": ({"kernel_size": 7, "intervals": [], "notes": "x"}, "unknown ['notes']"),
    "interval_key": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, colour="red")]}, "colour"),
    "missing_key": ({"kernel_size": 7, "intervals": [{"start": 0.0, "end": 0.2}]}, "missing"),
    "label": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, "On-Square")]}, "unknown label"),
    "misspelt": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, "on-centre")]}, "did you mean"),
    "verdict": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, "Unclustered")]}, "verdict"),
    "padded": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, " Blob")]}, "not padded"),
    "not_str": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, 3)]}, "must be a string"),
    "auto": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, auto="yes")]}, "auto"),
    "bool_start": ({"kernel_size": 7, "intervals": [_iv(False, 0.2)]}, "finite numbers"),
    "margin": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, margin="big")]}, "margin"),
    "exemplar": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, exemplar=1.5)]}, "exemplar"),
    "fit": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, fit={"sigma": [1]})]}, "fit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_files_raise_naming_the_file(tmp_path, case):
    content, fragment = BAD[case]
    path = tmp_path / f"bad_{case}.json"
    path.write_text(json.dumps(content))
    with pytest.raises(L.LabelsError) as e:
        L.load_labels(path, 7)
    msg = str(e.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg
    if case != "wrong_k":  # save refuses the same content (a k=5 file is valid on its own)
        with pytest.raises(L.LabelsError, match="out.json"):
            L.save_labels(tmp_path / "out.json", content)
        assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("text", ['{"kernel_size": 7, "intervals": [', "[]", "",
                                  '{"kernel_size": 7, "intervals": [{"start": NaN, "end": 0.2, '
                                  '"label": "On-Centre"}]}'])
def test_bad_json_raises_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(L.LabelsError, match="broken.json"):
        L.load_labels(path, 7)


def test_label_codes_boundaries_and_gaps():
    codes = [0.0, 0.1, 0.25, 0.3999, 0.4, 0.45, 0.5, 0.75, 0.8, 0.95, 1.0]
    got = L.label_codes(LABELS, codes).tolist()
    assert got == [
        "On-Centre",
        "On-Centre",
        "On-Centre Cross",
        "On-Centre Cross",
        "Others",
        "Others",
        "Off-Centre",
        "Others",
        "Others",
        "On-Centre 1st derivative (x)",
        "On-Centre 1st derivative (x)",
    ]
    names = T.class_names(7)
    np.testing.assert_array_equal(L.label_index(LABELS, codes), [names.index(g) for g in got])
    np.testing.assert_array_equal(L.interval_index(LABELS, codes),
                                  [0, 0, 1, 1, -1, -1, 2, -1, -1, 3, 3])
    assert L.label_codes({"kernel_size": 5, "intervals": []}, [0.3]).tolist() == ["Others"]
    with pytest.raises(ValueError):
        L.label_codes(LABELS, [np.nan])


def test_own_names_get_their_own_index_in_label_names():
    """Unnamed intervals and renames are labels of the file's own: `label_names` appends them
    after the classes (first interval first); the default dictionary counts them as "Others"."""
    labels = {"kernel_size": 5, "intervals": [
        _iv(0.0, 0.2, "Unnamed pattern 2"), _iv(0.2, 0.4, "On-Centre"),
        _iv(0.4, 0.6, "Diagonal bar"), _iv(0.6, 0.8, "Unnamed pattern 2"),
        _iv(0.8, 1.0, "High-frequency")]}
    names = L.label_names(labels)
    assert names == T.class_names(5) + ["Unnamed pattern 2", "Diagonal bar"]
    codes = [0.1, 0.3, 0.5, 0.7, 0.9]
    idx = L.label_index(labels, codes, names)
    assert [names[i] for i in idx] == ["Unnamed pattern 2", "On-Centre", "Diagonal bar",
                                       "Unnamed pattern 2", "High-frequency"]
    assert L.label_codes(labels, codes).tolist() == [names[i] for i in idx]
    plain = np.asarray(T.class_names(5))[L.label_index(labels, codes)]
    assert plain.tolist() == ["Others", "On-Centre", "Others", "Others", "High-frequency"]
    with pytest.raises(ValueError, match="Others"):
        L.label_index(labels, codes, ["On-Centre"])


# ------------------------------------------------------------------------------------ labeller


def _pool(k, seed=0, noise=0.03):
    """{class name: [n, k, k]} planted kernels, every class well represented."""
    shares = {g: 1.0 for g in planted.default_shares(k)}
    p = planted.plant(6000, k, seed, noise=noise, shares=shares)
    return {n: p.kernels[p.names == n] for n in set(p.names.tolist())}


def _checkerboards(n, k, rng):
    y, x = np.mgrid[0:k, 0:k]
    pats = [(-1.0) ** (x + y), (-1.0) ** x, (-1.0) ** y]
    return np.stack([pats[i % 3] + 0.1 * rng.normal(size=(k, k)) for i in range(n)])


@pytest.mark.parametrize("k", [5, 7])
def test_propose_labels_names_a_synthetic_spectrum(k):
    """Blocks of planted kernels along the code axis come back as intervals named after their
    class, an isotropic-noise stretch as "Unnamed pattern 1" (its exemplar inside it) and a
    checkerboard stretch as "High-frequency"; the intervals tile [0, 1]."""
    rng = np.random.default_rng(0)
    pool = _pool(k)
    plan = [("On-Centre", 60), ("On-Centre Cross", 40), ("noise", 30),
            ("Off-Centre 1st derivative (y)", 50), ("Off-Centre", 45),
            ("On-Centre 2nd derivative", 35), ("checker", 30), ("Off-Centre Cross", 40),
            ("On-Centre 1st derivative (x)", 40)]
    if k == 5:
        plan.insert(3, ("Off-Square", 30))
    blocks = []
    for name, n in plan:
        if name == "noise":
            blocks.append(rng.normal(size=(n, k, k)))
        elif name == "checker":
            blocks.append(_checkerboards(n, k, rng))
        else:
            blocks.append(pool[name][rng.choice(len(pool[name]), n)])
    decoded = np.concatenate(blocks)
    m = len(decoded)
    codes = np.linspace(0.0, 1.0, m)

    out = L.propose_labels(decoded, codes, k)
    ivs = out["intervals"]
    want = [{"noise": "Unnamed pattern 1", "checker": "High-frequency"}.get(n, n) for n, _ in plan]
    assert [iv["label"] for iv in ivs] == want
    assert ivs[0]["start"] == 0.0 and ivs[-1]["end"] == 1.0
    assert all(a["end"] == b["start"] for a, b in zip(ivs, ivs[1:]))  # the whole axis
    # Boundaries at midpoints between the last code of a block and the first of the next.
    bounds = np.cumsum([0] + [n for _, n in plan])
    mid = lambda i: 0.0 if i == 0 else 1.0 if i == m else (codes[i - 1] + codes[i]) / 2  # noqa: E731
    for iv, a, b in zip(ivs, bounds[:-1], bounds[1:]):
        assert (iv["start"], iv["end"]) == (pytest.approx(mid(a)), pytest.approx(mid(b))), iv
        assert iv["auto"] and iv["start"] <= iv["exemplar"] <= iv["end"]
        if iv["label"] in T.class_names(k) and iv["label"] != "High-frequency":
            assert iv["score"] >= L.default_min_similarity(k) and iv["margin"] > 0, iv
            assert iv["fit"]["family"] in family_fit.FAMILIES and iv["nearest"] is None
    unnamed = ivs[want.index("Unnamed pattern 1")]
    assert unnamed["margin"] < 0 and unnamed["nearest"] in T.class_names(k)
    hf = ivs[want.index("High-frequency")]
    assert hf["score"] >= family_fit.high_frequency_min(k) and hf["margin"] > 0
    # Code order does not matter.
    perm = rng.permutation(m)
    assert L.propose_labels(decoded[perm], codes[perm], k) == out


def test_random_kernels_are_unnamed_and_dead_kernels_are_no_pattern():
    rng = np.random.default_rng(3)
    for k, chance in ((5, 0.01), (7, 0.001)):
        cls, score = L.match_templates(rng.normal(size=(4000, k, k)), k)
        # The naming threshold sits above chance: isotropic noise rarely fits any family.
        assert np.mean(score >= L.default_min_similarity(k)) < chance
    decoded = np.concatenate([np.ones((5, 7, 7)), np.stack([T.dog(7, 1.0)] * 10)])
    cls, score = L.match_templates(decoded, 7)
    assert (cls[:5] == -1).all() and (score[:5] == 0).all()
    codes = np.linspace(0, 1, 15)
    out = L.propose_labels(decoded, codes, 7)
    assert [(iv["label"], iv["start"]) for iv in out["intervals"]] == [
        ("Unnamed pattern 1", 0.0), ("On-Centre", pytest.approx((codes[4] + codes[5]) / 2))]
    assert out["intervals"][0]["fit"] is None  # a dead code has no fit, and nothing is nearest
    assert out["intervals"][0]["nearest"] is None
    names, score = L.name_kernels(decoded, 7)
    assert names.tolist() == ["Unnamed pattern"] * 5 + ["On-Centre"] * 10


def test_min_similarity_min_run_and_switch_cost():
    assert L.default_min_similarity(7) == 0.7 and L.default_min_similarity(5) == 0.8
    assert L.default_min_similarity(9) == 0.7
    dec = np.stack([T.dog(7, 1.0)] * 10 + [T.cross(7, 0.6)] * 2 + [-T.dog(7, 1.0)] * 10)
    codes = np.linspace(0, 1, 22)
    # Two codes that fit a cross far better than their neighbours' class are kept by default...
    out = L.propose_labels(dec, codes, 7)
    assert [iv["label"] for iv in out["intervals"]] == ["On-Centre", "On-Centre Cross",
                                                         "Off-Centre"]
    # ... and join a neighbour when runs must be 3 codes long or a new run costs more.
    for kw in ({"min_run": 3}, {"switch_cost": 2.0}):
        out = L.propose_labels(dec, codes, 7, **kw)
        assert [iv["label"] for iv in out["intervals"]] == ["On-Centre", "Off-Centre"], kw
    everything = L.propose_labels(dec, codes, 7, min_similarity=1.01)["intervals"]
    assert [(iv["label"], iv["start"], iv["end"]) for iv in everything] == [
        ("Unnamed pattern 1", 0.0, 1.0)]
    assert L.propose_labels(dec[:0], np.zeros(0), 7) == {"kernel_size": 7, "intervals": []}
    with pytest.raises(ValueError):
        L.propose_labels(dec, np.zeros(22), 7)  # codes not distinct
    with pytest.raises(ValueError):
        L.propose_labels(dec, np.linspace(0, 2, 22), 7)


def test_propose_from_params_decodes_and_labels(monkeypatch):
    """`propose_from_params` labels `num_codes` codes decoded from the parameters."""
    seen = {}

    def fake_decode(params, slope, num):
        seen.update(params=params, slope=slope, num=num)
        kernels = np.stack([T.dog(5, 0.8)] * (num // 2) + [-T.dog(5, 0.8)] * (num - num // 2))
        from dwjax.model import preprocess
        return np.linspace(0, 1, num), np.asarray(preprocess.embed(kernels))

    monkeypatch.setattr(L.decoder, "decode_codes", fake_decode)
    out = L.propose_from_params({"p": 1}, 0.01, 5, num_codes=40)
    assert seen == {"params": {"p": 1}, "slope": 0.01, "num": 40}
    assert [iv["label"] for iv in out["intervals"]] == ["On-Centre", "Off-Centre"]


# --------------------------------------------------------------------------------- name checks


def test_check_names_verdicts():
    k = 5
    rng = np.random.default_rng(0)
    pool = _pool(k)
    labels = {"kernel_size": k, "intervals": [
        _iv(0.0, 0.1, "On-Centre"), _iv(0.1, 0.2, "Off-Centre"),
        _iv(0.2, 0.3, "On-Centre 1st derivative (x)"), _iv(0.3, 0.4, "Unnamed pattern 1"),
        _iv(0.4, 0.5, "High-frequency"), _iv(0.5, 0.6, "On-Centre Cross"),
        _iv(0.6, 0.7, "Off-Centre 2nd derivative"), _iv(0.7, 0.8, "Diagonal bar")]}
    on, off = pool["On-Centre"][:200], pool["Off-Centre"][:200]
    dx = pool["On-Centre 1st derivative (x)"][:200]
    mixed = np.concatenate([pool["On-Centre Cross"][:40], pool["Off-Centre"][:160]])
    unit = lambda x: x / np.linalg.norm(x.reshape(len(x), -1), axis=1)[:, None, None]  # noqa
    groups = [on, off, dx, rng.normal(size=(50, k, k)), _checkerboards(60, k, rng), mixed,
              np.zeros((0, k, k)), on]
    means = np.stack([unit(g - g.mean(axis=(1, 2), keepdims=True)).mean(0) if len(g)
                      else np.zeros((k, k)) for g in groups])
    counts = [len(g) for g in groups]
    got = N.check_names(labels, means, counts, samples=[g[:100] for g in groups])
    verdicts = [(r["label"], r["verdict"]) for r in got]
    assert verdicts == [("On-Centre", "ok"), ("Off-Centre", "ok"),
                        ("On-Centre 1st derivative (x)", "ok"), ("Unnamed pattern 1", "unchecked"),
                        ("High-frequency", "ok"), ("On-Centre Cross", "flagged"),
                        ("Off-Centre 2nd derivative", "unchecked"), ("Diagonal bar", "unchecked")]
    assert got[0]["score"] >= 0.95 and got[0]["best"] == "On-Centre" and got[0]["count"] == 200
    assert got[0]["sample_share"] >= 0.9 and got[0]["sample_score"] >= 0.9
    assert "Off-Centre" in got[5]["reason"]  # the mean of a mostly Off-Centre mix
    assert "under half; the rest is mostly Off-Centre (" in got[5]["reason"]
    assert got[6]["reason"] == "no kernels" and got[3]["best"] is not None
    # Without samples only the mean decides; upright crosses named On-Centre are flagged by their
    # mean. (Crosses at every angle average into a blob: the sample check is what sees them.)
    wrong = {"kernel_size": k, "intervals": [_iv(0.0, 1.0, "On-Centre")]}
    cross = T.cross(k, 0.5)[None] + 0.05 * rng.normal(size=(100, k, k))
    res = N.check_names(wrong, unit(cross - cross.mean(axis=(1, 2), keepdims=True)).mean(0)[None],
                        [100])
    assert res[0]["verdict"] == "flagged" and res[0]["best"] == "On-Centre Cross"
    assert res[0]["sample_score"] is None
    with pytest.raises(ValueError):
        N.check_names(labels, means[:2], counts)


def test_agreement_counts_each_class_on_both_sides():
    classes = T.class_names(5)
    run = ["On-Centre", "On-Centre", "Off-Centre", "Unclustered", "Unnamed pattern 2", "Others",
           "On-Centre", "Off-Centre"]
    own = ["On-Centre", "Off-Centre", "Off-Centre", "On-Centre", L.UNNAMED, "On-Square",
           "On-Centre", "High-frequency"]
    rows = {r["class"]: r for r in N.agreement(run, own, classes)}
    assert list(rows) == ["On-Centre", "Off-Centre", "On-Square", "High-frequency", N.NOT_NAMED]
    on, off = rows["On-Centre"], rows["Off-Centre"]
    assert (on["autoencoder"], on["own_fit"], on["both"]) == (3 / 8, 3 / 8, 2 / 8)
    assert on["precision"] == pytest.approx(2 / 3) and on["recall"] == pytest.approx(2 / 3)
    assert (off["autoencoder"], off["own_fit"], off["both"]) == (2 / 8, 2 / 8, 1 / 8)
    # a class only one side names: no precision where the run names none
    assert rows["On-Square"]["precision"] is None and rows["On-Square"]["recall"] == 0.0
    assert rows["High-frequency"]["autoencoder"] == 0.0
    # unclustered, unnamed intervals and "Others" are one row with "no family" on the other side
    nn = rows[N.NOT_NAMED]
    assert (nn["autoencoder"], nn["own_fit"], nn["both"]) == (3 / 8, 1 / 8, 1 / 8)
    assert sum(r["autoencoder"] for r in rows.values()) == pytest.approx(1.0)
    assert sum(r["own_fit"] for r in rows.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        N.agreement(run, own[:-1], classes)
