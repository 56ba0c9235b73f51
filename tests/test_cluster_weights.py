"""cluster-weights (scalar k-means, per-grouped-channel, product quantization, sensitive k-means),
binarize-weights (binary / ternary), and their training through the torch lowering (codebook
fine-tuning, straight-through estimator) in ``distill``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnsculpt.cli import main as cli_main
from nnsculpt.ir import from_onnx
from nnsculpt.ir.errors import MissingCalibrationDataError, PassOptionError
from nnsculpt.ir.onnx_io import to_onnx_model
from nnsculpt.models.data import load_digits_dataset
from nnsculpt.passes import PassContext, parse_pipeline
from nnsculpt.passes.cluster_weights import kmeans_1d, pack_codes
from nnsculpt.runtime import run, session
from nnsculpt.runtime.loading import load_graph

from .conftest import max_rel_err
from .thirdparty import make_inputs as tp_inputs
from .thirdparty import require

_DIGITS: dict = {}
#: the trained digits ResNet's weights with >= 2048 elements (the six 3x3 convs of the blocks)
DIGITS_CLUSTERED = 6


def digits():
    """The trained digits ResNet with BatchNorm folded (as a deployment graph has it)."""
    if "g" not in _DIGITS:
        g = load_graph("zoo:digits_resnet")
        apply(g, "fold-bn")
        _DIGITS["g"] = g
    return _DIGITS["g"].copy()


def digits_data(split: str, n: int | None = None):
    X, y = load_digits_dataset(16, split)
    return ({"input": X[:n]}, y[:n]) if n else ({"input": X}, y)


def out(g, x):
    return run(g, x)["logits"]


def apply(g, spec: str, ctx: PassContext | None = None):
    (p,) = parse_pipeline(spec)
    return p(g, ctx or PassContext())


def weight_of(g, layer: str) -> np.ndarray:
    """The dense weight a layer computes (clustered chains evaluated in ORT)."""
    node = next(n for n in g.nodes if n.source == layer and n.op_type == "Conv")
    v = node.input(1)
    if v.is_const:
        return v.const
    probe = g.copy()
    probe.outputs.append(next(x for x in probe.iter_values() if x.name == v.name))
    x, _ = digits_data("test", 1)
    return run(probe, x)[v.name]


def top1(logits, labels) -> float:
    return float((np.asarray(logits).argmax(1) == labels).mean())


# ====================================================================== k-means core
def test_kmeans_1d_exact_when_few_values_and_pins_zero():
    rng = np.random.default_rng(0)
    vals = rng.choice(np.array([-0.5, -0.1, 0.2, 0.7]), size=5000)
    book, code, pin = kmeans_1d(vals, None, 4)
    assert not pin and np.array_equal(book[code], vals)
    # pruned weights: zeros stay zeros, the other k-1 centroids cover the rest
    w = rng.standard_normal(20000)
    w[rng.random(w.size) < 0.6] = 0.0
    book, code, pin = kmeans_1d(w, None, 16)
    assert pin and 0.0 in book and book.size == 16
    assert np.array_equal(book[code] == 0, w == 0)


def test_kmeans_1d_beats_uniform_grid_and_is_deterministic():
    """Lloyd on a heavy-tailed weight distribution: lower error than a uniform grid of the same size,
    and the same codebook on every run (the 65536-bin reduction included)."""
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=200_000) * 0.05
    book, code, _ = kmeans_1d(w, None, 16, seed=0)
    grid = np.linspace(w.min(), w.max(), 16)
    grid_err = np.abs(w[:, None] - grid[None, :]).min(axis=1)
    assert np.sqrt(np.mean((book[code] - w) ** 2)) < 0.5 * np.sqrt(np.mean(grid_err ** 2))
    book2, code2, _ = kmeans_1d(w, None, 16, seed=0)
    assert np.array_equal(book, book2) and np.array_equal(code, code2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_codes_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=1001)
    packed = pack_codes(codes, bits)
    slot = {1: 1, 2: 2, 3: 4, 4: 4}.get(bits, 8)
    assert packed.dtype == np.uint8 and packed.size == -(-1001 * slot // 8)
    per = 8 // slot
    un = ((packed[:, None].astype(np.int64) // (1 << (np.arange(per) * slot))[None, :]) % (1 << slot)).reshape(-1)
    assert np.array_equal(un[:1001], codes)


# ====================================================================== the pass on digits
# relative L2 of the logits; the acceptance bound of 1e-2 is on max_rel_err (max |d| / max |ref|, the
# project's relative error), which 8-bit meets at 9.9e-3 on this net (its L2 is 1.01e-2)
@pytest.mark.parametrize("bits,bound", [(8, 0.0125), (4, 0.35)])
def test_per_tensor_bounds_on_trained_digits(bits, bound):
    g = digits()
    x, y = digits_data("test")
    ref = out(g, x)
    res = apply(g, f"cluster-weights{{bits={bits}}}")
    got = out(g, x)
    assert res.metrics["layers_clustered"] == DIGITS_CLUSTERED
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err <= bound, err
    if bits == 8:
        assert max_rel_err(ref, got) <= 1e-2
        assert top1(got, y) >= top1(ref, y) - 0.005
    for name, e in res.artifacts["layers"].items():
        w = weight_of(g, e["source"])
        assert np.unique(w).size <= 1 << bits, name
        assert e["bytes_after"] < e["bytes_before"] * (bits + 1) / 32 + 1100
    # the small file runs in plain ORT with the codes stored packed
    model = to_onnx_model(g)
    onnx.checker.check_model(model)
    codes = [i for i in model.graph.initializer if i.name.endswith(".codes")]
    assert len(codes) == DIGITS_CLUSTERED and all(i.data_type == TensorProto.UINT8 for i in codes)
    sess = session(model)
    assert np.allclose(sess.run(None, x)[0], got, rtol=0, atol=1e-5 * np.abs(got).max())


def test_grouped_channels_have_their_own_codebooks_and_lower_error():
    g_t, g_g = digits(), digits()
    r_t = apply(g_t, "cluster-weights{bits=2}")
    r_g = apply(g_g, "cluster-weights{bits=2,granularity=per-grouped-channel,group_size=8}")
    for name, e in r_g.artifacts["layers"].items():
        assert e["weight_rel_err"] < r_t.artifacts["layers"][name]["weight_rel_err"], name
        w = weight_of(g_g, e["source"])
        assert e["groups"] == w.shape[0] // 8
        for s in range(0, w.shape[0], 8):
            assert np.unique(w[s:s + 8]).size <= 4
        assert np.unique(w).size > 4


def test_pruned_zeros_stay_zero_and_pack_smaller():
    g = digits()
    apply(g, "prune-weights{sparsity=0.8}")
    zeros = {n.source: n.input(1).const == 0 for n in g.nodes if n.op_type == "Conv" and n.input(1).const.size >= 2048}
    res = apply(g, "cluster-weights{bits=4}")
    for src, z in zeros.items():
        assert np.array_equal(weight_of(g, src) == 0, z), src
    assert all(e["zero_pinned"] for e in res.artifacts["layers"].values())


def test_product_quantization():
    g = digits()
    x, _ = digits_data("test", 128)
    ref = out(g, x)
    res = apply(g, "cluster-weights{mode=pq,bits=6,subvector=3}")
    assert res.metrics["layers_clustered"] == DIGITS_CLUSTERED
    for e in res.artifacts["layers"].values():
        w = weight_of(g, e["source"])
        sub = np.moveaxis(w, 0, 0).reshape(w.shape[0], -1).reshape(-1, 3)
        assert np.unique(sub, axis=0).shape[0] <= 64
    rel = float(np.linalg.norm(out(g, x) - ref) / np.linalg.norm(ref))
    # the same 2 bits per weight as scalar 2-bit k-means, and a better model
    g_s = digits()
    apply(g_s, "cluster-weights{bits=2}")
    rel_s = float(np.linalg.norm(out(g_s, x) - ref) / np.linalg.norm(ref))
    assert rel < 0.8 * rel_s, (rel, rel_s)
    # a row length that is not a multiple of the sub-vector: left alone with a note
    g2 = digits()
    res2 = apply(g2, "cluster-weights{mode=pq,bits=4,subvector=7}")
    assert not res2.changed and any("multiple of subvector=7" in n for n in res2.notes)


@pytest.mark.parametrize("weighting", ["activation", "fisher"])
def test_sensitive_kmeans_lowers_the_weighted_error(weighting):
    """Sensitive k-means minimizes sum_i h_i (w_i - c(w_i))^2 with h = the weighting's importances: its
    weighted error is lower than plain k-means' on every layer, and its output error on held-out data
    is no worse than plain k-means' by more than 10 %."""
    calib, _ = digits_data("train", 256)
    x, _ = digits_data("test")
    g0 = digits()
    ref = out(g0, x)
    ctx = PassContext(calib_data=calib)
    if weighting == "fisher":
        from nnsculpt.passes.prune.importance import taylor_products

        imp = taylor_products(g0, calib, batch_size=8, stat="fisher")
    else:
        from nnsculpt.runtime.calibrate import collect_second_moments

        imp = None
    g_p, g_s = digits(), digits()
    r_p = apply(g_p, "cluster-weights{bits=2}", ctx)
    r_s = apply(g_s, f"cluster-weights{{bits=2,weighting={weighting}}}", ctx)
    orig = {n.source: n.input(1).const for n in g0.nodes if n.op_type == "Conv"}
    for e in r_s.artifacts["layers"].values():
        w = orig[e["source"]]
        if imp is not None:
            h = imp[e["weight"]]
        else:
            node = next(n for n in g0.nodes if n.source == e["source"] and n.op_type == "Conv")
            m = collect_second_moments(g0, [node.input(0).name], calib, axis=1, progress=False)[node.input(0).name]
            h = np.broadcast_to(np.diag(m)[None, :, None, None], w.shape)
        werr = {k: float((h * (weight_of(gg, e["source"]) - w) ** 2).sum()) for k, gg in (("p", g_p), ("s", g_s))}
        assert werr["s"] < werr["p"], (e["source"], werr)
    e_p = np.linalg.norm(out(g_p, x) - ref)
    e_s = np.linalg.norm(out(g_s, x) - ref)
    assert e_s <= 1.1 * e_p, (e_s, e_p)


def test_deterministic_bytes():
    blobs = []
    for _ in range(2):
        g = digits()
        apply(g, "cluster-weights{bits=3,granularity=per-grouped-channel,solver=lloyd,init=kmeans++}",
              PassContext(seed=3))
        blobs.append(to_onnx_model(g).SerializeToString())
    assert blobs[0] == blobs[1]


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density"])
def test_optimal_solver_never_worse_than_lloyd(init):
    """The dynamic-programming solver is the global optimum of the same objective: on every layer its
    weight error is at most Lloyd's from any init (up to the final refit's rounding)."""
    g_o, g_l = digits(), digits()
    r_o = apply(g_o, "cluster-weights{bits=4}")
    r_l = apply(g_l, f"cluster-weights{{bits=4,solver=lloyd,init={init}}}")
    for name, e in r_o.artifacts["layers"].items():
        assert e["weight_rel_err"] <= r_l.artifacts["layers"][name]["weight_rel_err"] * (1 + 1e-9), name
    assert r_l.metrics["max_weight_rel_err"] < 0.2


def test_uniform_codebook_lowers_to_dequantize():
    """A weight whose values are integer multiples of one step (a ternary one) is stored as int8 codes
    behind DequantizeLinear, exactly."""
    rng = np.random.default_rng(0)
    w = (rng.integers(-1, 2, size=(32, 16, 3, 3)) * 0.25).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])],
        [numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 17)])
    g = from_onnx(model)
    x = {"x": rng.standard_normal((2, 16, 8, 8)).astype(np.float32)}
    ref = run(g, x)["y"]
    res = apply(g, "cluster-weights{bits=2}")
    assert res.artifacts["layers"]["node_0" if "node_0" in res.artifacts["layers"] else next(iter(res.artifacts["layers"]))]["storage"] == "dequantize"
    assert [n.op_type for n in g.nodes] == ["DequantizeLinear", "Conv"]
    assert max_rel_err(ref, run(g, x)["y"]) <= 1e-6


# ====================================================================== errors
@pytest.mark.parametrize("spec,key", [("cluster-weights{bits=0}", "bits"), ("cluster-weights{bits=9}", "bits"),
                                      ("cluster-weights{group_size=0}", "group_size"),
                                      ("cluster-weights{mode=pq,granularity=per-grouped-channel}", "granularity"),
                                      ("cluster-weights{ops=[Relu]}", "ops"),
                                      ("binarize-weights{threshold=1.5}", "threshold")])
def test_bad_options(spec, key):
    with pytest.raises(PassOptionError, match=f"option '{key}'"):
        parse_pipeline(spec)


def test_layers_matching_nothing_and_missing_calibration(tmp_path, capsys):
    with pytest.raises(PassOptionError, match="'layers' entry 'nope'"):
        apply(digits(), "cluster-weights{layers=[nope]}")
    with pytest.raises(MissingCalibrationDataError):
        apply(digits(), "cluster-weights{weighting=activation}")
    out_path = tmp_path / "o.onnx"
    rc = cli_main(["compile", "zoo:digits_resnet", "-p", "cluster-weights{bits=12}", "-o", str(out_path)])
    assert rc == 2 and not out_path.exists()
    assert "PassOptionError" in capsys.readouterr().err


def test_drift_warning_and_fail_on_drift(tmp_path, capsys):
    """1-bit clustering of the digits net without fine-tuning breaks it: the driver says so, and
    --fail-on-drift turns that into an error with no file written."""
    o = tmp_path / "c1.onnx"
    rc = cli_main(["compile", "zoo:digits_resnet", "-p", "fold-bn,cluster-weights{bits=1}", "-o", str(o),
                   "--fail-on-drift"])
    err = capsys.readouterr().err
    assert rc == 2 and not o.exists() and "DriftError" in err and "cluster-weights" in err


# ====================================================================== binarize / ternary
@pytest.mark.parametrize("ternary", [False, True])
def test_binarize_rules_and_storage(ternary):
    g = digits()
    orig = {n.source: n.input(1).const.copy() for n in g.nodes if n.op_type == "Conv"}
    x, _ = digits_data("test", 32)
    res = apply(g, f"binarize-weights{{ternary={str(ternary).lower()}}}")
    assert res.metrics["layers_binarized"] == DIGITS_CLUSTERED + 1  # the 1x1 downsample with 32x32 too
    for e in res.artifacts["layers"].values():
        w = orig[e["source"]]
        got = weight_of(g, e["source"])
        for o in range(w.shape[0]):
            row, q = w[o].reshape(-1), got[o].reshape(-1)
            if ternary:
                delta = 0.7 * np.abs(row).mean()
                keep = np.abs(row) > delta
                assert np.array_equal(q != 0, keep)
                assert np.allclose(np.abs(q[keep]), np.abs(row[keep]).mean(), rtol=1e-6)
            else:
                assert np.allclose(q, np.abs(row).mean() * np.where(row < 0, -1, 1), rtol=1e-6)
    dq = [n for n in g.nodes if n.op_type == "DequantizeLinear"]
    assert len(dq) == res.metrics["layers_binarized"]
    model = to_onnx_model(g)
    onnx.checker.check_model(model)
    for i in model.graph.initializer:
        if i.name.endswith(".q"):
            assert i.data_type == TensorProto.INT8
            vals = set(np.unique(numpy_helper.to_array(i)).tolist())
            assert vals <= ({-1, 0, 1} if ternary else {-1, 1})
    assert np.isfinite(out(g, x)).all()


# ====================================================================== training
def _distill(student_graph, epochs: int):
    from nnsculpt.runtime.distill import distill

    train, ty = digits_data("train")
    val, vy = digits_data("val")
    return distill(student_graph, "zoo:digits_resnet", {**train, "labels": ty}, epochs=epochs, optimizer="adam",
                   lr=1e-3, val_data={**val, "labels": vy}, progress=False, seed=0)


def test_codebook_finetuning_keeps_codes_and_recovers_accuracy():
    """2-bit clustering breaks the digits net; distillation trains only what the codebook allows: per
    layer at most 4 values, the same code per weight (the partition is unchanged), pinned zeros stay
    zero -- and test accuracy comes back."""
    g = digits()
    apply(g, "prune-weights{sparsity=0.5}")
    apply(g, "cluster-weights{bits=2}")
    x, y = digits_data("test")
    before = top1(out(g, x), y)
    conv_src = [n.source for n in g.nodes if n.op_type == "Conv" and not n.input(1).is_const]
    w0 = {s: weight_of(g, s) for s in conv_src}
    g2 = _distill(g.copy(), epochs=4)
    after = top1(out(g2, x), y)
    assert after >= before + 0.2 and after >= 0.9, (before, after)
    for s in conv_src:
        w1 = weight_of(g2, s)
        assert np.unique(w1).size <= 4
        assert np.array_equal(w1 == 0, w0[s] == 0)
        # same partition: weights that shared a centroid still share one
        _, inv0 = np.unique(w0[s], return_inverse=True)
        for c in np.unique(inv0):
            assert np.unique(w1.reshape(-1)[inv0.reshape(-1) == c]).size == 1


def test_ternary_ste_training_then_storage():
    """Ternary weights trained with the straight-through estimator stay ternary per output channel,
    accuracy recovers, and binarize-weights then stores them exactly as int8 codes."""
    g = digits()
    apply(g, "binarize-weights{ternary=true,store=float}")
    x, y = digits_data("test")
    before = top1(out(g, x), y)
    g2 = _distill(g.copy(), epochs=4)
    after = top1(out(g2, x), y)
    assert after >= before + 0.3 and after >= 0.85, (before, after)
    for n in g2.nodes:
        if n.op_type == "Conv" and n.input(1).const.size >= 1024:
            w = n.input(1).const.reshape(n.input(1).const.shape[0], -1)
            for row in w:
                nz = np.abs(row[row != 0])
                assert nz.size and np.allclose(nz, nz[0], rtol=1e-6)
    ref = out(g2, x)
    apply(g2, "binarize-weights{ternary=true}")
    assert max_rel_err(ref, out(g2, x)) <= 1e-5


# ====================================================================== third-party models
@pytest.mark.thirdparty
@pytest.mark.parametrize("key", ["ppocr_cls_v2", "pplcnet_orientation"])
def test_8bit_within_1e2_on_thirdparty(key, tmp_path):
    """The acceptance bound: 8-bit per-tensor clustering without fine-tuning keeps the outputs within 1e-2
    (relative) on real inputs, and the smaller file runs in plain ORT."""
    path = require(key)
    g = from_onnx(path)
    x = tp_inputs(key, 1)
    ref = run(g, x)
    res = apply(g, "cluster-weights{bits=8}")
    assert res.changed
    p = tmp_path / "c.onnx"
    p.write_bytes(to_onnx_model(g).SerializeToString())
    assert p.stat().st_size < 0.55 * path.stat().st_size
    got = dict(zip([o.name for o in session(str(p)).get_outputs()], session(str(p)).run(None, x)))
    for k in ref:
        assert max_rel_err(ref[k], got[k]) <= 1e-2, k


# ====================================================================== output-aware refit
def test_refit_output_solves_the_least_squares_per_layer():
    """refit=output re-solves the centroid values for each layer's output on the calibration rows
    (codes fixed): the reported calibration output error is below k-means' on every layer, and it is
    the optimum -- perturbing any centroid makes the sampled-row error larger."""
    from nnsculpt.passes.cluster_weights import _matrix, layer_input_rows, refit_centroids, select_weight_layers

    calib, _ = digits_data("train", 128)
    g = digits()
    ctx = PassContext(calib_data=calib)
    res = apply(g, "cluster-weights{bits=3,refit=output}", ctx)
    for e in res.artifacts["layers"].values():
        assert e["calib_output_rel_err"] < e["calib_output_rel_err_kmeans"], e["source"]
    # optimality on one layer, checked directly
    g0 = digits()
    lay = select_weight_layers("cluster-weights", g0, ctx, parse_pipeline("cluster-weights")[0].options)[2]
    x = layer_input_rows(g0, [lay], ctx, 512, 16)[lay.node.name]
    book, code, _ = kmeans_1d(lay.w.reshape(-1), None, 8)
    codes = code.reshape(lay.w.shape)
    new, _ = refit_centroids(x, lay.w, codes, book[None, :].copy(), [(0, lay.w.shape[0])], False)

    def err(c):
        return float(np.linalg.norm(x @ _matrix(c[codes]) - x @ _matrix(lay.w)))

    best = err(new[0])
    assert best < err(book)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert err(new[0] + 1e-3 * rng.standard_normal(new.shape[1])) > best


def test_sequential_refit_beats_plain_kmeans_on_held_out_data():
    calib, _ = digits_data("train", 256)
    x, _ = digits_data("test")
    g_p, g_s = digits(), digits()
    ref = out(g_p, x)
    ctx = PassContext(calib_data=calib)
    apply(g_p, "cluster-weights{bits=4}", ctx)
    res = apply(g_s, "cluster-weights{bits=4,refit=sequential}", ctx)
    e_p = np.linalg.norm(out(g_p, x) - ref) / np.linalg.norm(ref)
    e_s = np.linalg.norm(out(g_s, x) - ref) / np.linalg.norm(ref)
    assert e_s < 0.8 * e_p, (e_s, e_p)          # measured 0.098 vs 0.137
    assert all(e["refit"] == "output" for e in res.artifacts["layers"].values())


def test_refit_keeps_pinned_zeros_and_needs_data():
    calib, _ = digits_data("train", 64)
    g = digits()
    apply(g, "prune-weights{sparsity=0.6}")
    zeros = {n.source: n.input(1).const == 0 for n in g.nodes if n.op_type == "Conv" and n.input(1).const.size >= 2048}
    apply(g, "cluster-weights{bits=3,refit=sequential}", PassContext(calib_data=calib))
    for src, z in zeros.items():
        assert np.array_equal(weight_of(g, src) == 0, z), src
    with pytest.raises(MissingCalibrationDataError):
        apply(digits(), "cluster-weights{refit=output}")
    with pytest.raises(PassOptionError, match="option 'refit'"):
        parse_pipeline("cluster-weights{mode=pq,refit=output}")
