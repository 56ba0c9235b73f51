"""Binary (XNOR-Net) and ternary (TWN) weights with a per-output-channel scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, mark_changed
from ._lowrank import drop_if_unused
from .base import Pass, PassContext, PassResult, register
from ..runtime.weight_codes import binarize
from .cluster_weights import WEIGHT_INPUT, rel_error, replace_with_dequantize, select_weight_layers


@register
class BinarizeWeights(Pass):
    """Binarize (XNOR-Net) or ternarize (TWN) Conv / ConvTranspose / Gemm / MatMul weights with one scale per
    output channel.

    Rewrite rules, per selected weight ``W`` and output channel ``o`` (Conv ``W[O, ...]`` axis 0, Gemm /
    MatMul the output axis):

    * binary: ``W'_o = alpha_o * sign(W_o)``, ``alpha_o = mean |W_o|`` (``sign(0) = +1``);
    * ``ternary=true``: ``delta_o = threshold * mean |W_o|`` (TWN's 0.7), ``W'_o = alpha_o * sign(W_o)`` where
      ``|W_o| > delta_o`` and 0 elsewhere, ``alpha_o`` = mean of the kept ``|W_o|``;
    * ``store=dequantize`` (default): the ONNX file holds int8 codes in {-1, 0, +1} and the float scales,
      ``DequantizeLinear(codes, alpha, 0; axis = output axis)`` feeds the layer (4x smaller than float32
      in plain ONNX; ``nnsculpt pack`` codes them at about 1 / 1.6 bits per weight), and it runs in plain
      ORT; ``store=float``: ``W'`` stays a float initializer, so the model lowers to torch for
      training: ``nnsculpt distill`` recognizes weights that are binary / ternary per output channel and
      trains them with the straight-through estimator (latent float weights updated by the gradient
      w.r.t. the binarized ones, re-binarized after every step, BinaryConnect / XNOR-Net), then
      ``binarize-weights`` again (idempotent on such weights) stores them as int8 codes.

    Selection as ``cluster-weights``: ``ops``, ``layers`` / ``exclude`` (a ``layers`` entry matching no node
    is an error), weights with at least ``min_elements`` elements (XNOR-Net keeps the first and last
    layers in full precision; on small nets those are the ones below the threshold -- name them in
    ``exclude`` otherwise). Preconditions: opset >= 13 (per-axis DequantizeLinear). Lossy.

    Artifacts: ``layers`` (node -> ``source``, ``shape``, ``mode``, ``zeros`` fraction, ``alpha_min`` /
    ``alpha_max``, ``weight_rel_err``, ``storage``, ``bytes_before`` / ``bytes_after``).
    """

    name = "binarize-weights"
    exact = False
    requires = frozenset({"opset>=13"})
    drift_hint = "train with the straight-through estimator: binarize-weights{store=float}, then " \
                 "`nnsculpt distill --teacher INPUT`, then binarize-weights; or exclude the sensitive layers"

    @dataclass
    class Options:
        ternary: bool = False
        threshold: float = 0.7
        store: Literal["dequantize", "float"] = "dequantize"
        ops: list[str] = field(default_factory=lambda: ["Conv", "ConvTranspose", "Gemm", "MatMul"])
        layers: list[str] = field(default_factory=list)
        exclude: list[str] = field(default_factory=list)
        min_elements: int = 1024

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        if not 0.0 < o.threshold < 1.0:
            raise PassOptionError(f"pass '{self.name}': option 'threshold' has bad value {o.threshold!r}: "
                                  f"must be in (0, 1) (a fraction of mean |W|; TWN uses 0.7)")
        unknown = [x for x in o.ops if x not in WEIGHT_INPUT]
        if unknown:
            raise PassOptionError(f"pass '{self.name}': option 'ops' has bad value {o.ops!r}: {unknown[0]!r} is "
                                  f"not one of {sorted(WEIGHT_INPUT)}")
        if o.min_elements < 1:
            raise PassOptionError(f"pass '{self.name}': option 'min_elements' has bad value {o.min_elements!r}: "
                                  f"must be >= 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        layers = select_weight_layers(self.name, graph, ctx, o)
        if not layers:
            ctx.note("no weight to binarize")
            return PassResult(changed=False)
        mode = "ternary" if o.ternary else "binary"
        report: dict[str, dict[str, Any]] = {}
        before = after = 0
        for lay in layers:
            q = binarize(lay.w, lay.out_axis, ternary=o.ternary, threshold=o.threshold)
            m = np.moveaxis(q.astype(np.float64), lay.out_axis, 0).reshape(q.shape[lay.out_axis], -1)
            alpha = np.abs(m).max(axis=1)
            entry: dict[str, Any] = {"op": lay.node.op_type, "source": lay.node.source, "weight": lay.weight.name,
                                     "shape": list(lay.w.shape), "mode": mode, "zeros": float((q == 0).mean()),
                                     "alpha_min": float(alpha.min()), "alpha_max": float(alpha.max()),
                                     "weight_rel_err": rel_error(lay.w, q), "storage": o.store,
                                     "bytes_before": int(lay.w.nbytes)}
            if o.store == "float":
                if lay.weight.is_const:
                    lay.weight.set_const(q)
                    readers = [n for n, i in lay.weight.uses if i >= 0]
                else:  # read from a Constant node: a fresh initializer, the Constant chain dropped
                    v = graph.add_initializer(f"{lay.weight.name}.binarized", q)
                    readers = []
                    for n, i in list(lay.weight.uses):
                        if i >= 0:
                            n.set_input(i, v)
                            readers.append(n)
                    drop_if_unused(graph, lay.weight)
                for n in readers:
                    mark_changed(n, self.name)
                entry["bytes_after"] = int(q.nbytes)
            else:
                safe = np.where(alpha > 0, alpha, 1.0)
                codes = np.rint(m / safe[:, None]).reshape(np.moveaxis(q, lay.out_axis, 0).shape)
                codes = np.moveaxis(codes, 0, lay.out_axis).astype(np.int8)
                scale = safe.astype(lay.w.dtype)
                replace_with_dequantize(graph, lay, codes, scale if scale.size > 1 else scale.reshape(1), self.name)
                entry["bytes_after"] = int(codes.nbytes + scale.nbytes)
            report[lay.node.name] = entry
            before += entry["bytes_before"]
            after += entry["bytes_after"]
        ctx.note(f"{mode} weights in {len(report)} layer(s), stored as "
                 f"{'int8 codes + per-channel scales' if o.store == 'dequantize' else 'float'}: "
                 f"{before / 1e6:.3f} MB -> {after / 1e6:.3f} MB")
        return PassResult(changed=True, artifacts={"layers": report, "bytes_before": before, "bytes_after": after},
                          metrics={"layers_binarized": len(report),
                                   "max_weight_rel_err": max(e["weight_rel_err"] for e in report.values())})
