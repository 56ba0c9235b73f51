"""Calibration: observe activations with ONNX Runtime and choose quantization ranges.

Collecting
----------
:func:`collect_histograms` lowers a graph to ONNX with the requested intermediate values
exposed as extra graph outputs, runs ONNX Runtime on the calibration inputs *batch by
batch*, and folds every batch into one :class:`Histogram` per value. Memory does not grow
with the number of samples: a histogram is ``num_bins`` counters plus a few scalars. The data
may be dense (``dict[str, ndarray]``) or ragged (``dict[str, list[ndarray]]``, elements of
different shapes -- text lines of different widths; see :mod:`nnsculpt.runtime.ort`): ragged
data is fed element by element, and since the histograms do not depend on how the values are
batched, the result equals feeding the same samples one at a time.

:class:`Histogram` uses fixed bins whose width is a power of two (``2**exp``) and whose
edges are integer multiples of that width. When new data falls outside the covered span,
the width doubles (``exp += d``) and bins merge pairwise -- an *exact* re-binning, no
interpolation. Because of that, two histograms built in different processes merge exactly
(:meth:`Histogram.merge`), and merging the histograms of two halves of a data set gives
the same counts as one pass over all of it. Histograms are plain numpy state: picklable.

Choosing a range (:func:`compute_range`)
----------------------------------------
Quantization maps ``r`` to ``Q = clamp(round(r / s) + z)``; the range ``[lo, hi]`` (which
always contains 0, so that 0 is exact) fixes ``s`` and ``z``. Methods:

* ``global``     -- one given threshold ``T`` for every tensor: ``[-T, T]`` (symmetric) or
  ``[max(min, -T), min(max, T)]`` (asymmetric).
* ``max``        -- the observed extremes: ``[min, max]`` / ``max |x|``.
* ``percentile`` -- the ``p``-th percentile of ``|x|`` (symmetric), or the
  ``(100-p)``-th / ``p``-th percentiles of ``x`` (asymmetric; one-sided data keeps
  ``lo = 0``).
* ``mse``        -- the range minimizing the expected squared quantization error of the
  observed histogram (clipping error ``(x - edge)^2`` outside, rounding ``s^2/12``
  inside), searched over candidate ranges.
* ``kl``         -- TensorRT entropy calibration (Migacz 2017): the threshold ``T`` whose
  clipped-and-quantized histogram has minimal KL divergence from the observed one. Data
  that is one-sided (``min >= 0``, e.g. after ReLU) is quantized over ``[0, T]`` with all
  ``2^bits - 1`` steps; two-sided data over ``|x|`` with ``2^(bits-1)`` levels. With
  fewer than ``8 * 2^bits`` observed values (e.g. squeeze-excitation vectors) the
  histogram is too sparse for a divergence and ``max`` is used.

:func:`compute_qparams` turns a range into ``(scale, zero_point)`` for a quantized type.

Which layers ONNX Runtime then runs in integer kernels is reported by
:func:`nnsculpt.runtime.integer_path.integer_fraction`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["Histogram", "collect_histograms", "collect_channel_means", "iter_intermediates",
           "compute_range", "compute_qparams", "qrange", "METHODS", "kl_threshold", "mse_range",
           "percentile_range"]

METHODS = ("global", "max", "percentile", "mse", "kl")

_MIN_EXP = -60       # finest bin width 2**-60
_MAX_ABS_K = 2 ** 50  # bin indices stay exactly representable in float64


# ============================================================================ histogram
class Histogram:
    """A mergeable histogram with power-of-two bin width and exact re-binning.

    Bin ``i`` covers ``[(k0 + i) * w, (k0 + i + 1) * w)`` with ``w = 2**exp``. Also tracks
    the exact ``min``/``max``, the number of finite values and their sum (for means).
    """

    __slots__ = ("num_bins", "exp", "k0", "counts", "min", "max", "count", "total", "nonfinite")

    def __init__(self, num_bins: int = 2048):
        if num_bins < 16:
            raise ValueError(f"num_bins must be >= 16, got {num_bins}")
        self.num_bins = int(num_bins)
        self.exp: int | None = None
        self.k0 = 0
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.total = 0.0
        self.nonfinite = 0

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ geometry
    @property
    def width(self) -> float:
        return 0.0 if self.exp is None else math.ldexp(1.0, self.exp)

    def edges(self) -> np.ndarray:
        """``num_bins + 1`` bin edges."""
        return (self.k0 + np.arange(self.num_bins + 1, dtype=np.float64)) * self.width

    def centers(self) -> np.ndarray:
        return (self.k0 + np.arange(self.num_bins, dtype=np.float64) + 0.5) * self.width

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def empty(self) -> bool:
        return self.count == 0

    def _fits(self, lo_k: int, hi_k: int, exp_from: int, exp_to: int, amax: float) -> bool:
        d = exp_to - exp_from
        lo2, hi2 = (lo_k >> d, hi_k >> d) if d < 62 else (lo_k >> 62, hi_k >> 62)
        return hi2 - lo2 + 1 <= self.num_bins and amax / math.ldexp(1.0, exp_to) < _MAX_ABS_K

    @staticmethod
    def _min_exp(a: float, b: float, num_bins: int, floor: int = _MIN_EXP) -> int:
        """Smallest exponent >= floor for which [a, b] spans at most num_bins bins."""
        amax = max(abs(a), abs(b))
        e = floor
        if b > a:
            e = max(e, math.floor(math.log2((b - a) / num_bins)) - 1)
        if amax > 0:
            e = max(e, math.floor(math.log2(amax / _MAX_ABS_K)) + 1)
        while True:
            w = math.ldexp(1.0, e)
            if math.floor(b / w) - math.floor(a / w) + 1 <= num_bins and amax / w < _MAX_ABS_K:
                return e
            e += 1

    def _occupied(self) -> tuple[int, int] | None:
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return None
        return self.k0 + int(nz[0]), self.k0 + int(nz[-1])

    def _rebin(self, new_exp: int, lo: float, hi: float) -> None:
        """Re-bin to width ``2**new_exp`` (>= current) anchored so that [lo, hi] fits."""
        w = math.ldexp(1.0, new_exp)
        lo_k_new = math.floor(lo / w)
        if self.exp is None:
            self.exp, self.k0 = new_exp, lo_k_new
            return
        d = new_exp - self.exp
        nz = np.flatnonzero(self.counts)
        ks = (self.k0 + nz).astype(np.int64)
        ks = ks >> min(d, 62)
        if ks.size:
            lo_k_new = min(lo_k_new, int(ks.min()))
        new_counts = np.zeros(self.num_bins, dtype=np.int64)
        np.add.at(new_counts, ks - lo_k_new, self.counts[nz])
        self.exp, self.k0, self.counts = new_exp, lo_k_new, new_counts

    def _ensure(self, lo: float, hi: float) -> None:
        """Make sure values in [lo, hi] fall into bins (grow the width if needed)."""
        # the exact extremes seen so far: the final width is the smallest one that fits all
        # data (independent of batching and merge order)
        lo_all, hi_all = (min(lo, self.min), max(hi, self.max)) if self.count else (lo, hi)
        need = self._min_exp(lo_all, hi_all, self.num_bins)
        if self.exp is None:
            self._rebin(need, lo_all, hi_all)
            return
        new_exp = max(self.exp, need)
        w = math.ldexp(1.0, new_exp)
        lo_k, hi_k = math.floor(lo_all / w), math.floor(hi_all / w)
        if new_exp == self.exp and lo_k >= self.k0 and hi_k < self.k0 + self.num_bins:
            return
        self._rebin(new_exp, lo_all, hi_all)

    # ------------------------------------------------------------------ updates
    def update(self, x: np.ndarray) -> "Histogram":
        """Fold the values of ``x`` (any shape) into the histogram."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"cannot histogram dtype {x.dtype}")
        x = x.reshape(-1)
        if x.dtype.kind == "f":
            fin = np.isfinite(x)
            if not fin.all():
                self.nonfinite += int((~fin).sum())
                x = x[fin]
        if x.size == 0:
            return self
        x = x.astype(np.float64, copy=False)
        a, b = float(x.min()), float(x.max())
        self._ensure(a, b)
        k = np.floor(x * math.ldexp(1.0, -self.exp)).astype(np.int64) - self.k0
        np.clip(k, 0, self.num_bins - 1, out=k)  # guards float edge cases only
        self.counts += np.bincount(k, minlength=self.num_bins)
        self.min = min(self.min, a)
        self.max = max(self.max, b)
        self.count += int(x.size)
        self.total += float(x.sum())
        return self

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram (exact; in place; returns self)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms with {self.num_bins} and {other.num_bins} bins")
        self.nonfinite += other.nonfinite
        if other.empty:
            return self
        if self.empty and self.exp is None:
            for k in self.__slots__:
                v = getattr(other, k)
                setattr(self, k, v.copy() if isinstance(v, np.ndarray) else v)
            return self
        o = other.copy()
        lo, hi = min(self.min, o.min), max(self.max, o.max)
        # common exponent: at least both, and enough for the union of occupied spans
        target = max(self.exp, o.exp)
        while True:
            w = math.ldexp(1.0, target)
            spans = []
            for h in (self, o):
                occ = h._occupied()
                d = target - h.exp
                spans.append((occ[0] >> min(d, 62), occ[1] >> min(d, 62)))
            lo_k = min(s[0] for s in spans)
            hi_k = max(s[1] for s in spans)
            if hi_k - lo_k + 1 <= self.num_bins and max(abs(lo), abs(hi)) / w < _MAX_ABS_K:
                break
            target += 1
        for h in (self, o):
            h._rebin(target, lo_k * w, hi_k * w)
        # both now share the width; align anchors
        k0 = min(self.k0, o.k0)
        counts = np.zeros(self.num_bins, dtype=np.int64)
        for h in (self, o):
            nz = np.flatnonzero(h.counts)
            np.add.at(counts, h.k0 + nz - k0, h.counts[nz])
        self.k0, self.counts = k0, counts
        self.min, self.max = lo, hi
        self.count += o.count
        self.total += o.total
        return self

    def copy(self) -> "Histogram":
        h = Histogram(self.num_bins)
        for k in self.__slots__:
            v = getattr(self, k)
            setattr(h, k, v.copy() if isinstance(v, np.ndarray) else v)
        return h

    # ------------------------------------------------------------------ views
    def folded(self) -> tuple[np.ndarray, float]:
        """Histogram of ``|x|``: counts over ``[0, n*w)`` in bins of width ``w``.

        Exact: bin ``k < 0`` (covering ``[k w, (k+1) w)``) maps to ``|x|`` bin ``-k-1``.
        """
        if self._occupied() is None:
            return np.zeros(1, dtype=np.int64), self.width or 1.0
        h = self._with_zero()
        nz = np.flatnonzero(h.counts)
        ks = h.k0 + nz
        ak = np.where(ks >= 0, ks, -ks - 1)
        out = np.zeros(int(ak.max()) + 1, dtype=np.int64)
        np.add.at(out, ak, h.counts[nz])
        return out, h.width

    def positive(self) -> tuple[np.ndarray, float]:
        """Counts over ``[0, n*w)`` of the non-negative part (bins k >= 0)."""
        occ = self._occupied()
        if occ is None or occ[1] < 0:
            return np.zeros(1, dtype=np.int64), self.width or 1.0
        h = self._with_zero()
        nz = np.flatnonzero(h.counts)
        ks = h.k0 + nz
        keep = ks >= 0
        out = np.zeros(int(ks.max()) + 1, dtype=np.int64)
        np.add.at(out, ks[keep], h.counts[nz][keep])
        return out, h.width

    def _with_zero(self) -> "Histogram":
        """This histogram, re-binned (exactly, on a copy if needed) so its span includes 0:
        views anchored at zero then need at most ``num_bins`` bins."""
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        w = self.width
        if math.floor(hi / w) - math.floor(lo / w) + 1 <= self.num_bins:
            return self
        h = self.copy()
        h._ensure(lo, hi)
        return h

    def quantile(self, q: float) -> float:
        """Approximate ``q``-quantile (0..1), linear inside a bin, clamped to [min, max]."""
        if self.empty:
            return 0.0
        cdf = np.cumsum(self.counts, dtype=np.float64)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.num_bins - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        inside = self.counts[i]
        frac = (target - before) / inside if inside > 0 else 0.0
        val = (self.k0 + i + frac) * self.width
        return float(min(max(val, self.min), self.max))

    def __repr__(self) -> str:  # pragma: no cover
        return (f"Histogram(n={self.count}, min={self.min:.4g}, max={self.max:.4g}, "
                f"bins={self.num_bins}, width=2**{self.exp})")


# ============================================================================ qparams
def qrange(dtype, *, symmetric: bool = False, bits: int | None = None) -> tuple[int, int]:
    """``(qmin, qmax)`` of a quantized type; ``bits`` narrows it (4-bit values in int8).

    Symmetric signed types use the restricted range ``[-(2^(b-1)-1), 2^(b-1)-1]`` so that
    the grid is symmetric around zero.
    """
    dt = np.dtype(dtype)
    b = bits or dt.itemsize * 8
    if dt.kind == "u":
        return 0, 2 ** b - 1
    if symmetric:
        return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    return -(2 ** (b - 1)), 2 ** (b - 1) - 1


def compute_qparams(lo: float, hi: float, dtype=np.uint8, *, symmetric: bool = False,
                    bits: int | None = None) -> tuple[np.float32, Any]:
    """Scale and zero point for the real range ``[lo, hi]`` (extended to contain 0).

    Asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)``.
    Symmetric: ``s = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, ``z`` = the middle of the
    range (0 for signed types, 128 for uint8).
    """
    dt = np.dtype(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = qrange(dt, symmetric=symmetric, bits=bits)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        half = (qmax - qmin) / 2.0
        scale = amax / half if amax > 0 else 1.0
        zp = int(math.ceil((qmin + qmax) / 2.0)) if dt.kind == "u" else 0
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(round(qmin - lo / scale))
        zp = min(max(zp, qmin), qmax)
    scale = np.float32(scale)
    if scale == 0 or not np.isfinite(scale):
        scale = np.float32(1.0)
    return scale, np.array(zp, dtype=dt)[()]


# ============================================================================ methods
def percentile_range(h: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    p = float(percentile)
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    if symmetric:
        counts, w = h.folded()
        cdf = np.cumsum(counts, dtype=np.float64)
        target = p / 100.0 * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        before = cdf[i - 1] if i > 0 else 0.0
        frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
        t = min((i + frac) * w, max(abs(h.min), abs(h.max)))
        return -t, t
    lo = 0.0 if h.min >= 0 else h.quantile(1.0 - p / 100.0)
    hi = 0.0 if h.max <= 0 else h.quantile(p / 100.0)
    return lo, hi


def _expected_sq_error(centers, counts, widths, scale, zp, qmin, qmax):
    """Expected squared quantization error per candidate (rows) over histogram bins (cols)."""
    lo_q = (qmin - zp) * scale
    hi_q = (qmax - zp) * scale
    c = centers[None, :]
    inside = (c >= lo_q[:, None]) & (c <= hi_q[:, None])
    clip_err = np.where(c < lo_q[:, None], (c - lo_q[:, None]) ** 2, (c - hi_q[:, None]) ** 2)
    err = np.where(inside, (scale ** 2 / 12.0)[:, None], clip_err + widths ** 2 / 12.0)
    return (err * counts[None, :]).sum(axis=1)


def mse_range(h: Histogram, dtype, symmetric: bool, bits: int | None = None,
              num_candidates: int = 128) -> tuple[float, float]:
    """Range minimizing the expected quantization MSE over the observed histogram."""
    qmin, qmax = qrange(dtype, symmetric=symmetric, bits=bits)
    nz = np.flatnonzero(h.counts)
    if nz.size == 0:
        return 0.0, 0.0
    centers = h.centers()[nz]
    counts = h.counts[nz].astype(np.float64)
    w = h.width
    lo0, hi0 = min(h.min, 0.0), max(h.max, 0.0)
    fr = np.linspace(1.0 / num_candidates, 1.0, num_candidates)

    def cost(lo, hi):
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        if symmetric:
            amax = np.maximum(np.abs(lo), np.abs(hi))
            scale = np.maximum(amax / ((qmax - qmin) / 2.0), 1e-30)
            zp = np.full_like(scale, math.ceil((qmin + qmax) / 2.0) if np.dtype(dtype).kind == "u" else 0.0)
        else:
            scale = np.maximum((hi - lo) / (qmax - qmin), 1e-30)
            zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
        return _expected_sq_error(centers, counts, w, scale, zp, qmin, qmax)

    if symmetric:
        t = max(-lo0, hi0) * fr
        errs = cost(-t, t)
        best = t[int(np.argmin(errs))]
        # refine around the best candidate
        step = max(-lo0, hi0) / num_candidates
        t2 = np.clip(best + np.linspace(-step, step, 33), step / 4, None)
        errs2 = cost(-t2, t2)
        b = float(t2[int(np.argmin(errs2))])
        return -b, b
    # asymmetric: joint shrink, then coordinate refinement of each end
    errs = cost(lo0 * fr, hi0 * fr)
    k = int(np.argmin(errs))
    lo, hi = lo0 * fr[k], hi0 * fr[k]
    for _ in range(2):
        if hi0 > 0:
            cand = hi0 * fr
            e = cost(np.full_like(cand, lo), cand)
            hi = float(cand[int(np.argmin(e))])
        if lo0 < 0:
            cand = lo0 * fr
            e = cost(cand, np.full_like(cand, hi))
            lo = float(cand[int(np.argmin(e))])
    return float(lo), float(hi)


def kl_threshold(counts: np.ndarray, width: float, num_quantized_bins: int) -> float:
    """TensorRT entropy calibration on a one-sided histogram (bins over ``[0, n*width)``).

    The first bin (exact zeros after ReLU) is flattened to its neighbour's count first.
    For each candidate ``i`` (bins kept): ``P`` = the first ``i`` bins with all outliers
    added to the last one; ``Q`` = those ``i`` bins merged into ``num_quantized_bins``
    levels and spread back evenly over the non-empty source bins; minimize ``KL(P||Q)``.
    ``Q`` is normalized by the total count, so mass clipped away is counted as lost.
    Returns the threshold ``i * width``.
    """
    counts = np.asarray(counts, dtype=np.float64).copy()
    n = counts.size
    nq = int(num_quantized_bins)
    if n > 1:
        # the first bin holds the exact zeros of ReLU outputs (often half the data); that
        # spike would dominate the divergence, so it takes the count of its neighbour
        # (as NVIDIA's pytorch-quantization does)
        counts[0] = counts[1]
    if n <= nq:
        return n * width
    total = counts.sum()
    if total <= 0:
        return n * width
    return _kl_scan(counts, nq, total) * width


def _kl_scan(src: np.ndarray, nq: int, total: float) -> int:
    """Vectorized TensorRT KL scan over every candidate ``i`` in ``[nq, n]``; returns the best ``i``.

    With ``q_k = S_j / N_j`` constant over the non-empty source bins of quantized bin ``j``
    (``S_j`` their sum, ``N_j`` their number), ``sum_k p_k log(p_k / q_k)`` splits into
    prefix sums: ``sum src log src`` over the kept bins, minus ``sum_j S_j log(S_j / N_j)``,
    with the last kept bin (which also carries the clipped tail) handled separately.
    Normalizing P and Q by the same total leaves the log ratios unchanged.
    """
    n = src.size
    C = np.concatenate([[0.0], np.cumsum(src)])
    Z = np.concatenate([[0.0], np.cumsum(src > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = np.where(src > 0, src * np.log(np.where(src > 0, src, 1.0)), 0.0)
    L = np.concatenate([[0.0], np.cumsum(xlogx)])
    best_i, best_kl = n, math.inf
    cands = np.arange(nq, n + 1)
    for chunk in np.array_split(cands, max(1, int(np.ceil(cands.size * (nq + 1) / 2_000_000)))):
        if chunk.size == 0:
            continue
        bounds = np.floor(chunk[:, None] * np.arange(nq + 1)[None, :] / nq).astype(np.int64)
        bounds[:, -1] = chunk
        S = C[bounds[:, 1:]] - C[bounds[:, :-1]]
        N = Z[bounds[:, 1:]] - Z[bounds[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            term_q = np.where((N > 0) & (S > 0), S * np.log(np.where(S > 0, S, 1.0) / np.maximum(N, 1.0)), 0.0).sum(1)
            last = chunk - 1
            src_last = src[last]
            # Q is zero on empty source bins (the tail may land on one)
            q_last = np.where((N[:, -1] > 0) & (src_last > 0), S[:, -1] / np.maximum(N[:, -1], 1.0), 0.0)
            q_last_eps = np.maximum(q_last, 1e-4 * total / chunk)
            own_last = np.where(src_last > 0, src_last * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
            p_last = src_last + (total - C[chunk])
            body = L[last] - (term_q - own_last)
            lastterm = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0) / q_last_eps), 0.0)
            kl = (body + lastterm) / total
        kl = np.where(np.isfinite(kl), kl, np.inf)
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_kl, best_i = float(kl[k]), int(chunk[k])
    return best_i


#: below this many observed values per quantization level, a KL divergence between sparse
#: histograms is noise: the range falls back to the observed extremes
KL_MIN_VALUES_PER_LEVEL = 8


def kl_range(h: Histogram, dtype, symmetric: bool, bits: int | None = None) -> tuple[float, float]:
    qmin, qmax = qrange(dtype, symmetric=symmetric, bits=bits)
    levels = qmax - qmin + 1
    if h.count < KL_MIN_VALUES_PER_LEVEL * levels:
        return compute_range(h, "max", dtype=dtype, symmetric=symmetric, bits=bits)
    if h.min >= 0 and not symmetric:
        counts, w = h.positive()
        t = kl_threshold(counts, w, levels - 1)
        return 0.0, min(t, h.max)
    if h.max <= 0 and not symmetric:
        # mirror of the one-sided case
        counts, w = h.folded()
        t = kl_threshold(counts, w, levels - 1)
        return max(-t, h.min), 0.0
    counts, w = h.folded()
    t = kl_threshold(counts, w, levels // 2)
    if symmetric:
        t = min(t, max(abs(h.min), abs(h.max)))
        return -t, t
    return max(h.min, -t), min(h.max, t)


def clipped_share(summary: Mapping[str, float]) -> float:
    """The share of a tensor's data range ``[min, max]`` that its chosen clip range ``[lo, hi]`` cuts off
    (0 when it covers it all); ``summary`` has those four keys (quantize's calibration artifacts)."""
    span = (summary["max"] - summary["min"]) or 1.0
    return (max(0.0, summary["max"] - summary["hi"]) + max(0.0, summary["lo"] - summary["min"])) / span


def compute_range(h: Histogram, method: str, *, dtype=np.uint8, symmetric: bool = False,
                  bits: int | None = None, percentile: float = 99.99,
                  threshold: float | None = None) -> tuple[float, float]:
    """The calibrated real range ``[lo, hi]`` of one tensor for ``method``."""
    if h.empty:
        return 0.0, 0.0
    if method == "max":
        if symmetric:
            a = max(abs(h.min), abs(h.max))
            return -a, a
        return h.min, h.max
    if method == "global":
        if threshold is None or threshold <= 0:
            raise ValueError("calibration 'global' needs a positive threshold")
        t = float(threshold)
        if symmetric:
            return -t, t
        return min(max(h.min, -t), t), min(max(h.max, -t), t)
    if method == "percentile":
        return percentile_range(h, percentile, symmetric)
    if method == "mse":
        return mse_range(h, dtype, symmetric, bits)
    if method == "kl":
        return kl_range(h, dtype, symmetric, bits)
    raise ValueError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")


# ============================================================================ collection
def _model_with_outputs(graph, names: Sequence[str]):
    """The graph lowered to ONNX with ``names`` appended as graph outputs."""
    import onnx
    from onnx import helper

    from ..ir.onnx_io import onnx_dtype, to_onnx_model

    model = to_onnx_model(graph, check=False)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name in existing:
            continue
        v = graph.values.get(name)
        elem = onnx_dtype(v.dtype) if v is not None and v.dtype is not None else onnx.TensorProto.FLOAT
        model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return model


def iter_intermediates(graph, names: Sequence[str], data: Mapping[str, Any], *,
                       batch_size: int = 16, progress: bool = True, desc: str = "calibrate",
                       threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Run ORT batch by batch and yield ``{name: array}`` of the requested values.

    ``data``: dense or ragged inputs (:func:`nnsculpt.runtime.ort.feed_batches`: ragged data
    element by element, each chunked into ``batch_size`` rows or the model's fixed batch)."""
    from tqdm.auto import tqdm

    from ..ir.errors import InputDataError
    from .ort import feed_batches, session

    names = list(dict.fromkeys(names))
    model = _model_with_outputs(graph, names)
    sess = session(model.SerializeToString(), threads=threads)
    feeds_needed = [i.name for i in sess.get_inputs()]
    missing = [n for n in feeds_needed if n not in data]
    if missing:
        raise InputDataError(f"calibration data lacks input(s) {missing} (it has {sorted(data)})")
    data = {k: data[k] for k in feeds_needed}
    batches = list(feed_batches(sess, data, batch_size))  # a batch fixed at 1: one sample at a time
    bar = tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)
    for feed in bar:
        outs = sess.run(names, feed) if names else []
        yield dict(zip(names, outs))


def collect_histograms(graph, names: Sequence[str], data: Mapping[str, Any], *,
                       num_bins: int = 2048, batch_size: int = 16, progress: bool = True,
                       histograms: dict[str, Histogram] | None = None) -> dict[str, Histogram]:
    """One merged :class:`Histogram` per value name over all calibration batches (``data``
    dense or ragged; the counts do not depend on the batching).

    ``histograms`` continues existing ones (e.g. to add another shard of data); the
    result of different shards can also be combined afterwards with ``merge``.
    """
    hists = histograms if histograms is not None else {}
    for n in names:
        hists.setdefault(n, Histogram(num_bins))
    for outs in iter_intermediates(graph, names, data, batch_size=batch_size, progress=progress):
        for n, arr in outs.items():
            hists[n].update(arr)
    return hists


def collect_channel_means(graph, names: Sequence[str], data: Mapping[str, Any], *,
                          axis: int = 1, batch_size: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-channel (``axis``) means of each named value over the data (streamed; dense or
    ragged: every value of every element counts once, whatever the element's spatial size)."""
    sums: dict[str, np.ndarray] = {}
    cnts: dict[str, int] = {}
    for outs in iter_intermediates(graph, names, data, batch_size=batch_size, progress=progress,
                                   desc="channel means"):
        for n, arr in outs.items():
            a = np.asarray(arr, dtype=np.float64)
            ax = axis if a.ndim > axis else a.ndim - 1
            red = tuple(i for i in range(a.ndim) if i != ax)
            s = a.sum(axis=red)
            sums[n] = sums.get(n, 0) + s
            cnts[n] = cnts.get(n, 0) + a.size // a.shape[ax]
    return {n: sums[n] / max(cnts[n], 1) for n in sums}


def collect_second_moments(graph, names: Sequence[str], data: Mapping[str, Any], *,
                           axis: int | Mapping[str, int] = -1,
                           rows: Mapping[str, Any] | None = None,
                           batch_size: int = 16, progress: bool = True) -> dict[str, np.ndarray]:
    """The second moment ``E[x x^T] = X^T X / n`` (float64, ``d x d``) of each named value over
    the data, where the rows ``x`` of ``X`` are the value's vectors along ``axis`` (an int for
    all names or a per-name mapping; default the last axis, as a MatMul reads it; ``1`` for NCHW
    channels) -- every other position of every sample is one row. ``rows`` may map a name to a
    function ``array -> (n, d) rows`` instead (e.g. only the positions a strided 1x1 conv reads).
    Streamed batch by batch (memory ``d^2`` per value); dense or ragged data. Graph inputs may be
    named too. Used by data-aware low-rank factorization (whitening by the Cholesky factor)."""
    names = list(dict.fromkeys(names))
    rows = dict(rows or {})
    sums: dict[str, np.ndarray] = {}
    cnts: dict[str, int] = {n: 0 for n in names}

    def add(n: str, arr) -> None:
        a = np.asarray(arr, dtype=np.float64)
        if n in rows:
            r = np.asarray(rows[n](a), dtype=np.float64)
        else:
            ax = axis.get(n, -1) if isinstance(axis, Mapping) else axis
            r = np.moveaxis(a, ax, -1)
            r = r.reshape(-1, r.shape[-1])
        m = r.T @ r
        sums[n] = sums[n] + m if n in sums else m
        cnts[n] += r.shape[0]

    graph_inputs = {v.name for v in graph.inputs}
    fed = [n for n in names if n in graph_inputs]
    inner = [n for n in names if n not in graph_inputs]
    if fed:
        from .ort import iter_elements

        for el in iter_elements(data):
            for n in fed:
                add(n, el[n])
    if inner:
        for outs in iter_intermediates(graph, inner, data, batch_size=batch_size, progress=progress,
                                       desc="second moments"):
            for n, arr in outs.items():
                add(n, arr)
    return {n: sums[n] / max(cnts[n], 1) for n in names if n in sums}
