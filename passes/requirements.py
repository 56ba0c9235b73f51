"""Declared requirements of passes, and how they are met.

A pass says what it needs (``requires = {"bn-folded", "shapes"}``, or ``requirements()`` when it
depends on the options). Before the pass runs, each requirement is checked on the graph and the
context; one that does not hold is met by its *enabling pass* -- run as a pass of its own, shown
in the report as inserted -- or, when nothing can enable it, raises a named error:

=============  ===========================================  ==========================================
requirement    holds when                                   met by
=============  ===========================================  ==========================================
``shapes``     always re-checked                            the shape-inference analysis (cached)
``bn-folded``  no BatchNormalization reads the output of a  ``fold-bn`` (BNs it cannot fold stay, with
               Conv / ConvTranspose / Gemm / MatMul         its note saying why)
``calib-data`` ``ctx.calib_data`` holds arrays              nothing: :class:`MissingCalibrationDataError`
``opset>=N``   the default-domain opset is at least N       ``raise-opset{opset=N}`` when
                                                            ``ctx.allow_opset_raise``, else
                                                            :class:`RequirementError`
``layernorm-   no hand-written layer-norm chain that        ``fuse-layernorm`` (a chain it cannot fuse,
fused``        ``fuse-layernorm`` would fuse                 e.g. when the opset may not be raised,
                                                            stays, with its note saying why)
``gelu-fused`` no GELU chain that ``fuse-gelu`` would fuse  ``fuse-gelu`` (likewise)
=============  ===========================================  ==========================================

No pass runs another pass inside itself: this module (called by the PassManager, or by
:meth:`Pass.__call__` for a pass run on its own) is the one place enabling passes are run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..ir.analysis import infer_shapes
from ..ir.errors import MissingCalibrationDataError, RequirementError
from ..ir.graph import Graph
from .base import InsertedPass, Pass, PassContext, PassResult, get_pass

__all__ = ["KNOWN", "parse_requirement", "holds", "satisfy", "check_known"]

#: requirement kinds and what they mean (for docs and ``nnsculpt passes``)
KNOWN = {
    "shapes": "value shapes inferred (the analysis runs first)",
    "bn-folded": "BatchNormalization folded into the layer before it (fold-bn runs first)",
    "calib-data": "calibration data given (--calib-data / ctx.calib_data)",
    "opset>=N": "default-domain opset at least N (raise-opset runs first when allowed)",
    "layernorm-fused": "hand-written layer norms fused into LayerNormalization (fuse-layernorm runs first)",
    "gelu-fused": "GELU chains fused into Gelu (fuse-gelu runs first)",
}

#: requirements met by a fusion pass: requirement -> pass name
_FUSIONS = {"layernorm-fused": "fuse-layernorm", "gelu-fused": "fuse-gelu"}

_FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def parse_requirement(req: str) -> tuple[str, int | None]:
    """``"opset>=13"`` -> ``("opset", 13)``; ``"bn-folded"`` -> ``("bn-folded", None)``."""
    if req.startswith("opset>="):
        try:
            return "opset", int(req[len("opset>="):])
        except ValueError:
            raise RequirementError(f"requirement '{req}': opset>= needs an integer") from None
    if req in KNOWN:
        return req, None
    raise RequirementError(f"unknown requirement '{req}' (known: {', '.join(KNOWN)})")


def check_known(p: Pass) -> None:
    """Raise :class:`RequirementError` if ``p`` declares a requirement nobody knows."""
    for r in p.requirements():
        try:
            parse_requirement(r)
        except RequirementError as e:
            raise RequirementError(f"pass '{p.name}': {e}") from None


def _bn_pending(graph: Graph) -> bool:
    for n in graph.nodes:
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx") or not n.inputs:
            continue
        x = n.inputs[0]
        prod = x.producer if x is not None else None
        if prod is not None and prod.op_type in _FOLDABLE_INTO and prod.domain in ("", "ai.onnx"):
            return True
    return False


def holds(req: str, graph: Graph, ctx: PassContext) -> bool:
    """Whether requirement ``req`` holds now."""
    kind, arg = parse_requirement(req)
    if kind == "shapes":
        return False  # cheap to (re)establish: the analysis is cached on graph.version
    if kind == "bn-folded":
        return not _bn_pending(graph)
    if kind == "calib-data":
        return bool(ctx.calib_data)
    if kind == "opset":
        return graph.opset >= arg
    if kind in _FUSIONS:
        return get_pass(_FUSIONS[kind])().pending(graph) == 0
    raise AssertionError(kind)  # pragma: no cover - parse_requirement knows the kinds


def enabler(req: str, for_pass: str, ctx: PassContext, hint: str = "") -> Pass | None:
    """The pass that establishes ``req``; None for analyses. Raises when none can (``hint``:
    the requiring pass's advice, appended to the message)."""
    kind, arg = parse_requirement(req)
    hint = f"; {hint}" if hint else ""
    if kind == "bn-folded":
        return get_pass("fold-bn")()
    if kind in _FUSIONS:
        return get_pass(_FUSIONS[kind])()
    if kind == "opset":
        if not ctx.allow_opset_raise:
            raise RequirementError(f"pass '{for_pass}' needs opset >= {arg}; raising the opset is not allowed "
                                   f"here (allow_opset_raise=False)")
        return get_pass("raise-opset")(opset=arg)
    if kind == "calib-data":
        raise MissingCalibrationDataError(
            f"pass '{for_pass}' needs calibration data (nnsculpt compile ... --calib-data X.npz, "
            f"or PassContext(calib_data=...)){hint}")
    return None


Runner = Callable[[Pass, str, str], PassResult]


def satisfy(p: Pass, graph: Graph, ctx: PassContext, run: Runner | None = None) -> list[InsertedPass]:
    """Meet every requirement of ``p`` on ``graph`` (in place), in a fixed order. Enabling passes
    are run by ``run(enabler, requirement, for_pass)`` (the PassManager records them as report
    entries) or, by default, directly. Returns what was inserted."""
    check_known(p)
    inserted: list[InsertedPass] = []
    # fusions first: their opset raise (17 / 20) then covers opset>=N without a second conversion
    order = {"calib-data": 0, "layernorm-fused": 1, "gelu-fused": 2, "opset": 3, "bn-folded": 4, "shapes": 5}
    reqs = sorted(p.requirements(), key=lambda r: (order[parse_requirement(r)[0]], r))
    for req in reqs:
        if holds(req, graph, ctx):
            continue
        e = enabler(req, p.name, ctx, p.requirement_hints.get(parse_requirement(req)[0], ""))
        if e is None:  # an analysis
            infer_shapes(graph)
            continue
        kind = parse_requirement(req)[0]
        if kind not in e.guarantees:
            raise RequirementError(f"pass '{e.name}' was chosen to enable '{req}' but does not guarantee it")
        res = run(e, req, p.name) if run is not None else e.run_only(graph, ctx)
        inserted.append(InsertedPass(req, p.name, e, res))
        if kind == "opset" and not holds(req, graph, ctx):
            raise RequirementError(f"pass '{p.name}' needs {req}; '{e.name}' could not establish it")
    return inserted
