"""Remove ops that do not change their input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node, Value
from .base import Pass, PassContext, PassResult, register
from ._util import (broadcast_keeps_shape, const_of, has_implicit_uses, is_graph_output, is_plain,
                    is_used, onnx_to_np_dtype, remove_if_unused_initializer, static_shape)

_INT64_MAX = np.iinfo(np.int64).max


@register
class EliminateIdentity(Pass):
    """Remove no-op nodes: consumers read the node's data input directly.

    Rewrite rules (``y = op(x, ...)`` is removed and every use of ``y`` reads ``x``):

    * ``Identity``;
    * ``Dropout`` in inference form (no ``training_mode`` input, or a constant false one)
      whose ``mask`` output is unused;
    * ``Cast`` / ``CastLike`` to ``x``'s own dtype;
    * ``Reshape`` whose constant target equals ``x``'s shape (``0`` copies a dim unless
      ``allowzero``; a single ``-1`` is accepted when every other dim matches), and
      ``Flatten`` of a rank-2 input with ``axis=1`` or whose static result equals
      ``x``'s static shape;
    * ``Transpose`` with the identity permutation;
    * ``Pad`` with all-zero pads; ``Slice`` that takes everything (step 1, start 0,
      end past the dim); ``Concat`` of a single input; ``Expand`` whose broadcast
      leaves ``x``'s shape unchanged;
    * ``Add``/``Sub`` of a constant 0 and ``Mul``/``Div`` by a constant 1 (either side
      for Add/Mul), only when broadcasting leaves ``x``'s shape unchanged.

    Model outputs keep their names: when ``y`` is a graph output, the value ``x`` is
    renamed to ``y``'s name; if that is impossible (``x`` is a graph input, an
    initializer or another output, or is read by a subgraph) the node is kept. A node
    whose output is read by an ``If``/``Loop``/``Scan`` body (by name) is kept and noted.

    Preconditions: shapes/dtypes are taken from ``infer_shapes``; anything unknown keeps
    the node. Non-default domains and subgraph ops are never touched. Exact.
    """

    name = "eliminate-identity"
    exact = True
    requires = frozenset({"shapes"})

    @dataclass
    class Options:
        arithmetic: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed: list[str] = []
        for node in list(graph.nodes):
            if node.graph is not graph or not is_plain(node) or not node.outputs:
                continue
            x = self._noop_input(node)
            if x is None:
                continue
            y = node.outputs[0]
            if has_implicit_uses(y):
                ctx.note(f"kept {node.op_type} '{node.name}': its output '{y.name}' is captured by a subgraph")
                continue
            if is_graph_output(graph, y) and not self._can_take_name(graph, x):
                continue
            if x.dtype is not None and y.dtype is not None and x.dtype != y.dtype:
                continue
            others = [v for v in node.inputs[1:] if v is not None]
            graph.replace_all_uses_with(y, x)
            graph.remove_node(node)
            for v in others:
                remove_if_unused_initializer(graph, v)
            removed.append(f"{node.op_type}:{node.name}")
        if removed:
            ctx.note(f"removed {len(removed)} no-op node(s): {', '.join(removed[:10])}"
                     + (f" (+{len(removed) - 10} more)" if len(removed) > 10 else ""))
        return PassResult(changed=bool(removed), metrics={"removed": len(removed)})

    @staticmethod
    def _can_take_name(g: Graph, x: Value) -> bool:
        """replace_all_uses_with renames ``x`` to the output's name only in this case."""
        return (x.producer is not None and not is_graph_output(g, x)
                and not any(v is x for v in g.inputs)
                and not any(n.has_subgraphs for n in x.users))

    # ------------------------------------------------------------------------------
    def _noop_input(self, n: Node) -> Value | None:
        """The input ``n`` passes through unchanged, or None if ``n`` is not a no-op."""
        op = n.op_type
        ins = n.inputs
        x = ins[0] if ins else None
        if x is None:
            return None
        if op == "Identity":
            return x
        if op == "Dropout":
            if any(is_used(n.graph, o) for o in n.outputs[1:]):
                return None
            tm = ins[2] if len(ins) > 2 else None
            if tm is not None:
                c = const_of(tm)
                if c is None or bool(np.asarray(c).reshape(-1)[0]):
                    return None
            return x
        if op == "Cast":
            to = onnx_to_np_dtype(n.attrs.get("to", 0))
            return x if to is not None and x.dtype is not None and to == x.dtype else None
        if op == "CastLike":
            t = ins[1] if len(ins) > 1 else None
            return x if t is not None and t.dtype is not None and x.dtype == t.dtype else None
        if op == "Reshape":
            return x if self._reshape_noop(n, x) else None
        if op == "Flatten":
            return x if self._flatten_noop(n, x) else None
        if op == "Transpose":
            if x.shape is None:
                return None
            r = len(x.shape)
            perm = n.attrs.get("perm")
            perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
            return x if perm == list(range(r)) else None
        if op == "Pad":
            pads = n.attrs.get("pads") if len(ins) < 2 else const_of(ins[1])
            if pads is None:
                return None
            return x if not np.any(np.asarray(pads)) else None
        if op == "Slice":
            return x if self._slice_noop(n, x) else None
        if op == "Concat":
            return x if len(ins) == 1 else None
        if op == "Expand":
            shp = const_of(ins[1]) if len(ins) > 1 else None
            if shp is None or x.shape is None:
                return None
            return x if broadcast_keeps_shape(x, _ShapeOnly(shp)) else None
        if op in ("Add", "Mul", "Sub", "Div") and self.options.arithmetic and len(ins) == 2:
            neutral = 0 if op in ("Add", "Sub") else 1
            cands = [(ins[0], ins[1])]
            if op in ("Add", "Mul"):
                cands.append((ins[1], ins[0]))
            for data, k in cands:
                if data is None or k is None or data.is_const:
                    continue
                c = const_of(k)
                if c is None or c.size == 0 or c.dtype.kind not in "biuf":
                    continue
                if data.dtype is not None and c.dtype != data.dtype:
                    continue
                if not np.all(c == neutral):
                    continue
                if broadcast_keeps_shape(data, c):
                    return data
            return None
        return None

    @staticmethod
    def _reshape_noop(n: Node, x: Value) -> bool:
        t = const_of(n.inputs[1]) if len(n.inputs) > 1 else None
        if t is None or x.shape is None:
            return False
        t = [int(d) for d in np.asarray(t).reshape(-1)]
        if len(t) != len(x.shape):
            return False
        allowzero = int(n.attrs.get("allowzero", 0))
        minus = [i for i, d in enumerate(t) if d == -1]
        if len(minus) > 1:
            return False
        for i, (td, xd) in enumerate(zip(t, x.shape)):
            if td == 0 and not allowzero:
                continue  # copies the input dim
            if td == -1:
                continue
            if not (isinstance(xd, int) and xd == td):
                return False
        return True  # every other dim matches, so a single -1 resolves to x's dim

    @staticmethod
    def _flatten_noop(n: Node, x: Value) -> bool:
        if x.shape is None:
            return False
        r = len(x.shape)
        axis = int(n.attrs.get("axis", 1))
        if axis < 0:
            axis += r
        if r == 2 and axis == 1:
            return True
        shp = static_shape(x)
        if shp is None:
            return False
        out = (int(np.prod(shp[:axis], dtype=np.int64)), int(np.prod(shp[axis:], dtype=np.int64)))
        return out == tuple(shp)

    @staticmethod
    def _slice_noop(n: Node, x: Value) -> bool:
        ins = list(n.inputs)
        if x.shape is None:
            return False
        r = len(x.shape)
        if len(ins) >= 3:  # opset >= 10: starts, ends, axes, steps are inputs
            starts = const_of(ins[1])
            ends = const_of(ins[2])
            axes = const_of(ins[3]) if len(ins) > 3 and ins[3] is not None else None
            steps = const_of(ins[4]) if len(ins) > 4 and ins[4] is not None else None
            if starts is None or ends is None or (len(ins) > 3 and ins[3] is not None and axes is None) \
                    or (len(ins) > 4 and ins[4] is not None and steps is None):
                return False
        else:
            starts, ends, axes, steps = n.attrs.get("starts"), n.attrs.get("ends"), n.attrs.get("axes"), None
            if starts is None or ends is None:
                return False
        starts = [int(v) for v in np.asarray(starts).reshape(-1)]
        ends = [int(v) for v in np.asarray(ends).reshape(-1)]
        axes = list(range(len(starts))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
        steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
        if not (len(starts) == len(ends) == len(axes) == len(steps)):
            return False
        for s, e, a, st in zip(starts, ends, axes, steps):
            if st != 1:
                return False
            a = a + r if a < 0 else a
            if not 0 <= a < r:
                return False
            d = x.shape[a]
            if s < 0:
                if not (isinstance(d, int) and s + d <= 0):
                    return False
            elif s != 0:
                return False
            if e >= _INT64_MAX // 2:
                continue
            if not isinstance(d, int):
                return False
            if (e + d if e < 0 else e) < d:
                return False
        return True


class _ShapeOnly:
    """An array-like exposing only ``shape``/``ndim`` for :func:`broadcast_keeps_shape`."""

    def __init__(self, shp):
        self.shape = tuple(int(d) for d in np.asarray(shp).reshape(-1))
        self.ndim = len(self.shape)
