"""The state of one run of the ``quantize`` pass.

A :class:`QuantRun` is created by ``Quantize.run`` and handed to the strategy; everything the
run finds lives here (never on the pass object, which keeps only its configuration), and
``artifacts`` becomes the run's ``PassResult.artifacts``. The budget search evaluates plans on
graph copies through :func:`~nnsculpt.passes.quantize.static.apply`, which returns what it
did instead of recording it, so those trial rewrites never reach this state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...ir.graph import Graph
from ..base import PassContext

__all__ = ["QuantRun"]


@dataclass
class QuantRun:
    ctx: PassContext
    #: JSON-ready findings (``PassResult.artifacts``): quantized_tensors, compute_layers,
    #: error_all_quantized, float_layers, sensitivity, error_final, dynamic_layers,
    #: weight_only_layers, integer_fraction, integer_report
    artifacts: dict[str, Any] = field(default_factory=dict)
    #: calibration histograms by tensor name (static mode; not JSON, not reported)
    histograms: dict[str, Any] = field(default_factory=dict)
    #: the graph just before the final rewrite (static mode with ``check_integer``): the FLOPs
    #: reference of the integer-path report
    reference: Graph | None = None
    #: Relu / Clip nodes the final rewrite removed (their clamp done by the quantizer)
    removed_activations: list[str] = field(default_factory=list)
    #: removed activation -> the node it was folded into (for the integer-path report)
    absorbed_into: dict[str, str | None] = field(default_factory=dict)
