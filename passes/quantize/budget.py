"""The accuracy budget: the largest share of FLOPs in integer kernels whose error stays within it.

``budget`` bounds an error of the quantized model against the float one on the calibration
data (``metric``: ``rel_l2`` by default, ``max_rel``, ``cosine`` = 1 - cosine, ``top1`` = 1 -
top-1 agreement, ``iou@T`` = 1 - mask IoU; or a Python callable ``fn(ref, got) -> error``;
see :mod:`nnsculpt.runtime.metrics`). If the fully quantized model exceeds it:

1. **sensitivity**: every quantizable layer (compute and elementwise) is scored by the
   normalized output MSE it causes (``one-at-a-time``: only that layer quantized, with the
   absorbed activations and passthroughs; ``leave-one-out``: how much the MSE drops when
   only it stays float);
2. **order**: layers sorted by sensitivity per FLOP, least first -- the order in which adding
   layers back to int8 buys the most integer FLOPs for the least error (a greedy knapsack);
3. **bisection** over that order for the longest prefix within the budget;
4. **add-back**: the layers after the cut, the largest first (at most ``budget_tries``), are
   tried one at a time and kept when the budget still holds (the error need not be monotone
   in the prefix, and a big insensitive layer may sit behind a small sensitive one).

Every evaluated plan is a point of the curve (integer-FLOPs share, error) recorded in
``artifacts["budget_curve"]`` with the chosen set; the share is predicted from the layers'
FLOPs (the ``integer path`` note then measures what ORT really runs in integer kernels).
Plans are evaluated on quantized *copies* of the graph made by the caller; the search never
touches the graph itself.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from ...ir.analysis import node_costs
from ...ir.errors import InputDataError, PassOptionError
from ...ir.graph import Graph, Node
from .._util import last_within
from .state import QuantRun
from .table import spec_for

__all__ = ["default_metric", "search"]

Metric = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], float]


def default_metric(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """The default budget metric: worst relative L2 error over the float outputs."""
    from ...runtime.metrics import metric_error

    return metric_error("rel_l2", ref, got)


def search(graph: Graph, state: QuantRun, cands: list[Node], included: set[str],
           quantized_copy: Callable[[set[str]], Graph], *, options: Any, metric: Metric | None) -> set[str]:
    """The nodes to quantize so that the error stays within ``options.budget``: a subset of
    ``included`` (every candidate). ``quantized_copy(nodes)`` returns a copy of ``graph`` with
    ``nodes`` quantized. Findings go to ``state.artifacts``."""
    from ...runtime.metrics import resolve
    from ...runtime.ort import run, session, take_samples

    o = options
    ctx = state.ctx
    if not ctx.calib_data:
        raise InputDataError("pass 'quantize': the accuracy budget needs calibration data")
    data = take_samples(ctx.calib_data, o.budget_samples)   # dense arrays or ragged lists
    try:
        metric_name, metric_fn = resolve(metric if metric is not None else o.metric)
    except ValueError as e:
        raise PassOptionError(f"pass 'quantize': option 'metric': {e}") from None
    budget = o.budget if o.budget is not None else math.inf
    ref = run(session(graph), data, batch_size=o.calib_batch_size)
    evaluations = 0
    ref_power = {}
    for k, v in ref.items():
        parts = v if isinstance(v, list) else [v]
        if all(np.asarray(p).dtype.kind == "f" for p in parts):
            ref_power[k] = float(np.mean(np.concatenate([np.square(np.asarray(p, np.float64)).ravel()
                                                         for p in parts]))) or 1.0

    def nmse_of(got) -> float:
        tot = 0.0
        for k, p in ref_power.items():
            if k not in got:
                continue
            a, b = ref[k], got[k]
            a, b = (a, b) if isinstance(a, list) else ([a], [b])
            if any(np.shape(x) != np.shape(y) for x, y in zip(a, b)):
                return math.inf
            tot += float(np.mean(np.concatenate([np.square(np.asarray(y, np.float64) - np.asarray(x, np.float64)).ravel()
                                                 for x, y in zip(a, b)]))) / p
        return tot

    def evaluate(nodes: set[str]) -> tuple[float, float]:
        """(budget metric, normalized output MSE) of the plan quantizing ``nodes``."""
        nonlocal evaluations
        g2 = quantized_copy(nodes)
        evaluations += 1
        got = run(session(g2), data, batch_size=o.calib_batch_size)
        try:
            err = float(metric_fn(ref, got))
        except ValueError as e:
            raise PassOptionError(f"pass 'quantize': option 'metric': {e}") from None
        return err, nmse_of(got)

    # FLOPs per layer and of the whole graph: the share that would run in integer kernels
    costs = {c.name: c.flops for c in node_costs(graph)}
    total = max(sum(costs.values()), 1)
    layers = [n.name for n in cands if spec_for(n).kind in ("compute", "elementwise") and n.name in included]
    fixed = set(included) - set(layers)        # absorbed activations, passthroughs: follow their layers
    flops = {n: costs.get(n, 0) for n in layers}

    def share(chosen) -> float:
        return sum(flops[n] for n in chosen) / total

    curve: list[dict[str, Any]] = []

    def point(chosen: list[str] | set[str], err: float, stage: str) -> None:
        curve.append({"stage": stage, "layers": len(chosen), "integer_flops_share": round(share(chosen), 6),
                      "error": err})

    all_set = set(included)
    err_all, nmse_all = evaluate(all_set)
    point(layers, err_all, "all")
    state.artifacts.update(metric=metric_name, budget=budget, error_all_quantized=err_all)
    if err_all <= budget:
        ctx.note(f"budget {budget:g} ({metric_name}): fully quantized error {err_all:.4g} is within budget")
        state.artifacts.update(float_layers=[], quantized_layers=list(layers), error_final=err_all,
                               integer_flops_share_predicted=share(layers), budget_curve=curve)
        return all_set
    point([], 0.0, "none")
    if o.sensitivity == "leave-one-out":
        sens = {name: max(nmse_all - evaluate(all_set - {name})[1], 0.0) for name in layers}
    else:
        sens = {name: evaluate({name} | fixed)[1] for name in layers}
    # least error per FLOP first; ties (zero FLOPs) by sensitivity, then graph order
    pos = {n: i for i, n in enumerate(layers)}
    order = sorted(layers, key=lambda n: (sens[n] / max(flops[n], 1), sens[n], pos[n]))
    state.artifacts["sensitivity"] = {n: sens[n] for n in sorted(layers, key=lambda n: (-sens[n], pos[n]))}

    errs: dict[int, float] = {0: 0.0, len(order): err_all}

    def err_prefix(k: int) -> float:
        if k not in errs:
            errs[k] = evaluate(set(order[:k]) | fixed)[0]
            point(order[:k], errs[k], "bisect")
        return errs[k]

    # prefix 0 holds the budget (all float: error 0), the full order does not
    lo = last_within(err_prefix, 0, len(order), budget)
    chosen = list(order[:lo])
    err_final = errs[lo]
    rest = sorted(order[lo:], key=lambda n: (-flops[n], pos[n]))[: max(o.budget_tries, 0)]
    for name in rest:
        if flops[name] == 0 and chosen:
            continue
        e = evaluate(set(chosen) | {name} | fixed)[0]
        point(chosen + [name], e, "add-back")
        if e <= budget:
            chosen.append(name)
            err_final = e
    kept = [n for n in layers if n not in set(chosen)]
    quantized = [n for n in layers if n in set(chosen)]
    state.artifacts.update(float_layers=kept, quantized_layers=quantized, error_final=err_final,
                           integer_flops_share_predicted=share(quantized), budget_curve=curve)
    if not quantized:
        ctx.note(f"budget {budget:g} ({metric_name}): no layer can be quantized within it (every layer alone "
                 f"exceeds it; the fully quantized error is {err_all:.4g}); the model stays float "
                 f"({evaluations} evaluations)")
        return set()
    ctx.note(f"budget {budget:g} ({metric_name}): fully quantized error {err_all:.4g} exceeds it; "
             f"{len(quantized)} of {len(layers)} layer(s) quantized carrying {share(quantized):.1%} of the FLOPs "
             f"-> error {err_final:.4g} ({evaluations} evaluations); kept {len(kept)} in float: "
             f"{', '.join(kept[:20])}{' ...' if len(kept) > 20 else ''}")
    return set(quantized) | fixed
