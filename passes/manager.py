"""The PassManager: runs a pipeline, measures it, checks it, and reports it.

For every pass it records wall time, whether the graph changed, and the graph's nodes /
params / FLOPs / MACs / bytes before and after. Optionally it

* runs the verifier after each pass (``verify=True``, the default),
* checks numerics against the input model on sample inputs run by ONNX Runtime
  (``check_numerics=True``): an *exact* pass whose outputs move by more than
  ``tolerance`` (relative to the largest reference magnitude) raises
  :class:`NumericsError`; a lossy pass has its drift recorded,
* dumps the IR text after every pass (``dump_dir``) and/or streams it (``print_ir``).

``run`` returns a :class:`RunResult` whose ``report`` is what ``report.json`` holds.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from .. import __version__
from ..ir.analysis import graph_stats
from ..ir.errors import NumericsError, VerificationError
from ..ir.graph import Graph
from ..ir.printer import print_graph
from ..ir.verifier import verify as verify_graph
from .base import Pass, PassContext


@dataclass
class RunResult:
    graph: Graph
    report: dict[str, Any]
    ctx: PassContext = field(default_factory=PassContext)

    def write_report(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        p = d / "report.json"
        p.write_text(json.dumps(self.report, indent=2, sort_keys=False) + "\n")
        return p


def _max_rel(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    from ..runtime.ort import compare_outputs

    cmp = compare_outputs(ref, got)
    worst = {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    for entry in cmp.values():
        if "shape_mismatch" in entry:
            return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0}
        worst["max_abs"] = max(worst["max_abs"], entry["max_abs"])
        worst["max_rel"] = max(worst["max_rel"], entry["max_rel"])
        worst["cosine"] = min(worst["cosine"], entry["cosine"])
        if "top1_agreement" in entry:
            worst["top1_agreement"] = min(worst.get("top1_agreement", 1.0), entry["top1_agreement"])
    return worst


class PassManager:
    """Run ``passes`` in order on a graph (in place) and collect a report."""

    def __init__(self, passes: list[Pass], *, verify: bool = True, check_numerics: bool = False,
                 sample_inputs: dict[str, np.ndarray] | None = None, tolerance: float = 1e-5,
                 dump_dir: str | Path | None = None, print_ir: TextIO | Callable[[str], Any] | None = None,
                 stats: bool = True):
        self.passes = list(passes)
        self.verify = verify
        self.check_numerics = check_numerics
        self.sample_inputs = sample_inputs
        self.tolerance = tolerance
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.print_ir = print_ir
        self.stats = stats

    def _emit_ir(self, graph: Graph, index: int, label: str) -> None:
        if self.dump_dir is None and self.print_ir is None:
            return
        text = print_graph(graph)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}-{label}.ir.txt").write_text(text)
        if self.print_ir is not None:
            banner = f"// ----- IR after {label} -----\n" if index else "// ----- input IR -----\n"
            if callable(self.print_ir) and not hasattr(self.print_ir, "write"):
                self.print_ir(banner + text)
            else:
                self.print_ir.write(banner + text)

    def _outputs(self, graph: Graph, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..runtime.ort import run

        return run(graph, inputs)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> RunResult:
        from ..passes.pipeline import format_pipeline

        ctx = ctx or PassContext()
        report: dict[str, Any] = {
            "nnsculpt_version": __version__,
            "model": graph.name,
            "pipeline": format_pipeline(self.passes),
            "frontend": graph.meta.get("frontend", "onnx"),
            "passes": [],
        }
        if self.verify:
            verify_graph(graph)
        before = graph_stats(graph).as_dict() if self.stats else None
        report["before"] = before
        self._emit_ir(graph, 0, "input")

        ref = prev = None
        inputs = None
        if self.check_numerics:
            from ..runtime.ort import make_inputs

            inputs = self.sample_inputs
            if inputs is None and ctx.calib_data is not None:
                inputs = {k: v[:8] for k, v in ctx.calib_data.items()}
            if inputs is None:
                inputs = make_inputs(graph, batch=2, seed=ctx.seed)
            ref = prev = self._outputs(graph, inputs)

        stats_prev = before
        for i, p in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            changed = p(graph, ctx)
            elapsed = time.perf_counter() - t0
            entry: dict[str, Any] = {"name": p.name, "options": p.options_dict(), "exact": p.exact,
                                     "changed": changed, "time_s": round(elapsed, 6)}
            if self.verify:
                try:
                    verify_graph(graph)
                except VerificationError as e:
                    raise VerificationError(f"after pass '{p.name}': {e}") from None
            if self.stats:
                after = graph_stats(graph).as_dict()
                entry["before"] = {k: v for k, v in stats_prev.items() if k != "op_histogram"}
                entry["after"] = {k: v for k, v in after.items() if k != "op_histogram"}
                stats_prev = after
            if self.check_numerics:
                cur = self._outputs(graph, inputs)
                step = _max_rel(prev, cur)
                total = _max_rel(ref, cur)
                entry["drift_vs_previous"] = step
                entry["drift_vs_input"] = total
                if p.exact and step["max_rel"] > self.tolerance:
                    raise NumericsError(
                        f"exact pass '{p.name}' changed the outputs: max relative error "
                        f"{step['max_rel']:.3g} > tolerance {self.tolerance:g}")
                prev = cur
            if ctx.notes.get(p.name):
                entry["notes"] = list(ctx.notes[p.name])
            report["passes"].append(entry)
            self._emit_ir(graph, i, p.name)
        report["after"] = graph_stats(graph).as_dict() if self.stats else None
        if self.stats and before:
            a = report["after"]
            report["summary"] = {
                k: {"before": before[k], "after": a[k], "ratio": (a[k] / before[k]) if before[k] else None}
                for k in ("nodes", "params", "flops", "macs", "weight_bytes", "model_bytes")}
        if self.check_numerics:
            report["numerics"] = {"inputs": {k: list(v.shape) for k, v in inputs.items()},
                                  **_max_rel(ref, prev)}
        return RunResult(graph, report, ctx)


def run_pipeline(graph: Graph, pipeline: str | list[Pass], ctx: PassContext | None = None,
                 **kwargs: Any) -> RunResult:
    """Convenience: parse ``pipeline`` (string or passes) and run it on ``graph``."""
    from .pipeline import resolve_pipeline

    passes = resolve_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    return PassManager(passes, **kwargs).run(graph, ctx)


def _stderr_printer(text: str) -> None:  # pragma: no cover - trivial
    sys.stderr.write(text)
