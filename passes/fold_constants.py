"""Constant folding."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node
from .base import Pass, PassContext, PassResult, register
from ._util import (NONDETERMINISTIC_OPS, has_implicit_uses, is_default_domain, is_graph_output,
                    remove_if_unused_initializer, replace_outputs_with_constants, static_shape)

#: ops that produce sequences / optionals / nothing tensor-like: never folded
_NON_TENSOR_OPS = frozenset({
    "SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SequenceAt",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap", "Optional",
    "OptionalGetElement", "OptionalHasElement",
})

#: ops that turn compact stored weights into wide ones (kept by ``keep_weight_decompression``)
_DECOMPRESS_OPS = frozenset({"DequantizeLinear", "DynamicQuantizeLinear"})


@register
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants and store their results as initializers.

    Rewrite rules:

    * a default-domain node whose inputs are all initializers (a ``Constant`` node has
      none) is evaluated with ``onnx.reference.ReferenceEvaluator`` (the reference
      semantics of every ONNX op) and each of its outputs becomes an initializer with the
      same name as the value it replaces (subgraphs that capture the name keep working);
    * ``Identity`` of an initializer is bypassed (consumers read the initializer itself,
      no weight copy) unless its output is captured by a subgraph;
    * ``Shape`` (with ``start``/``end``) and ``Size`` of a value whose shape is fully
      static after ``infer_shapes`` fold to int64 initializers even when the value is
      not constant; the folding repeats (re-inferring shapes) so shape arithmetic chains
      (``Shape -> Gather -> Concat -> Reshape``) collapse;
    * initializers that only fed folded nodes are removed.

    Skipped (and noted with ``ctx.note``): non-default domains, nodes with subgraphs
    (``If``/``Loop``/``Scan``), random ops (``RandomNormal``...), sequence/optional ops,
    nodes producing a graph output (the interface stays node-produced), results with more
    than ``max_elements`` elements (so weights are not blown up), ops listed in
    ``skip_ops``, and -- with ``keep_weight_decompression`` -- ``DequantizeLinear`` and
    widening ``Cast`` of constants with at least 1024 elements (folding those would undo
    weight compression), and nodes the reference evaluator cannot run.

    Preconditions: none. Exact: the reference evaluator computes each op in the op's own
    dtype, so folded values match ONNX Runtime's to rounding.
    """

    name = "fold-constants"
    exact = True

    @dataclass
    class Options:
        max_elements: int = 1 << 20
        fold_shapes: bool = True
        keep_weight_decompression: bool = True
        skip_ops: list[str] = field(default_factory=list)
        max_iterations: int = 8

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        changed = False
        skipped: dict[str, list[str]] = {}
        for _ in range(max(1, self.options.max_iterations)):
            if self.options.fold_shapes and any(
                    n.op_type in ("Shape", "Size") and n.inputs and n.inputs[0] is not None
                    and not n.inputs[0].is_const for n in graph.nodes):
                infer_shapes(graph)  # lowers the whole graph: only when a Shape may fold
            progress = self._sweep(graph, skipped)
            changed |= progress
            if not progress:
                break
        for why, names in skipped.items():
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            ctx.note(f"not folded ({why}): {shown}")
        return PassResult(changed=changed, artifacts={"not_folded": skipped} if skipped else {})

    # ------------------------------------------------------------------------------
    def _sweep(self, g: Graph, skipped: dict[str, list[str]]) -> bool:
        progress = False
        for node in list(g.nodes):
            if node.graph is not g:
                continue
            result = self._try_fold(g, node, skipped)
            progress |= result
        return progress

    def _skip(self, skipped: dict[str, list[str]], why: str, node: Node) -> bool:
        lst = skipped.setdefault(why, [])
        if node.name not in lst:
            lst.append(node.name)
        return False

    def _try_fold(self, g: Graph, node: Node, skipped: dict[str, list[str]]) -> bool:
        ins = [v for v in node.inputs if v is not None]
        all_const = all(v.is_const for v in ins)
        shape_fold = (self.options.fold_shapes and not all_const and node.op_type in ("Shape", "Size")
                      and is_default_domain(node) and len(ins) == 1)
        if not all_const and not shape_fold:
            return False
        if not ins and node.op_type != "Constant":
            if node.op_type in NONDETERMINISTIC_OPS:
                return self._skip(skipped, "random op", node)
            return False
        if not is_default_domain(node):
            return self._skip(skipped, f"domain '{node.domain}'", node)
        if node.has_subgraphs:
            return self._skip(skipped, f"{node.op_type} has subgraphs", node)
        if node.op_type in NONDETERMINISTIC_OPS:
            return self._skip(skipped, "random op", node)
        if node.op_type in _NON_TENSOR_OPS:
            return False
        if node.op_type in self.options.skip_ops:
            return self._skip(skipped, "in skip_ops", node)
        if any(is_graph_output(g, o) for o in node.outputs):
            return self._skip(skipped, "produces a graph output", node)
        if not any(o.uses for o in node.outputs):
            return False  # dead: leave it to dce
        if self.options.keep_weight_decompression and self._is_decompression(node):
            return self._skip(skipped, "weight decompression kept", node)

        # Identity of a constant: bypass instead of copying the weight
        if node.op_type == "Identity" and all_const and not has_implicit_uses(node.outputs[0]):
            src = node.inputs[0]
            g.replace_all_uses_with(node.outputs[0], src)
            g.remove_node(node)
            return True

        limit = self.options.max_elements
        for o in node.outputs:
            shp = static_shape(o)
            if o.uses and shp is not None and int(np.prod(shp, dtype=np.int64)) > limit:
                return self._skip(skipped, f"result larger than max_elements={limit}", node)

        if shape_fold:
            arrays = self._fold_shape(node)
            if arrays is None:
                return False
        else:
            try:
                arrays = _evaluate(g, node)
            except Exception as e:  # noqa: BLE001 - any evaluator failure means "do not fold"
                msg = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
                return self._skip(skipped, f"reference evaluator failed: {msg}", node)
            if arrays is None:
                return self._skip(skipped, "non-tensor result", node)
        for o, a in zip(node.outputs, arrays):
            if o.uses and a.size > limit:
                return self._skip(skipped, f"result larger than max_elements={limit}", node)
            if o.dtype is not None and a.dtype != o.dtype:
                if o.dtype.kind != a.dtype.kind and not (o.dtype.kind in "iu" and a.dtype.kind in "iu"):
                    return self._skip(skipped, f"evaluator returned {a.dtype}, expected {o.dtype}", node)
        arrays = [a.astype(o.dtype) if (o.dtype is not None and a.dtype != o.dtype) else a
                  for o, a in zip(node.outputs, arrays)]
        const_inputs = [v for v in node.inputs if v is not None and v.is_const]
        replace_outputs_with_constants(g, node, arrays, pass_name=self.name)
        for v in const_inputs:
            remove_if_unused_initializer(g, v)
        return True

    @staticmethod
    def _is_decompression(node: Node) -> bool:
        if node.op_type in _DECOMPRESS_OPS:
            return True
        if node.op_type in ("Cast", "CastLike"):
            x = node.inputs[0]
            o = node.outputs[0]
            if x is None or not x.is_const or x.const.size < 1024:
                return False
            dt = o.dtype
            if dt is None and node.op_type == "Cast":
                from ._util import onnx_to_np_dtype

                dt = onnx_to_np_dtype(node.attrs.get("to", 0))
            return dt is not None and dt.itemsize > x.const.dtype.itemsize
        return False

    @staticmethod
    def _fold_shape(node: Node) -> list[np.ndarray] | None:
        shp = static_shape(node.inputs[0])
        if shp is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shp, dtype=np.int64)), dtype=np.int64)]
        r = len(shp)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        start = min(max(start + r if start < 0 else start, 0), r)
        if end is None:
            end = r
        else:
            end = int(end)
            end = min(max(end + r if end < 0 else end, 0), r)
        return [np.array(shp[start:end], dtype=np.int64)]


def _evaluate(g: Graph, node: Node) -> list[np.ndarray] | None:
    """Run ``node`` alone on its constant inputs: with the ONNX reference evaluator, or
    with ONNX Runtime when the reference has no implementation for this op/opset."""
    import onnx
    from onnx import helper

    from ..ir.onnx_io import make_attribute, onnx_dtype

    in_names, feeds, vis = [], {}, []
    for i, v in enumerate(node.inputs):
        if v is None:
            in_names.append("")
            continue
        nm = f"in{i}"
        in_names.append(nm)
        arr = np.asarray(v.const)
        feeds[nm] = arr
        vis.append(helper.make_tensor_value_info(nm, onnx_dtype(arr.dtype), list(arr.shape)))
    out_names = [f"out{i}" for i in range(len(node.outputs))]
    onode = helper.make_node(node.op_type, in_names, out_names, domain=node.domain or None)
    onode.attribute.extend(make_attribute(k, node.attrs[k], node.attr_types.get(k)) for k in sorted(node.attrs))
    outs_vi = [helper.make_tensor_value_info(n, 0, None) for n in out_names]
    og = helper.make_graph([onode], "fold", vis, outs_vi)
    model = helper.make_model(og, opset_imports=[helper.make_opsetid("", g.opset or 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        from onnx.reference import ReferenceEvaluator

        res = ReferenceEvaluator(model).run(None, feeds)
    except Exception as ref_err:  # noqa: BLE001 - fall back to ONNX Runtime
        res = _evaluate_ort(model, node, feeds, ref_err)
    arrays = []
    for r in res:
        if r is None or isinstance(r, (list, dict)):
            return None
        a = np.asarray(r)
        if a.dtype == object or a.dtype.kind not in "biuf":
            return None
        # a private C-ordered copy (np.ascontiguousarray would turn 0-d results into 1-d)
        arrays.append(np.array(a, order="C", copy=True))
    return arrays


def _evaluate_ort(model, node: Node, feeds: dict, ref_err: Exception) -> list:
    import onnx
    import onnxruntime as ort

    from ..ir.onnx_io import onnx_dtype

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception:  # noqa: BLE001
        raise ref_err from None
    model = inferred
    for o, vi in zip(node.outputs, model.graph.output):
        if vi.type.tensor_type.elem_type == 0:
            if o.dtype is None:
                raise ref_err
            vi.type.tensor_type.elem_type = onnx_dtype(o.dtype)
    for vi in model.graph.value_info:
        for out in model.graph.output:
            if out.name == vi.name and out.type.tensor_type.elem_type == 0:
                out.type.CopyFrom(vi.type)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - report the reference evaluator's reason
        raise ref_err from None
