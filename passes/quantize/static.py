"""Static (QDQ) quantization: calibrate activations on the calibration data, then rewrite the
graph by a :class:`~nnsculpt.passes.quantize.placement.QuantPlan` -- activation Q/DQ pairs,
int8 weights, int32 biases, quantized constant inputs, absorbed Relu / Clip activations --
optionally after the accuracy-budget search chose which layers stay float. Recurrent layers
(LSTM -> DynamicQuantizeLSTM, opt-in GRU weight QDQ) are rewritten after the QDQ rewrite by
:func:`~nnsculpt.passes.quantize.recurrent.run_recurrent` (the FLOPs reference, taken before,
keeps the float LSTM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ...ir.errors import InputDataError, PassOptionError
from ...ir.graph import Graph, Node, Value
from . import budget
from .placement import QuantPlan, candidates, plan
from .recurrent import run_recurrent
from .state import QuantRun
from .table import spec_for
from .weights import FLOAT32, bias_dq, dq_const, drop_unused, is_f32, weight_dq

if TYPE_CHECKING:
    from . import Quantize

__all__ = ["ActQuant", "Applied", "run_static", "calibrate", "apply", "clamps_like"]


@dataclass
class ActQuant:
    """Quantization parameters of one activation tensor."""

    scale: np.float32
    zero_point: Any          # numpy scalar of the activation type
    lo: float = 0.0
    hi: float = 0.0


@dataclass
class Applied:
    """What one :func:`apply` did."""

    count: int = 0                                          # activation tensors quantized
    removed_activations: list[str] = field(default_factory=list)  # absorbed Relu / Clip removed


# ============================================================================== driver
def run_static(q: "Quantize", graph: Graph, state: QuantRun) -> int:
    """Quantize ``graph`` in place; returns the number of activation tensors quantized."""
    o = q.options
    ctx = state.ctx
    cands = candidates(graph, o)
    included = {n.name for n in cands}
    full = plan(graph, included, o)
    # calibrate every tensor any sub-plan may need (a superset: fallback plans reuse it)
    names: set[str] = set(full.tensors)
    for n in cands:
        spec = spec_for(n)
        if spec.kind in ("compute", "elementwise", "absorb"):
            for v in list(n.inputs) + list(n.outputs):
                if v is not None and not v.is_const and is_f32(v):
                    names.add(v.name)
    ordered = [v.name for v in graph.inputs if v.name in names] + \
              [o_.name for n in graph.nodes for o_ in n.outputs if o_.name in names]
    qparams = calibrate(q, graph, state, ordered)
    chosen = full
    if o.budget is not None or q.metric is not None:
        def quantized_copy(nodes: set[str]) -> Graph:
            g2 = graph.copy()
            apply(q, g2, plan(g2, nodes, o), qparams)  # a trial: what it did is dropped with the copy
            return g2

        keep = budget.search(graph, state, cands, full.included, quantized_copy, options=o, metric=q.metric)
        if keep != full.included:
            chosen = plan(graph, keep, o)
    state.reference = graph.copy() if o.check_integer else None
    done = apply(q, graph, chosen, qparams)
    state.removed_activations = done.removed_activations
    state.absorbed_into = {act: producer_name(state.reference, act) for act in done.removed_activations} \
        if state.reference is not None else {}
    nq = sum(1 for n in cands if n.name in chosen.included and spec_for(n).kind == "compute")
    ctx.note(f"static {o.activations} activations ({'symmetric' if o.symmetric else 'asymmetric'}, "
             f"calibration={o.calibration}), {o.weights} weights "
             f"({'per-channel' if o.per_channel else 'per-tensor'}); {done.count} tensors quantized, "
             f"{nq} compute layers")
    state.artifacts.update(quantized_tensors=done.count, compute_layers=nq)
    return done.count + run_recurrent(q, graph, state)


# ========================================================================= calibration
def calibrate(q: "Quantize", graph: Graph, state: QuantRun, names: list[str]) -> dict[str, ActQuant]:
    """Activation parameters of ``names``: from ``q.act_overrides`` where given, else from
    histograms collected on the calibration data (kept in ``state.histograms``)."""
    from ...runtime.calibrate import clipped_share, collect_histograms, compute_qparams, compute_range

    o = q.options
    ctx = state.ctx
    act_dt = q.act_dtype
    out: dict[str, ActQuant] = {}
    todo = [n for n in names if n not in q.act_overrides]
    if todo:
        if not ctx.calib_data:
            raise InputDataError("pass 'quantize': static quantization needs calibration data (--calib-data)")
        hists = collect_histograms(graph, todo, ctx.calib_data, num_bins=o.num_bins,
                                   batch_size=o.calib_batch_size, progress=q.show_progress())
        state.histograms = hists
        for n in todo:
            try:
                lo, hi = compute_range(hists[n], o.calibration, dtype=act_dt, symmetric=o.symmetric,
                                       percentile=o.percentile, threshold=o.threshold)
            except ValueError as e:
                raise PassOptionError(f"pass 'quantize': {e}") from None
            s, z = compute_qparams(lo, hi, act_dt, symmetric=o.symmetric)
            out[n] = ActQuant(s, z, lo, hi)
        summary = {n: _histogram_summary(hists[n], out[n], o.calibration) for n in todo}
        # for the report's plots: what every method would choose, on the 12 tensors the chosen one clips most
        for n in sorted(todo, key=lambda t: -clipped_share(summary[t]))[:12]:
            ranges = {}
            for m in ("max", "percentile", "mse", "kl"):
                try:
                    ranges[m] = [float(x) for x in compute_range(hists[n], m, dtype=act_dt, symmetric=o.symmetric,
                                                                 percentile=o.percentile)]
                except ValueError:
                    continue
            summary[n]["ranges"] = ranges
        state.artifacts["calibration"] = summary
    for n in names:
        if n in q.act_overrides:
            s, z = q.act_overrides[n]
            out[n] = ActQuant(np.float32(s), np.array(z).astype(act_dt)[()])
    return out


def _histogram_summary(h, q: ActQuant, method: str, bins: int = 48) -> dict:
    """A small picture of one calibration histogram for the report: ``bins`` counts over [min, max]
    of the data, and the clip range the method chose."""
    lo_d, hi_d = float(h.min), float(h.max)
    if not (np.isfinite(lo_d) and np.isfinite(hi_d)) or hi_d <= lo_d:
        return {"method": method, "min": lo_d, "max": hi_d, "lo": float(q.lo), "hi": float(q.hi), "counts": []}
    counts, _ = np.histogram(h.centers(), bins=bins, range=(lo_d, hi_d), weights=h.counts)
    return {"method": method, "min": lo_d, "max": hi_d, "lo": float(q.lo), "hi": float(q.hi),
            "counts": [int(c) for c in counts]}


# =============================================================================== apply
def apply(q: "Quantize", graph: Graph, plan: QuantPlan, qparams: Mapping[str, ActQuant]) -> Applied:
    """Rewrite ``graph`` (in place) according to ``plan`` with activation ``qparams``. Returns
    what it did; records nothing anywhere else (the budget search runs it on copies)."""
    o = q.options
    act_dt = q.act_dtype
    qp_of_dq: dict[int, ActQuant] = {}
    absorbed_acts = set(plan.absorbed.values())
    done = Applied()
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
        dq = insert_qdq(q, graph, v, qp, act_dt)
        qp_of_dq[id(dq)] = qp
        for nd, i in uses:
            nd.set_input(i, dq)
        done.count += 1
        act = v.producer
        if act is not None and act.name in absorbed_acts and req.all_users and not v.uses[1:] \
                and clamps_like(act, qp, act_dt):
            # the quantizer clamps exactly like the activation: read the producer directly
            qn = dq.producer.inputs[0].producer
            qn.set_input(0, act.inputs[0])
            graph.remove_node(act)
            done.removed_activations.append(act.name)
    # weights (and int32 biases, which need the input scale)
    wcache: dict[tuple, tuple[Value, np.ndarray]] = {}
    for nname, idx in plan.weights:
        n = by_name.get(nname)
        if n is None:
            continue
        spec = spec_for(n)
        w = n.inputs[idx]
        axis = spec.axis_of(n, w.const.ndim) if o.per_channel and w.const.ndim >= 2 else None
        key = (w.name, axis, q.weight_bits, nname if nname in q.weight_scales else None)
        if key not in wcache:
            wcache[key] = weight_dq(graph, n, w, axis, bits=q.weight_bits, scale=q.weight_scales.get(n.name),
                                    stamp=q.changed)
        dqv, scale = wcache[key]
        n.set_input(idx, dqv)
        q.changed(n)
        if (nname, spec.bias) in plan.biases:
            qp = qp_of_dq.get(id(n.inputs[0]))
            if qp is not None:
                bias_dq(graph, n, spec.bias, scale, qp.scale, stamp=q.changed)
    for nname, idx in plan.const_acts:
        n = by_name.get(nname)
        if n is None:
            continue
        c = n.inputs[idx]
        if c is None or not c.is_const:
            continue
        from ...runtime.calibrate import compute_qparams

        arr = c.const.astype(np.float32)
        s, z = compute_qparams(float(arr.min()) if arr.size else 0.0, float(arr.max()) if arr.size else 0.0,
                               act_dt, symmetric=o.symmetric)
        qmin, qmax = np.iinfo(act_dt).min, np.iinfo(act_dt).max
        qc = np.clip(np.round(arr / s) + int(z), qmin, qmax).astype(act_dt)
        dqv = dq_const(graph, n, c.name, qc, np.asarray(s, np.float32), np.asarray(z, act_dt), None,
                       stamp=q.changed)
        n.set_input(idx, dqv)
    drop_unused(graph)
    return done


def insert_qdq(q: "Quantize", g: Graph, v: Value, qp: ActQuant, act_dt: np.dtype) -> Value:
    """``DequantizeLinear(QuantizeLinear(v))`` right after ``v``'s producer; returns the DQ output."""
    s = g.add_initializer(f"{v.name}_scale", np.asarray(qp.scale, dtype=np.float32))
    z = g.add_initializer(f"{v.name}_zero_point", np.asarray(qp.zero_point, dtype=act_dt))
    qv = Value(g.unique_name(f"{v.name}_quantized"), act_dt, v.shape)
    dv = Value(g.unique_name(f"{v.name}_dequantized"), FLOAT32, v.shape)
    meta = {"source": v.producer.source if v.producer is not None else v.name, "quant_helper": True}
    if v.producer is not None:
        qn = g.add_node("QuantizeLinear", [v, s, z], [qv], name=f"{v.name}_QuantizeLinear", after=v.producer,
                        meta=dict(meta))
    else:
        qn = g.add_node("QuantizeLinear", [v, s, z], [qv], name=f"{v.name}_QuantizeLinear",
                        before=g.nodes[0] if g.nodes else None, meta=dict(meta))
    dq = g.add_node("DequantizeLinear", [qv, s, z], [dv], name=f"{v.name}_DequantizeLinear", after=qn,
                    meta=dict(meta))
    q.changed(qn)
    q.changed(dq)
    return dv


def producer_name(g: Graph | None, node_name: str) -> str | None:
    """Name of the producer of ``node_name``'s first input in ``g``."""
    if g is None:
        return None
    n = next((n for n in g.nodes if n.name == node_name), None)
    p = n.inputs[0].producer if n is not None and n.inputs and n.inputs[0] is not None else None
    return p.name if p is not None else None


def clamps_like(act: Node, qp: ActQuant, act_dt: np.dtype) -> bool:
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
