"""``fuse-gelu``: GELU written as elementwise ops becomes one ONNX ``Gelu`` (opset 20)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node, Value
from .base import Pass, PassContext, PassResult, register
from ._util import const_of, has_implicit_uses, is_graph_output, is_plain, raise_opset_for_fusion, rebuild_node

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_RTOL = 1e-4   # constants as exporters write them in float32 (0.70710677, 1.4142135, 0.7978846)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def _scalar(v: Value | None) -> float | None:
    c = const_of(v)
    if c is None or np.size(c) != 1 or np.asarray(c).dtype.kind != "f":
        return None
    return float(np.asarray(c).reshape(-1)[0])


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= _RTOL * abs(b)


def _plain(n: Node | None, *ops: str) -> Node | None:
    return n if n is not None and is_plain(n) and n.op_type in ops else None


def _other(n: Node, v: Value) -> Value | None:
    """The input of binary ``n`` that is not ``v`` (None when both or neither are ``v``)."""
    a, b = (n.inputs + (None, None))[:2]
    if a is v and b is not v:
        return b
    if b is v and a is not v:
        return a
    return None


def _times(v: Value | None, factor: float) -> tuple[Value, Node] | None:
    """``v`` = ``x * factor`` (Mul by a constant, or Div by its reciprocal): ``(x, node)``."""
    n = _plain(v.producer if v is not None else None, "Mul", "Div")
    if n is None or len(n.inputs) != 2:
        return None
    a, b = n.inputs
    if n.op_type == "Mul":
        if _close(_scalar(b), factor) and const_of(a) is None:
            return a, n
        if _close(_scalar(a), factor) and const_of(b) is None:
            return b, n
        return None
    if _close(_scalar(b), 1.0 / factor) and const_of(a) is None:
        return a, n
    return None


@dataclass
class _Match:
    x: Value
    approximate: str
    core: list[Node]          # every node of the chain, final last
    final: Node


@register
class FuseGelu(Pass):
    """Fuse GELU written as elementwise ops into one ONNX ``Gelu`` (opset 20).

    Rewrite rules (``x`` any float tensor; the products in any order and association):

    * exact form, as torch below opset 20, tf2onnx and jax2tf write it:
      ``0.5 * x * (1 + Erf(x / sqrt(2)))`` (``Div(x, 1.4142135)`` or ``Mul(x, 0.70710678)``)
      -> ``Gelu(x)``;
    * tanh form: ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (``Pow(x, 3)`` or
      ``x * x * x``) -> ``Gelu(x, approximate="tanh")``.

    The fused node takes the name and provenance of the chain's last node and writes its output
    value. ``Gelu`` is opset 20: a graph below 20 with at least one match is raised to 20 first
    (``onnx.version_converter``; never when nothing matches); with ``raise_opset=false`` (or
    ``PassContext.allow_opset_raise=False``) such a graph is left alone and noted.

    Preconditions (otherwise the chain is left alone): default-domain nodes without subgraphs;
    the constants scalars within 1e-4 relative of the values above; no intermediate value used
    outside the chain, a graph output, or read by a subgraph; float32 / float16. Exact (ORT's
    Gelu kernel is within float32 rounding of the chain). Run before ``quantize``: one float op
    instead of a fragile Erf / Tanh chain that int8 would round at every step.
    """

    name = "fuse-gelu"
    exact = True
    requires = frozenset({"shapes"})
    guarantees = frozenset({"gelu-fused"})

    @dataclass
    class Options:
        raise_opset: bool = True
        tanh: bool = True

    def pending(self, graph: Graph) -> int:
        """How many GELU chains this pass would fuse in ``graph`` (nothing is changed)."""
        return len(self._find(graph))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        matches = self._find(graph)
        changed = False
        if matches and graph.opset < 20:
            refused = raise_opset_for_fusion(graph, ctx, allowed=self.options.raise_opset, opset=20, op="Gelu",
                                             chains=f"{len(matches)} GELU chain(s)", who=self.name)
            if refused:
                ctx.note(refused)
                return PassResult(changed=False, metrics={"fused": 0}, artifacts={"fused": []})
            changed = True
            infer_shapes(graph)
            matches = self._find(graph)  # re-imported: new node objects
        fused = [self._rewrite(graph, m) for m in matches]
        if fused:
            kinds = sorted({m.approximate for m in matches})
            ctx.note(f"fused {len(fused)} GELU chain(s) ({', '.join(kinds)}) into Gelu: {', '.join(fused[:10])}"
                     + (f" (+{len(fused) - 10} more)" if len(fused) > 10 else ""))
        return PassResult(changed=changed or bool(fused), metrics={"fused": len(fused)},
                          artifacts={"fused": fused})

    # ------------------------------------------------------------------------ matching
    def _find(self, g: Graph) -> list[_Match]:
        out, used = [], set()
        for n in list(g.nodes):
            if not is_plain(n) or n.op_type not in ("Erf", "Tanh") or (n.op_type == "Tanh" and not self.options.tanh):
                continue
            m = self._match(g, n)
            if m is not None and not any(id(c) in used for c in m.core):
                used.update(id(c) for c in m.core)
                out.append(m)
        return out

    def _match(self, g: Graph, fn: Node) -> _Match | None:
        arg = fn.inputs[0] if fn.inputs else None
        if fn.op_type == "Erf":
            got = _times(arg, _INV_SQRT2)
            if got is None:
                return None
            x, scale = got
            inner = [scale]
            approximate = "none"
        else:
            got = _times(arg, _SQRT_2_OVER_PI)
            if got is None:
                return None
            poly, scale = got
            pm = self._cubic_poly(poly)
            if pm is None:
                return None
            x, poly_nodes = pm
            inner = [scale, *poly_nodes]
            approximate = "tanh"
        if x.dtype is not None and np.dtype(x.dtype) not in _FLOATS:
            return None
        # 1 + f(...)
        one = self._sole_user(g, fn.outputs[0], "Add")
        if one is None or not _close(_scalar(_other(one, fn.outputs[0])), 1.0):
            return None
        tail = self._half_x_times(g, one.outputs[0], x)
        if tail is None:
            return None
        core = [*inner, fn, one, *tail]
        final = tail[-1]
        # every intermediate belongs to the chain alone (x itself may have other users)
        members = {id(c) for c in core}
        for c in core:
            if c is final:
                continue
            for o in c.outputs:
                if is_graph_output(g, o) or has_implicit_uses(o) or any(id(u) not in members for u, _ in o.uses):
                    return None
        return _Match(x, approximate, core, final)

    @staticmethod
    def _cubic_poly(v: Value) -> tuple[Value, list[Node]] | None:
        """``v = x + 0.044715 * x^3``: ``(x, nodes)``."""
        add = _plain(v.producer, "Add")
        if add is None or len(add.inputs) != 2:
            return None
        for x, cub in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            got = _times(cub, _TANH_CUBIC)
            if got is None:
                continue
            x3, mul = got
            p = _plain(x3.producer, "Pow", "Mul")
            if p is None:
                continue
            if p.op_type == "Pow" and p.inputs[0] is x and _close(_scalar(p.inputs[1]), 3.0):
                return x, [p, mul, add]
            if p.op_type == "Mul":  # x * x * x in either association
                a, b = p.inputs
                for sq, lone in ((a, b), (b, a)):
                    q = _plain(sq.producer, "Mul")
                    if lone is x and q is not None and q.inputs[0] is x and q.inputs[1] is x:
                        return x, [q, p, mul, add]
        return None

    @staticmethod
    def _sole_user(g: Graph, v: Value, op: str) -> Node | None:
        if is_graph_output(g, v) or len(v.uses) != 1:
            return None
        u, _ = v.uses[0]
        return _plain(u, op)

    def _half_x_times(self, g: Graph, s: Value, x: Value) -> list[Node] | None:
        """The nodes computing ``0.5 * x * s`` from ``s`` (= 1 + f): the last one is the result."""
        m1 = self._sole_user(g, s, "Mul")
        if m1 is None:
            return None
        other = _other(m1, s)
        if other is None:
            return None
        if other is x:                              # (x * s) * 0.5
            m2 = self._sole_user(g, m1.outputs[0], "Mul")
            if m2 is not None and _close(_scalar(_other(m2, m1.outputs[0])), 0.5):
                return [m1, m2]
            return None
        h = _times(other, 0.5)                      # (0.5 * x) * s
        if h is not None and h[0] is x:
            return [h[1], m1]
        if _close(_scalar(other), 0.5):             # (s * 0.5) * x
            m2 = self._sole_user(g, m1.outputs[0], "Mul")
            if m2 is not None and _other(m2, m1.outputs[0]) is x:
                return [m1, m2]
        return None

    def _rewrite(self, g: Graph, m: _Match) -> str:
        attrs = {"approximate": "tanh"} if m.approximate == "tanh" else {}
        consts = [v for c in m.core for v in c.inputs if v is not None and v.is_const]
        node = rebuild_node(g, m.final, op_type="Gelu", inputs=[m.x], attrs=attrs, attr_types={})
        self.changed(node)
        rest = {id(c) for c in m.core if c is not m.final}
        for nd in reversed(list(g.nodes)):
            if id(nd) in rest:
                g.remove_node(nd)
        for c in consts:
            g.remove_initializer_if_unused(c)
        return node.name
