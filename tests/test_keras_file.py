"""Keras files (`io.keras_file`) through `convert --checkpoint`: a small model built with Keras 3
on its JAX backend, saved as `.keras` (zip) and legacy `.h5`; kernels equal `get_weights()` after
the `[H, W, C, M]` → `[C·M, H, W]` change, in network order with layer names, read with h5py
alone."""
import os
import zipfile

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported
keras = pytest.importorskip("keras")

from tests.helpers import assert_checkpoint_refused, converted_entry  # noqa: E402
from dwjax import convert as convert_mod  # noqa: E402
from dwjax.io import model_files  # noqa: E402
from dwjax.io.sources import checkpoint_source  # noqa: E402

DEPTHWISE = ["dw", "sep", "inner/inner_dw", "grouped"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    keras.utils.set_random_seed(0)
    L = keras.layers
    inner = keras.Sequential([keras.Input((6, 6, 8)),
                              L.DepthwiseConv2D(3, dilation_rate=2, padding="same",
                                                name="inner_dw"),
                              L.BatchNormalization(name="inner_bn")], name="inner")
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(4, 3, name="stem")(x)
    y = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, name="dw")(y)
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU()(y)
    y = L.SeparableConv2D(8, 5, padding="same", name="sep")(y)
    y = inner(y)
    y = L.Conv2D(8, 3, groups=8, name="grouped")(y)
    model = keras.Model(x, y)
    # trained-looking values: not the initialisers' (zero BN, uniform kernels) but random ones
    rng = np.random.default_rng(0)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in model.get_weights()])
    d = tmp_path_factory.mktemp("keras")
    paths = {"keras": str(d / "model.keras"), "keras-h5": str(d / "model.h5")}
    model.save(paths["keras"])
    model.save(paths["keras-h5"])
    weights = {"dw": model.get_layer("dw").get_weights()[0],
               "sep": model.get_layer("sep").get_weights()[0],
               "inner/inner_dw": inner.get_layer("inner_dw").get_weights()[0],
               "grouped": model.get_layer("grouped").get_weights()[0],
               "stem": model.get_layer("stem").get_weights()[0]}
    return dict(paths=paths, weights=weights, dir=d)


@pytest.mark.parametrize("fmt", ["keras", "keras-h5"])
def test_kernels_equal_get_weights(saved, fmt, tmp_path):
    path = saved["paths"][fmt]
    opened = model_files.open_model(path)
    assert opened.format == fmt
    layers = opened.layers()
    assert [l.name for l in layers] == DEPTHWISE
    w = saved["weights"]
    # [H, W, C, M] → kernel c·M + m = w[:, :, c, m]
    assert np.array_equal(layers[0].kernels, w["dw"].transpose(2, 3, 0, 1).reshape(8, 3, 3))
    assert np.array_equal(layers[0].kernels[5], w["dw"][:, :, 2, 1])
    assert np.array_equal(layers[1].kernels, w["sep"][:, :, :, 0].transpose(2, 0, 1))
    assert np.array_equal(layers[2].kernels, w["inner/inner_dw"][:, :, :, 0].transpose(2, 0, 1))
    assert np.array_equal(layers[3].kernels, w["grouped"][:, :, 0, :].transpose(2, 0, 1))
    assert [(l.stride, l.dilation) for l in layers] == [(2, 1), (1, 1), (1, 2), (1, 1)]
    assert opened.details["batch_norm"] == "partly"  # dw and inner_dw feed a BN; sep, grouped not
    assert opened.details["weights"] == ["float32"]
    assert opened.details["keras_version"] == keras.__version__
    regular = opened.regular(6)["3x3"]
    flat = w["stem"].transpose(3, 2, 0, 1).reshape(-1, 3, 3)
    assert all(any(np.array_equal(r, f) for f in flat) for r in regular)
    manifest = convert_mod.convert(str(tmp_path / "data"), [checkpoint_source(path)],
                                   log=lambda *_: None)
    (entry,) = manifest["sources"]
    assert entry["counts"] == {"3x3": 24, "5x5": 8}
    assert entry["origin"]["format"] == fmt



def test_keras_files_without_weights_are_one_line_errors(saved, tmp_path):
    no_weights = str(tmp_path / "no_weights.keras")
    with zipfile.ZipFile(saved["paths"]["keras"]) as src, zipfile.ZipFile(no_weights, "w") as dst:
        for name in ("config.json", "metadata.json"):
            dst.writestr(name, src.read(name))
    import h5py

    weights_only = str(tmp_path / "weights_only.h5")
    with h5py.File(weights_only, "w") as f:
        f.create_dataset("layers/dw/vars/0", data=np.zeros((3, 3, 4, 1)))
    data = open(saved["paths"]["keras-h5"], "rb").read()
    truncated = str(tmp_path / "truncated.h5")
    open(truncated, "wb").write(data[:len(data) // 2])
    for path, words in [(no_weights, "without weights"), (weights_only, "without a Keras model"),
                        (truncated, "corrupt")]:
        out = tmp_path / f"data_{os.path.basename(path)}"
        assert_checkpoint_refused(path, out, words)
    out = tmp_path / "data"
    entry = converted_entry(saved["paths"]["keras"], str(out))
    assert entry["num_layers"] == 4 and entry["origin"]["batch_norm"] == "partly"
