"""dwjax.io.weight_files (the torch-free lazy readers) against torch.load / safetensors on real
files."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dwjax.io.extract import layers_from_state
from dwjax.io.sources import EMBEDDED
from dwjax.io.weight_files import CheckpointError, open_checkpoint


def _embedded_path(package, rel):
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is not installed"
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def _assert_same(lazy, ref):
    """`lazy` ({name: LazyTensor}) holds exactly `ref` ({name: torch.Tensor}), in the same order."""
    assert list(lazy) == list(ref)
    for name, t in ref.items():
        a = lazy[name].load()
        want = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        assert a.shape == tuple(t.shape), name
        assert a.dtype == want.dtype, name
        assert a.flags.c_contiguous, name
        assert np.array_equal(a, want), name


def _tensors(seed=0):
    """Tensors of every dtype the readers know, including views that are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=g)
    return {
        "features.0.weight": torch.randn(16, 1, 3, 3, generator=g),
        "transposed": base.t(),                        # strides (1, 8)
        "strided_slice": base[1:5, ::2],               # storage offset 8, strides (16, 2)
        "row": base[3],                                # storage offset 24, shares `base`'s storage
        "permuted": torch.randn(2, 3, 4, 5, generator=g).permute(3, 1, 0, 2),
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        "dw_bf16.weight": torch.randn(8, 1, 5, 5, generator=g).to(torch.bfloat16),
        "dw_fp16.weight": torch.randn(8, 1, 7, 7, generator=g).to(torch.float16),
        "bf16_transposed": torch.randn(4, 6, generator=g).to(torch.bfloat16).t(),
        "fp16_slice": torch.randn(10, 3, generator=g).to(torch.float16)[2:7, 1],
        "double": torch.randn(3, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(3.5),
        "int64": torch.arange(7),
        "int32": torch.arange(5, dtype=torch.int32),
        "uint8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def _is_view(t):
    return not t.is_contiguous() or t.storage_offset() != 0


# ----------------------------------------------------------------------------- legacy (shipped)
# files
@pytest.mark.parametrize(
    "slug,package,rel", [e[:3] for e in EMBEDDED], ids=[e[0] for e in EMBEDDED]
)
def test_embedded_legacy_files_match_torch_load(slug, package, rel):
    path = _embedded_path(package, rel)
    with open(path, "rb") as f:
        # torch < 1.6 format: a pickled magic number first (protocol 2, LONG1 of 10 bytes), no zip
        assert f.read(4) == b"\x80\x02\x8a\n"
    ref = torch.load(path, map_location="cpu", weights_only=True)
    _assert_same(open_checkpoint(path), ref)
    # the EfficientNet-Lite files hold non-contiguous (transposed) tensors: the strided path is
    # exercised
    if slug.startswith("efficientnet"):
        assert sum(_is_view(t) for t in ref.values()) > 0


def test_embedded_legacy_depthwise_layers_match_torch():
    path = _embedded_path(*EMBEDDED[0][1:3])
    ref = torch.load(path, map_location="cpu", weights_only=True)
    layers = layers_from_state(open_checkpoint(path))
    want = [
        (k, v)
        for k, v in ref.items()
        if k.endswith("weight")
        and v.ndim == 4
        and v.shape[1] == 1
        and v.shape[0] > 1
        and v.shape[2] * v.shape[3] > 1
    ]
    assert [l.name + ".weight" for l in layers] == [k for k, _ in want]
    assert [l.index for l in layers] == list(range(len(want)))
    for layer, (_, v) in zip(layers, want):
        assert layer.kernels.dtype == np.float32
        assert np.array_equal(layer.kernels, v[:, 0].numpy())


# ----------------------------------------------------------------------------- files written here
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_views_and_dtypes(tmp_path, zip_format):
    sd = _tensors()
    assert sum(_is_view(t) for t in sd.values()) >= 6
    path = str(tmp_path / "views.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    with open(path, "rb") as f:
        assert (f.read(4) == b"PK\x03\x04") == zip_format
    _assert_same(open_checkpoint(path), torch.load(path, weights_only=True))


def test_zip_nested_training_checkpoint_takes_only_the_weights(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"blocks.0.conv_dw.weight": torch.randn(8, 1, 3, 3, generator=g),
          "blocks.0.conv_pw.weight": torch.randn(16, 8, 1, 1, generator=g),
          "blocks.1.conv_dw.weight": torch.randn(16, 1, 5, 5, generator=g).to(torch.bfloat16),
          "blocks.1.conv_dw.bias": torch.randn(16, generator=g)}
    # Adam moments have the kernels' shapes: they must not be taken for depthwise layers
    optim = {
        "state": {
            i: {
                "step": torch.tensor(10.0),
                "exp_avg": torch.randn(v.shape, generator=g),
                "exp_avg_sq": torch.rand(v.shape, generator=g),
            }
            for i, v in enumerate(sd.values())
        },
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}],
    }
    path = str(tmp_path / "train_ckpt.pth")
    torch.save(
        {"epoch": 7, "state_dict": sd, "optimizer": optim, "best_top1": 71.5, "arch": "x"}, path
    )
    full = torch.load(path, weights_only=True)
    lazy = open_checkpoint(path)
    _assert_same(lazy, full["state_dict"])
    layers = layers_from_state(lazy)
    assert [(l.name, l.kernels.shape) for l in layers] == [("blocks.0.conv_dw", (8, 3, 3)),
                                                          ("blocks.1.conv_dw", (16, 5, 5))]
    assert np.array_equal(layers[1].kernels, sd["blocks.1.conv_dw.weight"][:, 0].float().numpy())


def test_zip_model_wrapper_key(tmp_path):
    sd = {"conv.weight": torch.randn(4, 1, 3, 3)}
    path = str(tmp_path / "wrapped.pt")
    torch.save({"model": sd, "ema": {"conv.weight": torch.zeros(4, 1, 3, 3)}}, path)
    _assert_same(open_checkpoint(path), sd)


def test_safetensors_matches_load_file(tmp_path):
    sd = {k: v.contiguous() for k, v in _tensors(2).items() if k != "expanded"}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    ref = load_file(path)
    lazy = open_checkpoint(path)
    assert set(lazy) == set(ref)
    _assert_same(lazy, {k: ref[k] for k in lazy})


def test_safetensors_in_network_order(tmp_path):
    """safetensors sorts by name ("blocks.10" < "blocks.2"); the reader restores numeric order, so a
    12-block model's layers come out as from a .pth or the model walk."""
    g = torch.Generator().manual_seed(3)
    sd = {f"blocks.{i}.conv_dw.weight": torch.randn(4, 1, 3, 3, generator=g) for i in range(12)}
    sd["head.weight"] = torch.randn(2, 4)
    st_path, pth_path = str(tmp_path / "m.safetensors"), str(tmp_path / "m.pth")
    save_file(sd, st_path)
    torch.save(sd, pth_path)
    assert list(open_checkpoint(st_path)) == list(sd) == list(open_checkpoint(pth_path))
    a, b = layers_from_state(open_checkpoint(st_path)), layers_from_state(open_checkpoint(pth_path))
    assert [l.name for l in a] == [l.name for l in b] == [f"blocks.{i}.conv_dw" for i in range(12)]
    assert all(np.array_equal(x.kernels, y.kernels) for x, y in zip(a, b))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_never_runs_code(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv.weight": torch.ones(3, 1, 3, 3)}, "extra": _Evil()}, path)
    assert list(open_checkpoint(path)) == ["conv.weight"]
    assert not os.path.exists(_Evil.marker)


# ----------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    sd = {k: v.contiguous() for k, v in _tensors(4).items() if k != "expanded"}
    paths = {
        "zip": str(d / "z.pth"),
        "legacy": str(d / "l.pth"),
        "safetensors": str(d / "s.safetensors"),
    }
    torch.save(sd, paths["zip"])
    torch.save(sd, paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, paths["safetensors"])
    return paths


def _read_all(path):
    for t in open_checkpoint(path).values():
        t.load()


def _expect_checkpoint_error(path):
    with pytest.raises(CheckpointError) as e:
        _read_all(path)
    msg = str(e.value)
    assert path in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("frac", [0.0005, 0.1, 0.5, 0.9, 0.999])
def test_truncated_files(tmp_path, good_files, fmt, frac):
    data = open(good_files[fmt], "rb").read()
    path = str(tmp_path / os.path.basename(good_files[fmt]))
    with open(path, "wb") as f:
        f.write(data[: max(1, int(len(data) * frac))])
    _expect_checkpoint_error(path)


@pytest.mark.parametrize("name", ["rand.pth", "rand.safetensors", "rand.bin"])
def test_random_bytes(tmp_path, name):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    _expect_checkpoint_error(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_corrupted_headers_fail_cleanly(tmp_path, good_files, fmt):
    """Bytes overwritten in the header/pickle region: either still readable or one CheckpointError,
    never another exception (KeyError, UnicodeDecodeError, OverflowError... before the fix)."""
    data = open(good_files[fmt], "rb").read()
    rng = np.random.default_rng(0)
    path = str(tmp_path / os.path.basename(good_files[fmt]))
    errors = 0
    for _ in range(150):
        d = bytearray(data)
        for i in rng.integers(0, min(len(d), 2048), size=rng.integers(1, 8)):
            d[i] = rng.integers(0, 256)
        with open(path, "wb") as f:
            f.write(d)
        try:
            _read_all(path)
        except CheckpointError as e:
            assert path in str(e) and "\n" not in str(e)
            errors += 1
    assert errors > 0


def test_safetensors_shape_beyond_data(tmp_path, good_files):
    data = open(good_files["safetensors"], "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    old = b'"shape":[16,1,3,3]'
    assert header.count(old) == 1
    path = str(tmp_path / "bad_shape.safetensors")
    with open(path, "wb") as f:
        f.write(data[:8] + header.replace(old, b'"shape":[16,1,3,4]') + data[8 + n:])
    assert "tensor shorter than its shape" in _expect_checkpoint_error(path)


def test_missing_empty_and_directory(tmp_path):
    assert "no such checkpoint file" in _expect_checkpoint_error(str(tmp_path / "nope.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty or truncated" in _expect_checkpoint_error(str(empty))
    assert "is a directory" in _expect_checkpoint_error(str(tmp_path))


def _depthwise_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 16, 1)),
        torch.nn.Conv2d(16, 16, 5, groups=16, bias=False))


@pytest.mark.parametrize("how", ["pickled_module", "torchscript", "wrapped_module"])
def test_whole_modules_and_torchscript_read_like_their_state_dict(tmp_path, how):
    """`torch.save(model)` and TorchScript archives hold the parameters too: read them (no code
    from the file runs), in state_dict order, bitwise equal."""
    import warnings

    model = _depthwise_net().eval()
    path = str(tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "torchscript":
            torch.jit.save(torch.jit.script(model), path)
        else:
            torch.save(model if how == "pickled_module" else {"model": model, "epoch": 3}, path)
    tensors = open_checkpoint(path)
    state = model.state_dict()
    want = [k for k, v in state.items() if v.dtype.is_floating_point]
    assert [k for k in tensors if k in want] == want
    for k in want:
        np.testing.assert_array_equal(tensors[k].load(), state[k].numpy())
    layers = layers_from_state(tensors)
    assert [(l.name, l.kernels.shape) for l in layers] == [("2.0", (8, 3, 3)), ("3", (16, 5, 5))]


def test_regular_sample_draws_real_kernels_of_regular_convolutions(tmp_path):
    """Fig. 2's sample: k×k slices of regular (not depthwise, not 1×1) convolution weights."""
    from dwjax.io.extract import regular_sample

    model = _depthwise_net()
    path = str(tmp_path / "m.pth")
    torch.save(model.state_dict(), path)
    sample = regular_sample(open_checkpoint(path), n=10, seed=1)
    assert list(sample) == ["3x3"] and sample["3x3"].shape == (10, 3, 3)
    stem = model[0].weight.detach().numpy().reshape(-1, 3, 3)  # the only regular 3×3: 8×3 kernels
    for k in sample["3x3"]:
        assert any(np.array_equal(k, s) for s in stem)
    assert len({k.tobytes() for k in sample["3x3"]}) == 10  # drawn without replacement
    assert regular_sample(open_checkpoint(path), n=100)["3x3"].shape == (24, 3, 3)
