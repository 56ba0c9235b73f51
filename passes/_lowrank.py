"""Shared machinery of the low-rank passes (``svd-linear``, ``factorize-conv``, ``spatial-svd``,
``tucker-conv``): the rank options and their checks, rank selection from singular values, an SVD
with fixed signs, layer selection by ``layers=`` / ``exclude=``, and the rewrite helpers.

Rank options (exactly one is given):

* ``rank=N`` -- keep ``N`` terms (capped at the layer's full rank); ``rank=full`` -- the exact
  factorization (always applied, even when it is larger than the layer: for testing);
* ``rank_ratio=f`` -- ``ceil(f * full)`` terms (``0 < f <= 1``);
* ``energy=e`` -- the fewest terms whose squared singular values keep a fraction ``>= e`` of
  ``sum(sigma^2)`` (``0 < e <= 1``);
* ``max_error=t`` -- the fewest terms whose relative Frobenius error of the weight,
  ``sqrt(sum of dropped sigma^2 / sum(sigma^2))``, is ``<= t`` (``0 <= t < 1``);
* ``rank=auto`` (implied by ``budget=`` or ``target=`` alone) -- ranks chosen per layer on
  calibration data (:func:`auto_search`).

``min_speedup=s`` (any rank option): a layer is rewritten only when its factorized chain runs at
least ``s`` times as fast as the dense layer in ONNX Runtime on this machine, both timed as tiny
standalone models (:func:`speed_check`, ``runtime.layer_timing``; cached on disk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, Node, Value, mark_changed
from ._util import const_of, exactly_one_option, is_default_domain, is_plain, last_within
from .base import PassResult
from .quantize.placement import matches

#: 1e-12 relative: cumulative-energy comparisons are made with this slack (float64 round-off)
_SLACK = 1e-12


@dataclass
class RankOptions:
    """The options every low-rank pass shares (its ``Options`` dataclass extends this one)."""

    # typing.Optional, not ``float | None``: base.coerce_value recognises typing.Union only
    rank: str = ""
    rank_ratio: Optional[float] = None
    energy: Optional[float] = None
    max_error: Optional[float] = None
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    # rank=auto: ranks chosen under a budget / target on calibration data
    budget: Optional[float] = None
    target: str = ""                   # params:F | flops:F (F in (0, 1]) of the selected layers' dense weights / MACs
    metric: str = "rel_l2"             # rel_l2 | max_rel | cosine | top1 | iou@T (runtime.metrics)
    budget_samples: int = 64
    candidates: int = 8                # candidate ranks per layer on its sensitivity curve
    batch_size: int = 16               # batch size of ORT runs on calibration data
    # min_speedup: apply a rewrite only where ORT runs the factors that much faster than the dense layer
    min_speedup: Optional[float] = None
    bench_batch: int = 1
    threads: int = 1


@dataclass(frozen=True)
class RankRule:
    """The parsed rank option: ``kind`` is ``full`` / ``rank`` / ``rank_ratio`` / ``energy`` /
    ``max_error`` and ``value`` its number."""

    kind: str
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "full":
            return "rank=full"
        if self.kind == "rank":
            return f"rank={int(self.value)}"
        return f"{self.kind}={self.value:g}"


#: the mutually exclusive ways to give a rank
_RANK_OPTIONS = ("rank", "rank_ratio", "energy", "max_error")


def parse_rank_options(pass_name: str, o: RankOptions) -> RankRule:
    """Check the rank options of ``o`` (exactly one given, each in range) and return the rule;
    a :class:`PassOptionError` names the pass and the option otherwise."""

    def bad(opt: str, why: str) -> PassOptionError:
        return PassOptionError(f"pass '{pass_name}': option '{opt}' has bad value {getattr(o, opt)!r}: {why}")

    _check_common(pass_name, o, bad)
    given = [k for k in _RANK_OPTIONS if getattr(o, k) not in (None, "")]
    searched = [k for k in ("budget", "target") if getattr(o, k) not in (None, "")]
    is_auto = str(o.rank).strip().lower() == "auto"
    if searched and not is_auto:
        if given:
            raise PassOptionError(f"pass '{pass_name}': option {searched[0]!r} chooses the ranks (rank=auto); it "
                                  f"excludes {given[0]!r}: give one or the other")
        is_auto = True
    if is_auto:
        if len(given) > 1:
            other = [k for k in given if k != "rank"][0]
            raise PassOptionError(f"pass '{pass_name}': options 'rank' and {other!r} exclude each other: give only one")
        if not searched:
            raise bad("rank", "rank=auto needs option 'budget' (the largest error allowed on the calibration data, "
                              "by 'metric') or 'target' (params:0.5 or flops:0.5), or both")
        return RankRule("auto")
    k = exactly_one_option(pass_name, o, _RANK_OPTIONS, f"{pass_name}{{rank_ratio=0.5}}")
    if k == "rank":
        s = str(o.rank).strip().lower()
        if s == "full":
            return RankRule("full")
        try:
            n = int(s)
        except ValueError:
            raise bad("rank", "expected a positive integer or 'full'") from None
        if n < 1:
            raise bad("rank", "must be >= 1 (or 'full')")
        return RankRule("rank", n)
    v = float(getattr(o, k))
    if k in ("rank_ratio", "energy") and not (0.0 < v <= 1.0):
        raise bad(k, "must be in (0, 1]")
    if k == "max_error" and not (0.0 <= v < 1.0):
        raise bad(k, "must be in [0, 1)")
    return RankRule(k, v)


def _check_common(pass_name: str, o: RankOptions, bad: Callable[[str, str], PassOptionError]) -> None:
    if o.budget is not None and not (o.budget >= 0):
        raise bad("budget", "must be >= 0")
    if o.target not in (None, ""):
        parse_target(pass_name, o.target)
    from ..runtime.metrics import check_metric_name

    try:
        check_metric_name(o.metric)
    except ValueError as e:
        raise PassOptionError(f"pass '{pass_name}': option 'metric': {e}") from None
    for k, lo in (("budget_samples", 1), ("candidates", 2), ("batch_size", 1), ("bench_batch", 1), ("threads", 1)):
        if int(getattr(o, k)) < lo:
            raise bad(k, f"must be >= {lo}")
    if o.min_speedup is not None and not (o.min_speedup >= 0):
        raise bad("min_speedup", "must be >= 0 (1.0: never slower than the dense layer)")


def parse_target(pass_name: str, target: str) -> tuple[str, float]:
    """``params:F`` / ``flops:F`` -> (``params`` | ``flops``, F), F in (0, 1]."""
    s = str(target).strip().lower().replace("=", ":")
    kind, _, num = s.partition(":")
    try:
        f = float(num)
    except ValueError:
        f = math.nan
    if kind not in ("params", "flops", "macs") or not (0.0 < f <= 1.0):
        raise PassOptionError(f"pass '{pass_name}': option 'target' has bad value {target!r}: expected params:F or "
                              f"flops:F with F in (0, 1] (the fraction of the selected layers' dense weights / "
                              f"MACs to keep), e.g. target=params:0.5")
    return ("flops" if kind == "macs" else kind), f


def choose_rank(rule: RankRule, sq: np.ndarray) -> int:
    """The number of terms to keep by ``rule``, given ``sq[j]`` = the squared singular value
    (energy) of term ``j`` in decreasing order (summed over channels where a layer has several
    SVDs sharing one rank). Always in ``[1, len(sq)]``."""
    full = int(len(sq))
    if full == 0:
        return 0
    if rule.kind == "full":
        return full
    if rule.kind == "rank":
        return max(1, min(full, int(rule.value)))
    if rule.kind == "rank_ratio":
        return max(1, min(full, math.ceil(rule.value * full - 1e-9)))
    sq = np.asarray(sq, dtype=np.float64)
    total = float(sq.sum())
    if total <= 0:
        return 1
    kept = np.cumsum(sq) / total  # kept[r-1]: fraction kept with r terms
    if rule.kind == "energy":
        need = rule.value - _SLACK
        return max(1, min(full, int(np.searchsorted(kept, need, side="left")) + 1))
    # max_error: relative error with r terms = sqrt(1 - kept[r-1])
    err = np.sqrt(np.clip(1.0 - kept, 0.0, None))
    ok = np.flatnonzero(err <= rule.value + _SLACK)
    return max(1, int(ok[0]) + 1 if ok.size else full)


def svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``m = U diag(s) Vt`` in float64 (of each matrix in the last two dims of a stack)
    with fixed signs: the largest-magnitude entry of each left singular vector is positive (the
    first such entry on ties), the matching row of ``Vt`` flipped with it. Deterministic."""
    u, s, vt = np.linalg.svd(np.asarray(m, dtype=np.float64), full_matrices=False)
    if u.size:
        idx = np.argmax(np.abs(u), axis=-2)[..., None, :]          # (..., 1, k)
        sign = np.sign(np.take_along_axis(u, idx, axis=-2))         # (..., 1, k)
        sign[sign == 0] = 1.0
        u = u * sign
        vt = vt * np.swapaxes(sign, -1, -2)
    return u, s, vt


def balanced_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``A = U_k sqrt(S_k)`` (m x k) and ``B = sqrt(S_k) V_k^T`` (k x n), ``A @ B`` the rank-k
    approximation; the square root splits the scale evenly (better conditioned in float32 and for
    fine-tuning than ``U_k S_k`` / ``V_k^T``)."""
    r = np.sqrt(s[:k])
    return u[:, :k] * r, r[:, None] * vt[:k]


def rel_err(w: np.ndarray, approx: np.ndarray) -> float:
    """``||w - approx||_F / ||w||_F`` in float64 (0 for an all-zero ``w`` equal to ``approx``)."""
    w = np.asarray(w, dtype=np.float64)
    d = float(np.linalg.norm(w - np.asarray(approx, dtype=np.float64)))
    n = float(np.linalg.norm(w))
    return d / n if n > 0 else (0.0 if d == 0 else math.inf)


# ------------------------------------------------------------------------ layer selection
def check_layer_patterns(pass_name: str, graph: Graph, patterns: Sequence[str]) -> None:
    """Raise :class:`PassOptionError` naming the first ``layers=`` entry that matches no node
    (by op type, name, provenance or glob)."""
    for p in patterns:
        if not any(matches(n, [p]) for n in graph.nodes):
            raise PassOptionError(f"pass '{pass_name}': option 'layers' entry '{p}' matches no node "
                                  f"(give node names, provenance names such as layer1.0.conv1, or globs)")


def selected(node: Node, o: RankOptions) -> str | None:
    """None if ``node`` is selected by ``layers`` / ``exclude``, else why not ('' = not named by
    ``layers``: no note)."""
    if o.layers and not matches(node, o.layers):
        return ""
    if o.exclude and matches(node, o.exclude):
        return "excluded by option 'exclude'"
    return None


def plain_candidate(node: Node, ops: Sequence[str]) -> bool:
    return node.op_type in ops and is_default_domain(node) and is_plain(node)


def weight_array(node: Node, index: int) -> np.ndarray | None:
    """The constant float weight read by ``node`` at ``index`` (an initializer, or a ``Constant``
    node seen through ``Identity``), or None."""
    v = node.input(index)
    w = const_of(v)
    if w is None or np.asarray(w).dtype.kind != "f":
        return None
    return np.asarray(w)


def drop_if_unused(g: Graph, v: Value | None) -> None:
    """Remove ``v`` when nothing reads it any more: an initializer, or the ``Constant`` /
    ``Identity`` chain that produced it."""
    seen = 0
    while v is not None and seen < 64:
        if v.uses or any(o is v for o in g.outputs):
            return
        if v.is_const:
            g.remove_initializer_if_unused(v)
            return
        p = v.producer
        if p is None or p.graph is not g or p.op_type not in ("Constant", "Identity") or not is_default_domain(p) \
                or len(p.outputs) != 1:
            return
        nxt = p.input(0) if p.op_type == "Identity" else None
        g.remove_node(p)
        v, seen = nxt, seen + 1


def replace_node(g: Graph, old: Node, chain: list[dict[str, Any]], pass_name: str) -> list[Node]:
    """Replace ``old`` by a chain of new nodes at its position. Each entry of ``chain`` is
    ``dict(op=, inputs=[...], attrs=, name=, source=)``; the string ``"prev"`` among the inputs
    stands for the previous node's output. The last node writes ``old``'s output value, so
    consumers and graph outputs keep their names. Every new node gets ``meta["source"]`` and is
    stamped by ``pass_name``. Returns the new nodes."""
    y = old.outputs[0]
    idx = g.nodes.index(old)
    anchor = g.nodes[idx + 1] if idx + 1 < len(g.nodes) else None
    nodes: list[Node] = []
    prev: Value | None = None
    for i, spec in enumerate(chain):
        inputs = [prev if isinstance(x, str) and x == "prev" else x for x in spec["inputs"]]
        attrs = spec.get("attrs") or {}
        meta = {"source": spec["source"]}
        name = g.unique_name(spec["name"])
        if i < len(chain) - 1:
            out = Value(g.unique_name(name + "_out"), y.dtype)
            n = g.add_node(spec["op"], inputs, [out], attrs, name=name, meta=meta, before=old)
        else:
            g.remove_node(old, force=True)
            n = g.add_node(spec["op"], inputs, [y], attrs, name=name, meta=meta, before=anchor)
        mark_changed(n, pass_name)
        nodes.append(n)
        prev = n.outputs[0]
    return nodes


def auto_pad(node: Node) -> str:
    a = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(a, bytes):
        a = a.decode()
    return str(a) or "NOTSET"


def check_rank_possible(pass_name: str, rule: RankRule, fulls: Sequence[int]) -> None:
    """``rank=N`` larger than the full rank of every candidate layer is a named error (a rank
    larger than one layer's full rank is capped there, and noted)."""
    if rule.kind == "rank" and fulls and int(rule.value) > max(fulls):
        raise PassOptionError(f"pass '{pass_name}': option 'rank' has bad value '{int(rule.value)}': larger than "
                              f"the full rank of every selected layer (largest: {max(fulls)}); use rank=full for "
                              f"the exact factorization")


def layer_name(node: Node) -> str:
    """How notes name a layer: the node name, with its provenance when that differs."""
    return node.name if node.source == node.name else f"{node.name} ({node.source})"


# ====================================================================== timing (min_speedup)
def bench_shapes(graph: Graph, calib: Any, batch: int) -> dict[str, list[int]]:
    """Static shapes of the graph's values with the graph inputs' symbolic batch dim (dim 0)
    set to ``batch`` and their other symbolic dims taken from the calibration data where given
    (shape inference on a copy). Values whose shape stays symbolic are left out."""
    from ..ir.analysis import infer_shapes

    g = graph.copy()
    for v in g.inputs:
        if v.shape is None:
            continue
        sample = None
        if calib and v.name in calib:
            a = calib[v.name]
            sample = np.shape(a[0] if isinstance(a, (list, tuple)) else a)
        shape = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif i == 0:
                shape.append(int(batch))
            elif sample is not None and len(sample) == len(v.shape):
                shape.append(int(sample[i]))
            else:
                shape.append(d)
        v.shape = shape
    for v in g.values.values():
        if not v.is_const and v not in g.inputs:
            v.shape = None
    g.invalidate()
    infer_shapes(g)
    return {k: list(v.shape) for k, v in g.values.items()
            if not v.is_const and v.shape is not None and all(isinstance(d, int) and d >= 0 for d in v.shape)}


def one_layer_graph(graph: Graph, node: Node, x_shape: Sequence[int]) -> Graph | None:
    """A standalone graph of ``node`` alone: its first input a graph input of shape ``x_shape``,
    its other (constant) inputs initializers; the node keeps its name, attributes and provenance.
    None when another input is not constant."""
    from ..ir.analysis import infer_shapes

    g = Graph(f"layer:{node.name}")
    g.opset_imports = dict(graph.opset_imports)
    x0 = node.input(0)
    x = g.add_input("x", x0.dtype or np.float32, list(x_shape))
    ins: list[Value | None] = [x]
    for i, v in enumerate(node.inputs[1:], start=1):
        if v is None:
            ins.append(None)
            continue
        arr = const_of(v)
        if arr is None:
            return None
        ins.append(g.add_initializer(f"w{i}", np.asarray(arr)))
    n = g.add_node(node.op_type, ins, ["y"], dict(node.attrs), name=node.name, meta={"source": node.source})
    n.attr_types = dict(node.attr_types)
    g.outputs = [n.outputs[0]]
    infer_shapes(g)
    return g


def chain_macs(g: Graph) -> int:
    from ..ir.analysis import node_costs

    return int(sum(c.macs for c in node_costs(g)))


def speed_check(o: RankOptions, dense: Graph, factored: Graph) -> dict[str, Any]:
    """Time the one-layer graphs ``dense`` and ``factored`` (cached): ``dense_ms``,
    ``factored_ms``, ``speedup`` = dense / factored, ``timing_cached``."""
    from ..runtime.layer_timing import time_graphs

    d, f = time_graphs([dense, factored], threads=o.threads)
    sig = lambda x: float(f"{x:.6g}")  # noqa: E731
    return {"dense_ms": sig(d["ms"]), "factored_ms": sig(f["ms"]), "speedup": sig(d["ms"] / max(f["ms"], 1e-12)),
            "timing_cached": bool(d["cached"] and f["cached"])}


def speed_verdict(o: RankOptions, t: dict[str, Any]) -> str | None:
    """None when the timing ``t`` passes ``min_speedup``, else why not (``slower (x0.40)``)."""
    if o.min_speedup is None or t["speedup"] >= o.min_speedup:
        return None
    if t["speedup"] < 1.0:
        return f"slower (x{t['speedup']:.2f})"
    return f"not fast enough (x{t['speedup']:.2f} < min_speedup {o.min_speedup:g})"


def timing_note(t: dict[str, Any]) -> str:
    return f"dense {t['dense_ms']:.4g} ms, factored {t['factored_ms']:.4g} ms in ORT"


def skip_slow(ctx: Any, o: RankOptions, what: str, node: Node, why: str, entry: dict[str, Any]) -> None:
    """Record in ``entry`` and note that the ``what`` layer ``node`` stays dense: ``why`` (min_speedup)."""
    entry["applied"] = False
    entry["decision"] = f"skipped: {why}"
    ctx.note(f"left {what} {layer_name(node)} alone: {why} at rank {entry['rank']}"
             + (f" ({timing_note(entry)}; min_speedup={o.min_speedup:g})" if "dense_ms" in entry else ""))


def summarize(ctx: Any, o: RankOptions, rule: RankRule, report: dict[str, dict[str, Any]],
              artifacts: dict[str, Any], p_before: int, p_after: int, *, what: str, changed: bool,
              extra: str = "") -> PassResult:
    """The run's closing notes, metrics and :class:`PassResult` (``what``: "conv(s)", ...;
    ``extra``: text added to the rank description, e.g. ", data-aware")."""
    n_done = sum(1 for e in report.values() if e["applied"])
    how = rule.describe() if rule.kind != "auto" else f"rank=auto, {o.metric}" + \
        (f", budget {o.budget:g}" if o.budget is not None else "") + (f", target {o.target}" if o.target else "")
    timed = f", min_speedup={o.min_speedup:g}" if o.min_speedup is not None else ""
    ctx.note(f"factored {n_done} of {len(report)} {what} ({how}{extra}{timed}): weights {p_before} -> {p_after} params")
    metrics = {"factored": n_done, "params_before": p_before, "params_after": p_after}
    if rule.kind == "auto":
        a = artifacts["auto"]
        ctx.note(f"rank=auto: {a['evaluations']} evaluations on {a['samples']} sample(s); predicted "
                 f"{a['metric']} {a['predicted_error']:.4g}, measured {a['measured_error']:.4g}")
        metrics["error"] = a["measured_error"]
    return PassResult(changed=changed, artifacts={"layers": report, **artifacts}, metrics=metrics)


@dataclass
class Candidate:
    """One rank of one layer: ``apply(g)`` rewrites the layer (found by node name) in ``g``."""

    rule: RankRule
    entry: dict[str, Any]
    apply: Callable[[Graph], None]
    macs: int | None = None
    timing: dict[str, Any] | None = None

    @property
    def params(self) -> int:
        return int(self.entry["params_after"])


@dataclass
class AutoLayer:
    name: str
    label: str
    params: int                          # dense weights
    macs: int | None                     # dense MACs at the bench shape (None: unknown)
    cands: list[Candidate] = field(default_factory=list)   # increasing rank


def candidate_ks(valid: Sequence[int], n: int) -> list[int]:
    """About ``n`` of the ranks ``valid`` (sorted), geometrically spaced, first and last included."""
    valid = sorted(set(int(k) for k in valid))
    if len(valid) <= n:
        return valid
    lo, hi = valid[0], valid[-1]
    want = np.unique(np.round(np.geomspace(lo, hi, n)).astype(int))
    out = sorted({min(valid, key=lambda k: (abs(k - w), k)) for w in want})
    return out


def prepare_candidates(pass_name: str, graph: Graph, node: Node, shapes: dict[str, list[int]], o: RankOptions,
                       dense_params: int, cands: list[Candidate], ctx: Any) -> AutoLayer:
    """The layer's :class:`AutoLayer`: MACs at the bench shape (when static) and, with
    ``min_speedup``, only the candidates fast enough (the others noted)."""
    shape = shapes.get(node.input(0).name)
    dense = one_layer_graph(graph, node, shape) if shape is not None else None
    lay = AutoLayer(node.name, layer_name(node), dense_params, chain_macs(dense) if dense is not None else None)
    if o.min_speedup is not None and dense is None:
        ctx.note(f"{layer_name(node)}: min_speedup: cannot time it (input shape not static beyond the batch dim); "
                 f"kept dense")
        return lay
    slow = []
    for c in cands:
        if dense is not None:
            fac = dense.copy()
            c.apply(fac)
            c.macs = chain_macs(fac)
            if o.min_speedup is not None:
                c.timing = speed_check(o, dense, fac)
                c.entry.update(c.timing)
                if speed_verdict(o, c.timing):
                    slow.append(f"{c.entry['rank']} (x{c.timing['speedup']:.2f})")
                    continue
        lay.cands.append(c)
    if slow:
        ctx.note(f"{layer_name(node)}: min_speedup={o.min_speedup:g}: candidate rank(s) {', '.join(slow)} not "
                 f"considered (not fast enough in ORT)")
    return lay


# ========================================================================== rank=auto
def auto_search(pass_name: str, graph: Graph, ctx: Any, o: RankOptions,
                layers: list[AutoLayer]) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Choose a candidate (or dense: None) per layer.

    1. **curves**: the metric (``o.metric``, model outputs vs the dense model's on up to
       ``budget_samples`` calibration samples, ORT) with only that layer factorized, at each
       candidate rank;
    2. **greedy path** (AIMET's greedy compression-ratio selection): from all dense, repeatedly
       lower the rank of the layer (to any lower candidate) with the least predicted error
       increase per parameter (``target=flops:``: per MAC) saved; the predicted error of a
       configuration is the sum of its layers' curve errors;
    3. **choice**: with ``target``, the first configuration on the path that meets it (then
       measured; with ``budget`` too, a measured error above it is an error); with ``budget``
       alone, a bisection over the path on *measured* errors, starting at the last
       configuration predicted within the budget: the most compressed configuration measured
       within it.
    """
    from ..runtime.metrics import resolve
    from ..runtime.ort import num_samples, run, session, take_samples

    by_name = {l.name: l for l in layers}
    data = take_samples(ctx.calib_data, o.budget_samples)
    metric_name, fn = resolve(o.metric)
    ref = run(session(graph), data, batch_size=o.batch_size)
    try:
        fn(ref, ref)
    except ValueError as e:
        raise PassOptionError(f"pass '{pass_name}': option 'metric': {e}") from None
    tkind, tfrac = parse_target(pass_name, o.target) if o.target else ("params", None)
    budget = o.budget
    evals = 0

    from ..runtime.metrics import metric_error

    secondary: dict[int, float] = {}     # id of the last evaluation -> its rel_l2 (tie-breaks of discrete metrics)

    def evaluate(config: dict[str, int]) -> float:
        nonlocal evals
        g2 = graph.copy()
        for name, idx in config.items():
            by_name[name].cands[idx].apply(g2)
        got = run(session(g2), data, batch_size=o.batch_size)
        evals += 1
        e = float(fn(ref, got))
        secondary[evals] = e if metric_name == "rel_l2" else float(metric_error("rel_l2", ref, got))
        return e

    def cost(l: AutoLayer, idx: int | None) -> int:
        if tkind == "flops":
            return int(l.macs if idx is None else l.cands[idx].macs)
        return int(l.params if idx is None else l.cands[idx].params)

    if tkind == "flops":
        unknown = [l.label for l in layers if l.macs is None or any(c.macs is None for c in l.cands)]
        if unknown:
            raise PassOptionError(f"pass '{pass_name}': option 'target' {o.target!r}: the MACs of {unknown[0]} are "
                                  f"unknown (its input shape is not static beyond the batch dim; give calibration "
                                  f"data with the real shapes, or target=params:F)")
    live = [l for l in layers if l.cands]
    # 1. curves
    err: dict[str, list[float]] = {}
    rel: dict[str, list[float]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for l in live:
        err[l.name], rel[l.name] = [], []
        for i in range(len(l.cands)):
            err[l.name].append(evaluate({l.name: i}))
            rel[l.name].append(secondary[evals])
        curves[l.name] = [{"rank": c.entry["rank"], "params": c.params, "macs": c.macs, "error": e}
                          | ({"rel_l2": r} if metric_name != "rel_l2" else {})
                          for c, e, r in zip(l.cands, err[l.name], rel[l.name])] + \
                         [{"rank": "dense", "params": l.params, "macs": l.macs, "error": 0.0}]
    # 2. greedy path
    level: dict[str, int | None] = {l.name: None for l in live}

    def cur_err(l: AutoLayer, table: dict[str, list[float]] = err) -> float:
        return 0.0 if level[l.name] is None else table[l.name][level[l.name]]

    def totals() -> tuple[float, int, int]:
        pe = sum(cur_err(l) for l in live)
        params = sum(l.params if level.get(l.name) is None else l.cands[level[l.name]].params for l in layers)
        macs = sum((l.macs or 0) if level.get(l.name) is None else (l.cands[level[l.name]].macs or 0) for l in layers)
        return pe, params, macs

    p_dense = sum(l.params for l in layers) or 1
    m_dense = sum(l.macs or 0 for l in layers) or 1
    if any(l.macs is None or any(c.macs is None for c in l.cands) for l in layers):
        m_dense = None
    path: list[dict[str, Any]] = [{"step": 0, "layer": None, "rank": None, "predicted": 0.0,
                                   "params_fraction": 1.0, "macs_fraction": 1.0}]
    configs: list[dict[str, int]] = [{}]
    while True:
        best = None
        for pos, l in enumerate(live):
            cur = level[l.name]
            top = len(l.cands) if cur is None else cur
            for j in range(top):
                saved = cost(l, cur) - cost(l, j)
                if saved <= 0:
                    continue
                # least metric increase per unit saved; ties (a discrete metric such as top1 on few
                # samples is often 0) by the rel_l2 increase per unit saved, then the larger saving
                key = ((err[l.name][j] - cur_err(l)) / saved, (rel[l.name][j] - cur_err(l, rel)) / saved,
                       -saved, pos, j)
                if best is None or key < best[0]:
                    best = (key, l, j)
        if best is None:
            break
        _, l, j = best
        level[l.name] = j
        pe, params, macs = totals()
        path.append({"step": len(path), "layer": l.name, "rank": l.cands[j].entry["rank"], "predicted": pe,
                     "params_fraction": params / p_dense, "macs_fraction": macs / m_dense if m_dense else None})
        configs.append({k: v for k, v in level.items() if v is not None})
    measured: dict[int, float] = {0: 0.0}

    def m(k: int) -> float:
        if k not in measured:
            measured[k] = evaluate(configs[k])
            path[k]["measured"] = measured[k]
        return measured[k]

    frac_key = "macs_fraction" if tkind == "flops" else "params_fraction"
    if tfrac is not None:
        ok = [k for k, p in enumerate(path) if p[frac_key] <= tfrac + 1e-12]
        if not ok:
            closest = min(p[frac_key] for p in path)
            raise PassOptionError(f"pass '{pass_name}': option 'target' {o.target!r} cannot be met: the lowest "
                                  f"candidate ranks of the {len(layers)} selected layer(s) keep {closest:.3f} of "
                                  f"their dense {tkind} (the closest reached); select more layers (layers=/"
                                  f"exclude=), allow slower factors (min_speedup) or aim higher")
        k = ok[0]
        e = m(k)
        if budget is not None and e > budget:
            raise PassOptionError(f"pass '{pass_name}': options 'target' {o.target!r} and 'budget' {budget:g} cannot "
                                  f"both be met: at the target the measured {metric_name} is {e:.4g} (predicted "
                                  f"{path[k]['predicted']:.4g}); raise the budget or the target fraction")
    else:
        n = len(path) - 1
        pred_ok = [k for k, p in enumerate(path) if p["predicted"] <= budget]
        probe = max(pred_ok) if pred_ok else 0
        probe = max(probe, 1) if n else 0
        if probe == 0:
            k = 0
        else:
            k = last_within(m, probe, n + 1, budget) if m(probe) <= budget else last_within(m, 0, probe, budget)
    chosen = configs[k]
    choice = {l.name: chosen.get(l.name) for l in layers}
    art = {"metric": metric_name, "budget": budget, "target": o.target or None, "samples": num_samples(data),
           "evaluations": evals, "chosen": {l.name: ("dense" if choice[l.name] is None else
                                                       l.cands[choice[l.name]].entry["rank"]) for l in layers},
           "step": k, "predicted_error": path[k]["predicted"], "measured_error": measured[k],
           "params_fraction": path[k]["params_fraction"], "macs_fraction": path[k]["macs_fraction"],
           "curves": curves, "path": path}
    return choice, art


#: appended to each low-rank pass's docstring (``nnsculpt passes --docs``)
LOWRANK_DOC = """
    **min_speedup** (every rank option): ``min_speedup=s`` rewrites a layer only when its factors
    run at least ``s`` times as fast as the dense layer in ONNX Runtime on this machine
    (``min_speedup=1.0``: never slower; default: no timing). Both are timed as tiny standalone
    models (the layer's input shape from shape inference, the batch dim ``bench_batch`` (1), other
    symbolic dims from the calibration data when given; ``threads`` (1) intra-op threads; warm-up,
    then the median of interleaved short runs: tens of ms per layer) by
    ``runtime.layer_timing``, cached per signature (ops, attributes, shapes, ORT version, threads,
    CPU) in ``layer_timings.json`` under ``$NNSCULPT_CACHE_DIR`` / ``$XDG_CACHE_HOME/nnsculpt`` /
    ``~/.cache/nnsculpt``, so a second run does not time again. Artifacts per layer:
    ``dense_ms``, ``factored_ms``, ``speedup``, ``decision`` (``applied`` / ``skipped: slower
    (x0.40)``); a skipped layer is noted. A layer whose input shape is not static is not timed
    and left alone (noted). **The decision is machine-dependent** (CPU, ORT version, load on the
    machine): the same model and options can give different graphs on different machines, or on
    a busy one; the cache makes repeated runs on one machine agree.

    **rank=auto** (implied by ``budget=`` or ``target=`` alone; needs calibration data):
    per-layer sensitivity curves -- the error ``metric`` (``rel_l2`` default, ``max_rel``,
    ``cosine``, ``top1``, ``iou@T``; ``runtime.metrics``) of the model's outputs vs the dense
    model's, in ORT on the first ``budget_samples`` (64) calibration samples, with only that
    layer factorized, at ``candidates`` (8) ranks spaced geometrically up to the largest rank
    that is still smaller than the layer (Tucker: a common fraction of both modes' full ranks) --
    then AIMET's greedy selection: from all dense, repeatedly lower the rank of the layer with
    the least error increase (predicted: the sum of the layers' curve errors) per parameter
    saved (per MAC with ``target=flops:F``). ``target=params:F`` / ``flops:F``: the first
    configuration whose selected layers keep at most ``F`` of their dense weights / MACs (MACs at
    the bench shape), then measured; with ``budget`` too, a measured error above it is an error.
    ``budget`` alone: the most compressed configuration along that path whose *measured* error
    is ``<= budget`` (a bisection on measured errors, starting from the last one predicted
    within it; all dense when none is). With ``min_speedup``, candidates not fast enough are not
    considered. Artifacts ``auto``: ``metric``, ``budget``, ``target``, ``samples``,
    ``evaluations``, ``chosen`` (rank or ``dense`` per layer), ``curves`` (per layer: rank,
    params, MACs, error), ``path`` (the greedy steps: predicted and, where evaluated, measured
    error, params / MACs fraction), ``predicted_error``, ``measured_error``; metrics ``error``.
    Named errors: rank=auto without budget / target, a ``target`` that cannot be met (the
    closest fraction reached is said), target and budget that cannot both be met.
    Deterministic for given calibration data (without ``min_speedup``).
    """
