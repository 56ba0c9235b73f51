"""nnsculpt: graph-level compression passes over one IR for torch.fx and ONNX models.

Subpackages: :mod:`nnsculpt.ir` (IR, frontends, analyses, printer),
:mod:`nnsculpt.passes` (pass infrastructure and passes), :mod:`nnsculpt.runtime`
(lowerings, ONNX Runtime sessions, CLI) and :mod:`nnsculpt.models` (reference zoo).
"""

__version__ = "0.1.0"
