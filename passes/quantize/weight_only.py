"""Weight-only quantization: only constant weights are quantized -- int8 per channel (or per
tensor), or real INT4 in ``block_size`` blocks along the reduction axis (opset 21; ORT fuses
``DQ -> MatMul`` into MatMulNBits). Activations stay float; no calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...ir.graph import Graph, Value
from .placement import candidates
from .state import QuantRun
from .table import spec_for
from .weights import FLOAT32, dq_const, drop_unused, quantize_weight

if TYPE_CHECKING:
    from . import Quantize

__all__ = ["run_weight_only"]


def run_weight_only(q: "Quantize", graph: Graph, state: QuantRun) -> int:
    """Quantize the weights of ``graph`` in place; returns the number of layers rewritten."""
    o = q.options
    int4 = o.weights == "int4"
    done = []
    cache: dict[tuple, Value] = {}
    for n in candidates(graph, o):
        spec = spec_for(n)
        if spec.weight is None or len(n.inputs) <= spec.weight:
            continue
        w = n.inputs[spec.weight]
        if w is None or not w.is_const or w.const.dtype != FLOAT32 or w.const.ndim < 2:
            continue
        rank = w.const.ndim
        if int4:
            axis = spec.reduce_axis_of(n, rank)
            key = (w.name, axis, "int4")
            if key not in cache:
                import ml_dtypes

                bs = min(o.block_size, w.const.shape[axis])
                qw, s = quantize_weight(w.const, axis, bits=4, block_size=bs, storage=np.int8)
                cache[key] = dq_const(graph, n, w.name, qw.astype(ml_dtypes.int4), s, None, axis, bs,
                                      stamp=q.changed)
        else:
            axis = spec.axis_of(n, rank) if o.per_channel else None
            key = (w.name, axis, "int8")
            if key not in cache:
                qw, s = quantize_weight(w.const, axis, bits=8)
                cache[key] = dq_const(graph, n, w.name, qw, s, np.zeros(s.shape, np.int8), axis, stamp=q.changed)
        n.set_input(spec.weight, cache[key])
        q.changed(n)
        done.append(n.name)
    drop_unused(graph)
    state.ctx.note(f"weight-only: {len(done)} weight(s) quantized to "
                   f"{'INT4 blocks of ' + str(o.block_size) if int4 else 'int8 ' + ('per-channel' if o.per_channel else 'per-tensor')}")
    state.artifacts.update(weight_only_layers=len(done))
    return len(done)
