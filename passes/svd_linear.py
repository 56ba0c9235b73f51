"""SVD splitting of linear layers: Gemm / MatMul / 1x1 Conv -> two thinner layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import functools

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, Node
from ._lowrank import (LOWRANK_DOC, Candidate, RankOptions, RankRule, auto_search, balanced_factors, bench_shapes, candidate_ks,
                       check_layer_patterns, check_rank_possible, choose_rank, drop_if_unused, layer_name,
                       one_layer_graph, parse_rank_options, plain_candidate, prepare_candidates, rel_err,
                       replace_node, selected, skip_slow, speed_check, speed_verdict, summarize, svd,
                       weight_array)
from .base import Pass, PassContext, PassResult, register

_OPS = ("Gemm", "MatMul", "Conv")


@dataclass
class _Layer:
    node: Node
    w: np.ndarray          # the effective weight, (in, out) as x @ W uses it, float64
    dtype: np.dtype        # the stored weight's dtype (the factors are cast back to it)
    kind: str              # "MatMul" | "Gemm" | "Conv"


@register
class SVDLinear(Pass):
    """Split linear layers (Gemm, MatMul, 1x1 Conv) with a constant weight into two thinner ones by truncated SVD.

    With the weight ``W`` as ``x @ W`` uses it (``in x out``; computed in float64) and its SVD
    ``W = U S V^T`` (signs fixed: the largest-magnitude entry of each column of ``U`` positive), a
    layer of rank ``k`` becomes ``x @ A @ B`` with ``A = U_k sqrt(S_k)`` (``in x k``) and
    ``B = sqrt(S_k) V_k^T`` (``k x out``), stored in the weight's dtype. Rewrite rules:

    * ``MatMul(x, W)`` -> ``MatMul(MatMul(x, A), B)``; a following ``Add`` of a bias is not
      touched (it reads the same output value);
    * ``Gemm(x, Wg, C; alpha, beta, transA, transB)``, ``W = alpha * (Wg^T if transB else Wg)``
      -> ``Gemm(x, A'; transA, transB)`` then ``Gemm(., B', C; beta, transB)`` where ``A'``,
      ``B'`` are ``A``, ``B`` transposed when ``transB=1`` (torch's Linear layout); ``alpha``
      is folded into the factors, ``C`` and ``beta`` stay on the second Gemm;
    * ``Conv`` with an all-ones kernel and ``group=1``, ``W[O, I, 1, ...]`` -> a 1x1 Conv to
      ``k`` channels with the original strides / pads / dilations / auto_pad and no bias, then a
      plain 1x1 Conv to ``O`` channels carrying the bias.

    The new nodes are named ``<node>/svd_a`` and ``<node>/svd_b`` with provenance
    ``<source>/svd_a`` / ``<source>/svd_b``; the second writes the layer's output value. The old
    weight (initializer or ``Constant`` chain) is removed when nothing else reads it.

    Rank (exactly one option): ``rank=N|full``, ``rank_ratio=`` (fraction of ``min(in, out)``),
    ``energy=`` (kept fraction of ``sum(sigma^2)``), ``max_error=`` (relative Frobenius error of
    ``W``). A layer is rewritten only where ``k (in + out) < in * out`` (else noted "not
    smaller"); ``rank=full`` is the exact factorization and is always applied (for testing).

    **Data-aware** (``data_aware=true``, needs calibration data): with ``C = E[x x^T]`` the
    second moment of the layer's input on the calibration data (collected with ONNX Runtime on
    the input graph; a strided 1x1 Conv counts the positions it reads) and its Cholesky factor
    ``C = L L^T`` (when ``C`` is not positive definite, ``ridge * trace(C)/in`` is added to its
    diagonal, growing 10x until it is; noted), the SVD is of ``L^T W = U S V^T`` and
    ``A = L^-T U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T``: the rank-k factors minimizing the error of
    the layer's *outputs* ``||X (W - A B)||_F`` on the calibration inputs (SVD-LLM). ``energy`` /
    ``max_error`` then refer to the output (whitened) singular values.

    Artifacts: per layer (``layers``: node name ->) ``op``, ``source``, ``shape`` [in, out],
    ``rank``, ``full_rank``, ``params_before`` / ``params_after`` (weights only), ``weight_rel_err``,
    ``applied`` and, with ``data_aware``, ``output_rel_err`` (``||X(W - AB)|| / ||XW||`` on the
    calibration data) and ``output_rel_err_plain`` (the same for plain SVD at that rank).

    Preconditions (otherwise the layer is left alone and the node named in a note): default
    domain, no subgraphs; a constant float 2-D weight as the second operand (``MatMul(W, x)``
    and Gemm with a constant ``A`` are not handled) and a non-constant input; Conv: all-ones
    kernel and ``group=1`` (larger kernels: ``factorize-conv`` / ``spatial-svd`` / ``tucker-conv``).
    ``layers=[...]`` restricts the pass to the nodes named (node name, provenance, op type or
    glob; an entry matching no node is an error), ``exclude=[...]`` leaves those out.
    BatchNormalization is folded first (requirement ``bn-folded``). Lossy.
    """

    name = "svd-linear"
    exact = False
    requires = frozenset({"bn-folded"})
    requirement_hints = {"calib-data": "data_aware=true whitens by the input statistics of each layer, rank=auto "
                                       "(budget= / target=) measures each layer's sensitivity: give --calib-data, "
                                       "or drop data_aware / give a fixed rank"}
    drift_hint = "a higher rank / energy (or data_aware=true), or recover with `nnsculpt distill --teacher INPUT`"

    @dataclass
    class Options(RankOptions):
        data_aware: bool = False
        ridge: float = 1e-6

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.rule = parse_rank_options(self.name, self.options)
        if not (self.options.ridge > 0):
            raise PassOptionError(f"pass '{self.name}': option 'ridge' has bad value {self.options.ridge!r}: must be > 0")

    def requirements(self) -> frozenset[str]:
        need = set(self.requires)
        if self.options.data_aware or self.rule.kind == "auto":
            need.add("calib-data")
        return frozenset(need)

    # ------------------------------------------------------------------------------ run
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        check_layer_patterns(self.name, graph, o.layers)
        layers: list[_Layer] = []
        for node in list(graph.nodes):
            if not plain_candidate(node, _OPS):
                continue
            why = selected(node, o)
            if why is None:
                got = _analyse(node)
                if isinstance(got, str):
                    why = got
                else:
                    layers.append(got)
                    continue
            if why:
                ctx.note(f"left {node.op_type} {layer_name(node)} alone: {why}")
        check_rank_possible(self.name, self.rule, [min(l.w.shape) for l in layers])
        if not layers:
            ctx.note("no linear layer to factor")
            return PassResult(changed=False)

        moments: dict[str, np.ndarray] = {}
        if o.data_aware:
            moments = self._moments(graph, layers, ctx)
        auto = self.rule.kind == "auto"
        timed = o.min_speedup is not None
        shapes = bench_shapes(graph, ctx.calib_data, o.bench_batch) if (auto or timed) else {}
        decs = {lay.node.name: self._decompose(lay, moments.get(lay.node.input(0).name), ctx) for lay in layers}
        rules: dict[str, RankRule | None] = {lay.node.name: self.rule for lay in layers}
        artifacts: dict[str, Any] = {}
        if auto:
            alayers = []
            for lay in layers:
                cands = []
                for rule in self._candidates(lay):
                    entry, factors = self._factor(lay, decs[lay.node.name], rule, ctx)
                    cands.append(Candidate(rule, entry, functools.partial(self._apply, lay=lay, factors=factors)))
                alayers.append(prepare_candidates(self.name, graph, lay.node, shapes, o, int(lay.w.size), cands,
                                                  ctx))
            choice, artifacts["auto"] = auto_search(self.name, graph, ctx, o, alayers)
            for al in alayers:
                idx = choice[al.name]
                rules[al.name] = None if idx is None else al.cands[idx].rule

        report: dict[str, dict[str, Any]] = {}
        changed = False
        p_before = p_after = 0
        for lay in layers:
            rule = rules[lay.node.name]
            m, n = lay.w.shape
            if rule is None:
                report[lay.node.name] = {"op": lay.kind, "source": lay.node.source, "shape": [m, n],
                                         "full_rank": min(m, n), "params_before": m * n, "rank": "dense",
                                         "params_after": m * n, "weight_rel_err": 0.0, "applied": False,
                                         "decision": "kept dense by the rank search"}
                p_before += m * n
                p_after += m * n
                continue
            if self.rule.kind == "rank" and int(self.rule.value) > min(m, n):
                ctx.note(f"{layer_name(lay.node)}: rank={int(self.rule.value)} capped at its full rank {min(m, n)}")
            entry, factors = self._factor(lay, decs[lay.node.name], rule, ctx)
            report[lay.node.name] = entry
            p_before += entry["params_before"]
            if factors is not None and timed:
                why = self._timing(graph, lay, factors, shapes, entry)
                if why:
                    skip_slow(ctx, o, lay.kind, lay.node, why, entry)
                    factors = None
            if factors is None:
                p_after += entry["params_before"]
                continue
            entry["decision"] = "applied"
            p_after += entry["params_after"]
            self._apply(graph, lay, factors)
            changed = True
        return summarize(ctx, o, self.rule, report, artifacts, p_before, p_after, what="linear layer(s)",
                         changed=changed, extra=", data-aware" if o.data_aware else "")

    def _apply(self, g: Graph, lay: _Layer, factors: tuple[np.ndarray, np.ndarray]) -> None:
        """Rewrite the layer named like ``lay.node`` in ``g`` (the pass's graph, a copy or a one-layer graph)."""
        node = g.node_by_name(lay.node.name)
        self._rewrite(g, _Layer(node, lay.w, lay.dtype, lay.kind), *factors)

    def _timing(self, graph: Graph, lay: _Layer, factors, shapes: dict[str, list[int]],
                entry: dict[str, Any]) -> str | None:
        shape = shapes.get(lay.node.input(0).name)
        dense = one_layer_graph(graph, lay.node, shape) if shape is not None else None
        if dense is None:
            return "cannot time it (input shape not static beyond the batch dim)"
        fac = dense.copy()
        self._apply(fac, lay, factors)
        entry.update(speed_check(self.options, dense, fac))
        return speed_verdict(self.options, entry)

    def _candidates(self, lay: _Layer) -> list[RankRule]:
        m, n = lay.w.shape
        valid = [k for k in range(1, min(m, n) + 1) if k * (m + n) < m * n]
        return [RankRule("rank", k) for k in candidate_ks(valid, self.options.candidates)]

    # ------------------------------------------------------------------------ helpers
    def _moments(self, graph: Graph, layers: list[_Layer], ctx: PassContext) -> dict[str, np.ndarray]:
        from ..runtime.calibrate import collect_second_moments

        axis: dict[str, int] = {}
        rows: dict[str, Any] = {}
        for lay in layers:
            x = lay.node.input(0).name
            if lay.kind == "Conv":
                rows[x] = _conv_rows(lay.node)
            elif lay.kind == "Gemm" and int(lay.node.attrs.get("transA", 0)):
                axis[x] = 0
            else:
                axis[x] = -1
        names = [lay.node.input(0).name for lay in layers]
        return collect_second_moments(graph, names, ctx.calib_data, axis=axis, rows=rows,
                                      batch_size=self.options.batch_size, progress=False)

    def _decompose(self, lay: _Layer, cov: np.ndarray | None, ctx: PassContext) -> dict[str, Any]:
        """The SVD of the layer's (whitened) weight, computed once."""
        dec: dict[str, Any] = {"cov": cov, "chol": None, "ridge": 0.0}
        if cov is not None:
            dec["chol"], dec["ridge"] = _cholesky(cov, self.options.ridge)
            if dec["ridge"]:
                ctx.note(f"{layer_name(lay.node)}: input second moment not positive definite; added a ridge of "
                         f"{dec['ridge']:g} x trace/in")
            dec["svd"] = svd(dec["chol"].T @ lay.w)
            dec["plain"] = svd(lay.w)
        else:
            dec["svd"] = svd(lay.w)
        return dec

    def _factor(self, lay: _Layer, dec: dict[str, Any], rule: RankRule, ctx: PassContext):
        """(report entry, (A, B) or None)."""
        w = lay.w
        m, n = w.shape
        full = min(m, n)
        entry: dict[str, Any] = {"op": lay.kind, "source": lay.node.source, "shape": [m, n], "full_rank": full,
                                 "params_before": m * n}
        cov, chol = dec["cov"], dec["chol"]
        if dec["ridge"]:
            entry["ridge"] = dec["ridge"]
        u, s, vt = dec["svd"]
        k = choose_rank(rule, s ** 2)
        a, b = balanced_factors(u, s, vt, k)
        if chol is not None:
            a = np.linalg.solve(chol.T, a)
        entry.update(rank=k, params_after=k * (m + n), weight_rel_err=rel_err(w, a @ b))
        if cov is not None:
            entry["output_rel_err"] = _out_err(cov, w, a @ b)
            pa, pb = balanced_factors(*dec["plain"], k)
            entry["output_rel_err_plain"] = _out_err(cov, w, pa @ pb)
        if rule.kind != "full" and k * (m + n) >= m * n:
            entry["applied"] = False
            entry["decision"] = "skipped: not smaller"
            ctx.note(f"left {lay.kind} {layer_name(lay.node)} alone: not smaller at rank {k} "
                     f"({k * (m + n)} >= {m * n} params)")
            return entry, None
        entry["applied"] = True
        return entry, (a, b)

    def _rewrite(self, g: Graph, lay: _Layer, a: np.ndarray, b: np.ndarray) -> None:
        node, dt = lay.node, lay.dtype
        x = node.input(0)
        old_w = node.input(1)
        extra = node.input(2)
        na, nb = f"{node.name}/svd_a", f"{node.name}/svd_b"
        sa, sb = f"{node.source}/svd_a", f"{node.source}/svd_b"
        if lay.kind == "MatMul":
            wa, wb = g.add_initializer(na + ".weight", a.astype(dt)), g.add_initializer(nb + ".weight", b.astype(dt))
            chain = [dict(op="MatMul", inputs=[x, wa], name=na, source=sa),
                     dict(op="MatMul", inputs=["prev", wb], name=nb, source=sb)]
        elif lay.kind == "Gemm":
            tb = int(node.attrs.get("transB", 0))
            wa = g.add_initializer(na + ".weight", (a.T if tb else a).astype(dt))
            wb = g.add_initializer(nb + ".weight", (b.T if tb else b).astype(dt))
            at: dict[str, Any] = {"transB": tb} if tb else {}
            if int(node.attrs.get("transA", 0)):
                at["transA"] = 1
            bt: dict[str, Any] = {"transB": tb} if tb else {}
            ins_b: list = ["prev", wb]
            if extra is not None:
                ins_b.append(extra)
                beta = float(node.attrs.get("beta", 1.0))
                if beta != 1.0:
                    bt["beta"] = beta
            chain = [dict(op="Gemm", inputs=[x, wa], attrs=at, name=na, source=sa),
                     dict(op="Gemm", inputs=ins_b, attrs=bt, name=nb, source=sb)]
        else:  # 1x1 Conv
            ones = (1,) * (np.asarray(weight_array(node, 1)).ndim - 2)
            wa = g.add_initializer(na + ".weight", a.T.reshape((a.shape[1], a.shape[0]) + ones).astype(dt))
            wb = g.add_initializer(nb + ".weight", b.T.reshape((b.shape[1], b.shape[0]) + ones).astype(dt))
            at = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
            ins_b = ["prev", wb] + ([extra] if extra is not None else [])
            chain = [dict(op="Conv", inputs=[x, wa], attrs=at, name=na, source=sa),
                     dict(op="Conv", inputs=ins_b, name=nb, source=sb)]
        for v in (wa, wb):
            v.meta["pass"] = self.name
        replace_node(g, node, chain, self.name)
        drop_if_unused(g, old_w)


SVDLinear.__doc__ = (SVDLinear.__doc__ or "").rstrip() + "\n" + LOWRANK_DOC


# ------------------------------------------------------------------------- analysis
def _analyse(node: Node) -> _Layer | str:
    """The layer's effective weight, or why it is left alone."""
    x = node.input(0)
    if x is None or x.is_const or weight_array(node, 0) is not None:
        return "its first operand is constant (only x @ W with a constant W is factored)"
    w = weight_array(node, 1)
    if w is None:
        return "the weight is not a constant float tensor"
    if node.op_type == "Conv":
        if w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
            return ""  # a k x k conv: the conv passes' job, not worth a note here
        if int(node.attrs.get("group", 1)) != 1:
            return f"group={int(node.attrs.get('group', 1))} (only group=1 is factored)"
        return _Layer(node, w.reshape(w.shape[0], w.shape[1]).T.astype(np.float64), w.dtype, "Conv")
    if w.ndim != 2:
        return f"the weight is {w.ndim}-D (only 2-D weights are factored)"
    if node.op_type == "MatMul":
        return _Layer(node, w.astype(np.float64), w.dtype, "MatMul")
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha == 0.0:
        return "alpha=0"
    tb = int(node.attrs.get("transB", 0))
    weff = (w.T if tb else w).astype(np.float64) * alpha
    return _Layer(node, weff, w.dtype, "Gemm")


def _conv_rows(node: Node):
    """Rows (positions x channels) of a 1x1 conv's input at the positions it reads: every
    ``stride``-th one from the first position not in the padding."""
    strides = [int(s) for s in node.attrs.get("strides", [])]
    pads = [int(p) for p in node.attrs.get("pads", [])]

    def rows(a: np.ndarray) -> np.ndarray:
        nsp = a.ndim - 2
        st = strides or [1] * nsp
        pb = pads[:nsp] if len(pads) == 2 * nsp else [0] * nsp
        idx = (slice(None), slice(None)) + tuple(slice((s - p % s) % s, None, s) for s, p in zip(st, pb))
        r = np.moveaxis(a[idx], 1, -1)
        return r.reshape(-1, r.shape[-1])

    return rows


def _cholesky(cov: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``cov``, adding ``eps * trace/d`` to the diagonal (eps from
    ``ridge``, x10 per retry) when it is not positive definite; returns (L, eps used or 0)."""
    cov = (cov + cov.T) / 2
    try:
        return np.linalg.cholesky(cov), 0.0
    except np.linalg.LinAlgError:
        pass
    d = cov.shape[0]
    scale = float(np.trace(cov)) / d if d else 1.0
    scale = scale if scale > 0 else 1.0
    eps = ridge
    while True:
        try:
            return np.linalg.cholesky(cov + eps * scale * np.eye(d)), eps
        except np.linalg.LinAlgError:
            eps *= 10
            if eps > 1e3:  # pragma: no cover - cov is symmetric, so this ends long before
                return np.eye(d) * np.sqrt(scale), eps


def _out_err(cov: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    """``||X (W - approx)||_F / ||X W||_F`` from the second moment ``X^T X / n``."""
    d = w - approx
    num = float(np.einsum("ij,ik,kj->", d, cov, d))
    den = float(np.einsum("ij,ik,kj->", w, cov, w))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
