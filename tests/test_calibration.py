"""Calibration: mergeable histograms and the five range-selection methods.

Every method is checked on known distributions: a Laplacian with a few far outliers
(percentile and KL clip them, max keeps them), the pure Laplacian (MSE clips the tail at the
MSE-optimal point, Banner et al. give ~9.9b for 8 bits), one-sided ReLU-like data (all
asymmetric ranges start at 0), and a given global threshold.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from nnsculpt.runtime.calibrate import (METHODS, Histogram, collect_histograms, compute_qparams, compute_range,
                                        qrange)


def _laplace_with_outliers(n=100_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.laplace(0.0, 1.0, n).astype(np.float32)
    x[:3] = 60.0     # 0.003 % of the data: far outliers on both sides
    x[3:5] = -50.0
    return x


def _hist(x, chunks=7, num_bins=2048):
    h = Histogram(num_bins)
    for part in np.array_split(x, chunks):
        h.update(part)
    return h


def _empirical_mse(x, lo, hi, dtype, symmetric):
    s, z = compute_qparams(lo, hi, dtype, symmetric=symmetric)
    qmin, qmax = qrange(dtype, symmetric=symmetric)
    q = np.clip(np.round(x / s) + int(z), qmin, qmax)
    return float(np.mean(((q - int(z)) * s - x) ** 2))


# ------------------------------------------------------------------------ histograms
def test_histogram_merge_equals_single_pass_and_pickles():
    x = _laplace_with_outliers()
    parts = np.array_split(x, 10)
    whole = Histogram(1024)
    for p in parts:
        whole.update(p)
    a, b = Histogram(1024), Histogram(1024)
    for p in parts[:3]:
        a.update(p)
    for p in parts[3:][::-1]:  # other order, other process
        b.update(p)
    a = pickle.loads(pickle.dumps(a))
    b = pickle.loads(pickle.dumps(b))
    merged = a.merge(b)
    assert (merged.exp, merged.k0) == (whole.exp, whole.k0)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.count == whole.count == x.size
    assert (merged.min, merged.max) == (whole.min, whole.max) == (-50.0, 60.0)
    # one shot over everything gives the same bins too
    np.testing.assert_array_equal(Histogram(1024).update(x).counts, whole.counts)


def test_histogram_rebins_when_range_grows_with_fixed_memory():
    h = Histogram(256)
    h.update(np.linspace(0, 1, 1000))
    w0 = h.width
    h.update(np.array([100.0, -3.0]))
    assert h.width > w0 and h.counts.size == 256
    assert h.counts.sum() == 1002
    edges = h.edges()
    assert edges[0] <= -3.0 and edges[-1] > 100.0
    for _ in range(50):  # more data never grows the state
        h.update(np.random.default_rng(0).random(1000))
    assert h.counts.size == 256 and h.count == 51002
    # folded |x| histogram keeps every count
    folded, w = h.folded()
    assert folded.sum() == h.count and w == h.width


def test_histogram_ignores_nonfinite():
    h = Histogram(128).update(np.array([1.0, np.inf, np.nan, -2.0]))
    assert h.count == 2 and h.nonfinite == 2 and (h.min, h.max) == (-2.0, 1.0)


# ----------------------------------------------------------------------------- methods
@pytest.mark.parametrize("symmetric", [False, True])
def test_outliers_clipped_by_percentile_and_kl_not_by_max(symmetric):
    x = _laplace_with_outliers()
    h = _hist(x)
    dt = np.int8 if symmetric else np.uint8
    r = {m: compute_range(h, m, dtype=dt, symmetric=symmetric, percentile=99.99, threshold=7.0) for m in METHODS}
    lo, hi = r["max"]
    assert hi == 60.0 and lo == (-60.0 if symmetric else -50.0)
    for m in ("percentile", "kl"):
        lo, hi = r[m]
        assert 5.0 < hi < 20.0, (m, r[m])       # the body of a Laplace(1) reaches ~11
        assert -20.0 < lo < -5.0, (m, r[m])
    assert r["global"] == ((-7.0, 7.0) if symmetric else (-7.0, 7.0))
    # clipping the outliers beats max on the quantization error of the body
    body = x[5:]
    for m in ("percentile", "kl"):
        assert _empirical_mse(body, *r[m], dt, symmetric) < 0.5 * _empirical_mse(body, *r["max"], dt, symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_is_mse_optimal_and_clips_the_laplace_tail(symmetric):
    x = np.random.default_rng(1).laplace(0.0, 1.0, 400_000).astype(np.float32)
    h = _hist(x)
    dt = np.int8 if symmetric else np.uint8
    r = {m: compute_range(h, m, dtype=dt, symmetric=symmetric) for m in ("max", "percentile", "mse", "kl")}
    lo, hi = r["mse"]
    assert 8.0 < hi < 11.5 and -11.5 < lo < -8.0    # theory: ~9.9 for 8 bits
    assert hi < 0.85 * x.max()
    errs = {m: _empirical_mse(x, *rng_, dt, symmetric) for m, rng_ in r.items()}
    assert errs["mse"] <= 1.02 * min(errs.values()), errs


def test_mse_clips_rare_outliers_when_that_lowers_the_error():
    rng = np.random.default_rng(2)
    x = rng.laplace(0.0, 1.0, 200_000).astype(np.float32)
    x[0] = 25.0  # a single outlier: clipping it costs less than the coarser grid
    h = _hist(x)
    lo, hi = compute_range(h, "mse", dtype=np.int8, symmetric=True)
    assert hi < 15.0
    assert _empirical_mse(x, lo, hi, np.int8, True) < _empirical_mse(x, -25.0, 25.0, np.int8, True)


@pytest.mark.parametrize("method", METHODS)
def test_one_sided_data_keeps_zero_at_the_bottom(method):
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(0.0, 1.0, 50_000), 0.0).astype(np.float32)  # ReLU output: half zeros
    h = _hist(x)
    lo, hi = compute_range(h, method, dtype=np.uint8, symmetric=False, threshold=2.0)
    assert lo == 0.0
    assert 1.5 < hi <= x.max() + 1e-6, (method, hi)   # the zero spike must not pull KL down
    s, z = compute_qparams(lo, hi, np.uint8)
    assert int(z) == 0 and s > 0


def test_global_needs_a_threshold():
    h = Histogram().update(np.arange(10.0))
    with pytest.raises(ValueError, match="threshold"):
        compute_range(h, "global")


def test_qparams_represent_zero_exactly():
    for lo, hi in [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (0.0, 0.0)]:
        s, z = compute_qparams(lo, hi, np.uint8)
        assert 0 <= int(z) <= 255
        assert np.float32(0.0) == (np.clip(np.round(0.0 / s) + int(z), 0, 255) - int(z)) * s
    s, z = compute_qparams(-2.0, 1.0, np.int8, symmetric=True)
    assert int(z) == 0 and np.isclose(s, 2.0 / 127)
    s, z = compute_qparams(-2.0, 1.0, np.uint8, symmetric=True)
    assert int(z) == 128


# --------------------------------------------------------------------------- collection
def test_collect_histograms_streams_batches(small_onnx):
    from nnsculpt.ir import from_onnx

    g = from_onnx(small_onnx)
    x = np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32)
    names = [g.nodes[0].outputs[0].name, g.outputs[0].name]
    h4 = collect_histograms(g, names, {"input": x}, batch_size=4, progress=False)
    h24 = collect_histograms(g, names, {"input": x}, batch_size=24, progress=False)
    for n in names:
        assert h4[n].count == h24[n].count > 0
        np.testing.assert_array_equal(h4[n].counts, h24[n].counts)
    from nnsculpt.runtime import run

    logits = run(g, {"input": x})[g.outputs[0].name]
    assert np.isclose(h4[g.outputs[0].name].max, logits.max(), rtol=1e-5)


def _kl_reference(counts, nq):
    """Straightforward TensorRT-style loop (Q normalized by the total count)."""
    counts = counts.astype(np.float64)
    total = counts.sum()
    best, best_i = np.inf, None
    for i in range(nq, counts.size + 1):
        src = counts[:i]
        p = src.copy()
        p[-1] += total - src.sum()
        bounds = (np.arange(nq + 1) * i) // nq
        q = np.zeros(i)
        for j in range(nq):
            seg = src[bounds[j]:bounds[j + 1]]
            nz = (seg > 0).sum()
            if nz:
                q[bounds[j]:bounds[j + 1]] = np.where(seg > 0, seg.sum() / nz, 0.0)
        m = p > 0
        kl = np.sum(p[m] / total * np.log(p[m] / np.maximum(q[m], 1e-4 * total / i)))
        if kl < best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_kl_scan_matches_the_reference_loop(seed):
    from nnsculpt.runtime.calibrate import _kl_scan

    rng = np.random.default_rng(seed)
    x = np.abs(rng.laplace(0, 1, 20_000))
    x[:5] = 25.0
    counts = np.histogram(x, bins=300)[0].astype(np.float64)
    counts[0] = counts[1]
    assert _kl_scan(counts, 32, counts.sum()) == _kl_reference(counts, 32)
