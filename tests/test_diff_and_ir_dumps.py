"""`nnsculpt diff` (structural + numeric diff of two models) and the IR dumps of
--print-ir-after-change / --print-ir-after PASS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnsculpt.cli import main as cli_main
from nnsculpt.diff import diff_models, format_text
from nnsculpt.passes import PassContext, parse_pipeline
from nnsculpt.runtime.loading import load_graph


def _apply(g, spec, ctx=None):
    for p in parse_pipeline(spec):
        p(g, ctx or PassContext())
    return g


def test_identical_models_diff_to_nothing():
    a = load_graph("zoo:digits_resnet")
    d = diff_models(a, a.copy())
    assert d["matched"] == len(a.nodes) and not d["changed"] and not d["added"] and not d["removed"]
    assert d["outputs"]["logits"]["max_abs"] == 0.0
    assert all(r["rel_l2"] == 0.0 for r in d["layers"]) and len(d["layers"]) > 10


def test_fold_bn_diff_names_what_changed():
    a = load_graph("zoo:digits_resnet")
    b = _apply(a.copy(), "fold-bn")
    d = diff_models(a, b)
    assert {r["op"] for r in d["removed"]} == {"BatchNormalization"} and len(d["removed"]) == 9
    assert not d["added"]
    assert {r["a"] for r in d["changed"]} >= {"layer1.0.conv1", "conv1"}
    assert d["op_histogram_delta"] == {"BatchNormalization": [9, 0]}
    assert d["outputs"]["logits"]["max_rel"] < 1e-5
    text = format_text(d)
    assert "9 removed" in text and "BatchNormalization 9->0" in text


def test_lossy_diff_per_layer_drift_grows_with_depth():
    """4-bit clustering: the per-layer drift is measured on matched layers and is larger at the last
    block than at the first (errors accumulate); the output drift equals compare's."""
    a = _apply(load_graph("zoo:digits_resnet"), "fold-bn")
    b = _apply(a.copy(), "cluster-weights{bits=4}")
    from nnsculpt.models.data import load_digits_dataset

    X, _ = load_digits_dataset(16, "test")
    d = diff_models(a, b, inputs={"input": X[:64]})
    rel = {r["a"]: r["rel_l2"] for r in d["layers"]}
    assert 0 < rel["layer1.0.conv1"] < rel["layer3.0.conv2"]
    assert len(d["added"]) == 42 and all(r["op"] in ("Cast", "Reshape", "Div", "Mod", "Gather") for r in d["added"])
    from nnsculpt.runtime import run
    from nnsculpt.runtime.ort import compare_outputs

    ref = compare_outputs(run(a, {"input": X[:64]}), run(b, {"input": X[:64]}))
    assert d["outputs"]["logits"]["max_abs"] == pytest.approx(ref["logits"]["max_abs"])


def test_diff_cli_text_json_html(tmp_path, capsys):
    a = tmp_path / "a.onnx"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn", "-o", str(a)]) == 0
    capsys.readouterr()
    page = tmp_path / "d.html"
    assert cli_main(["diff", "zoo:digits_resnet", str(a), "-o", str(page)]) == 0
    out = capsys.readouterr().out
    assert "9 removed" in out and page.exists()
    html = page.read_text()
    assert "<script src" not in html and "http" not in html.split("<body>")[1][:200]
    assert "BatchNormalization" in html and "diff_sub" in html
    assert cli_main(["diff", "zoo:digits_resnet", str(a), "--json", "--no-numerics"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert len(j["removed"]) == 9 and "outputs" not in j
    bad = tmp_path / "d.txt"
    assert cli_main(["diff", "zoo:digits_resnet", str(a), "-o", str(bad)]) == 2 and not bad.exists()
    assert cli_main(["diff", "zoo:digits_resnet", str(tmp_path / "missing.onnx")]) == 2


def test_print_ir_after_change_dumps_only_changed_passes(tmp_path, capsys):
    rep = tmp_path / "rep"
    # dce and canonicalize change nothing on this graph; fold-bn does
    rc = cli_main(["compile", "zoo:digits_resnet", "-p", "dce,fold-bn,canonicalize", "-o", str(tmp_path / "o.onnx"),
                   "--report", str(rep), "--print-ir-after-change"])
    assert rc == 0
    files = sorted(p.name for p in (rep / "ir").iterdir())
    report = json.loads((rep / "report.json").read_text())
    changed = [i + 1 for i, e in enumerate(report["passes"]) if e["changed"]]
    assert files == ["00-input.ir.txt"] + [f"{i:02d}-{report['passes'][i - 1]['name']}.ir.txt" for i in changed]
    assert "02-fold-bn.ir.txt" in files and "01-dce.ir.txt" not in files
    err = capsys.readouterr().err
    assert "IR after fold-bn" in err and "IR after dce" not in err


def test_print_ir_after_one_pass(tmp_path, capsys):
    rep = tmp_path / "rep"
    rc = cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn,dce", "-o", str(tmp_path / "o.onnx"),
                   "--report", str(rep), "--print-ir-after", "dce"])
    assert rc == 0
    assert sorted(p.name for p in (rep / "ir").iterdir()) == ["02-dce.ir.txt"]
    capsys.readouterr()
    rc = cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn", "-o", str(tmp_path / "p.onnx"),
                   "--print-ir-after", "quantize"])
    assert rc == 2 and not (tmp_path / "p.onnx").exists()
    assert "--print-ir-after quantize" in capsys.readouterr().err
