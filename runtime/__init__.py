"""Lowerings and execution: ONNX Runtime sessions, the torch lowering, the CLI.

    from nnsculpt.runtime import to_onnx, session, run, to_torch, write_back
"""

from __future__ import annotations

from ..ir.onnx_io import save
from ..ir.onnx_io import to_onnx_model as to_onnx
from .ort import compare_outputs, load_inputs, make_inputs, run, session

# Imported eagerly on purpose: a lazy wrapper named ``to_torch`` would be replaced by the
# submodule object the first time ``nnsculpt.runtime.to_torch`` is imported.
from .to_torch import to_torch, write_back  # noqa: E402


__all__ = ["to_onnx", "save", "session", "run", "make_inputs", "load_inputs", "compare_outputs",
           "to_torch", "write_back"]
