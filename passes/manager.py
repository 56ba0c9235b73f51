"""The PassManager: runs a pipeline, measures it, checks it, and reports it.

For every pass it records wall time, whether the graph changed, and the graph's nodes /
params / FLOPs / MACs / bytes before and after. Optionally it

* runs the verifier after each pass (``verify=True``, the default),
* checks numerics against the input model on sample inputs run by ONNX Runtime
  (``check_numerics=True``; ``sample_inputs``, else the first ``check_samples`` calibration
  samples, else generated inputs): an *exact* pass whose outputs move by more than
  ``tolerance`` (relative to the largest reference magnitude) raises :class:`NumericsError`
  (with ``enforce_exact``); a lossy pass has its drift recorded. The samples may be ragged
  (per input a list of arrays whose shapes differ, :mod:`nnsculpt.runtime.ort`): the first
  ``check_samples`` are taken across the elements (``take_samples``), outputs are compared
  over all elements (:func:`~nnsculpt.runtime.ort.compare_outputs`), and
  ``report["numerics"]["inputs"]`` lists each element's shape,
* dumps the IR text (``dump_dir``: ``NN-pass.ir.txt``, ``NN`` the pass's position, ``00-input``) and/or
  streams it (``print_ir``): after every pass (``print_ir_after="all"``), only after the passes that
  changed the graph (``"change"``, MLIR's ``-print-ir-after-change``; the input too), or only after
  the passes named in a list (``-print-ir-after=PASS``),
* with ``stage_latency``: times the input and the graph after every pass that changed it in ONNX
  Runtime (one sample, 1 thread, median of interleaved rounds) into ``report["stage_latency"]``.

Before each pass its declared requirements are met (:mod:`nnsculpt.passes.requirements`):
an enabling pass (``fold-bn`` for ``bn-folded``, ``raise-opset`` for ``opset>=N``) runs as an
entry of its own, marked ``"inserted": true`` with the requirement and the pass it served.
Each entry carries the pass's :class:`PassResult` -- notes, artifacts, metrics.

Drift guard (never a silently broken model): with numerics checked, a pass whose outputs
drift past ``warn_drift`` (top-1 agreement below ``min_top1``, cosine below ``min_cosine``)
adds a warning to the report (``report["warnings"]``, printed by the CLI); with
``fail_on_drift`` that warning is a :class:`DriftError` instead.

``run`` returns a :class:`RunResult` whose ``report`` is what ``report.json`` holds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np

from .. import __version__
from ..ir.analysis import graph_stats, snapshot
from ..ir.errors import DriftError, InputDataError, NNSculptError, NumericsError, VerificationError
from ..ir.graph import Graph
from ..ir.onnx_io import to_onnx_model
from ..ir.printer import print_graph
from ..ir.verifier import verify as verify_graph
from .base import InsertedPass, Pass, PassContext, PassResult, jsonable
from .requirements import satisfy


@dataclass
class RunResult:
    graph: Graph
    report: dict[str, Any]
    ctx: PassContext = field(default_factory=PassContext)
    results: list[PassResult] = field(default_factory=list)
    #: with ``PassManager(snapshots=True)``: the input graph and the graph after every pass that changed
    #: it, as :func:`nnsculpt.ir.analysis.snapshot` dicts with ``index`` (0 = input) and ``label``
    snapshots: list[dict[str, Any]] = field(default_factory=list)

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


log = logging.getLogger("nnsculpt.passes")


class PassManager:
    """Run ``passes`` in order on a graph (in place) and collect a report."""

    def __init__(self, passes: list[Pass], *, verify: bool = True, check_numerics: bool = False,
                 sample_inputs: dict[str, Any] | None = None, tolerance: float = 1e-5,
                 dump_dir: str | Path | None = None, print_ir: TextIO | Callable[[str], Any] | None = None,
                 stats: bool = True, min_top1: float = 0.98, min_cosine: float = 0.99,
                 max_rel_drift: float | None = None, fail_on_drift: bool = False, enforce_exact: bool = True,
                 check_samples: int = 32, print_ir_after: str | Sequence[str] = "all",
                 snapshots: bool = False, stage_latency: bool = False):
        self.passes = list(passes)
        self.snapshots = snapshots
        self.stage_latency = stage_latency
        self.print_ir_after = print_ir_after
        self.verify = verify
        self.check_numerics = check_numerics
        self.sample_inputs = sample_inputs
        self.tolerance = tolerance
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.print_ir = print_ir
        self.stats = stats
        self.min_top1 = min_top1
        self.min_cosine = min_cosine
        self.max_rel_drift = max_rel_drift
        self.fail_on_drift = fail_on_drift
        self.enforce_exact = enforce_exact
        self.check_samples = check_samples

    def _emit_ir(self, graph: Graph, index: int, label: str, changed: bool = True) -> None:
        if self.dump_dir is None and self.print_ir is None:
            return
        when = self.print_ir_after
        if index and when == "change" and not changed:
            return
        if when not in ("all", "change") and (not index or label not in when):
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

    def _drift_warning(self, name: str, total: dict[str, float], hint: str = "") -> str | None:
        why = []
        if "top1_agreement" in total and total["top1_agreement"] < self.min_top1:
            why.append(f"top-1 agreement with the input model {total['top1_agreement']:.3f} < {self.min_top1:g}")
        if total["cosine"] < self.min_cosine:
            why.append(f"output cosine {total['cosine']:.4f} < {self.min_cosine:g}")
        if self.max_rel_drift is not None and total["max_rel"] > self.max_rel_drift:
            why.append(f"max relative error {total['max_rel']:.3g} > {self.max_rel_drift:g}")
        if not why:
            return None
        return f"after pass '{name}': " + "; ".join(why) + (f" -- {hint}" if hint else "")

    def run(self, graph: Graph, ctx: PassContext | None = None) -> RunResult:
        from .pipeline import format_pipeline

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
        snaps: list[dict[str, Any]] = [{"index": 0, "label": "input", **snapshot(graph)}] if self.snapshots else []
        stage_models: list[tuple[int, str, bytes]] = (
            [(0, "input", to_onnx_model(graph, check=False).SerializeToString())] if self.stage_latency else [])

        state: dict[str, Any] = {"ref": None, "prev": None, "inputs": None, "stats": before, "index": 0,
                                 "warnings": [], "results": []}
        if self.check_numerics:
            from ..runtime.ort import make_inputs, take_samples

            inputs = self.sample_inputs
            if inputs is None and ctx.calib_data is not None:
                inputs = take_samples(ctx.calib_data, self.check_samples)
            generated = inputs is None
            if generated:
                inputs = make_inputs(graph, batch=2, seed=ctx.seed)
            state["inputs"] = inputs
            try:
                state["ref"] = state["prev"] = self._outputs(graph, inputs)
            except NNSculptError:
                raise
            except Exception as e:  # ONNX Runtime refused the inputs: say which, and what to do
                what = "inputs generated from its input types" if generated else "the given inputs"
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputDataError(
                    f"model '{graph.name}': the output-drift check cannot run the input model on {what}: "
                    f"{msg[:400]} -- give real inputs (--calib-data X.npz or a directory of .npz files), "
                    f"or skip the check with --no-check") from None

        def execute(p: Pass, inserted: InsertedPass | None = None, requirement: str = "",
                    for_pass: str = "") -> PassResult:
            t0 = time.perf_counter()
            res = p.run_only(graph, ctx)
            elapsed = time.perf_counter() - t0
            entry: dict[str, Any] = {"name": p.name, "options": p.options_dict(), "exact": p.exact,
                                     "changed": res.changed, "time_s": round(elapsed, 6)}
            if requirement:
                entry.update(inserted=True, requirement=requirement, inserted_for=for_pass)
            reqs = sorted(p.requirements())
            if reqs:
                entry["requires"] = reqs
            self._after(graph, p, entry, state)
            if res.notes:
                entry["notes"] = list(res.notes)
            if res.artifacts:
                entry["artifacts"] = jsonable(res.artifacts)
            if res.metrics:
                entry["metrics"] = jsonable(res.metrics)
            report["passes"].append(entry)
            state["results"].append(res)
            state["index"] += 1
            self._emit_ir(graph, state["index"], p.name, res.changed)
            if self.snapshots and res.changed:
                snaps.append({"index": state["index"], "label": p.name, **snapshot(graph)})
            if self.stage_latency and res.changed:
                stage_models.append((state["index"], p.name, to_onnx_model(graph, check=False).SerializeToString()))
            return res

        for p in self.passes:
            satisfy(p, graph, ctx, run=lambda e, req, who: execute(e, requirement=req, for_pass=who))
            execute(p)
        report["after"] = graph_stats(graph).as_dict() if self.stats else None
        if self.stats and before:
            a = report["after"]
            report["summary"] = {
                k: {"before": before[k], "after": a[k], "ratio": (a[k] / before[k]) if before[k] else None}
                for k in ("nodes", "params", "flops", "macs", "weight_bytes", "model_bytes")}
        if self.check_numerics:
            from ..runtime.ort import shapes_of

            report["numerics"] = {"inputs": shapes_of(state["inputs"]),
                                  **_max_rel(state["ref"], state["prev"])}
        report["warnings"] = state["warnings"]
        if stage_models:
            report["stage_latency"] = self._time_stages(stage_models, graph, state.get("inputs"), ctx)
        return RunResult(graph, report, ctx, state["results"], snaps)

    @staticmethod
    def _time_stages(models: list[tuple[int, str, bytes]], graph: Graph, inputs: Any,
                     ctx: PassContext) -> list[dict[str, Any]]:
        """ORT latency of the input and of the graph after every pass that changed it: one sample (the
        first of the drift check's inputs, else generated from the graph's input types -- passes keep the
        interface), 1 thread, median of interleaved rounds."""
        from ..runtime.ort import interleaved_median, iter_elements, make_inputs, single_thread_sessions, take_samples

        feed = next(iter_elements(take_samples(inputs, 1))) if inputs is not None else \
            make_inputs(graph, batch=1, seed=ctx.seed)
        sessions = single_thread_sessions({f"{i}": b for i, _, b in models})
        t = interleaved_median(sessions, feed, rounds=7, inner=5, warmup=3)
        base = t["0"]
        return [{"index": i, "label": name, "ms": 1e3 * t[f"{i}"], "ratio": t[f"{i}"] / base if base else None}
                for i, name, _ in models]

    def _after(self, graph: Graph, p: Pass, entry: dict[str, Any], state: dict[str, Any]) -> None:
        """Verify, measure and check numerics after pass ``p``; fills ``entry``."""
        if self.verify:
            try:
                verify_graph(graph)
            except VerificationError as e:
                raise VerificationError(f"after pass '{p.name}': {e}") from None
        if self.stats:
            after = graph_stats(graph).as_dict()
            entry["before"] = {k: v for k, v in state["stats"].items() if k != "op_histogram"}
            entry["after"] = {k: v for k, v in after.items() if k != "op_histogram"}
            state["stats"] = after
        if not self.check_numerics:
            return
        cur = self._outputs(graph, state["inputs"])
        step = _max_rel(state["prev"], cur)
        total = _max_rel(state["ref"], cur)
        entry["drift_vs_previous"] = step
        entry["drift_vs_input"] = total
        if self.enforce_exact and p.exact and step["max_rel"] > self.tolerance:
            raise NumericsError(
                f"exact pass '{p.name}' changed the outputs: max relative error "
                f"{step['max_rel']:.3g} > tolerance {self.tolerance:g}")
        state["prev"] = cur
        warning = None if p.exact else self._drift_warning(p.name, total, p.drift_hint)
        if warning:
            if self.fail_on_drift:
                raise DriftError(warning + " (fail_on_drift)")
            log.warning(warning)
            entry["warning"] = warning
            state["warnings"].append(warning)
