"""Pass infrastructure: registry, pipeline strings, recipes, option typing, PassManager."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

from nnsculpt.ir import from_onnx, print_graph
from nnsculpt.ir.errors import NumericsError, PassOptionError, PipelineError, UnknownPassError
from nnsculpt.passes import PassContext, PassManager, format_pipeline, get_pass, list_passes, load_recipe, parse_pipeline
from nnsculpt.passes.base import Pass, PassResult


class _Opts(Pass):
    """Test-only pass with every option type."""

    name = "test-opts"

    @dataclass
    class Options:
        ratio: float = 0.5
        steps: int = 1
        flag: bool = False
        mode: Literal["l1", "l2"] = "l2"
        protect: list[str] = None
        label: str = ""

    def run(self, graph, ctx):
        return PassResult(changed=False)


def test_builtin_passes_registered():
    names = {p.name for p in list_passes()}
    assert {"dce", "fold-constants", "fold-bn", "eliminate-identity", "canonicalize"} <= names
    for p in list_passes():
        assert p.summary(), f"pass {p.name} has no docstring summary"


def test_parse_pipeline_names_and_options():
    passes = parse_pipeline("fold-bn, dce ,canonicalize{}")
    assert [p.name for p in passes] == ["fold-bn", "dce", "canonicalize"]


def test_option_typing():
    p = _Opts(ratio="0.25", steps="3", flag="true", mode="l1", protect="[fc,conv1]", label='"x y"')
    assert p.options.ratio == 0.25 and p.options.steps == 3 and p.options.flag is True
    assert p.options.mode == "l1" and p.options.protect == ["fc", "conv1"] and p.options.label == "x y"
    assert "protect=[fc,conv1]" in p.describe()


@pytest.mark.parametrize("opts,msg", [
    ({"ratio": "half"}, "option 'ratio' has bad value 'half'"),
    ({"steps": "1.5"}, "an integer"),
    ({"flag": "maybe"}, "true or false"),
    ({"mode": "l3"}, "one of l1, l2"),
    ({"nope": "1"}, "unknown option 'nope'"),
    ({"ratio": "nan"}, "finite"),
])
def test_bad_options_named(opts, msg):
    with pytest.raises(PassOptionError, match="test-opts") as e:
        _Opts(**opts)
    assert msg in str(e.value)


def test_unknown_pass_suggests():
    with pytest.raises(UnknownPassError, match="unknown pass 'fold-bm'.*did you mean 'fold-bn'"):
        parse_pipeline("fold-bm,dce")


@pytest.mark.parametrize("text", ["", "dce,,fold-bn", "dce{", "dce{x}", "dce}", "fold bn"])
def test_malformed_pipelines(text):
    with pytest.raises(PipelineError):
        parse_pipeline(text)


def test_bad_option_for_real_pass():
    with pytest.raises(PassOptionError, match="pass 'dce': unknown option 'ratio'"):
        parse_pipeline("dce{ratio=0.5}")


def test_recipe_forms(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text('pipeline = "fold-bn,dce"\n')
    b = tmp_path / "b.toml"
    b.write_text('[[pass]]\nname = "fold-bn"\n\n[[pass]]\nname = "dce"\n')
    assert format_pipeline(load_recipe(a)) == format_pipeline(load_recipe(b)) == format_pipeline(parse_pipeline("fold-bn,dce"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[pass]\nname=")
    with pytest.raises(PipelineError, match="not a valid TOML"):
        load_recipe(bad)
    with pytest.raises(PipelineError, match="no such recipe"):
        load_recipe(tmp_path / "missing.toml")


def test_pass_manager_report_and_dumps(small_onnx, tmp_path):
    g = from_onnx(small_onnx)
    res = PassManager(parse_pipeline("fold-bn,dce"), verify=True, check_numerics=True,
                      dump_dir=tmp_path / "ir").run(g)
    rep = res.report
    assert [e["name"] for e in rep["passes"]] == ["fold-bn", "dce"]
    fb = rep["passes"][0]
    assert fb["changed"] and fb["before"]["nodes"] > fb["after"]["nodes"]
    assert fb["drift_vs_previous"]["max_rel"] <= 1e-5
    assert rep["summary"]["nodes"]["after"] < rep["summary"]["nodes"]["before"]
    assert rep["after"]["op_histogram"].get("BatchNormalization", 0) == 0
    assert rep["summary"]["flops"]["after"] <= rep["summary"]["flops"]["before"]
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps == ["00-input.ir.txt", "01-fold-bn.ir.txt", "02-dce.ir.txt"]
    assert "= BatchNormalization(" in (tmp_path / "ir" / "00-input.ir.txt").read_text()
    assert "= BatchNormalization(" not in (tmp_path / "ir" / "01-fold-bn.ir.txt").read_text()
    p = res.write_report(tmp_path / "rep")
    assert json.loads(p.read_text())["pipeline"].startswith("fold-bn")


class _Breaker(Pass):
    """Test-only 'exact' pass that is not exact (scales a weight)."""

    name = "test-breaker"

    @dataclass
    class Options:
        pass

    def run(self, graph, ctx):
        w = next(v for v in graph.initializers.values() if v.const.ndim == 4)
        w.set_const(w.const * 1.5)
        return PassResult(changed=True)


def test_numerics_check_catches_non_exact_pass(small_onnx):
    g = from_onnx(small_onnx)
    with pytest.raises(NumericsError, match="exact pass 'test-breaker'"):
        PassManager([_Breaker()], check_numerics=True).run(g)
    g = from_onnx(small_onnx)
    _Breaker.exact = False
    try:
        rep = PassManager([_Breaker()], check_numerics=True).run(g).report
        assert rep["passes"][0]["drift_vs_input"]["max_rel"] > 1e-3  # lossy: drift reported
    finally:
        _Breaker.exact = True


def test_printer_deterministic_and_provenance(small_onnx):
    a, b = from_onnx(small_onnx), from_onnx(small_onnx)
    assert print_graph(a) == print_graph(b)
    PassManager(parse_pipeline("fold-bn")).run(a)
    text = print_graph(a)
    assert "[fold-bn]" in text  # the folded conv says which pass changed it
