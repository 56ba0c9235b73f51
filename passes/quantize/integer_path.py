"""The ``integer path`` note: which layers ONNX Runtime actually runs in integer kernels after
the rewrite, and their share of the FLOPs. The check itself runs ONNX Runtime and lives in
:mod:`nnsculpt.runtime.integer_path`; this module feeds it the run's FLOPs reference (the
graph before the rewrite) and the activations absorbed into their producers, and records the
result (``integer_fraction``, ``integer_report``) in the run's artifacts. Symbolic input dims
are sized from the calibration data (its first element when ragged)."""

from __future__ import annotations

import numpy as np

from ...ir.graph import Graph
from .state import QuantRun

__all__ = ["report_integer"]


def report_integer(graph: Graph, state: QuantRun) -> None:
    from ...runtime.integer_path import integer_fraction

    from ...runtime.ort import iter_elements

    ctx = state.ctx
    shapes = None
    if ctx.calib_data:  # one sample's shape (ragged data: of the first element)
        first = next(iter_elements(ctx.calib_data))
        shapes = {k: (1,) + tuple(np.shape(v)[1:]) for k, v in first.items()}
    try:
        rep = integer_fraction(graph, input_shapes=shapes, reference=state.reference,
                               absorbed=state.absorbed_into)
    except Exception as e:  # reporting must not break the pass
        ctx.note(f"integer path: could not be checked ({str(e).splitlines()[0]})")
        return
    state.artifacts["integer_fraction"] = rep.fraction
    state.artifacts["integer_report"] = rep
    ctx.note(f"integer path: {rep.summary()}")
