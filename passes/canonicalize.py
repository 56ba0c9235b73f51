"""Canonical forms that later passes (and pattern matchers) can rely on."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node
from .base import Pass, PassContext, PassResult, register
from ._util import (const_of, constant_node_value, has_implicit_uses, is_default_domain,
                    is_graph_output, is_plain, rebuild_node, replace_outputs_with_constants)

#: binary ops whose result is exactly the same with the operands swapped (IEEE + and *
#: are commutative; Max/Min are left out because NaN handling may differ by operand)
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal", "BitwiseAnd",
                             "BitwiseOr", "BitwiseXor"})


@register
class Canonicalize(Pass):
    """Canonical forms: Constant nodes as initializers, constants right, MatMul+Add as Gemm, sorted.

    Rewrite rules, applied in this order:

    1. every ``Constant`` node (e.g. created by a pass) becomes an initializer with the
       same name (sparse / string constants and constants that are graph outputs stay);
    2. a commutative binary op (Add, Mul, And, Or, Xor, Equal, Bitwise*) with an
       initializer as first and a non-constant as second operand gets its operands
       swapped -- ``Add(c, x) -> Add(x, c)``; non-commutative ops (``Sub(x, c)``,
       ``Sub(c, x)``, ``Div``...) are kept as they are;
    3. ``MatMul(A, W)`` followed by ``Add(., b)`` (either operand order) becomes
       ``Gemm(A, W, b)`` with ``transB=0`` (the weight is never transposed or copied)
       when ``A`` is known to be rank 2 (Gemm is 2-D only), ``W`` is a constant 2-D float
       weight ``(K, N)``, ``b`` is a constant of shape ``(N,)`` or ``(1, N)`` with the same
       dtype, and the MatMul output has that Add as its ONLY user (not a graph output, not
       captured by a subgraph). The Gemm keeps the MatMul's name and provenance and writes
       the Add's output value;
    4. ``topological_sort`` (stable w.r.t. the current order).

    Preconditions: none; non-default domains and subgraph ops are never rewritten.
    Exact (Gemm with alpha=beta=1 computes A@W + b).
    """

    name = "canonicalize"
    exact = True

    @dataclass
    class Options:
        constants_to_initializers: bool = True
        constants_right: bool = True
        matmul_add_to_gemm: bool = True
        sort: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        changed = False
        if o.constants_to_initializers:
            changed |= self._constants(graph, ctx)
        if o.constants_right:
            changed |= self._swap(graph, ctx)
        if o.matmul_add_to_gemm:
            changed |= self._gemm(graph, ctx)
        if o.sort:
            before = [id(n) for n in graph.nodes]
            graph.topological_sort()
            if [id(n) for n in graph.nodes] != before:
                ctx.note("reordered nodes topologically")
                changed = True
        return PassResult(changed=changed)

    # ------------------------------------------------------------------------------
    def _constants(self, g: Graph, ctx: PassContext) -> bool:
        n_done = 0
        for node in list(g.nodes):
            if node.op_type != "Constant" or not is_default_domain(node) or len(node.outputs) != 1:
                continue
            arr = constant_node_value(node)
            if arr is None:
                ctx.note(f"kept Constant '{node.name}': sparse or non-numeric value")
                continue
            if is_graph_output(g, node.outputs[0]):
                ctx.note(f"kept Constant '{node.name}': it produces graph output '{node.outputs[0].name}'")
                continue
            replace_outputs_with_constants(g, node, [arr], pass_name=self.name)
            n_done += 1
        if n_done:
            ctx.note(f"turned {n_done} Constant node(s) into initializers")
        return bool(n_done)

    def _swap(self, g: Graph, ctx: PassContext) -> bool:
        n_done = 0
        for node in g.nodes:
            if node.op_type not in COMMUTATIVE_OPS or not is_plain(node) or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            if a is not None and b is not None and a.is_const and not b.is_const:
                node.set_inputs([b, a])
                self.changed(node)
                n_done += 1
        if n_done:
            ctx.note(f"moved the constant operand right in {n_done} commutative op(s)")
        return bool(n_done)

    def _gemm(self, g: Graph, ctx: PassContext) -> bool:
        if not any(n.op_type == "MatMul" for n in g.nodes):
            return False
        infer_shapes(g)
        n_done = 0
        blocked: list[str] = []
        for add in list(g.nodes):
            if add.graph is not g or add.op_type != "Add" or not is_plain(add) or len(add.inputs) != 2:
                continue
            for mi, bi in ((0, 1), (1, 0)):
                mm_out, bias = add.inputs[mi], add.inputs[bi]
                if mm_out is None or bias is None or mm_out.producer is None:
                    continue
                mm = mm_out.producer
                if mm.op_type != "MatMul" or not is_plain(mm):
                    continue
                why = self._gemm_blocker(g, mm, add, bias)
                if why:
                    if why != "-":
                        blocked.append(f"{mm.name} ({why})")
                    continue
                y = add.outputs[0]
                a, w = mm.inputs
                g.remove_node(add, force=True)
                gemm = rebuild_node(g, mm, op_type="Gemm", inputs=[a, w, bias], outputs=[y],
                                    attrs={"transB": 0}, attr_types={})
                gemm.meta.setdefault("fused", []).append(f"Add:{add.source}")
                self.changed(gemm)
                n_done += 1
                break
        if blocked:
            ctx.note(f"kept {len(blocked)} MatMul+Add pair(s): " + ", ".join(blocked[:5])
                     + (f" (+{len(blocked) - 5} more)" if len(blocked) > 5 else ""))
        if n_done:
            ctx.note(f"turned {n_done} MatMul+Add pair(s) into Gemm")
        return bool(n_done)

    @staticmethod
    def _gemm_blocker(g: Graph, mm: Node, add: Node, bias) -> str:
        """'' when MatMul+Add can become Gemm; '-' for a silent no; else the reason."""
        if len(mm.inputs) != 2 or mm.inputs[0] is None or mm.inputs[1] is None:
            return "-"
        a, w = mm.inputs
        wc, bc = const_of(w), const_of(bias)
        if wc is None or bc is None:
            return "-"
        y = mm.outputs[0]
        if len(y.uses) != 1 or is_graph_output(g, y) or has_implicit_uses(y):
            return "-"
        if wc.ndim != 2:
            return "-"
        if a.rank != 2:
            rank = "unknown" if a.rank is None else a.rank
            return f"input '{a.name}' has rank {rank} (Gemm is 2-D only)"
        if wc.dtype.kind != "f" or bc.dtype != wc.dtype or (a.dtype is not None and a.dtype != wc.dtype):
            return "-"
        n = wc.shape[1]
        if tuple(bc.shape) not in ((n,), (1, n)):
            return "-"
        if add.outputs[0].dtype is not None and add.outputs[0].dtype != wc.dtype:
            return "-"
        return ""
