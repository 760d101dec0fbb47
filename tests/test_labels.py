"""Labels file, code lookup and the automatic labeller (dwjax.patterns.labels)."""
import json
import os

import numpy as np
import pytest

from dwjax.patterns import labels as L
from dwjax.patterns import templates as T

LABELS = {"kernel_size": 7, "intervals": [
    {"start": 0.5, "end": 0.75, "label": "Off-Centre", "auto": True, "score": 0.91},
    {"start": 0.0, "end": 0.25, "label": "On-Centre", "auto": False, "score": None},
    {"start": 0.25, "end": 0.4, "label": "On-Centre Cross"},  # hand-written: auto/score omitted
    {"start": 0.9, "end": 1.0, "label": "On-Centre 1st derivative (x)", "auto": True, "score": 0.8},
]}


def test_round_trip(tmp_path):
    path = tmp_path / "labels_k7.json"
    L.save_labels(path, LABELS)
    assert os.listdir(tmp_path) == ["labels_k7.json"]  # no temp file left behind
    loaded = L.load_labels(path, 7)
    assert [iv["start"] for iv in loaded["intervals"]] == [0.0, 0.25, 0.5, 0.9]  # sorted
    assert loaded["intervals"][1] == {"start": 0.25, "end": 0.4, "label": "On-Centre Cross",
                                      "auto": False, "score": None}
    assert json.loads(path.read_text()) == loaded
    L.save_labels(path, loaded)  # overwrite in place
    assert L.load_labels(path, 7) == loaded


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
    "auto": ({"kernel_size": 7, "intervals": [_iv(0.0, 0.2, auto="yes")]}, "auto"),
    "bool_start": ({"kernel_size": 7, "intervals": [_iv(False, 0.2)]}, "finite numbers"),
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
    assert L.label_codes({"kernel_size": 5, "intervals": []}, [0.3]).tolist() == ["Others"]
    with pytest.raises(ValueError):
        L.label_codes(LABELS, [np.nan])


def _class_samples(k, rng):
    """{class name: [N, k, k]} kernels at random σ from the DoG-init sampler (off the bank's
    grid)."""
    mix = {"on_centre": 0.2, "off_centre": 0.2, "cross": 0.2, "first_derivative": 0.2,
           "second_derivative": 0.2}
    kern, _, names = T.sample_dog_init_labelled(3000, k, rng, mix)
    return {n: kern[names == n] for n in set(names.tolist())}


@pytest.mark.parametrize("k", [5, 7])
def test_propose_labels_recovers_synthetic_spectrum(k):
    rng = np.random.default_rng(0)
    pool = _class_samples(k, rng)
    plan = [
        ("On-Centre", 60),
        ("On-Centre Cross", 40),
        (None, 30),
        ("Off-Centre 1st derivative (y)", 50),
        ("Off-Centre", 45),
        ("On-Centre 2nd derivative", 35),
        ("Off-Centre Cross", 40),
        ("On-Centre 1st derivative (x)", 40),
    ]
    blocks, truth = [], []
    for name, n in plan:
        if name is None:  # an unrecognisable stretch: isotropic noise
            blocks.append(rng.normal(size=(n, k, k)))
        else:
            blocks.append(pool[name][rng.choice(len(pool[name]), n)])
        truth += [name] * n
    decoded = np.concatenate(blocks).astype(np.float64)
    decoded += (
        rng.normal(size=decoded.shape) * 0.03 * np.abs(decoded).max(axis=(1, 2), keepdims=True)
    )
    decoded[10] = decoded[200]  # one outlier code inside the first run: absorbed, not an interval
    m = len(decoded)
    codes = np.linspace(0.0, 1.0, m)

    out = L.propose_labels(decoded, codes, k)
    ivs = out["intervals"]
    assert out["kernel_size"] == k
    assert [iv["label"] for iv in ivs] == [n for n, _ in plan if n is not None]
    assert all(iv["auto"] and iv["score"] > 0.9 for iv in ivs)
    # Boundaries at midpoints between the last code of a run and the first of the next.
    bounds = np.cumsum([0] + [n for _, n in plan])
    mid = lambda i: 0.0 if i == 0 else 1.0 if i == m else (codes[i - 1] + codes[i]) / 2  # noqa: E731
    runs = [(bounds[i], bounds[i + 1]) for i, (n, _) in enumerate(plan) if n is not None]
    for iv, (a, b) in zip(ivs, runs):
        assert (iv["start"], iv["end"]) == (pytest.approx(mid(a)), pytest.approx(mid(b))), iv
    assert ivs[0]["start"] == 0.0 and ivs[-1]["end"] == 1.0
    # The lookup of the proposed file gives back the planted classes.
    got = L.label_codes(out, codes)
    want = np.array([t or "Others" for t in truth])
    assert np.mean(got == want) >= 0.98
    # Code order does not matter.
    perm = rng.permutation(m)
    assert L.propose_labels(decoded[perm], codes[perm], k) == out


def test_random_kernels_stay_unlabelled_and_dead_kernels_are_skipped():
    rng = np.random.default_rng(3)
    for k in (5, 7):
        cls, score = L.match_templates(rng.normal(size=(2000, k, k)), k)
        assert np.mean(score >= L.default_min_similarity(k)) < 0.01
    decoded = np.concatenate([np.ones((5, 7, 7)), np.stack([T.dog(7, 1.0)] * 10)])
    cls, score = L.match_templates(decoded, 7)
    assert (cls[:5] == -1).all() and (score[:5] == 0).all()
    out = L.propose_labels(decoded, np.linspace(0, 1, 15), 7)
    assert [(iv["label"], iv["start"]) for iv in out["intervals"]] == [("On-Centre", pytest.approx(
        (np.linspace(0, 1, 15)[4] + np.linspace(0, 1, 15)[5]) / 2))]


def test_min_similarity_and_min_run():
    assert L.default_min_similarity(7) == 0.7 and L.default_min_similarity(5) == 0.8
    assert L.default_min_similarity(9) == 0.7
    dec = np.stack([T.dog(7, 1.0)] * 10 + [T.cross(7, 0.6)] * 2 + [-T.dog(7, 1.0)] * 10)
    out = L.propose_labels(dec, np.linspace(0, 1, 22), 7)  # the 2-code cross run is noise
    assert [iv["label"] for iv in out["intervals"]] == ["On-Centre", "Off-Centre"]
    out = L.propose_labels(dec, np.linspace(0, 1, 22), 7, min_run=2)
    assert [iv["label"] for iv in out["intervals"]] == [
        "On-Centre",
        "On-Centre Cross",
        "Off-Centre",
    ]
    assert L.propose_labels(dec, np.linspace(0, 1, 22), 7, min_similarity=1.01)["intervals"] == []
    assert L.propose_labels(dec[:0], np.zeros(0), 7) == {"kernel_size": 7, "intervals": []}
    with pytest.raises(ValueError):
        L.propose_labels(dec, np.zeros(22), 7)  # codes not distinct
    with pytest.raises(ValueError):
        L.propose_labels(dec, np.linspace(0, 2, 22), 7)
