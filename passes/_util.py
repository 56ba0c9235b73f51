"""Shared helpers for the exact cleanup passes (dce, fold-constants, fold-bn,
eliminate-identity, canonicalize).

Everything here goes through the public :class:`~nnsculpt.ir.Graph` mutation API so
use-def chains stay consistent; nothing touches private fields of the IR.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..ir.errors import PassOptionError, UnsupportedOpError
from ..ir.graph import Graph, Node, Value

DEFAULT_DOMAINS = ("", "ai.onnx")

#: ops whose results are not a function of their inputs (never folded / never deduplicated)
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})


def is_default_domain(node: Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def is_plain(node: Node) -> bool:
    """A default-domain node without subgraphs: the only kind the exact passes rewrite."""
    return is_default_domain(node) and not node.has_subgraphs


def is_graph_output(g: Graph, v: Value) -> bool:
    return any(o is v for o in g.outputs)


def is_used(g: Graph, v: Value) -> bool:
    """True if ``v`` has a user (explicit or implicit subgraph capture) or is a graph output."""
    return bool(v.uses) or is_graph_output(g, v)


def has_implicit_uses(v: Value) -> bool:
    """True if a subgraph (If/Loop/Scan body) reads ``v`` by name."""
    return any(idx == -1 for _, idx in v.uses)


def constant_node_value(node: Node) -> np.ndarray | None:
    """The array held by a ``Constant`` node (``None`` for sparse / string / unknown forms)."""
    if node.op_type != "Constant" or not is_default_domain(node):
        return None
    a = node.attrs
    if "value" in a and isinstance(a["value"], np.ndarray):
        arr = a["value"]
    elif "value_float" in a:
        arr = np.array(a["value_float"], dtype=np.float32)
    elif "value_floats" in a:
        arr = np.array(list(a["value_floats"]), dtype=np.float32)
    elif "value_int" in a:
        arr = np.array(a["value_int"], dtype=np.int64)
    elif "value_ints" in a:
        arr = np.array(list(a["value_ints"]), dtype=np.int64)
    else:
        return None
    if arr.dtype.kind not in "biuf":
        return None
    return np.asarray(arr)


def const_of(v: Value | None) -> np.ndarray | None:
    """The constant array behind ``v``: an initializer, possibly seen through ``Identity``
    chains (torch exports alias BN statistics that way) or a ``Constant`` node."""
    seen = 0
    while v is not None and seen < 64:
        if v.is_const:
            return v.const
        p = v.producer
        if p is None or not is_default_domain(p):
            return None
        if p.op_type == "Identity":
            v = p.inputs[0] if p.inputs else None
            seen += 1
            continue
        if p.op_type == "Constant":
            return constant_node_value(p)
        return None
    return None


def static_shape(v: Value | None) -> tuple[int, ...] | None:
    """``v``'s shape if every dim is a known int, else ``None``."""
    if v is None:
        return None
    if v.is_const:
        return tuple(int(d) for d in v.const.shape)
    if v.shape is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in v.shape):
        return None
    return tuple(int(d) for d in v.shape)


def onnx_to_np_dtype(elem_type: int):
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(int(elem_type)))
    except Exception:
        return None


def rebuild_node(g: Graph, node: Node, *, op_type: str | None = None,
                 inputs: Sequence[Value | None] | None = None,
                 outputs: Sequence[Value] | None = None,
                 attrs: dict[str, Any] | None = None,
                 attr_types: dict[str, int] | None = None) -> Node:
    """Replace ``node`` by a new node at the same position with the same name, meta,
    domain and doc string, but possibly another op type / inputs / outputs / attributes.

    ``outputs`` may reuse values produced by *removed* nodes (their producer is ``None``):
    this is how a rewrite makes a node write a value whose name consumers and graph
    outputs already use (e.g. Conv writing the folded BatchNormalization's output).
    Outputs of ``node`` that are not in ``outputs`` must be unused.
    """
    outs = list(node.outputs) if outputs is None else list(outputs)
    new = Node(op_type or node.op_type,
               list(node.inputs) if inputs is None else list(inputs),
               outs,
               dict(node.attrs) if attrs is None else dict(attrs),
               name=node.name, domain=node.domain, meta=dict(node.meta))
    if "history" in node.meta:
        new.meta["history"] = list(node.meta["history"])
    at = dict(node.attr_types) if attr_types is None else dict(attr_types)
    new.attr_types = {k: v for k, v in at.items() if k in new.attrs}
    new.doc_string = node.doc_string
    keep = {id(o) for o in outs}
    # detach the old node first so the outputs it shares with the new one are free
    for o in node.outputs:
        if id(o) not in keep and is_used(g, o):
            raise ValueError(f"rebuild_node: output '{o.name}' of '{node.name}' is still used")
    for o in outs:
        if o.producer is not None and o.producer is not node:
            raise ValueError(f"rebuild_node: value '{o.name}' is still produced by '{o.producer.name}'")
    anchor = _neighbour_after(g, node)
    g.remove_node(node, force=True)
    # outputs removed with the old node lost their registration; insert_node re-registers
    if anchor is not None:
        g.insert_node(new, before=anchor)
    else:
        g.insert_node(new)
    return new


def _neighbour_after(g: Graph, node: Node) -> Node | None:
    idx = g.nodes.index(node)
    return g.nodes[idx + 1] if idx + 1 < len(g.nodes) else None


def replace_outputs_with_constants(g: Graph, node: Node, arrays: Sequence[np.ndarray],
                                   *, pass_name: str = "") -> list[Value]:
    """Remove ``node`` and make each of its used outputs an initializer holding the given
    array, under the *same* name (so subgraph captures by name keep working).

    Precondition: no output of ``node`` is a graph output.
    """
    outs = list(node.outputs)
    g.remove_node(node, force=True)
    created = []
    for o, arr in zip(outs, arrays):
        if not o.uses:
            continue
        new = g.add_initializer(o.name, np.asarray(arr), unique=False)
        new.meta["folded_from"] = node.name
        if pass_name:
            new.meta["pass"] = pass_name
        g.replace_all_uses_with(o, new)
        created.append(new)
    return created


def remove_if_unused_initializer(g: Graph, v: Value | None) -> bool:
    """Drop ``v`` when it is an initializer nobody reads any more."""
    return g.remove_initializer_if_unused(v)


def broadcast_keeps_shape(x: Value, c: np.ndarray) -> bool:
    """True if broadcasting ``x`` with a constant of ``c``'s shape yields ``x``'s shape."""
    if x.shape is None:
        return False
    if c.ndim > len(x.shape):
        return False
    for cd, xd in zip(reversed(c.shape), reversed(x.shape)):
        if cd == 1:
            continue
        if not (isinstance(xd, int) and xd == cd):
            return False
    return True


def raise_opset_for_fusion(graph: Graph, ctx: Any, *, allowed: bool, opset: int, op: str, chains: str,
                           who: str) -> str | None:
    """Raise ``graph`` to ``opset`` (``onnx.version_converter``) so that a fusion can write ``op``;
    ``chains`` says what it found (``"3 GELU chain(s)"``) and ``allowed`` is the pass's
    ``raise_opset`` option. Returns None when raised (noted), else the note saying why the chains
    are left alone (the option, ``ctx.allow_opset_raise``, or the converter's refusal)."""
    if not allowed or not ctx.allow_opset_raise:
        why = "raise_opset=false" if not allowed else "allow_opset_raise=False"
        return f"left alone {chains}: {op} needs opset {opset}, the graph is at opset {graph.opset} and {why}"
    was = graph.opset
    try:
        graph.raise_opset(opset, who=who)
    except UnsupportedOpError as e:
        return f"left alone {chains}: {e}"
    ctx.note(f"raised the opset from {was} to {opset} for {op} (onnx.version_converter)")
    return None


def last_within(error, lo: int, hi: int, budget: float) -> int:
    """Bisection for the largest ``k`` in ``[lo, hi)`` with ``error(k) <= budget``, assuming the
    error grows with ``k``: ``lo`` is known to hold the budget, ``hi`` not to (or to be out of
    range). ``error`` is called only at the probed points (the callers cache and record them)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if error(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def exactly_one_option(pass_name: str, options: Any, names: Sequence[str], example: str) -> str:
    """The one of the mutually exclusive options ``names`` that is set on ``options`` (not None
    or ""); :class:`PassOptionError` naming the pass when none or several are (``example``: a
    spelling to suggest, e.g. ``prune-weights{sparsity=0.9}``)."""
    given = [k for k in names if getattr(options, k) not in (None, "")]
    if not given:
        listed = ", ".join(repr(k) for k in names[:-1]) + f" or {names[-1]!r}"
        raise PassOptionError(f"pass '{pass_name}': give one of the options {listed} (e.g. {example})")
    if len(given) > 1:
        raise PassOptionError(f"pass '{pass_name}': options {' and '.join(repr(k) for k in given)} exclude each "
                              f"other: give only one")
    return given[0]
