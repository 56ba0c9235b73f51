"""Post-training quantization: QDQ (static), dynamic, weight-only; accuracy-aware fallback.

The pass, split by concern:

==================  ==========================================================================
``__init__``        the :class:`Quantize` pass: options, validation, requirements, ``run``
``table``           the per-op table (:class:`OpQuant`, :func:`spec_for`)
``placement``       candidates, ``exclude`` matching and the :class:`QuantPlan` of what gets Q/DQ
``weights``         :func:`quantize_weight` and the weight / bias DequantizeLinear builders
``static``          calibration and the QDQ rewrite (int32 bias, absorbed activations)
``dynamic``         DynamicQuantizeLinear + MatMulInteger / ConvInteger
``weight_only``     int8 / INT4 weights only
``recurrent``       LSTM -> com.microsoft.DynamicQuantizeLSTM; GRU int8 weight QDQ only with ``ops=[GRU]``
``budget``          the accuracy-budget search (sensitivity per FLOP, bisection, add-back)
``integer_path``    the ``integer path`` note (``nnsculpt.runtime.integer_path`` runs the check)
``state``           :class:`QuantRun`: everything one run finds (the pass object keeps none)
==================  ==========================================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np

from ...ir.errors import AlreadyQuantizedError, PassOptionError
from ...ir.graph import Graph
from ..base import Pass, PassContext, PassResult, register
from .dynamic import run_dynamic
from .integer_path import report_integer
from .placement import QuantPlan, fragile
from .state import QuantRun
from .static import ActQuant, run_static
from .table import OpQuant, spec_for
from .weight_only import run_weight_only
from .weights import FLOAT32, quantize_weight

log = logging.getLogger("nnsculpt.passes.quantize")

__all__ = ["Quantize", "quantize_weight", "QuantPlan", "ActQuant", "QuantRun", "OpQuant", "spec_for", "FLOAT32"]


#: ops that mean a graph is already quantized (QDQ, QOperator, integer and com.microsoft forms)
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM", "MatMulNBits", "MatMulBnb4", "QAttention", "QEmbedLayerNormalization",
})


def quantized_ops(graph: Graph) -> dict[str, int]:
    """``{op_type: count}`` of the nodes that show ``graph`` is already quantized."""
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear") or n.op_type.startswith("QOrdered"):
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@register
class Quantize(Pass):
    """Quantize to 8-bit integers with QuantizeLinear/DequantizeLinear pairs (QDQ), dynamically, or weight-only.

    Rewrite rules (static mode, the default; per-op rules come from ``passes/quantize/table.py``):

    * a float32 activation ``x`` read by a quantized op becomes ``DequantizeLinear(
      QuantizeLinear(x, s, z), s, z)``; ``s, z`` come from calibration (``calibration`` =
      global | max | percentile | mse | kl over histograms of ``x`` on ``ctx.calib_data``),
      asymmetric ``uint8`` by default (``activations=int8``, ``symmetric=true``). One pair
      per tensor; when the producer is quantized every consumer reads the pair (so ORT can
      fuse ``op -> Q``), otherwise only the quantized consumers do;
    * a constant weight of Conv / ConvTranspose / Gemm / MatMul is stored as ``int8``
      (symmetric, per channel along Conv axis 0, ConvTranspose axis 1, Gemm axis 0 if
      ``transB`` else 1, MatMul axis -1; ``per_channel=false``: one scale) followed by a
      ``DequantizeLinear``; ``weights=int4`` keeps 4-bit values in int8 storage (so ORT's
      int8 kernels run them);
    * the bias of Conv / ConvTranspose / Gemm becomes ``int32`` with scale ``s_x * s_w``
      and zero point 0 (the pattern ORT fuses into QLinearConv / QGemm; ``bias=float``
      keeps it float);
    * Relu / Clip after a quantized op are *absorbed*: their output is quantized in place of
      the op's output (zero point at the type minimum), and when that quantizer clamps
      exactly like the activation (``Q(relu(x)) == Q(x)``; Clip bounds reproduced by the
      grid) the activation node is removed, leaving ``Conv -> Q`` for ORT to fuse;
      MaxPool / Reshape / Resize / ... reuse their input's parameters (ORT drops the pair);
    * ``mode=dynamic``: ``DynamicQuantizeLinear`` on the input and ``MatMulInteger`` /
      ``ConvInteger`` on int8 weights, rescaled by ``Cast -> Mul(s_x * s_w) -> Add(bias)``
      (ORT fuses the MatMul form into DynamicQuantizeMatMul); no calibration. By default
      only MatMul / Gemm (``ops=[Conv,MatMul,Gemm]`` adds ConvInteger, slow on ORT CPU);
    * ``mode=weight-only``: only weights are quantized (int8 per channel; ``weights=int4``:
      real INT4 with ``block_size`` blocks along the reduction axis, opset 21; ORT fuses
      ``DQ -> MatMul`` into MatMulNBits);
    * ``budget``: the largest allowed error of the quantized model vs fp32 on the calibration
      data, by ``metric`` (``rel_l2`` -- relative L2, the default; ``max_rel``; ``cosine`` =
      1 - cosine; ``top1`` = 1 - top-1 agreement; ``iou@0.3`` = 1 - IoU of the maps above
      0.3; or a ``metric(ref, got)`` callable in Python). If the fully quantized model
      exceeds it, the search (``passes/quantize/budget.py``) ranks layers by sensitivity per
      FLOP, bisects that order for the longest prefix within the budget and tries the
      largest remaining layers one at a time (``budget_tries``): the most FLOPs in integer
      kernels within the budget (mixed precision). report.json holds the chosen and float
      layers, the sensitivities and the curve of error vs integer-FLOPs share.

    The default opset is raised with ``onnx.version_converter`` when needed (per-channel
    QDQ needs 13, INT4 21); node names and provenance are kept. BatchNormalization is
    folded first (``fold_bn``), and hand-written layer norms and GELU chains are fused into
    ``LayerNormalization`` / ``Gelu`` first (``fuse``; exact passes, run as report entries of
    their own only when they find a chain; they raise the opset to 17 / 20), so that they run
    as single float ops. The note ``integer path`` reports which layers ORT actually
    runs in integer kernels and their share of the FLOPs.

    * an ``LSTM`` with constant weights becomes ``com.microsoft.DynamicQuantizeLSTM`` (int8
      W / R, a scale per gate row; activations quantized inside the kernel) in static and
      dynamic mode; ``GRU`` stays float (ORT has no integer GRU kernel) unless ``ops=[GRU,...]``
      asks for int8 weights + DequantizeLinear (smaller file, float compute). Recurrent nodes
      inside If / Loop bodies, with ``layout=1`` or computed weights are left float, noted
      (``passes/quantize/recurrent.py``);
    * numerically fragile chains stay float by default (``keep_fragile_float``): an Add / Mul /
      Concat / pooling / Sigmoid node, or a MatMul of two activations (attention scores),
      that reads a Softmax / Exp / Log / Div / Reciprocal / Sqrt / Pow / Erf / Tanh / Sub /
      Reduce* output or only feeds such ops -- hand-written layer norms, softmax and GELU
      chains that ``fuse`` could not turn into single ops (softmax, unusual norms).
      Compute ops with a constant weight are always candidates; ``ops=[...]`` given by hand
      turns the rule off;
    * an already-quantized model (QuantizeLinear / DequantizeLinear, QLinear*, *Integer,
      com.microsoft quantized ops) is refused (``AlreadyQuantizedError``) unless
      ``requantize=true``, which leaves what already reads or feeds Q/DQ alone.

    Preconditions: static mode needs calibration data (``--calib-data`` / ``ctx.calib_data``);
    only float32 tensors and default-domain ops without subgraphs are quantized; graph
    outputs stay float; only op types in ``ops`` (default: all the table knows) are
    quantized, and nodes matching ``exclude`` (names, op types, provenance, globs) are left
    alone.
    """

    name = "quantize"
    exact = False
    requirement_hints = {"calib-data": "use quantize{mode=dynamic} or quantize{mode=weight-only} without data"}
    drift_hint = ("quantize{budget=0.01,metric=top1|cosine|rel_l2|iou@0.3} keeps the layers that cause it in "
                  "float (the most FLOPs in integer kernels within the budget); for transformers "
                  "quantize{mode=dynamic} (activation scales per run; all-MiniLM-L6-v2: cosine 0.993 where static "
                  "gives 0.78); calibration=mse|kl may help")

    @dataclass
    class Options:
        mode: Literal["static", "dynamic", "weight-only"] = "static"
        calibration: Literal["global", "max", "percentile", "mse", "kl"] = "percentile"
        threshold: Optional[float] = None
        percentile: float = 99.99
        per_channel: bool = True
        symmetric: bool = False
        activations: Literal["uint8", "int8"] = "uint8"
        weights: Literal["int8", "int4"] = "int8"
        block_size: int = 32
        bias: Literal["int32", "float"] = "int32"
        ops: list[str] = field(default_factory=list)
        exclude: list[str] = field(default_factory=list)
        budget: Optional[float] = None
        num_bins: int = 2048
        calib_batch_size: int = 16
        budget_samples: int = 256
        metric: str = "rel_l2"            # the budget's error: rel_l2 | max_rel | cosine | top1 | iou@T
        budget_tries: int = 16            # budget search: layers tried one at a time after the bisection
        sensitivity: Literal["one-at-a-time", "leave-one-out"] = "one-at-a-time"
        fold_bn: bool = True
        check_integer: bool = True
        progress: Optional[bool] = None   # tqdm bar while calibrating; default: when stderr is a terminal
        requantize: bool = False          # quantize a model that already holds quantized ops
        keep_fragile_float: bool = True   # default placement: normalization / softmax / GELU chains stay float
        fuse: bool = True                 # fuse-layernorm and fuse-gelu run first (when they find a chain)

    def __init__(self, *, metric: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float] | None = None,
                 act_overrides: Mapping[str, tuple[float, int]] | None = None,
                 weight_scales: Mapping[str, np.ndarray] | None = None, **options: Any):
        """``metric``: a metric name (the ``metric`` option) or a callable ``metric(ref, got) -> error``
        (lower is better) that replaces it;
        ``act_overrides`` maps tensor names to ``(scale, zero_point)`` and ``weight_scales``
        maps node names to weight scales (QAT export); both skip calibration for them.
        These and the options are the pass's whole state: a run records what it finds in a
        :class:`QuantRun` and returns it in its :class:`PassResult`."""
        if isinstance(metric, str):
            options["metric"], metric = metric, None
        super().__init__(**options)
        self.metric = metric
        self.act_overrides = dict(act_overrides or {})
        self.weight_scales = {k: np.asarray(v, np.float32) for k, v in (weight_scales or {}).items()}
        self._validate()

    # ------------------------------------------------------------------ options
    def _validate(self) -> None:
        o = self.options
        if o.calibration == "global" and o.mode == "static" and (o.threshold is None or o.threshold <= 0):
            raise PassOptionError("pass 'quantize': calibration=global needs a positive option 'threshold'")
        if not 0 < o.percentile <= 100:
            raise PassOptionError(f"pass 'quantize': option 'percentile' must be in (0, 100], got {o.percentile}")
        if o.block_size < 1:
            raise PassOptionError(f"pass 'quantize': option 'block_size' must be >= 1, got {o.block_size}")
        if o.num_bins < 128:
            raise PassOptionError(f"pass 'quantize': option 'num_bins' must be >= 128, got {o.num_bins}")
        if o.calib_batch_size < 1:
            raise PassOptionError(f"pass 'quantize': option 'calib_batch_size' must be >= 1, got {o.calib_batch_size}")
        if o.budget is not None and o.budget < 0:
            raise PassOptionError(f"pass 'quantize': option 'budget' must be >= 0, got {o.budget}")
        from ...runtime.metrics import check_metric_name

        try:
            check_metric_name(o.metric)
        except ValueError as e:
            raise PassOptionError(f"pass 'quantize': option 'metric': {e}") from None
        if o.budget_tries < 0:
            raise PassOptionError(f"pass 'quantize': option 'budget_tries' must be >= 0, got {o.budget_tries}")

    @property
    def act_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.options.activations == "uint8" else np.int8)

    @property
    def weight_bits(self) -> int:
        return 4 if self.options.weights == "int4" else 8

    def show_progress(self) -> bool:
        """Whether calibration shows a progress bar (option ``progress``; default: stderr is a terminal)."""
        if self.options.progress is not None:
            return self.options.progress
        import sys

        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    # ------------------------------------------------------------------ driver
    def requirements(self) -> frozenset[str]:
        o = self.options
        need = {"shapes", f"opset>={self.min_opset}"}
        if o.fold_bn:
            need.add("bn-folded")
        if o.fuse:
            need.update({"layernorm-fused", "gelu-fused"})
        if o.mode == "static" and not self.act_overrides:
            need.add("calib-data")
        return frozenset(need)

    @property
    def min_opset(self) -> int:
        o = self.options
        if o.mode == "weight-only" and o.weights == "int4":
            return 21
        if o.mode == "dynamic":
            return 11  # DynamicQuantizeLinear; MatMulInteger / ConvInteger are opset 10
        return 13      # per-channel QDQ

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        found = quantized_ops(graph)
        if found:
            summary = ", ".join(f"{k} x{v}" for k, v in sorted(found.items()))
            if not o.requantize:
                raise AlreadyQuantizedError(
                    f"pass 'quantize': model '{graph.name}' is already quantized ({summary}); quantizing it "
                    f"again would stack a second rounding on the first -- quantize the float model, or pass "
                    f"quantize{{requantize=true}} to quantize only what is still float")
            ctx.note(f"requantize: the model already holds {summary}; those are left as they are")
        state = QuantRun(ctx)
        if o.mode == "static" and o.keep_fragile_float and not o.ops:
            kept = [n.name for n in graph.nodes if (sp := spec_for(n)) is not None and fragile(n, sp)]
            if kept:
                state.artifacts["fragile_float"] = kept
                ctx.note(f"kept {len(kept)} node(s) of normalization / softmax / GELU chains in float "
                         f"(keep_fragile_float): {', '.join(kept[:10])}{' ...' if len(kept) > 10 else ''}")
        if o.mode == "weight-only":
            n = run_weight_only(self, graph, state)
        elif o.mode == "dynamic":
            n = run_dynamic(self, graph, state)
        else:
            n = run_static(self, graph, state)
        if n and o.check_integer and o.mode != "weight-only":
            report_integer(graph, state)
        return PassResult(changed=bool(n), artifacts=state.artifacts)
