"""Tests of the ``prune-weights`` pass and of sparse storage / sparse execution
(:mod:`nnsculpt.runtime.sparse`).

Models are built with ``onnx.helper`` (fast); the drift test runs the bundled, trained
``digits_resnet`` on real digits. The custom-op tests skip when onnxruntime-extensions is
not installed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.ir import from_onnx, to_onnx_model, verify
from nnsculpt.ir.errors import PassOptionError
from nnsculpt.passes import PassContext, get_pass, parse_pipeline
from nnsculpt.passes.prune_weights import layer_mask
from nnsculpt.runtime import sparse
from nnsculpt.runtime.ort import session

F = TensorProto.FLOAT
needs_ext = pytest.mark.skipif(not sparse.extensions_available(),
                               reason="onnxruntime-extensions is not installed (pip install onnxruntime-extensions)")


# --------------------------------------------------------------------------- models
def _model(seed: int = 0, hidden: int = 64) -> onnx.ModelProto:
    """Conv(3->16, 3x3) -> Relu -> GlobalAvgPool -> Flatten -> MatMul(16->hidden) -> Relu
    -> Gemm(transB=1, hidden->10) ; plus a tiny Conv weight (8x16x1x1 = 128 params)."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv.w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv.b": rng.standard_normal(16).astype(np.float32) * 0.1,
        "small.w": rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.3,
        "mm.w": rng.standard_normal((8, hidden)).astype(np.float32) * 0.3,
        "fc.w": rng.standard_normal((10, hidden)).astype(np.float32) * 0.3,
        "fc.b": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "small.w"], ["s"], name="small"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "mm.w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
        helper.make_node("Gemm", ["hr", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "pw", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", F, ["N", 10])],
                          initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _run_pass(spec: str, model=None):
    g = from_onnx(model or _model())
    ctx = PassContext()
    (p,) = parse_pipeline(spec)
    res = p(g, ctx)
    verify(g)
    return g, res, res.changed


def _w(g, name):
    return g.initializers[name].const


def _x(n=4, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


WEIGHTS = {"conv": "conv.w", "small": "small.w", "mm": "mm.w", "fc": "fc.w"}


# ------------------------------------------------------------------------ sparsity
@pytest.mark.parametrize("s", [0.5, 0.9])
def test_layer_sparsity_exact(s):
    dense = from_onnx(_model())
    g, ctx, changed = _run_pass(f"prune-weights{{sparsity={s}}}")
    assert changed
    for layer, wname in WEIGHTS.items():
        w, w0 = _w(g, wname), _w(dense, wname)
        assert int((w == 0).sum()) == int(round(s * w.size)), layer
        kept = w != 0
        # the largest magnitudes were kept, unchanged; pruned ones are exactly +0.0
        assert np.array_equal(w[kept], w0[kept])
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
        assert not np.signbit(w[~kept]).any()
        rec = g.meta["sparsity"]["layers"][layer]
        assert rec["weight"] == wname and rec["zeros"] == int(round(s * w.size))
        assert np.array_equal(layer_mask(g, layer), kept)
    assert np.array_equal(_w(g, "conv.b"), _w(dense, "conv.b"))  # biases untouched
    assert any("total:" in n for n in ctx.notes)
    assert ctx.artifacts["sparsity"]["total"] == g.meta["sparsity"]["total"]
    assert set(ctx.artifacts["sparsity"]["layers"]) == set(g.meta["sparsity"]["layers"])
    session(g).run(None, _x())


def test_global_sparsity_exact():
    g, _, _ = _run_pass("prune-weights{sparsity=0.8,scope=global}")
    ws = [_w(g, n) for n in WEIGHTS.values()]
    total = sum(w.size for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == int(round(0.8 * total))
    per_layer = {round(float((w == 0).mean()), 3) for w in ws}
    assert len(per_layer) > 1  # one global ranking, not a per-layer ratio
    assert g.meta["sparsity"]["total"]["zeros"] == zeros
    # global: every kept magnitude >= every pruned magnitude, across layers
    dense = from_onnx(_model())
    w0 = np.concatenate([np.abs(_w(dense, n)).ravel() for n in WEIGHTS.values()])
    kept = np.concatenate([(w != 0).ravel() for w in ws])
    assert w0[~kept].max() <= w0[kept].min()


def test_threshold_and_std_threshold():
    dense = from_onnx(_model())
    g, _, _ = _run_pass("prune-weights{threshold=0.2}")
    for wname in WEIGHTS.values():
        w0, w = _w(dense, wname), _w(g, wname)
        assert np.array_equal(w, np.where(np.abs(w0) < 0.2, 0, w0))
    g, _, _ = _run_pass("prune-weights{threshold=1.0,threshold_mode=std}")
    for wname in WEIGHTS.values():
        w0, w = _w(dense, wname), _w(g, wname)
        t = w0.astype(np.float64).std()
        assert np.array_equal(w == 0, np.abs(w0) < t)


# ----------------------------------------------------------------------------- N:M
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern_every_group(n, m):
    dense = from_onnx(_model(hidden=64))
    g, ctx, _ = _run_pass(f"prune-weights{{pattern={n}:{m}}}")
    # reduction axes: Conv W[Cout, Cin, kh, kw] -> Cin (axis 1); MatMul x @ W[K, N] -> axis 0;
    # Gemm transB=1, B[N, K] -> axis 1
    checked = 0
    for layer, wname, axis in [("small", "small.w", 1), ("mm", "mm.w", 0), ("fc", "fc.w", 1)]:
        w, w0 = _w(g, wname), _w(dense, wname)
        groups = np.moveaxis(w, axis, -1).reshape(-1, m)
        groups0 = np.abs(np.moveaxis(w0, axis, -1).reshape(-1, m))
        nz = (groups != 0).sum(axis=1)
        assert (nz == n).all(), layer          # exactly N kept in every group of M
        kept = groups != 0
        assert (np.where(kept, groups0, np.inf).min(1) >= np.where(kept, -np.inf, groups0).max(1)).all()
        assert g.meta["sparsity"]["layers"][layer]["reduction_axis"] == axis
        checked += 1
    assert checked == 3
    # conv has Cin=3: not a multiple of M, left alone with a note
    assert np.array_equal(_w(g, "conv.w"), _w(dense, "conv.w"))
    assert any("conv" in s and "not a multiple" in s for s in ctx.notes)
    session(g).run(None, _x())


# ------------------------------------------------------------------------ selection
def test_exclude_and_min_params():
    dense = from_onnx(_model())
    g, ctx, _ = _run_pass("prune-weights{sparsity=0.9,exclude=[fc,conv*],min_params=200}")
    notes = " ".join(ctx.notes)
    for wname in ("fc.w", "conv.w", "small.w"):  # excluded by name / pattern / min_params (128 < 200)
        assert np.array_equal(_w(g, wname), _w(dense, wname)), wname
    assert "excluded by 'fc'" in notes and "excluded by 'conv*'" in notes and "min_params=200" in notes
    assert (_w(g, "mm.w") == 0).mean() == pytest.approx(0.9, abs=1 / 512)
    assert set(g.meta["sparsity"]["layers"]) == {"mm"}
    # ops= restricts the op types
    g, _, _ = _run_pass("prune-weights{sparsity=0.5,ops=[Gemm]}")
    assert (_w(g, "fc.w") == 0).any() and not (_w(g, "mm.w") == 0).any()


def test_masks_survive_the_torch_lowering():
    """The distillation engine keeps weights (rank >= 2) that are exactly 0 at 0: the lowered
    torch module must show the pruned zeros, per layer, as recorded in graph.meta."""
    from nnsculpt.runtime import to_torch

    g, _, _ = _run_pass("prune-weights{sparsity=0.8}")
    module = to_torch(g)
    zeros = {name.rsplit(".", 1)[0]: int((p == 0).sum()) for name, p in module.named_parameters() if p.dim() >= 2}
    rec = g.meta["sparsity"]["layers"]
    assert zeros and all(zeros[k] == rec[k]["zeros"] for k in zeros)


def test_shared_weight_with_other_reader_is_left_alone():
    m = _model()
    m.graph.node.append(helper.make_node("ReduceSum", ["mm.w"], ["side"], name="side", keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("side", F, None))
    g, ctx, _ = _run_pass("prune-weights{sparsity=0.5}", m)
    assert not (_w(g, "mm.w") == 0).any()
    assert any("also read by" in s for s in ctx.notes)


@pytest.mark.parametrize("spec,option", [
    ("prune-weights{sparsity=1.5}", "sparsity"),
    ("prune-weights{sparsity=-0.1}", "sparsity"),
    ("prune-weights{pattern=3:2}", "pattern"),
    ("prune-weights{pattern=2:2}", "pattern"),
    ("prune-weights{pattern=two}", "pattern"),
    ("prune-weights{threshold=-1}", "threshold"),
    ("prune-weights{sparsity=abc}", "sparsity"),
    ("prune-weights{pattern=2:4,scope=global}", "scope"),
    ("prune-weights{sparsity=0.5,ops=[Relu]}", "ops"),
    ("prune-weights{sparsity=0.5,scope=row}", "scope"),
])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(PassOptionError, match=f"'{option}'"):
        parse_pipeline(spec)


def test_missing_or_conflicting_rule():
    with pytest.raises(PassOptionError, match="sparsity"):
        get_pass("prune-weights")()
    with pytest.raises(PassOptionError, match="'sparsity' and 'pattern'"):
        parse_pipeline("prune-weights{sparsity=0.5,pattern=2:4}")


# ------------------------------------------------------------------------- drift / CLI
def test_bounded_drift_on_trained_model():
    """digits_resnet (trained, real digits; a 39k-parameter net, so one-shot pruning bites
    quickly): fold-bn + 30 % layer-wise pruning keeps >= 85 % of the test predictions and
    accuracy (99.6 % -> 90.8 % measured; 50 % gives 68 %: fine-tune / distill after pruning).
    The manager reports the drift of this lossy pass."""
    from nnsculpt.models.data import load_digits_dataset
    from nnsculpt.passes import PassManager
    from nnsculpt.runtime.loading import load_graph

    g = load_graph("zoo:digits_resnet")
    ref_g = g.copy()
    x, labels = load_digits_dataset(split="test")
    x = x[:256]
    name = g.inputs[0].name
    res = PassManager(parse_pipeline("fold-bn,prune-weights{sparsity=0.3}"), check_numerics=True,
                      sample_inputs={name: x[:64]}).run(g)
    drift = res.report["passes"][1]["drift_vs_input"]
    assert drift["cosine"] > 0.9
    ref = session(ref_g).run(None, {name: x})[0]
    got = session(g).run(None, {name: x})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.85
    assert (got.argmax(1) == labels[:256]).mean() >= 0.85
    assert res.report["passes"][1]["exact"] is False


@pytest.mark.parametrize("pipeline", ["prune-weights{sparsity=0.9}", "prune-weights{pattern=2:4}"])
def test_cli_compile(tmp_path, capsys, pipeline):
    from nnsculpt.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_model(), str(src))
    out = tmp_path / "out.onnx"
    assert main(["compile", str(src), "-p", pipeline, "-o", str(out)]) == 0
    g = from_onnx(out)
    assert (_w(g, "mm.w") == 0).mean() >= 0.5
    assert "prune-weights" in capsys.readouterr().out


# --------------------------------------------------------------------------- storage
@pytest.mark.parametrize("fmt,index_dtype,max_ratio", [("coo", "int64", 0.4), ("coo", "int32", 0.3),
                                                       ("bitmask", "int64", 0.4)])
def test_sparse_storage_roundtrip(tmp_path, fmt, index_dtype, max_ratio):
    g, _, _ = _run_pass("prune-weights{sparsity=0.9}", _model(hidden=256))
    dense_path = tmp_path / "dense.onnx"
    onnx.save(to_onnx_model(g), str(dense_path))
    info = sparse.save_sparse(g, tmp_path / "sparse.onnx", format=fmt, index_dtype=index_dtype)
    model = onnx.load(str(tmp_path / "sparse.onnx"))
    if fmt == "coo":
        moved = {t.values.name for t in model.graph.sparse_initializer}
    else:
        moved = {n.output[0] for n in model.graph.node if n.output[0] in WEIGHTS.values()}
        assert not model.graph.sparse_initializer
    assert {"mm.w", "fc.w", "conv.w"} <= moved and "conv.b" not in moved
    assert not {"mm.w", "fc.w", "conv.w"} & {t.name for t in model.graph.initializer}
    assert info["bytes"] < dense_path.stat().st_size and info["ratio"] < max_ratio
    if index_dtype == "int64":
        onnx.checker.check_model(model)
    feed = _x(8)
    ref = session(dense_path).run(None, feed)[0]
    got = session(tmp_path / "sparse.onnx").run(None, feed)[0]
    assert np.array_equal(ref, got)  # ORT expands / constant-folds the weights: bitwise identical
    back = sparse.load_sparse(tmp_path / "sparse.onnx")  # dense weights in the IR again
    assert [n.op_type for n in back.nodes] == [n.op_type for n in g.nodes]
    for wname in WEIGHTS.values():
        assert np.array_equal(_w(back, wname), _w(g, wname))
    if fmt == "coo":  # plain from_onnx densifies sparse_initializer itself
        assert np.array_equal(_w(from_onnx(tmp_path / "sparse.onnx"), "mm.w"), _w(g, "mm.w"))


def test_sparse_storage_keeps_dense_when_not_smaller(tmp_path):
    g = from_onnx(_model())
    info = sparse.save_sparse(g, tmp_path / "s.onnx")
    assert info["tensors"] == [] and not onnx.load(str(tmp_path / "s.onnx")).graph.sparse_initializer


# ----------------------------------------------------------------------- execution
def test_sparse_linear_kernel_matches_dense():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    bias = rng.standard_normal(70).astype(np.float32)
    backends = ["auto"] + (["scipy"] if sparse._has_scipy() else [])
    for backend in backends:
        k = sparse.SparseLinear.from_dense(w, bias, backend=backend)
        assert np.array_equal(k.dense(), w)
        for b in (1, 2, 3, 16, 17, 40):  # dot path, 16-wide and 32-wide tiles, ragged tails
            x = rng.standard_normal((b, 300)).astype(np.float32)
            ref = x.astype(np.float64) @ w + bias
            assert np.abs(k(x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), (backend, b)
        x3 = rng.standard_normal((2, 5, 300)).astype(np.float32)
        assert k(x3).shape == (2, 5, 70)


@needs_ext
def test_custom_op_matches_dense(tmp_path):
    g, _, _ = _run_pass("prune-weights{sparsity=0.9}", _model(hidden=256))
    lowered, rep = sparse.lower_sparse(g, min_speedup=None)
    assert {k for k, v in rep["layers"].items() if v["decision"] == "sparse"} == {"mm", "fc"}
    verify(lowered)
    assert [n.op_type for n in lowered.nodes if n.domain == sparse.CUSTOM_DOMAIN] == [sparse.OP_TYPE] * 2
    assert "mm.w" not in lowered.initializers and "mm.w" in g.initializers  # input graph untouched
    path = tmp_path / "exec.onnx"
    onnx.save(to_onnx_model(lowered), str(path))
    for n in (1, 7, 33):
        feed = _x(n)
        ref = session(g).run(None, feed)[0]
        got = sparse.session(path).run(None, feed)[0]
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    # documented behaviour on a plain ORT: refused; densify() gives the portable model back
    with pytest.raises(Exception, match=sparse.OP_TYPE):
        session(path)
    dense = sparse.densify(path)
    assert not any(n.domain == sparse.CUSTOM_DOMAIN for n in dense.graph.node)
    feed = _x(5)
    assert np.abs(session(dense).run(None, feed)[0] - session(g).run(None, feed)[0]).max() <= 1e-5
    # the lowered file is small too: CSR tensor attributes instead of dense weights
    dense_file = tmp_path / "dense.onnx"
    onnx.save(to_onnx_model(g), str(dense_file))
    assert path.stat().st_size < 0.5 * dense_file.stat().st_size


def test_session_without_extensions_runs_dense_fallback(monkeypatch):
    w = np.zeros((64, 32), np.float32)
    w[::4] = np.random.default_rng(0).standard_normal((16, 32))
    attrs = sparse._sparse_node_attrs("fc", w, np.ones(32, np.float32))
    _, exec_model = sparse._single_node_models(w, None, attrs, 17)

    def missing():
        raise RuntimeError("onnxruntime-extensions is not installed (simulated)")

    monkeypatch.setattr(sparse, "_ensure_pyop", missing)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="dense fallback"):
        s = sparse.session(exec_model)
    assert np.abs(s.run(None, {"X": x})[0] - (x @ w + 1)).max() < 1e-5
    with pytest.raises(RuntimeError, match="not installed"):
        sparse.session(exec_model, fallback="error")


@needs_ext
def test_lower_sparse_benchmarks_and_keeps_losers_dense():
    g, _, _ = _run_pass("prune-weights{sparsity=0.95}", _model(hidden=256))
    lowered, rep = sparse.lower_sparse(g, batch=4, runs=3, min_speedup=1e9)  # nothing can win
    assert not any(n.domain == sparse.CUSTOM_DOMAIN for n in lowered.nodes)
    for layer in ("mm", "fc"):
        e = rep["layers"][layer]
        assert e["dense_us"] > 0 and e["sparse_us"] > 0 and e["decision"].startswith("dense (speedup")
    _, rep = sparse.lower_sparse(g, min_sparsity=0.99, min_speedup=None)
    assert all(v["decision"].startswith("dense (sparsity") for v in rep["layers"].values())
