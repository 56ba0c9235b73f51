"""Where Q/DQ goes: the candidate nodes (op table, ``ops``, ``exclude``) and the plan of which
activations, weights, constant inputs and biases of the included nodes are quantized --
including the Relu / Clip activations absorbed into their producer's output quantizer and
the passthrough ops that reuse their input's parameters."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...ir.graph import Graph, Node, Value
from .table import OpQuant, spec_for
from .weights import FLOAT32, is_f32

__all__ = ["QuantPlan", "DYNAMIC_DEFAULT_OPS", "candidates", "matches", "act_inputs", "plan", "absorbable"]

#: dynamic mode quantizes these by default: ORT fuses them into DynamicQuantizeMatMul, while
#: ConvInteger + rescale runs slower than a float Conv on CPU (opt in with ops=[Conv,...])
DYNAMIC_DEFAULT_OPS = ("MatMul", "Gemm")


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


def matches(node: Node, patterns: Sequence[str]) -> bool:
    """Whether ``node`` is named by one of ``patterns`` (op type, name, provenance, or a glob)."""
    for p in patterns:
        if p == node.op_type or p == node.name or p == node.source:
            return True
        if any(ch in p for ch in "*?[") and (fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.source, p)):
            return True
    return False


def candidates(graph: Graph, options: Any) -> list[Node]:
    """Nodes the table knows and ``exclude`` does not name (``options``: the pass's options)."""
    ops = options.ops or (DYNAMIC_DEFAULT_OPS if options.mode == "dynamic" else ())
    out = []
    guard = not options.ops and getattr(options, "keep_fragile_float", False)
    for n in graph.nodes:
        spec = spec_for(n)
        if spec is None or matches(n, options.exclude) or (ops and n.op_type not in ops):
            continue
        if _touches_quantized(n):  # requantize: what already reads / feeds Q-DQ stays as it is
            continue
        if guard and fragile(n, spec):
            continue
        out.append(n)
    return out


#: ops whose chains int8 rounding breaks (normalizations, softmax, GELU): they run in float, and
#: so do the elementwise ops and activation x activation MatMuls that read them or only feed them
FRAGILE_OPS = frozenset({"Softmax", "LogSoftmax", "Exp", "Log", "Div", "Reciprocal", "Sqrt", "Pow", "Erf", "Tanh",
                         "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sub"})


def fragile(n: Node, spec: OpQuant) -> bool:
    """Whether ``n`` belongs to a numerically fragile chain (default placement keeps it float):
    an elementwise op, or a MatMul of two activations (attention scores), that reads the output
    of a fragile op or whose outputs only feed fragile ops (Div / Sub by a constant are not). Compute ops with a constant weight
    (Conv, Gemm, MatMul x W) are never fragile."""
    if spec.kind == "compute":
        w = n.inputs[spec.weight] if spec.weight is not None and len(n.inputs) > spec.weight else None
        if w is not None and w.is_const:
            return False
    elif spec.kind != "elementwise":
        return False
    reads = any(v is not None and v.producer is not None and _is_fragile_op(v.producer) for v in n.inputs)
    users = [u for o in n.outputs for u, _ in o.uses]
    feeds_only = bool(users) and all(_is_fragile_op(u) for u in users)
    return reads or feeds_only


def _is_fragile_op(n: Node) -> bool:
    """A fragile op; Div / Sub by a constant (hardswish's ``/ 6``, ``x - 0.5``) is only a scale
    or shift, not fragile."""
    if n.op_type not in FRAGILE_OPS:
        return False
    if n.op_type in ("Div", "Sub") and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].is_const:
        return False
    return True


def _touches_quantized(n: Node) -> bool:
    if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return True
    for v in n.inputs:
        if v is not None and v.producer is not None and v.producer.op_type in ("DequantizeLinear",
                                                                              "DynamicQuantizeLinear"):
            return True
    return any(u.op_type == "QuantizeLinear" for o in n.outputs for u, _ in o.uses)


def act_inputs(node: Node, spec: OpQuant) -> list[int] | None:
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
        if not is_f32(v):
            return None
        out.append(i)
    if spec.kind in ("compute", "elementwise") and not out:
        return None
    return out


def plan(graph: Graph, included: set[str], options: Any) -> QuantPlan:
    """Decide which tensors / weights / biases to quantize for ``included`` nodes."""
    p = QuantPlan(included=set(included))
    asym = not options.symmetric
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
        idxs = act_inputs(n, spec)
        if idxs is None:
            continue
        for i in idxs:
            request(n.inputs[i], (n.name, i))
        if spec.weight is not None and len(n.inputs) > spec.weight:
            w = n.inputs[spec.weight]
            if w is not None and w.is_const and w.const.dtype == FLOAT32 and w.const.ndim >= 1:
                p.weights.append((n.name, spec.weight))
                if spec.bias is not None and len(n.inputs) > spec.bias and options.bias == "int32":
                    b = n.inputs[spec.bias]
                    if b is not None and b.is_const and b.const.dtype == FLOAT32 and b.const.ndim == 1 \
                            and 0 in idxs and float(n.attrs.get("beta", 1.0)) == 1.0 \
                            and float(n.attrs.get("alpha", 1.0)) == 1.0:
                        p.biases.append((n.name, spec.bias))
        if spec.const_inputs:
            for i, v in enumerate(n.inputs):
                if v is not None and v.is_const and v.const.dtype == FLOAT32 and (spec.inputs is None or i in spec.inputs):
                    p.const_acts.append((n.name, i))
        if spec.output and n.outputs and is_f32(n.outputs[0]) and id(n.outputs[0]) not in outputs:
            y = n.outputs[0]
            users = y.uses
            if asym and len(users) == 1 and users[0][1] == 0 and users[0][0].name in included \
                    and users[0][0].op_type in ("Relu", "Clip") and spec_for(users[0][0]) is not None \
                    and absorbable(users[0][0]):
                p.absorbed[y.name] = users[0][0].name
            else:
                request(y)
    # an absorbed Relu/Clip quantizes its output in place of its producer; one whose
    # producer stays float is quantized only where its consumers ask for it
    for act in set(p.absorbed.values()):
        y = by_name[act].outputs[0]
        if is_f32(y) and id(y) not in outputs:
            request(y)
    # passthrough: quantized in -> quantized out with the same parameters
    for n in nodes:
        spec = spec_for(n)
        if spec is None or spec.kind != "passthrough" or not n.inputs or n.inputs[0] is None:
            continue
        x = n.inputs[0]
        r = p.tensors.get(x.name)
        if r is None or not is_f32(x):
            continue
        if not r.all_users:
            r.users.add((n.name, 0))
        for y in n.outputs:
            if is_f32(y) and id(y) not in outputs and y.uses:
                request(y, share=x.name)
    return p


def absorbable(act: Node) -> bool:
    """Whether a Relu / Clip can be absorbed into its producer's output quantizer."""
    if act.op_type == "Relu":
        return True
    # Clip: bounds must be constants with min <= 0 (so the quantized range can clamp like it)
    lo = act.inputs[1] if len(act.inputs) > 1 else None
    if lo is None and "min" in act.attrs:
        return float(act.attrs["min"]) <= 0
    if lo is None:
        return False
    return lo.is_const and float(np.asarray(lo.const).reshape(-1)[0]) <= 0
