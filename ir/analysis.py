"""Analyses over the graph: shape inference, FLOPs/MACs, parameter counts, model bytes.

Analyses are pure functions of the graph, cached on ``graph.version`` (every mutation
bumps it) so a pass that changes nothing does not pay for recomputation.

Shape inference lowers to ONNX and runs ``onnx.shape_inference`` (with data propagation)
-- the reference implementation of every op's shape function -- then writes the inferred
types back onto the IR values. Symbolic dims (``"N"``) are counted as 1 in FLOPs: FLOPs are
per sample when the batch dim is symbolic.

Per-op FLOP rules live in the :data:`FLOP_RULES` table (contrib ops of other domains, such as
``com.microsoft.DynamicQuantizeLSTM``, in :data:`DOMAIN_FLOP_RULES`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .graph import Graph, Node, Value

log = logging.getLogger("nnsculpt.ir")


def cached(g: Graph, key: str, fn: Callable[[], object]):
    cache = g.meta.setdefault("_analysis_cache", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == g.version:
        return hit[1]
    val = fn()
    cache[key] = (g.version, val)
    return val


# --------------------------------------------------------------------------- shapes
def infer_shapes(g: Graph) -> Graph:
    """Fill ``dtype``/``shape`` of every value that ONNX shape inference can determine."""

    def run():
        import onnx

        from .onnx_io import type_of_value_info, to_onnx_model

        model = to_onnx_model(g, check=False, value_info=False)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as e:  # best effort: keep what we have
            log.warning("shape inference failed on '%s': %s", g.name, e)
            return True
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            v = g.values.get(vi.name)
            if v is None or v.is_const:
                continue
            dt, shape = type_of_value_info(vi)
            if dt is not None:
                v.dtype = dt
            if shape is not None:
                v.shape = shape
        return True

    cached(g, "shapes", run)  # writing inferred types does not bump the version
    return g


def static_dims(shape, symbolic_as: int = 1) -> list[int] | None:
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        else:  # symbolic, unknown, or -1 (some exporters write unknown dims as -1)
            out.append(symbolic_as)
    return out


def _numel(v: Value | None) -> int:
    if v is None:
        return 0
    dims = static_dims(v.shape)
    return int(np.prod(dims)) if dims is not None else 0


def channels(v: Value, axis: int = 1) -> int | None:
    """Static channel count of ``v`` along ``axis`` (``None`` if unknown)."""
    if v.shape is None or len(v.shape) <= axis:
        return None
    d = v.shape[axis]
    return d if isinstance(d, int) else None


# ---------------------------------------------------------------------------- FLOPs
def _conv(n: Node) -> tuple[int, int]:
    w, y = n.inputs[1], n.outputs[0]
    if w is None or w.shape is None:
        return 0, 0
    k = int(np.prod(static_dims(w.shape[2:]) or [1]))
    cin_per_group = static_dims(w.shape)[1]
    macs = _numel(y) * cin_per_group * k
    bias = _numel(y) if len(n.inputs) > 2 and n.inputs[2] is not None else 0
    return macs, 2 * macs + bias


def _conv_t(n: Node) -> tuple[int, int]:
    x, w = n.inputs[0], n.inputs[1]
    if w is None or w.shape is None:
        return 0, 0
    k = int(np.prod(static_dims(w.shape[2:]) or [1]))
    cout_per_group = static_dims(w.shape)[1]
    macs = _numel(x) * cout_per_group * k
    bias = _numel(n.outputs[0]) if len(n.inputs) > 2 and n.inputs[2] is not None else 0
    return macs, 2 * macs + bias


def _gemm(n: Node) -> tuple[int, int]:
    a, b = n.inputs[0], n.inputs[1]
    y = n.outputs[0]
    if a is None or a.shape is None or b is None or b.shape is None:
        return 0, 0
    ad = static_dims(a.shape)
    k = ad[0] if n.attrs.get("transA", 0) else ad[-1]
    macs = _numel(y) * k
    bias = _numel(y) if len(n.inputs) > 2 and n.inputs[2] is not None else 0
    return macs, 2 * macs + bias


def _matmul(n: Node) -> tuple[int, int]:
    a = n.inputs[0]
    if a is None or a.shape is None or not a.shape:
        return 0, 0
    k = static_dims(a.shape)[-1]
    macs = _numel(n.outputs[0]) * k
    return macs, 2 * macs


def _elementwise(factor: int = 1):
    def rule(n: Node) -> tuple[int, int]:
        return 0, factor * sum(_numel(o) for o in n.outputs)
    return rule


def _pool(n: Node) -> tuple[int, int]:
    k = int(np.prod(n.attrs.get("kernel_shape", [1])))
    return 0, _numel(n.outputs[0]) * k


def _global_pool(n: Node) -> tuple[int, int]:
    return 0, _numel(n.inputs[0])


def _reduce(n: Node) -> tuple[int, int]:
    return 0, _numel(n.inputs[0])


def _bn(n: Node) -> tuple[int, int]:
    return 0, 2 * _numel(n.outputs[0])


def _zero(n: Node) -> tuple[int, int]:
    return 0, 0


def _attr_str(n: Node, key: str, default: str) -> str:
    v = n.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _recurrent(gates: int):
    """LSTM (4 gates), GRU (3), RNN (1) and ORT's ``com.microsoft.DynamicQuantizeLSTM``: per
    time step and direction, ``gates x (input*hidden + hidden*hidden)`` MACs (the input and
    recurrent products; gate nonlinearities are not counted), FLOPs = 2 x MACs."""

    def rule(n: Node) -> tuple[int, int]:
        x = n.inputs[0] if n.inputs else None
        dims = static_dims(x.shape) if x is not None else None
        if dims is None or len(dims) != 3:
            return 0, 0
        seq, batch, inp = dims
        if int(n.attrs.get("layout", 0)):
            seq, batch = batch, seq
        hidden = n.attrs.get("hidden_size")
        if hidden is None:  # R: [dirs, gates*H, H] (ONNX) or [dirs, H, gates*H] (DynamicQuantizeLSTM)
            r = n.inputs[2] if len(n.inputs) > 2 else None
            rd = static_dims(r.shape) if r is not None else None
            if rd is None or len(rd) != 3:
                return 0, 0
            hidden = min(rd[1], rd[2])
        hidden = int(hidden)
        dirs = 2 if _attr_str(n, "direction", "forward") == "bidirectional" else 1
        macs = seq * batch * dirs * gates * hidden * (inp + hidden)
        return macs, 2 * macs

    return rule


#: op_type -> rule(node) -> (MACs, FLOPs). Ops not listed count as data movement (0).
FLOP_RULES: dict[str, Callable[[Node], tuple[int, int]]] = {
    "Conv": _conv, "ConvInteger": _conv, "QLinearConv": _conv,
    "ConvTranspose": _conv_t,
    "Gemm": _gemm,
    "MatMul": _matmul, "MatMulInteger": _matmul, "QLinearMatMul": _matmul,
    "BatchNormalization": _bn, "InstanceNormalization": _elementwise(4),
    "LayerNormalization": _elementwise(5), "GroupNormalization": _elementwise(5),
    "Add": _elementwise(), "Sub": _elementwise(), "Mul": _elementwise(), "Div": _elementwise(),
    "Relu": _elementwise(), "LeakyRelu": _elementwise(2), "PRelu": _elementwise(2),
    "Clip": _elementwise(), "Sigmoid": _elementwise(4), "Tanh": _elementwise(4),
    "HardSigmoid": _elementwise(3), "HardSwish": _elementwise(4), "Gelu": _elementwise(8),
    "Erf": _elementwise(4), "Exp": _elementwise(), "Sqrt": _elementwise(), "Pow": _elementwise(),
    "Softmax": _elementwise(3), "LogSoftmax": _elementwise(4),
    "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool,
    "ReduceMean": _reduce, "ReduceSum": _reduce, "ReduceMax": _reduce,
    "Reshape": _zero, "Flatten": _zero, "Transpose": _zero, "Concat": _zero, "Split": _zero,
    "LSTM": _recurrent(4), "GRU": _recurrent(3), "RNN": _recurrent(1),
}
#: (domain, op_type) -> rule, for ops outside the default domain (ONNX Runtime contrib ops)
DOMAIN_FLOP_RULES: dict[tuple[str, str], Callable[[Node], tuple[int, int]]] = {
    ("com.microsoft", "DynamicQuantizeLSTM"): _recurrent(4),
}


@dataclass
class NodeCost:
    name: str
    op_type: str
    source: str
    macs: int
    flops: int
    params: int
    output_shape: tuple | None


@dataclass
class GraphStats:
    """Whole-graph summary, as recorded by the PassManager before/after every pass."""

    nodes: int
    params: int
    flops: int
    macs: int
    weight_bytes: int
    model_bytes: int
    op_histogram: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "params": self.params, "flops": self.flops, "macs": self.macs,
                "weight_bytes": self.weight_bytes, "model_bytes": self.model_bytes,
                "op_histogram": dict(sorted(self.op_histogram.items()))}


def node_costs(g: Graph) -> list[NodeCost]:
    """Per-node MACs, FLOPs and parameter counts (constant float inputs)."""

    def run():
        infer_shapes(g)
        out = []
        for n in g.nodes:
            rule = FLOP_RULES.get(n.op_type) if n.domain in ("", "ai.onnx") else \
                DOMAIN_FLOP_RULES.get((n.domain, n.op_type))
            macs, flops = rule(n) if rule else (0, 0)
            params = sum(int(v.const.size) for v in n.inputs
                         if v is not None and v.is_const and v.const.dtype.kind == "f")
            y = n.outputs[0] if n.outputs else None
            out.append(NodeCost(n.name, n.op_type, n.source, int(macs), int(flops), params,
                                None if y is None else y.shape))
        return out

    return cached(g, "node_costs", run)


def graph_stats(g: Graph) -> GraphStats:
    def run():
        costs = node_costs(g)
        hist: dict[str, int] = {}
        for n in g.nodes:
            key = n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
            hist[key] = hist.get(key, 0) + 1
        from .onnx_io import to_onnx_model

        model_bytes = len(to_onnx_model(g, check=False).SerializeToString())
        return GraphStats(nodes=len(g.nodes), params=g.param_count(),
                          flops=sum(c.flops for c in costs), macs=sum(c.macs for c in costs),
                          weight_bytes=g.weight_bytes(), model_bytes=model_bytes, op_histogram=hist)

    return cached(g, "graph_stats", run)


def snapshot(g: Graph) -> dict:
    """A light, JSON-ready picture of the graph for inspection tools (the HTML report): per node its
    name, op, provenance, input / output value names, first output shape, MACs, params, and a signature that changes when
    its op, attributes or constant inputs change; plus the graph's inputs / outputs and IR text."""
    import hashlib

    from .printer import print_graph

    costs = {c.name: c for c in node_costs(g)}
    nodes = []
    for n in g.nodes:
        h = hashlib.sha1(f"{n.domain}:{n.op_type}".encode())
        for k, v in sorted(n.attrs.items()):
            h.update(k.encode())
            h.update(repr(v.tolist() if isinstance(v, np.ndarray) else v).encode()[:4096])
        for v in n.inputs:
            if v is not None and v.const is not None:
                h.update(str((v.const.dtype, v.const.shape)).encode())
                h.update(np.ascontiguousarray(v.const).tobytes())
        c = costs.get(n.name)
        nodes.append({"name": n.name, "op": n.op_type, "source": n.source,
                      "inputs": [v.name for v in n.inputs if v is not None and not v.is_const],
                      "outputs": [v.name for v in n.outputs],
                      "shape": None if not n.outputs or n.outputs[0].shape is None else
                      [d if isinstance(d, int) else str(d) for d in n.outputs[0].shape],
                      "macs": c.macs if c else 0,
                      "params": c.params if c else 0, "sig": h.hexdigest()[:12]})
    return {"nodes": nodes, "inputs": [v.name for v in g.inputs], "outputs": [v.name for v in g.outputs],
            "ir": print_graph(g)}
