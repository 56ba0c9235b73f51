"""The integer path: which compute nodes ONNX Runtime actually runs in integer kernels.

:func:`integer_fraction` builds an ORT session with ``optimized_model_filepath`` set, reads
the optimized graph back and reports which original compute nodes became integer kernels
(``QLinearConv``, ``MatMulInteger``, ``QGemm``, ...) and the fraction of FLOPs they carry
(:class:`IntegerReport`). It runs ONNX Runtime, so it is an execution service; the
``quantize`` pass calls it for its ``integer path`` note (``passes/quantize/integer_path.py``),
and benchmarks / tests call it on any quantized model.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["integer_fraction", "IntegerReport", "INTEGER_KERNELS", "INTEGER_PASSTHROUGH",
           "WEIGHT_ONLY_KERNELS"]

#: ORT kernels that compute in integer arithmetic
INTEGER_KERNELS = frozenset({
    "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearConvTranspose", "QLinearReduceMean", "QLinearWhere", "DynamicQuantizeConv",
    "QAttention", "QEmbedLayerNormalization", "NhwcQLinearConv", "DynamicQuantizeLSTM",
})
#: ops that run on 8-bit data unchanged (count as integer when their input is 8-bit)
INTEGER_PASSTHROUGH = frozenset({"MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                                 "Resize", "Slice", "Split", "Pad", "Identity", "NhwcMaxPool",
                                 "Gather", "Concat"})
#: weight-only low-bit kernels (float activations)
WEIGHT_ONLY_KERNELS = frozenset({"MatMulNBits", "MatMulBnb4"})
_QUANT_PRODUCERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
#: integer kernels whose output is not 8-bit (int32 or float)
_WIDE_OUTPUT = frozenset({"ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                          "DynamicQuantizeConv", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeLSTM"})
#: float ops that carry the compute (listed in ``float_compute_nodes`` when not integer)
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
_NOT_COMPUTE = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast"})
_TOKEN = re.compile(r"(_token_\d+|_nchwc|_quant|_fused|_nhwc)+$")


@dataclass
class IntegerReport:
    """Result of :func:`integer_fraction`."""

    fraction: float                       # integer FLOPs / all FLOPs
    integer_flops: int
    total_flops: int
    integer_nodes: list[str] = field(default_factory=list)       # original names
    float_compute_nodes: list[str] = field(default_factory=list)  # Conv/Gemm/MatMul/LSTM/GRU left in float
    weight_only_nodes: list[str] = field(default_factory=list)
    optimized_ops: dict[str, int] = field(default_factory=dict)  # histogram of the optimized graph

    def __float__(self) -> float:
        return self.fraction

    def summary(self) -> str:
        s = (f"{self.fraction:.1%} of FLOPs run in integer kernels "
             f"({len(self.integer_nodes)} nodes)")
        if self.float_compute_nodes:
            fl = self.float_compute_nodes
            s += f"; float compute nodes: {', '.join(fl[:8])}{' ...' if len(fl) > 8 else ''}"
        if self.weight_only_nodes:
            s += f"; weight-only low-bit kernels: {len(self.weight_only_nodes)}"
        return s


def _with_input_shapes(g, input_shapes: Mapping[str, Sequence[int]]):
    """A copy of ``g`` whose inputs have the given concrete shapes, shapes re-inferred (so
    FLOPs count real spatial sizes instead of symbolic dims)."""
    from ..ir.analysis import infer_shapes

    g = g.copy()
    for v in g.inputs:
        if v.name in input_shapes:
            v.shape = tuple(int(d) for d in input_shapes[v.name])
    for n in g.nodes:  # forget declared intermediate shapes (e.g. -1 dims of some exporters)
        for o in n.outputs:
            if o not in g.outputs:
                o.shape = None
    g.invalidate()
    infer_shapes(g)
    return g


def integer_fraction(model_or_graph, *, reference=None, threads: int = 1,
                     input_shapes: Mapping[str, Sequence[int]] | None = None,
                     absorbed: Mapping[str, str] | None = None) -> IntegerReport:
    """Which compute nodes ORT runs as integer kernels, and their share of the FLOPs.

    ``model_or_graph``: a quantized Graph, ModelProto or path. ``reference``: the fp32
    graph whose :func:`~nnsculpt.ir.analysis.node_costs` give the FLOPs of each original
    node (default: the quantized graph itself, whose Conv/MatMul nodes keep their names
    and shapes; Q/DQ/Cast nodes count zero). ``input_shapes`` (name -> shape) make the
    FLOP count use concrete input sizes when the model's dims are symbolic. Fused kernels are
    mapped back to original nodes by name (ORT keeps the node name, adding suffixes such as
    ``_token_N``). ``absorbed`` maps reference nodes that the quantized graph no longer has
    (a Relu / Clip whose clamp the quantizer does) to the node they were folded into; they
    count as integer when that node does.
    """
    import onnx

    from ..ir.analysis import node_costs
    from ..ir.graph import Graph
    from ..ir.onnx_io import from_onnx, from_onnx_model, to_onnx_model
    from .ort import session

    if isinstance(model_or_graph, Graph):
        g = model_or_graph
        model = to_onnx_model(g)
    elif isinstance(model_or_graph, onnx.ModelProto):
        model = model_or_graph
        g = from_onnx_model(model)
    else:
        g = from_onnx(str(model_or_graph))
        model = onnx.load(str(model_or_graph))
    ref = reference if reference is not None else g
    if input_shapes:
        ref = _with_input_shapes(ref, input_shapes)
    costs = {c.name: c for c in node_costs(ref)}
    ref_nodes = {n.name: n for n in ref.nodes}
    total = sum(max(c.flops, 0) for c in costs.values()
                if c.op_type not in _NOT_COMPUTE and not ref_nodes[c.name].meta.get("quant_helper"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        session(model.SerializeToString(), threads=threads, optimized_model_path=path)
        opt = onnx.load(path, load_external_data=False)
    hist: dict[str, int] = {}
    eight_bit: set[str] = set()
    for t in opt.graph.initializer:
        if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
            eight_bit.add(t.name)
    integer: set[str] = set()
    weight_only: set[str] = set()

    def original(name: str) -> str | None:
        if name in costs:
            return name
        base = _TOKEN.sub("", name)
        if base in costs:
            return base
        return None

    for n in opt.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
        orig = original(n.name)
        is_int = n.op_type in INTEGER_KERNELS or (
            n.op_type in INTEGER_PASSTHROUGH and bool(n.input) and n.input[0] in eight_bit)
        if n.op_type in _QUANT_PRODUCERS:
            eight_bit.add(n.output[0])
        elif n.op_type == "QGemm":
            if len(n.input) > 7 and n.input[7]:  # y_scale given: 8-bit output
                eight_bit.update(n.output)
        elif is_int and n.op_type not in _WIDE_OUTPUT:
            eight_bit.update(o for o in n.output if o)
        if orig is None:
            continue
        if is_int:
            integer.add(orig)
        elif n.op_type in WEIGHT_ONLY_KERNELS:
            weight_only.add(orig)
    for act, prod in (absorbed or {}).items():
        if prod in integer and act in costs:
            integer.add(act)
    int_flops = sum(max(costs[n].flops, 0) for n in integer)
    float_compute = [c.name for c in costs.values()
                     if c.op_type in _COMPUTE and c.name not in integer
                     and c.flops > 0]
    return IntegerReport(fraction=(int_flops / total) if total else 0.0, integer_flops=int(int_flops),
                         total_flops=int(total), integer_nodes=sorted(integer),
                         float_compute_nodes=float_compute, weight_only_nodes=sorted(weight_only),
                         optimized_ops=dict(sorted(hist.items())))
