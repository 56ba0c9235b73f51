"""The low-rank passes' ``min_speedup`` (rewrites kept only where ORT runs them faster on this
machine; timings cached on disk) and ``rank=auto`` (ranks under a ``budget`` / ``target`` from
per-layer sensitivity curves on calibration data).

Timing-based decisions are machine-dependent: these tests never assume which layers are faster.
They use ``min_speedup=1000`` (nothing is that fast), ``min_speedup=0`` (everything is) or check
that whatever was applied agrees with the recorded timings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from nnsculpt.ir.analysis import node_costs
from nnsculpt.ir.errors import MissingCalibrationDataError, PassOptionError
from nnsculpt.ir.onnx_io import to_onnx_model
from nnsculpt.models.data import load_digits_dataset
from nnsculpt.passes import PassContext, parse_pipeline
from nnsculpt.runtime import layer_timing, run
from nnsculpt.runtime.metrics import metric_error

from .test_lowrank import ALL_PASSES, apply, digits, onnx_graph, tinfo

#: a rank every pass can apply to digits_resnet's layers (conv1 3->16 is "not smaller" for some)
RANK = {"svd-linear": "rank=2", "factorize-conv": "rank=1", "spatial-svd": "rank=4", "tucker-conv": "rank=4"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NNSCULPT_CACHE_DIR", str(d))
    return d


def calib(n: int = 64):
    X, _ = load_digits_dataset(16, "train")
    return {"input": X[:n]}


# ======================================================================== min_speedup
@pytest.mark.parametrize("name", ALL_PASSES)
def test_min_speedup_unreachable_rewrites_nothing_and_says_why(name):
    g = digits()
    before = to_onnx_model(g).SerializeToString()
    res = apply(g, f"{name}{{{RANK[name]},min_speedup=1000}}")
    assert res.metrics["factored"] == 0
    timed = [(k, e) for k, e in res.artifacts["layers"].items() if e["decision"] != "skipped: not smaller"]
    assert timed
    for k, e in timed:
        assert not e["applied"] and e["dense_ms"] > 0 and e["factored_ms"] > 0
        assert e["speedup"] == pytest.approx(e["dense_ms"] / e["factored_ms"], rel=1e-3)
        assert e["decision"].startswith("skipped: slower (x") or e["decision"].startswith("skipped: not fast enough")
        assert any(k in n and "min_speedup=1000" in n and "ms in ORT" in n for n in res.notes), k
    # fold-bn (inserted) is the only change
    g2 = digits()
    apply(g2, "fold-bn")
    assert to_onnx_model(g).SerializeToString() == to_onnx_model(g2).SerializeToString() != before


@pytest.mark.parametrize("name", ALL_PASSES)
def test_min_speedup_zero_rewrites_what_the_untimed_pass_rewrites(name):
    g0 = digits()
    plain = apply(g0, f"{name}{{{RANK[name]}}}")
    g1 = digits()
    res = apply(g1, f"{name}{{{RANK[name]},min_speedup=0}}")
    assert res.metrics == plain.metrics and res.metrics["factored"] > 0
    assert to_onnx_model(g1).SerializeToString() == to_onnx_model(g0).SerializeToString()
    for e in res.artifacts["layers"].values():
        assert e["decision"] in ("applied", "skipped: not smaller")
        if e["applied"]:
            assert e["dense_ms"] > 0 and e["factored_ms"] > 0 and "speedup" in e


def test_min_speedup_applies_exactly_the_layers_fast_enough():
    """Whatever this machine measures, a layer is rewritten iff its recorded speedup >= 1."""
    g = digits()
    res = apply(g, "spatial-svd{rank=8,min_speedup=1.0}")
    names = {n.name for n in g.nodes}
    for k, e in res.artifacts["layers"].items():
        if "speedup" not in e:
            continue
        assert e["applied"] == (e["speedup"] >= 1.0), (k, e)
        assert (f"{k}/vert" in names) == e["applied"]


def test_timings_are_cached_and_a_second_run_does_not_time(cache_dir, monkeypatch):
    res1 = apply(digits(), "factorize-conv{rank=2,min_speedup=1.0}")
    f = cache_dir / layer_timing.CACHE_FILE
    data = json.loads(f.read_text())
    assert data and all(set(v) >= {"ms", "ops", "ort", "threads", "machine"} for v in data.values())
    assert {v["ops"] for v in data.values()} == {"Conv", "Conv+Conv"}
    assert not [p for p in cache_dir.iterdir() if p.name != layer_timing.CACHE_FILE]  # no temp files left

    def boom(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(layer_timing, "_measure", boom)
    g = digits()
    res2 = apply(g, "factorize-conv{rank=2,min_speedup=1.0}")
    for k, e in res2.artifacts["layers"].items():
        e1 = res1.artifacts["layers"][k]
        assert e["timing_cached"] and e["dense_ms"] == e1["dense_ms"] and e["applied"] == e1["applied"]
    # another thread count is another signature: timed again
    with pytest.raises(AssertionError, match="timed again"):
        apply(digits(), "factorize-conv{rank=2,min_speedup=1.0,threads=2}")


def test_cache_dir_resolution_and_signature(monkeypatch, tmp_path):
    monkeypatch.setenv("NNSCULPT_CACHE_DIR", str(tmp_path / "a"))
    assert layer_timing.cache_path() == tmp_path / "a" / "layer_timings.json"
    monkeypatch.delenv("NNSCULPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert layer_timing.cache_dir() == tmp_path / "xdg" / "nnsculpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert layer_timing.cache_dir() == tmp_path / "home" / ".cache" / "nnsculpt"
    rng = np.random.default_rng(0)

    def conv(w, name="c", shape=(1, 4, 8, 8)):
        return onnx_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name=name)],
                          [tinfo("x", list(shape))], [tinfo("y", None)], {"w": w})

    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    sig = layer_timing.signature(conv(w), 1)
    assert sig == layer_timing.signature(conv(-w, name="other"), 1)          # values and names do not count
    assert sig != layer_timing.signature(conv(w), 2)                          # threads do
    assert sig != layer_timing.signature(conv(w, shape=(2, 4, 8, 8)), 1)      # shapes do
    assert sig["ort"] and sig["machine"]
    out = layer_timing.time_graphs([conv(w), conv(w)], cache=False, repeats=2)
    assert out[0]["ms"] > 0 and out[1] == out[0] and not (tmp_path / "home" / ".cache").exists()


def test_symbolic_shapes_are_timed_at_the_calibration_shape():
    rng = np.random.default_rng(0)
    g = onnx_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                   [tinfo("x", ["N", 8, "H", "W"])], [tinfo("y", None)],
                   {"w": rng.standard_normal((16, 8, 3, 3)).astype(np.float32)})
    res = apply(g.copy(), "spatial-svd{rank=2,min_speedup=0}")
    e = res.artifacts["layers"]["conv"]
    assert not e["applied"] and "cannot time" in e["decision"] and any("cannot time" in n for n in res.notes)
    x = {"x": rng.standard_normal((3, 8, 12, 10)).astype(np.float32)}
    res = apply(g, "spatial-svd{rank=2,min_speedup=0,bench_batch=2}", PassContext(calib_data=x))
    assert res.artifacts["layers"]["conv"]["applied"]
    sig_shapes = [v["input"] for v in json.loads(layer_timing.cache_path().read_text()).values()]
    assert [[[2, 8, 12, 10], "float32"]] in sig_shapes


# ========================================================================== rank=auto
def _remeasure(g0, g, data, metric):
    return metric_error(metric, run(g0, data), run(g, data))


@pytest.mark.parametrize("name,spec,metric", [
    ("spatial-svd", "budget=0.2", "rel_l2"),
    ("tucker-conv", "rank=auto,budget=0.03,metric=top1", "top1"),
    ("factorize-conv", "budget=0.02,metric=cosine", "cosine"),
])
def test_auto_budget_is_met_on_a_remeasurement(name, spec, metric):
    data = calib(64)
    g0 = digits()
    g = digits()
    res = apply(g, f"{name}{{{spec}}}", PassContext(calib_data=data))
    a = res.artifacts["auto"]
    got = _remeasure(g0, g, data, metric)
    assert got <= a["budget"] + 1e-9
    assert got == pytest.approx(a["measured_error"], abs=1e-6) and res.metrics["error"] == a["measured_error"]
    assert res.metrics["factored"] >= 1 and res.metrics["params_after"] < res.metrics["params_before"]
    assert a["metric"] == metric and a["samples"] == 64 and a["evaluations"] > len(a["curves"])
    # curves: every layer, each candidate rank with its error, plus the dense point
    layers = res.artifacts["layers"]
    assert set(a["curves"]) == set(layers)
    for k, curve in a["curves"].items():
        assert len(curve) >= 3 and curve[-1]["rank"] == "dense" and curve[-1]["error"] == 0.0
        assert all(c["params"] < curve[-1]["params"] for c in curve[:-1])
        chosen = a["chosen"][k]
        assert (chosen == "dense") == (not layers[k]["applied"])
        if chosen != "dense":
            assert layers[k]["rank"] == chosen and chosen in [c["rank"] for c in curve]
    assert "predicted_error" in a and any("measured" in p for p in a["path"][1:])


def test_auto_budget_zero_keeps_everything_dense():
    g = digits()
    res = apply(g, "factorize-conv{budget=0}", PassContext(calib_data=calib(16)))
    assert res.metrics["factored"] == 0 and all(e["decision"] == "kept dense by the rank search"
                                                for e in res.artifacts["layers"].values())


@pytest.mark.parametrize("name,frac", [("tucker-conv", 0.5), ("spatial-svd", 0.3), ("svd-linear", 0.6)])
def test_auto_target_params_is_met(name, frac):
    data = calib(32)
    g = digits()
    res = apply(g, f"{name}{{target=params:{frac}}}", PassContext(calib_data=data))
    m, a = res.metrics, res.artifacts["auto"]
    assert m["params_after"] <= frac * m["params_before"]
    assert a["params_fraction"] == pytest.approx(m["params_after"] / m["params_before"])
    # the least error on the greedy path: the step before it did not meet the target
    assert a["path"][a["step"] - 1]["params_fraction"] > frac
    assert a["measured_error"] == pytest.approx(_remeasure(digits(), g, data, "rel_l2"), abs=1e-6)


def test_auto_target_flops_counts_macs():
    data = calib(16)
    g0 = digits()
    g = digits()
    res = apply(g, "factorize-conv{target=flops:0.5}", PassContext(calib_data=data))
    a = res.artifacts["auto"]
    assert a["macs_fraction"] <= 0.5
    apply(g0, "fold-bn")
    dense = {c.name: c.macs for c in node_costs(g0)}
    layer_macs = sum(dense[k] for k in res.artifacts["layers"])
    after = {c.name: c.macs for c in node_costs(g)}
    new = sum(v for k, v in after.items() if k not in dense) + sum(
        dense[k] for k, e in res.artifacts["layers"].items() if not e["applied"])
    assert new <= 0.5 * layer_macs


def test_auto_with_min_speedup_only_uses_fast_enough_ranks():
    g = digits()
    res = apply(g, "spatial-svd{target=params:0.9,min_speedup=1.0}", PassContext(calib_data=calib(16)))
    for k, e in res.artifacts["layers"].items():
        if e["applied"]:
            assert e["speedup"] >= 1.0
    for curve in res.artifacts["auto"]["curves"].values():
        assert curve[-1]["rank"] == "dense"


def test_auto_errors_are_named():
    with pytest.raises(PassOptionError, match=r"rank=auto needs option 'budget'"):
        parse_pipeline("spatial-svd{rank=auto}")
    with pytest.raises(PassOptionError, match=r"'budget' chooses the ranks .* excludes 'rank'"):
        parse_pipeline("spatial-svd{rank=2,budget=0.1}")
    with pytest.raises(PassOptionError, match=r"option 'target' has bad value 'params:2'"):
        parse_pipeline("tucker-conv{target=params:2}")
    with pytest.raises(PassOptionError, match=r"option 'target' has bad value 'latency:0.5'"):
        parse_pipeline("tucker-conv{target=latency:0.5}")
    with pytest.raises(PassOptionError, match=r"option 'metric': unknown metric 'acc'"):
        parse_pipeline("svd-linear{budget=0.1,metric=acc}")
    with pytest.raises(PassOptionError, match=r"'min_speedup'"):
        parse_pipeline("svd-linear{rank=2,min_speedup=-1}")
    (p,) = parse_pipeline("factorize-conv{budget=0.1}")
    assert "calib-data" in p.requirements()
    with pytest.raises(MissingCalibrationDataError, match="factorize-conv"):
        p(digits())
    with pytest.raises(PassOptionError, match=r"target' 'params:0.05' cannot be met: .* keep 0\.\d+ of their dense "
                                              r"params \(the closest reached\)"):
        apply(digits(), "factorize-conv{target=params:0.05}", PassContext(calib_data=calib(8)))
    with pytest.raises(PassOptionError, match=r"'target' 'params:0.3' and 'budget' 0.001 cannot both be met: at the "
                                              r"target the measured rel_l2 is"):
        apply(digits(), "spatial-svd{target=params:0.3,budget=0.001}", PassContext(calib_data=calib(8)))
