"""Dynamic quantization: ``DynamicQuantizeLinear`` on the input and ``MatMulInteger`` /
``ConvInteger`` on int8 weights, rescaled by ``Cast -> Mul(s_x * s_w) -> Add(bias)`` (ORT fuses
the MatMul form into DynamicQuantizeMatMul). No calibration. Recurrent layers (LSTM ->
DynamicQuantizeLSTM, opt-in GRU weight QDQ) by
:func:`~nnsculpt.passes.quantize.recurrent.run_recurrent`; the float graph before the rewrite is
the FLOPs reference of the integer-path report (ONNX shape inference does not know the
com.microsoft ops, so the quantized graph's own shapes may be incomplete)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...ir.graph import Graph, Node, Value
from .placement import candidates
from .recurrent import run_recurrent
from .state import QuantRun
from .table import spec_for
from .weights import FLOAT32, drop_unused, is_f32, quantize_weight

if TYPE_CHECKING:
    from . import Quantize

__all__ = ["run_dynamic"]

#: input name -> the (quantized, scale, zero point) outputs of its DynamicQuantizeLinear
DynCache = dict[str, tuple[Value, Value, Value]]


def run_dynamic(q: "Quantize", graph: Graph, state: QuantRun) -> int:
    """Quantize ``graph`` in place; returns the number of layers rewritten."""
    o = q.options
    done = 0
    dq_cache: DynCache = {}
    skipped: list[str] = []
    state.reference = graph.copy() if o.check_integer else None
    for n in list(candidates(graph, o)):
        spec = spec_for(n)
        if not spec.dynamic:
            continue
        x = n.inputs[0]
        w = n.inputs[1] if len(n.inputs) > 1 else None
        if not is_f32(x) or w is None or not w.is_const or w.const.dtype != FLOAT32:
            continue
        if n.op_type == "Conv":
            ok = _dynamic_conv(q, graph, n, dq_cache)
        else:
            ok = _dynamic_matmul(q, graph, n, dq_cache)
        if ok:
            done += 1
        else:
            skipped.append(n.name)
    drop_unused(graph)
    state.ctx.note(f"dynamic quantization: {done} layer(s) on DynamicQuantizeLinear + MatMulInteger/ConvInteger "
                   f"({o.weights} weights, {'per-channel' if o.per_channel else 'per-tensor'})"
                   + (f"; left float: {', '.join(skipped[:10])}" if skipped else ""))
    state.artifacts.update(dynamic_layers=done)
    return done + run_recurrent(q, graph, state)


def _dyn_quant(q: "Quantize", g: Graph, x: Value, cache: DynCache) -> tuple[Value, Value, Value]:
    if x.name in cache:
        return cache[x.name]
    outs = [Value(g.unique_name(f"{x.name}_quantized"), np.uint8, x.shape),
            Value(g.unique_name(f"{x.name}_scale"), FLOAT32, ()),
            Value(g.unique_name(f"{x.name}_zero_point"), np.uint8, ())]
    anchor = x.producer
    kw = {"after": anchor} if anchor is not None else {"before": g.nodes[0]}
    nd = g.add_node("DynamicQuantizeLinear", [x], outs, name=f"{x.name}_DynamicQuantizeLinear",
                    meta={"source": anchor.source if anchor else x.name, "quant_helper": True}, **kw)
    q.changed(nd)
    cache[x.name] = tuple(nd.outputs)
    return cache[x.name]


def _rescale(q: "Quantize", g: Graph, anchor: Node, acc: Value, x_scale: Value, w_scale: np.ndarray,
             bias: np.ndarray | None, y: Value, scale_shape: tuple[int, ...], base: str, source: str) -> None:
    """``y = Cast(acc) * (x_scale * w_scale) [+ bias]`` inserted after ``anchor``."""
    prev = anchor

    def mk(op, ins, out, attrs=None, suffix=""):
        nonlocal prev
        nd = g.add_node(op, ins, [out], attrs, name=f"{base}{suffix}", after=prev,
                        meta={"source": source, "quant_helper": True})
        q.changed(nd)
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


def _replace_with_integer(q: "Quantize", g: Graph, n: Node, op: str, ins: list[Value], attrs: dict,
                          x_scale: Value, w_scale: np.ndarray, bias, scale_shape) -> None:
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
    q.changed(node)
    _rescale(q, g, node, acc, x_scale, w_scale, bias, y, scale_shape, name, source)


def _dynamic_conv(q: "Quantize", g: Graph, n: Node, cache: DynCache) -> bool:
    w = n.inputs[1].const
    if w.ndim < 3:
        return False
    b = n.inputs[2] if len(n.inputs) > 2 else None
    if b is not None and not b.is_const:
        return False
    xq, xs, xz = _dyn_quant(q, g, n.inputs[0], cache)
    axis = 0 if q.options.per_channel else None
    qw, s = quantize_weight(w, axis, bits=q.weight_bits)
    wq = g.add_initializer(f"{n.inputs[1].name}_quantized", qw)
    wz = g.add_initializer(f"{n.inputs[1].name}_zero_point", np.array(0, np.int8))  # ConvInteger: scalar zp only
    shape = (1, -1) + (1,) * (w.ndim - 2)
    _replace_with_integer(q, g, n, "ConvInteger", [xq, wq, xz, wz], dict(n.attrs), xs, s.reshape(-1),
                          None if b is None else b.const, shape)
    return True


def _dynamic_matmul(q: "Quantize", g: Graph, n: Node, cache: DynCache) -> bool:
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
    xq, xs, xz = _dyn_quant(q, g, n.inputs[0], cache)
    axis = 1 if q.options.per_channel else None
    qw, s = quantize_weight(np.ascontiguousarray(w), axis, bits=q.weight_bits)
    wq = g.add_initializer(f"{n.inputs[1].name}_quantized", qw)
    wz = g.add_initializer(f"{n.inputs[1].name}_zero_point", np.zeros(s.shape, np.int8))
    _replace_with_integer(q, g, n, "MatMulInteger", [xq, wq, xz, wz], {}, xs, (s * alpha).reshape(-1), bias, (-1,))
    return True
