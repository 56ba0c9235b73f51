"""Recurrent layers: LSTM -> ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM``; GRU weights
as int8 behind DequantizeLinear (opt-in). Called by the static and dynamic strategies.

Rules (per op, from :data:`~nnsculpt.passes.quantize.table.RECURRENT_TABLE`):

* **LSTM** (quantized by default, in ``mode=static`` and ``mode=dynamic``; ``ops=[...]``
  given: only when it lists ``LSTM``): a default-domain ``LSTM`` with constant float32 ``W``
  ``[dirs, 4H, I]`` and ``R`` ``[dirs, 4H, H]`` becomes ``DynamicQuantizeLSTM`` (domain
  ``com.microsoft``, opset 1, declared in the model's ``opset_import``) with the same name,
  provenance, outputs and attributes (``layout=0`` dropped: the kernel has no such attribute).
  ``W`` / ``R`` are quantized symmetric int8 (``weights=int4``: 4-bit values in int8
  storage), one scale per gate row -- per direction and output channel, ``[dirs, 4H]`` --
  with ``per_channel`` (default), else one per direction (``[dirs]``); zero points 0; then
  transposed to the kernel's ``[dirs, I, 4H]`` / ``[dirs, H, 4H]`` layout. ``X`` is quantized
  to uint8 dynamically inside the kernel at every call (no calibration: activation ranges of a
  recurrence vary per step). ``B``, ``sequence_lens``, ``initial_h`` / ``initial_c`` and the
  peepholes ``P`` are carried unchanged (ORT 1.32 runs every direction, peepholes,
  ``sequence_lens``, ``clip``, ``input_forget`` and custom activations -- checked against the
  float LSTM in ``tests/test_quantize_recurrent.py``).
* **GRU**: ORT has no integer GRU kernel, so quantizing it only makes the file smaller (its
  compute stays float, the int8 weights are dequantized when the session is built). By
  default it is left float with a note saying so; with ``GRU`` in ``ops=[...]`` its ``W`` and
  ``R`` are stored int8 (per channel along axis 1, the gate rows, shared by both directions of
  a bidirectional GRU; per tensor when ``per_channel=false`` or below opset 13) behind a
  ``DequantizeLinear`` (weight QDQ).

Left float, with a note naming the node and why: ``layout=1`` LSTMs (DynamicQuantizeLSTM has
no ``layout`` attribute, its X is ``[seq, batch, input]``; ORT 1.32's float LSTM kernel refuses
layout=1 too, and ORT's own quantizer silently drops the attribute), non-constant or non-float32 ``W`` / ``R`` (graph inputs, computed weights,
already-dequantized weights), weight shapes that do not match ``direction`` / ``hidden_size``,
and nodes inside ``If`` / ``Loop`` / ``Scan`` bodies (only the top-level graph is rewritten).
``exclude`` applies as for every other op. The accuracy-budget search does not rank recurrent
layers; ``exclude=[name]`` keeps one in float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...ir.graph import Graph, Node, Value
from .._util import const_of, rebuild_node
from .placement import matches
from .state import QuantRun
from .table import RECURRENT_TABLE, RecurrentQuant, recurrent_spec
from .weights import FLOAT32, dq_const, drop_unused, is_f32, quantize_weight

if TYPE_CHECKING:
    from . import Quantize

__all__ = ["run_recurrent", "MS_DOMAIN", "MS_OPSET", "lstm_weights"]

#: ("lstm" | "qdq", float weight name) -> the values that replace it
_Cache = dict[tuple[str, str], tuple[Value, ...]]

MS_DOMAIN = "com.microsoft"
#: the com.microsoft opset DynamicQuantizeLSTM is defined in
MS_OPSET = 1


def run_recurrent(q: "Quantize", graph: Graph, state: QuantRun) -> int:
    """Rewrite the recurrent layers of ``graph`` in place; returns how many were rewritten."""
    o = q.options
    ctx = state.ctx
    lstm: list[str] = []
    gru: list[str] = []
    left: dict[str, tuple[str, str]] = {}   # name -> (op type, why)
    default_float: list[str] = []
    cache: _Cache = {}   # weights shared by several nodes are quantized (and stored) once
    for n in list(graph.nodes):
        spec = recurrent_spec(n)
        if spec is None or matches(n, o.exclude):
            continue
        if not (n.op_type in o.ops if o.ops else spec.default):
            if not o.ops and spec.kernel is None:
                default_float.append(n.name)
            continue
        why = refusal(n, spec)
        if why:
            left[n.name] = (n.op_type, why)
            continue
        if spec.kernel is not None:
            _to_dynamic_lstm(q, graph, n, cache)
            lstm.append(n.name)
        else:
            _weight_qdq(q, graph, n, cache)
            gru.append(n.name)
    nested = [f"{op} '{name}'" for op, name in _nested_recurrent(graph)
              if (op in o.ops if o.ops else RECURRENT_TABLE[op].default)]
    if lstm or gru:
        drop_unused(graph)
    if lstm:
        graph.opset_imports.setdefault(MS_DOMAIN, MS_OPSET)
        ctx.note(f"recurrent: {len(lstm)} LSTM(s) -> {MS_DOMAIN}.DynamicQuantizeLSTM ({q.options.weights} W / R, "
                 f"{'per-channel' if o.per_channel else 'per-tensor'} scales; activations quantized "
                 f"dynamically inside the kernel): {_names(lstm)}")
    if gru:
        per = "per-channel" if o.per_channel and graph.opset >= 13 else "per-tensor"
        ctx.note(f"recurrent: {len(gru)} GRU(s) with int8 W / R behind DequantizeLinear ({per}; weight-only: "
                 f"ONNX Runtime has no integer GRU kernel, so compute stays float and only the size shrinks): "
                 f"{_names(gru)}")
        if o.per_channel and graph.opset < 13:
            ctx.note(f"recurrent: GRU weights per-tensor: per-channel DequantizeLinear needs opset 13, the model "
                     f"has {graph.opset}")
    for name in default_float:
        ctx.note(f"left GRU '{name}' float: ONNX Runtime has no integer GRU kernel, so int8 weights would only "
                 f"shrink the file (compute stays float); list GRU in ops=[...] to store its W / R as int8 + "
                 f"DequantizeLinear")
    for name, (op, why) in left.items():
        ctx.note(f"left {op} '{name}' float: {why}")
    for name in nested:
        ctx.note(f"left {name} float: it is inside a subgraph (If / Loop / Scan body), which quantize does not "
                 f"rewrite")
    if lstm:
        state.artifacts["recurrent_integer"] = lstm
    if gru:
        state.artifacts["recurrent_weight_only"] = gru
    floats = {name: why for name, (_, why) in left.items()}
    floats.update({name: "no integer GRU kernel (size only); not in ops" for name in default_float})
    floats.update({name: "inside a subgraph" for name in nested})
    if floats:
        state.artifacts["recurrent_float"] = floats
    return len(lstm) + len(gru)


def _names(names: list[str]) -> str:
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


def _nested_recurrent(graph: Graph) -> list[tuple[str, str]]:
    """``(op type, name)`` of each LSTM / GRU in a subgraph attribute of a top-level node."""
    import onnx

    out: list[tuple[str, str]] = []

    def walk(g: onnx.GraphProto) -> None:
        for nd in g.node:
            if nd.op_type in ("LSTM", "GRU") and nd.domain in ("", "ai.onnx"):
                out.append((nd.op_type, nd.name))
            for a in nd.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        walk(sg)

    for n in graph.nodes:
        for v in n.attrs.values():
            for sg in (v if isinstance(v, list) else [v]):
                if isinstance(sg, onnx.GraphProto):
                    walk(sg)
    return out


def _direction(n: Node) -> str:
    d = n.attrs.get("direction", "forward")
    return d.decode() if isinstance(d, bytes) else str(d)


def refusal(n: Node, spec: RecurrentQuant) -> str | None:
    """Why ``n`` cannot be rewritten (``None``: it can)."""
    x = n.inputs[0] if n.inputs else None
    if not is_f32(x):
        return "its input X is not float32"
    if spec.kernel is not None and int(n.attrs.get("layout", 0)) != 0:
        return (f"layout={int(n.attrs['layout'])} (batch-major): {MS_DOMAIN}.{spec.kernel} has no layout "
                f"attribute, its X is [seq, batch, input]")
    dirs = 2 if _direction(n) == "bidirectional" else 1
    hidden = n.attrs.get("hidden_size")
    arrays = []
    for idx, label in ((1, "W"), (2, "R")):
        v = n.inputs[idx] if len(n.inputs) > idx else None
        arr = const_of(v)
        if arr is None:
            src = "missing" if v is None else (
                f"produced by {v.producer.op_type} '{v.producer.name}'" if v.producer is not None else "a graph input")
            return f"its weight {label} is not a constant ({src})"
        if arr.dtype != FLOAT32:
            return f"its weight {label} is {arr.dtype}, not float32"
        if arr.ndim != 3 or arr.shape[0] != dirs or arr.shape[1] % spec.gates:
            return f"its weight {label} has shape {list(arr.shape)}, not [{dirs}, {spec.gates}*hidden, *]"
        arrays.append(arr)
    w, r = arrays
    h = w.shape[1] // spec.gates
    if r.shape[1] != w.shape[1] or r.shape[2] != h or (hidden is not None and int(hidden) != h):
        return f"W {list(w.shape)} / R {list(r.shape)} do not match hidden_size {hidden if hidden is not None else h}"
    if spec.kernel is not None:
        for i, label in ((3, "B"), (5, "initial_h"), (6, "initial_c"), (7, "P")):
            v = n.inputs[i] if len(n.inputs) > i else None
            if v is not None and v.dtype is not None and np.dtype(v.dtype) != FLOAT32:
                return f"its {label} is {np.dtype(v.dtype)}; the kernel takes float32"
    return None


def lstm_weights(w: np.ndarray, per_channel: bool, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """ONNX ``W`` / ``R`` (``[dirs, 4H, K]``) -> DynamicQuantizeLSTM's int8 ``[dirs, K, 4H]`` and its
    scale: ``[dirs, 4H]`` per channel (one per gate row of each direction), else ``[dirs]``."""
    d, rows, k = w.shape
    if per_channel:
        qw, s = quantize_weight(w.reshape(d * rows, k), 0, bits=bits)
        s = s.reshape(d, rows)
    else:
        qw, s = quantize_weight(w.reshape(d, rows * k), 0, bits=bits)
    qw = qw.reshape(d, rows, k)
    return np.ascontiguousarray(qw.transpose(0, 2, 1)), s.astype(np.float32)


def _to_dynamic_lstm(q: "Quantize", g: Graph, n: Node, cache: "_Cache") -> Node:
    o = q.options
    ins: list[Value | None] = list(n.inputs) + [None] * (8 - len(n.inputs))
    extra: list[Value] = []
    for idx in (1, 2):
        v = n.inputs[idx]
        key = ("lstm", v.name)
        if key not in cache:
            qw, s = lstm_weights(const_of(v), o.per_channel, q.weight_bits)
            cache[key] = (g.add_initializer(f"{v.name}_quantized", qw), g.add_initializer(f"{v.name}_scale", s),
                          g.add_initializer(f"{v.name}_zero_point", np.zeros(s.shape, np.int8)))
        qv, sv, zv = cache[key]
        ins[idx] = qv
        extra += [sv, zv]
    attrs = {k: v for k, v in n.attrs.items() if k != "layout"}
    old_producers = [n.inputs[i].producer for i in (1, 2) if n.inputs[i].producer is not None]
    new = rebuild_node(g, n, op_type="DynamicQuantizeLSTM", inputs=ins + extra, attrs=attrs)
    new.domain = MS_DOMAIN
    g.invalidate()
    q.changed(new)
    _drop_dead_constants(g, old_producers)
    return new


def _weight_qdq(q: "Quantize", g: Graph, n: Node, cache: "_Cache") -> None:
    """GRU: ``W`` / ``R`` stored int8 behind DequantizeLinear (float compute)."""
    axis = 1 if q.options.per_channel and g.opset >= 13 else None
    old_producers = []
    for idx in (1, 2):
        v = n.inputs[idx]
        if v.producer is not None:
            old_producers.append(v.producer)
        key = ("qdq", v.name)
        if key not in cache:
            qw, s = quantize_weight(const_of(v), axis, bits=q.weight_bits)
            cache[key] = (dq_const(g, n, v.name, qw, s.astype(np.float32), np.zeros(s.shape, np.int8), axis,
                                   stamp=q.changed),)
        n.set_input(idx, cache[key][0])
    q.changed(n)
    _drop_dead_constants(g, old_producers)


def _drop_dead_constants(g: Graph, nodes: list[Node]) -> None:
    """Remove the ``Constant`` / ``Identity`` chains that produced a weight nothing reads any more."""
    todo = list(nodes)
    while todo:
        nd = todo.pop()
        if nd.graph is not g or nd.op_type not in ("Constant", "Identity") or nd.domain not in ("", "ai.onnx"):
            continue
        if any(o.uses or any(o is x for x in g.outputs) for o in nd.outputs):
            continue
        ins = [v for v in nd.inputs if v is not None]
        g.remove_node(nd)
        for v in ins:
            if v.producer is not None:
                todo.append(v.producer)
            else:
                g.remove_initializer_if_unused(v)
