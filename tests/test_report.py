"""The report on the embedded default's 5×5 kernels: every CSV recomputed from the rows it came
from, the paper's findings (Fig. 10, k-means vs the autoencoder), and the page in a browser."""
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from dwjax import assign, report
from dwjax.io import workdir as workdir_lib
from dwjax.patterns import templates
from dwjax.views import sections
from tests.helpers import stage_config

QUIET = dict(log=lambda *_: None)
LITE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


@pytest.fixture(scope="module")
def reported(default_run_k5, embedded_dir, tmp_path_factory):
    """The default run copied (other tests re-assign the shared one), assigned, reported once."""
    workdir = str(tmp_path_factory.mktemp("report") / "run")
    shutil.copytree(default_run_k5.workdir, workdir,
                    ignore=shutil.ignore_patterns("assignments", "report", "tensorboard"))
    assign.run(stage_config("assign"), workdir, embedded_dir, **QUIET)
    config = stage_config("report", layers="0,5", compare=",".join(LITE[:2]),
                          timeline=",".join(LITE))
    out = report.run(config, workdir, **QUIET)
    rows = pd.read_parquet(workdir_lib.RunDir(workdir).assignments)
    return workdir, out, rows


def _csv(out, name):
    return pd.read_csv(os.path.join(out["dir"], name))


def test_layer_shares_are_of_all_kernels_and_sum_to_the_clustered_fraction(reported):
    _, out, rows = reported
    by_layer = _csv(out, "by_layer.csv")
    classes = list(by_layer.columns[6:])
    assert classes and "clustered_fraction" not in classes
    for (src, layer), g in rows.groupby(["source", "layer"], observed=True):
        line = by_layer[(by_layer.source == src) & (by_layer.layer == layer)]
        assert len(line) == 1
        want = g["clustered"].mean()
        assert line["clustered_fraction"].item() == pytest.approx(want, abs=1e-6)
        assert line[classes].to_numpy().sum() == pytest.approx(want, abs=1e-5)
        for c in classes:
            share = (g["clustered"] & (g["label"] == c)).sum() / len(g)
            assert line[c].item() == pytest.approx(share, abs=1e-6)
    by_source = _csv(out, "by_source.csv")
    assert (by_source[classes].sum(axis=1) < 0.999).all()  # the gap to 1 is the unclustered


def test_activation_quartiles_match_rows_and_the_paper_finding(reported):
    _, out, rows = reported
    act = _csv(out, "activation.csv").set_index("class")
    clustered = rows[rows["clustered"]]
    for c, g in clustered.groupby("label", observed=True):
        x = g["total_activation"].to_numpy(np.float64)
        np.testing.assert_allclose(act.loc[c, ["q1", "median", "q3"]].to_numpy(float),
                                   np.percentile(x, [25, 50, 75]), atol=1e-6)
        assert act.loc[c, "kernels"] == len(x)
    first = [c for c in act.index if "1st derivative" in c]
    medians = {c: act.loc[c, "median"] for c in first + ["On-Centre"]}
    print("Fig. 10 medians:", {c: round(v, 3) for c, v in medians.items()})
    # the paper's Fig. 10: first derivatives centred at zero, On-Centre positive. The bound holds
    # for every training draw measured (seeds 0-4, two summation orders: |median| <= 0.191;
    # BUILD_NOTES, "Labels"), not only for the draw this machine gives seed 0
    assert len(first) >= 2
    assert all(abs(medians[c]) < 0.2 for c in first)
    assert medians["On-Centre"] > 0.5


def test_autoencoder_beats_kmeans_under_the_same_threshold(reported):
    _, out, rows = reported
    t = _csv(out, "kmeans_vs_ae.csv").set_index("source")
    print(t.to_string())
    for src in LITE:
        assert t.loc[src, "autoencoder"] == pytest.approx(
            rows[rows.source == src]["clustered"].mean(), abs=1e-6)
        assert t.loc[src, "autoencoder"] > t.loc[src, "kmeans_10"] + 0.1
    assert {"kmeans_10"} < set(t.columns) and len(t.columns) == 4  # + k-means(intervals)


def test_pca_explained_variance_equals_numpy(reported):
    workdir, out, _ = reported
    ctx = sections.Context(workdir_lib.RunDir(workdir), sections.assignment_files.read_stats(
        workdir_lib.RunDir(workdir).assignments), {})
    kern, _, _ = sections.pca_sample(ctx)
    flat = kern.reshape(len(kern), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    want = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False)))[::-1]
    got = _csv(out, "pca.csv")["explained_variance"].to_numpy()
    np.testing.assert_allclose(got, want[:len(got)], atol=2e-6)
    assert len(got) == 25


def test_timeline_and_comparison_match_rows(reported):
    _, out, rows = reported
    tl = _csv(out, "timeline.csv")
    assert tl.source.tolist() == LITE
    classes = list(tl.columns[3:])
    for _, line in tl.iterrows():
        g = rows[rows.source == line.source]
        assert line.clustered_fraction == pytest.approx(g["clustered"].mean(), abs=1e-6)
        for c in classes:
            assert line[c] == pytest.approx((g["clustered"] & (g["label"] == c)).mean(), abs=1e-6)
    cmp = _csv(out, "compare_efficientnet-lite0_vs_efficientnet-lite1.csv")
    assert cmp.source.unique().tolist() == LITE[:2]
    assert len(cmp) == rows[rows.source.isin(LITE[:2])].groupby(
        ["source", "layer"], observed=True).ngroups


def test_models_table_counts_parameters_and_kernels(reported):
    _, out, rows = reported
    m = _csv(out, "models.csv").set_index("source")
    # published sizes: EfficientNet-Lite0 4.65 M parameters; the shards' 5×5 and 3×3 counts
    assert 4.6e6 < m.loc["efficientnet-lite0", "parameters"] < 4.7e6
    assert m.loc["efficientnet-lite0", "5x5_kernels"] == 6336
    assert m.loc["efficientnet-lite0", "3x3_kernels"] == 2624
    assert m.loc["efficientnet-lite1", "depthwise_layers"] == 21


def test_every_figure_has_png_and_pdf_and_the_page_links_them(reported):
    _, out, _ = reported
    names = {os.path.basename(f)[:-4] for f in out["figures"]}
    for stem in ("by_source", "activation", "pca", "kmeans_vs_ae", "own_fit", "timeline",
                 "compare_efficientnet-lite0_vs_efficientnet-lite1",
                 "layers_efficientnet-lite0", "samples_efficientnet-lite0",
                 "layer_samples_efficientnet-lite0"):
        assert stem in names
        for ext in ("png", "pdf"):
            assert os.path.getsize(os.path.join(out["dir"], f"{stem}.{ext}")) > 1000
    with open(out["page"]) as f:
        page = f.read()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == len(out["figures"])
    assert all(os.path.exists(os.path.join(out["dir"], s)) for s in srcs)
    assert "threshold" in page and "labels_naming_sha256" in page and "http" not in page


def test_page_renders_in_headless_chromium(reported, tmp_path):
    """Every <img> of index.html loads (naturalWidth > 0) in a real browser."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    _, out, _ = reported
    p = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", f"file://{out['page']}?check"],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"data-images-ok=\"(\d+)/(\d+)\"", p.stdout)
    assert m, p.stdout[-2000:]
    assert m.group(1) == m.group(2) == str(len(out["figures"]))


def test_the_random_init_control_runs_end_to_end(tmp_path):
    """The README's untrained control: random-init kernels converted, a brief training, spectrum,
    assign and report all finish; the page is whole even where no interval is labelled, and a
    failing report leaves no partial directory behind."""
    pytest.importorskip("timm")
    from dwjax import convert, spectrum, train
    from dwjax.configs import train as train_configs
    from dwjax.io import sources

    data = str(tmp_path / "data")
    convert.convert(data, [sources.timm_source("efficientnet_lite0", False, 0)], **QUIET)
    c = train_configs.get_config("5")
    c.num_epochs, c.eval_batch_size = 1, 4096
    work = str(tmp_path / "run")
    train.run(c, work, data, **QUIET)
    spectrum.run(stage_config("spectrum"), work, **QUIET)
    summary = assign.run(stage_config("assign"), work, data, **QUIET)
    assert summary["kernels"] == 6336
    out = report.run(stage_config("report"), work, **QUIET)
    assert os.path.exists(out["page"]) and out["figures"]
    assert all(os.path.exists(p) for p in out["figures"] + out["tables"])
    # a report that fails half way keeps the previous page and leaves no temp directory
    with open(out["page"]) as f:
        page = f.read()
    with pytest.raises(sections.ReportError):
        report.run(stage_config("report", compare="efficientnet-lite0,nope"), work, **QUIET)
    with open(out["page"]) as f:
        assert f.read() == page
    assert not [e for e in os.listdir(work) if e.startswith(".")
                and os.path.isdir(os.path.join(work, e))]


def test_labels_name_nearly_every_clustered_kernel_and_the_names_hold(reported):
    """The README main job: 'Others' plus unnamed intervals hold at most 8 % of the clustered
    kernels (2.3-7.1 % over the training draws measured, BUILD_NOTES "Labels"; 27.8 % with the
    fixed bank), and every named interval's mean assigned kernel fits its family (labels.csv,
    and the verdicts recorded in labels.json)."""
    import json

    from dwjax.patterns import labels as labels_lib

    workdir, out, rows = reported
    clustered = rows[rows["clustered"]]
    label = clustered["label"].astype(str)
    unnamed = (label == templates.OTHERS) | label.str.startswith(labels_lib.UNNAMED)
    assert unnamed.mean() <= 0.08, unnamed.mean()
    checks = _csv(out, "labels.csv")
    named = checks[checks["verdict"] != "unchecked"]
    assert len(named) >= 5 and named["count"].sum() >= 0.9 * len(clustered)
    with open(os.path.join(workdir, "labels.json")) as f:
        intervals = json.load(f)["intervals"]
    assert [iv["check"]["verdict"] for iv in intervals] == list(checks["verdict"])
    thr = labels_lib.default_min_similarity(5)
    for _, c in named.iterrows():
        if c["label"] != templates.HIGH_FREQUENCY:
            assert c["score"] >= thr, (c["label"], c["score"])


def test_own_fit_table_recomputes_from_rows_and_kernels(reported, embedded_dir):
    """own_fit.csv: the run's name and each kernel's own fit for every live kernel (the README
    job has fewer than the sample size), and the classes whose shares do not hang on the
    training draw: On-/Off-Centre and the first derivatives match their own-fit shares (seeds
    0-4: within 3.2 points, precision >= 0.80, recall >= 0.77; first derivatives merged within
    1.5 points; BUILD_NOTES "Labels")."""
    from dwjax.io import shards
    from dwjax.patterns import labels as labels_lib
    from dwjax.patterns import name_checks

    _, out, rows = reported
    got = _csv(out, "own_fit.csv").set_index("class")
    run_names, own_names = [], []
    for s in shards.iter_shards(embedded_dir, 5):
        r = rows[rows["source"] == s.source]
        label = r["label"].astype(str).to_numpy()
        live = label != "Dead"
        assert len(r) == len(s.kernels) and live.sum() >= len(r) - 5
        run_names.append(np.where(r["clustered"].to_numpy()[live], label[live], "Unclustered"))
        own_names.append(labels_lib.name_kernels(np.asarray(s.kernels)[live], 5)[0])
    want = name_checks.agreement(np.concatenate(run_names), np.concatenate(own_names),
                                 templates.class_names(5))
    assert list(got.index) == [w["class"] for w in want]
    for w in want:
        for col in ("autoencoder", "own_fit", "both", "precision", "recall"):
            v = got.loc[w["class"], col]
            assert (pd.isna(v) if w[col] is None else v == pytest.approx(w[col], abs=1e-6))
    for c in ("On-Centre", "Off-Centre"):
        assert abs(got.loc[c, "autoencoder"] - got.loc[c, "own_fit"]) < 0.05, c
        assert got.loc[c, "precision"] >= 0.75 and got.loc[c, "recall"] >= 0.7, c
    first = [c for c in got.index if "1st derivative" in c]
    assert len(first) == 4
    assert abs(got.loc[first, "autoencoder"].sum() - got.loc[first, "own_fit"].sum()) < 0.03


def test_own_fit_samples_a_seeded_subset_on_larger_runs(reported, tmp_path):
    import json

    from dwjax.io import assignment_files
    from dwjax.views import label_review

    workdir, out, _ = reported
    run = workdir_lib.RunDir(workdir)
    with open(assignment_files.settings_path(run.assignments)) as f:
        settings = json.load(f)
    stats = assignment_files.read_stats(run.assignments, 5)
    tables = []
    for seed in (0, 0, 1):
        ctx = sections.Context(run, stats, settings, formats=("png",), seed=seed,
                               log=lambda *_: None, out=str(tmp_path / str(len(tables))))
        os.makedirs(ctx.out)
        [entry] = label_review.own_fit_section(ctx, limit=4000)
        # 4,000 drawn, any dead among them dropped
        assert re.search(r"a seeded sample of (4,000|3,99\d) live kernels \(seed \d\)",
                         entry.caption)
        tables.append(pd.read_csv(entry.tables[0]).set_index("class"))
    full = _csv(out, "own_fit.csv").set_index("class")
    assert tables[0].equals(tables[1]) and not tables[0].equals(tables[2])
    for t in tables:
        assert t["autoencoder"].sum() == pytest.approx(1.0, abs=1e-5)
        for c in ("On-Centre", "Off-Centre", "not named"):
            # 4,000 of 23,854: a share's sampling sd is at most 0.008
            assert abs(t.loc[c, "own_fit"] - full.loc[c, "own_fit"]) < 0.03, c


def test_sparse_shard_reads_leave_nothing_mapped_and_labels_share_their_strings(tmp_path):
    """What keeps the report's memory off the shard size: `shards.take_rows` returns the rows a
    fancy index would and unmaps each block's span (a sparse sample otherwise faults in read-ahead
    windows covering most of the file), and a row file's label column holds one str per name."""
    import pyarrow as pa

    from dwjax.io import assignment_rows, shards

    path = str(tmp_path / "k.npy")
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((400_000, 5, 5)).astype(np.float32))
    mm = np.load(path, mmap_mode="r")

    def rss_file_kib() -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("RssFile:")).split()[1])

    idx = np.sort(rng.choice(len(mm), 20_000, replace=False))
    before = rss_file_kib()
    got = shards.take_rows(mm, idx, block=512)
    grown = rss_file_kib() - before
    np.testing.assert_array_equal(got, np.asarray(mm[idx]))  # this read maps the pages
    assert got.dtype == np.float32 and got.shape == (20_000, 5, 5)
    # 20,000 rows of 100 bytes spread over 40 MB: at most a few blocks' spans stay mapped
    assert grown < 0.2 * mm.nbytes / 1024, (grown, mm.nbytes // 1024)
    assert rss_file_kib() - before > 0.5 * mm.nbytes / 1024  # the plain fancy index kept them
    shuffled = rng.permutation(idx)  # any order (training's batches): read sorted, put back
    np.testing.assert_array_equal(shards.take_rows(mm, shuffled), np.asarray(mm[shuffled]))
    names = pa.array(["On-Centre", "Unclustered", "On-Centre"] * 1000).dictionary_encode()
    label = assignment_rows.from_arrow(pa.table({"label": names}), ["label"])["label"]
    assert label.dtype == object and list(label[:3]) == ["On-Centre", "Unclustered", "On-Centre"]
    assert len({id(x) for x in label}) == 2  # one str per distinct name, not one per row
