"""Per-op quantization table: which inputs of an op get QuantizeLinear/DequantizeLinear,
whether its output is quantized, where its weight and bias are and along which axis the
weight is quantized per channel -- and which ONNX Runtime integer kernel the QDQ group
becomes. The ``quantize`` pass (its placement and strategies) reads only this table; adding
an op is one entry.

Kinds (how the pass treats the op):

* ``compute``     -- Conv / ConvTranspose / Gemm / MatMul: activation inputs quantized
  from calibration, constant weight quantized offline (per channel along
  ``weight_axis``), bias as int32 with scale ``s_x * s_w``, output quantized.
  ORT fuses ``DQ -> op -> Q`` into QLinearConv / QGemm / QLinearMatMul.
* ``elementwise`` -- Add / Mul / Concat / pooling / Sigmoid / LeakyRelu: every float
  input and the output get their own quantization parameters (QLinearAdd, ...). Constant
  float inputs (``x * 0.5``) are quantized offline with their own min/max.
* ``absorb``      -- Relu / Clip: only the output is quantized; the producer's output is
  *not* (``Conv -> Relu -> Q``). When the quantized range clamps exactly like the
  activation (asymmetric, zero point at the type minimum, Clip bounds reproduced) the pass
  removes the activation, leaving ``Conv -> Q`` to fuse (what ORT's ReluQuantFusion /
  ClipQuantFusion would do). Exact in QDQ semantics either way.
* ``passthrough`` -- MaxPool / Reshape / Transpose / Resize / ...: data movement that runs
  on 8-bit data directly. Quantized only when the input already is, with the *same*
  scale and zero point on both sides so ORT drops the Q/DQ pair around it.

Recurrent ops (LSTM / GRU) are not QDQ groups: they are rewritten whole by
``passes/quantize/recurrent.py`` from :data:`RECURRENT_TABLE` (the ORT kernel that runs the
op with int8 weights, if there is one, and whether the op is quantized without ``ops=[...]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from ...ir.graph import Node

Kind = Literal["compute", "elementwise", "absorb", "passthrough"]


@dataclass(frozen=True)
class OpQuant:
    kind: Kind
    #: activation input indices to quantize (``None`` = every input)
    inputs: tuple[int, ...] | None = (0,)
    #: weight input index (constant float -> quantized offline)
    weight: int | None = None
    #: per-channel axis of the weight (int, or function of the node)
    weight_axis: int | Callable[[Node], int] | None = None
    #: reduction axis of the weight (blockwise int4 blocks run along it)
    reduce_axis: int | Callable[[Node], int] | None = None
    #: bias input index (int32 with scale s_x * s_w)
    bias: int | None = None
    #: quantize the output
    output: bool = True
    #: constant float inputs quantized like activations (own min/max, offline)
    const_inputs: bool = False
    #: ORT kernels the QDQ group becomes
    kernels: tuple[str, ...] = field(default_factory=tuple)
    #: supports dynamic quantization (DynamicQuantizeLinear + *Integer)
    dynamic: bool = False

    def axis_of(self, node: Node, rank: int) -> int | None:
        a = self.weight_axis(node) if callable(self.weight_axis) else self.weight_axis
        if a is None:
            return None
        return a % rank if rank else 0

    def reduce_axis_of(self, node: Node, rank: int) -> int | None:
        a = self.reduce_axis(node) if callable(self.reduce_axis) else self.reduce_axis
        if a is None:
            return None
        return a % rank if rank else 0


def _gemm_axis(n: Node) -> int:
    # B is (K, N) when transB=0: output channels along axis 1; (N, K) when transB=1
    return 0 if int(n.attrs.get("transB", 0)) else 1


def _gemm_reduce(n: Node) -> int:
    return 1 if int(n.attrs.get("transB", 0)) else 0


QUANT_TABLE: dict[str, OpQuant] = {
    # ----------------------------------------------------------------- compute
    "Conv": OpQuant("compute", (0,), weight=1, weight_axis=0, reduce_axis=1, bias=2,
                    kernels=("QLinearConv", "ConvInteger"), dynamic=True),
    "ConvTranspose": OpQuant("compute", (0,), weight=1, weight_axis=1, reduce_axis=0, bias=2,
                             kernels=("QLinearConvTranspose",)),
    "Gemm": OpQuant("compute", (0,), weight=1, weight_axis=_gemm_axis, reduce_axis=_gemm_reduce, bias=2,
                    kernels=("QGemm",), dynamic=True),
    "MatMul": OpQuant("compute", (0, 1), weight=1, weight_axis=-1, reduce_axis=-2,
                      kernels=("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger"), dynamic=True),
    # ------------------------------------------------------------- elementwise
    "Add": OpQuant("elementwise", (0, 1), const_inputs=True, kernels=("QLinearAdd",)),
    "Mul": OpQuant("elementwise", (0, 1), const_inputs=True, kernels=("QLinearMul",)),
    "Concat": OpQuant("elementwise", None, kernels=("QLinearConcat",)),
    "AveragePool": OpQuant("elementwise", (0,), kernels=("QLinearAveragePool",)),
    "GlobalAveragePool": OpQuant("elementwise", (0,), kernels=("QLinearGlobalAveragePool",)),
    "Sigmoid": OpQuant("elementwise", (0,), kernels=("QLinearSigmoid",)),
    "LeakyRelu": OpQuant("elementwise", (0,), kernels=("QLinearLeakyRelu",)),
    # ------------------------------------------------------------------ absorb
    "Relu": OpQuant("absorb", (), kernels=()),
    "Clip": OpQuant("absorb", (), kernels=()),
    # ------------------------------------------------------------- passthrough
    "MaxPool": OpQuant("passthrough"),
    "Resize": OpQuant("passthrough"),
    "Reshape": OpQuant("passthrough"),
    "Flatten": OpQuant("passthrough"),
    "Transpose": OpQuant("passthrough"),
    "Squeeze": OpQuant("passthrough"),
    "Unsqueeze": OpQuant("passthrough"),
    "Slice": OpQuant("passthrough"),
    "Split": OpQuant("passthrough"),
    "Identity": OpQuant("passthrough"),
}

@dataclass(frozen=True)
class RecurrentQuant:
    """How ``passes/quantize/recurrent.py`` treats a recurrent op."""

    #: gates per step (the rows of W / R are ``gates * hidden_size``)
    gates: int
    #: the ``com.microsoft`` ORT kernel with int8 W / R and dynamically quantized activations
    #: (``None``: ORT has none -- weights are only stored int8 behind DequantizeLinear)
    kernel: str | None
    #: quantized when ``ops`` is not given (an op without an integer kernel only saves size)
    default: bool


RECURRENT_TABLE: dict[str, RecurrentQuant] = {
    "LSTM": RecurrentQuant(4, "DynamicQuantizeLSTM", default=True),
    "GRU": RecurrentQuant(3, None, default=False),
}


def recurrent_spec(node: Node) -> RecurrentQuant | None:
    """The :data:`RECURRENT_TABLE` entry of a default-domain LSTM / GRU node, else ``None``."""
    if node.domain not in ("", "ai.onnx") or node.has_subgraphs:
        return None
    return RECURRENT_TABLE.get(node.op_type)


#: op types whose weight is quantized in weight-only mode
WEIGHT_OPS = tuple(k for k, v in QUANT_TABLE.items() if v.weight is not None)
#: op types that gain the most from integer kernels (ranked in the fallback, reported as float)
COMPUTE_OPS = tuple(k for k, v in QUANT_TABLE.items() if v.kind == "compute")


def spec_for(node: Node) -> OpQuant | None:
    """The table entry of a default-domain node without subgraphs, else ``None``."""
    if node.domain not in ("", "ai.onnx") or node.has_subgraphs:
        return None
    return QUANT_TABLE.get(node.op_type)
