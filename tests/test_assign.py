"""Spectrum, labels and assignment end to end: reference equality, synthetic DoG recovery, trained
vs
untrained, per-shard resume and one-line refusals of inconsistent workdirs."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
from dwjax.configs import train as train_configs

from dwjax import assign, convert, spectrum, train
from dwjax.io import assignment_files, shards, sources
from dwjax.io import workdir as workdir_lib
from dwjax.model import decoder, restore
from dwjax.patterns import labels as labels_lib
from dwjax.patterns import templates
from tests.conftest import run_module
from tests.helpers import make_data_dir, stage_config
from tests.reference import nearest_codes_reference

QUIET = dict(log=lambda *_: None)


def _rows(workdir):
    import pandas as pd

    return pd.read_parquet(os.path.join(workdir, "assignments"))


@pytest.fixture(scope="module")
def dog_run(tmp_path_factory):
    """A 7×7 autoencoder trained on synthetic DoG-family kernels (paper appendix F's mix)."""
    rng = np.random.default_rng(0)
    kernels, _, classes = templates.sample_dog_init_labelled(6000, 7, rng)
    noisy = kernels + 0.02 * rng.normal(size=kernels.shape) * np.abs(kernels).max(
        axis=(1, 2), keepdims=True
    )
    tmp = tmp_path_factory.mktemp("dog")
    d = make_data_dir(tmp, {"dogs": noisy.astype(np.float32)})
    c = train_configs.get_config("7")
    c.num_epochs, c.batch_size = 60, 128
    train.run(c, str(tmp / "run"), d, **QUIET)
    return str(tmp / "run"), d, np.asarray(classes)


def test_synthetic_dog_kernels_get_their_automatic_label(dog_run):
    workdir, d, classes = dog_run
    spectrum.run(stage_config("spectrum"), workdir, **QUIET)
    assert os.path.exists(os.path.join(workdir, "figures", "spectrum.png"))
    summary = assign.run(stage_config("assign"), workdir, d, **QUIET)
    rows = _rows(workdir)
    assert len(rows) == summary["kernels"] == 6000
    got = [templates.merged_class(l) for l in rows["label"]]
    want = [templates.merged_class(c) for c in classes[rows["channel"].to_numpy()]]
    agree = np.mean([g == w for g, w in zip(got, want)])
    print(f"synthetic DoG kernels: {agree:.1%} get the matching automatic label")
    assert agree >= 0.90


def test_assignment_rows_equal_brute_force(dog_run, tmp_path):
    """The CSV written for a shard is the numpy float64 brute force over the 10,000 decoded codes.

    Neighbouring decoded codes differ by ~1e-6 in cosine, so float32 may pick a neighbour of the
    float64 argmax: the dissimilarity must agree to 1e-5 and the code to a few steps (the
    exact-index
    check on well-separated random data is in test_nearest)."""
    workdir, d, _ = dog_run
    params, config = restore.load_params(workdir_lib.RunDir(workdir))
    codes, recon = decoder.decode_codes(params, config.model.negative_slope, 10_000)
    shard = next(shards.iter_shards(d, 7))
    ref_idx, ref_dis = nearest_codes_reference(shard.kernels, recon)
    rows = _rows(workdir)
    np.testing.assert_allclose(rows["dissimilarity"].to_numpy(), ref_dis, atol=1e-5)
    np.testing.assert_allclose(
        rows["code"].to_numpy(), codes[ref_idx], atol=5.5e-4
    )  # ≤ 5 code steps
    assert (np.abs(rows["code"].to_numpy() - codes[ref_idx]) < 1e-6).mean() > 0.7
    assert (
        rows["clustered"].to_numpy() == (ref_dis < 0.3)
    ).mean() > 0.999  # ties at the threshold only


def test_trained_kernels_cluster_far_more_than_random_init(default_run_k5, embedded_dir, tmp_path):
    """Real EfficientNet-Lite 5×5 kernels vs Kaiming-initialised ones of the same shapes (timm)."""
    pytest.importorskip("timm")
    workdir = default_run_k5.workdir
    spectrum.run(stage_config("spectrum"), workdir, **QUIET)
    trained = assign.run(stage_config("assign"), workdir, embedded_dir, **QUIET)
    random_dir = str(tmp_path / "random")
    convert.convert(
        random_dir,
        [sources.timm_source(f"efficientnet_lite{i}", False, 0) for i in range(3)],
        **QUIET,
    )
    assert shards.count_kernels(random_dir, 5) == 23856  # the same 5×5 shapes as the real ones
    config = stage_config("assign", job__overwrite=True)
    untrained = assign.run(config, workdir, random_dir, **QUIET)
    print(
        f"clustered: trained {trained['clustered_fraction']:.1%}, "
        f"random init {untrained['clustered_fraction']:.1%}"
    )
    assert trained["clustered_fraction"] > 0.5
    assert untrained["clustered_fraction"] < 0.1
    assert trained["clustered_fraction"] > 5 * untrained["clustered_fraction"]


def test_killed_assignment_resumes_per_shard(tmp_path, dog_run):
    workdir, _, _ = dog_run
    rng = np.random.default_rng(1)
    kernels = templates.sample_dog_init(900, 7, rng)
    d = make_data_dir(tmp_path, {f"part{i}": kernels[i * 300:(i + 1) * 300] for i in range(3)})
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    for f in ("config.json", "labels.json"):
        os.link(os.path.join(workdir, f), os.path.join(fresh, f))
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(fresh, "checkpoints"))
    full = assign.run(stage_config("assign"), fresh, d, **QUIET)
    expected = {p: open(p, "rb").read()
                for p in glob.glob(os.path.join(fresh, "assignments", "*.parquet"))}

    real = assign.nearest.Searcher.stream_segments

    def dies_on_second_shard(*a, **kw):
        for i, chunk in real(*a, **kw):
            if i == 1:
                raise KeyboardInterrupt("killed")
            yield i, chunk

    import shutil

    shutil.rmtree(os.path.join(fresh, "assignments"))
    assign.nearest.Searcher.stream_segments = dies_on_second_shard
    try:
        with pytest.raises(KeyboardInterrupt):
            assign.run(stage_config("assign"), fresh, d, **QUIET)
    finally:
        assign.nearest.Searcher.stream_segments = real
    assert len(glob.glob(os.path.join(fresh, "assignments", "*.parquet"))) == 1
    logs = []
    again = assign.run(stage_config("assign"), fresh, d, log=logs.append)
    assert sum("skipped" in l for l in logs) == 1
    assert {p: open(p, "rb").read()
            for p in glob.glob(os.path.join(fresh, "assignments", "*.parquet"))} == expected
    assert again == full
    assert not glob.glob(os.path.join(fresh, "assignments", ".tmp-*"))


def test_inconsistent_workdirs_get_one_line_errors(dog_run, tmp_path):
    workdir, d, _ = dog_run

    def fails(*args):
        p = run_module("dwjax.assign", *args)
        assert p.returncode != 0
        err = p.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("assign:"), err
        return err

    assert "trained on 7x7" in fails(f"--workdir={workdir}", f"--data_dir={d}", "--kernel_size=5")
    # labels with overlapping intervals
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    for f in ("config.json",):
        os.link(os.path.join(workdir, f), os.path.join(bad, f))
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(bad, "checkpoints"))
    with open(os.path.join(bad, "labels.json"), "w") as f:
        json.dump(
            {
                "kernel_size": 7,
                "intervals": [
                    {"start": 0.0, "end": 0.5, "label": "On-Centre"},
                    {"start": 0.4, "end": 0.9, "label": "Off-Centre"},
                ],
            },
            f,
        )
    assert "overlap" in fails(f"--workdir={bad}", f"--data_dir={d}")
    assert not os.path.exists(os.path.join(bad, "assignments"))
    # missing checkpoint
    os.remove(os.path.join(bad, "checkpoints"))
    assert "no checkpoint" in fails(f"--workdir={bad}", f"--data_dir={d}")
    # a data dir without 7×7 kernels
    d5 = make_data_dir(
        tmp_path / "five", {"five": np.random.default_rng(0).normal(size=(10, 5, 5))}
    )
    assert "no 7x7 kernels" in fails(f"--workdir={workdir}", f"--data_dir={d5}")


def test_labels_file_kernel_size_mismatch_is_refused(tmp_path):
    path = str(tmp_path / "labels.json")
    labels_lib.save_labels(path, {"kernel_size": 5, "intervals": []})
    with pytest.raises(labels_lib.LabelsError, match="labels.json"):
        labels_lib.load_labels(path, 7)


def test_report_tables_match_the_assignments(dog_run):
    import pandas as pd

    from dwjax import report

    workdir, d, _ = dog_run
    # already done: every shard skipped
    summary = assign.run(stage_config("assign"), workdir, d, **QUIET)
    out = report.run(stage_config("report"), workdir, **QUIET)
    by_source = pd.read_csv(os.path.join(out["dir"], "by_source.csv"))
    assert list(by_source["source"]) == ["dogs"]
    assert by_source["kernels"].iloc[0] == 6000
    assert abs(by_source["clustered_fraction"].iloc[0] - summary["clustered_fraction"]) < 1e-4
    shares = by_source.drop(columns=["source", "kernels", "clustered_fraction"]).iloc[0]
    assert abs(shares.sum() - 1) < 1e-3  # shares among clustered kernels
    assert shares.idxmax() == "On-Centre"  # 45 % of appendix F's mix
    by_layer = pd.read_csv(os.path.join(out["dir"], "by_layer.csv"))
    assert by_layer["kernels"].sum() == 6000
    # per-layer shares equal a pandas computation on the rows themselves
    rows = _rows(workdir)
    for _, layer in by_layer.iterrows():
        sel = rows[(rows["layer"] == layer["layer"]) & (rows["clustered"] == 1)]
        want = sel["label"].astype(str).value_counts(normalize=True)
        for c, v in want.items():
            assert abs(layer[c] - v) < 1e-4
    assert all(os.path.getsize(f) > 10_000 for f in out["figures"])
    assert os.path.join(out["dir"], "samples_dogs.png") in out["figures"]


def test_kmeans_path_for_3x3(embedded_dir, tmp_path):
    """The paper's 3×3 path: 10 k-means clusters on min-max-encoded kernels, no training run
    needed."""
    workdir = str(tmp_path / "k3")
    logs = []
    config = stage_config("assign", kernel_size=3)
    summary = assign.run(config, workdir, embedded_dir, log=logs.append)
    assert any("fitting k-means (10 clusters) on 16,532" in l for l in logs)  # 16,544 minus 12 dead
    rows = _rows(workdir)
    assert len(rows) == summary["kernels"] == 16544
    live = rows[rows["label"] != "Dead"]
    assert len(live) == 16532 and set(live["code"].astype(int)) == set(range(10))
    # clustered: nearer a centroid than all but 0.5 % of uniform-random kernels; real ones are
    # far more often (the unclustered rest is labelled so)
    with np.load(os.path.join(workdir, "kmeans_k3.npz")) as z:
        threshold = float(z["threshold"])
    np.testing.assert_array_equal(live["clustered"], live["dissimilarity"] < threshold)
    assert summary["clustered"] == live["clustered"].sum() > 0.3 * len(live)
    assert (live.loc[~live["clustered"], "label"] == "Unclustered").all()
    # every kernel's code is its nearest centroid
    from dwjax.search import kmeans

    with np.load(os.path.join(workdir, "kmeans_k3.npz")) as z:
        centroids, names = z["centroids"], z["names"]
    kernels = np.concatenate([s.kernels for s in shards.iter_shards(embedded_dir, 3)])
    x = kmeans.minmax_encode(kernels)
    d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    live_mask = rows["label"].to_numpy() != "Dead"
    np.testing.assert_array_equal(
        d[live_mask].argmin(1), rows["code"].to_numpy()[live_mask].astype(int)
    )
    assert sum(n.startswith("On-Centre") or n.startswith("Off-Centre") for n in names) >= 2
    # the centroids are kept: a second job (another data dir) does not refit
    logs.clear()
    assign.run(stage_config("assign", kernel_size=3), workdir, embedded_dir, log=logs.append)
    assert not any("fitting" in l for l in logs) and sum("skipped" in l for l in logs) == 4
    from dwjax import report

    figs = report.run(stage_config("report"), workdir, **QUIET)["figures"]
    # paper Fig. 2: the stems' regular 3×3 kernels beside depthwise ones, from convert's sample
    assert os.path.join(workdir, "report", "regular_vs_depthwise_mobilenet-v2.png") in figs
    regular = shards.read_regular(embedded_dir, "mobilenet-v2", 3)
    assert regular.shape == (96, 3, 3)  # the stem: 32 outputs × 3 inputs


def test_random_init_3x3_kernels_are_not_clustered(embedded_dir, tmp_path):
    """Kaiming-uniform 3×3 kernels (what `convert --pretrained=false` gives) are at most 1 %
    clustered, whether the centroids are fitted on them or on real kernels."""
    pytest.importorskip("timm")
    random_dir = str(tmp_path / "random")
    convert.convert(random_dir, [sources.timm_source("mobilenetv2_100", False, 0)], **QUIET)
    own = assign.run(stage_config("assign", kernel_size=3), str(tmp_path / "own"), random_dir,
                     **QUIET)
    assert own["kernels"] > 5000 and own["clustered_fraction"] <= 0.01
    real = str(tmp_path / "real")
    assign.run(stage_config("assign", kernel_size=3), real, embedded_dir, **QUIET)
    shutil.rmtree(os.path.join(real, "assignments"))
    other = assign.run(stage_config("assign", kernel_size=3), real, random_dir, **QUIET)
    assert other["clustered_fraction"] <= 0.01


def test_same_named_shard_from_another_data_dir_is_assigned_and_quoted(dog_run, tmp_path):
    """A shard directory name already assigned, but other content, is assigned again (not skipped);
    a source id with a comma and a quote survives the CSV."""
    workdir, _, _ = dog_run
    rng = np.random.default_rng(5)
    first = make_data_dir(tmp_path / "a", {'x,"y': templates.sample_dog_init(40, 7, rng)})
    second = make_data_dir(tmp_path / "b", {'x,"y': templates.sample_dog_init(60, 7, rng)})
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    for f in ("config.json", "labels.json"):
        os.link(os.path.join(workdir, f), os.path.join(fresh, f))
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(fresh, "checkpoints"))
    assert assign.run(stage_config("assign"), fresh, first, **QUIET)["kernels"] == 40
    logs = []
    assert assign.run(stage_config("assign"), fresh, second, log=logs.append)["kernels"] == 60
    assert not any("skipped" in l for l in logs)
    rows = _rows(fresh)
    assert len(rows) == 60 and set(rows["source"]) == {'x,"y'}


def _mapped_kib(path: str) -> int:
    """This process's resident KiB of every mapping of `path` (/proc/self/smaps)."""
    total, here = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not line[0].isupper():
                here = len(head) > 5 and head[5] == path
            elif here and line.startswith("Rss:"):
                total += int(head[1])
    return total


def test_the_method_sample_leaves_the_shards_unmapped(tmp_path):
    """The search method's evidence (2,048 kernels spread over the job) reads far-apart rows;
    each read faults in a read-ahead window, and over the sample those windows would map most of
    the shard at once: nothing of it stays resident (7x7 kernels, 39 MB, all in the page cache)."""
    from types import SimpleNamespace

    path = str(tmp_path / "k7.npy")
    np.save(path, np.random.default_rng(0).standard_normal((200_000, 7, 7)).astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    total = float(np.asarray(mm).sum())  # the whole file into the page cache (and mapped)
    shards.release_pages(mm, 0, len(mm))
    sample = assign._sample([SimpleNamespace(kernels=mm)])
    assert len(sample) == 2048 and np.array_equal(sample[-1], mm[-1])
    assert _mapped_kib(path) < 1024, _mapped_kib(path)  # of 38,281 KiB
    assert float(np.asarray(mm).sum()) == total


def test_a_part_writer_leaves_the_metadata_unmapped(tmp_path):
    """Writing a part's rows reads its layer and channel metadata block by block and releases
    those pages; the rows are built from copies, so nothing maps them again (8 B per kernel
    stayed resident per part before: 80 MB of a 10M-kernel job)."""
    from dwjax.io.assignment_rows import Rows

    n = 1_000_000
    d = make_data_dir(tmp_path, {"s": np.random.default_rng(0).standard_normal(
        (n, 3, 3)).astype(np.float32)})
    (shard,) = shards.iter_shards(d, 3)
    meta_path = os.path.realpath(shards.meta_file(d, shard.dir, 3))
    (part,) = assignment_files.plan_parts([shard], n)
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "_meta"))
    block = 1 << 17
    with assignment_files.open_part(out, part, 3, "parquet", d, ["a", "unclustered", "dead"]) \
            as writer:
        for a in range(0, n, block):
            m = min(block, n - a)
            writer.write([Rows(np.zeros(m), np.zeros(m, np.float32), np.zeros(m, bool),
                               np.zeros(m, np.int32), np.zeros(m, np.float32),
                               np.ones(m, np.float32))])
        assert _mapped_kib(meta_path) < 512, _mapped_kib(meta_path)  # of 7,813 KiB
    assert writer.stats()["kernels"] == n


def test_distinct_ids_are_np_unique():
    rng = np.random.default_rng(0)
    for ids in (rng.integers(3, 40, 10_000), rng.integers(0, 1 << 30, 500), np.zeros(0, int),
                np.full(7, 5)):
        ids = ids.astype(np.int32)
        got = assignment_files.distinct_ids(ids)
        assert got.dtype == ids.dtype and np.array_equal(got, np.unique(ids))
