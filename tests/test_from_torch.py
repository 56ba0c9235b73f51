"""Tests for the torch frontend (nnsculpt.ir.from_torch): every supported construct is
converted through torch.fx, verified, lowered to ONNX and run in onnxruntime against torch
at the example batch size and at another one (dynamic batch)."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnxruntime as ort
import pytest

import nnsculpt.models as zoo
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnsculpt.ir import UnsupportedOpError, from_torch, to_onnx_model, verify
from nnsculpt.ir.torch_frontend import FUNCTION_CONVERTERS, METHOD_CONVERTERS, MODULE_CONVERTERS


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny example batches: one thread is fastest and immune to oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _session(g) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(to_onnx_model(g).SerializeToString(), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- helpers
def _close(a, b) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return bool(np.abs(a - b).max(initial=0.0) <= 1e-4 * max(1.0, float(np.abs(b).max(initial=0.0))))


def _flat(o):
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _flat(x)]
    if isinstance(o, dict):
        return [t for x in o.values() for t in _flat(x)]
    raise TypeError(type(o))


def _rebatch(t: torch.Tensor, b: int, gen: torch.Generator) -> torch.Tensor:
    """A fresh random tensor like ``t`` with batch ``b`` (ints stay in t's range)."""
    shape = (b,) + tuple(t.shape[1:])
    if t.dtype.is_floating_point:
        if bool((t >= 0).all()):
            return torch.rand(shape, generator=gen, dtype=t.dtype) + 0.1
        return torch.randn(shape, generator=gen, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    return torch.randint(int(t.min()), int(t.max()) + 1, shape, generator=gen, dtype=t.dtype)


def run_graph(g, feeds: dict) -> list:
    return _session(g).run(None, feeds)


def check(m: nn.Module, inputs, *, frontend="torch.fx", batches=(3,), **kw):
    """Convert, verify, and compare with torch at the example batch and ``batches``."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    m.eval()
    g = from_torch(m, inputs, **kw)
    verify(g)
    assert g.meta["frontend"] == frontend, g.meta.get("frontend_fallback_reason")
    sess = _session(g)
    gen = torch.Generator().manual_seed(1)
    tensor_inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    variants = [inputs] + [tuple(_rebatch(t, b, gen) if isinstance(t, torch.Tensor) else t for t in inputs)
                           for b in (batches if kw.get("dynamic_batch", True) else ())]
    for args in variants:
        with torch.no_grad():
            ref = _flat(m(*args))
        feeds = {v.name: t.numpy() for v, t in zip(g.inputs, [a for a in args if isinstance(a, torch.Tensor)])}
        assert len(feeds) == len(tensor_inputs)
        outs = sess.run(None, feeds)
        assert len(outs) == len(ref)
        for o, r in zip(outs, ref):
            assert _close(o, r.numpy()), (np.abs(o - r.numpy()).max(), g.name)
    return g


def ops(g) -> list[str]:
    return [n.op_type for n in g.nodes]


class Fn(nn.Module):
    """Wrap a function of the input(s) (traced by fx)."""

    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


class Seq(nn.Sequential):
    pass


def x4(b=2, c=3, h=8, w=8, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.copy_(torch.rand(bn.running_mean.shape, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            if bn.affine:
                bn.weight.data.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
                bn.bias.data.copy_(torch.rand(bn.bias.shape, generator=g) - 0.5)
    return m


torch.manual_seed(0)


# ------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, stride=2, padding=1),
    nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, bias=False),
    nn.Conv2d(4, 4, 3, padding=1, groups=4),                               # depthwise
    nn.Conv2d(4, 6, (3, 4), padding="same", dilation=(1, 2)),
    nn.Conv2d(4, 6, 3, padding="valid", stride=(1, 2)),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="replicate"),
], ids=["stride", "groups_dilation", "depthwise", "same", "valid", "reflect", "replicate"])
def test_conv2d(conv):
    g = check(Seq(conv), x4(c=conv.in_channels))
    node = g.node_by_name("0")
    assert node.op_type == "Conv" and node.attrs["group"] == conv.groups
    assert node.inputs[1].name == "0.weight"


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 5, stride=2, padding=2), nn.Conv1d(4, 6, 3, groups=2, dilation=3),
                                  nn.Conv1d(4, 4, 3, padding="same", groups=4)])
def test_conv1d(conv):
    g = check(Seq(conv), torch.randn(2, 4, 20))
    assert ops(g) == ["Conv"]


@pytest.mark.parametrize("conv", [
    nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False),
])
def test_conv_transpose2d(conv):
    g = check(Seq(conv), x4(c=conv.in_channels, h=5, w=6))
    n = g.node_by_name("0")
    assert n.op_type == "ConvTranspose" and n.attrs["output_padding"] == list(conv.output_padding)


def test_functional_conv_with_parameter():
    m = Fn(lambda s, x: F.conv2d(x, s.w, s.b, padding=1, groups=2))
    m.w = nn.Parameter(torch.randn(6, 2, 3, 3))
    m.b = nn.Parameter(torch.randn(6))
    g = check(m, x4(c=4))
    assert "Conv" in ops(g) and "w" in g.initializers


# ------------------------------------------------------------------------------- linear
def test_linear_2d_is_gemm():
    g = check(Seq(nn.Linear(12, 5)), torch.randn(4, 12))
    n = g.node_by_name("0")
    assert n.op_type == "Gemm" and n.attrs["transB"] == 1
    assert [v.name for v in n.inputs[1:]] == ["0.weight", "0.bias"]


def test_linear_nd_is_matmul_add():
    lin = nn.Linear(12, 5)
    g = check(Seq(lin), torch.randn(2, 7, 12))
    assert ops(g) == ["MatMul", "Add"] and g.node_by_name("0").op_type == "MatMul"
    w = g.initializers["0.weight"]
    assert w.shape == (12, 5) and np.allclose(w.const, lin.weight.detach().numpy().T)
    check(Seq(nn.Linear(12, 5, bias=False)), torch.randn(2, 3, 4, 12))


def test_functional_linear():
    m = Fn(lambda s, x: F.linear(x, s.w, s.b) + F.linear(x.unsqueeze(1), s.w).squeeze(1))
    m.w = nn.Parameter(torch.randn(5, 12))
    m.b = nn.Parameter(torch.randn(5))
    check(m, torch.randn(3, 12))


# ------------------------------------------------------------------------ normalization
@pytest.mark.parametrize("bn,shape", [
    (nn.BatchNorm2d(3), (2, 3, 5, 5)), (nn.BatchNorm1d(6), (4, 6)), (nn.BatchNorm1d(6), (2, 6, 7)),
    (nn.BatchNorm2d(3, affine=False, eps=1e-3), (2, 3, 4, 4)),
], ids=["2d", "1d_nc", "1d_ncl", "no_affine"])
def test_batchnorm_eval_semantics(bn, shape):
    m = _randomize_bn(Seq(bn))
    g = check(m, torch.randn(*shape))
    n = g.node_by_name("0")
    assert n.op_type == "BatchNormalization" and math.isclose(n.attrs["epsilon"], bn.eps, rel_tol=1e-6)
    if bn.affine:
        assert [v.name for v in n.inputs[1:]] == ["0.weight", "0.bias", "0.running_mean", "0.running_var"]


def test_batchnorm_of_training_module_uses_running_stats_and_restores_flag():
    m = _randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)))
    m.train()
    m[0].eval()  # mixed flags are restored exactly
    g = from_torch(m, (x4(),))
    assert m.training and m[1].training and not m[0].training
    x = x4(b=3)
    m.eval()
    with torch.no_grad():
        ref = m(x).numpy()
    assert _close(run_graph(g, {g.inputs[0].name: x.numpy()})[0], ref)
    assert "Dropout" not in ops(g)


@pytest.mark.parametrize("ln,shape", [
    (nn.LayerNorm(16), (2, 5, 16)), (nn.LayerNorm((5, 16), eps=1e-6), (2, 5, 16)),
    (nn.LayerNorm(16, elementwise_affine=False), (2, 16)), (nn.LayerNorm(16, bias=False), (2, 3, 16)),
], ids=["last", "two_dims", "no_affine", "no_bias"])
def test_layernorm(ln, shape):
    with torch.no_grad():
        if ln.weight is not None:
            ln.weight.uniform_(0.5, 1.5)
        if ln.bias is not None:
            ln.bias.uniform_(-0.5, 0.5)
    g = check(Seq(ln), torch.randn(*shape))
    n = g.node_by_name("0")
    assert n.op_type == "LayerNormalization" and n.attrs["axis"] == -len(ln.normalized_shape)


def test_groupnorm_and_functional_norms():
    m = Fn(lambda s, x: F.layer_norm(s.gn(x), (8, 8)) + F.normalize(x, dim=1), gn=nn.GroupNorm(2, 4))
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 1.5)
        m.gn.bias.uniform_(-0.5, 0.5)
    check(m, x4(c=4))


# -------------------------------------------------------------------------- activations
ACTIVATIONS = {
    "relu": (nn.ReLU(), "Relu"), "relu6": (nn.ReLU6(), "Clip"), "leaky": (nn.LeakyReLU(0.2), "LeakyRelu"),
    "gelu": (nn.GELU(), "Erf"), "gelu_tanh": (nn.GELU(approximate="tanh"), "Tanh"),
    "silu": (nn.SiLU(), "Sigmoid"), "sigmoid": (nn.Sigmoid(), "Sigmoid"), "tanh": (nn.Tanh(), "Tanh"),
    "hardswish": (nn.Hardswish(), "HardSwish"), "hardsigmoid": (nn.Hardsigmoid(), "HardSigmoid"),
    "softmax": (nn.Softmax(dim=1), "Softmax"), "logsoftmax": (nn.LogSoftmax(dim=-1), "LogSoftmax"),
    "hardtanh": (nn.Hardtanh(-0.5, 0.7), "Clip"), "elu": (nn.ELU(0.5), "Elu"), "selu": (nn.SELU(), "Selu"),
    "mish": (nn.Mish(), "Softplus"), "softplus": (nn.Softplus(beta=2.0), "Softplus"),
    "prelu": (nn.PReLU(3, init=0.1), "PRelu"), "prelu1": (nn.PReLU(), "PRelu"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_modules(name):
    act, op = ACTIVATIONS[name]
    g = check(Seq(act), x4() * 3)
    assert op in ops(g)
    assert g.node_by_name("0").meta["source"] == "0"
    if name == "relu6":
        clip = g.node_by_name("0")
        assert [float(v.const) for v in clip.inputs[1:]] == [0.0, 6.0]
        assert all(v.is_const and v.dtype == np.float32 for v in clip.inputs[1:])
    if name == "gelu":
        assert "Gelu" not in ops(g)


def test_dropout_identity_elided():
    g = check(Seq(nn.Dropout(0.3), nn.Identity(), nn.Dropout2d(), nn.ReLU()), x4())
    assert ops(g) == ["Relu"]


def test_functional_activations():
    def fn(s, x):
        y = F.relu(x) + F.gelu(x) + F.silu(x) + torch.sigmoid(x) + torch.tanh(x) + F.relu6(x)
        y = y + F.leaky_relu(x, 0.1) + F.hardswish(x) + F.hardsigmoid(x) + F.gelu(x, approximate="tanh")
        y = y + torch.softmax(x, dim=-1) + F.softmax(x, dim=1) + x.softmax(-1) + F.log_softmax(x, 1)
        return y + x.relu() + x.sigmoid() + F.elu(x) + F.dropout(x, 0.5, training=False) + torch.relu(x)
    check(Fn(fn), x4() * 2)


# ---------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(3, 1, 1, dilation=2),
    nn.AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AvgPool2d(2),
    nn.AvgPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.MaxPool1d(3, 2, 1), nn.AvgPool1d(3, 2, 1),
], ids=["max_pad", "max2", "max_ceil", "max_dil", "avg_pad_incl", "avg_pad_excl", "avg2", "avg_ceil",
        "avg_ceil_pad_excl", "max1d", "avg1d"])
def test_pooling(pool):
    x = torch.randn(2, 3, 9) if isinstance(pool, (nn.MaxPool1d, nn.AvgPool1d)) else x4(h=9, w=10)
    g = check(Seq(pool), x)
    n = g.node_by_name("0")
    if isinstance(pool, nn.AvgPool2d):
        assert n.op_type == "AveragePool" and n.attrs["count_include_pad"] == int(pool.count_include_pad)


def test_adaptive_pool():
    g = check(Seq(nn.AdaptiveAvgPool2d((1, 1))), x4())
    assert ops(g) == ["GlobalAveragePool"]
    g = check(Seq(nn.AdaptiveAvgPool2d(1)), x4())
    assert ops(g) == ["GlobalAveragePool"]
    g = check(Seq(nn.AdaptiveAvgPool2d((2, 4))), x4())
    assert ops(g) == ["AveragePool"]
    g = check(Seq(nn.AdaptiveMaxPool2d(1)), x4())
    assert ops(g) == ["GlobalMaxPool"]
    check(Fn(lambda s, x: F.adaptive_avg_pool2d(x, 1).flatten(1)), x4())


def test_adaptive_pool_non_divisible_is_a_clear_error():
    m = Seq(nn.AdaptiveAvgPool2d((3, 5)))
    with pytest.raises(UnsupportedOpError, match="AdaptiveAvgPool2d|adaptive"):
        from_torch(m, (x4(h=7, w=7),), fallback=False)


# --------------------------------------------------------------------------- shapes
def test_flatten_variants():
    g = check(Seq(nn.Flatten()), x4())
    assert ops(g) == ["Flatten"]
    check(Fn(lambda s, x: torch.flatten(x, 1)), x4())
    check(Fn(lambda s, x: x.flatten(2)), x4())
    check(Fn(lambda s, x: torch.flatten(x, 1, 2)), x4())
    check(Fn(lambda s, x: x.flatten()), x4(), dynamic_batch=False)
    check(Seq(nn.Flatten(0, 1)), x4())


def test_view_reshape_dynamic_batch():
    g = check(Fn(lambda s, x: x.view(x.size(0), -1)), x4())
    assert ops(g) == ["Reshape"]  # x.size(0) becomes a Reshape "copy" (0) entry
    assert g.outputs[0].shape == ("N", 192)
    check(Fn(lambda s, x: x.reshape(-1, 4, 8)), x4())
    check(Fn(lambda s, x: torch.reshape(x, (x.shape[0], 3, 64))), x4())


def test_example_batch_one_is_still_dynamic():
    g = check(Fn(lambda s, x: x.view(x.size(0), -1).softmax(-1)), x4(b=1), batches=(2, 4))
    assert g.inputs[0].shape == ("N", 3, 8, 8) and g.outputs[0].shape == ("N", 192)


def test_hard_coded_batch_gives_static_graph(caplog):
    with caplog.at_level(logging.WARNING, logger="nnsculpt.ir"):
        g = check(Fn(lambda s, x: x.view(2, 3, 64) * 2), x4(b=2), batches=())
    assert "static batch" in caplog.text
    assert g.meta["frontend"] == "torch.fx" and not g.meta["dynamic_batch"]
    assert g.inputs[0].shape == (2, 3, 8, 8)


def test_view_with_shape_ops():
    # the batch dim is read from another tensor and used at another position -> Shape/Gather
    def fn(s, x):
        y = x.flatten(1).transpose(0, 1)
        return y.reshape(-1, x.shape[0]).view(3, 64, x.size(0)) * 2

    g = check(Fn(fn), x4())
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= set(ops(g))

    def fn2(s, x):  # batch-dependent python int arithmetic
        n = x.size(0)
        return x.reshape(n * 3, -1) + x.view(n, 3, -1).sum() / n

    g = check(Fn(fn2), x4())
    assert "Mul" in ops(g)


def test_permute_transpose_unsqueeze_squeeze():
    def fn(s, x):
        y = x.permute(0, 2, 3, 1).contiguous()
        y = y.transpose(1, 2).unsqueeze(1).unsqueeze(-1)
        y = y.squeeze(-1).squeeze(1)
        z = x[:, :1].squeeze(1) + torch.squeeze(x[:, 1:2]) + torch.unsqueeze(x[:, 2], 0).squeeze(0)
        return y.permute(0, 3, 2, 1) + z.unsqueeze(1), torch.transpose(x, -1, -2)

    check(Fn(fn), x4(b=2))


def test_size_and_shape_queries():
    def fn(s, x):
        b, c, h, w = x.size()
        y = x.view(b, c, h * w).mean(-1)
        return y * (x.shape[-1] ** -0.5) + x.dim() + x.size(1)

    g = check(Fn(fn), x4())
    assert g.outputs[0].shape == ("N", 3)


def test_expand_and_repeat():
    def fn(s, x):
        t = s.tok.expand(x.shape[0], -1, -1)
        return torch.cat([t, x], 1) + s.tok.expand_as(torch.cat([t, x], 1)), x.repeat(1, 2, 1)

    m = Fn(fn)
    m.tok = nn.Parameter(torch.randn(1, 1, 6))
    g = check(m, torch.randn(2, 4, 6))
    assert "Expand" in ops(g) and "tok" in g.initializers


# --------------------------------------------------------------------------- arithmetic
def test_binary_ops_scalars_and_broadcasting():
    def fn(s, x):
        y = x + 1 - 2.5 * x / 3 + (1 - x) * 2
        y = y + 2 / (x.abs() + 1) + torch.add(x, x[:, :1], alpha=0.5) - torch.sub(x, 1)
        y = y * torch.mul(x, s.scale) + torch.div(x, 2) + x.mul(3).add(1).sub(x).div(4)
        return y + s.bias

    m = Fn(fn)
    m.register_buffer("scale", torch.rand(1, 3, 1, 1) + 0.5)
    m.bias = nn.Parameter(torch.randn(8))
    g = check(m, x4())
    scal = [v for v in g.initializers.values() if v.const.ndim == 0]
    assert scal and all(v.dtype == np.float32 for v in scal)  # scalar constants take the tensor dtype


def test_int_tensor_promotion_and_int_division():
    def fn(s, ids):
        return ids * 0.5 + ids // 3 + torch.div(ids, 4, rounding_mode="floor") + (ids + 1) / 2

    check(Fn(fn), torch.randint(0, 50, (2, 6)))


def test_unary_math_and_pow():
    def fn(s, x):
        a = x.abs() + 0.1
        y = torch.sqrt(a) + torch.exp(-a) + a ** 2 + torch.pow(a, 0.5) + a.pow(3) + 2 ** x.clamp(-2, 2)
        y = y + torch.rsqrt(a) + torch.log(a) + torch.erf(x) + torch.square(x) + x.neg() - torch.abs(x)
        return y + torch.clamp(x, min=-0.5) + x.clamp(max=0.3) + torch.maximum(x, -x)

    check(Fn(fn), x4())


def test_comparisons_where_masked_fill():
    def fn(s, x):
        m = x > 0
        y = torch.where(m, x, x * 0.1) + x.masked_fill(x < -0.5, 0.0) + (x >= 0.2).float()
        return y + torch.where(x == x, 1.0, 0.0) + (m & (x < 1)).to(x.dtype) + (x != 0).float()

    check(Fn(fn), x4())


# ------------------------------------------------------------------- cat / split / chunk
def test_cat_split_chunk_getitem():
    def fn(s, x):
        a, b = torch.split(x, [2, 6], dim=1)
        c = x.split(3, 1)            # 3, 3, 2
        d0, d1, d2 = x.chunk(3, dim=1)
        e = torch.chunk(x, 2, 1)
        f = torch.cat([b, a], 1) + torch.cat(c, dim=1) + torch.cat([d2, d0, d1], 1) + torch.cat(e, 1)
        return f, torch.stack([a, d2], 1), x.unbind(1)[3]

    g = check(Fn(fn), x4(c=8))
    sp = [n for n in g.nodes if n.op_type == "Split"]
    assert sp and all(n.inputs[1].is_const and n.inputs[1].dtype == np.int64 for n in sp)
    assert [list(n.inputs[1].const) for n in sp][:4] == [[2, 6], [3, 3, 2], [3, 3, 2], [4, 4]]
    assert [o.name for o in g.outputs] == ["output_0", "output_1", "output_2"]


def test_tensor_indexing():
    def fn(s, x):
        return (x[:, 0], x[:, 1:, ::2], x[..., -1], x[:, None, 2, :3], x[0:1], x[:, :, x.size(2) - 2:],
                x[:, :, : x.size(0)], x[x.size(0) - 1])

    check(Fn(fn), x4(h=6, w=5))


# --------------------------------------------------------------- matmul / attention
def test_matmul_and_reductions():
    def fn(s, x):
        y = torch.matmul(x, x.transpose(-1, -2)) + x @ x.transpose(2, 3) + torch.bmm(x[:, 0], x[:, 1].mT)[:, None]
        m = y.mean(dim=(2, 3), keepdim=True) + torch.mean(y, 1, keepdim=True).mean(-1, keepdim=True)
        return m + y.sum(-1, keepdim=True).amax(2, keepdim=True) + y.max(dim=1, keepdim=True).values, y.mean()

    g = check(Fn(fn), x4(w=5))
    rm = [n for n in g.nodes if n.op_type == "ReduceMean"]
    assert rm and all("axes" in n.attrs for n in rm[:-1])  # opset 17: axes attribute


def test_reduce_mean_opset18_uses_axes_input():
    g = check(Fn(lambda s, x: x.mean((2, 3)) + x.amax(-1).sum(-1)), x4(), opset=18)
    assert g.opset_imports == {"": 18}
    rm = g.find("ReduceMean")[0]
    assert "axes" not in rm.attrs and rm.inputs[1].is_const


class HandAttention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        y2 = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        y3 = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c)
        return self.proj(y) + y2 + y3


def test_handwritten_attention():
    g = check(HandAttention(), torch.randn(2, 5, 16))
    assert "Softmax" in ops(g) and "MatMul" in ops(g)


# ---------------------------------------------------------------- embeddings / params
class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 7, 8))
        self.register_buffer("position_ids", torch.arange(7).unsqueeze(0), persistent=False)
        self.pos = nn.Embedding(7, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.tok(ids)                                     # (B, 6, 8)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.pos(self.position_ids) + torch.arange(7).float().view(1, 7, 1)
        return self.head(x[:, 0])


def test_embedding_parameters_and_buffers():
    g = check(TinyEncoder(), torch.randint(0, 50, (2, 6)), input_names=["input_ids"])
    assert g.inputs[0].name == "input_ids" and g.inputs[0].dtype == np.int64
    assert g.inputs[0].shape == ("N", 6)
    gathers = [n for n in g.nodes if n.op_type == "Gather" and n.name == "tok"]
    assert gathers and gathers[0].inputs[0].name == "tok.weight" and gathers[0].attrs["axis"] == 0
    for name in ("cls_token", "pos_embed", "position_ids", "pos.weight"):
        assert name in g.initializers


# ------------------------------------------------------------------ other modules
def test_upsample_pad_and_misc():
    def fn(s, x):
        a = F.interpolate(x, scale_factor=2, mode="nearest")
        b = s.up(x)
        c = F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=False)
        d = F.pad(x, (1, 2, 0, 1), value=0.5)
        return a + b, c, d, F.pad(x, (2, 2, 1, 1), mode="reflect")

    check(Fn(fn, up=nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), x4())


def test_to_dtype_and_einsum():
    def fn(s, x):
        y = x.double().float() + x.to(torch.float32) + x.type_as(x)
        return torch.einsum("bchw,bdhw->bcd", y, x) + x.mean((2, 3)).long().float()[..., None]

    check(Fn(fn), x4() * 3)


# ----------------------------------------------------------------------- provenance
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_provenance_names():
    m = _randomize_bn(Net())
    g = check(m, x4())
    n = g.node_by_name("layer1.0.conv1")
    assert n.op_type == "Conv" and n.meta["source"] == "layer1.0.conv1"
    assert n.inputs[1].name == "layer1.0.conv1.weight"
    assert g.node_by_name("layer1.1.bn2").inputs[3].name == "layer1.1.bn2.running_mean"
    # a module called twice: unique names, same source
    r1, r2 = g.node_by_name("layer1.0.relu"), g.node_by_name("layer1.0.relu_1")
    assert r1.meta["source"] == r2.meta["source"] == "layer1.0.relu"
    # function nodes: fx name, enclosing module path as source
    add = [n for n in g.nodes if n.op_type == "Add"]
    assert add and {a.meta["source"] for a in add} == {"layer1.0", "layer1.1"}
    fl = g.node_by_name("flatten")
    assert fl.meta["source"] == "flatten"
    assert g.name == "Net" and g.opset_imports == {"": 17} and g.meta["frontend"] == "torch.fx"
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["output"]
    assert g.inputs[0].shape == ("N", 3, 8, 8) and g.outputs[0].shape == ("N", 10)
    assert all(v.shape is not None and v.shape[0] == "N" for n in g.nodes for v in n.outputs
               if n.op_type in ("Conv", "BatchNormalization", "Relu"))


def test_names_and_static_batch():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b, a * b

    g = check(Two(), (torch.randn(2, 3), torch.randn(2, 3)), input_names=["p", "q"], output_names=["s", "t"],
              name="two", dynamic_batch=False)
    assert [v.name for v in g.inputs] == ["p", "q"] and [v.name for v in g.outputs] == ["s", "t"]
    assert g.name == "two" and g.inputs[0].shape == (2, 3) and not g.meta["dynamic_batch"]
    g = check(Fn(lambda s, x: (x, x.relu(), x.relu())), torch.randn(2, 3))  # input as output, repeated
    assert len({v.name for v in g.outputs}) == 3
    with pytest.raises(ValueError, match="output_names"):
        from_torch(Two(), (torch.randn(2, 3), torch.randn(2, 3)), output_names=["only_one"])


def test_non_tensor_and_default_arguments_are_specialised():
    class M(nn.Module):
        def forward(self, x, scale: float = 2.0, mask=None):
            if mask is not None:
                x = x + mask
            return x * scale

    g = check(M(), (torch.randn(2, 3), 3.0))
    assert len(g.inputs) == 1


def test_dtypes_and_dict_outputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x, mask):
            y = self.fc(x)
            return {"logits": y.masked_fill(mask[:, :3] == 0, -1e9), "count": (mask.sum(1) * 2).float()}

    g = check(M(), (torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 2, (2, 5), dtype=torch.int32)))
    assert [(v.name, v.dtype) for v in g.inputs] == [("x", np.float64), ("mask", np.int32)]
    assert [(v.name, v.dtype, v.shape) for v in g.outputs] == [("logits", np.float64, ("N", 3)),
                                                              ("count", np.float32, ("N",))]


def test_creation_and_misc_methods():
    def fn(s, x):
        n = x.size(0)
        b = torch.zeros_like(x) + torch.ones_like(x) * 2 + torch.full_like(x, 3.0) + x.new_zeros((n, 3))
        b = b + x.new_ones((n, 3)) + x.new_full((n, 3), 4.0)
        return (b, x.numel() * x, x.max(1)[0], x.argmax(-1), torch.argmax(x), x.min(), torch.max(x, x * 2),
                x.T, torch.t(x), x.unflatten(1, (1, 3)), s.unf(x))

    g = check(Fn(fn, unf=nn.Unflatten(1, (3, 1))), torch.randn(2, 3))
    assert {"ConstantOfShape", "ArgMax", "ReduceMax", "Size"} <= set(ops(g))


def test_constant_subgraphs_are_folded():
    def fn(s, x):
        return x + torch.arange(5).float() * 2 + torch.ones(5)

    g = check(Fn(fn), torch.randn(2, 5))
    assert ops(g) == ["Add", "Add"]


# ------------------------------------------------------------------------- fallback
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x) * 2
        return self.fc(x)


def test_data_dependent_control_flow_falls_back(caplog):
    m = DataDependent()
    x = torch.rand(2, 4) + 0.1  # positive: the traced branch is the one taken
    with caplog.at_level(logging.INFO, logger="nnsculpt.ir"):
        g = check(m, x, frontend="torch.onnx.export")
    assert "torch.onnx.export" in caplog.text
    assert "TraceError" in g.meta["frontend_fallback_reason"] or "control flow" in g.meta["frontend_fallback_reason"]
    assert g.name == "DataDependent" and g.opset_imports[""] == 17
    assert g.inputs[0].shape[0] == "N" and g.inputs[0].name == "x"
    assert any(n.meta.get("source") == "fc" for n in g.nodes)
    m.train()
    from_torch(m, (x,))
    assert m.training  # flag restored after the fallback as well


def test_missing_converter_falls_back_or_errors():
    m = Fn(lambda s, x: torch.cumsum(x, dim=1) + 1)
    g = check(m, torch.randn(2, 5), frontend="torch.onnx.export")
    assert "cumsum" in g.meta["frontend_fallback_reason"]
    with pytest.raises(UnsupportedOpError, match="cumsum"):
        from_torch(m, (torch.randn(2, 5),), fallback=False)


def test_unsupported_everywhere_is_a_clear_error():
    m = Seq(nn.AdaptiveAvgPool2d((3, 5)))
    with pytest.raises(UnsupportedOpError, match=r"torch\.fx path failed .*adaptive"):
        from_torch(m, (x4(h=7, w=7),))


class AliasedInplace(nn.Module):
    def forward(self, x):
        y = x * 1
        z = y
        y += 1        # fx sees a plain add; torch updates z as well
        return y * z


class SafeInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x * 2
        x += 1
        x = self.act(x).sigmoid_()
        return F.relu(x, inplace=True)


def test_inplace_updates():
    check(SafeInplace(), x4())
    g = check(AliasedInplace(), x4(), frontend="torch.onnx.export")
    assert "does not reproduce" in g.meta["frontend_fallback_reason"]


def test_layernorm_below_opset17_is_decomposed():
    g = check(Seq(nn.LayerNorm(8)), torch.randn(2, 3, 8), opset=16)
    assert "LayerNormalization" not in ops(g) and g.opset_imports == {"": 16}


def test_multihead_attention_module_falls_back():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    m = Fn(lambda s, x: s.mha(x, x, x, need_weights=False)[0], mha=mha)
    g = check(m, torch.randn(2, 5, 16), frontend="torch.onnx.export")
    assert "MultiheadAttention" in g.meta["frontend_fallback_reason"]


def test_tables_are_tables():
    assert MODULE_CONVERTERS[nn.Conv2d] and MODULE_CONVERTERS[nn.Linear]
    assert FUNCTION_CONVERTERS[torch.cat] and FUNCTION_CONVERTERS[F.gelu]
    assert METHOD_CONVERTERS["view"] and METHOD_CONVERTERS["size"]


# -------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("name", zoo.list_models())
def test_zoo_model_converts_via_fx(name):

    m = zoo.get_model(name)
    g = check(m, tuple(zoo.example_inputs(name, batch=2)),
              input_names=list(zoo.input_names(name)), output_names=list(zoo.output_names(name)), name=name)
    assert g.meta["frontend"] == "torch.fx" and g.name == name
    assert [v.name for v in g.inputs] == list(zoo.input_names(name))
    assert [v.name for v in g.outputs] == list(zoo.output_names(name))
    assert all(v.shape[0] == "N" for v in g.inputs + g.outputs)
    # every module-made node is named after its module path
    paths = {p for p, _ in m.named_modules()}
    assert any(n.name in paths and n.meta["source"] == n.name for n in g.nodes)
