"""TFLite flatbuffers (`io.tflite_model`) through `convert --checkpoint`. The fixtures are
written here with a flatbuffers builder by the published schema's field slots (checked by the
`tflite` package's generated reader, which dwjax reads with): float32, fp16 behind DEQUANTIZE,
int8 with per-channel scales, sparse weights behind DENSIFY (CSR and block-sparse), a buffer
stored past the flatbuffer; kernels equal the values written, in op order with tensor names."""
import os

import numpy as np
import pytest

from tests.helpers import assert_checkpoint_refused, converted_entry
from dwjax import convert as convert_mod
from dwjax.io import model_files, tflite_model
from dwjax.io.sources import checkpoint_source

flatbuffers = pytest.importorskip("flatbuffers")
pytest.importorskip("tflite")

FLOAT32, FLOAT16, INT8 = 0, 1, 9
CONV_2D, DW, DEQUANTIZE, DENSIFY = 3, 4, 6, 124


def _vector(b, values, dtype):
    return b.CreateNumpyVector(np.asarray(values, dtype))


def _tables(b, offsets):
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _sparsity(b, sp):
    dims = []
    for fmt, size, segments, indices in sp["levels"]:
        vecs = []
        if fmt:
            for arr in (segments, indices):
                values = _vector(b, arr, np.int32)
                b.StartObject(1)
                b.PrependUOffsetTRelativeSlot(0, values, 0)
                vecs.append(b.EndObject())
        b.StartObject(6)
        b.PrependInt8Slot(0, fmt, 0)
        b.PrependInt32Slot(1, size, 0)
        if fmt:  # SparseIndexVector union: 1 = Int32Vector
            b.PrependUint8Slot(2, 1, 0)
            b.PrependUOffsetTRelativeSlot(3, vecs[0], 0)
            b.PrependUint8Slot(4, 1, 0)
            b.PrependUOffsetTRelativeSlot(5, vecs[1], 0)
        dims.append(b.EndObject())
    order = _vector(b, sp["traversal_order"], np.int32)
    block_map = _vector(b, sp["block_map"], np.int32) if sp["block_map"] else None
    dims = _tables(b, dims)
    b.StartObject(3)
    b.PrependUOffsetTRelativeSlot(0, order, 0)
    if block_map is not None:
        b.PrependUOffsetTRelativeSlot(1, block_map, 0)
    b.PrependUOffsetTRelativeSlot(2, dims, 0)
    return b.EndObject()


def write_tflite(path, tensors, ops, tail=b""):
    """A one-subgraph model. `tensors`: dicts with shape, type, name, optional data (bytes),
    quant (scale, zero, dim), sparsity, external (bytes stored past the flatbuffer); `ops`:
    (builtin code, inputs, outputs, depthwise options (stride, dilation, multiplier) or None)."""
    b = flatbuffers.Builder(1024)
    codes = sorted({op[0] for op in ops})
    buffers, tensor_offs = [b""], []
    external = []
    for t in tensors:
        name = b.CreateString(t["name"])
        shape = _vector(b, t["shape"], np.int32)
        quant = sparsity = None
        if "quant" in t:
            scale, zero, dim = t["quant"]
            s, z = _vector(b, scale, np.float32), _vector(b, zero, np.int64)
            b.StartObject(7)
            b.PrependUOffsetTRelativeSlot(2, s, 0)
            b.PrependUOffsetTRelativeSlot(3, z, 0)
            b.PrependInt32Slot(6, dim, 0)
            quant = b.EndObject()
        if "sparsity" in t:
            sparsity = _sparsity(b, t["sparsity"])
        buffer = 0
        if "data" in t or "external" in t:
            buffer = len(buffers)
            buffers.append(t.get("data", b""))
            if "external" in t:
                external.append((buffer, t["external"]))
        b.StartObject(10)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, t["type"], 0)
        b.PrependUint32Slot(2, buffer, 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if quant is not None:
            b.PrependUOffsetTRelativeSlot(4, quant, 0)
        if sparsity is not None:
            b.PrependUOffsetTRelativeSlot(6, sparsity, 0)
        tensor_offs.append(b.EndObject())
    op_offs = []
    for code, inputs, outputs, dw in ops:
        ins, outs = _vector(b, inputs, np.int32), _vector(b, outputs, np.int32)
        options = None
        if dw is not None:
            stride, dilation, multiplier = dw
            b.StartObject(7)
            b.PrependInt32Slot(1, stride, 0)
            b.PrependInt32Slot(2, stride, 0)
            b.PrependInt32Slot(3, multiplier, 0)
            b.PrependInt32Slot(5, dilation, 1)
            b.PrependInt32Slot(6, dilation, 1)
            options = b.EndObject()
        b.StartObject(14)
        b.PrependUint32Slot(0, codes.index(code), 0)
        b.PrependUOffsetTRelativeSlot(1, ins, 0)
        b.PrependUOffsetTRelativeSlot(2, outs, 0)
        if options is not None:
            b.PrependUint8Slot(3, 2, 0)  # BuiltinOptions.DepthwiseConv2DOptions
            b.PrependUOffsetTRelativeSlot(4, options, 0)
        op_offs.append(b.EndObject())
    tensors_vec, ops_vec = _tables(b, tensor_offs), _tables(b, op_offs)
    io_vec = _vector(b, [0], np.int32)
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, tensors_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, io_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, io_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, ops_vec, 0)
    subgraph = b.EndObject()
    # buffers past the flatbuffer get offset/size patched in once the flatbuffer's size is known
    size_guess = 1 << 20
    buffer_offs, placed = [], {}
    position = size_guess
    for i, data in enumerate(buffers):
        ext = dict(external).get(i)
        vec = _vector(b, np.frombuffer(data, np.uint8), np.uint8) if data else None
        b.StartObject(3)
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        if ext is not None:
            placed[i] = position
            b.PrependUint64Slot(1, position, 0)
            b.PrependUint64Slot(2, len(ext), 0)
            position += len(ext)
        buffer_offs.append(b.EndObject())
    code_offs = []
    for code in codes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(code, 127), 0)
        b.PrependInt32Slot(2, 1, 0)
        b.PrependInt32Slot(3, code, 0)
        code_offs.append(b.EndObject())
    codes_vec, subgraphs_vec = _tables(b, code_offs), _tables(b, [subgraph])
    buffers_vec = _tables(b, buffer_offs)
    b.StartObject(8)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers_vec, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    data = bytes(b.Output())
    assert len(data) < size_guess
    data += b"\0" * (size_guess - len(data))
    for i, ext in external:
        assert len(data) == placed[i]
        data += ext
    with open(path, "wb") as f:
        f.write(data + tail)


def sparse_encode(dense, traversal_order, block_map, block_sizes, formats):
    """TFLite's sparse encoding of `dense` (the inverse of what the reader decodes): levels in
    traversal order, dense ones whole, CSR ones keeping the coordinates with a non-zero below."""
    rank = dense.ndim
    sizes = []
    for t in traversal_order:
        if t < rank:
            sizes.append(dense.shape[t] // dict(zip(block_map, block_sizes)).get(t, 1))
        else:
            sizes.append(block_sizes[t - rank])
    grid = np.indices(sizes).reshape(len(sizes), -1).T
    orig = np.zeros((len(grid), rank), np.int64)
    for level in range(rank):
        orig[:, traversal_order[level]] = grid[:, level]
    for level in range(rank, len(sizes)):
        b = traversal_order[level] - rank
        orig[:, block_map[b]] = orig[:, block_map[b]] * block_sizes[b] + grid[:, level]
    expanded = dense[tuple(orig.T)].reshape(sizes)
    segments = {lv: [0] for lv, f in enumerate(formats) if f}
    indices = {lv: [] for lv in segments}
    values = []

    def visit(level, sub):
        if level == len(sizes):
            values.append(sub)
            return
        if not formats[level]:
            for i in range(sizes[level]):
                visit(level + 1, sub[i])
            return
        for i in range(sizes[level]):
            if np.any(sub[i] != 0):
                indices[level].append(i)
                visit(level + 1, sub[i])
        segments[level].append(len(indices[level]))

    visit(0, expanded)
    levels = [(f, sizes[lv], segments.get(lv, []), indices.get(lv, []))
              for lv, f in enumerate(formats)]
    return np.array(values, dense.dtype), dict(traversal_order=traversal_order,
                                               block_map=block_map, levels=levels)


def to_filter(kernels):
    """`[C·M, H, W]` kernels → TFLite's `[1, H, W, C·M]` filter."""
    return np.ascontiguousarray(kernels.transpose(1, 2, 0)[None])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(0)
    k = {
        "f32": rng.standard_normal((8, 3, 3)).astype(np.float32),
        "f16": rng.standard_normal((8, 5, 5)).astype(np.float16),
        "int8": rng.integers(-127, 128, (8, 3, 3)).astype(np.int8),
        "csr": rng.standard_normal((8, 3, 3)).astype(np.float32),
        "block": rng.standard_normal((8, 3, 3)).astype(np.float16),
        "ext": rng.standard_normal((6, 7, 7)).astype(np.float32),
    }
    k["csr"][rng.random(k["csr"].shape) < 0.6] = 0
    block = k["block"].reshape(8, 9)  # zero whole blocks of 4 output channels
    block[:4, [0, 4, 8]] = 0
    scale = rng.uniform(0.001, 0.01, 8).astype(np.float32)
    zero = rng.integers(-3, 4, 8)
    csr_values, csr_sp = sparse_encode(to_filter(k["csr"]), [0, 1, 2, 3], [], [],
                                       [0, 0, 1, 1])
    blk_values, blk_sp = sparse_encode(to_filter(k["block"]), [0, 1, 2, 3, 4], [3], [4],
                                       [0, 0, 0, 1, 0])
    regular = rng.standard_normal((4, 3, 3, 8)).astype(np.float32)  # [O, H, W, I]
    T = [dict(name="input", shape=[1, 16, 16, 8], type=FLOAT32)]

    def add(**t):
        T.append(t)
        return len(T) - 1

    ops = []

    def dw(y_in: int, w: int, name: str, options: tuple) -> int:
        """A DEPTHWISE_CONV_2D from `y_in` with filter `w` into a new [1, 8, 8, 8] tensor."""
        y_out = add(name=name, shape=[1, 8, 8, 8], type=FLOAT32)
        ops.append((DW, [y_in, w, -1], [y_out], options))
        return y_out

    x = 0
    w = add(name="dw_f32/filter", shape=[1, 3, 3, 8], type=FLOAT32,
            data=to_filter(k["f32"]).tobytes())
    y = add(name="y1", shape=[1, 8, 8, 8], type=FLOAT32)
    ops.append((DW, [x, w, -1], [y], (2, 1, 1)))
    w = add(name="regular/filter", shape=[4, 3, 3, 8], type=FLOAT32, data=regular.tobytes())
    y2 = add(name="y2", shape=[1, 8, 8, 4], type=FLOAT32)
    ops.append((CONV_2D, [y, w, -1], [y2], None))
    w16 = add(name="dw_f16/filter_fp16", shape=[1, 5, 5, 8], type=FLOAT16,
              data=to_filter(k["f16"]).tobytes())
    w = add(name="dw_f16/filter", shape=[1, 5, 5, 8], type=FLOAT32)
    ops.append((DEQUANTIZE, [w16], [w], None))
    y3 = dw(y2, w, "y3", (1, 2, 2))  # multiplier 2 over 4 channels
    w = add(name="dw_int8/filter", shape=[1, 3, 3, 8], type=INT8,
            data=to_filter(k["int8"]).tobytes(), quant=(scale, zero, 3))
    y4 = dw(y3, w, "y4", (1, 1, 1))
    ws = add(name="dw_csr/filter_sparse", shape=[1, 3, 3, 8], type=FLOAT32,
             data=csr_values.tobytes(), sparsity=csr_sp)
    w = add(name="dw_csr/filter", shape=[1, 3, 3, 8], type=FLOAT32)
    ops.append((DENSIFY, [ws], [w], None))
    y5 = dw(y4, w, "y5", (1, 1, 1))
    ws = add(name="dw_block/filter_sparse", shape=[1, 3, 3, 8], type=FLOAT16,
             data=blk_values.tobytes(), sparsity=blk_sp)
    wd = add(name="dw_block/filter_fp16", shape=[1, 3, 3, 8], type=FLOAT16)
    ops.append((DENSIFY, [ws], [wd], None))
    w = add(name="dw_block/filter", shape=[1, 3, 3, 8], type=FLOAT32)
    ops.append((DEQUANTIZE, [wd], [w], None))
    y6 = dw(y5, w, "y6", (1, 1, 1))
    w = add(name="dw_ext/filter", shape=[1, 7, 7, 6], type=FLOAT32,
            external=to_filter(k["ext"]).tobytes())
    y7 = add(name="y7", shape=[1, 8, 8, 6], type=FLOAT32)
    ops.append((DW, [y6, w, -1], [y7], (1, 1, 1)))
    path = str(tmp_path_factory.mktemp("tflite") / "model.tflite")
    write_tflite(path, T, ops)
    int8_ref = ((k["int8"].astype(np.float32) - zero[:, None, None].astype(np.float32))
                * scale[:, None, None])
    want = {"dw_f32/filter": (k["f32"], 2, 1), "dw_f16/filter": (k["f16"], 1, 2),
            "dw_int8/filter": (int8_ref, 1, 1), "dw_csr/filter": (k["csr"], 1, 1),
            "dw_block/filter": (k["block"], 1, 1), "dw_ext/filter": (k["ext"], 1, 1)}
    return dict(path=path, want=want, regular=regular, k=k, scale=scale)


def test_the_written_fixture_reads_back_with_the_tflite_package(model):
    import tflite

    buf = open(model["path"], "rb").read()
    m = tflite.Model.GetRootAs(buf, 0)
    sg = m.Subgraphs(0)
    names = [sg.Tensors(sg.Operators(i).Inputs(1)).Name().decode()
             for i in range(sg.OperatorsLength())
             if m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode() == DW]
    assert names == list(model["want"])
    q = sg.Tensors(sg.Operators(4).Inputs(1)).Quantization()
    assert q.QuantizedDimension() == 3 and np.array_equal(q.ScaleAsNumpy(), model["scale"])


def test_kernels_equal_the_values_written(model, tmp_path):
    opened = model_files.open_model(model["path"])
    assert opened.format == "tflite"
    layers = opened.layers()
    assert [l.name for l in layers] == list(model["want"])
    assert [l.index for l in layers] == list(range(6))
    for layer, (kernels, stride, dilation) in zip(layers, model["want"].values()):
        assert layer.kernels.dtype == np.float32
        assert np.array_equal(layer.kernels, kernels.astype(np.float32)), layer.name
        assert (layer.stride, layer.dilation) == (stride, dilation), layer.name
    assert opened.details == {"batch_norm": "none", "weights": ["float16", "float32", "int8"]}
    regular = opened.regular(5)["3x3"]
    flat = model["regular"].transpose(0, 3, 1, 2).reshape(-1, 3, 3)
    assert all(any(np.array_equal(r, f) for f in flat) for r in regular)
    manifest = convert_mod.convert(str(tmp_path / "data"), [checkpoint_source(model["path"])],
                                   log=lambda *_: None)
    (entry,) = manifest["sources"]
    assert entry["counts"] == {"3x3": 32, "5x5": 8, "7x7": 6}
    assert entry["origin"]["format"] == "tflite" and entry["origin"]["batch_norm"] == "none"


def test_densify_matches_the_dense_tensor_on_random_patterns():
    rng = np.random.default_rng(3)
    for trial in range(20):
        dense = rng.standard_normal((2, 4, 6)).astype(np.float32)
        dense[rng.random(dense.shape) < 0.5] = 0
        order = [0, 1, 2] if trial % 2 else [2, 0, 1]
        formats = list(rng.integers(0, 2, 3))
        values, sp = sparse_encode(dense, order, [], [], formats)
        levels = [(f, s, np.array(seg, np.int64), np.array(idx, np.int64))
                  for f, s, seg, idx in sp["levels"]]
        assert np.array_equal(tflite_model.densify(values, dense.shape, order, [], levels), dense)
        dense[:, :2, :3] = 0  # one whole 2×3 block
        values, sp = sparse_encode(dense, [0, 1, 2, 3, 4], [1, 2], [2, 3], [0, 1, 1, 0, 0])
        levels = [(f, s, np.array(seg, np.int64), np.array(idx, np.int64))
                  for f, s, seg, idx in sp["levels"]]
        assert len(values) < dense.size
        assert np.array_equal(tflite_model.densify(values, dense.shape, [0, 1, 2, 3, 4], [1, 2],
                                                   levels), dense)



def test_bad_tflite_files_are_one_line_errors(model, tmp_path):
    regular = np.zeros((4, 3, 3, 8), np.float32)
    no_dw = str(tmp_path / "no_depthwise.tflite")
    write_tflite(no_dw, [dict(name="x", shape=[1, 8, 8, 8], type=FLOAT32),
                         dict(name="w", shape=[4, 3, 3, 8], type=FLOAT32,
                              data=regular.tobytes()),
                         dict(name="y", shape=[1, 8, 8, 4], type=FLOAT32)],
                 [(CONV_2D, [0, 1, -1], [2], None)])
    data = open(model["path"], "rb").read()
    flatbuffer = len(data[:1 << 20].rstrip(b"\0"))  # the external buffer follows the padding
    cases = [(no_dw, "no DEPTHWISE_CONV_2D op")]
    for name, size in [("short.tflite", flatbuffer // 2), ("no_tail.tflite", flatbuffer)]:
        cases.append((str(tmp_path / name), "truncated or corrupt"))
        open(cases[-1][0], "wb").write(data[:size])
    for path, words in cases:
        out = tmp_path / f"data_{os.path.basename(path)}"
        assert_checkpoint_refused(path, out, words)
    out = tmp_path / "data"
    entry = converted_entry(model["path"], str(out))
    assert entry["num_layers"] == 6
