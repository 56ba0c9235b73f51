"""Acceptance round trip: for every zoo model, torch == IR -> ONNX -> ORT == IR -> to_torch
(≤1e-4 relative), before and after the exact passes; same for a model that came in as ONNX."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from nnsculpt import models
from nnsculpt.ir import from_onnx, from_torch, to_onnx_model, verify
from nnsculpt.passes import PassManager, parse_pipeline
from nnsculpt.runtime import run, to_torch

from .conftest import max_rel_err

EXACT = "fold-constants,fold-bn,eliminate-identity,canonicalize,dce"


def _torch_out(m, inputs):
    with torch.no_grad():
        y = m(*inputs)
    return y.numpy() if isinstance(y, torch.Tensor) else y[0].numpy()


@pytest.mark.parametrize("name", models.list_models())
def test_zoo_round_trip(name):
    m = models.get_model(name)
    ex = models.example_inputs(name, batch=1)
    g = from_torch(m, ex, input_names=list(models.input_names(name)), output_names=list(models.output_names(name)))
    assert g.meta["frontend"] == "torch.fx"
    verify(g)
    batch = models.example_inputs(name, batch=3, seed=1)  # dynamic batch, other data
    feeds = {k: t.numpy() for k, t in zip(models.input_names(name), batch)}
    ref = _torch_out(m, batch)
    out_name = models.output_names(name)[0]
    assert max_rel_err(ref, run(to_onnx_model(g), feeds)[out_name]) <= 1e-4
    tm = to_torch(g).eval()
    assert max_rel_err(ref, _torch_out(tm, batch)) <= 1e-4
    PassManager(parse_pipeline(EXACT), verify=True).run(g)
    assert max_rel_err(ref, run(to_onnx_model(g), feeds)[out_name]) <= 1e-4
    assert max_rel_err(ref, _torch_out(to_torch(g).eval(), batch)) <= 1e-4


def test_onnx_model_round_trips_through_torch_and_trains_back():
    name = "se_net"
    m = models.get_model(name)
    ex = models.example_inputs(name, batch=1)
    buf = io.BytesIO()
    torch.onnx.export(m, ex, buf, input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                      opset_version=13, dynamo=False)
    g = from_onnx(buf.getvalue() and __import__("onnx").load_from_string(buf.getvalue()))
    x = models.example_inputs(name, batch=4, seed=2)[0]
    ref = _torch_out(m, (x,))
    tm = to_torch(g).eval()
    assert max_rel_err(ref, _torch_out(tm, (x,))) <= 1e-4
    assert any(isinstance(mod, torch.nn.Conv2d) for mod in tm.modules())
    assert max_rel_err(ref, run(to_onnx_model(g), {"input": x.numpy()})["logits"]) <= 1e-4


def test_compile_twice_byte_identical():
    blobs = []
    for _ in range(2):
        g = from_torch(models.get_model("c2f"), models.example_inputs("c2f"), input_names=["input"],
                       output_names=["logits"])
        PassManager(parse_pipeline(EXACT)).run(g)
        blobs.append(to_onnx_model(g).SerializeToString())
    assert blobs[0] == blobs[1]
