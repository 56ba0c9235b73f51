"""Post-training quantization: QDQ (static), dynamic, weight-only; accuracy-aware fallback."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np


from ..ir.errors import InputDataError, PassOptionError
from ..ir.graph import Graph, Node, Value
from ._quant_table import OpQuant, spec_for
from .base import Pass, PassContext, PassResult, register

log = logging.getLogger("nnsculpt.passes.quantize")

__all__ = ["Quantize", "quantize_weight", "QuantPlan", "ActQuant"]

FLOAT32 = np.dtype(np.float32)
#: dynamic mode quantizes these by default: ORT fuses them into DynamicQuantizeMatMul, while
#: ConvInteger + rescale runs slower than a float Conv on CPU (opt in with ops=[Conv,...])
DYNAMIC_DEFAULT_OPS = ("MatMul", "Gemm")


# =============================================================================== helpers
def _is_f32(v: Value | None) -> bool:
    return v is not None and v.dtype is not None and np.dtype(v.dtype) == FLOAT32


def quantize_weight(w: np.ndarray, axis: int | None, *, bits: int = 8, block_size: int | None = None,
                    scale: np.ndarray | None = None, storage=np.int8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight quantization: ``q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``.

    ``axis=None``: one scale. ``axis`` without ``block_size``: one scale per slice along
    ``axis`` (per channel), shape ``(w.shape[axis],)``. With ``block_size``: blocks of
    ``block_size`` consecutive elements along ``axis`` share a scale (ONNX blocked
    quantization, opset 21): the scale has ``w``'s shape with ``ceil(D/block)`` along
    ``axis``. ``scale`` overrides the computed scale (learned by QAT). Returns
    ``(q, scale)``; zero points are 0.
    """
    w = np.asarray(w, dtype=np.float32)
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        a = np.abs(w)
        if axis is None:
            amax = np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
        elif block_size:
            d = w.shape[axis]
            nb = -(-d // block_size)
            pad = nb * block_size - d
            ap = np.moveaxis(a, axis, 0)
            if pad:
                ap = np.concatenate([ap, np.zeros((pad,) + ap.shape[1:], ap.dtype)], axis=0)
            ap = ap.reshape((nb, block_size) + ap.shape[1:]).max(axis=1)
            amax = np.moveaxis(ap, 0, axis)
        else:
            red = tuple(i for i in range(w.ndim) if i != axis)
            amax = a.max(axis=red) if red else a
        s = (amax / qmax).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    else:
        s = np.asarray(scale, dtype=np.float32)
    sb = _broadcast_scale(s, w, axis, block_size)
    q = np.clip(np.round(w / sb), -qmax, qmax)
    return q.astype(storage), s


def _broadcast_scale(s: np.ndarray, w: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    if axis is None or s.ndim == 0:
        return s
    if block_size:
        return np.repeat(s, block_size, axis=axis).take(np.arange(w.shape[axis]), axis=axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return s.reshape(shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zp=0, axis: int | None = None,
               block_size: int | None = None) -> np.ndarray:
    """Reference DequantizeLinear in numpy (float32)."""
    qf = np.asarray(q).astype(np.float32)
    s = _broadcast_scale(np.asarray(scale, np.float32), qf, axis, block_size)
    z = _broadcast_scale(np.asarray(zp).astype(np.float32), qf, axis, block_size)
    return ((qf - z) * s).astype(np.float32)


@dataclass
class ActQuant:
    """Quantization parameters of one activation tensor."""

    scale: np.float32
    zero_point: Any          # numpy scalar of the activation type
    lo: float = 0.0
    hi: float = 0.0


@dataclass
class _Request:
    all_users: bool = False
    users: set = field(default_factory=set)    # {(node name, input index)}
    share_from: str | None = None


@dataclass
class QuantPlan:
    """What to quantize for a given set of included nodes (by name)."""

    included: set[str]
    tensors: dict[str, _Request] = field(default_factory=dict)
    weights: list[tuple[str, int]] = field(default_factory=list)        # (node, input index)
    const_acts: list[tuple[str, int]] = field(default_factory=list)     # (node, input index)
    biases: list[tuple[str, int]] = field(default_factory=list)         # (node, input index)
    absorbed: dict[str, str] = field(default_factory=dict)              # producer output -> act node

    def root(self, name: str) -> str:
        seen = 0
        while self.tensors.get(name) is not None and self.tensors[name].share_from and seen < 1000:
            name = self.tensors[name].share_from
            seen += 1
        return name


def _match(node: Node, patterns: Sequence[str]) -> bool:
    for p in patterns:
        if p == node.op_type or p == node.name or p == node.source:
            return True
        if any(ch in p for ch in "*?[") and (fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.source, p)):
            return True
    return False


def _default_metric(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """Worst over float outputs of max |ref - got| / max |ref| (the drift the PassManager reports)."""
    from ..runtime.ort import compare_outputs

    res = compare_outputs({k: a for k, a in ref.items() if np.asarray(a).dtype.kind == "f"}, got)
    return max((math.inf if "shape_mismatch" in e else e["max_rel"] for e in res.values()), default=0.0)


# ================================================================================= pass
@register
class Quantize(Pass):
    """Quantize to 8-bit integers with QuantizeLinear/DequantizeLinear pairs (QDQ), dynamically, or weight-only.

    Rewrite rules (static mode, the default; per-op rules come from ``passes/_quant_table.py``):

    * a float32 activation ``x`` read by a quantized op becomes ``DequantizeLinear(
      QuantizeLinear(x, s, z), s, z)``; ``s, z`` come from calibration (``calibration`` =
      global | max | percentile | mse | kl over histograms of ``x`` on ``ctx.calib_data``),
      asymmetric ``uint8`` by default (``activations=int8``, ``symmetric=true``). One pair
      per tensor; when the producer is quantized every consumer reads the pair (so ORT can
      fuse ``op -> Q``), otherwise only the quantized consumers do;
    * a constant weight of Conv / ConvTranspose / Gemm / MatMul is stored as ``int8``
      (symmetric, per channel along Conv axis 0, ConvTranspose axis 1, Gemm axis 0 if
      ``transB`` else 1, MatMul axis -1; ``per_channel=false``: one scale) followed by a
      ``DequantizeLinear``; ``weights=int4`` keeps 4-bit values in int8 storage (so ORT's
      int8 kernels run them);
    * the bias of Conv / ConvTranspose / Gemm becomes ``int32`` with scale ``s_x * s_w``
      and zero point 0 (the pattern ORT fuses into QLinearConv / QGemm; ``bias=float``
      keeps it float);
    * Relu / Clip after a quantized op are *absorbed*: their output is quantized in place of
      the op's output (zero point at the type minimum), and when that quantizer clamps
      exactly like the activation (``Q(relu(x)) == Q(x)``; Clip bounds reproduced by the
      grid) the activation node is removed, leaving ``Conv -> Q`` for ORT to fuse;
      MaxPool / Reshape / Resize / ... reuse their input's parameters (ORT drops the pair);
    * ``mode=dynamic``: ``DynamicQuantizeLinear`` on the input and ``MatMulInteger`` /
      ``ConvInteger`` on int8 weights, rescaled by ``Cast -> Mul(s_x * s_w) -> Add(bias)``
      (ORT fuses the MatMul form into DynamicQuantizeMatMul); no calibration. By default
      only MatMul / Gemm (``ops=[Conv,MatMul,Gemm]`` adds ConvInteger, slow on ORT CPU);
    * ``mode=weight-only``: only weights are quantized (int8 per channel; ``weights=int4``:
      real INT4 with ``block_size`` blocks along the reduction axis, opset 21; ORT fuses
      ``DQ -> MatMul`` into MatMulNBits);
    * ``budget``: the largest allowed max relative output error vs fp32 on the calibration
      data (or a ``metric(ref, got)`` callback in Python). If the fully quantized model
      exceeds it, every quantized layer is ranked by sensitivity (``sensitivity`` =
      one-at-a-time: output MSE with only that layer quantized; or leave-one-out) and the
      most sensitive ones stay float -- the smallest such prefix, found by exponential then
      binary search -- until the budget holds (mixed precision); the pass notes which.

    The default opset is raised with ``onnx.version_converter`` when needed (per-channel
    QDQ needs 13, INT4 21); node names and provenance are kept. BatchNormalization is
    folded first (``fold_bn``). The note ``integer path`` reports which layers ORT actually
    runs in integer kernels and their share of the FLOPs.

    Preconditions: static mode needs calibration data (``--calib-data`` / ``ctx.calib_data``);
    only float32 tensors and default-domain ops without subgraphs are quantized; graph
    outputs stay float; only op types in ``ops`` (default: all the table knows) are
    quantized, and nodes matching ``exclude`` (names, op types, provenance, globs) are left
    alone.
    """

    name = "quantize"
    exact = False
    requirement_hints = {"calib-data": "use quantize{mode=dynamic} or quantize{mode=weight-only} without data"}

    @dataclass
    class Options:
        mode: Literal["static", "dynamic", "weight-only"] = "static"
        calibration: Literal["global", "max", "percentile", "mse", "kl"] = "percentile"
        threshold: Optional[float] = None
        percentile: float = 99.99
        per_channel: bool = True
        symmetric: bool = False
        activations: Literal["uint8", "int8"] = "uint8"
        weights: Literal["int8", "int4"] = "int8"
        block_size: int = 32
        bias: Literal["int32", "float"] = "int32"
        ops: list[str] = field(default_factory=list)
        exclude: list[str] = field(default_factory=list)
        budget: Optional[float] = None
        num_bins: int = 2048
        calib_batch_size: int = 16
        budget_samples: int = 256
        sensitivity: Literal["one-at-a-time", "leave-one-out"] = "one-at-a-time"
        fold_bn: bool = True
        check_integer: bool = True
        progress: Optional[bool] = None   # tqdm bar while calibrating; default: when stderr is a terminal

    def __init__(self, *, metric: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float] | None = None,
                 act_overrides: Mapping[str, tuple[float, int]] | None = None,
                 weight_scales: Mapping[str, np.ndarray] | None = None, **options: Any):
        """``metric(ref, got) -> error`` replaces the budget metric (lower is better);
        ``act_overrides`` maps tensor names to ``(scale, zero_point)`` and ``weight_scales``
        maps node names to weight scales (QAT export); both skip calibration for them."""
        super().__init__(**options)
        self.metric = metric
        self.act_overrides = dict(act_overrides or {})
        self.weight_scales = {k: np.asarray(v, np.float32) for k, v in (weight_scales or {}).items()}
        self.report: dict[str, Any] = {}
        self._validate()

    # ------------------------------------------------------------------ options
    def _validate(self) -> None:
        o = self.options
        if o.calibration == "global" and o.mode == "static" and (o.threshold is None or o.threshold <= 0):
            raise PassOptionError("pass 'quantize': calibration=global needs a positive option 'threshold'")
        if not 0 < o.percentile <= 100:
            raise PassOptionError(f"pass 'quantize': option 'percentile' must be in (0, 100], got {o.percentile}")
        if o.block_size < 1:
            raise PassOptionError(f"pass 'quantize': option 'block_size' must be >= 1, got {o.block_size}")
        if o.num_bins < 128:
            raise PassOptionError(f"pass 'quantize': option 'num_bins' must be >= 128, got {o.num_bins}")
        if o.calib_batch_size < 1:
            raise PassOptionError(f"pass 'quantize': option 'calib_batch_size' must be >= 1, got {o.calib_batch_size}")
        if o.budget is not None and o.budget < 0:
            raise PassOptionError(f"pass 'quantize': option 'budget' must be >= 0, got {o.budget}")

    @property
    def act_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.options.activations == "uint8" else np.int8)

    def _progress(self) -> bool:
        if self.options.progress is not None:
            return self.options.progress
        import sys

        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    @property
    def weight_bits(self) -> int:
        return 4 if self.options.weights == "int4" else 8

    # ------------------------------------------------------------------ driver
    def requirements(self) -> frozenset[str]:
        o = self.options
        need = {"shapes", f"opset>={self.min_opset}"}
        if o.fold_bn:
            need.add("bn-folded")
        if o.mode == "static" and not self.act_overrides:
            need.add("calib-data")
        return frozenset(need)

    @property
    def min_opset(self) -> int:
        o = self.options
        if o.mode == "weight-only" and o.weights == "int4":
            return 21
        if o.mode == "dynamic":
            return 11  # DynamicQuantizeLinear; MatMulInteger / ConvInteger are opset 10
        return 13      # per-channel QDQ

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        self.report = {}
        changed = False
        if o.mode == "weight-only":
            n = self._weight_only(graph, ctx)
        elif o.mode == "dynamic":
            n = self._dynamic(graph, ctx)
        else:
            n = self._static(graph, ctx)
        if n and o.check_integer and o.mode != "weight-only":
            self._report_integer(graph, ctx)
        return PassResult(changed=changed or bool(n), artifacts=self.report)

    # ================================================================== planning
    def _candidates(self, graph: Graph) -> list[Node]:
        """Nodes the table knows and ``exclude`` does not name."""
        ops = self.options.ops or (DYNAMIC_DEFAULT_OPS if self.options.mode == "dynamic" else ())
        out = []
        for n in graph.nodes:
            spec = spec_for(n)
            if spec is None or _match(n, self.options.exclude) or (ops and n.op_type not in ops):
                continue
            out.append(n)
        return out

    def _act_inputs(self, node: Node, spec: OpQuant) -> list[int] | None:
        """Indices of activation inputs to quantize, or None when the node cannot be quantized."""
        idxs = range(len(node.inputs)) if spec.inputs is None else [i for i in spec.inputs if i < len(node.inputs)]
        out = []
        for i in idxs:
            v = node.inputs[i]
            if v is None:
                continue
            if spec.weight == i and v.is_const:
                continue
            if v.is_const:
                if spec.const_inputs and v.const.dtype == FLOAT32:
                    continue
                return None
            if not _is_f32(v):
                return None
            out.append(i)
        if spec.kind in ("compute", "elementwise") and not out:
            return None
        return out

    def plan(self, graph: Graph, included: set[str]) -> QuantPlan:
        """Decide which tensors / weights / biases to quantize for ``included`` nodes."""
        p = QuantPlan(included=set(included))
        asym = not self.options.symmetric
        outputs = {id(v) for v in graph.outputs}

        def request(v: Value, user: tuple[str, int] | None = None, share: str | None = None):
            r = p.tensors.setdefault(v.name, _Request())
            if user is None:
                r.all_users = True
            else:
                r.users.add(user)
            if share:
                r.share_from = share

        nodes = [n for n in graph.nodes if n.name in included]
        by_name = {n.name: n for n in nodes}
        for n in nodes:
            spec = spec_for(n)
            if spec is None or spec.kind not in ("compute", "elementwise"):
                continue
            idxs = self._act_inputs(n, spec)
            if idxs is None:
                continue
            for i in idxs:
                request(n.inputs[i], (n.name, i))
            if spec.weight is not None and len(n.inputs) > spec.weight:
                w = n.inputs[spec.weight]
                if w is not None and w.is_const and w.const.dtype == FLOAT32 and w.const.ndim >= 1:
                    p.weights.append((n.name, spec.weight))
                    if spec.bias is not None and len(n.inputs) > spec.bias and self.options.bias == "int32":
                        b = n.inputs[spec.bias]
                        if b is not None and b.is_const and b.const.dtype == FLOAT32 and b.const.ndim == 1 \
                                and 0 in idxs and float(n.attrs.get("beta", 1.0)) == 1.0 \
                                and float(n.attrs.get("alpha", 1.0)) == 1.0:
                            p.biases.append((n.name, spec.bias))
            if spec.const_inputs:
                for i, v in enumerate(n.inputs):
                    if v is not None and v.is_const and v.const.dtype == FLOAT32 and (spec.inputs is None or i in spec.inputs):
                        p.const_acts.append((n.name, i))
            if spec.output and n.outputs and _is_f32(n.outputs[0]) and id(n.outputs[0]) not in outputs:
                y = n.outputs[0]
                users = y.uses
                if asym and len(users) == 1 and users[0][1] == 0 and users[0][0].name in included \
                        and users[0][0].op_type in ("Relu", "Clip") and spec_for(users[0][0]) is not None \
                        and self._absorbable(users[0][0]):
                    p.absorbed[y.name] = users[0][0].name
                else:
                    request(y)
        # an absorbed Relu/Clip quantizes its output in place of its producer; one whose
        # producer stays float is quantized only where its consumers ask for it
        for act in set(p.absorbed.values()):
            y = by_name[act].outputs[0]
            if _is_f32(y) and id(y) not in outputs:
                request(y)
        # passthrough: quantized in -> quantized out with the same parameters
        for n in nodes:
            spec = spec_for(n)
            if spec is None or spec.kind != "passthrough" or not n.inputs or n.inputs[0] is None:
                continue
            x = n.inputs[0]
            r = p.tensors.get(x.name)
            if r is None or not _is_f32(x):
                continue
            if not r.all_users:
                r.users.add((n.name, 0))
            for y in n.outputs:
                if _is_f32(y) and id(y) not in outputs and y.uses:
                    request(y, share=x.name)
        return p

    @staticmethod
    def _absorbable(act: Node) -> bool:
        if act.op_type == "Relu":
            return True
        # Clip: bounds must be constants with min <= 0 (so the quantized range can clamp like it)
        lo = act.inputs[1] if len(act.inputs) > 1 else None
        if lo is None and "min" in act.attrs:
            return float(act.attrs["min"]) <= 0
        if lo is None:
            return False
        return lo.is_const and float(np.asarray(lo.const).reshape(-1)[0]) <= 0

    # ================================================================ calibration
    def _calibrate(self, graph: Graph, ctx: PassContext, names: list[str]) -> dict[str, ActQuant]:
        from ..runtime.calibrate import collect_histograms, compute_qparams, compute_range

        o = self.options
        out: dict[str, ActQuant] = {}
        todo = [n for n in names if n not in self.act_overrides]
        if todo:
            if not ctx.calib_data:
                raise InputDataError("pass 'quantize': static quantization needs calibration data (--calib-data)")
            hists = collect_histograms(graph, todo, ctx.calib_data, num_bins=o.num_bins,
                                       batch_size=o.calib_batch_size, progress=self._progress())
            self.histograms = hists
            for n in todo:
                try:
                    lo, hi = compute_range(hists[n], o.calibration, dtype=self.act_dtype, symmetric=o.symmetric,
                                           percentile=o.percentile, threshold=o.threshold)
                except ValueError as e:
                    raise PassOptionError(f"pass 'quantize': {e}") from None
                s, z = compute_qparams(lo, hi, self.act_dtype, symmetric=o.symmetric)
                out[n] = ActQuant(s, z, lo, hi)
        for n in names:
            if n in self.act_overrides:
                s, z = self.act_overrides[n]
                out[n] = ActQuant(np.float32(s), np.array(z).astype(self.act_dtype)[()])
        return out

    # ==================================================================== static
    def _static(self, graph: Graph, ctx: PassContext) -> int:
        o = self.options
        cands = self._candidates(graph)
        included = {n.name for n in cands}
        full = self.plan(graph, included)
        # calibrate every tensor any sub-plan may need (a superset: fallback plans reuse it)
        names: set[str] = set(full.tensors)
        for n in cands:
            spec = spec_for(n)
            if spec.kind in ("compute", "elementwise", "absorb"):
                for v in list(n.inputs) + list(n.outputs):
                    if v is not None and not v.is_const and _is_f32(v):
                        names.add(v.name)
        ordered = [v.name for v in graph.inputs if v.name in names] + \
                  [o_.name for n in graph.nodes for o_ in n.outputs if o_.name in names]
        qparams = self._calibrate(graph, ctx, ordered)
        plan = full
        if o.budget is not None or self.metric is not None:
            plan = self._fallback(graph, ctx, cands, qparams, full)
        self._reference = graph.copy() if o.check_integer else None
        count = self.apply(graph, plan, qparams)
        self._absorbed_into = {act: self._producer_name(self._reference, act) for act in self.removed_activations} \
            if self._reference is not None else {}
        nq = sum(1 for n in cands if n.name in plan.included and spec_for(n).kind == "compute")
        ctx.note(f"static {o.activations} activations ({'symmetric' if o.symmetric else 'asymmetric'}, "
                 f"calibration={o.calibration}), {o.weights} weights "
                 f"({'per-channel' if o.per_channel else 'per-tensor'}); {count} tensors quantized, "
                 f"{nq} compute layers")
        self.report.update(quantized_tensors=count, compute_layers=nq)
        return count

    # ------------------------------------------------------------------ fallback
    def _fallback(self, graph: Graph, ctx: PassContext, cands: list[Node], qparams, full: QuantPlan) -> QuantPlan:
        from ..runtime.ort import run, session

        o = self.options
        data = {k: v[: o.budget_samples] for k, v in (ctx.calib_data or {}).items()}
        if not data:
            raise InputDataError("pass 'quantize': the accuracy budget needs calibration data")
        metric = self.metric or _default_metric
        budget = o.budget if o.budget is not None else math.inf
        ref = run(session(graph), data)
        evaluations = 0
        ref_power = {k: float(np.mean(np.square(np.asarray(v, np.float64)))) or 1.0
                     for k, v in ref.items() if np.asarray(v).dtype.kind == "f"}

        def evaluate(included: set[str]) -> tuple[float, float]:
            """(budget metric, normalized output MSE) of the plan quantizing ``included``."""
            nonlocal evaluations
            g2 = graph.copy()
            self.apply(g2, self.plan(g2, included), qparams)
            evaluations += 1
            got = run(session(g2), data)
            nmse = sum(float(np.mean(np.square(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))))
                       / p for k, p in ref_power.items() if k in got)
            return float(metric(ref, got)), nmse

        def error(included: set[str]) -> float:
            return evaluate(included)[0]

        layers = [n.name for n in cands if spec_for(n).kind in ("compute", "elementwise")
                  and n.name in full.included]
        all_set = set(full.included)
        err_all, nmse_all = evaluate(all_set)
        self.report["error_all_quantized"] = err_all
        if err_all <= budget:
            ctx.note(f"budget {budget:g}: fully quantized error {err_all:.4g} is within budget")
            self.report["float_layers"] = []
            return full
        # sensitivity on the normalized output MSE (smoother than a max): leave-one-out = how
        # much the error drops when only this layer stays float; one-at-a-time = the error
        # of quantizing this layer alone (with its absorbed activations / passthroughs)
        if o.sensitivity == "leave-one-out":
            loo = {name: evaluate(all_set - {name}) for name in layers}
            sens = {n: nmse_all - loo[n][1] for n in layers}
        else:
            sens = {}
            for name in layers:
                solo = {name} | {n.name for n in cands if spec_for(n).kind in ("absorb", "passthrough")}
                sens[name] = evaluate(solo)[1]
        ranked = sorted(layers, key=lambda n: (-sens[n], layers.index(n)))
        self.report["sensitivity"] = {n: sens[n] for n in ranked}

        def err_k(k: int) -> float:
            return error(all_set - set(ranked[:k]))

        # exponential then binary search for the smallest k that meets the budget
        cache = {0: err_all}
        k = 1
        while k < len(ranked):
            cache[k] = err_k(k)
            if cache[k] <= budget:
                break
            k *= 2
        k = min(k, len(ranked))
        if k not in cache:
            cache[k] = err_k(k)
        lo, hi = k // 2, k
        if cache[hi] <= budget:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                cache[mid] = err_k(mid)
                if cache[mid] <= budget:
                    hi = mid
                else:
                    lo = mid
        else:  # even all layers float did not meet it (non-monotone metric): take the best
            hi = min(cache, key=lambda kk: cache[kk])
        kept = ranked[:hi]
        plan = self.plan(graph, all_set - set(kept))
        self.report["float_layers"] = kept
        self.report["error_final"] = cache[hi]
        ctx.note(f"budget {budget:g}: fully quantized error {err_all:.4g} exceeds it; kept {len(kept)} most "
                 f"sensitive layer(s) in float -> error {cache[hi]:.4g} ({evaluations} evaluations): "
                 f"{', '.join(kept[:20])}{' ...' if len(kept) > 20 else ''}")
        return plan

    # ===================================================================== apply
    def apply(self, graph: Graph, plan: QuantPlan, qparams: Mapping[str, ActQuant]) -> int:
        """Rewrite ``graph`` (in place) according to ``plan`` with activation ``qparams``."""
        o = self.options
        act_dt = self.act_dtype
        qp_of_dq: dict[int, ActQuant] = {}
        absorbed_acts = set(plan.absorbed.values())
        removed: list[str] = []
        count = 0
        by_name = {n.name: n for n in graph.nodes}
        for name, req in plan.tensors.items():
            v = graph.values.get(name)
            if v is None:
                continue
            root = plan.root(name)
            qp = qparams.get(root) or qparams.get(name)
            if qp is None:
                continue
            if req.all_users:
                uses = [(nd, i) for nd, i in v.uses if i >= 0]
            else:
                uses = [(by_name[nn], i) for nn, i in sorted(req.users) if nn in by_name]
                uses = [(nd, i) for nd, i in uses if nd.inputs[i] is v]
            if not uses:
                continue
            dq = self._insert_qdq(graph, v, qp, act_dt)
            qp_of_dq[id(dq)] = qp
            for nd, i in uses:
                nd.set_input(i, dq)
            count += 1
            act = v.producer
            if act is not None and act.name in absorbed_acts and req.all_users and not v.uses[1:] \
                    and self._clamps_like(act, qp, act_dt):
                # the quantizer clamps exactly like the activation: read the producer directly
                q = dq.producer.inputs[0].producer
                q.set_input(0, act.inputs[0])
                graph.remove_node(act)
                removed.append(act.name)
        # weights (and int32 biases, which need the input scale)
        wcache: dict[tuple, tuple[Value, np.ndarray]] = {}
        for nname, idx in plan.weights:
            n = by_name.get(nname)
            if n is None:
                continue
            spec = spec_for(n)
            w = n.inputs[idx]
            axis = spec.axis_of(n, w.const.ndim) if o.per_channel and w.const.ndim >= 2 else None
            key = (w.name, axis, self.weight_bits, nname if nname in self.weight_scales else None)
            if key not in wcache:
                wcache[key] = self._weight_dq(graph, n, w, axis)
            dqv, scale = wcache[key]
            n.set_input(idx, dqv)
            self.changed(n)
            if (nname, spec.bias) in plan.biases:
                qp = qp_of_dq.get(id(n.inputs[0]))
                if qp is not None:
                    self._bias_dq(graph, n, spec, scale, qp.scale, axis)
        for nname, idx in plan.const_acts:
            n = by_name.get(nname)
            if n is None:
                continue
            c = n.inputs[idx]
            if c is None or not c.is_const:
                continue
            from ..runtime.calibrate import compute_qparams

            arr = c.const.astype(np.float32)
            s, z = compute_qparams(float(arr.min()) if arr.size else 0.0, float(arr.max()) if arr.size else 0.0,
                                   act_dt, symmetric=o.symmetric)
            qmin, qmax = np.iinfo(act_dt).min, np.iinfo(act_dt).max
            q = np.clip(np.round(arr / s) + int(z), qmin, qmax).astype(act_dt)
            dqv = self._dq_const(graph, n, c.name, q, np.asarray(s, np.float32), np.asarray(z, act_dt), None)
            n.set_input(idx, dqv)
        self._drop_unused(graph)
        self.removed_activations = removed
        return count

    @staticmethod
    def _producer_name(g: Graph | None, node_name: str) -> str | None:
        if g is None:
            return None
        n = next((n for n in g.nodes if n.name == node_name), None)
        p = n.inputs[0].producer if n is not None and n.inputs and n.inputs[0] is not None else None
        return p.name if p is not None else None

    @staticmethod
    def _clamps_like(act: Node, qp: ActQuant, act_dt: np.dtype) -> bool:
        """True when ``Q(act(x)) == Q(x)`` for every x: Relu / Clip(lo, hi) whose bounds the
        quantized range reproduces (zero point at the type minimum for a 0 lower bound)."""
        info = np.iinfo(act_dt)
        z = int(qp.zero_point)
        s = float(qp.scale)
        q_lo, q_hi = (info.min - z) * s, (info.max - z) * s
        if act.op_type == "Relu":
            return z == info.min
        lo = act.inputs[1] if len(act.inputs) > 1 else None
        hi = act.inputs[2] if len(act.inputs) > 2 else None
        lo_v = float(np.asarray(lo.const).reshape(-1)[0]) if lo is not None and lo.is_const else (
            float(act.attrs["min"]) if "min" in act.attrs else -np.inf)
        hi_v = float(np.asarray(hi.const).reshape(-1)[0]) if hi is not None and hi.is_const else (
            float(act.attrs["max"]) if "max" in act.attrs else np.inf)
        if (lo is not None and not lo.is_const) or (hi is not None and not hi.is_const):
            return False
        # the grid must clamp at exactly the activation's bounds (or inside them, where
        # the activation does not act on any value the grid keeps)
        tol = 1e-5 * max(abs(q_lo), abs(q_hi), 1e-12)  # float32 rounding of s * (qmax - z)
        ok_lo = (lo_v == 0.0 and z == info.min) or q_lo >= lo_v - tol
        ok_hi = q_hi <= hi_v + tol
        return ok_lo and ok_hi

    # ---------------------------------------------------------------- rewriting
    def _insert_qdq(self, g: Graph, v: Value, qp: ActQuant, act_dt: np.dtype) -> Value:
        s = g.add_initializer(f"{v.name}_scale", np.asarray(qp.scale, dtype=np.float32))
        z = g.add_initializer(f"{v.name}_zero_point", np.asarray(qp.zero_point, dtype=act_dt))
        qv = Value(g.unique_name(f"{v.name}_quantized"), act_dt, v.shape)
        dv = Value(g.unique_name(f"{v.name}_dequantized"), FLOAT32, v.shape)
        meta = {"source": v.producer.source if v.producer is not None else v.name, "quant_helper": True}
        if v.producer is not None:
            q = g.add_node("QuantizeLinear", [v, s, z], [qv], name=f"{v.name}_QuantizeLinear", after=v.producer,
                           meta=dict(meta))
        else:
            q = g.add_node("QuantizeLinear", [v, s, z], [qv], name=f"{v.name}_QuantizeLinear",
                           before=g.nodes[0] if g.nodes else None, meta=dict(meta))
        dq = g.add_node("DequantizeLinear", [qv, s, z], [dv], name=f"{v.name}_DequantizeLinear", after=q,
                        meta=dict(meta))
        self.changed(q)
        self.changed(dq)
        return dv

    def _dq_const(self, g: Graph, n: Node, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
                  axis: int | None, block_size: int | None = None) -> Value:
        qv = g.add_initializer(f"{base}_quantized", q)
        sv = g.add_initializer(f"{base}_scale", scale)
        ins = [qv, sv]
        if zp is not None:
            ins.append(g.add_initializer(f"{base}_zero_point", zp))
        attrs = {}
        if axis is not None and scale.ndim > 0:
            attrs["axis"] = int(axis)
        if block_size:
            attrs["block_size"] = int(block_size)
        out = Value(g.unique_name(f"{base}_dequantized"), FLOAT32, tuple(q.shape))
        dq = g.add_node("DequantizeLinear", ins, [out], attrs, name=f"{base}_DequantizeLinear", before=n,
                        meta={"source": n.source, "quant_helper": True})
        self.changed(dq)
        return out

    def _weight_dq(self, g: Graph, n: Node, w: Value, axis: int | None) -> tuple[Value, np.ndarray]:
        scale = self.weight_scales.get(n.name)
        if scale is not None and axis is not None and scale.size != w.const.shape[axis]:
            scale = scale.reshape(-1)
        q, s = quantize_weight(w.const, axis, bits=self.weight_bits, scale=scale)
        zp = np.zeros(s.shape, dtype=np.int8)
        return self._dq_const(g, n, w.name, q, s.astype(np.float32), zp, axis), s

    def _bias_dq(self, g: Graph, n: Node, spec: OpQuant, w_scale: np.ndarray, x_scale, axis) -> None:
        b = n.inputs[spec.bias]
        bias = b.const.astype(np.float32)
        ws = np.asarray(w_scale, np.float32).reshape(-1)
        if ws.size not in (1, bias.size):
            if bias.size % ws.size:
                return
            ws = np.tile(ws, bias.size // ws.size)  # ConvTranspose with groups
        scale = (np.float32(x_scale) * ws).astype(np.float32)
        if scale.size == 1:
            scale = np.full(bias.shape, scale.reshape(()), np.float32)
        q = np.clip(np.round(bias.astype(np.float64) / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        zp = np.zeros(bias.shape, np.int32)
        dqv = self._dq_const(g, n, b.name, q, scale, zp, 0)
        n.set_input(spec.bias, dqv)

    @staticmethod
    def _drop_unused(g: Graph) -> None:
        for v in list(g.initializers.values()):
            if not v.uses and v not in g.outputs:
                g.remove_initializer(v)

    # ==================================================================== dynamic
    def _dynamic(self, graph: Graph, ctx: PassContext) -> int:
        o = self.options
        done = 0
        dq_cache: dict[str, tuple[Value, Value, Value]] = {}
        skipped: list[str] = []
        for n in list(self._candidates(graph)):
            spec = spec_for(n)
            if not spec.dynamic:
                continue
            x = n.inputs[0]
            w = n.inputs[1] if len(n.inputs) > 1 else None
            if not _is_f32(x) or w is None or not w.is_const or w.const.dtype != FLOAT32:
                continue
            if n.op_type == "Conv":
                ok = self._dynamic_conv(graph, n, dq_cache)
            else:
                ok = self._dynamic_matmul(graph, n, dq_cache)
            if ok:
                done += 1
            else:
                skipped.append(n.name)
        self._drop_unused(graph)
        ctx.note(f"dynamic quantization: {done} layer(s) on DynamicQuantizeLinear + MatMulInteger/ConvInteger "
                 f"({o.weights} weights, {'per-channel' if o.per_channel else 'per-tensor'})"
                 + (f"; left float: {', '.join(skipped[:10])}" if skipped else ""))
        self.report.update(dynamic_layers=done)
        return done

    def _dyn_quant(self, g: Graph, x: Value, before: Node, cache) -> tuple[Value, Value, Value]:
        if x.name in cache:
            return cache[x.name]
        outs = [Value(g.unique_name(f"{x.name}_quantized"), np.uint8, x.shape),
                Value(g.unique_name(f"{x.name}_scale"), FLOAT32, ()),
                Value(g.unique_name(f"{x.name}_zero_point"), np.uint8, ())]
        anchor = x.producer
        kw = {"after": anchor} if anchor is not None else {"before": g.nodes[0]}
        nd = g.add_node("DynamicQuantizeLinear", [x], outs, name=f"{x.name}_DynamicQuantizeLinear",
                        meta={"source": anchor.source if anchor else x.name, "quant_helper": True}, **kw)
        self.changed(nd)
        cache[x.name] = tuple(nd.outputs)
        return cache[x.name]

    def _rescale(self, g: Graph, anchor: Node, acc: Value, x_scale: Value, w_scale: np.ndarray,
                 bias: np.ndarray | None, y: Value, scale_shape: tuple[int, ...], base: str, source: str) -> None:
        """``y = Cast(acc) * (x_scale * w_scale) [+ bias]`` inserted after ``anchor``."""
        prev = anchor

        def mk(op, ins, out, attrs=None, suffix=""):
            nonlocal prev
            nd = g.add_node(op, ins, [out], attrs, name=f"{base}{suffix}", after=prev,
                            meta={"source": source, "quant_helper": True})
            self.changed(nd)
            prev = nd

        accf = Value(g.unique_name(f"{base}_acc_float"), FLOAT32, y.shape)
        mk("Cast", [acc], accf, {"to": 1}, "_cast")
        ws = g.add_initializer(f"{base}_weight_scale", np.asarray(w_scale, np.float32).reshape(scale_shape))
        s = Value(g.unique_name(f"{base}_output_scale"), FLOAT32, None)
        mk("Mul", [x_scale, ws], s, None, "_scale")
        scaled = y if bias is None else Value(g.unique_name(f"{base}_scaled"), FLOAT32, y.shape)
        mk("Mul", [accf, s], scaled, None, "_rescale")
        if bias is not None:
            bv = g.add_initializer(f"{base}_bias", np.asarray(bias, np.float32).reshape(scale_shape))
            mk("Add", [scaled, bv], y, None, "_bias")

    def _replace_with_integer(self, g: Graph, n: Node, op: str, ins: list[Value], attrs: dict, x_scale: Value,
                              w_scale: np.ndarray, bias, scale_shape) -> None:
        name, source, y = n.name, n.source, n.outputs[0]
        attr_types = {k: t for k, t in n.attr_types.items() if k in attrs}
        idx = g.nodes.index(n)
        anchor = g.nodes[idx - 1] if idx > 0 else None
        meta = dict(n.meta)
        g.remove_node(n, force=True)
        acc = Value(g.unique_name(f"{name}_acc"), np.int32, y.shape)
        kw = {"after": anchor} if anchor is not None else {"before": g.nodes[0]}
        node = g.add_node(op, ins, [acc], attrs, name=name, meta=meta, **kw)
        node.attr_types = attr_types
        self.changed(node)
        self._rescale(g, node, acc, x_scale, w_scale, bias, y, scale_shape, name, source)

    def _dynamic_conv(self, g: Graph, n: Node, cache) -> bool:
        w = n.inputs[1].const
        if w.ndim < 3:
            return False
        b = n.inputs[2] if len(n.inputs) > 2 else None
        if b is not None and not b.is_const:
            return False
        xq, xs, xz = self._dyn_quant(g, n.inputs[0], n, cache)
        axis = 0 if self.options.per_channel else None
        q, s = quantize_weight(w, axis, bits=self.weight_bits)
        wq = g.add_initializer(f"{n.inputs[1].name}_quantized", q)
        wz = g.add_initializer(f"{n.inputs[1].name}_zero_point", np.array(0, np.int8))  # ConvInteger: scalar zp only
        shape = (1, -1) + (1,) * (w.ndim - 2)
        self._replace_with_integer(g, n, "ConvInteger", [xq, wq, xz, wz], dict(n.attrs), xs, s.reshape(-1),
                                   None if b is None else b.const, shape)
        return True

    def _dynamic_matmul(self, g: Graph, n: Node, cache) -> bool:
        w = n.inputs[1].const
        alpha = 1.0
        bias = None
        if n.op_type == "Gemm":
            if int(n.attrs.get("transA", 0)) or w.ndim != 2:
                return False
            alpha = float(n.attrs.get("alpha", 1.0))
            if int(n.attrs.get("transB", 0)):
                w = w.T
            if len(n.inputs) > 2 and n.inputs[2] is not None:
                c = n.inputs[2]
                if not c.is_const:
                    return False
                cb = float(n.attrs.get("beta", 1.0)) * c.const.astype(np.float32)
                if cb.size == w.shape[1] and (cb.ndim == 1 or cb.shape[0] == 1):
                    bias = cb.reshape(-1)
                elif cb.size == 1:
                    bias = np.full(w.shape[1], cb.reshape(-1)[0], np.float32)
                else:
                    return False
        elif w.ndim != 2:
            return False
        xq, xs, xz = self._dyn_quant(g, n.inputs[0], n, cache)
        axis = 1 if self.options.per_channel else None
        q, s = quantize_weight(np.ascontiguousarray(w), axis, bits=self.weight_bits)
        wq = g.add_initializer(f"{n.inputs[1].name}_quantized", q)
        wz = g.add_initializer(f"{n.inputs[1].name}_zero_point", np.zeros(s.shape, np.int8))
        self._replace_with_integer(g, n, "MatMulInteger", [xq, wq, xz, wz], {}, xs, (s * alpha).reshape(-1), bias, (-1,))
        return True

    # ================================================================ weight-only
    def _weight_only(self, graph: Graph, ctx: PassContext) -> int:
        o = self.options
        int4 = o.weights == "int4"
        done = []
        cache: dict[tuple, Value] = {}
        for n in self._candidates(graph):
            spec = spec_for(n)
            if spec.weight is None or len(n.inputs) <= spec.weight:
                continue
            w = n.inputs[spec.weight]
            if w is None or not w.is_const or w.const.dtype != FLOAT32 or w.const.ndim < 2:
                continue
            rank = w.const.ndim
            if int4:
                axis = spec.reduce_axis_of(n, rank)
                key = (w.name, axis, "int4")
                if key not in cache:
                    import ml_dtypes

                    bs = min(o.block_size, w.const.shape[axis])
                    q, s = quantize_weight(w.const, axis, bits=4, block_size=bs, storage=np.int8)
                    cache[key] = self._dq_const(graph, n, w.name, q.astype(ml_dtypes.int4), s, None, axis, bs)
            else:
                axis = spec.axis_of(n, rank) if o.per_channel else None
                key = (w.name, axis, "int8")
                if key not in cache:
                    q, s = quantize_weight(w.const, axis, bits=8)
                    cache[key] = self._dq_const(graph, n, w.name, q, s, np.zeros(s.shape, np.int8), axis)
            n.set_input(spec.weight, cache[key])
            self.changed(n)
            done.append(n.name)
        self._drop_unused(graph)
        ctx.note(f"weight-only: {len(done)} weight(s) quantized to "
                 f"{'INT4 blocks of ' + str(o.block_size) if int4 else 'int8 ' + ('per-channel' if o.per_channel else 'per-tensor')}")
        self.report.update(weight_only_layers=len(done))
        return len(done)

    # ================================================================== reporting
    def _report_integer(self, graph: Graph, ctx: PassContext) -> None:
        from ..runtime.calibrate import integer_fraction

        shapes = None
        if ctx.calib_data:
            shapes = {k: (1,) + tuple(np.shape(v)[1:]) for k, v in ctx.calib_data.items()}
        try:
            rep = integer_fraction(graph, input_shapes=shapes, reference=getattr(self, "_reference", None),
                                   absorbed=getattr(self, "_absorbed_into", None))
        except Exception as e:  # reporting must not break the pass
            ctx.note(f"integer path: could not be checked ({str(e).splitlines()[0]})")
            return
        self.report["integer_fraction"] = rep.fraction
        self.report["integer_report"] = rep
        ctx.note(f"integer path: {rep.summary()}")
