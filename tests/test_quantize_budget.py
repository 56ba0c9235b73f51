"""The task metrics (``runtime/metrics.py``) and the quantize budget search that maximizes the
share of FLOPs in integer kernels within a budget of any of them (``passes/quantize/budget.py``).

Every bound is re-measured here, independently of the pass, on the data it was given."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nnsculpt.cli import main
from nnsculpt.ir import PassOptionError, from_onnx
from nnsculpt.passes import PassContext, PassManager, parse_pipeline
from nnsculpt.passes.quantize import Quantize
from nnsculpt.runtime import run, session
from nnsculpt.runtime.integer_path import integer_fraction
from nnsculpt.runtime.metrics import metric_error, resolve, task_errors


# ----------------------------------------------------------------------------- metrics
def test_metric_values_on_known_arrays():
    ref = {"y": np.array([[3.0, 0.0, 4.0], [1.0, 2.0, 0.0]])}
    got = {"y": np.array([[3.0, 0.0, 3.0], [1.0, 2.5, 0.0]])}
    diff = np.array([0, 0, 1, 0, 0.5, 0])
    assert metric_error("rel_l2", ref, got) == pytest.approx(np.linalg.norm(diff) / math.sqrt(9 + 16 + 1 + 4))
    assert metric_error("max_rel", ref, got) == pytest.approx(1 / 4)
    a, b = ref["y"].ravel(), got["y"].ravel()
    assert metric_error("cosine", ref, got) == pytest.approx(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert metric_error("top1", ref, got) == pytest.approx(0.5)      # row 0: 4 -> 3 ties with 3: argmax 0
    got2 = {"y": np.array([[3.0, 0.0, 4.5], [1.0, 2.5, 0.0]])}
    assert metric_error("top1", ref, got2) == pytest.approx(0.0)
    # iou@T: masks {(0,0),(0,2)} vs {(0,0),(0,2),(1,1)} above 2.0 -> 1 - 2/3
    assert metric_error("iou@2.0", ref, {"y": np.array([[3.0, 0.0, 4.0], [1.0, 2.5, 0.0]])}) == pytest.approx(1 / 3)
    assert metric_error("iou@10", ref, got) == 0.0          # both masks empty: IoU 1
    # the worst output counts; integer outputs are ignored; a shape change is infinite
    two = {"y": ref["y"], "z": np.ones(4), "ids": np.array([1, 2])}
    assert metric_error("rel_l2", two, {"y": ref["y"], "z": np.ones(4) * 1.5, "ids": np.array([9, 9])}) \
        == pytest.approx(0.5)
    assert metric_error("rel_l2", ref, {"y": np.zeros((3, 3))}) == math.inf


def test_metrics_over_lists_are_over_the_concatenation():
    rng = np.random.default_rng(0)
    parts_a = [rng.standard_normal((2, 5, w)) for w in (3, 4, 7)]
    parts_b = [p + 0.01 * rng.standard_normal(p.shape) for p in parts_a]
    flat_a = {"y": np.concatenate([p.ravel() for p in parts_a])}
    flat_b = {"y": np.concatenate([p.ravel() for p in parts_b])}
    for m in ("rel_l2", "max_rel", "cosine", "iou@0.3"):
        assert metric_error(m, {"y": parts_a}, {"y": parts_b}) == pytest.approx(metric_error(m, flat_a, flat_b))
    rows_a = {"y": np.concatenate([p.transpose(0, 2, 1).reshape(-1, 5) for p in parts_a])}
    rows_b = {"y": np.concatenate([p.transpose(0, 2, 1).reshape(-1, 5) for p in parts_b])}
    ta = {"y": [p.transpose(0, 2, 1) for p in parts_a]}
    tb = {"y": [p.transpose(0, 2, 1) for p in parts_b]}
    assert metric_error("top1", ta, tb) == pytest.approx(metric_error("top1", rows_a, rows_b))


def test_metric_names_are_checked():
    with pytest.raises(ValueError, match="unknown metric 'l3'"):
        metric_error("l3", {"y": np.ones(2)}, {"y": np.ones(2)})
    with pytest.raises(ValueError, match="class scores"):
        metric_error("top1", {"y": np.ones(4)}, {"y": np.ones(4)})
    assert resolve("iou@0.25")[0] == "iou@0.25"
    errs = task_errors({"p": np.array([[0.1, 0.9]])}, {"p": np.array([[0.2, 0.8]])})
    assert set(errs) == {"rel_l2", "max_rel", "cosine", "top1", "iou@0.3"}


# ------------------------------------------------------------------------------ models
class _Block(torch.nn.Module):
    """Conv stem -> LayerNorm -> MLP with tanh GELU (residual) -> LayerNorm -> mean -> head:
    the shape of the small tf2onnx / jax2tf classifiers (opset 14: norms and GELU are chains)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Conv1d(8, 64, 3, padding=1)
        self.ln1, self.ln2 = torch.nn.LayerNorm(64), torch.nn.LayerNorm(64)
        self.fc1, self.fc2, self.head = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 10)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln1(h)), approximate="tanh"))
        return self.head(self.ln2(h).mean(1))


class _MapNet(torch.nn.Module):
    """A tiny detector head: conv -> relu -> conv -> sigmoid probability map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2, self.c3 = (torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1),
                                     torch.nn.Conv2d(16, 1, 1))

    def forward(self, x):
        return torch.sigmoid(4 * self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    p = tmp_path_factory.mktemp("budget") / "block.onnx"
    torch.onnx.export(_Block().eval(), (torch.randn(2, 8, 16),), str(p), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=14, dynamo=False)
    rng = np.random.default_rng(0)
    return p, {"x": rng.standard_normal((256, 8, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def mapnet(tmp_path_factory):
    p = tmp_path_factory.mktemp("budget") / "map.onnx"
    torch.onnx.export(_MapNet().eval(), (torch.randn(1, 3, 16, 16),), str(p), input_names=["x"], output_names=["p"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=13, dynamo=False)
    rng = np.random.default_rng(2)
    return p, {"x": rng.standard_normal((32, 3, 16, 16)).astype(np.float32)}


def _quantize(path, spec, calib):
    g = from_onnx(path)
    res = PassManager(parse_pipeline(spec)).run(g, PassContext(calib_data=calib))
    return g, res.results[-1], res


def _err_all(path, calib, opts, metric):
    """The fully quantized model's error by ``metric`` (an infinite budget only measures it)."""
    _, r, _ = _quantize(path, f"quantize{{{opts}budget=1e9,metric={metric}}}", calib)
    return r.artifacts["error_all_quantized"]


# --------------------------------------------------------------------------- the search
@pytest.mark.parametrize("metric,extra", [("rel_l2", ""), ("max_rel", ""), ("cosine", ""),
                                          ("top1", "weights=int4,")])   # int8 flips no top-1 here
def test_budget_holds_for_each_metric_and_the_curve_is_recorded(block, metric, extra):
    path, calib = block
    opts = "fuse=false,keep_fragile_float=false," + extra   # many sensitive layers: the search has work to do
    err_all = _err_all(path, calib, opts, metric)
    assert err_all > 0, f"fully quantized {metric} error is 0 on this model: the test would search nothing"
    budget = err_all / 2
    g, r, _ = _quantize(path, f"quantize{{{opts}budget={budget!r},metric={metric}}}", calib)
    a = r.artifacts
    assert a["metric"] == metric and a["error_final"] <= budget
    # re-measured here on the same data
    ref, got = run(session(str(path)), calib), run(session(g), calib)
    assert metric_error(metric, ref, got) == pytest.approx(a["error_final"], rel=1e-6, abs=1e-9)
    assert metric_error(metric, ref, got) <= budget
    # layers quantized, a real share of the FLOPs, predicted like ORT measures it
    assert a["quantized_layers"] and a["float_layers"]
    measured = integer_fraction(g, input_shapes={"x": (1, 8, 16)}).fraction
    assert 0 < a["integer_flops_share_predicted"] and abs(measured - a["integer_flops_share_predicted"]) < 0.05
    curve = a["budget_curve"]
    assert curve[0]["stage"] == "all" and curve[0]["error"] == err_all
    assert all(0.0 <= p["integer_flops_share"] <= 1.0 for p in curve)
    assert any(p["error"] == a["error_final"] and p["layers"] == len(a["quantized_layers"]) for p in curve)
    stages = {p["stage"] for p in curve}
    assert "bisect" in stages or "add-back" in stages


def test_budget_keeps_the_flop_carrying_layers_int8(block):
    """Every layer of this model is sensitive (norm and GELU chains quantized on purpose):
    ranked by sensitivity per FLOP, the search keeps the two MLP MatMuls -- most of the FLOPs --
    in int8 and leaves cheap sensitive layers float."""
    path, calib = block
    opts = "fuse=false,keep_fragile_float=false,"
    budget = _err_all(path, calib, opts, "rel_l2") / 2
    g, r, _ = _quantize(path, f"quantize{{{opts}budget={budget!r}}}", calib)
    q = set(r.artifacts["quantized_layers"])
    mlp = {n.name for n in from_onnx(path).nodes if n.op_type == "MatMul" and n.name.startswith(("/fc1/", "/fc2/"))}
    assert len(mlp) == 2 and mlp <= q
    assert r.artifacts["integer_flops_share_predicted"] >= 0.6
    sens = r.artifacts["sensitivity"]
    assert set(sens) == q | set(r.artifacts["float_layers"])


def test_budget_on_a_probability_map_with_iou(mapnet):
    path, calib = mapnet
    err_all = _err_all(path, calib, "", "iou@0.3")
    budget = max(err_all / 2, 1e-4)
    g, r, _ = _quantize(path, f"quantize{{budget={budget!r},metric=iou@0.3}}", calib)
    ref, got = run(session(str(path)), calib)["p"], run(session(g), calib)["p"]
    iou = np.logical_and(ref > 0.3, got > 0.3).sum() / np.logical_or(ref > 0.3, got > 0.3).sum()
    assert 1 - iou <= budget + 1e-12 and r.artifacts["metric"] == "iou@0.3"


def test_budget_nothing_fits_leaves_the_model_float(mapnet):
    path, calib = mapnet
    g, r, _ = _quantize(path, "quantize{budget=0}", calib)
    assert r.artifacts["quantized_layers"] == [] and not any(n.op_type == "QuantizeLinear" for n in g.nodes)
    assert any("no layer can be quantized" in n for n in r.notes)
    ref, got = run(session(str(path)), calib)["p"], run(session(g), calib)["p"]
    assert float(np.abs(ref - got).max()) <= 1e-5 * float(np.abs(ref).max())


def test_metric_option_errors_are_named(mapnet):
    with pytest.raises(PassOptionError, match="option 'metric'.*unknown metric 'psnr'"):
        Quantize(budget=0.1, metric="psnr")
    with pytest.raises(PassOptionError, match="budget_tries"):
        Quantize(budget=0.1, budget_tries=-1)
    path, calib = mapnet
    with pytest.raises(PassOptionError, match="class scores"):
        _quantize(path, "quantize{budget=0.0001,metric=top1}", calib)


def test_metric_as_a_string_or_a_callable_in_python(mapnet):
    path, calib = mapnet
    q = Quantize(budget=0.5, metric="cosine")
    assert q.options.metric == "cosine" and q.metric is None
    seen = []

    def never_ok(ref, got):
        seen.append(1)
        return 1.0

    g = from_onnx(path)
    r = PassManager([Quantize(budget=0.5, metric=never_ok)]).run(g, PassContext(calib_data=calib)).results[-1]
    assert seen and r.artifacts["metric"] == "never_ok" and r.artifacts["quantized_layers"] == []


def test_budget_curve_lands_in_report_json(block, tmp_path):
    path, calib = block
    np.savez(tmp_path / "c.npz", **calib)
    out, rep = tmp_path / "q.onnx", tmp_path / "rep"
    assert main(["compile", str(path), "-p", "quantize{budget=0.005,metric=rel_l2}", "--calib-data",
                 str(tmp_path / "c.npz"), "-o", str(out), "--report", str(rep), "--no-check"]) == 0
    entry = [e for e in json.loads((rep / "report.json").read_text())["passes"] if e["name"] == "quantize"][-1]
    art = entry["artifacts"]
    assert art["metric"] == "rel_l2" and art["budget"] == 0.005
    assert isinstance(art["budget_curve"], list) and art["budget_curve"][0]["stage"] == "all"
    assert set(art["quantized_layers"]) | set(art["float_layers"]) == set(art["sensitivity"]) or \
        art["float_layers"] == []
