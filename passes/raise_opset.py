"""``raise-opset``: upgrade the default-domain opset with onnx.version_converter."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.errors import PassOptionError
from ..ir.graph import Graph
from .base import Pass, PassContext, PassResult, register


@register
class RaiseOpset(Pass):
    """Raise the default-domain (ai.onnx) opset to ``opset`` with ``onnx.version_converter``.

    Rewrite rules: every node is converted by the ONNX version converter's adapters (e.g.
    ``Clip`` bounds move from attributes to inputs at 11, ``Split`` sizes to an input at 13,
    per-axis reductions' ``axes`` to an input at 18); node names and provenance are kept. A
    graph already at or above ``opset`` is left alone. This is the enabling pass of the
    ``opset>=N`` requirement (the PassManager inserts it, e.g. before ``quantize``).

    Preconditions: the converter has adapters for every op between the two opsets; otherwise
    an ``UnsupportedOpError`` names the model and the converter's message. Exact.
    """

    name = "raise-opset"
    exact = True
    guarantees = frozenset({"opset"})

    @dataclass
    class Options:
        opset: int = 17

    def __init__(self, **options):
        super().__init__(**options)
        import onnx

        top = onnx.defs.onnx_opset_version()
        if not 7 <= self.options.opset <= top:
            raise PassOptionError(f"pass 'raise-opset': option 'opset' must be in [7, {top}] (this onnx), "
                                  f"got {self.options.opset}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        was = graph.opset
        changed = graph.raise_opset(self.options.opset, who=self.name)
        if changed:
            ctx.note(f"raised the opset from {was} to {self.options.opset} (onnx.version_converter)")
        return PassResult(changed=changed, metrics={"opset_before": was, "opset_after": graph.opset})
