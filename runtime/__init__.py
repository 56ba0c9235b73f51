"""Lowerings and execution: ONNX Runtime sessions, the torch lowering, the CLI.

    from nnsculpt.runtime import to_onnx, session, run, to_torch, write_back
"""

from __future__ import annotations

from ..ir.onnx_io import save
from ..ir.onnx_io import to_onnx_model as to_onnx
from .ort import compare_outputs, load_inputs, make_inputs, run, session


def to_torch(graph, **kwargs):
    """Lower a graph to a trainable ``torch.fx.GraphModule`` (see :mod:`nnsculpt.runtime.to_torch`)."""
    from .to_torch import to_torch as _to_torch

    return _to_torch(graph, **kwargs)


def write_back(graph, module):
    """Copy trained weights of a module made by :func:`to_torch` back into ``graph``."""
    from .to_torch import write_back as _write_back

    return _write_back(graph, module)


__all__ = ["to_onnx", "save", "session", "run", "make_inputs", "load_inputs", "compare_outputs",
           "to_torch", "write_back"]
