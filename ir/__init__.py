"""The nnsculpt IR: graphs with ONNX op semantics, frontends, analyses, printer, verifier.

Public API::

    from nnsculpt.ir import Graph, Node, Value, from_onnx, from_torch, verify, print_graph
"""

from .analysis import FLOP_RULES, GraphStats, graph_stats, infer_shapes, node_costs
from .errors import (IRError, InputDataError, ModelLoadError, NNSculptError, NumericsError,
                     PassOptionError, PipelineError, UnknownPassError, UnsupportedOpError,
                     VerificationError)
from .graph import Graph, Node, Value, mark_changed
from .onnx_io import from_onnx, load_model, save, to_onnx_model
from .printer import print_graph
from .verifier import verify


def from_torch(module, example_inputs, **kwargs) -> Graph:
    """Trace a torch module into the IR (torch.fx; ONNX-export fallback). See
    :func:`nnsculpt.ir.torch_frontend.from_torch`."""
    from .torch_frontend import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)


__all__ = [
    "Graph", "Node", "Value", "from_onnx", "from_torch", "to_onnx_model", "save", "load_model",
    "verify", "print_graph", "infer_shapes", "node_costs", "graph_stats", "GraphStats", "FLOP_RULES",
    "mark_changed", "NNSculptError", "IRError", "VerificationError", "ModelLoadError",
    "UnsupportedOpError", "PipelineError", "UnknownPassError", "PassOptionError", "InputDataError",
    "NumericsError",
]
