"""Execution services below the passes: ONNX Runtime sessions / run / compare, activation
collection and calibration maths, the torch lowering (``to_torch`` / ``write_back``), the
training loops (distillation, QAT fine-tuning) and the sparse kernels. Imports only ``ir``
(and ``models`` for ``zoo:`` names).

    from nnsculpt.runtime import to_onnx, session, run, to_torch, write_back
"""

from __future__ import annotations

from ..ir.onnx_io import save
from ..ir.onnx_io import to_onnx_model as to_onnx
from .ort import compare_outputs, load_inputs, make_inputs, run, session

from .torch_lowering import to_torch, write_back


__all__ = ["to_onnx", "save", "session", "run", "make_inputs", "load_inputs", "compare_outputs",
           "to_torch", "write_back"]
