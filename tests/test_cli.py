"""The CLI as a user runs it: every command, named errors, no half-written output."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from nnsculpt.cli import main


def cli(*args: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "nnsculpt.cli", *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_help_lists_commands():
    rc, out, _ = cli("--help")
    assert rc == 0
    for c in ("inspect", "compile", "compare", "bench", "distill", "passes"):
        assert c in out


def test_inspect(small_onnx, capsys):
    assert main(["inspect", str(small_onnx)]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "FLOPs" in out and "BatchNormalization" in out and "input: float32 [N,3,16,16]" in out
    assert main(["inspect", str(small_onnx), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] > 0 and data["layers"][0]["op_type"] == "Conv"


def test_compile_report_and_determinism(small_onnx, tmp_path, capsys):
    out1, out2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    args = ["compile", str(small_onnx), "-p", "fold-bn,canonicalize,eliminate-identity,dce"]
    assert main(args + ["-o", str(out1), "--report", str(tmp_path / "rep"), "--verify", "--print-ir-after-all"]) == 0
    assert main(args + ["-o", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [p["name"] for p in rep["passes"]] == ["fold-bn", "canonicalize", "eliminate-identity", "dce"]
    assert rep["numerics"]["max_rel"] <= 1e-5
    assert (tmp_path / "rep" / "ir" / "01-fold-bn.ir.txt").exists()
    m = onnx.load(str(out1))
    onnx.checker.check_model(m)
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert [o.name for o in m.graph.output] == ["logits"]


def test_compile_from_recipe(small_onnx, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-bn"\n[[pass]]\nname = "dce"\nremove_unused_initializers = false\n')
    out = tmp_path / "o.onnx"
    assert main(["compile", str(small_onnx), "-p", str(recipe), "-o", str(out), "--report", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    # the recipe's passes ran in order, with the recipe's option, and the output says so
    lines = [ln for ln in printed.splitlines() if ln.startswith("pass ")]
    assert [ln.split()[1] for ln in lines] == ["fold-bn", "dce"]
    assert "changed" in lines[0] and f"wrote     {out}" in printed
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["pipeline"] == "fold-bn{fold_gemm=true,fold_matmul=true},dce{remove_unused_initializers=false,keep_custom_domains=false}"
    assert rep["passes"][1]["options"]["remove_unused_initializers"] is False
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    # the same pipeline as a string gives the same bytes
    out2 = tmp_path / "o2.onnx"
    assert main(["compile", str(small_onnx), "-p", "fold-bn,dce{remove_unused_initializers=false}", "-o", str(out2)]) == 0
    assert out.read_bytes() == out2.read_bytes()


def test_compare_and_bench(small_onnx, tmp_path, capsys):
    folded = tmp_path / "f.onnx"
    assert main(["compile", str(small_onnx), "-p", "fold-bn,dce", "-o", str(folded)]) == 0
    capsys.readouterr()
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input=x, labels=np.zeros(4))
    assert main(["compare", str(small_onnx), str(folded), "--inputs", str(tmp_path / "in.npz"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["logits"]["max_rel"] <= 1e-5 and res["logits"]["top1_agreement"] == 1.0
    assert main(["bench", str(small_onnx), str(folded), "--runs", "5", "--warmup", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 2 and all(r["median_ms"] > 0 and r["bytes"] > 0 for r in res)
    assert res[0]["model"].endswith("small.onnx") and res[1]["model"].endswith("f.onnx")
    assert res[1]["bytes"] == folded.stat().st_size and res[0]["bytes"] == small_onnx.stat().st_size
    # the table form: one row per model, the first is the 1.00x baseline, speedup = base / model
    assert main(["bench", str(small_onnx), str(folded), "--runs", "5", "--warmup", "1"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip().endswith(tuple("0123456789"))
            and (".onnx" in ln)]
    assert len(rows) == 2, rows
    assert rows[0][-2] == "1.00x"
    med = [float(r[1]) for r in rows]
    # printed medians have 3 decimals: allow for their rounding (~0.0005 ms each)
    ratio = med[0] / med[1]
    slack = ratio * (0.0005 / med[0] + 0.0005 / med[1]) + 0.01
    assert abs(float(rows[1][-2].rstrip("x")) - ratio) <= slack
    assert int(rows[1][-1].replace(",", "")) == folded.stat().st_size


def test_passes_command(capsys):
    from nnsculpt.passes import list_passes

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for cls in list_passes():  # every pass: its header line, then each option with type and default
        head = f"{cls.name}  [{'exact' if cls.exact else 'lossy'}]  {cls.summary()}"
        assert head in lines, head
        for name, tname, default in cls.option_specs():
            assert f"    {name}: {tname} = {default!r}" in lines, (cls.name, name)
    assert ("    requires: bn-folded, calib-data, gelu-fused, layernorm-fused, opset>=13, shapes "
            "(with default options)") in lines
    assert main(["passes", "--docs"]) == 0
    assert "Rewrite rules" in capsys.readouterr().out


def _assert_error(rc, err, *needles):
    assert rc == 2
    line = err.strip().splitlines()
    assert len(line) == 1, err
    assert line[0].startswith("nnsculpt: error: ")
    for n in needles:
        assert n in line[0], line[0]


def test_bad_inputs_named_errors_and_no_output(small_onnx, tmp_path):
    out = tmp_path / "out.onnx"
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(small_onnx.read_bytes()[:300])
    text = tmp_path / "notes.onnx"
    text.write_text("hello, I am not a model\n")
    np.savez(tmp_path / "wrong.npz", image=np.zeros((2, 3, 16, 16), np.float32))
    cases = [
        (["compile", str(trunc), "-p", "dce", "-o", str(out)], ("ModelLoadError", "trunc.onnx")),
        (["compile", str(text), "-p", "dce", "-o", str(out)], ("ModelLoadError", "notes.onnx")),
        (["compile", str(small_onnx), "-p", "dce,fold-bm", "-o", str(out)], ("UnknownPassError", "fold-bm")),
        (["compile", str(small_onnx), "-p", "fold-constants{max_elements=lots}", "-o", str(out)],
         ("PassOptionError", "max_elements")),
        (["compile", str(small_onnx), "-p", "dce", "-o", str(out), "--calib-data", str(tmp_path / "wrong.npz")],
         ("InputDataError", "missing input 'input'", "wrong.npz")),
        (["compare", str(small_onnx), str(small_onnx), "--inputs", str(tmp_path / "wrong.npz")],
         ("InputDataError", "missing input 'input'")),
        (["inspect", str(tmp_path / "nope.onnx")], ("ModelLoadError", "no such file")),
        (["inspect", "zoo:nope"], ("ModelLoadError", "unknown zoo model 'nope'")),
    ]
    for args, needles in cases:
        rc, _, err = cli(*args)
        _assert_error(rc, err, *needles)
        assert not out.exists()
        assert not list(tmp_path.glob(".out.onnx.tmp*"))


def test_zoo_compile_main_job(tmp_path):
    """The README's main job, on the bundled trained checkpoint, then compare on held-out data."""
    from nnsculpt.models.data import main as data_main

    calib, test = tmp_path / "calib.npz", tmp_path / "test.npz"
    assert data_main([str(calib), "--split", "train", "-n", "256"]) == 0
    assert data_main([str(test)]) == 0
    out = tmp_path / "digits_int8.onnx"
    rc, stdout, err = cli("compile", "zoo:digits_resnet", "-p", "fold-bn,equalize,quantize{calibration=mse}",
                          "--calib-data", str(calib), "-o", str(out), "--report", str(tmp_path / "rep"), "--verify")
    assert rc == 0, err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["frontend"] == "torch.fx"
    assert [p["exact"] for p in rep["passes"]] == [True, True, False]
    assert rep["passes"][1]["drift_vs_previous"]["max_rel"] <= 1e-5  # equalize is exact
    assert rep["numerics"]["max_rel"] <= 0.1  # int8 drift, bounded
    assert rep["summary"]["model_bytes"]["ratio"] < 0.5
    rc, stdout, err = cli("compare", "zoo:digits_resnet", str(out), "--inputs", str(test))
    assert rc == 0, err
    line = next(ln for ln in stdout.splitlines() if ln.startswith("top-1 vs labels"))
    acc_a, acc_b = float(line.split()[4]), float(line.split()[6])
    assert acc_a >= 0.95 and acc_a - acc_b <= 0.01  # int8 within 1 point of fp32 on real data
    assert rep["warnings"] == []  # int8 keeps top-1: no drift warning
    assert "warning" not in err


def test_drift_guard_warns_and_can_refuse(tmp_path):
    """Never a silently broken model: 95 % unstructured sparsity wrecks digits_resnet's top-1;
    compile says so on stderr and in report.json, and --fail-on-drift refuses to write it."""
    from nnsculpt.models.data import main as data_main

    calib = tmp_path / "calib.npz"
    assert data_main([str(calib), "--split", "val", "-n", "64"]) == 0
    out = tmp_path / "broken.onnx"
    args = ["compile", "zoo:digits_resnet", "-p", "prune-weights{sparsity=0.95}", "--calib-data", str(calib)]
    rc, stdout, err = cli(*args, "-o", str(out), "--report", str(tmp_path / "rep"))
    assert rc == 0 and out.exists(), err
    assert "nnsculpt: warning: after pass 'prune-weights': top-1 agreement with the input model" in err
    assert "-- a lower sparsity, or recover with `nnsculpt distill" in err      # what to try, on the same line
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rep["warnings"]) == 1 and rep["passes"][0]["warning"] == rep["warnings"][0]
    top1 = rep["passes"][0]["drift_vs_input"]["top1_agreement"]
    assert top1 < 0.98 and rep["numerics"]["inputs"] == {"input": [32, 1, 16, 16]}
    out2 = tmp_path / "refused.onnx"
    rc, _, err = cli(*args, "-o", str(out2), "--fail-on-drift")
    _assert_error(rc, err, "DriftError", "prune-weights", "top-1 agreement")
    assert not out2.exists()
    # a mild, harmless sparsity passes the guard silently
    rc, _, err = cli("compile", "zoo:digits_resnet", "-p", "prune-weights{sparsity=0.1}", "--calib-data", str(calib),
                     "-o", str(tmp_path / "ok.onnx"), "--fail-on-drift")
    assert rc == 0 and "warning" not in err, err


def _reflect_pad_model(path):
    """x [N, W] -> reflect Pad by 40 -> MatMul: ORT refuses W <= 40 (the generated inputs have W = 32)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1, 1)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 40, 0, 40], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"),
             helper.make_node("Unsqueeze", ["p", "ax"], ["u"], name="unsq"),
             helper.make_node("MatMul", ["u", "w"], ["y"], name="mm")]
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")
    g = helper.make_graph(nodes, "reflect", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, pads, ax])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_drift_check_names_inputs_the_model_refuses_and_takes_held_out_inputs(tmp_path, capsys):
    m = tmp_path / "reflect.onnx"
    _reflect_pad_model(m)
    out = tmp_path / "q.onnx"
    # no data: the check runs on generated inputs that ORT refuses -> a named error, no file, no traceback
    assert main(["compile", str(m), "-p", "quantize{mode=dynamic,ops=[MatMul]}", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "InputDataError" in err and "drift check cannot run the input model on inputs generated" in err
    assert "--no-check" in err and "Traceback" not in err and not out.exists()
    # held-out inputs for the check: it runs on them, and says so in the report
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "held.npz", x=rng.standard_normal((5, 64)).astype(np.float32))
    assert main(["compile", str(m), "-p", "quantize{mode=dynamic,ops=[MatMul]}", "-o", str(out),
                 "--inputs", str(tmp_path / "held.npz"), "--report", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["numerics"]["inputs"] == {"x": [5, 64]} and out.exists()
