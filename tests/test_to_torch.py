"""Tests of runtime/to_torch.py: IR -> trainable torch.fx.GraphModule, and write_back."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nnsculpt.ir import from_onnx, to_onnx_model
from nnsculpt.ir.errors import UnsupportedOpError
from nnsculpt.runtime.torch_lowering import ParamBinding, to_torch, write_back

pytestmark = pytest.mark.filterwarnings("ignore")
RTOL = 1e-4


# ------------------------------------------------------------------------------ helpers
def _ort(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    data = model if isinstance(model, str) else model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _torch_out(m, *xs):
    with torch.no_grad():
        y = m(*[torch.from_numpy(x) for x in xs])
    ys = y if isinstance(y, tuple) else (y,)
    return [t.detach().numpy() for t in ys]


def _assert_match(m, model, feeds: dict, tol=RTOL):
    ref = _ort(model, feeds)
    got = _torch_out(m, *feeds.values())
    assert len(got) == len(ref)
    for g_, r_ in zip(got, ref):
        if r_.dtype.kind in "f":
            assert _rel(g_, r_) <= tol, _rel(g_, r_)
        else:
            np.testing.assert_array_equal(g_, r_)


def _export(m, x, path, opset=13, fold=True, dyn=True):
    m.eval()
    xs = x if isinstance(x, tuple) else (x,)
    names = ["input"] + [f"input{i}" for i in range(1, len(xs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, xs, str(path), dynamo=False, opset_version=opset, do_constant_folding=fold,
                          input_names=names, dynamic_axes={n: {0: "N"} for n in names} if dyn else None)
    return str(path)


def _check_export(m, x, tmp_path, opset=13, fold=True, batch=3, dtype=np.float32):
    """Export ``m``, lower the IR to torch, compare with ORT (on a different batch size)."""
    path = _export(m, x, tmp_path / "m.onnx", opset=opset, fold=fold)
    g = from_onnx(path)
    gm = to_torch(g)
    xs = x if isinstance(x, tuple) else (x,)
    feeds = {}
    for i, t in enumerate(xs):
        shape = (batch,) + tuple(t.shape[1:])
        arr = (np.random.default_rng(i).standard_normal(shape).astype(dtype) if t.is_floating_point()
               else np.random.default_rng(i).integers(0, int(t.max()) + 1, shape).astype(np.int64))
        feeds["input" if i == 0 else f"input{i}"] = arr
    _assert_match(gm, path, feeds)
    return g, gm


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    # fill the (unspecified) output types so that the model passes onnx.checker
    return onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _modules(gm, cls):
    return {n: m for n, m in gm.named_modules() if type(m) is cls}


# ------------------------------------------------------------------------------ convs
class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)

    def forward(self, x):
        return self.up(torch.relu(self.dw(self.grouped(self.stem(x)))))


@pytest.mark.parametrize("fold", [False, True])
def test_conv_family_matches_ort(tmp_path, fold):
    torch.manual_seed(0)
    g, gm = _check_export(_Convs(), torch.randn(2, 3, 16, 16), tmp_path, fold=fold)
    convs = _modules(gm, nn.Conv2d)
    assert set(convs) == {"stem", "grouped", "dw"}  # the original torch module paths
    assert convs["grouped"].groups == 2 and convs["grouped"].dilation == (2, 2)
    assert convs["dw"].groups == 8 and convs["stem"].stride == (2, 2)
    assert list(_modules(gm, nn.ConvTranspose2d)) == ["up"]
    assert gm.up.output_padding == (1, 1)
    # parameters carry the torch names
    assert {"stem.weight", "stem.bias", "grouped.weight", "dw.weight", "up.weight"} <= set(gm.state_dict())


def test_conv1d_conv3d(tmp_path):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.ConvTranspose1d(6, 2, 4, stride=2))
    _, gm = _check_export(m1, torch.randn(2, 4, 10), tmp_path)
    assert isinstance(getattr(gm, "0"), nn.Conv1d)
    assert isinstance(getattr(gm, "2"), nn.ConvTranspose1d)
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=(1, 0, 1), stride=(1, 2, 1)))
    _, gm = _check_export(m3, torch.randn(2, 2, 5, 6, 7), tmp_path)
    assert isinstance(getattr(gm, "0"), nn.Conv3d)


@pytest.mark.parametrize("attrs", [
    {"pads": [0, 1, 2, 1]},
    {"pads": [1, 0, 0, 2], "strides": [2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 1]},
    {"auto_pad": "VALID", "dilations": [2, 1]},
])
@pytest.mark.parametrize("static_spatial", [True, False])
def test_conv_asymmetric_and_auto_pad(attrs, static_spatial):
    w, bias = _rand(6, 2, 3, 4), _rand(6, seed=1)
    shape = ["N", 4, 9, 10] if static_spatial else ["N", 4, "H", "W"]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="/blk/conv/Conv", group=2, **attrs)
    model = _model([node], [_vi("x", shape)], [_vi("y", None)], [_init("w", w), _init("b", bias)])
    gm = to_torch(from_onnx(model))
    assert isinstance(gm.blk.conv, nn.Conv2d)
    _assert_match(gm, model, {"x": _rand(2, 4, 9, 10, seed=2)})


@pytest.mark.parametrize("attrs", [
    {"pads": [0, 1, 1, 0], "strides": [2, 2]},
    {"output_shape": [10, 9], "strides": [2, 2]},
    {"output_shape": [10, 9], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
])
def test_conv_transpose_pads(attrs):
    w = _rand(4, 3, 3, 3)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", **attrs)
    model = _model([node], [_vi("x", ["N", 4, 5, 5])], [_vi("y", None)], [_init("w", w)])
    gm = to_torch(from_onnx(model))
    assert isinstance(gm.deconv, nn.ConvTranspose2d)
    _assert_match(gm, model, {"x": _rand(2, 4, 5, 5, seed=3)})


# ------------------------------------------------------------------------------ linear family
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(16, 5, bias=False))

    def forward(self, x):
        return self.head(self.fc1(x))


@pytest.mark.parametrize("rank3", [False, True])
def test_linear(tmp_path, rank3):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12) if rank3 else torch.randn(2, 12)
    g, gm = _check_export(_MLP(), x, tmp_path)
    lins = _modules(gm, nn.Linear)
    assert len(lins) == 2
    ops = {n.op_type for n in g.nodes}
    assert "MatMul" in ops and ("Gemm" in ops) != rank3  # bias-free Linear always exports as MatMul
    # the exported weight is found in the module (transposed back for MatMul)
    w = gm.get_submodule([n for n in lins if n.startswith("fc1")][0]).weight.detach().numpy()
    fc1_inits = [v for v in g.initializers.values() if v.const.shape in ((16, 12), (12, 16))]
    assert any(np.array_equal(w, v.const) or np.array_equal(w, v.const.T) for v in fc1_inits)


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,cshape", [
    (0, 1, 1.0, 1.0, (5,)),
    (0, 0, 2.0, 0.5, (1, 5)),
    (1, 0, 1.0, 1.0, ()),
    (1, 1, 0.5, 2.0, (3, 5)),
    (0, 0, 1.0, 1.0, None),
])
def test_gemm_variants(trans_a, trans_b, alpha, beta, cshape):
    b = _rand(*((5, 4) if trans_b else (4, 5)), seed=1)
    inits = [_init("B", b)]
    ins = ["a", "B"]
    if cshape is not None:
        inits.append(_init("C", _rand(*cshape, seed=2) if cshape else np.float32(0.3)))
        ins.append("C")
    node = helper.make_node("Gemm", ins, ["y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    ashape = [4, 3] if trans_a else [3, 4]
    model = _model([node], [_vi("a", ashape)], [_vi("y", None)], inits)
    gm = to_torch(from_onnx(model))
    assert isinstance(gm.fc, nn.Linear)
    assert (gm.fc.bias is not None) == (cshape in ((5,), (1, 5)))
    _assert_match(gm, model, {"a": _rand(*ashape, seed=4)})


# ------------------------------------------------------------------------------ normalization
def _bn_model(rank: int, name="/features/bn/BatchNormalization", momentum=0.8):
    c = 4
    rng = np.random.default_rng(0)
    inits = [_init("scale", rng.uniform(0.5, 2, c).astype(np.float32)),
             _init("bias", rng.standard_normal(c).astype(np.float32)),
             _init("mean", rng.standard_normal(c).astype(np.float32)),
             _init("var", rng.uniform(0.5, 2, c).astype(np.float32))]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name=name,
                            epsilon=1e-3, momentum=momentum)
    shape = ["N", c] + [5] * (rank - 2)
    return _model([node], [_vi("x", shape)], [_vi("y", None)], inits, opset=15), shape


@pytest.mark.parametrize("rank,cls", [(2, nn.BatchNorm1d), (3, nn.BatchNorm1d), (4, nn.BatchNorm2d),
                                      (5, nn.BatchNorm3d)])
def test_batchnorm_module(rank, cls):
    model, shape = _bn_model(rank)
    gm = to_torch(from_onnx(model))
    bn = gm.features.bn
    assert type(bn) is cls and not bn.training
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.2)
    x = _rand(3, *[5 if isinstance(d, str) else d for d in shape[1:]], seed=5)
    _assert_match(gm, model, {"x": x})


def test_batchnorm_from_torch_export_without_folding(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():  # non-trivial running stats
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    g, gm = _check_export(m, torch.randn(2, 3, 8, 8), tmp_path, fold=False)
    assert [n.op_type for n in g.nodes].count("BatchNormalization") == 1
    assert list(_modules(gm, nn.BatchNorm2d)) == ["1"]


class _LN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.norm2 = nn.LayerNorm([4, 16], elementwise_affine=True)

    def forward(self, x):
        return self.norm2(self.norm(x) * 2.0)


@pytest.mark.parametrize("opset", [13, 17])
def test_layernorm(tmp_path, opset):
    torch.manual_seed(0)
    m = _LN()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1, 1)
    g, gm = _check_export(m, torch.randn(2, 4, 16), tmp_path, opset=opset)
    lns = _modules(gm, nn.LayerNorm)
    if opset >= 17:
        assert set(lns) == {"norm", "norm2"}
        assert lns["norm2"].normalized_shape == (4, 16)
    else:  # decomposed: weights are trainable consts
        assert not lns and any(n.startswith("consts.") for n, _ in gm.named_parameters())


# ------------------------------------------------------------------------------ attention
class _Attention(nn.Module):
    def __init__(self, dim=16, heads=4, seq=6):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.1)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x):
        b, t, d = x.shape
        x = x + self.pos
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        y = (a @ v).transpose(1, 2).reshape(b, t, d)
        y = torch.cat([self.cls.expand(b, -1, -1), self.proj(y)], dim=1)
        return y[:, 0], y.mean(dim=1)


@pytest.mark.parametrize("opset,fold", [(13, False), (13, True), (17, False)])
def test_attention(tmp_path, opset, fold):
    torch.manual_seed(0)
    g, gm = _check_export(_Attention(), torch.randn(2, 6, 16), tmp_path, opset=opset, fold=fold, batch=5)
    lins = _modules(gm, nn.Linear)
    assert set(lins) == {"qkv", "proj"}
    # unfolded exports (Transpose(W) -> MatMul -> Add(b)) are fused into one biased nn.Linear
    assert all(m.bias is not None for m in lins.values())
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= set(gm.state_dict())
    params = dict(gm.named_parameters())
    # positional embedding / cls token are trainable consts
    pos_like = [n for n, p in params.items() if n.startswith("consts.") and tuple(p.shape) == (1, 6, 16)]
    assert pos_like


# ------------------------------------------------------------------------------ pooling, data movement
class _Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.mp = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.ap2 = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=True)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.conv(x)
        a = self.mp(x)
        return self.ap(a), self.gap(self.ap2(x)).flatten(1), torch.amax(x, dim=(2, 3), keepdim=True)


def test_pooling(tmp_path):
    torch.manual_seed(0)
    g, _ = _check_export(_Pools(), torch.randn(2, 3, 13, 11), tmp_path)
    assert {"MaxPool", "AveragePool", "GlobalAveragePool"} <= {n.op_type for n in g.nodes}


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "strides": [2, 1]}),
    ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "strides": [2, 1]}),
    ("AveragePool", {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("GlobalMaxPool", {}),
])
def test_pool_pads(op, attrs):
    node = helper.make_node(op, ["x"], ["y"], name="pool", **attrs)
    model = _model([node], [_vi("x", ["N", 3, 9, 8])], [_vi("y", None)], opset=13)
    gm = to_torch(from_onnx(model))
    _assert_match(gm, model, {"x": _rand(2, 3, 9, 8)})


class _Movement(nn.Module):
    def forward(self, x):
        a, b, c = torch.split(x, [2, 3, 3], dim=1)
        d = torch.cat([c, a, b[:, 1:3]], dim=1)
        e = d[:, ::2, 1:-1].reshape(x.shape[0], -1, 2)
        f = torch.chunk(x, 2, dim=-1)[1]
        return e.transpose(1, 2).unsqueeze(1).squeeze(1), f.unsqueeze(0) + 1.0, x.flatten(1).sum(dim=1)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_concat_split_slice(tmp_path, opset):
    _check_export(_Movement(), torch.randn(2, 8, 6), tmp_path, opset=opset)


class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.tok(ids).mean(dim=1))


def test_embedding(tmp_path):
    torch.manual_seed(0)
    g, gm = _check_export(_Emb(), torch.randint(0, 50, (2, 7)), tmp_path)
    embs = _modules(gm, nn.Embedding)
    assert list(embs) == ["tok"] and embs["tok"].num_embeddings == 50


class _Up(nn.Module):
    def forward(self, x):
        return (nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
                nn.functional.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
                nn.functional.interpolate(x, scale_factor=(2, 3), mode="bilinear", align_corners=True))


@pytest.mark.parametrize("opset", [13, 17])
def test_resize(tmp_path, opset):
    _check_export(_Up(), torch.randn(2, 3, 4, 5), tmp_path, opset=opset)


# ------------------------------------------------------------------------------ single ops vs ORT
def _i64(*v):
    return np.array(v, dtype=np.int64)


_SINGLE = [
    # (op, attrs, extra initializers {name: array} appended as inputs, x shape, opset)
    ("Clip", {}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}, (2, 3, 4), 13),
    ("LeakyRelu", {"alpha": 0.2}, {}, (2, 3), 13),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}, (2, 3), 13),
    ("HardSwish", {}, {}, (2, 3), 14),
    ("Erf", {}, {}, (2, 3), 13),
    ("Softmax", {"axis": 1}, {}, (2, 3, 4), 11),
    ("Softmax", {"axis": 1}, {}, (2, 3, 4), 13),
    ("LogSoftmax", {}, {}, (2, 3, 4), 13),
    ("Flatten", {"axis": 0}, {}, (2, 3, 4), 13),
    ("Flatten", {"axis": -1}, {}, (2, 3, 4), 13),
    ("Reshape", {}, {"s": _i64(0, -1, 2)}, (2, 3, 4), 13),
    ("Transpose", {}, {}, (2, 3, 4), 13),
    ("Squeeze", {"axes": [1]}, {}, (2, 1, 4), 11),
    ("Squeeze", {}, {"a": _i64(-2)}, (2, 1, 4), 13),
    ("Unsqueeze", {"axes": [0, -1]}, {}, (2, 3), 11),
    ("Unsqueeze", {}, {"a": _i64(1, -1)}, (2, 3), 13),
    ("Gather", {"axis": 1}, {"i": _i64(2, -1, 0)}, (2, 3, 4), 13),
    ("ReduceMean", {"axes": [1], "keepdims": 0}, {}, (2, 3, 4), 13),
    ("ReduceSum", {"keepdims": 1}, {"a": _i64(-1, 0)}, (2, 3, 4), 13),
    ("ReduceMean", {"keepdims": 0}, {"a": _i64(2)}, (2, 3, 4), 18),
    ("ReduceMax", {"axes": [1]}, {}, (2, 3, 4), 13),
    ("Expand", {}, {"s": _i64(3, 1, 4)}, (3, 1), 13),
    ("Tile", {}, {"r": _i64(2, 1, 3)}, (2, 3, 1), 13),
    ("Slice", {}, {"st": _i64(-1, 0), "en": _i64(-100, 9), "ax": _i64(2, 1), "sp": _i64(-2, 2)}, (2, 3, 4), 13),
    ("Pad", {"mode": "constant"}, {"p": _i64(0, 1, 0, 0, 2, 1), "v": np.float32(1.5)}, (2, 3, 4), 13),
    ("Pad", {"mode": "reflect"}, {"p": _i64(0, 0, 1, 0, 0, 2)}, (2, 3, 4), 13),
    ("Pad", {"mode": "edge"}, {"p": _i64(0, 1, 1, 0, 2, 1)}, (2, 3, 4), 13),
    ("Pow", {}, {"e": np.float32(2.0)}, (2, 3), 13),
    ("Div", {}, {"d": _rand(3, seed=9) + 3}, (2, 3), 13),
    ("Sqrt", {}, {}, (2, 3), 13),
    ("Where", {}, {"c": np.array([True, False, True]), "o": np.float32(-1)}, (2, 3), 13),
    ("ArgMax", {"axis": 1, "keepdims": 0}, {}, (2, 3, 4), 13),
    ("Cast", {"to": TensorProto.INT64}, {}, (2, 3), 13),
    ("Shape", {"start": 1}, {}, (2, 3, 4), 15),
    ("InstanceNormalization", {}, {"s": _rand(3, seed=1), "b": _rand(3, seed=2)}, (2, 3, 4), 13),
    ("PRelu", {}, {"sl": _rand(3, 1, seed=1)}, (2, 3, 4), 13),
]


@pytest.mark.parametrize("case", _SINGLE, ids=lambda c: f"{c[0]}-{c[4]}")
def test_single_ops(case):
    op, attrs, extra, shape, opset = case
    names = list(extra)
    ins = ["x"] + names
    if op == "Where":
        ins = [names[0], "x", names[1]]
    node = helper.make_node(op, ins, ["y"], name=f"n_{op}", **attrs)
    model = _model([node], [_vi("x", list(shape))], [_vi("y", None, TensorProto.UNDEFINED)],
                   [_init(k, v) for k, v in extra.items()], opset=opset)
    gm = to_torch(from_onnx(model))
    x = np.abs(_rand(*shape, seed=7)) + 0.1 if op in ("Sqrt", "Pow") else _rand(*shape, seed=7)
    _assert_match(gm, model, {"x": x})


def test_dynamic_shape_ops():
    """Shape -> Gather -> Concat -> Reshape, ConstantOfShape, Range, Equal, integer Div."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Div", ["s", "two"], ["half"]),
        helper.make_node("ConstantOfShape", ["half"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Equal", ["r", "zero"], ["eq"]),
    ]
    inits = [_init("zero", np.int64(0)), _init("one", np.int64(1)), _init("ax0", _i64(0)),
             _init("minus1", _i64(-1)), _init("two", np.int64(2))]
    outs = [_vi("flat", [None] * 2), _vi("ones", [None] * 3), _vi("eq", [None], TensorProto.BOOL)]
    model = _model(nodes, [_vi("x", ["N", 4, 6])], outs, inits, opset=13)
    gm = to_torch(from_onnx(model))
    _assert_match(gm, model, {"x": _rand(5, 4, 6)})
    # integer constants are buffers, not parameters
    assert not list(gm.parameters())
    assert {n for n, t in gm.named_buffers() if t.is_floating_point()} == {"consts.ones_value"}


# ------------------------------------------------------------------------------ training
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU())
        self.bias_map = nn.Parameter(torch.zeros(1, 8, 6, 6))
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = self.layer1(torch.relu(self.conv1(x))) + self.bias_map
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def _train(gm, x, y, steps=8, lr=0.05):
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(gm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gm.eval()
    return losses


def test_training_and_write_back(tmp_path):
    torch.manual_seed(0)
    path = _export(_Net(), torch.randn(2, 3, 6, 6), tmp_path / "net.onnx")
    g = from_onnx(path)
    before = {k: v.const.copy() for k, v in g.initializers.items()}
    gm = to_torch(g)
    assert isinstance(gm.conv1, nn.Conv2d) and isinstance(gm.fc, nn.Linear)
    assert isinstance(gm.get_submodule("layer1.0"), nn.Conv2d)
    params0 = {k: p.detach().clone() for k, p in gm.named_parameters()}
    x, y = torch.randn(16, 3, 6, 6), torch.randn(16, 4)
    losses = _train(gm, x, y)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(params0[k], p) for k, p in gm.named_parameters())

    changed = write_back(g, gm)
    float_inits = {k for k, v in before.items() if v.dtype.kind == "f"}
    assert set(changed) == float_inits
    for k in changed:
        assert g.initializers[k].const.dtype == before[k].dtype
        assert not np.array_equal(g.initializers[k].const, before[k])
    xe = np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)
    _assert_match(gm, to_onnx_model(g), {"input": xe})
    assert write_back(g, gm) == []  # idempotent


def test_write_back_inverts_gemm_transforms_and_bn_stats():
    # Gemm(transB=0, alpha, beta, C (1,N)) -> BN(rank 2) -> MatMul
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [_init("B", rng.standard_normal((6, 5)).astype(f32)), _init("C", rng.standard_normal((1, 5)).astype(f32)),
             _init("s", rng.uniform(0.5, 2, 5).astype(f32)), _init("bb", rng.standard_normal(5).astype(f32)),
             _init("m", rng.standard_normal(5).astype(f32)), _init("v", rng.uniform(0.5, 2, 5).astype(f32)),
             _init("W", rng.standard_normal((5, 3)).astype(f32))]
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["h"], name="fc1", alpha=2.0, beta=0.5),
             helper.make_node("Relu", ["h"], ["hr"], name="act"),
             helper.make_node("BatchNormalization", ["hr", "s", "bb", "m", "v"], ["r"], name="bn"),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="fc2")]
    model = _model(nodes, [_vi("x", ["N", 6])], [_vi("y", None)], inits, opset=15)
    g = from_onnx(model)
    gm = to_torch(g)
    pm = gm._nnsculpt_param_map
    assert pm["fc1.weight"] == ParamBinding("B", (("transpose",), ("scale", 2.0)), "parameter")
    assert pm["bn.running_var"].kind == "buffer" and pm["fc2.weight"].transforms == (("transpose",),)
    assert write_back(g, gm) == []  # nothing trained: nothing changed
    assert isinstance(gm.bn, nn.BatchNorm1d)
    losses = _train(gm, torch.randn(32, 6), torch.randn(32, 3), steps=6, lr=0.02)
    assert losses[-1] < losses[0]
    changed = write_back(g, gm)
    assert set(changed) == {"B", "C", "s", "bb", "m", "v", "W"}
    xe = rng.standard_normal((4, 6)).astype(np.float32)
    _assert_match(gm, to_onnx_model(g), {"x": xe})
    # the map survives deepcopy
    gm2 = copy.deepcopy(gm)
    assert getattr(gm2, "_nnsculpt_param_map") == pm


# ------------------------------------------------------------------------------ naming, sharing, errors
def test_naming_scheme_and_collisions():
    w = _rand(4, 4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="/enc/layer.0/fc::MatMul"),
             helper.make_node("MatMul", ["a", "w2"], ["b"], name="/enc/layer.0/fc::MatMul_dup"),
             helper.make_node("MatMul", ["b", "w3"], ["c"], name="n3"),
             helper.make_node("MatMul", ["c", "w4"], ["d"], name="n4"),
             helper.make_node("MatMul", ["d", "w5"], ["e"], name="n5"),
             helper.make_node("Add", ["e", "pos/emb"], ["y"], name="add")]
    # pos/emb is (1, 4): not fused into n5's Linear as a bias
    inits = [_init(f"w{i}", w + i) for i in range(1, 6)] + [_init("pos/emb", _rand(1, 4, seed=3))]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", None)], inits)
    g = from_onnx(model)
    g.node_by_name("n3").meta["source"] = "enc.layer.0.fc_MatMul"  # collides with node 1's path
    g.node_by_name("n4").meta["source"] = "enc.layer.0.fc_MatMul.inner"  # leaf used as a prefix
    g.node_by_name("n5").meta["source"] = "consts.x"  # reserved top-level container
    gm = to_torch(g)
    names = sorted(_modules(gm, nn.Linear))
    assert names == sorted(["consts_.x", "enc.layer.0.fc_MatMul", "enc.layer.0.fc_MatMul_1",
                            "enc.layer.0.fc_MatMul_dup", "enc.layer.0.fc_MatMul_.inner"])
    assert "consts.pos_emb" in dict(gm.named_parameters())
    _assert_match(gm, model, {"x": _rand(3, 4)})


def test_source_components():
    from nnsculpt.runtime.torch_lowering import source_components

    assert source_components("layer1.0.conv1", "Conv") == ["layer1", "0", "conv1"]
    assert source_components("/layer1/layer1.0/conv1/Conv", "Conv") == ["layer1", "0", "conv1"]
    assert source_components("/blocks/blocks.2/attn/qkv/MatMul_1", "MatMul") == ["blocks", "2", "attn", "qkv"]
    assert source_components("/Add_1", "Add") == ["Add_1"]
    assert source_components("/layer1/conv/Conv", "Relu") == ["layer1", "conv", "Conv"]


def test_shared_weight_stays_tied():
    w = _rand(4, 4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="fc2")]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", None)], [_init("w", w)])
    g = from_onnx(model)
    gm = to_torch(g)
    assert not _modules(gm, nn.Linear)
    assert list(dict(gm.named_parameters())) == ["consts.w"]
    _assert_match(gm, model, {"x": _rand(2, 4)})
    _train(gm, torch.randn(8, 4), torch.randn(8, 4), steps=2)
    assert write_back(g, gm) == ["w"]


def test_scalars_and_masks_are_buffers():
    nodes = [helper.make_node("Mul", ["x", "scale"], ["a"]), helper.make_node("Add", ["a", "mask"], ["b"]),
             helper.make_node("Add", ["b", "vec"], ["y"])]
    mask = np.array([0, -np.inf, 0], np.float32)
    inits = [_init("scale", np.float32(0.5)), _init("mask", mask), _init("vec", _rand(3))]
    g = from_onnx(_model(nodes, [_vi("x", ["N", 3])], [_vi("y", None)], inits))
    gm = to_torch(g)
    assert list(dict(gm.named_parameters())) == ["consts.vec"]
    assert {"consts.scale", "consts.mask"} <= set(dict(gm.named_buffers()))
    gm2 = to_torch(g, trainable_scalars=True)
    assert set(dict(gm2.named_parameters())) == {"consts.vec", "consts.scale"}


def test_unknown_op_raises():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("FancyOp", ["a"], ["y"], name="my_fancy_node", domain="com.example")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    g = from_onnx(model)
    with pytest.raises(UnsupportedOpError, match=r"my_fancy_node.*com\.example::FancyOp"):
        to_torch(g)
    g2 = from_onnx(_model([helper.make_node("Relu", ["x"], ["a"]),
                           helper.make_node("Hardmax", ["a"], ["y"], name="hm")],
                          [_vi("x", [2, 3])], [_vi("y", None)]))
    with pytest.raises(UnsupportedOpError, match="'hm' op 'ai.onnx::Hardmax'"):
        to_torch(g2)


def test_subgraph_op_raises():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [_vi("t", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [2])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    model = _model([node], [_vi("c", [], TensorProto.BOOL), _vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(UnsupportedOpError, match="'branch' op 'ai.onnx::If'"):
        to_torch(from_onnx(model))


# ------------------------------------------------------------------------------ more lowering paths
@pytest.mark.parametrize("attrs,sizes,scales", [
    ({"mode": "nearest"}, [2, 3, 7, 9], None),  # half_pixel + round_prefer_floor (defaults)
    ({"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_ceil"},
     [2, 3, 8, 3], None),
    ({"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn", "nearest_mode": "ceil"},
     None, [1, 1, 1.5, 2]),
    ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, None, [1, 1, 0.5, 0.6]),
    ({"mode": "linear"}, None, [1, 1, 2.5, 0.5]),
])
def test_resize_variants(attrs, sizes, scales):
    inits = [_init("roi", np.zeros(0, np.float32))]
    ins = ["x", "roi"]
    if scales is not None:
        inits.append(_init("scales", np.array(scales, np.float32)))
        ins.append("scales")
    else:
        inits += [_init("sizes", np.array(sizes, np.int64))]
        ins += ["", "sizes"]
    node = helper.make_node("Resize", ins, ["y"], name="up", **attrs)
    model = _model([node], [_vi("x", [2, 3, 5, 6])], [_vi("y", None)], inits, opset=13)
    gm = to_torch(from_onnx(model))
    _assert_match(gm, model, {"x": _rand(2, 3, 5, 6)})


def test_resize_cubic_unsupported():
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], name="up3", mode="cubic")
    model = _model([node], [_vi("x", [1, 1, 4, 4])], [_vi("y", None)],
                   [_init("s", np.array([1, 1, 2, 2], np.float32))], opset=13)
    with pytest.raises(UnsupportedOpError, match="'up3' op 'ai.onnx::Resize'.*cubic"):
        to_torch(from_onnx(model))


def test_dropout_is_a_module():
    nodes = [helper.make_node("Dropout", ["x", "ratio"], ["y"], name="/head/drop/Dropout")]
    model = _model(nodes, [_vi("x", ["N", 8])], [_vi("y", None)], [_init("ratio", np.float32(0.25))], opset=13)
    gm = to_torch(from_onnx(model))
    assert isinstance(gm.head.drop, nn.Dropout) and gm.head.drop.p == 0.25
    _assert_match(gm, model, {"x": _rand(4, 8)})  # eval: identity
    gm.train()
    assert (gm(torch.ones(64, 8)) == 0).any()


def test_functional_fallbacks_for_shared_params():
    """Conv / BN whose parameters are shared lower functionally with shared consts."""
    w = _rand(3, 3, 3, 3)
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 0, 1, 2]),
             helper.make_node("Conv", ["a", "w"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["b", "s", "z", "z", "v"], ["y"], name="bn")]
    inits = [_init("w", w), _init("s", rng.uniform(0.5, 2, 3).astype(np.float32)),
             _init("z", rng.standard_normal(3).astype(np.float32)),
             _init("v", rng.uniform(0.5, 2, 3).astype(np.float32))]
    model = _model(nodes, [_vi("x", ["N", 3, 6, 6])], [_vi("y", None)], inits, opset=15)
    g = from_onnx(model)
    gm = to_torch(g)
    assert not _modules(gm, nn.Conv2d) and not _modules(gm, nn.BatchNorm2d)
    assert set(dict(gm.named_parameters())) == {"consts.w", "consts.s", "consts.z", "consts.v"}
    _assert_match(gm, model, {"x": _rand(2, 3, 6, 6)})


def test_transposed_weight_gemm_and_matmul_bias_fusion():
    """Transpose(W) -> Gemm / MatMul -> Add(b) (unfolded torch exports) become nn.Linear."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "W1t"], ["h"], name="/enc/fc1/Gemm", alpha=0.5),
             helper.make_node("Transpose", ["W2"], ["W2t"]),
             helper.make_node("MatMul", ["h", "W2t"], ["m"], name="/enc/fc2/MatMul"),
             helper.make_node("Add", ["b2", "m"], ["y"], name="/enc/fc2/Add")]
    inits = [_init("W1", rng.standard_normal((5, 4)).astype(np.float32)),
             _init("W2", rng.standard_normal((3, 5)).astype(np.float32)),
             _init("b2", rng.standard_normal(3).astype(np.float32))]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", None)], inits, opset=13)
    g = from_onnx(model)
    gm = to_torch(g)
    lins = _modules(gm, nn.Linear)
    assert set(lins) == {"enc.fc1", "enc.fc2"} and lins["enc.fc2"].bias is not None
    pm = gm._nnsculpt_param_map
    assert pm["enc.fc1.weight"].transforms == (("scale", 0.5),)  # transposes cancel
    assert pm["enc.fc2.weight"].transforms == () and pm["enc.fc2.bias"].initializer == "b2"
    _assert_match(gm, model, {"x": _rand(3, 4)})
    _train(gm, torch.randn(16, 4), torch.randn(16, 3), steps=3)
    assert set(write_back(g, gm)) == {"W1", "W2", "b2"}
    _assert_match(gm, to_onnx_model(g), {"x": _rand(3, 4)})


def test_pickle_roundtrip(tmp_path):
    torch.manual_seed(0)
    path = _export(_Attention(), torch.randn(2, 6, 16), tmp_path / "a.onnx", fold=False)
    g = from_onnx(path)
    gm = to_torch(g)
    torch.save(gm, tmp_path / "gm.pt")
    gm2 = torch.load(tmp_path / "gm.pt", weights_only=False)
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(gm(x), gm2(x)))
    assert write_back(g, gm2) == []  # 0-d integer buffers included
