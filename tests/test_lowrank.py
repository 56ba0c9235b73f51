"""The low-rank passes: svd-linear (plain and data-aware), factorize-conv, spatial-svd, tucker-conv.

Real ONNX Runtime sessions throughout: full rank is exact on the trained digits ResNet and on
real third-party nets, errors fall with the rank, data-aware SVD beats plain SVD on the outputs,
named option errors, provenance, determinism, the torch lowering and the CLI.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx
from nnsculpt.ir.errors import MissingCalibrationDataError, PassOptionError
from nnsculpt.ir.onnx_io import to_onnx_model
from nnsculpt.models.data import digits_npz, load_digits_dataset
from nnsculpt.passes import PassContext, PassManager, get_pass, parse_pipeline
from nnsculpt.runtime import run, to_torch
from nnsculpt.runtime.calibrate import collect_second_moments, iter_intermediates
from nnsculpt.runtime.loading import load_graph

from .conftest import max_rel_err, make_small_net
from .thirdparty import make_inputs as tp_inputs
from .thirdparty import require

CONV_PASSES = ["factorize-conv", "spatial-svd", "tucker-conv"]
ALL_PASSES = ["svd-linear"] + CONV_PASSES
#: suffixes of the new nodes' names / provenance, per pass
SUFFIXES = {"svd-linear": ("/svd_a", "/svd_b"), "factorize-conv": ("/dw", "/pw"),
            "spatial-svd": ("/vert", "/horiz"), "tucker-conv": ("/tucker_in", "/tucker_core", "/tucker_out")}
#: layers each pass factors in digits_resnet (7 3x3 convs; 2 strided 1x1 downsample convs + fc)
DIGITS_LAYERS = {"svd-linear": 3, "factorize-conv": 7, "spatial-svd": 7, "tucker-conv": 7}

_DIGITS: dict = {}


def digits():
    """A fresh IR graph of the trained digits ResNet (traced once, copied)."""
    if "g" not in _DIGITS:
        _DIGITS["g"] = load_graph("zoo:digits_resnet")
    return _DIGITS["g"].copy()


def digits_test(n: int | None = None):
    X, y = load_digits_dataset(16, "test")
    return ({"input": X[:n]}, y[:n]) if n else ({"input": X}, y)


def out(g, x):
    return run(g, x)["logits"]


def apply(g, spec: str, ctx: PassContext | None = None):
    (p,) = parse_pipeline(spec)
    return p(g, ctx or PassContext())


def onnx_graph(nodes, inputs, outputs, inits, opset=17):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs,
                                                [numpy_helper.from_array(v, k) for k, v in inits.items()]),
                              opset_imports=[helper.make_opsetid("", opset)])
    return from_onnx(model)


def tinfo(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ================================================================== full rank is exact
@pytest.mark.parametrize("name", ALL_PASSES)
def test_full_rank_exact_on_trained_digits(name):
    g = digits()
    x, _ = digits_test(64)
    ref = out(g, x)
    res = apply(g, f"{name}{{rank=full}}")
    assert res.changed and res.metrics["factored"] == DIGITS_LAYERS[name]
    assert max_rel_err(ref, out(g, x)) <= 1e-5
    for e in res.artifacts["layers"].values():
        assert e["applied"] and e["weight_rel_err"] < 1e-12
    onnx.checker.check_model(to_onnx_model(g))
    names = [n.name for n in g.nodes]
    assert len(names) == len(set(names))


@pytest.mark.thirdparty
@pytest.mark.parametrize("name", CONV_PASSES)
def test_full_rank_exact_on_yolov8n(name):
    """YOLOv8n (NudeNet): 39 3x3 convs, strided ones included; the class scores are unchanged."""
    g = from_onnx(require("nudenet_yolov8n"))
    x = tp_inputs("nudenet_yolov8n", 0)
    ref = run(g, x)
    res = apply(g, f"{name}{{rank=full}}")
    assert res.metrics["factored"] == 39
    got = run(g, x)
    for k in ref:
        assert max_rel_err(ref[k], got[k]) <= 1e-5, k
    assert not any(n.op_type == "Conv" and n.name == "/model.0/conv/Conv" for n in g.nodes)


@pytest.mark.thirdparty
def test_svd_linear_full_rank_exact_on_constant_weights():
    """PaddleOCR's direction classifier (paddle2onnx, opset 11, every weight a Constant node): its
    1x1 convs and the classifier are factored exactly; no weight is left unread."""
    g = from_onnx(require("ppocr_cls_v2"))
    x = tp_inputs("ppocr_cls_v2", 0)
    ref = run(g, x)
    res = apply(g, "svd-linear{rank=full}")
    assert res.metrics["factored"] == 42
    got = run(g, x)
    for k in ref:
        assert max_rel_err(ref[k], got[k]) <= 1e-5
    assert all(v.uses for v in g.initializers.values())
    assert all(o.uses or o in g.outputs for n in g.nodes for o in n.outputs)  # nothing left dangling


def test_weight_in_a_constant_node_is_factored_and_removed():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    g = onnx_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                   [tinfo("x", ["N", 4, 6, 6])], [tinfo("y", None)], {"w": w})
    conv = g.node_by_name("conv")
    c = g.add_node("Constant", [], 1, {"value": w}, name="wconst", before=conv)
    ident = g.add_node("Identity", [c.outputs[0]], 1, name="walias", before=conv)
    old = conv.inputs[1]
    conv.set_input(1, ident.outputs[0])
    g.remove_initializer_if_unused(old)
    x = {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    ref = run(g, x)["y"]
    for name in CONV_PASSES:
        h = g.copy()
        assert apply(h, f"{name}{{rank=full}}").metrics["factored"] == 1
        assert max_rel_err(ref, run(h, x)["y"]) <= 1e-5
        assert not any(n.op_type in ("Constant", "Identity") for n in h.nodes)


@pytest.mark.thirdparty
def test_conv_passes_on_pplcnet_leave_depthwise_alone():
    g = from_onnx(require("pplcnet_orientation"))
    x = tp_inputs("pplcnet_orientation", 0)
    ref = run(g, x)
    res = apply(g, "factorize-conv{rank=full}")
    assert res.metrics["factored"] == 1  # the stem: every other k x k conv is depthwise
    assert any("depthwise conv (group=" in n for n in res.notes)
    got = run(g, x)
    for k in ref:
        assert max_rel_err(ref[k], got[k]) <= 1e-5


# ======================================================== attributes, forms, shapes
def _conv_net(kernel=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), cin=6, cout=10, dims=2):
    torch.manual_seed(0)
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    k = kernel if dims == 2 else kernel[0]
    m = torch.nn.Sequential(cls(cin, cout, k, stride=stride if dims == 2 else stride[0],
                                padding=padding if dims == 2 else padding[0],
                                dilation=dilation if dims == 2 else dilation[0]), torch.nn.ReLU()).eval()
    shape = (2, cin) + (13,) * dims
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(*shape),), buf, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False)
    g = from_onnx(onnx.load_from_string(buf.getvalue()))
    x = {"x": np.random.default_rng(1).standard_normal((4,) + shape[1:]).astype(np.float32)}
    return g, x


@pytest.mark.parametrize("name", CONV_PASSES)
def test_full_rank_exact_with_strides_pads_dilations(name):
    g, x = _conv_net()
    ref = run(g, x)["y"]
    res = apply(g, f"{name}{{rank=full}}")
    assert res.metrics["factored"] == 1
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5
    if name == "spatial-svd":
        vert, horiz = [n for n in g.nodes if n.op_type == "Conv"]
        assert vert.attrs["strides"] == [2, 1] and vert.attrs["pads"] == [1, 0, 1, 0] and vert.attrs["dilations"] == [1, 1]
        assert horiz.attrs["strides"] == [1, 1] and horiz.attrs["pads"] == [0, 2, 0, 2] and horiz.attrs["dilations"] == [1, 2]


@pytest.mark.parametrize("name", CONV_PASSES)
def test_full_rank_exact_with_asymmetric_pads(name):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((7, 5, 3, 4)).astype(np.float32)
    g = onnx_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[2, 0, 1, 3], strides=[1, 2], dilations=[2, 1],
                                     name="conv")],
                   [tinfo("x", ["N", 5, 11, 12])], [tinfo("y", None)], {"w": w})
    x = {"x": rng.standard_normal((2, 5, 11, 12)).astype(np.float32)}
    ref = run(g, x)["y"]
    assert apply(g, f"{name}{{rank=full}}").metrics["factored"] == 1
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5


@pytest.mark.parametrize("name", ["factorize-conv", "tucker-conv"])
def test_full_rank_exact_on_1d_conv(name):
    g, x = _conv_net(kernel=(5, 5), stride=(2, 2), padding=(2, 2), dilation=(1, 1), dims=1)
    ref = run(g, x)["y"]
    assert apply(g, f"{name}{{rank=full}}").metrics["factored"] == 1
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5


@pytest.mark.parametrize("name", CONV_PASSES)
def test_auto_pad_same(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    g = onnx_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2],
                                     name="conv")],
                   [tinfo("x", [2, 4, 9, 10])], [tinfo("y", None)], {"w": w, "b": b})
    x = {"x": rng.standard_normal((2, 4, 9, 10)).astype(np.float32)}
    ref = run(g, x)["y"]
    assert apply(g, f"{name}{{rank=full}}").metrics["factored"] == 1
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5
    assert "w" not in g.initializers  # the old weight is gone


def test_gemm_alpha_beta_trans_and_matmul_add():
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((12, 20)).astype(np.float32)       # transB=1: (out, in)
    c = rng.standard_normal((1, 12)).astype(np.float32)
    wm = rng.standard_normal((12, 9)).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    g = onnx_graph([helper.make_node("Gemm", ["x", "wt", "c"], ["h"], alpha=0.5, beta=2.0, transA=1, transB=1,
                                     name="gemm"),
                    helper.make_node("MatMul", ["h", "wm"], ["m"], name="mm"),
                    helper.make_node("Add", ["m", "bias"], ["y"], name="add")],
                   [tinfo("x", [20, "N"])], [tinfo("y", ["N", 9])], {"wt": wt, "c": c, "wm": wm, "bias": bias})
    x = {"x": rng.standard_normal((20, 5)).astype(np.float32)}
    ref = run(g, x)["y"]
    res = apply(g, "svd-linear{rank=full}")
    assert res.metrics["factored"] == 2
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5
    a, b = g.node_by_name("gemm/svd_a"), g.node_by_name("gemm/svd_b")
    assert a.attrs.get("transA") == 1 and "alpha" not in a.attrs and len(a.inputs) == 2
    assert b.attrs.get("beta") == 2.0 and b.inputs[2].name == "c" and "transA" not in b.attrs
    assert g.node_by_name("add").inputs[0].producer is g.node_by_name("mm/svd_b")  # the Add stays as it is
    # reduced rank: the MatMul's factors reproduce the rank-k approximation of W exactly
    g2 = onnx_graph([helper.make_node("MatMul", ["x", "wm"], ["y"], name="mm")], [tinfo("x", ["N", 12])],
                    [tinfo("y", ["N", 9])], {"wm": wm})
    res = apply(g2, "svd-linear{rank=3}")
    u, s, vt = np.linalg.svd(wm.astype(np.float64))
    xx = {"x": rng.standard_normal((7, 12)).astype(np.float32)}
    expect = xx["x"].astype(np.float64) @ (u[:, :3] * s[:3]) @ vt[:3]
    assert max_rel_err(expect, run(g2, xx)["y"]) <= 1e-5
    e = res.artifacts["layers"]["mm"]
    assert e["rank"] == 3 and e["params_after"] == 3 * 21 and e["params_before"] == 108
    assert abs(e["weight_rel_err"] - np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())) < 1e-9


def test_svd_linear_rank_options_pick_the_documented_rank():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 30)) * np.exp(-np.arange(30) / 5)).astype(np.float32)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    kept = np.cumsum(s ** 2) / (s ** 2).sum()

    def rank_of(opt):
        g = onnx_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tinfo("x", ["N", 40])],
                       [tinfo("y", ["N", 30])], {"w": w})
        return apply(g, f"svd-linear{{{opt}}}").artifacts["layers"]["mm"]

    e = rank_of("energy=0.9")
    assert e["rank"] == int(np.argmax(kept >= 0.9)) + 1 and kept[e["rank"] - 2] < 0.9
    e = rank_of("max_error=0.2")
    assert e["weight_rel_err"] <= 0.2 and np.sqrt(1 - kept[e["rank"] - 2]) > 0.2
    assert rank_of("rank_ratio=0.25")["rank"] == 8  # ceil(0.25 * 30)
    e = rank_of("rank=29")  # 29 * 70 >= 1200: not smaller, left alone
    assert not e["applied"] and e["rank"] == 29


def test_svd_linear_strided_1x1_conv():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12, 1, 1)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    g = onnx_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 1, 0], name="pw")],
                   [tinfo("x", ["N", 12, 7, 8])], [tinfo("y", None)], {"w": w, "b": b})
    x = {"x": rng.standard_normal((3, 12, 7, 8)).astype(np.float32)}
    ref = run(g, x)["y"]
    apply(g, "svd-linear{rank=full}")
    a, bb = g.node_by_name("pw/svd_a"), g.node_by_name("pw/svd_b")
    assert a.attrs["strides"] == [2, 2] and a.attrs["pads"] == [1, 0, 1, 0] and len(a.inputs) == 2
    assert bb.inputs[2].name == "b" and "strides" not in bb.attrs
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-5


# ========================================================= error falls with the rank
RANKS = {"svd-linear": [1, 2, 4, 6], "factorize-conv": [1, 2, 3, 5, 7], "spatial-svd": [2, 4, 8, 16, 32],
         "tucker-conv": [2, 4, 8, 16]}
#: one layer of digits_resnet per pass (3x3 32->32 conv; the classifier for svd-linear)
ONE_LAYER = {"svd-linear": "fc", "factorize-conv": "layer3.0.conv2", "spatial-svd": "layer3.0.conv2",
             "tucker-conv": "layer3.0.conv2"}


@pytest.mark.parametrize("name", ALL_PASSES)
def test_error_decreases_with_rank(name):
    """Weight error of every layer (all layers factored) and the output error on held-out digits
    (one layer factored) fall strictly as the rank grows; accuracy is kept at the highest."""
    x, y = digits_test()
    ref = out(digits(), x)
    prev_w = prev_o = None
    for k in RANKS[name]:
        res = apply(digits(), f"{name}{{rank={k}}}")
        werr = np.array([e["weight_rel_err"] for e in res.artifacts["layers"].values()])
        g = digits()
        one = apply(g, f"{name}{{rank={k},layers=[{ONE_LAYER[name]}]}}")
        assert one.metrics["factored"] == 1
        got = out(g, x)
        oerr = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        if prev_w is not None:
            assert np.all(werr <= prev_w + 1e-12) and np.any(werr < prev_w), (k, werr, prev_w)
            assert oerr < prev_o, (k, oerr, prev_o)
        prev_w, prev_o = werr, oerr
    assert 0 < prev_o < 0.35
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


# ================================================================== data-aware SVD
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_and_data():
    torch.manual_seed(0)
    m = _MLP().eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(2, 64),), buf, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((64, 64)) * np.exp(-np.arange(64) / 6)[None, :]  # correlated, decaying spectrum

    def data(n):
        return {"x": (rng.standard_normal((n, 64)) @ mix.T).astype(np.float32)}

    return onnx.load_from_string(buf.getvalue()), data(512), data(256)


def test_data_aware_beats_plain_on_outputs():
    model, calib, held_out = _mlp_and_data()
    errs, arts = {}, {}
    for da in (False, True):
        g = from_onnx(model)
        ref = run(g, held_out)["y"]
        res = apply(g, f"svd-linear{{rank=8,data_aware={'true' if da else 'false'}}}", PassContext(calib_data=calib))
        got = run(g, held_out)["y"]
        errs[da] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        arts[da] = res.artifacts["layers"]
    assert errs[True] < 0.6 * errs[False], errs
    for name, e in arts[True].items():
        assert e["output_rel_err"] < 0.6 * e["output_rel_err_plain"], name
        # whitened factors trade weight error for output error
        assert e["weight_rel_err"] > arts[False][name]["weight_rel_err"]
    assert "output_rel_err" not in arts[False]["/fc1/Gemm"]


def test_data_aware_full_rank_exact_and_requires_calib_data():
    model, calib, held_out = _mlp_and_data()
    p = get_pass("svd-linear")(rank="full", data_aware=True)
    assert "calib-data" in p.requirements() and "calib-data" not in get_pass("svd-linear")(rank=4).requirements()
    with pytest.raises(MissingCalibrationDataError, match="svd-linear"):
        p(from_onnx(model))
    g = from_onnx(model)
    ref = run(g, held_out)["y"]
    p(g, PassContext(calib_data=calib))
    assert max_rel_err(ref, run(g, held_out)["y"]) <= 1e-5


def test_data_aware_ridge_when_second_moment_is_singular():
    """Calibration inputs confined to 10 of 64 dims: X^T X is singular, a ridge is added (noted)."""
    model, _, _ = _mlp_and_data()
    rng = np.random.default_rng(5)
    low = {"x": (rng.standard_normal((256, 10)) @ rng.standard_normal((10, 64))).astype(np.float32)}
    g = from_onnx(model)
    ref = run(g, low)["y"]
    res = apply(g, "svd-linear{rank=10,data_aware=true,layers=[/fc1/Gemm]}", PassContext(calib_data=low))
    assert any("not positive definite" in n and "/fc1/Gemm" in n for n in res.notes)
    e = res.artifacts["layers"]["/fc1/Gemm"]
    assert e["ridge"] > 0 and e["output_rel_err"] < 1e-3  # rank 10 of a 10-dim input: exact on it
    assert e["output_rel_err_plain"] > 0.1 and e["weight_rel_err"] > 0.5
    assert max_rel_err(ref, run(g, low)["y"]) < 1e-2


def test_collect_second_moments_matches_numpy():
    model, calib, _ = _mlp_and_data()
    g = from_onnx(model)
    hidden = g.node_by_name("/Relu").outputs[0].name
    got = collect_second_moments(g, ["x", hidden], calib, batch_size=100, progress=False)
    x = calib["x"].astype(np.float64)
    assert np.allclose(got["x"], x.T @ x / len(x), rtol=1e-10)
    h = np.concatenate([o[hidden] for o in iter_intermediates(g, [hidden], calib, progress=False)]).astype(np.float64)
    assert np.allclose(got[hidden], h.T @ h / len(h), rtol=1e-5)
    conv = collect_second_moments(g, ["x"], {"x": calib["x"][:, :, None]}, axis=1, progress=False)
    assert np.allclose(conv["x"], got["x"])


# ================================================================ options and errors
@pytest.mark.parametrize("name", ALL_PASSES)
@pytest.mark.parametrize("spec,needle", [
    ("rank=0", "'rank'"), ("rank=abc", "'rank'"), ("rank=auto", "needs option .budget."), ("energy=1.5", "'energy'"),
    ("energy=0", "'energy'"), ("rank_ratio=0", "'rank_ratio'"), ("rank_ratio=1.2", "'rank_ratio'"),
    ("max_error=1", "'max_error'"), ("max_error=-0.1", "'max_error'"), ("rank=2,energy=0.9", "exclude each other"),
    ("layers=[fc]", "give one of"),
])
def test_bad_options_are_named_errors(name, spec, needle):
    with pytest.raises(PassOptionError, match=needle) as e:
        parse_pipeline(f"{name}{{{spec}}}")
    assert name in str(e.value)


@pytest.mark.parametrize("name", ALL_PASSES)
def test_layer_pattern_matching_nothing_and_rank_too_large(name):
    with pytest.raises(PassOptionError, match=r"'layers' entry 'layer9\.\*' matches no node"):
        apply(digits(), f"{name}{{rank=2,layers=[layer1.0.conv1,layer9.*]}}")
    with pytest.raises(PassOptionError, match="larger than the full rank of every selected layer"):
        apply(digits(), f"{name}{{rank=100000}}")


def test_layers_and_exclude_by_name_provenance_and_glob():
    g = digits()
    res = apply(g, "factorize-conv{rank=2,layers=[layer1.*],exclude=[layer1.0.conv2]}")
    assert list(res.artifacts["layers"]) == ["layer1.0.conv1"]
    assert any("layer1.0.conv2" in n and "excluded" in n for n in res.notes)
    # by provenance: a node whose name differs from its source
    g = digits()
    node = g.node_by_name("layer2.0.conv2")
    g.rename_node(node, "renamed_conv")
    assert node.source == "layer2.0.conv2"
    res = apply(g, "spatial-svd{rank=4,layers=[layer2.0.conv2]}")
    assert list(res.artifacts["layers"]) == ["renamed_conv"]
    assert g.node_by_name("renamed_conv/vert").meta["source"] == "layer2.0.conv2/vert"
    # by op type (svd-linear: only the Gemm)
    res = apply(digits(), "svd-linear{rank=2,layers=[Gemm]}")
    assert list(res.artifacts["layers"]) == ["fc"]


# ================================================================ provenance, near misses
@pytest.mark.parametrize("name", ALL_PASSES)
def test_provenance_names_and_old_weights_removed(name):
    g = digits()
    apply(g, "fold-bn")  # (else inserted by the pass: the conv then writes the BN's output)
    target = "fc" if name == "svd-linear" else "layer2.0.conv1"
    wname = g.node_by_name(target).inputs[1].name
    y = g.node_by_name(target).outputs[0]
    apply(g, f"{name}{{rank=2,layers=[{target}]}}")
    new = [g.node_by_name(target + s) for s in SUFFIXES[name]]
    for n, s in zip(new, SUFFIXES[name]):
        assert n.meta["source"] == target + s and n.meta["pass"] == name
    assert new[-1].outputs[0] is y and all(n.inputs[0] is p.outputs[0] for p, n in zip(new, new[1:]))
    assert not any(n.name == target for n in g.nodes)
    assert wname not in g.initializers and wname not in g.values


def test_left_alone_with_notes():
    """Depthwise and grouped convs, 1x1 convs, computed weights: untouched, each named in a note."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    g = onnx_graph([helper.make_node("Conv", ["x", "wd"], ["a"], group=4, pads=[1, 1, 1, 1], name="dw"),
                    helper.make_node("Conv", ["a", "wg"], ["b"], group=2, pads=[1, 1, 1, 1], name="grouped"),
                    helper.make_node("Conv", ["b", "w1"], ["c"], name="one_by_one"),
                    helper.make_node("Conv", ["c", "wdyn"], ["y"], pads=[1, 1, 1, 1], name="dynamic")],
                   [tinfo("x", ["N", 4, 8, 8]), tinfo("wdyn", [4, 4, 3, 3])], [tinfo("y", None)],
                   {"wd": f(4, 1, 3, 3), "wg": f(8, 2, 3, 3), "w1": f(4, 8, 1, 1)})
    before = to_onnx_model(g).SerializeToString()
    for name in CONV_PASSES:
        res = apply(g, f"{name}{{rank=full}}")
        assert not res.changed
        text = "\n".join(res.notes)
        assert "Conv dw alone: depthwise conv (group=4)" in text
        assert "Conv grouped alone: grouped conv (group=2)" in text
        assert "Conv one_by_one alone: 1x1 conv" in text
        assert "Conv dynamic alone: the weight is not a constant" in text
    res = apply(g, "svd-linear{rank=full}")
    assert res.changed is True and list(res.artifacts["layers"]) == ["one_by_one"]
    assert to_onnx_model(g).SerializeToString() != before


def test_not_smaller_is_left_alone_but_full_is_applied():
    g = digits()
    res = apply(g, "factorize-conv{rank=9}")  # = full rank, but not written as 'full': larger, so not applied
    assert not res.changed and all(not e["applied"] for e in res.artifacts["layers"].values())
    assert any("not smaller at rank 9" in n and "layer1.0.conv1" in n for n in res.notes)
    res = apply(g, "factorize-conv{rank=full}")
    assert res.changed and res.metrics["params_after"] > res.metrics["params_before"]


# ==================================================== determinism, state, torch lowering
@pytest.mark.parametrize("name", ALL_PASSES)
def test_deterministic_and_stateless(name):
    (p,) = parse_pipeline(f"{name}{{rank=3}}")
    before = copy.deepcopy(vars(p))
    outs = []
    for _ in range(2):
        g = digits()
        res = p(g, PassContext())
        outs.append((to_onnx_model(g).SerializeToString(), res.notes, repr(res.artifacts)))
    assert outs[0] == outs[1]
    assert repr(vars(p)) == repr(before)


@pytest.mark.parametrize("name", ALL_PASSES)
def test_to_torch_matches_ort_and_trains(name):
    g = digits()
    apply(g, f"{name}{{rank=4}}")
    x, _ = digits_test(32)
    module = to_torch(g)
    with torch.no_grad():
        t = module(torch.from_numpy(x["input"]))
    t = t[0] if isinstance(t, (tuple, list)) else t
    assert max_rel_err(out(g, x), t.numpy()) <= 1e-5
    if name == "factorize-conv":
        dws = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels
               and m.out_channels == 4 * m.in_channels and m.kernel_size == (3, 3)]
        assert len(dws) == 7
    params = [p for p in module.parameters() if p.requires_grad]
    assert params
    module(torch.from_numpy(x["input"])).sum().backward()
    assert all(p.grad is not None for p in params)


# ==================================================================== CLI and manager
def test_cli_compile_factorize_conv(tmp_path):
    from nnsculpt.cli import main

    calib = digits_npz(tmp_path / "calib.npz", "train", n=64)
    o = tmp_path / "x.onnx"
    rc = main(["compile", "zoo:digits_resnet", "-p", "factorize-conv{rank_ratio=0.5}", "-o", str(o),
               "--calib-data", str(calib), "--report", str(tmp_path / "rep")])
    assert rc == 0 and o.exists()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    (entry,) = [p for p in rep["passes"] if p["name"] == "factorize-conv"]
    assert [p["name"] for p in rep["passes"]] == ["fold-bn", "factorize-conv"] and rep["passes"][0]["inserted"]
    lay = entry["artifacts"]["layers"]["layer1.0.conv1"]
    assert lay["rank"] == 5 and lay["applied"] and lay["params_after"] == 16 * 5 * (9 + 16)
    assert entry["metrics"]["factored"] == 7 and entry["after"]["macs"] < entry["before"]["macs"] \
        if "after" in entry and "macs" in entry.get("after", {}) else entry["metrics"]["factored"] == 7
    g = from_onnx(o)
    dws = [n for n in g.nodes if n.name.endswith("/dw")]
    assert len(dws) == 7 and all(int(n.attrs.get("group", 1)) == n.inputs[1].shape[0] // 5 for n in dws)
    assert "layer1.0.conv1/dw" in {n.name for n in g.nodes}
    o2 = tmp_path / "y.onnx"
    rc = main(["compile", "zoo:digits_resnet", "-p", "svd-linear{rank=4,data_aware=true}", "-o", str(o2),
               "--calib-data", str(calib)])
    assert rc == 0 and o2.exists()


def test_pass_manager_inserts_fold_bn_and_reports_drift():
    g = from_onnx(_small_onnx_model())
    res = PassManager(parse_pipeline("factorize-conv{rank=full},svd-linear{rank=full}"), check_numerics=True).run(g)
    fold, fc, sl = res.report["passes"]
    assert fold["name"] == "fold-bn" and fold["inserted_for"] == "factorize-conv"
    assert fc["metrics"]["factored"] == 1 and sl["metrics"]["factored"] == 2  # conv1; then its /pw 1x1 and the fc
    assert any("/conv2/Conv alone: depthwise conv (group=8)" in n for n in fc["notes"])
    assert sl["drift_vs_input"]["max_rel"] <= 1e-5 and sl["drift_vs_input"]["top1_agreement"] == 1.0
    g = from_onnx(_small_onnx_model())
    res = PassManager(parse_pipeline("factorize-conv{rank=1}"), check_numerics=True).run(g)
    assert res.report["passes"][1]["drift_vs_input"]["max_rel"] > 1e-3  # lossy: drift reported, not an error


def _small_onnx_model():
    m = make_small_net()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13, dynamo=False,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


def test_sign_convention_of_the_factors():
    """The largest-magnitude entry of every left factor column is positive (signs fixed, so two
    machines' LAPACKs give the same model), and flipping the weight's sign flips only B."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 9)).astype(np.float32)
    facs = []
    for sign in (1, -1):
        g = onnx_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tinfo("x", ["N", 12])],
                       [tinfo("y", ["N", 9])], {"w": sign * w})
        apply(g, "svd-linear{rank=3}")
        a = g.node_by_name("mm/svd_a").inputs[1].const
        b = g.node_by_name("mm/svd_b").inputs[1].const
        cols = a[np.argmax(np.abs(a), axis=0), np.arange(a.shape[1])]
        assert np.all(cols > 0)
        facs.append((a, b))
    assert np.allclose(facs[0][0], facs[1][0], atol=1e-6) and np.allclose(facs[0][1], -facs[1][1], atol=1e-6)


def _doc_sentences() -> list[str]:
    """Real English sentences: the Python documentation's topic texts (``pydoc_data``, in the
    standard library), split into sentences of 6-30 words, in a fixed order."""
    import re

    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    return [s for s in re.split(r"(?<=[.!?])\s+", text)
            if 6 <= len(s.split()) <= 30 and sum(w.isalpha() for w in s.split()) >= 0.7 * len(s.split())]


@pytest.mark.thirdparty
def test_svd_linear_on_minilm_full_rank_exact_and_data_aware_beats_plain(tmp_path):
    """Real all-MiniLM-L6-v2 weights (optional extra): svd-linear on the 12 feed-forward MatMuls
    at full rank reproduces the sentence embeddings; at rank 96 data-aware SVD (calibrated on
    real sentences) keeps held-out embeddings closer to the original than plain SVD."""
    from . import minilm

    d = minilm.require()
    model = onnx.load(str(minilm.export(d, tmp_path / "minilm.onnx", opset=14)))
    sents = _doc_sentences()
    calib = minilm.tokenize(d, sents[0:256:4])          # 64 sentences
    held = minilm.tokenize(d, sents[1:200:8])           # 25 others
    assert len(calib["input_ids"]) >= 32 and len(held["input_ids"]) >= 12
    ffn = "layers=[*/inter/MatMul,*/out/MatMul]"
    g = from_onnx(model)
    ref = run(g, held)["embedding"]
    res = apply(g, f"svd-linear{{rank=full,{ffn}}}")
    assert res.metrics["factored"] == 12
    assert max_rel_err(ref, run(g, held)["embedding"]) <= 1e-5
    cos = {}
    for da in ("false", "true"):
        g = from_onnx(model)
        res = apply(g, f"svd-linear{{rank=96,data_aware={da},{ffn}}}", PassContext(calib_data=calib))
        assert res.metrics["factored"] == 12
        got = run(g, held)["embedding"]
        cos[da] = float(np.mean(np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))))
    assert cos["true"] > cos["false"] + 0.05, cos
