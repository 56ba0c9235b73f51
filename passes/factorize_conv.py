"""Low-rank factorizations of k x k convolutions: depthwise + pointwise (``factorize-conv``),
vertical + horizontal (``spatial-svd``) and Tucker-2 (``tucker-conv``)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node, Value
from ._lowrank import (LOWRANK_DOC, Candidate, RankOptions, RankRule, auto_pad, auto_search, bench_shapes, candidate_ks,
                       check_layer_patterns, check_rank_possible, choose_rank, drop_if_unused, layer_name,
                       one_layer_graph, parse_rank_options, plain_candidate, prepare_candidates, rel_err,
                       replace_node, selected, skip_slow, speed_check, speed_verdict, summarize, svd,
                       weight_array)
from .base import Pass, PassContext, PassResult, register


@dataclass
class _Conv:
    """A k x k conv the passes may factor."""

    node: Node
    w: np.ndarray            # W[O, I, k...] in float64
    dtype: np.dtype
    x: Value
    bias: Value | None

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.w.shape[2:])

    @property
    def nsp(self) -> int:
        return self.w.ndim - 2

    def attr_list(self, key: str, default: int) -> list[int]:
        v = self.node.attrs.get(key)
        return [int(a) for a in v] if v else [default] * (self.nsp * (2 if key == "pads" else 1))


class _ConvLowRank(Pass):
    """Shared driver of the conv factorizations (not registered)."""

    exact = False
    requires = frozenset({"bn-folded"})
    requirement_hints = {"calib-data": "rank=auto (budget= / target=) measures each layer's sensitivity on "
                                       "calibration data: give --calib-data, or a fixed rank"}
    drift_hint = "a higher rank / energy, or recover with `nnsculpt distill --teacher INPUT`"

    @dataclass
    class Options(RankOptions):
        pass

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.rule = parse_rank_options(self.name, self.options)

    def requirements(self) -> frozenset[str]:
        return frozenset(self.requires | ({"calib-data"} if self.rule.kind == "auto" else set()))

    # --------------------------------------------------------------- per-pass hooks
    def _check(self, g: Graph, c: _Conv) -> str | None:
        """Why this pass cannot factor ``c`` (None: it can)."""
        return None

    def _full_rank(self, c: _Conv) -> int:
        raise NotImplementedError

    def _decompose(self, c: _Conv) -> Any:
        """The SVD(s) of ``c``'s weight, computed once per layer."""
        raise NotImplementedError

    def _factor(self, c: _Conv, dec: Any, rule: RankRule) -> tuple[dict[str, Any], Callable[[Graph, _Conv], list[dict]]]:
        """(report entry with rank / params / weight_rel_err, ``build(g, c)``: adds the factors'
        initializers to ``g`` and returns the replacement chain for :func:`replace_node`)."""
        raise NotImplementedError

    def _candidates(self, c: _Conv) -> list[RankRule]:
        """rank=auto: about ``candidates`` rank rules, increasing, each smaller than the dense layer."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ run
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        check_layer_patterns(self.name, graph, o.layers)
        convs: list[_Conv] = []
        for node in list(graph.nodes):
            if not plain_candidate(node, ("Conv",)):
                continue
            why = selected(node, o)
            if why is None:
                got = _analyse(node)
                if isinstance(got, _Conv):
                    why = self._check(graph, got)
                    if why is None:
                        convs.append(got)
                        continue
                else:
                    why = got
            if why:
                ctx.note(f"left Conv {layer_name(node)} alone: {why}")
        check_rank_possible(self.name, self.rule, [self._full_rank(c) for c in convs])
        if not convs:
            ctx.note("no convolution to factor")
            return PassResult(changed=False)
        auto = self.rule.kind == "auto"
        timed = o.min_speedup is not None
        shapes = bench_shapes(graph, ctx.calib_data, o.bench_batch) if (auto or timed) else {}
        decs = {c.node.name: self._decompose(c) for c in convs}
        rules: dict[str, RankRule | None] = {c.node.name: self.rule for c in convs}
        artifacts: dict[str, Any] = {}
        if auto:
            alayers = []
            for c in convs:
                cands = []
                for rule in self._candidates(c):
                    entry, build = self._factor(c, decs[c.node.name], rule)
                    cands.append(Candidate(rule, entry, functools.partial(self._apply, c=c, build=build)))
                alayers.append(prepare_candidates(self.name, graph, c.node, shapes, o, int(c.w.size), cands, ctx))
            choice, artifacts["auto"] = auto_search(self.name, graph, ctx, o, alayers)
            for lay in alayers:
                idx = choice[lay.name]
                rules[lay.name] = None if idx is None else lay.cands[idx].rule
        report: dict[str, dict[str, Any]] = {}
        p_before = p_after = 0
        changed = False
        for c in convs:
            rule = rules[c.node.name]
            if rule is None:   # rank=auto kept it dense
                entry = {"source": c.node.source, "shape": list(c.w.shape), "rank": "dense",
                         "params_before": int(c.w.size), "params_after": int(c.w.size), "weight_rel_err": 0.0,
                         "applied": False, "decision": "kept dense by the rank search"}
                report[c.node.name] = entry
                p_before += entry["params_before"]
                p_after += entry["params_before"]
                continue
            entry, build = self._factor(c, decs[c.node.name], rule)
            entry = {"source": c.node.source, "shape": list(c.w.shape), **entry}
            p_before += entry["params_before"]
            if self.rule.kind == "rank" and int(self.rule.value) > self._full_rank(c):
                ctx.note(f"{layer_name(c.node)}: rank={int(self.rule.value)} capped at its full rank "
                         f"{self._full_rank(c)}")
            entry["applied"] = self.rule.kind == "full" or entry["params_after"] < entry["params_before"]
            report[c.node.name] = entry
            if not entry["applied"]:
                entry["decision"] = "skipped: not smaller"
                ctx.note(f"left Conv {layer_name(c.node)} alone: not smaller at rank {entry['rank']} "
                         f"({entry['params_after']} >= {entry['params_before']} params)")
                p_after += entry["params_before"]
                continue
            if timed:
                why = self._timing(graph, c, build, shapes, entry)
                if why:
                    skip_slow(ctx, o, "Conv", c.node, why, entry)
                    p_after += entry["params_before"]
                    continue
            entry["decision"] = "applied"
            p_after += entry["params_after"]
            self._apply(graph, c, build)
            changed = True
        return summarize(ctx, o, self.rule, report, artifacts, p_before, p_after, what="conv(s)", changed=changed)

    # ------------------------------------------------------------------- helpers
    def _apply(self, g: Graph, c: _Conv, build: Callable[[Graph, _Conv], list[dict]]) -> None:
        """Rewrite the conv named like ``c.node`` in ``g`` (the pass's graph, a copy, or a one-layer graph)."""
        node = g.node_by_name(c.node.name)
        c2 = _Conv(node, c.w, c.dtype, node.input(0), node.input(2))
        old_w = node.input(1)
        replace_node(g, node, build(g, c2), self.name)
        drop_if_unused(g, old_w)

    def _timing(self, graph: Graph, c: _Conv, build, shapes: dict[str, list[int]], entry: dict[str, Any]) -> str | None:
        """min_speedup: time the layer and its factors; None when fast enough, else why not."""
        shape = shapes.get(c.x.name)
        dense = one_layer_graph(graph, c.node, shape) if shape is not None else None
        if dense is None:
            return "cannot time it (input shape not static beyond the batch dim)"
        fac = dense.copy()
        self._apply(fac, c, build)
        entry.update(speed_check(self.options, dense, fac))
        return speed_verdict(self.options, entry)

    def _init(self, g: Graph, name: str, arr: np.ndarray, dtype) -> Value:
        v = g.add_initializer(name, np.ascontiguousarray(arr).astype(dtype))
        v.meta["pass"] = self.name
        return v


def _analyse(node: Node) -> _Conv | str:
    """The conv's weight, or why no conv pass factors it."""
    x = node.input(0)
    if x is None or x.is_const:
        return "its input is constant"
    w = weight_array(node, 1)
    if w is None:
        return "the weight is not a constant float tensor"
    if w.ndim < 3:
        return f"unexpected weight rank {w.ndim}"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        if w.shape[1] == 1:
            return f"depthwise conv (group={group}): nothing to factor across channels"
        return f"grouped conv (group={group}): only group=1 is factored"
    if all(d == 1 for d in w.shape[2:]):
        return "1x1 conv (svd-linear factors those)"
    bias = node.input(2)
    return _Conv(node, w.astype(np.float64), w.dtype, x, bias)


def _rank_params(c: _Conv, rank: int, params_after: int, approx: np.ndarray) -> dict[str, Any]:
    return {"rank": rank, "params_before": int(c.w.size), "params_after": int(params_after),
            "weight_rel_err": rel_err(c.w, approx)}


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _keep(node: Node, *keys: str) -> dict[str, Any]:
    return {k: node.attrs[k] for k in keys if k in node.attrs}


# =============================================================================== passes
@register
class FactorizeConv(_ConvLowRank):
    """Factor k x k convolutions into a depthwise conv with a channel multiplier r followed by a 1x1 conv.

    Rewrite rule: a ``Conv(x, W[O, I, k...], b)`` with ``group=1`` becomes
    ``Conv(Conv(x, D[I*r, 1, k...]; group=I, same strides / pads / dilations / auto_pad), P[O, I*r, 1...], b)``.
    For each input channel ``i`` the ``O x prod(k)`` matrix ``W[:, i]`` is split by SVD (float64,
    signs fixed) into its ``r`` leading rank-1 terms ``u_j s_j v_j^T``: depthwise filter ``i*r + j``
    is ``sqrt(s_j) v_j`` (reshaped to the kernel), pointwise column ``i*r + j`` is ``sqrt(s_j) u_j``.
    ``r = 1`` is the classical depthwise-separable approximation; ``r = min(O, prod(k))``
    (``rank=full``) is exact. One ``r`` per layer: ``energy`` / ``max_error`` count the singular
    values of all channels together, ``rank_ratio`` is a fraction of ``min(O, prod(k))``. A layer
    is rewritten only when ``I*r*(prod(k) + O) < O*I*prod(k)`` (else noted "not smaller"), except
    with ``rank=full``. New nodes: ``<node>/dw`` and ``<node>/pw`` (provenance ``<source>/dw``,
    ``/pw``); the pointwise conv writes the layer's output value; the old weight is removed when
    nothing else reads it. Artifacts per layer: rank, params before / after, weight relative
    Frobenius error, applied.

    Preconditions (otherwise left alone, the node named in a note): default-domain Conv with a
    constant float weight (initializer or Constant) and a non-constant input, ``group=1``
    (grouped and depthwise convs are left alone), a kernel larger than 1x1 (1x1 convs:
    ``svd-linear``). ``layers=`` / ``exclude=`` select nodes by name, provenance, op type or glob
    (a ``layers`` entry matching no node is an error). BatchNormalization is folded first. Lossy.
    """

    name = "factorize-conv"

    def _full_rank(self, c: _Conv) -> int:
        return min(c.w.shape[0], math.prod(c.kernel))

    def _decompose(self, c):
        o, i = c.w.shape[:2]
        mats = np.transpose(c.w.reshape(o, i, math.prod(c.kernel)), (1, 0, 2))   # (I, O, K)
        return svd(mats)                                                           # (I,O,f) (I,f) (I,f,K)

    def _candidates(self, c):
        o, i = c.w.shape[:2]
        kk = math.prod(c.kernel)
        valid = [r for r in range(1, self._full_rank(c) + 1) if i * r * (kk + o) < o * i * kk]
        return [RankRule("rank", k) for k in candidate_ks(valid, self.options.candidates)]

    def _factor(self, c, dec, rule):
        w = c.w
        o, i = w.shape[:2]
        kk = math.prod(c.kernel)
        u, s, vt = dec
        r = choose_rank(rule, (s ** 2).sum(axis=0))
        rs = np.sqrt(s[:, :r])
        dw = (vt[:, :r, :] * rs[:, :, None]).reshape((i * r, 1) + c.kernel)
        pw = np.transpose(u[:, :, :r] * rs[:, None, :], (1, 0, 2)).reshape(o, i * r)
        approx = np.einsum("oir,irk->oik", pw.reshape(o, i, r), dw.reshape(i, r, kk), optimize=True).reshape(w.shape)
        entry = _rank_params(c, r, i * r * kk + i * r * o, approx)
        return entry, lambda g, cc: self._build_fc(g, cc, dw, pw)

    def _build_fc(self, g, c, dw, pw):
        o, i = c.w.shape[:2]
        r = dw.shape[0] // i
        node = c.node
        dwv = self._init(g, f"{node.name}/dw.weight", dw, c.dtype)
        pwv = self._init(g, f"{node.name}/pw.weight", pw.reshape((o, i * r) + _ones(c.nsp)), c.dtype)
        at = _keep(node, "strides", "pads", "dilations", "auto_pad")
        at["group"] = i
        chain = [dict(op="Conv", inputs=[c.x, dwv], attrs=at, name=f"{node.name}/dw", source=f"{node.source}/dw"),
                 dict(op="Conv", inputs=["prev", pwv] + ([c.bias] if c.bias is not None else []),
                      name=f"{node.name}/pw", source=f"{node.source}/pw")]
        return chain


@register
class SpatialSVD(_ConvLowRank):
    """Split 2-D k x k convolutions into a kh x 1 conv with R channels then a 1 x kw conv (spatial SVD).

    Rewrite rule (Jaderberg et al. 2014; AIMET's spatial SVD): for ``Conv(x, W[O, I, kh, kw], b)``
    with ``group=1``, the matrix ``M[(i, y), (o, x)] = W[o, i, y, x]`` (``I*kh x O*kw``) is split
    by SVD (float64, signs fixed) into its ``R`` leading terms; the layer becomes
    ``Conv(Conv(x, V[R, I, kh, 1]), H[O, R, 1, kw], b)`` with ``V[r, i, y] = sqrt(s_r) u_r[(i, y)]``
    and ``H[o, r, x] = sqrt(s_r) v_r[(o, x)]``. The vertical parts of the strides / pads /
    dilations go to the first conv (``strides=[sh, 1]``, ``pads=[ph0, 0, ph1, 0]``,
    ``dilations=[dh, 1]``), the horizontal ones to the second (``[1, sw]``, ``[0, pw0, 0, pw1]``,
    ``[1, dw]``); ``auto_pad=SAME_*`` is turned into explicit pads from the static input shape.
    ``R = min(I*kh, O*kw)`` (``rank=full``) is exact; ``rank_ratio`` is a fraction of that. A layer
    is rewritten only when ``R*(I*kh + O*kw) < O*I*kh*kw`` (else noted), except with
    ``rank=full``. New nodes: ``<node>/vert`` and ``<node>/horiz`` (provenance likewise); the
    second writes the layer's output value.

    Preconditions (otherwise left alone with a note naming the node): as ``factorize-conv``, and a
    2-D conv with ``kh > 1`` and ``kw > 1``; ``auto_pad=SAME_*`` needs a static input shape.
    BatchNormalization is folded first. Lossy.
    """

    name = "spatial-svd"

    def _check(self, g, c):
        if c.nsp != 2:
            return f"{c.nsp}-D conv (spatial-svd splits 2-D kernels)"
        if min(c.kernel) < 2:
            return f"kernel {c.kernel[0]}x{c.kernel[1]} is already one-dimensional"
        if _explicit_pads(g, c) is None:
            return f"auto_pad={auto_pad(c.node)} with an input shape that is not static"
        return None

    def _full_rank(self, c):
        o, i = c.w.shape[:2]
        kh, kw = c.kernel
        return min(i * kh, o * kw)

    def _decompose(self, c):
        o, i, kh, kw = c.w.shape
        return svd(np.transpose(c.w, (1, 2, 0, 3)).reshape(i * kh, o * kw))

    def _candidates(self, c):
        o, i, kh, kw = c.w.shape
        valid = [r for r in range(1, self._full_rank(c) + 1) if r * (i * kh + o * kw) < o * i * kh * kw]
        return [RankRule("rank", k) for k in candidate_ks(valid, self.options.candidates)]

    def _factor(self, c, dec, rule):
        w = c.w
        o, i, kh, kw = w.shape
        u, s, vt = dec
        r = choose_rank(rule, s ** 2)
        rs = np.sqrt(s[:r])
        v = (u[:, :r] * rs).T.reshape(r, i, kh)                      # V[r, i, y]
        h = np.transpose((rs[:, None] * vt[:r]).reshape(r, o, kw), (1, 0, 2))  # H[o, r, x]
        approx = np.einsum("riy,orx->oiyx", v, h, optimize=True)
        entry = _rank_params(c, r, r * (i * kh + o * kw), approx)
        return entry, lambda g, cc: self._build(g, cc, v, h)

    def _build(self, g, c, v, h):
        node = c.node
        sh, sw = c.attr_list("strides", 1)
        dh, dw = c.attr_list("dilations", 1)
        ph0, pw0, ph1, pw1 = _explicit_pads(g, c)
        vv = self._init(g, f"{node.name}/vert.weight", v[..., None], c.dtype)
        hv = self._init(g, f"{node.name}/horiz.weight", h[:, :, None, :], c.dtype)
        a1 = {"strides": [sh, 1], "pads": [ph0, 0, ph1, 0], "dilations": [dh, 1]}
        a2 = {"strides": [1, sw], "pads": [0, pw0, 0, pw1], "dilations": [1, dw]}
        chain = [dict(op="Conv", inputs=[c.x, vv], attrs=a1, name=f"{node.name}/vert", source=f"{node.source}/vert"),
                 dict(op="Conv", inputs=["prev", hv] + ([c.bias] if c.bias is not None else []), attrs=a2,
                      name=f"{node.name}/horiz", source=f"{node.source}/horiz")]
        return chain


@register
class TuckerConv(_ConvLowRank):
    """Tucker-2 decomposition of k x k convolutions: 1x1 conv -> smaller k x k core conv -> 1x1 conv.

    Rewrite rule: for ``Conv(x, W[O, I, k...], b)`` with ``group=1``, the HOSVD (float64, signs
    fixed) of the two channel modes -- ``U_out`` = the leading ``R_out`` left singular vectors of
    the mode-0 unfolding ``W.reshape(O, -1)``, ``U_in`` = the leading ``R_in`` of the mode-1
    unfolding ``(I x O*prod(k))`` -- gives the core ``G = W x_0 U_out^T x_1 U_in^T``
    ``[R_out, R_in, k...]``, and the layer becomes
    ``Conv(Conv(Conv(x, U_in^T[R_in, I, 1...]), G; the original strides / pads / dilations /
    auto_pad), U_out[O, R_out, 1...], b)``. Ranks per mode by the same rule applied to each
    unfolding's singular values (``rank=N``: both ``N``, capped; ``rank_ratio``: a fraction of
    each mode's full rank; ``max_error=t``: ``t / sqrt(2)`` per mode, so the HOSVD bound keeps the
    weight error ``<= t``). ``rank=full`` (``R_out = min(O, I*prod(k))``,
    ``R_in = min(I, O*prod(k))``) is exact. Rewritten only when
    ``I*R_in + R_out*R_in*prod(k) + R_out*O < O*I*prod(k)`` (else noted), except with
    ``rank=full``. New nodes ``<node>/tucker_in``, ``/tucker_core``, ``/tucker_out`` (provenance
    likewise); the last writes the layer's output value. Artifacts: ``rank`` is
    ``[R_out, R_in]``.

    Preconditions as ``factorize-conv``. BatchNormalization is folded first. Lossy. (A short
    numpy HOSVD; no tensorly: HOOI iterations would lower the error slightly, at more cost.)
    """

    name = "tucker-conv"

    def _fulls(self, c: _Conv) -> tuple[int, int]:
        o, i = c.w.shape[:2]
        kk = math.prod(c.kernel)
        return min(o, i * kk), min(i, o * kk)

    def _full_rank(self, c):
        return max(self._fulls(c))

    def _decompose(self, c):
        o, i = c.w.shape[:2]
        u0, s0, _ = svd(c.w.reshape(o, -1))
        u1, s1, _ = svd(np.swapaxes(c.w, 0, 1).reshape(i, -1))
        return u0, s0, u1, s1

    def _candidates(self, c):
        o, i = c.w.shape[:2]
        kk = math.prod(c.kernel)
        f0, f1 = self._fulls(c)
        fm = max(f0, f1)
        pairs: dict[tuple[int, int], int] = {}
        for k in range(1, fm + 1):
            rule = RankRule("rank_ratio", k / fm)
            r0, r1 = choose_rank(rule, np.ones(f0)), choose_rank(rule, np.ones(f1))
            if i * r1 + r0 * r1 * kk + r0 * o < o * i * kk:
                pairs.setdefault((r0, r1), k)
        ks = candidate_ks(list(pairs.values()), self.options.candidates)
        return [RankRule("rank_ratio", k / fm) for k in ks]

    def _factor(self, c, dec, rule):
        w = c.w
        o, i = w.shape[:2]
        kk = math.prod(c.kernel)
        u0, s0, u1, s1 = dec
        if rule.kind == "max_error":
            rule = RankRule("max_error", rule.value / math.sqrt(2.0))
        r0, r1 = choose_rank(rule, s0 ** 2), choose_rank(rule, s1 ** 2)
        a0, a1 = u0[:, :r0], u1[:, :r1]                                 # (O, R0), (I, R1)
        flat = w.reshape(o, i, kk)
        core = np.matmul(a1.T, (a0.T @ flat.reshape(o, -1)).reshape(r0, i, kk))      # (R0, R1, K)
        approx = (a0 @ np.matmul(a1, core).reshape(r0, -1)).reshape(w.shape)
        entry = _rank_params(c, r0, i * r1 + r0 * r1 * kk + r0 * o, approx)
        entry["rank"] = [r0, r1]
        return entry, lambda g, cc: self._build(g, cc, a0, a1, core)

    def _build(self, g, c, a0, a1, core):
        o, i = c.w.shape[:2]
        r0, r1 = a0.shape[1], a1.shape[1]
        node = c.node
        n = c.nsp
        win = self._init(g, f"{node.name}/tucker_in.weight", a1.T.reshape((r1, i) + _ones(n)), c.dtype)
        wco = self._init(g, f"{node.name}/tucker_core.weight", core.reshape((r0, r1) + c.kernel), c.dtype)
        wout = self._init(g, f"{node.name}/tucker_out.weight", a0.reshape((o, r0) + _ones(n)), c.dtype)
        at = _keep(node, "strides", "pads", "dilations", "auto_pad")
        chain = [dict(op="Conv", inputs=[c.x, win], name=f"{node.name}/tucker_in", source=f"{node.source}/tucker_in"),
                 dict(op="Conv", inputs=["prev", wco], attrs=at, name=f"{node.name}/tucker_core",
                      source=f"{node.source}/tucker_core"),
                 dict(op="Conv", inputs=["prev", wout] + ([c.bias] if c.bias is not None else []),
                      name=f"{node.name}/tucker_out", source=f"{node.source}/tucker_out")]
        return chain


for _cls in (FactorizeConv, SpatialSVD, TuckerConv):
    _cls.__doc__ = (_cls.__doc__ or "").rstrip() + "\n" + LOWRANK_DOC


# ------------------------------------------------------------------------- padding
def _explicit_pads(g: Graph, c: _Conv) -> list[int] | None:
    """``[ph0, pw0, ph1, pw1]`` of a 2-D conv: its ``pads`` (``auto_pad=NOTSET``), zeros
    (``VALID``), or the SAME padding computed from the static input shape; None if unknown."""
    mode = auto_pad(c.node)
    if mode in ("NOTSET", ""):
        return c.attr_list("pads", 0)
    if mode == "VALID":
        return [0, 0, 0, 0]
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    if c.x.shape is None:
        infer_shapes(g)
    shape = c.x.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    strides, dil = c.attr_list("strides", 1), c.attr_list("dilations", 1)
    begin, end = [], []
    for size, k, s, d in zip(shape[2:], c.kernel, strides, dil):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        lo = total // 2 if mode == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin + end
