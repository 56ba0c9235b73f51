"""The accuracy budget: keep the most sensitive layers in float until the output error holds.

If the fully quantized model's error (``metric(ref, got)``, default: the worst max relative
output error) exceeds ``budget``, every quantized layer is ranked by sensitivity (normalized
output MSE; ``one-at-a-time``: only that layer quantized, ``leave-one-out``: all but it) and
the smallest prefix of the ranking kept in float that meets the budget is found by
exponential then binary search. Plans are evaluated on quantized *copies* of the graph made
by the caller; the search never touches the graph itself.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from ...ir.errors import InputDataError
from ...ir.graph import Graph, Node
from .state import QuantRun
from .table import spec_for

__all__ = ["default_metric", "search"]

Metric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


def default_metric(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """Worst over float outputs of max |ref - got| / max |ref| (the drift the PassManager reports)."""
    from ...runtime.ort import compare_outputs

    res = compare_outputs({k: a for k, a in ref.items() if np.asarray(a).dtype.kind == "f"}, got)
    return max((math.inf if "shape_mismatch" in e else e["max_rel"] for e in res.values()), default=0.0)


def search(graph: Graph, state: QuantRun, cands: list[Node], included: set[str],
           quantized_copy: Callable[[set[str]], Graph], *, options: Any, metric: Metric | None) -> set[str]:
    """The nodes to quantize so that the error stays within ``options.budget``: ``included``
    (every candidate) minus the most sensitive layers. ``quantized_copy(nodes)`` returns a
    copy of ``graph`` with ``nodes`` quantized. Findings go to ``state.artifacts``."""
    from ...runtime.ort import run, session

    o = options
    ctx = state.ctx
    data = {k: v[: o.budget_samples] for k, v in (ctx.calib_data or {}).items()}
    if not data:
        raise InputDataError("pass 'quantize': the accuracy budget needs calibration data")
    metric = metric or default_metric
    budget = o.budget if o.budget is not None else math.inf
    ref = run(session(graph), data)
    evaluations = 0
    ref_power = {k: float(np.mean(np.square(np.asarray(v, np.float64)))) or 1.0
                 for k, v in ref.items() if np.asarray(v).dtype.kind == "f"}

    def evaluate(nodes: set[str]) -> tuple[float, float]:
        """(budget metric, normalized output MSE) of the plan quantizing ``nodes``."""
        nonlocal evaluations
        g2 = quantized_copy(nodes)
        evaluations += 1
        got = run(session(g2), data)
        nmse = sum(float(np.mean(np.square(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))))
                   / p for k, p in ref_power.items() if k in got)
        return float(metric(ref, got)), nmse

    def error(nodes: set[str]) -> float:
        return evaluate(nodes)[0]

    layers = [n.name for n in cands if spec_for(n).kind in ("compute", "elementwise") and n.name in included]
    all_set = set(included)
    err_all, nmse_all = evaluate(all_set)
    state.artifacts["error_all_quantized"] = err_all
    if err_all <= budget:
        ctx.note(f"budget {budget:g}: fully quantized error {err_all:.4g} is within budget")
        state.artifacts["float_layers"] = []
        return all_set
    # sensitivity on the normalized output MSE (smoother than a max): leave-one-out = how
    # much the error drops when only this layer stays float; one-at-a-time = the error
    # of quantizing this layer alone (with its absorbed activations / passthroughs)
    if o.sensitivity == "leave-one-out":
        loo = {name: evaluate(all_set - {name}) for name in layers}
        sens = {n: nmse_all - loo[n][1] for n in layers}
    else:
        sens = {}
        for name in layers:
            solo = {name} | {n.name for n in cands if spec_for(n).kind in ("absorb", "passthrough")}
            sens[name] = evaluate(solo)[1]
    ranked = sorted(layers, key=lambda n: (-sens[n], layers.index(n)))
    state.artifacts["sensitivity"] = {n: sens[n] for n in ranked}

    def err_k(k: int) -> float:
        return error(all_set - set(ranked[:k]))

    # exponential then binary search for the smallest k that meets the budget
    cache = {0: err_all}
    k = 1
    while k < len(ranked):
        cache[k] = err_k(k)
        if cache[k] <= budget:
            break
        k *= 2
    k = min(k, len(ranked))
    if k not in cache:
        cache[k] = err_k(k)
    lo, hi = k // 2, k
    if cache[hi] <= budget:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            cache[mid] = err_k(mid)
            if cache[mid] <= budget:
                hi = mid
            else:
                lo = mid
    else:  # even all layers float did not meet it (non-monotone metric): take the best
        hi = min(cache, key=lambda kk: cache[kk])
    kept = ranked[:hi]
    state.artifacts["float_layers"] = kept
    state.artifacts["error_final"] = cache[hi]
    ctx.note(f"budget {budget:g}: fully quantized error {err_all:.4g} exceeds it; kept {len(kept)} most "
             f"sensitive layer(s) in float -> error {cache[hi]:.4g} ({evaluations} evaluations): "
             f"{', '.join(kept[:20])}{' ...' if len(kept) > 20 else ''}")
    return all_set - set(kept)
