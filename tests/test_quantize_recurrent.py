"""quantize on recurrent layers: LSTM -> com.microsoft.DynamicQuantizeLSTM (static and dynamic
mode), GRU left float by default / int8 weight QDQ when opted in, the LSTM / GRU FLOP rule
and the integer-path accounting, refusals (non-constant weights, layout=1), determinism.

Models are real torch modules exported with ``torch.onnx.export(..., dynamo=False)``; the
classifiers are trained (a few seconds) on a synthetic multichannel-sinusoid task so that
top-1 agreement is measured on realistic logit margins. Hand-built single-LSTM graphs check
the kernel features the rewrite claims to carry (peepholes, directions, sequence_lens, clip,
input_forget, activations) against ORT's float LSTM.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model, verify
from nnsculpt.ir.analysis import node_costs
from nnsculpt.passes import PassContext, PassManager, parse_pipeline
from nnsculpt.passes.quantize import Quantize
from nnsculpt.passes.quantize.recurrent import lstm_weights
from nnsculpt.runtime import run, session
from nnsculpt.runtime.integer_path import integer_fraction

from .conftest import max_rel_err

T, F, C = 24, 16, 5   # sequence length, features, classes


# ------------------------------------------------------------------------------ data / models
def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy multichannel sinusoids whose frequency is the class (random phase / amplitude)."""
    r = np.random.default_rng(seed)
    y = r.integers(0, C, n)
    t = np.arange(T)[None, :, None]
    freq = (0.05 + 0.04 * y)[:, None, None]
    x = r.uniform(0.5, 1.5, (n, 1, F)) * np.sin(2 * np.pi * freq * t + r.uniform(0, 2 * np.pi, (n, 1, F)))
    x = x + 0.3 * r.standard_normal((n, T, F))
    return x.astype(np.float32), y


class RNNClassifier(torch.nn.Module):
    def __init__(self, cell: str = "lstm", hidden: int = 64, layers: int = 1, bidirectional: bool = False,
                 init_states: bool = False):
        super().__init__()
        cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
        self.cell, self.init_states = cell, init_states
        self.rnn = cls(F, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = torch.nn.Linear(hidden * (2 if bidirectional else 1), C)

    def forward(self, x, h0=None, c0=None):
        if self.init_states:   # states come batch-first, [N, layers * dirs, hidden]
            h0, c0 = h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()
            y, _ = self.rnn(x, (h0, c0) if self.cell == "lstm" else h0)
        else:
            y, _ = self.rnn(x)
        return self.fc(y[:, -1])


def _train(m: torch.nn.Module, steps: int = 400) -> torch.nn.Module:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = _data(2048, 0)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        for _ in range(steps):
            i = torch.randint(0, len(x), (64,))
            loss = torch.nn.functional.cross_entropy(m(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(old)
    return m.eval()


def _export(m: torch.nn.Module, path, init_states: bool = False, hidden: int = 64, n_states: int = 1):
    args = (torch.randn(2, T, F),)
    names = ["x"]
    axes = {"x": {0: "N", 1: "T"}, "logits": {0: "N"}}
    if init_states:
        args += (torch.zeros(2, n_states, hidden), torch.zeros(2, n_states, hidden))
        names += ["h0", "c0"]
        axes.update(h0={0: "N"}, c0={0: "N"})
    torch.onnx.export(m, args, str(path), input_names=names, output_names=["logits"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def lstm_onnx(tmp_path_factory):
    torch.manual_seed(0)
    m = _train(RNNClassifier("lstm"))
    return _export(m, tmp_path_factory.mktemp("lstm") / "lstm.onnx")


@pytest.fixture(scope="module")
def gru_onnx(tmp_path_factory):
    torch.manual_seed(0)
    m = _train(RNNClassifier("gru"))
    return _export(m, tmp_path_factory.mktemp("gru") / "gru.onnx")


def _calib(n: int = 64, seed: int = 5) -> dict[str, np.ndarray]:
    return {"x": _data(n, seed)[0]}


def _quantize(path_or_graph, pipeline: str, calib=None):
    g = from_onnx(path_or_graph) if not hasattr(path_or_graph, "nodes") else path_or_graph
    res = PassManager(parse_pipeline(pipeline), verify=True).run(g, PassContext(calib_data=calib))
    verify(g)
    model = to_onnx_model(g)
    onnx.checker.check_model(model, full_check=True)
    return g, model, [e for e in res.report["passes"] if e["name"] == "quantize"][-1]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _compare(ref_model, model, feeds, out="logits"):
    ref = run(session(ref_model), feeds)[out]
    got = run(session(model), feeds)[out]
    return ref, got


def _nodes(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _init_bytes(model, names) -> int:
    inits = {t.name: t for t in model.graph.initializer}
    return sum(numpy_helper.to_array(inits[n]).nbytes for n in names if n in inits)


# ----------------------------------------------------------------------------------- LSTM
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_lstm_classifier_becomes_dynamic_quantize_lstm(lstm_onnx, mode):
    fp32 = onnx.load(str(lstm_onnx))
    lstm = _nodes(fp32, "LSTM")[0]
    g, model, entry = _quantize(lstm_onnx, f"quantize{{mode={mode}}}", _calib() if mode == "static" else None)
    assert not _nodes(model, "LSTM")
    (dq,) = _nodes(model, "DynamicQuantizeLSTM")
    assert dq.domain == "com.microsoft" and dq.name == lstm.name
    assert {(o.domain, o.version) for o in model.opset_import} >= {("com.microsoft", 1)}
    node = next(n for n in g.nodes if n.name == lstm.name)
    assert node.source == "/rnn/LSTM" and node.meta.get("pass") == "quantize"
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == \
        {a.name: helper.get_attribute_value(a) for a in lstm.attribute}
    # inputs: X, W, R, B, seq_lens, h0, c0, P carried; then the scales / zero points
    assert len(dq.input) == 12 and list(dq.input[:1]) == list(lstm.input[:1]) and dq.input[3] == lstm.input[3]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w, r = inits[dq.input[1]], inits[dq.input[2]]
    assert w.dtype == np.int8 and w.shape == (1, F, 4 * 64) and r.dtype == np.int8 and r.shape == (1, 64, 256)
    assert inits[dq.input[8]].shape == (1, 256) and inits[dq.input[10]].shape == (1, 256)
    assert not inits[dq.input[9]].any() and inits[dq.input[9]].dtype == np.int8
    # the int8 weights are the float ones (transposed) on the per-row grid
    w_fp = numpy_helper.to_array(next(t for t in fp32.graph.initializer if t.name == lstm.input[1]))
    deq = w.astype(np.float32).transpose(0, 2, 1) * inits[dq.input[8]][..., None]
    assert np.abs(deq - w_fp).max() <= 0.5 * inits[dq.input[8]].max() + 1e-7
    assert any("DynamicQuantizeLSTM" in n and lstm.name in n for n in entry["notes"])
    assert entry["artifacts"]["recurrent_integer"] == [lstm.name]
    # accuracy on held-out data
    x, y = _data(512, 7)
    ref, got = _compare(str(lstm_onnx), model, {"x": x})
    cos = _cosines(ref, got)
    assert cos.min() >= 0.99 and np.median(cos) >= 0.999
    agree = (ref.argmax(1) == got.argmax(1)).mean()
    assert agree >= 0.98, agree
    acc_ref, acc_q = (ref.argmax(1) == y).mean(), (got.argmax(1) == y).mean()
    assert acc_ref >= 0.9 and acc_q >= acc_ref - 0.02
    assert max_rel_err(ref, got) < 0.05


def test_lstm_weights_shrink_about_4x(lstm_onnx):
    fp32 = onnx.load(str(lstm_onnx))
    lstm = _nodes(fp32, "LSTM")[0]
    _, model, _ = _quantize(lstm_onnx, "quantize", _calib())
    dq = _nodes(model, "DynamicQuantizeLSTM")[0]
    before = _init_bytes(fp32, lstm.input[1:3])
    after = _init_bytes(model, list(dq.input[1:3]) + list(dq.input[8:12]))  # int8 W / R + scales + zero points
    assert before / after >= 3.5, (before, after)
    assert _init_bytes(model, dq.input[1:3]) * 4 == before          # the weights themselves: exactly 4x
    # the whole file: the float bias, the classifier head and the graph stay
    assert len(fp32.SerializeToString()) / len(model.SerializeToString()) >= 2.5


def test_integer_fraction_counts_the_lstm_flops(lstm_onnx):
    lstm_flops = T * 1 * 4 * 64 * (F + 64) * 2
    g, model, entry = _quantize(lstm_onnx, "quantize", _calib())
    rep = entry["artifacts"]["integer_report"]
    assert "/rnn/LSTM" in rep["integer_nodes"] and not rep["float_compute_nodes"]
    assert rep["integer_flops"] >= lstm_flops and rep["fraction"] > 0.99
    assert "DynamicQuantizeLSTM" in rep["optimized_ops"]
    # the same from the runtime service, with the fp32 graph as FLOPs reference
    direct = integer_fraction(model, reference=from_onnx(lstm_onnx), input_shapes={"x": (1, T, F)})
    assert direct.integer_flops >= lstm_flops and direct.fraction > 0.99
    # LSTM excluded: the head alone is integer -- a sliver of the FLOPs, and the LSTM is named float
    _, _, e2 = _quantize(lstm_onnx, "quantize{exclude=[/rnn/LSTM]}", _calib())
    rep2 = e2["artifacts"]["integer_report"]
    assert rep2["float_compute_nodes"] == ["/rnn/LSTM"] and rep2["fraction"] < 0.01
    assert rep2["total_flops"] >= lstm_flops


def test_flop_rule_for_lstm_gru_and_the_contrib_op(lstm_onnx, gru_onnx):
    def costs_of(g, op, shapes):
        for v in g.inputs:
            v.shape = shapes[v.name]
        for n in g.nodes:
            for o in n.outputs:
                if o not in g.outputs:
                    o.shape = None
        g.invalidate()
        return [c for c in node_costs(g) if c.op_type == op]

    (c,) = costs_of(from_onnx(lstm_onnx), "LSTM", {"x": (3, T, F)})
    assert c.macs == T * 3 * 4 * 64 * (F + 64) and c.flops == 2 * c.macs
    (c,) = costs_of(from_onnx(gru_onnx), "GRU", {"x": (3, T, F)})
    assert c.macs == T * 3 * 3 * 64 * (F + 64) and c.flops == 2 * c.macs
    g, _, _ = _quantize(lstm_onnx, "quantize{mode=dynamic}")
    (c,) = costs_of(g, "DynamicQuantizeLSTM", {"x": (3, T, F)})   # R is [dirs, H, 4H] there
    assert c.macs == T * 3 * 4 * 64 * (F + 64)


@pytest.mark.parametrize("init_states", [False, True])
def test_bidirectional_two_layer_lstm(tmp_path, init_states):
    torch.manual_seed(1)
    m = RNNClassifier("lstm", hidden=32, layers=2, bidirectional=True, init_states=init_states).eval()
    path = _export(m, tmp_path / "bi.onnx", init_states=init_states, hidden=32, n_states=4)
    rng = np.random.default_rng(3)

    def feeds(n, seed):
        d = {"x": _data(n, seed)[0]}
        if init_states:
            d.update(h0=0.5 * rng.standard_normal((n, 4, 32)).astype(np.float32),
                     c0=0.5 * rng.standard_normal((n, 4, 32)).astype(np.float32))
        return d

    fp32 = onnx.load(str(path))
    names = [n.name for n in _nodes(fp32, "LSTM")]
    assert len(names) == 2
    for mode in ("static", "dynamic"):
        _, model, entry = _quantize(path, f"quantize{{mode={mode}}}", feeds(64, 5))
        dqs = _nodes(model, "DynamicQuantizeLSTM")
        assert [n.name for n in dqs] == names and not _nodes(model, "LSTM")
        for n, old in zip(dqs, _nodes(fp32, "LSTM")):
            assert helper.get_attribute_value(next(a for a in n.attribute if a.name == "direction")) == b"bidirectional"
            assert list(n.input[4:7]) == list(old.input[4:7])  # initial_h / initial_c carried
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert inits[dqs[1].input[1]].shape == (2, 64, 128) and inits[dqs[1].input[8]].shape == (2, 128)
        x = feeds(128, 9)
        ref, got = _compare(str(path), model, x)
        assert _cosines(ref, got).min() >= 0.99 and max_rel_err(ref, got) < 0.05
        if init_states:  # the states reach the kernel: changing them changes the output
            x2 = {**x, "h0": np.zeros_like(x["h0"]), "c0": np.zeros_like(x["c0"])}
            assert max_rel_err(got, run(session(model), x2)["logits"]) > 0.05
        # every FLOP counted, the head behind the LSTMs included (the fp32 graph is the reference:
        # ONNX shape inference does not know the com.microsoft op, so shapes after it are unknown)
        rep = entry["artifacts"]["integer_report"]
        lstm_flops = 2 * T * 2 * 4 * 32 * ((F + 32) + (64 + 32))
        assert rep["total_flops"] >= lstm_flops + 2 * 64 * C and rep["integer_flops"] >= lstm_flops + 2 * 64 * C
        assert entry["artifacts"]["integer_fraction"] > 0.99


def test_per_tensor_scales(lstm_onnx):
    _, model, _ = _quantize(lstm_onnx, "quantize{mode=dynamic,per_channel=false}")
    dq = _nodes(model, "DynamicQuantizeLSTM")[0]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[dq.input[8]].shape == (1,) and inits[dq.input[11]].shape == (1,)
    ref, got = _compare(str(lstm_onnx), model, {"x": _data(256, 7)[0]})
    assert _cosines(ref, got).min() >= 0.99 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.97


def test_deterministic_and_stateless(lstm_onnx):
    q = Quantize()
    before = {k: repr(v) for k, v in vars(q).items()}
    outs = []
    for _ in range(2):
        g = from_onnx(lstm_onnx)
        q(g, PassContext(calib_data=_calib()))
        outs.append(to_onnx_model(g).SerializeToString())
    assert outs[0] == outs[1]
    assert {k: repr(v) for k, v in vars(q).items()} == before
    assert b"DynamicQuantizeLSTM" in outs[0]


def test_ops_without_lstm_leaves_it_float(lstm_onnx):
    _, model, entry = _quantize(lstm_onnx, "quantize{ops=[Gemm]}", _calib())
    assert _nodes(model, "LSTM") and not _nodes(model, "DynamicQuantizeLSTM")
    assert "com.microsoft" not in {o.domain for o in model.opset_import}
    _, model, _ = _quantize(lstm_onnx, "quantize{ops=[LSTM]}", _calib())
    assert _nodes(model, "DynamicQuantizeLSTM") and _nodes(model, "Gemm") and not _nodes(model, "DequantizeLinear")


# ------------------------------------------------------------------------------ refusals
def _weight_as_input(path, out):
    """The exported model with the LSTM's W turned into a graph input (not a constant)."""
    m = onnx.load(str(path))
    lstm = _nodes(m, "LSTM")[0]
    w = next(t for t in m.graph.initializer if t.name == lstm.input[1])
    m.graph.initializer.remove(w)
    m.graph.input.append(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)))
    onnx.save(m, str(out))
    return out, w.name, numpy_helper.to_array(w)


def _weight_computed(path, out):
    """The LSTM's R computed at run time: ``R * scale`` with ``scale`` a graph input."""
    m = onnx.load(str(path))
    lstm = _nodes(m, "LSTM")[0]
    m.graph.input.append(helper.make_tensor_value_info("r_scale", TensorProto.FLOAT, [1]))
    m.graph.node.insert(0, helper.make_node("Mul", [lstm.input[2], "r_scale"], ["r_scaled"], name="scale_R"))
    lstm.input[2] = "r_scaled"
    onnx.save(m, str(out))
    return out


def test_non_constant_weights_stay_float_with_a_note(lstm_onnx, tmp_path):
    path, _, _ = _weight_as_input(lstm_onnx, tmp_path / "w_input.onnx")
    _, model, entry = _quantize(path, "quantize{mode=dynamic}")
    assert _nodes(model, "LSTM") and not _nodes(model, "DynamicQuantizeLSTM")
    assert "com.microsoft" not in {o.domain for o in model.opset_import}
    assert any(n.startswith("left LSTM '/rnn/LSTM' float: its weight W is not a constant (a graph input)")
               for n in entry["notes"]), entry["notes"]
    assert _nodes(model, "MatMulInteger")  # the rest is still quantized
    path2 = _weight_computed(lstm_onnx, tmp_path / "r_mul.onnx")
    _, model2, entry2 = _quantize(path2, "quantize{mode=dynamic}")
    assert _nodes(model2, "LSTM") and not _nodes(model2, "DynamicQuantizeLSTM")
    assert any("its weight R is not a constant (produced by Mul 'scale_R')" in n for n in entry2["notes"])
    assert entry2["artifacts"]["recurrent_float"]["/rnn/LSTM"].startswith("its weight R")


# ---------------------------------------------------------------------------------- GRU
def test_gru_default_left_float_with_note(gru_onnx):
    fp32 = onnx.load(str(gru_onnx))
    gru = _nodes(fp32, "GRU")[0]
    for mode, calib in (("static", _calib()), ("dynamic", None)):
        _, model, entry = _quantize(gru_onnx, f"quantize{{mode={mode}}}", calib)
        (node,) = _nodes(model, "GRU")
        assert list(node.input) == list(gru.input)   # W / R still the float initializers
        assert _init_bytes(model, node.input[1:3]) == _init_bytes(fp32, gru.input[1:3])
        note = [n for n in entry["notes"] if n.startswith(f"left GRU '{gru.name}' float")]
        assert note and "no integer GRU kernel" in note[0] and "ops=[" in note[0]
        assert entry["artifacts"]["recurrent_float"] == {gru.name: "no integer GRU kernel (size only); not in ops"}
        rep = entry["artifacts"]["integer_report"]
        # the GRU's FLOPs are in the total (without calibration data the sequence dim counts as 1)
        assert rep["float_compute_nodes"] == [gru.name] and rep["fraction"] < (0.01 if calib else 0.03)


def test_gru_opt_in_weight_qdq(gru_onnx):
    fp32 = onnx.load(str(gru_onnx))
    gru = _nodes(fp32, "GRU")[0]
    for pipeline, calib in (("quantize{ops=[GRU,Gemm]}", _calib()), ("quantize{mode=dynamic,ops=[GRU,Gemm]}", None)):
        _, model, entry = _quantize(gru_onnx, pipeline, calib)
        (node,) = _nodes(model, "GRU")
        assert node.name == gru.name and node.input[0] == gru.input[0]
        prod = {o: n for n in model.graph.node for o in n.output}
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for i in (1, 2):
            dq = prod[node.input[i]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].shape == (3 * 64,)
            assert helper.get_attribute_value(dq.attribute[0]) == 1  # per gate row
        assert entry["artifacts"]["recurrent_weight_only"] == [gru.name]
        assert any("no integer GRU kernel" in n and gru.name in n for n in entry["notes"])
        x, y = _data(512, 7)
        ref, got = _compare(str(gru_onnx), model, {"x": x})
        assert _cosines(ref, got).min() >= 0.99 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.98
        assert (ref.argmax(1) == y).mean() >= 0.9
        assert len(fp32.SerializeToString()) / len(model.SerializeToString()) >= 2.0


# ---------------------------------------------------------- kernel features (hand-built LSTMs)
def _lstm_model(rng, *, dirs=1, hidden=12, inp=10, peephole=False, seq_lens=False, init=False, bias=True,
                **attrs):
    W = (0.3 * rng.standard_normal((dirs, 4 * hidden, inp))).astype(np.float32)
    R = (0.3 * rng.standard_normal((dirs, 4 * hidden, hidden))).astype(np.float32)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    ins = ["X", "W", "R", "", "", "", "", ""]
    gin = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [7, 3, inp])]
    if bias:
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal((dirs, 8 * hidden))).astype(np.float32), "B"))
        ins[3] = "B"
    if seq_lens:
        gin.append(helper.make_tensor_value_info("L", TensorProto.INT32, [3]))
        ins[4] = "L"
    if init:
        gin += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [dirs, 3, hidden]) for k in ("H0", "C0")]
        ins[5:7] = ["H0", "C0"]
    if peephole:
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, 3 * hidden)).astype(np.float32), "P"))
        ins[7] = "P"
    while ins and not ins[-1]:
        ins.pop()
    if dirs == 2:
        attrs.setdefault("direction", "bidirectional")
    node = helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=hidden, **attrs)
    outs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph([node], "g", gin, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"X": rng.standard_normal((7, 3, inp)).astype(np.float32)}
    if seq_lens:
        feeds["L"] = np.array([7, 4, 1], np.int32)
    if init:
        feeds["H0"] = rng.standard_normal((dirs, 3, hidden)).astype(np.float32)
        feeds["C0"] = rng.standard_normal((dirs, 3, hidden)).astype(np.float32)
    return model, feeds


@pytest.mark.parametrize("kw", [
    {}, {"bias": False}, {"direction": "reverse"}, {"dirs": 2}, {"dirs": 2, "init": True},
    {"peephole": True}, {"dirs": 2, "peephole": True}, {"seq_lens": True}, {"clip": 0.5}, {"input_forget": 1},
    {"activations": ["HardSigmoid", "Tanh", "Tanh"], "activation_alpha": [0.3], "activation_beta": [0.4]},
    {"layout": 0},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_kernel_features_match_the_float_lstm(kw):
    model, feeds = _lstm_model(np.random.default_rng(0), **kw)
    ref = run(session(model), feeds)
    g, out, entry = _quantize(from_onnx(model), "quantize{mode=dynamic}")
    (dq,) = _nodes(out, "DynamicQuantizeLSTM")
    assert "layout" not in {a.name for a in dq.attribute}
    got = run(session(out), feeds)
    for k in ("Y", "Y_h", "Y_c"):
        assert max_rel_err(ref[k], got[k]) < 0.04, (k, max_rel_err(ref[k], got[k]))
    if kw.get("peephole"):  # the peepholes reach the kernel (dropping them moves the output far more)
        no_p, _ = _lstm_model(np.random.default_rng(0), **{**kw, "peephole": False})
        assert max_rel_err(ref["Y_c"], run(session(no_p), feeds)["Y_c"]) > 0.2


def test_layout_1_is_left_float_with_a_note():
    model, _ = _lstm_model(np.random.default_rng(0), layout=1)
    g = from_onnx(model)
    before = to_onnx_model(g).SerializeToString()
    res = Quantize(mode="dynamic")(g, PassContext())
    assert not res.changed and to_onnx_model(g).SerializeToString() == before
    assert any(n.startswith("left LSTM 'lstm' float: layout=1 (batch-major)") for n in res.notes), res.notes


def test_lstm_weights_layout_helper():
    w = np.random.default_rng(0).standard_normal((2, 8, 5)).astype(np.float32)
    q, s = lstm_weights(w, per_channel=True)
    assert q.shape == (2, 5, 8) and s.shape == (2, 8) and q.flags["C_CONTIGUOUS"]
    assert np.abs(np.abs(q).max(axis=1)).min() == 127             # every row uses its full grid
    np.testing.assert_allclose(q.transpose(0, 2, 1) * s[..., None], w, atol=float(s.max()) / 2 + 1e-7)
    q1, s1 = lstm_weights(w, per_channel=False)
    assert s1.shape == (2,) and np.allclose(s1, np.abs(w).reshape(2, -1).max(1) / 127)


def test_constant_node_weights_shared_by_two_lstms_are_quantized_once():
    rng = np.random.default_rng(0)
    w = (0.3 * rng.standard_normal((1, 24, 8))).astype(np.float32)
    r = (0.3 * rng.standard_normal((1, 24, 6))).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "w"), name="cw"),
             helper.make_node("Identity", ["Wc"], ["Wi"], name="idw"),
             helper.make_node("LSTM", ["X", "Wi", "R"], ["", "Yh"], name="lstm", hidden_size=6),
             helper.make_node("LSTM", ["X", "Wi", "R"], ["Y2"], name="lstm2", hidden_size=6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [5, 2, 8])],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("Yh", "Y2")],
                              [numpy_helper.from_array(r, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"X": rng.standard_normal((5, 2, 8)).astype(np.float32)}
    ref = run(session(model), feeds)
    _, out, _ = _quantize(from_onnx(model), "quantize{mode=dynamic}")
    a, b = _nodes(out, "DynamicQuantizeLSTM")
    assert list(a.input[1:3]) == list(b.input[1:3]) and list(a.input[8:]) == list(b.input[8:])
    assert {n.op_type for n in out.graph.node} == {"DynamicQuantizeLSTM"}   # the Constant / Identity are gone
    assert sorted(t.data_type for t in out.graph.initializer).count(TensorProto.INT8) == 4  # W, R + 2 zero points
    got = run(session(out), feeds)
    assert max(max_rel_err(ref[k], got[k]) for k in ref) < 0.04
