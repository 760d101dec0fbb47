"""Stage 1, `python -m dwjax.convert`: counts, route equivalence, the embedded default, bad input,
interrupted runs and .npz metadata. Small real data only (random-init timm models, the shipped
ImageNet weights); no network."""
import collections
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dwjax import convert as convert_mod
from dwjax.io import shards
from dwjax.io.extract import layers_from_module, layers_from_state
from dwjax.io.sources import (
    EMBEDDED,
    SourceError,
    checkpoint_source,
    embedded_sources,
    npz_source,
    timm_source,
)
from dwjax.io.weight_files import open_checkpoint

timm = pytest.importorskip("timm")

QUIET = dict(log=lambda *_: None)


def run_convert(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "dwjax.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def walk_counts(model):
    """Independent of dwjax: every nn.Conv2d with groups == in_channels > 1, by kernel size."""
    kernels, layers = collections.Counter(), collections.Counter()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1:
            assert m.out_channels == m.in_channels  # no channel multipliers in these models
            key = f"{m.kernel_size[0]}x{m.kernel_size[1]}"
            kernels[key] += m.out_channels
            layers[key] += 1
    return dict(kernels), dict(layers)


def layer_counts(layers):
    kernels, n = collections.Counter(), collections.Counter()
    for l in layers:
        kernels[l.size_key] += len(l.kernels)
        n[l.size_key] += 1
    return dict(kernels), dict(n)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_same_layers(a, b):
    assert [l.name for l in a] == [l.name for l in b]
    assert [l.index for l in a] == [l.index for l in b] == list(range(len(a)))
    for x, y in zip(a, b):
        assert x.kernels.dtype == y.kernels.dtype == np.float32
        assert np.array_equal(x.kernels, y.kernels), x.name


# ----------------------------------------------------------------------------- 1. counts
# (kernels per size, depthwise layers per size), from random-init timm 1.0.31 models; each is also
# checked against the independent walk above.
EXPECTED = {
    "convnextv2_tiny": ({"7x7": 6624}, {"7x7": 18}),
    "efficientnet_b4": ({"3x3": 8808, "5x5": 19056}, {"3x3": 14, "5x5": 18}),
    # MixNet's MixedConv2d splits each block's channels over several kernel sizes
    "mixnet_s": ({"3x3": 2236, "5x5": 2052, "7x7": 1212, "9x9": 924, "11x11": 144},
                 {"3x3": 16, "5x5": 13, "7x7": 8, "9x9": 5, "11x11": 1}),
    "resnet18": ({}, {}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_random_init(tmp_path, name):
    manifest = convert_mod.convert(
        str(tmp_path / "data"), [timm_source(name, pretrained=False, seed=0)], **QUIET
    )
    (entry,) = manifest["sources"]
    want_kernels, want_layers = EXPECTED[name]
    assert entry["counts"] == want_kernels
    assert entry["nonsquare"] == {}
    assert entry["num_layers"] == sum(want_layers.values())
    assert manifest["totals"] == want_kernels
    src = read_json(str(tmp_path / "data" / entry["dir"] / "source.json"))
    assert dict(collections.Counter(l["size"] for l in src["layers"])) == want_layers
    for key, n in want_kernels.items():
        assert np.load(
            str(tmp_path / "data" / entry["dir"] / f"k{key}.npy"), mmap_mode="r"
        ).shape == (n, *map(int, key.split("x")))
    torch.manual_seed(0)
    assert walk_counts(timm.create_model(name, pretrained=False)) == (want_kernels, want_layers)


def test_resnet18_cli_reports_no_depthwise(tmp_path):
    data = str(tmp_path / "data")
    r = run_convert("--models=resnet18", "--pretrained=false", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    assert any(
        "resnet18" in line and "no depthwise convolutions" in line for line in r.stdout.splitlines()
    ), r.stdout
    manifest = read_json(os.path.join(data, "manifest.json"))
    (entry,) = manifest["sources"]
    assert (entry["id"], entry["counts"], entry["num_layers"], entry["files"]) == (
        "resnet18:random-seed0",
        {},
        0,
        {},
    )
    assert manifest["totals"] == {}


# ----------------------------------------------------------------------------- 2. model route ==
# file route
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """mixnet_s (MixedConv2d splits) and efficientnet_b0, seed 1, with their files in both
    formats."""
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("mixnet_s", "efficientnet_b0"):
        torch.manual_seed(1)  # not timm_source's seed 0: the file's weights must really be loaded
        model = timm.create_model(name, pretrained=False).eval()
        sd = model.state_dict()
        paths = {"safetensors": str(d / f"{name}.safetensors"), "pth": str(d / f"{name}.pth")}
        save_file(sd, paths["safetensors"])
        torch.save(sd, paths["pth"])
        out[name] = (model, paths)
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("name", ["mixnet_s", "efficientnet_b0"])
def test_model_route_equals_file_route(saved_models, name, fmt):
    model, paths = saved_models[name]
    walked = layers_from_module(model)
    from_file = checkpoint_source(paths[fmt]).load()  # by shape, no model built
    via_timm = timm_source(
        name, True, 0, checkpoint=paths[fmt]
    ).load()  # timm builds + loads the file
    assert_same_layers(walked, from_file)
    assert_same_layers(walked, via_timm)
    assert layer_counts(walked) == EXPECTED.get(name, layer_counts(walked))
    if name == "mixnet_s":
        assert "blocks.2.0.conv_dw.0" in [
            l.name for l in walked
        ]  # the MixedConv2d splits, named apart
    torch.manual_seed(0)
    seed0 = layers_from_module(timm.create_model(name, pretrained=False))
    assert not np.array_equal(seed0[0].kernels, walked[0].kernels)


def test_both_routes_write_identical_shards(tmp_path, saved_models):
    _, paths = saved_models["mixnet_s"]
    d1, d2 = str(tmp_path / "a"), str(tmp_path / "b")
    m1 = convert_mod.convert(d1, [checkpoint_source(paths["safetensors"])], **QUIET)
    m2 = convert_mod.convert(
        d2, [timm_source("mixnet_s", True, 0, checkpoint=paths["pth"])], **QUIET
    )
    (e1,), (e2,) = m1["sources"], m2["sources"]
    assert e1["files"] == e2["files"]  # every k*.npy and k*.meta.npy: same sha256
    assert e1["counts"] == e2["counts"] == EXPECTED["mixnet_s"][0]
    l1 = read_json(os.path.join(d1, e1["dir"], "source.json"))["layers"]
    l2 = read_json(os.path.join(d2, e2["dir"], "source.json"))["layers"]
    strip = lambda ls: [(l["layer"], l["name"], l["size"], l["channels"]) for l in ls]
    assert strip(l1) == strip(l2)
    assert {l["stride"] for l in l1} == {-1} and {l["stride"] for l in l2} <= {
        1,
        2,
    }  # unknown without the model


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_route_order_with_ten_plus_blocks(tmp_path, fmt):
    """A stage of 12 blocks: safetensors files list "blocks.10" before "blocks.2"; the layers must
    still
    come out in network order (failed for .safetensors before the fix)."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, depths=(1, 1, 12, 1)).eval()
    path = str(tmp_path / f"m.{fmt}")
    save_file(model.state_dict(), path) if fmt == "safetensors" else torch.save(
        model.state_dict(), path
    )
    walked = layers_from_module(model)
    assert [l.name for l in walked][2:5] == [
        "stages.2.blocks.0.conv_dw",
        "stages.2.blocks.1.conv_dw",
        "stages.2.blocks.2.conv_dw",
    ]
    assert_same_layers(walked, checkpoint_source(path).load())


def test_shipped_mobilenet_v2_matches_torchvision_walk():
    """The legacy-format MobileNetV2 file, read without torch, against torchvision's model loaded
    with it."""
    tv = pytest.importorskip("torchvision")
    slug, package, rel = next(e[:3] for e in EMBEDDED if e[0] == "mobilenet-v2")
    (src,) = [s for s in embedded_sources() if s.id == slug]
    model = tv.models.mobilenet_v2()
    path = os.path.join(list(importlib.util.find_spec(package).submodule_search_locations)[0], rel)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    walked = layers_from_module(model.eval())
    assert_same_layers(walked, src.load())
    assert layer_counts(walked) == ({"3x3": 7136}, {"3x3": 17})


# ----------------------------------------------------------------------------- 4. the embedded
# default
def centre_argmax_fraction(kernels):
    k = kernels.shape[-1]
    flat = np.abs(np.asarray(kernels).reshape(len(kernels), -1))
    return float((flat.argmax(1) == (k * k) // 2).mean())


@pytest.fixture(scope="module")
def embedded_cli(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("embedded") / "data")
    r = run_convert(f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    return data, r


def test_embedded_default_counts(embedded_cli):
    data, r = embedded_cli
    assert "efficientnet-lite0: 5x5: 6,336, 3x3: 2,624 kernels in 16 depthwise layers" in r.stdout
    manifest = read_json(os.path.join(data, "manifest.json"))
    by_id = {e["id"]: e for e in manifest["sources"]}
    assert sorted(by_id) == [
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "mobilenet-v2",
    ]
    assert by_id["efficientnet-lite0"]["counts"] == {"3x3": 2624, "5x5": 6336}
    assert by_id["efficientnet-lite0"]["num_layers"] == 16
    # the others, each equal to the walk of timm's efficientnet_lite1/2 and torchvision's
    # mobilenet_v2
    assert by_id["efficientnet-lite1"]["counts"] == {"3x3": 3248, "5x5": 8400}
    assert by_id["efficientnet-lite2"]["counts"] == {"3x3": 3536, "5x5": 9120}
    assert by_id["mobilenet-v2"]["counts"] == {"3x3": 7136}
    assert manifest["totals"] == {"3x3": 16544, "5x5": 23856}
    assert shards.count_kernels(data, 5) == 23856
    # every file listed with its sha256, and the meta rows agree with the layer table
    lite0 = os.path.join(data, "efficientnet-lite0")
    for fname, info in by_id["efficientnet-lite0"]["files"].items():
        assert shards.sha256_file(os.path.join(lite0, fname)) == info["sha256"]
    meta = np.load(os.path.join(lite0, "k5x5.meta.npy"))
    table = [
        l for l in read_json(os.path.join(lite0, "source.json"))["layers"] if l["size"] == "5x5"
    ]
    want_layer = np.concatenate([np.full(l["channels"], l["layer"]) for l in table])
    want_channel = np.concatenate([np.arange(l["channels"]) for l in table])
    assert np.array_equal(meta["layer"], want_layer) and np.array_equal(
        meta["channel"], want_channel
    )


def test_embedded_default_is_trained(embedded_cli):
    """Trained 5×5 kernels peak at the centre tap (measured: 0.497 of Lite0's 6,336) far more often
    than the 1/25 = 0.04 of chance; a random-init efficientnet_lite0 sits at chance (measured
    0.038..0.042 over seeds 0-4). With n = 6,336 the binomial sd at p = 0.04 is 0.0025: 0.25 is > 80
    sd above
    chance and the random band ±0.01 is 4 sd."""
    data, _ = embedded_cli
    trained = centre_argmax_fraction(np.load(os.path.join(data, "efficientnet-lite0", "k5x5.npy")))
    random_k5 = np.concatenate(
        [
            l.kernels
            for l in timm_source("efficientnet_lite0", False, 0).load()
            if l.size_key == "5x5"
        ]
    )
    assert len(random_k5) == 6336
    rand = centre_argmax_fraction(random_k5)
    assert trained > 0.25
    assert abs(rand - 1 / 25) < 0.01
    assert trained > 5 * rand


# ----------------------------------------------------------------------------- 5. bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, saved_models):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    out = {}
    for fmt in ("pth", "safetensors"):
        data = open(saved_models["mixnet_s"][1][fmt], "rb").read()
        out[f"truncated_{fmt}"] = p = str(d / f"truncated.{fmt}")
        open(p, "wb").write(data[: len(data) // 2])
        out[f"random_{fmt}"] = p = str(d / f"random.{fmt}")
        open(p, "wb").write(rng.bytes(100_000))
    # opens fine, but a depthwise tensor's shape claims more bytes than its data: found only by
    # load()
    data = open(saved_models["mixnet_s"][1]["safetensors"], "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"blocks.0.0.conv_dw.weight":{"dtype":"F32","shape":[16,1,3,3]',
                                   b'"blocks.0.0.conv_dw.weight":{"dtype":"F32","shape":[16,1,3,4]')
    assert header != data[8:8 + n]
    out["bad_shape"] = p = str(d / "bad_shape.safetensors")
    open(p, "wb").write(data[:8] + header + data[8 + n:])
    k = rng.standard_normal((10, 5, 5)).astype(np.float32)
    np.savez(out.setdefault("npz_2d", str(d / "flat.npz")), kernels=k.reshape(10, 25))
    np.savez(out.setdefault("npz_4d", str(d / "four_d.npz")), kernels=k[:, None])
    np.savez(out.setdefault("npz_no_kernels", str(d / "no_kernels.npz")), weights=k)
    np.savez(out.setdefault("npz_empty", str(d / "empty.npz")), kernels=k[:0])
    np.savez(
        out.setdefault("npz_bad_layer", str(d / "bad_layer.npz")),
        kernels=k,
        layer=np.zeros(9, np.int32),
    )
    k_nan, k_inf = k.copy(), k.copy()
    k_nan[3, 2, 2] = np.nan
    k_inf[7, 0, 4] = -np.inf
    np.savez(out.setdefault("npz_nan", str(d / "nan.npz")), kernels=k_nan)
    np.savez(out.setdefault("npz_inf", str(d / "inf.npz")), kernels=k_inf)
    out["not_npz"] = p = str(d / "garbage.npz")
    open(p, "wb").write(rng.bytes(1000))
    out["good_npz"] = p = str(d / "good.npz")
    np.savez(p, kernels=k)
    out["regular_file"] = p = str(d / "a_file")
    open(p, "w").write("not a directory\n")
    return out


BAD_INPUTS = {
    # case: (flags, the input the message must name, and a word it must contain)
    "missing_checkpoint": (["--checkpoint={missing}"], "{missing}", "no such file"),
    "missing_checkpoint_with_model": (
        ["--models=mixnet_s", "--checkpoint={missing}"],
        "{missing}",
        "no such file",
    ),
    "truncated_pth": (["--checkpoint={truncated_pth}"], "{truncated_pth}", "corrupt"),
    "truncated_safetensors": (
        ["--checkpoint={truncated_safetensors}"],
        "{truncated_safetensors}",
        "truncated",
    ),
    "truncated_pth_via_timm": (
        ["--models=mixnet_s", "--checkpoint={truncated_pth}"],
        "{truncated_pth}",
        "corrupt",
    ),
    "random_pth": (["--checkpoint={random_pth}"], "{random_pth}", "unknown checkpoint format"),
    "random_safetensors": (
        ["--checkpoint={random_safetensors}"],
        "{random_safetensors}",
        "corrupt",
    ),
    "bad_shape_found_at_load": (["--checkpoint={bad_shape}"], "{bad_shape}", "corrupt"),
    "unknown_timm_name": (
        ["--models=not_a_model", "--pretrained=false"],
        "not_a_model",
        "unknown timm model",
    ),
    "npz_2d": (["--kernels_npz={npz_2d}"], "{npz_2d}", "[N,k,k]"),
    "npz_4d": (["--kernels_npz={npz_4d}"], "{npz_4d}", "[N,k,k]"),
    "npz_no_kernels": (["--kernels_npz={npz_no_kernels}"], "{npz_no_kernels}", "no 'kernels'"),
    "npz_empty": (["--kernels_npz={npz_empty}"], "{npz_empty}", "N>0"),
    "npz_bad_layer": (["--kernels_npz={npz_bad_layer}"], "{npz_bad_layer}", "'layer'"),
    "npz_nan": (["--kernels_npz={npz_nan}"], "{npz_nan}", "NaN or Inf"),
    "npz_inf": (["--kernels_npz={npz_inf}"], "{npz_inf}", "NaN or Inf"),
    "not_npz": (["--kernels_npz={not_npz}"], "{not_npz}", "not a readable .npz"),
    "missing_npz": (["--kernels_npz={missing}"], "{missing}", "no such file"),
    # a good npz listed after a bad checkpoint: nothing at all may be written
    "good_npz_bad_checkpoint": (
        ["--kernels_npz={good_npz}", "--checkpoint={random_pth}"],
        "{random_pth}",
        "unknown",
    ),
}


def _check_one_line_error(r, names):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("convert: ") and names in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("case,preexisting", [
    pytest.param(c, pre, id=f"{c}-{'existing_empty_dir' if pre else 'fresh_dir'}")
    for c in BAD_INPUTS for pre in (False, True)
    if not (pre and "timm" in c)])  # one run of each slow (timm-importing) case is enough
def test_bad_input(tmp_path, bad_files, case, preexisting):
    flags, names, word = BAD_INPUTS[case]
    fmt = dict(bad_files, missing=str(tmp_path / "does_not_exist.pth"))
    data = tmp_path / "data"
    if preexisting:
        data.mkdir()
    r = run_convert(*[f.format(**fmt) for f in flags], f"--data_dir={data}")
    line = _check_one_line_error(r, names.format(**fmt))
    assert word in line
    if preexisting:
        assert os.listdir(data) == []
    else:
        assert not data.exists()


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_data_dir(bad_files, where):
    # tests run as root: chmod would not stop the write, a regular file in the path does
    target = bad_files["regular_file"]
    data = os.path.join(target, "data") if where == "under_a_file" else target
    r = run_convert(f"--kernels_npz={bad_files['good_npz']}", f"--data_dir={data}")
    line = _check_one_line_error(r, data)
    assert "not writable" in line
    assert open(target).read() == "not a directory\n"


# ----------------------------------------------------------------------------- 6. interrupted runs
DRIVER = r'''
import os, signal, sys
import numpy as np
from dwjax import convert
from dwjax.io import sources
data_dir, kill_at, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
srcs = [sources.npz_source(f) if f.endswith(".npz") else sources.checkpoint_source(f)
        for f in files]
calls = [0]
real_save = np.save
def save(path, arr, *a, **k):
    real_save(path, arr, *a, **k)
    calls[0] += 1
    if calls[0] == kill_at:  # SIGKILL with a shard half written in its temp dir
        os.kill(os.getpid(), signal.SIGKILL)
np.save = save
convert.convert(data_dir, srcs)
'''


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(5)
    a, b, c = str(d / "alpha.npz"), str(d / "beta.npz"), str(d / "gamma.safetensors")
    np.savez(a, kernels=rng.standard_normal((40, 5, 5)).astype(np.float32))
    np.savez(
        b,
        kernels=rng.standard_normal((30, 3, 3)).astype(np.float32),
        layer=np.repeat([0, 1, 2], 10),
    )
    torch.manual_seed(5)
    save_file(
        {
            f"blocks.{i}.conv_dw.weight": torch.randn(8, 1, 3 + 2 * (i % 2), 3 + 2 * (i % 2))
            for i in range(4)
        },
        c,
    )
    driver = str(d / "driver.py")
    open(driver, "w").write(DRIVER)
    return driver, [a, b, c]


def _drive(driver, data, kill_at, files):
    return subprocess.run(
        [sys.executable, driver, data, str(kill_at), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tmp_left(data):
    return [n for n in os.listdir(data) if n.startswith(".tmp-")]


@pytest.mark.parametrize("kill_at", [3, 6], ids=["in_2nd_source", "in_3rd_source"])
def test_killed_run_then_rerun_gives_the_same_manifest(tmp_path, three_sources, kill_at):
    driver, files = three_sources
    ref, data = str(tmp_path / "ref"), str(tmp_path / "data")
    r = _drive(driver, ref, 0, files)
    assert r.returncode == 0, r.stderr
    ref_manifest = open(os.path.join(ref, "manifest.json"), "rb").read()
    # alpha: 2 np.save calls (k5x5 + meta), beta: 2, gamma: 4 (3x3 and 5x5)
    r = _drive(driver, data, kill_at, files)
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert _tmp_left(data), "the kill should have left a half-written temp dir"
    assert not os.path.exists(os.path.join(data, "manifest.json"))
    r = _drive(driver, data, 0, files)
    assert r.returncode == 0, r.stderr
    skipped = [l for l in r.stdout.splitlines() if "already converted, skipped" in l]
    assert len(skipped) == (1 if kill_at == 3 else 2)
    assert _tmp_left(data) == []
    assert open(os.path.join(data, "manifest.json"), "rb").read() == ref_manifest
    assert sorted(os.listdir(data)) == sorted(os.listdir(ref))
    # and again: everything skipped, nothing rewritten
    r = _drive(driver, data, 0, files)
    assert sum("already converted, skipped" in l for l in r.stdout.splitlines()) == 3
    assert open(os.path.join(data, "manifest.json"), "rb").read() == ref_manifest
    m = json.loads(ref_manifest)
    assert [e["counts"] for e in m["sources"]] == [{"5x5": 40}, {"3x3": 30}, {"3x3": 16, "5x5": 16}]


def test_exception_midway_cleans_up_and_rerun_matches(tmp_path, three_sources, monkeypatch):
    _, files = three_sources
    srcs = lambda: [npz_source(files[0]), npz_source(files[1]), checkpoint_source(files[2])]
    ref = convert_mod.convert(str(tmp_path / "ref"), srcs(), **QUIET)
    ref_bytes = open(tmp_path / "ref" / "manifest.json", "rb").read()

    data = str(tmp_path / "data")
    real = shards.write_source
    calls = []

    def failing(data_dir, slug, *a, **k):
        calls.append(slug)
        if len(calls) == 2:
            os.makedirs(
                os.path.join(data_dir, f".tmp-{slug}-partial")
            )  # as a half-done write would
            raise KeyboardInterrupt
        return real(data_dir, slug, *a, **k)

    monkeypatch.setattr(shards, "write_source", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(data, srcs(), **QUIET)
    # the first source is complete and listed; no temp dir; the manifest agrees with the directory
    assert sorted(os.listdir(data)) == [".lock", "alpha", "manifest.json"]
    assert [e["dir"] for e in json.load(open(os.path.join(data, "manifest.json")))["sources"]] == [
        "alpha"
    ]
    monkeypatch.setattr(shards, "write_source", real)

    log = []
    assert convert_mod.convert(data, srcs(), log=log.append) == ref
    assert open(os.path.join(data, "manifest.json"), "rb").read() == ref_bytes
    assert log[0] == "alpha: already converted, skipped"


def test_corrupted_shard_is_reconverted(tmp_path, three_sources):
    _, files = three_sources
    data = str(tmp_path / "data")
    convert_mod.convert(data, [npz_source(files[0])], **QUIET)
    ref = open(os.path.join(data, "manifest.json"), "rb").read()
    shard = os.path.join(data, "alpha", "k5x5.npy")
    raw = bytearray(open(shard, "rb").read())
    raw[-1] ^= 0xFF
    open(shard, "wb").write(raw)
    log = []
    convert_mod.convert(data, [npz_source(files[0])], log=log.append)
    assert "skipped" not in log[0]
    assert open(os.path.join(data, "manifest.json"), "rb").read() == ref


# ----------------------------------------------------------------------------- 7. .npz metadata
def test_npz_layer_channel_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    kernels = rng.standard_normal((9, 5, 5)).astype(np.float32)
    layer = np.array([3, 3, 3, 3, 8, 8, 11, 11, 11])  # ids of a network's depthwise layers
    channel = np.array([0, 5, 2, 9, 1, 0, 7, 3, 4])
    path = str(tmp_path / "export.npz")
    np.savez(path, kernels=kernels, layer=layer, channel=channel)
    data = str(tmp_path / "data")
    r = run_convert(f"--kernels_npz={path}", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    assert "export: 5x5: 9 kernels in 3 depthwise layers" in r.stdout
    d = os.path.join(data, "export")
    assert np.array_equal(np.load(os.path.join(d, "k5x5.npy")), kernels)
    meta = np.load(os.path.join(d, "k5x5.meta.npy"))
    assert meta.dtype == shards.META_DTYPE
    assert np.array_equal(meta["layer"], layer) and np.array_equal(meta["channel"], channel)
    table = read_json(os.path.join(d, "source.json"))["layers"]
    assert [(l["layer"], l["name"], l["channels"]) for l in table] == [
        (3, "layer3", 4),
        (8, "layer8", 2),
        (11, "layer11", 3),
    ]
    (shard,) = shards.iter_shards(data, 5)
    assert shard.layer_names == {3: "layer3", 8: "layer8", 11: "layer11"}
    assert np.array_equal(shard.kernels, kernels) and np.array_equal(shard.meta["layer"], layer)


def test_npz_interleaved_layers_are_grouped_stably(tmp_path):
    rng = np.random.default_rng(8)
    kernels = rng.integers(-9, 9, size=(6, 3, 3)).astype(np.int16)  # integer kernels are accepted
    layer = np.array([2, 9, 2, 4, 9, 2])
    channel = np.array([10, 11, 12, 13, 14, 15])
    path = str(tmp_path / "mixed.npz")
    np.savez(path, kernels=kernels, layer=layer, channel=channel)
    data = str(tmp_path / "data")
    convert_mod.convert(data, [npz_source(path)], **QUIET)
    order = [0, 2, 5, 1, 4, 3]  # by first appearance of the layer id, stable within a layer
    k = np.load(os.path.join(data, "mixed", "k3x3.npy"))
    meta = np.load(os.path.join(data, "mixed", "k3x3.meta.npy"))
    assert k.dtype == np.float32 and np.array_equal(k, kernels[order].astype(np.float32))
    assert np.array_equal(meta["layer"], layer[order]) and np.array_equal(
        meta["channel"], channel[order]
    )


def test_npz_without_metadata(tmp_path):
    path = str(tmp_path / "plain.npz")
    np.savez(path, kernels=np.ones((4, 7, 7), np.float32))
    data = str(tmp_path / "data")
    convert_mod.convert(data, [npz_source(path)], **QUIET)
    meta = np.load(os.path.join(data, "plain", "k7x7.meta.npy"))
    assert meta["layer"].tolist() == [0, 0, 0, 0] and meta["channel"].tolist() == [0, 1, 2, 3]


def test_npz_nonsquare_kept_apart(tmp_path):
    rng = np.random.default_rng(9)
    kernels = rng.standard_normal((12, 1, 11)).astype(np.float32)
    path = str(tmp_path / "band.npz")
    np.savez(path, kernels=kernels, layer=np.repeat([0, 1], 6), channel=np.tile(np.arange(6), 2))
    data = str(tmp_path / "data")
    r = run_convert(f"--kernels_npz={path}", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    assert "1x11 (non-square, kept apart): 12" in r.stdout
    manifest = read_json(os.path.join(data, "manifest.json"))
    (entry,) = manifest["sources"]
    assert entry["counts"] == {} and entry["nonsquare"] == {"1x11": 12}
    assert manifest["totals"] == {}
    assert set(entry["files"]) == {"k1x11.npy", "k1x11.meta.npy"}
    assert np.array_equal(np.load(os.path.join(data, "band", "k1x11.npy")), kernels)
    meta = np.load(os.path.join(data, "band", "k1x11.meta.npy"))
    assert (
        meta["layer"].tolist() == [0] * 6 + [1] * 6
        and meta["channel"].tolist() == list(range(6)) * 2
    )
    assert shards.count_kernels(data, 11) == 0 and list(shards.iter_shards(data, 11)) == []


def test_nonsquare_from_a_checkpoint(tmp_path):
    """inception_next-style 1×11 / 11×1 depthwise weights in a checkpoint: listed apart, not
    counted."""
    sd = {
        "mixer.dwconv_hw.weight": torch.randn(8, 1, 3, 3),
        "mixer.dwconv_w.weight": torch.randn(8, 1, 1, 11),
        "mixer.dwconv_h.weight": torch.randn(8, 1, 11, 1),
        "mixer.scale.weight": torch.randn(8, 1, 1, 1),
    }
    path = str(tmp_path / "incnext.pth")
    torch.save(sd, path)
    layers = layers_from_state(open_checkpoint(path))
    assert [l.name for l in layers] == [
        "mixer.dwconv_hw",
        "mixer.dwconv_w",
        "mixer.dwconv_h",
    ]  # no 1×1
    m = convert_mod.convert(str(tmp_path / "data"), [checkpoint_source(path)], **QUIET)
    (entry,) = m["sources"]
    assert entry["counts"] == {"3x3": 8} and entry["nonsquare"] == {"1x11": 8, "11x1": 8}
    assert m["totals"] == {"3x3": 8}


def test_rewritten_npz_is_converted_again(tmp_path):
    """An .npz rewritten under the same name is not mistaken for the one already converted."""
    path = str(tmp_path / "m.npz")
    data = str(tmp_path / "data")
    np.savez(path, kernels=np.random.default_rng(0).normal(size=(10, 5, 5)).astype(np.float32))
    convert_mod.convert(data, [npz_source(path)], **QUIET)
    np.savez(path, kernels=np.random.default_rng(1).normal(size=(20, 7, 7)).astype(np.float32))
    log = []
    manifest = convert_mod.convert(data, [npz_source(path)], log=log.append)
    assert "skipped" not in log[0]
    assert manifest["totals"] == {"7x7": 20}


def test_npz_negative_layer_ids_are_refused(tmp_path):
    path = str(tmp_path / "neg.npz")
    np.savez(
        path,
        kernels=np.zeros((2, 3, 3), np.float32) + np.arange(9).reshape(3, 3),
        layer=np.array([0, -1]),
    )
    with pytest.raises(SourceError, match="layer"):
        npz_source(path)
