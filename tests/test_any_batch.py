"""Models as exported for deployment: a batch fixed at 1, ``dim_value: -1``, fixed non-batch dims.

Any number of calibration samples runs on any model: a fixed batch of 1 is fed one sample at a
time everywhere data flows (calibration, bias correction, activation importance, the budget
search, the PassManager's drift check); -1 / 0 dims are symbolic; data that conflicts with a
fixed non-batch dim is refused by name.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nnsculpt.cli import main
from nnsculpt.ir import from_onnx, graph_stats
from nnsculpt.ir.errors import InputDataError
from nnsculpt.passes import PassContext, PassManager, parse_pipeline
from nnsculpt.runtime import load_inputs, run, session

from .conftest import make_small_net


@pytest.fixture
def batch1_onnx(tmp_path):
    """SmallNet exported with no dynamic axes: input [1,3,16,16], output [1,5]."""
    path = tmp_path / "batch1.onnx"
    torch.onnx.export(make_small_net(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=13, dynamo=False)
    assert [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]
    return path


@pytest.fixture
def minus1_onnx(small_onnx, tmp_path):
    """SmallNet with its batch written as ``dim_value: -1`` (as Paddle exports a dynamic batch)."""
    m = onnx.load(str(small_onnx))
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = -1
    path = tmp_path / "minus1.onnx"
    onnx.save(m, str(path))
    return path


def _calib(n=32, seed=0, shape=(3, 16, 16)):
    return {"input": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def test_run_feeds_a_fixed_batch_one_sample_at_a_time(batch1_onnx, small_onnx):
    x = _calib(7)
    got = run(session(str(batch1_onnx)), x)["logits"]
    ref = run(session(str(small_onnx)), x)["logits"]            # same weights, symbolic batch
    assert got.shape == (7, 5) and np.allclose(got, ref, rtol=1e-5, atol=1e-6)
    # a symbolic batch is chunked by batch_size, with the same result
    assert np.allclose(run(session(str(small_onnx)), x, batch_size=3)["logits"], ref, rtol=1e-5, atol=1e-6)


def test_quantize_compile_on_batch1_model_with_32_samples(batch1_onnx, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=_calib(32)["input"])
    out = tmp_path / "q.onnx"
    rc = main(["compile", str(batch1_onnx), "-p", "quantize", "--calib-data", str(tmp_path / "calib.npz"),
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.exists()
    # also with calib_batch_size=1 and through the budget search
    for spec in ("quantize{calib_batch_size=1}", "quantize{budget=0.05}", "bias-correction,quantize"):
        g = from_onnx(batch1_onnx)
        res = PassManager(parse_pipeline(spec), check_numerics=True).run(g, PassContext(calib_data=_calib(32)))
        assert res.report["numerics"]["inputs"] == {"input": [32, 3, 16, 16]}
        assert res.report["numerics"]["cosine"] > 0.99, spec


def test_activation_importance_on_batch1_model(batch1_onnx):
    g = from_onnx(batch1_onnx)
    res = PassManager(parse_pipeline("prune-channels{ratio=0.25,importance=activation}")).run(
        g, PassContext(calib_data=_calib(16)))
    assert res.report["summary"]["params"]["ratio"] < 1.0


def test_minus_one_dims_are_symbolic(minus1_onnx, small_onnx, tmp_path):
    g = from_onnx(minus1_onnx)
    assert g.inputs[0].shape[0] is None and g.inputs[0].shape[1:] == (3, 16, 16)
    ref = graph_stats(from_onnx(small_onnx))
    st = graph_stats(g)
    assert st.flops == ref.flops > 0 and st.macs == ref.macs   # no negative FLOPs from -1
    np.savez(tmp_path / "c.npz", input=_calib(24)["input"])
    assert load_inputs(tmp_path / "c.npz", g)["input"].shape == (24, 3, 16, 16)
    res = PassManager(parse_pipeline("quantize"), check_numerics=True).run(g, PassContext(calib_data=_calib(24)))
    assert res.report["numerics"]["cosine"] > 0.99
    out = tmp_path / "m1q.onnx"
    assert main(["compile", str(minus1_onnx), "-p", "quantize", "--calib-data", str(tmp_path / "c.npz"),
                 "-o", str(out)]) == 0
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert not (dim0.HasField("dim_value") and dim0.dim_value < 0)  # written back as symbolic


def test_data_conflicting_with_a_fixed_dim_is_refused_by_name(batch1_onnx, tmp_path):
    g = from_onnx(batch1_onnx)
    np.savez(tmp_path / "wide.npz", input=_calib(4, shape=(3, 16, 20))["input"])
    with pytest.raises(InputDataError, match=r"wide.npz: input 'input' dim 3 is 20, the model expects 16"):
        load_inputs(tmp_path / "wide.npz", g)
    np.savez(tmp_path / "ok.npz", input=_calib(5)["input"])
    assert load_inputs(tmp_path / "ok.npz", g)["input"].shape[0] == 5   # 5 samples, fed one at a time


def test_samples_that_do_not_split_into_a_fixed_batch(tmp_path):
    path = tmp_path / "batch2.onnx"
    torch.onnx.export(make_small_net(), (torch.randn(2, 3, 16, 16),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=13, dynamo=False)
    x = _calib(6)
    assert run(session(str(path)), x)["logits"].shape == (6, 5)
    with pytest.raises(InputDataError, match="input 'input': 5 samples do not split into the model's fixed batch of 2"):
        run(session(str(path)), _calib(5))
    np.savez(tmp_path / "odd.npz", input=_calib(5)["input"])
    with pytest.raises(InputDataError, match="dim 0 is 5, samples, not a multiple of the fixed batch 2"):
        load_inputs(tmp_path / "odd.npz", from_onnx(path))
