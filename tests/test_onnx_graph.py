"""ONNX files (`io.onnx_graph`) through `convert --checkpoint`: kernels equal to the exported
state dict (float32 exactly; fp16 and int8 within their step and equal to a numpy
dequantisation), node order and names, external data, a channel multiplier, batch norm recorded.
Fixtures are exported here with `torch.onnx.export` or written with `onnx.helper`."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from tests.helpers import assert_checkpoint_refused, run_convert
from dwjax import convert as convert_mod
from dwjax.io import model_files
from dwjax.io.extract import layers_from_module
from dwjax.io.sources import checkpoint_source

onnx = pytest.importorskip("onnx")
timm = pytest.importorskip("timm")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

QUIET = dict(log=lambda *_: None)


def export(model, path, training):
    """The TorchScript exporter: TRAINING keeps BatchNormalization nodes (the raw conv weights,
    under their state-dict names); EVAL folds batch norm into the convolutions."""
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():  # the exporter's notes on BN statistics and deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), path, dynamo=False,
                          training=mode)
    model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    walked = layers_from_module(model)  # before export: TRAINING mode moves BN statistics only
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"separate": str(d / "separate.onnx"), "folded": str(d / "folded.onnx")}
    export(model, paths["separate"], training=True)
    model.load_state_dict(state)
    export(model, paths["folded"], training=False)
    return dict(paths=paths, walked=walked, model=model, state=state, dir=d)


def depthwise_nodes(path):
    """(name, weight name) of every depthwise Conv, found with the onnx API alone."""
    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    out = []
    for n in graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1 and inits.get(n.input[1], (0, 0))[1] == 1:
            out.append((n.name, n.input[1]))
    return out


def test_export_equals_state_dict_exactly(exported, tmp_path):
    path = exported["paths"]["separate"]
    layers = checkpoint_source(path).load()
    walked = exported["walked"]
    nodes = depthwise_nodes(path)
    assert [l.name for l in layers] == [name for name, _ in nodes]
    assert len(layers) == len(walked) == 11
    for got, want, (node, weight) in zip(layers, walked, nodes):
        # node names carry the module path; the weights keep their state-dict names
        assert node.endswith(want.name.replace(".conv_dw", "/conv_dw") + "/Conv"), node
        assert weight == f"{want.name}.weight"
        assert got.kernels.dtype == np.float32
        assert np.array_equal(got.kernels, exported["state"][weight][:, 0].numpy())
        assert (got.stride, got.dilation) == (want.stride, want.dilation)
    assert [l.index for l in layers] == list(range(11))
    manifest = convert_mod.convert(str(tmp_path / "data"), [checkpoint_source(path)], **QUIET)
    (entry,) = manifest["sources"]
    assert entry["origin"]["format"] == "onnx"
    assert entry["origin"]["batch_norm"] == "separate"
    assert entry["origin"]["weights"] == ["float32"]
    assert entry["counts"] == {"3x3": sum(len(w.kernels) for w in walked
                                          if w.size_key == "3x3"),
                               "5x5": sum(len(w.kernels) for w in walked
                                          if w.size_key == "5x5")}


def test_folded_export_is_recorded_and_equals_numpy_folding(exported):
    opened = model_files.open_model(exported["paths"]["folded"])
    assert opened.format == "onnx" and opened.details["batch_norm"] == "none"
    layers = opened.layers()
    modules = dict(exported["model"].named_modules())
    assert len(layers) == 11
    for got, want in zip(layers, exported["walked"]):
        # timm's block: conv_dw then bn1 (eps 1e-5); folding scales each output channel
        bn = modules[want.name.replace("conv_dw", "bn1")]
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        np.testing.assert_allclose(got.kernels, want.kernels * scale[:, None, None],
                                   rtol=1e-5, atol=1e-7)


def test_external_data_and_fp16_weights(exported, tmp_path):
    model = onnx.load(exported["paths"]["separate"])
    ext = str(tmp_path / "external.onnx")
    onnx.save_model(model, ext, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.data", size_threshold=0)
    assert os.path.getsize(ext) < 100_000 < os.path.getsize(tmp_path / "external.data")
    opened = model_files.open_model(ext)
    assert opened.files == [ext, str(tmp_path / "external.data")]
    for got, want in zip(opened.layers(), exported["walked"]):
        assert np.array_equal(got.kernels, want.kernels)

    # fp16 weights behind a Cast to float, as mixed-precision converters write them
    dw = {weight for _, weight in depthwise_nodes(exported["paths"]["separate"])}
    model = onnx.load(exported["paths"]["separate"])  # (saving moved the first copy's data out)
    graph = model.graph
    for t in list(graph.initializer):
        if t.name in dw:
            half = numpy_helper.to_array(t).astype(np.float16)
            graph.initializer.remove(t)
            graph.initializer.append(numpy_helper.from_array(half, t.name + "_fp16"))
            graph.node.insert(0, helper.make_node("Cast", [t.name + "_fp16"], [t.name],
                                                  to=TensorProto.FLOAT, name=t.name + "_cast"))
    fp16 = str(tmp_path / "fp16.onnx")
    onnx.save_model(model, fp16)
    opened = model_files.open_model(fp16)
    assert opened.details["weights"] == ["float16"]
    for got, want in zip(opened.layers(), exported["walked"]):
        assert np.array_equal(got.kernels, want.kernels.astype(np.float16).astype(np.float32))
        step = np.maximum(np.abs(want.kernels), 2.0 ** -14) * 2.0 ** -11  # half an fp16 ulp
        assert (np.abs(got.kernels - want.kernels) <= step).all()


def quantize(w, per_channel, unsigned):
    """Symmetric int8 per output channel, or asymmetric uint8 per tensor: (q, scale, zero)."""
    if per_channel:
        scale = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
        return q, scale, np.zeros(len(w), np.int8)
    lo, hi = float(w.min()), float(w.max())
    scale = np.float32((hi - lo) / 255)
    zero = np.uint8(np.clip(np.round(-lo / scale), 0, 255))
    q = np.clip(np.round(w / scale) + zero, 0, 255).astype(np.uint8)
    return q, np.array(scale, np.float32), np.array(zero, np.uint8)


def test_qdq_int8_weights_dequantise_like_numpy(exported, tmp_path):
    model = onnx.load(exported["paths"]["separate"])
    graph = model.graph
    dw = [weight for _, weight in depthwise_nodes(exported["paths"]["separate"])]
    refs = {}
    for i, name in enumerate(dw):
        t = next(t for t in graph.initializer if t.name == name)
        w = numpy_helper.to_array(t)
        q, scale, zero = quantize(w, per_channel=i % 2 == 0, unsigned=i % 2 == 1)
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}_q"),
                                  numpy_helper.from_array(scale, f"{name}_scale"),
                                  numpy_helper.from_array(zero, f"{name}_zero")])
        graph.node.insert(0, helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name],
            axis=0, name=f"{name}_dq"))
        bcast = (-1, 1, 1, 1) if scale.ndim else ()
        refs[name] = ((q.astype(np.float32) - zero.astype(np.float32).reshape(bcast))
                      * scale.reshape(bcast), w, scale.reshape(bcast))
    path = str(tmp_path / "qdq.onnx")
    onnx.save_model(model, path)
    opened = model_files.open_model(path)
    assert opened.details["weights"] == ["int8", "uint8"]
    layers = opened.layers()
    assert len(layers) == len(dw)
    for got, name in zip(layers, dw):
        ref, w, scale = refs[name]
        assert np.array_equal(got.kernels, ref[:, 0]), name
        assert (np.abs(got.kernels - w[:, 0]) <= np.broadcast_to(scale, w.shape)[:, 0] * 0.5001
                ).all()


def test_constant_qlinearconv_blocked_and_multiplier_nodes(tmp_path):
    """A hand-written graph: a depthwise weight in a Constant node with a channel multiplier of
    2, a QLinearConv with per-channel int8 weights, a blocked DequantizeLinear, a regular 3×3
    Conv (kept apart) and a 1×1 depthwise one (no spatial pattern: skipped)."""
    rng = np.random.default_rng(0)
    w_const = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    q_lin = rng.integers(-127, 128, (4, 1, 5, 5)).astype(np.int8)
    s_lin = rng.uniform(0.001, 0.01, 4).astype(np.float32)
    q_blk = rng.integers(-127, 128, (4, 1, 3, 3)).astype(np.int8)
    s_blk = rng.uniform(0.001, 0.01, (4, 1, 2, 3)).astype(np.float32)
    w_reg = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    init = [numpy_helper.from_array(a, n) for a, n in [
        (q_lin, "q_lin"), (s_lin, "s_lin"), (np.zeros(4, np.int8), "z_lin"),
        (np.float32(0.1), "xs"), (np.uint8(0), "xz"), (q_blk, "q_blk"), (s_blk, "s_blk"),
        (w_reg, "w_reg"), (rng.standard_normal((4, 1, 1, 1)).astype(np.float32), "w_1x1")]]
    nodes = [
        helper.make_node("Constant", [], ["w_const"],
                         value=numpy_helper.from_array(w_const, "w_const_value")),
        helper.make_node("Conv", ["x", "w_const"], ["y1"], group=4, strides=[2, 2],
                         pads=[1, 1, 1, 1], name="dw_multiplier"),
        helper.make_node("Conv", ["y1", "w_reg"], ["y2"], pads=[1, 1, 1, 1], name="regular"),
        helper.make_node("QuantizeLinear", ["y2", "xs", "xz"], ["y2q"]),
        helper.make_node("QLinearConv", ["y2q", "xs", "xz", "q_lin", "s_lin", "z_lin", "xs",
                                         "xz"], ["y3q"], group=4, pads=[2, 2, 2, 2],
                         name="dw_qlinear"),
        helper.make_node("DequantizeLinear", ["y3q", "xs", "xz"], ["y3"]),
        helper.make_node("DequantizeLinear", ["q_blk", "s_blk"], ["w_blk"], axis=2,
                         block_size=2),
        helper.make_node("Conv", ["y3", "w_blk"], ["y4"], group=4, dilations=[2, 2],
                         pads=[2, 2, 2, 2], name="dw_blocked"),
        helper.make_node("Conv", ["y4", "w_1x1"], ["y"], group=4, name="dw_1x1"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    path = str(tmp_path / "hand.onnx")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    opened = model_files.open_model(path)
    layers = opened.layers()
    assert [(l.name, l.kernels.shape, l.stride, l.dilation) for l in layers] == [
        ("dw_multiplier", (8, 3, 3), 2, 1), ("dw_qlinear", (4, 5, 5), 1, 1),
        ("dw_blocked", (4, 3, 3), 1, 2)]
    assert np.array_equal(layers[0].kernels, w_const[:, 0])
    assert np.array_equal(layers[1].kernels,
                          (q_lin.astype(np.float32) * s_lin[:, None, None, None])[:, 0])
    blocked = q_blk.astype(np.float32) * np.repeat(s_blk, 2, axis=2)[:, :, :3]
    assert np.array_equal(layers[2].kernels, blocked[:, 0])
    regular = opened.regular(10)
    assert list(regular) == ["3x3"] and regular["3x3"].shape == (10, 3, 3)
    flat = w_reg.reshape(-1, 3, 3)
    assert all(any(np.array_equal(k, f) for f in flat) for k in regular["3x3"])


def test_channel_multiplier_from_torch_export(tmp_path):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 12, 5, groups=4, padding=2).eval()
    path = str(tmp_path / "multiplier.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(conv, (torch.randn(1, 4, 8, 8),), path, dynamo=False)
    (layer,) = checkpoint_source(path).load()
    # output channel c·M + m of input c: PyTorch's [C·M, 1, k, k] order
    assert np.array_equal(layer.kernels, conv.weight.detach().numpy()[:, 0])



def test_truncated_and_headless_onnx_are_one_line_errors(exported, tmp_path):
    data = open(exported["paths"]["separate"], "rb").read()
    cases = {"truncated.onnx": (data[: len(data) // 2], "truncated or corrupt ONNX"),
             "no_depthwise.onnx": (None, "no depthwise Conv")}
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    cases["no_depthwise.onnx"] = (helper.make_model(graph).SerializeToString(),
                                  "no depthwise Conv")
    ext = str(tmp_path / "ext" / "m.onnx")
    os.makedirs(os.path.dirname(ext))
    onnx.save_model(onnx.load(exported["paths"]["separate"]), ext, save_as_external_data=True,
                    location="m.data", size_threshold=0)
    os.remove(str(tmp_path / "ext" / "m.data"))
    for name, (content, words) in [*cases.items(), ("ext/m.onnx", (None, "unreadable"))]:
        path = str(tmp_path / name)
        if content is not None:
            open(path, "wb").write(content)
        out = tmp_path / f"data_{name.replace('/', '_')}"
        assert_checkpoint_refused(path, out, words)


def test_cli_converts_an_onnx_file(exported, tmp_path):
    out = tmp_path / "data"
    r = run_convert(f"--checkpoint={exported['paths']['separate']}", f"--data_dir={out}")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["sources"]
    assert entry["id"].startswith("separate.onnx@sha256:")
    assert entry["num_layers"] == 11 and entry["origin"]["format"] == "onnx"
