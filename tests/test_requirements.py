"""Declared requirements, the PassResult contract, and passes that keep no state."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest

from nnsculpt.ir import from_onnx
from nnsculpt.ir.errors import MissingCalibrationDataError, RequirementError
from nnsculpt.passes import PassContext, PassManager, PassResult, get_pass, list_passes, parse_pipeline
from nnsculpt.passes.base import Pass
from nnsculpt.passes.requirements import holds, parse_requirement
from nnsculpt.runtime import make_inputs, run

from .conftest import max_rel_err


def _bn_count(g):
    return sum(n.op_type == "BatchNormalization" for n in g.nodes)


def test_manager_inserts_fold_bn_for_quantize_and_reports_it(small_onnx):
    g = from_onnx(small_onnx)
    assert _bn_count(g) == 2
    calib = make_inputs(g, batch=16, seed=0)
    res = PassManager(parse_pipeline("quantize"), check_numerics=True).run(g, PassContext(calib_data=calib))
    names = [e["name"] for e in res.report["passes"]]
    assert names == ["fold-bn", "quantize"]
    fb = res.report["passes"][0]
    assert fb["inserted"] is True and fb["requirement"] == "bn-folded" and fb["inserted_for"] == "quantize"
    assert fb["drift_vs_previous"]["max_rel"] <= 1e-5          # the inserted pass is checked like any other
    assert "inserted" not in res.report["passes"][1]
    assert set(res.report["passes"][1]["requires"]) == {"bn-folded", "calib-data", "opset>=13", "shapes",
                                                        "layernorm-fused", "gelu-fused"}
    assert _bn_count(g) == 0


def test_nothing_inserted_when_the_requirement_already_holds(small_onnx):
    g = from_onnx(small_onnx)
    calib = make_inputs(g, batch=8, seed=0)
    res = PassManager(parse_pipeline("fold-bn,equalize")).run(g, PassContext(calib_data=calib))
    assert [e["name"] for e in res.report["passes"]] == ["fold-bn", "equalize"]
    assert not any(e.get("inserted") for e in res.report["passes"])


def test_direct_call_meets_requirements_itself(small_onnx):
    g = from_onnx(small_onnx)
    ref = run(g, x := make_inputs(g, batch=4, seed=1))
    res = get_pass("equalize")()(g, PassContext())
    assert isinstance(res, PassResult) and res.graph_changed
    assert res.changed is False  # SmallNet has no equalizable pair (residual add): only fold-bn changed it
    assert [(i.requirement, i.pass_.name) for i in res.inserted] == [("bn-folded", "fold-bn")]
    assert res.inserted[0].result.metrics["folded"] == 2 and _bn_count(g) == 0
    got = run(g, x)
    assert max(max_rel_err(ref[k], got[k]) for k in ref) <= 1e-5    # fold-bn + equalize: both exact


def test_fold_bn_option_off_means_no_requirement(small_onnx):
    g = from_onnx(small_onnx)
    res = get_pass("equalize")(fold_bn=False)(g, PassContext())
    assert res.inserted == [] and _bn_count(g) == 2


def test_missing_calibration_data_is_a_named_error(small_onnx):
    g = from_onnx(small_onnx)
    before = len(g.nodes)
    for spec in ("quantize", "bias-correction"):
        with pytest.raises(MissingCalibrationDataError, match=f"pass '{spec}' needs calibration data"):
            PassManager(parse_pipeline(spec)).run(g, PassContext())
    assert len(g.nodes) == before  # refused before anything ran (no fold-bn either)


def test_opset_raise_inserted_or_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w]),
        opset_imports=[helper.make_opsetid("", 11)])
    path = tmp_path / "op11.onnx"
    onnx.save(m, str(path))
    calib = {"x": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    with pytest.raises(RequirementError, match="needs opset >= 13; raising the opset is not allowed"):
        PassManager(parse_pipeline("quantize")).run(from_onnx(path), PassContext(calib_data=calib,
                                                                             allow_opset_raise=False))
    g = from_onnx(path)
    res = PassManager(parse_pipeline("quantize")).run(g, PassContext(calib_data=calib))
    first = res.report["passes"][0]
    assert first["name"] == "raise-opset" and first["requirement"] == "opset>=13" and g.opset == 13
    assert first["metrics"] == {"opset_before": 11, "opset_after": 13}


def test_unknown_requirement_and_bad_return_are_named():
    @dataclass
    class _Opts:
        pass

    class Wants(Pass):
        name = "wants-magic"
        requires = frozenset({"magic"})
        Options = _Opts

        def run(self, graph, ctx):
            return PassResult()

    class ReturnsBool(Pass):
        name = "returns-bool"
        Options = _Opts

        def run(self, graph, ctx):
            return True

    from nnsculpt.ir import Graph

    with pytest.raises(RequirementError, match="pass 'wants-magic': unknown requirement 'magic'"):
        Wants()(Graph())
    with pytest.raises(TypeError, match="pass 'returns-bool'.*returned bool, not a PassResult"):
        ReturnsBool()(Graph())
    with pytest.raises(RequirementError, match="integer"):
        parse_requirement("opset>=thirteen")


def test_every_declared_requirement_is_known_and_enablers_guarantee_theirs():
    for cls in list_passes():
        for r in cls.requires:
            parse_requirement(r)
    assert "bn-folded" in get_pass("fold-bn").guarantees and "opset" in get_pass("raise-opset").guarantees


def test_holds(small_onnx):
    g = from_onnx(small_onnx)
    ctx = PassContext()
    assert not holds("bn-folded", g, ctx) and holds("opset>=13", g, ctx) and not holds("opset>=14", g, ctx)
    assert not holds("calib-data", g, ctx) and holds("calib-data", g, PassContext(calib_data={"input": np.zeros(1)}))


# every built-in pass, with what it needs to run on SmallNet
STATELESS = ["dce", "fold-constants", "fold-bn", "eliminate-identity", "canonicalize", "raise-opset{opset=17}",
             "fuse-layernorm", "fuse-gelu", "svd-linear{rank_ratio=0.5}", "factorize-conv{rank=2}",
             "spatial-svd{rank_ratio=0.5}", "tucker-conv{energy=0.9}",
             "equalize", "bias-correction", "prune-channels{ratio=0.25}", "prune-weights{sparsity=0.5}",
             "quantize{calibration=kl}", "quantize{mode=dynamic}", "quantize{budget=0.001}"]


@pytest.mark.parametrize("spec", STATELESS)
def test_pass_objects_keep_no_state_between_runs(small_onnx, spec):
    """Running a pass object twice on fresh graphs gives the same result and leaves the object
    as it was: everything a run finds goes into its PassResult."""
    (p,) = parse_pipeline(spec)
    before = copy.deepcopy({k: v for k, v in vars(p).items() if k != "metric"})
    outs = []
    for _ in range(2):
        g = from_onnx(small_onnx)
        calib = make_inputs(g, batch=16, seed=0)
        res = p(g, PassContext(calib_data=calib))
        outs.append((res.changed, res.notes, repr(res.artifacts), repr(res.metrics)))
    after = {k: v for k, v in vars(p).items() if k != "metric"}
    assert repr(after) == repr(before)
    assert outs[0] == outs[1]
