"""``fuse-layernorm``: hand-written layer norms become one ONNX ``LayerNormalization``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node, Value
from .base import Pass, PassContext, PassResult, register
from ._util import const_of, has_implicit_uses, is_graph_output, is_plain, raise_opset_for_fusion, rebuild_node

_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))
#: ops the search for the variance walks through, from the normalising Div/Mul backwards
_DENOMINATOR_OPS = ("Sqrt", "Add", "Reciprocal", "Div", "Pow", "Mul")
_SEARCH_DEPTH = 6


@dataclass
class _Reduce:
    """``mean_of(src)``: ReduceMean, or ReduceSum followed by ``Mul(1/N)`` / ``Div(N)``."""

    src: Value
    nodes: list[Node]
    axes: list[int] | None      # as written (may be negative); None: unknown / not constant
    keepdims: bool
    divisor: float | None = None  # ReduceSum variants: the N it divides by (None for ReduceMean)


@dataclass
class _Centered:
    """``x - mean_of(x)``."""

    x: Value
    sub: Node
    mean: _Reduce


@dataclass
class _Match:
    x: Value
    k: int
    eps: float
    core: list[Node]
    final: Node
    gamma: np.ndarray | None = None
    gamma_value: Value | None = None
    beta: np.ndarray | None = None
    beta_value: Value | None = None
    rank: int | None = None
    norm_shape: tuple[int, ...] | None = None
    consts: list[Value] = field(default_factory=list)


def _input(n: Node, i: int) -> Value | None:
    return n.inputs[i] if i < len(n.inputs) else None


def _scalar(v: Value | None) -> float | None:
    c = const_of(v)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    return float(np.asarray(c).reshape(-1)[0])


def _producer(v: Value | None, *ops: str) -> Node | None:
    p = v.producer if v is not None else None
    if p is None or not is_plain(p) or p.graph is None or (ops and p.op_type not in ops):
        return None
    return p


def _reduce_axes(n: Node) -> tuple[bool, list[int] | None]:
    """``(ok, axes)`` of a ReduceMean/ReduceSum: axes from the attribute (opset < 18 / < 13)
    or the input (opset >= 18 / >= 13); ``axes=None`` with ``ok`` means all axes."""
    a = _input(n, 1)
    if a is not None:
        c = const_of(a)
        if c is None:
            return False, None
        axes = [int(v) for v in np.asarray(c).reshape(-1)]
    elif n.attrs.get("axes") is not None:
        axes = [int(v) for v in n.attrs["axes"]]
    else:
        axes = []
    if not axes:
        if int(n.attrs.get("noop_with_empty_axes", 0)):
            return False, None
        return True, None
    return True, axes


def _mean_of(v: Value | None) -> _Reduce | None:
    p = _producer(v, "ReduceMean", "Mul", "Div")
    if p is None:
        return None
    if p.op_type == "ReduceMean":
        ok, axes = _reduce_axes(p)
        if not ok:
            return None
        return _Reduce(p.inputs[0], [p], axes if axes is not None else "all",  # type: ignore[arg-type]
                       bool(int(p.attrs.get("keepdims", 1))))
    # ReduceSum(y) * (1/N), (1/N) * ReduceSum(y), ReduceSum(y) / N
    cands = [(0, 1), (1, 0)] if p.op_type == "Mul" else [(0, 1)]
    for si, ci in cands:
        s = _producer(_input(p, si), "ReduceSum")
        c = _scalar(_input(p, ci))
        if s is None or c is None or c == 0:
            continue
        ok, axes = _reduce_axes(s)
        if not ok:
            return None
        n = 1.0 / c if p.op_type == "Mul" else c
        return _Reduce(s.inputs[0], [s, p], axes if axes is not None else "all",  # type: ignore[arg-type]
                       bool(int(s.attrs.get("keepdims", 1))), divisor=n)
    return None


def _centered(v: Value | None) -> _Centered | None:
    p = _producer(v, "Sub")
    if p is None or len(p.inputs) != 2:
        return None
    m = _mean_of(p.inputs[1])
    if m is None or m.src is not p.inputs[0]:
        return None
    return _Centered(p.inputs[0], p, m)


def _square_of(v: Value | None, x: Value) -> tuple[Node, _Centered] | None:
    """``Pow(d, 2)`` or ``Mul(d, d)`` with ``d`` centred on ``x``."""
    p = _producer(v, "Pow", "Mul")
    if p is None or len(p.inputs) != 2:
        return None
    if p.op_type == "Pow":
        e = const_of(p.inputs[1])
        if e is None or e.size != 1 or float(np.asarray(e).reshape(-1)[0]) != 2.0:
            return None
    elif p.inputs[0] is not p.inputs[1]:
        return None
    c = _centered(p.inputs[0])
    if c is None or c.x is not x:
        return None
    return p, c


def _find_variance(v: Value | None, x: Value) -> tuple[Value, _Reduce, Node, _Centered] | None:
    """A value ``mean_of((x - mean(x))**2)`` among the ancestors of ``v`` through the ops a
    layer norm's denominator is built from (a few steps up)."""
    frontier = [v]
    seen: set[int] = set()
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for w in frontier:
            if w is None or id(w) in seen:
                continue
            seen.add(id(w))
            r = _mean_of(w)
            if r is not None:
                sq = _square_of(r.src, x)
                if sq is not None:
                    return w, r, sq[0], sq[1]
            p = _producer(w, *_DENOMINATOR_OPS)
            if p is not None:
                nxt.extend(p.inputs)
        frontier = nxt
    return None


def _sqrt_of(v: Value | None) -> tuple[Value, Node] | None:
    p = _producer(v, "Sqrt", "Pow")
    if p is None:
        return None
    if p.op_type == "Pow" and _scalar(_input(p, 1)) != 0.5:
        return None
    return p.inputs[0], p


def _rsqrt_of(v: Value | None) -> tuple[Value, list[Node]] | None:
    """``Reciprocal(Sqrt(t))``, ``Div(1, Sqrt(t))`` or ``Pow(t, -0.5)`` -> ``(t, nodes)``."""
    p = _producer(v, "Reciprocal", "Div", "Pow")
    if p is None:
        return None
    if p.op_type == "Pow":
        return (p.inputs[0], [p]) if _scalar(_input(p, 1)) == -0.5 else None
    if p.op_type == "Div":
        one = const_of(_input(p, 0))
        if one is None or one.size != 1 or float(np.asarray(one).reshape(-1)[0]) != 1.0:
            return None
        s = _sqrt_of(_input(p, 1))
    else:
        s = _sqrt_of(_input(p, 0))
    return (s[0], [s[1], p]) if s is not None else None


def _factor(v: Value | None) -> tuple[Value, list[Node], tuple[np.ndarray, Value] | None] | None:
    """``rsqrt(t)`` or ``Mul(gamma, rsqrt(t))`` (either order, constant gamma) ->
    ``(t, nodes, (gamma, gamma_value) or None)``."""
    r = _rsqrt_of(v)
    if r is not None:
        return r[0], r[1], None
    p = _producer(v, "Mul")
    if p is None or len(p.inputs) != 2:
        return None
    for gi, ri in ((0, 1), (1, 0)):
        gc = const_of(p.inputs[gi])
        rr = _rsqrt_of(p.inputs[ri])
        if gc is not None and rr is not None:
            return rr[0], rr[1] + [p], (gc, p.inputs[gi])
    return None


def _norm_axes(axes, rank: int) -> list[int] | None:
    if axes == "all":
        return list(range(rank))
    out = sorted({a + rank if a < 0 else a for a in axes})
    return out if all(0 <= a < rank for a in out) else None


def _shape_from_param(c: np.ndarray | None, k: int) -> tuple[int, ...] | None:
    """The normalised shape a gamma / beta constant spells out: its trailing ``k`` dims when
    it has no more than ``k`` dims and each of them is > 1 (else it does not tell)."""
    if c is None:
        return None
    c = np.asarray(c)
    if c.ndim > k:
        return None
    shp = (1,) * (k - c.ndim) + tuple(int(s) for s in c.shape)
    return shp if all(s > 1 for s in shp) else None


def _param(c: np.ndarray, rank: int | None, k: int, norm_shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """``c`` as a ``norm_shape`` array when broadcasting it over the input touches only the
    normalised (trailing ``k``) dims and leaves the input's shape unchanged (rank unknown:
    ``c`` may have at most ``k`` dims)."""
    c = np.asarray(c)
    if rank is None:
        rank = k
    if c.dtype != dtype or c.ndim > rank:
        return None
    shp = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(s != 1 for s in shp[:rank - k]):
        return None
    tail = shp[rank - k:]
    if any(t not in (1, n) for t, n in zip(tail, norm_shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(c.reshape(tail), norm_shape))


@register
class FuseLayerNorm(Pass):
    """Fuse hand-written layer norms into one ONNX ``LayerNormalization`` (opset 17).

    Rewrite rules (``mean_of(t)`` is ``ReduceMean(t)``, ``ReduceSum(t) * (1/N)`` or
    ``ReduceSum(t) / N`` over the same axes; ``d = Sub(x, mean_of(x))``):

    * ``var = mean_of(Pow(d, 2))`` or ``mean_of(Mul(d, d))`` -- ``d`` may be a second, equal
      ``Sub(x, mean_of(x))`` (torch's ``x.var()`` recomputes the mean);
    * ``n = Div(d, Sqrt(var + eps))``, or ``Mul(d, r)`` with ``r`` = ``Reciprocal(Sqrt(var + eps))``,
      ``Div(1, Sqrt(var + eps))`` or ``Pow(var + eps, -0.5)`` (``Sqrt`` may be ``Pow(., 0.5)``),
      or with ``r = Mul(gamma, rsqrt(var + eps))`` (tf2onnx's folded
      ``(x - mean) * (gamma * rsqrt(var + eps)) + beta``);
    * optionally followed by ``Mul(n, gamma)`` and ``Add(., beta)`` with constant gamma / beta
      (either operand order), each taken only when it is the sole user of the value before it
      and broadcasts over the normalised dims only (else it stays after the new node, and an
      ``Add`` after an untaken ``Mul`` stays too);
    * or, without a ``Sub(x, mean)`` before the scaling, ``Add(Mul(x, r), Sub(beta,
      Mul(mean_of(x), r)))`` -- ``Neg(Mul(mean_of(x), r))`` without beta; operands in either
      order -- with ``r`` = ``rsqrt(var + eps)`` or ``Mul(gamma, rsqrt(var + eps))`` as above:
      TensorFlow's ``tf.nn.moments`` + ``tf.nn.batch_normalization`` (TF1 BERT's
      ``layer_norm``) as tf2onnx writes it; its gamma and beta become the scale and bias;
    * the whole chain becomes ``LayerNormalization(x, scale, bias, axis=-k, epsilon=eps)``;
      missing gamma / beta become ones / zeros of the normalised shape, and gamma / beta that
      broadcast (``[1, C]``, a scalar) are expanded to it. The new node keeps the name and
      provenance of the chain's last node (stamped by this pass) and writes its output value,
      so consumers and graph outputs keep their names; the chain's constants that nothing else
      reads are removed (initializers, and the ``Identity`` aliases in front of them).
    * ``LayerNormalization`` is opset 17: a graph below 17 with at least one match is raised to
      17 first (``onnx.version_converter``; never when nothing matches). With
      ``raise_opset=false`` (or ``PassContext.allow_opset_raise=False``) such a graph is left
      alone and noted.

    Preconditions (otherwise the chain is left alone; a chain that computes a variance of
    ``x - mean(x)`` gets a note saying why): default-domain nodes without subgraphs; both
    reductions (and every mean of ``x``) over the same constant axes with ``keepdims=1``, and
    those are the trailing axes ``[-k..-1]`` of ``x`` (of unknown rank: written as negative
    axes); the normalised dims static in ``x``'s shape, or else spelled out by the gamma / beta
    constant; ``eps`` a constant scalar added to the variance (not to the standard deviation
    after the ``Sqrt``; a chain without an ``Add`` has ``epsilon=0``); ``ReduceSum`` divided by
    exactly the number of reduced elements; ``x`` float32 or float16, and every value of the
    chain, ``eps`` and a folded gamma of that dtype (a trailing gamma / beta of another dtype
    stays outside, as above); no intermediate value used outside the chain (nor a graph
    output, nor read by a subgraph).
    Needs shapes. Exact: the kernel and the chain differ by float32 rounding (7e-7 relative on
    PP-OCRv4 rec, 4e-7 on all-MiniLM-L6-v2); against a float64 layer norm the kernel is as
    close as the chain, or closer when ``|mean|`` is large against the standard deviation.
    """

    name = "fuse-layernorm"
    exact = True
    requires = frozenset({"shapes"})
    guarantees = frozenset({"layernorm-fused"})

    @dataclass
    class Options:
        raise_opset: bool = True

    def pending(self, graph: Graph) -> int:
        """How many layer-norm chains this pass would fuse in ``graph`` (nothing is changed)."""
        infer_shapes(graph)
        return len(self._find(graph)[0])

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        infer_shapes(graph)
        matches, notes = self._find(graph)
        changed = False
        if matches and graph.opset < 17:
            refused = raise_opset_for_fusion(graph, ctx, allowed=self.options.raise_opset, opset=17,
                                             op="LayerNormalization", chains=f"{len(matches)} layer-norm chain(s)",
                                             who=self.name)
            if refused:
                for n in notes:
                    ctx.note(n)
                ctx.note(refused)
                return PassResult(changed=False, metrics={"fused": 0}, artifacts={"fused": []})
            changed = True
            infer_shapes(graph)
            matches, notes = self._find(graph)  # the graph was re-imported: new node objects
        for n in notes:
            ctx.note(n)
        fused = [self._rewrite(graph, m) for m in matches]
        if fused:
            ctx.note(f"fused {len(fused)} layer-norm chain(s) into LayerNormalization: {', '.join(fused[:10])}"
                     + (f" (+{len(fused) - 10} more)" if len(fused) > 10 else ""))
        return PassResult(changed=changed or bool(fused), metrics={"fused": len(fused)},
                          artifacts={"fused": fused})

    # ------------------------------------------------------------------------ matching
    def _find(self, g: Graph) -> tuple[list[_Match], list[str]]:
        matches: list[_Match] = []
        notes: list[str] = []
        taken: set[int] = set()
        for n in list(g.nodes):
            if n.op_type not in ("Div", "Mul", "Add") or not is_plain(n) or id(n) in taken or len(n.inputs) != 2:
                continue
            m, why = self._match_tf(g, n) if n.op_type == "Add" else self._match(g, n)
            if m is not None:
                if any(id(c) in taken for c in m.core):
                    continue
                taken.update(id(c) for c in m.core)
                matches.append(m)
            elif why is not None:
                msg = f"left alone the layer-norm-like chain at {n.op_type} '{n.name}': {why}"
                if msg not in notes:
                    notes.append(msg)
        return matches, notes

    def _match(self, g: Graph, n: Node) -> tuple[_Match | None, str | None]:
        orders = [(0, 1)] if n.op_type == "Div" else [(0, 1), (1, 0)]
        first_reason: str | None = None
        for di, oi in orders:
            d = _centered(n.inputs[di])
            if d is None:
                continue
            var = _find_variance(n.inputs[oi], d.x)
            if var is None:
                continue
            m, why = self._match_core(g, n, d, n.inputs[oi], var)
            if m is not None:
                return m, None
            first_reason = first_reason or why
        return None, first_reason

    def _match_core(self, g: Graph, n: Node, d: _Centered, other: Value,
                    var: tuple[Value, _Reduce, Node, _Centered]) -> tuple[_Match | None, str | None]:
        v, vred, sq, d2 = var
        core: list[Node] = [*d2.mean.nodes, d2.sub, *d.mean.nodes, d.sub, sq, *vred.nodes]
        # the denominator: Sqrt(var + eps) for Div, rsqrt(var + eps) [* gamma] for Mul
        if n.op_type == "Div":
            s = _sqrt_of(other)
            if s is None:
                return None, self._denominator_reason(other, v, "divisor", "Sqrt(variance + epsilon)")
            ve, den_nodes, folded_gamma = s[0], [s[1]], None
        else:
            f = _factor(other)
            if f is None:
                return None, self._denominator_reason(other, v, "factor", "1/Sqrt(variance + epsilon)")
            ve, den_nodes, folded_gamma = f
        return self._complete(g, d.x, n, core + den_nodes + [n], ve, var, [d.mean, d2.mean, vred],
                              folded_gamma)

    def _match_tf(self, g: Graph, n: Node) -> tuple[_Match | None, str | None]:
        """``Add(Mul(x, r), Sub(beta, Mul(mean_of(x), r)))`` or ``Add(Mul(x, r), Neg(Mul(mean_of(x),
        r)))`` (either operand order) with ``r = [gamma *] rsqrt(var + eps)``: TensorFlow's
        ``tf.nn.batch_normalization`` after ``tf.nn.moments``, as tf2onnx writes it."""
        first_reason: str | None = None
        for ai, ti in ((0, 1), (1, 0)):
            a = _producer(n.inputs[ai], "Mul")
            t = _producer(n.inputs[ti], "Sub", "Neg")
            if a is None or t is None or len(a.inputs) != 2:
                continue
            beta: tuple[np.ndarray, Value] | None = None
            if t.op_type == "Sub":
                if len(t.inputs) != 2:
                    continue
                bc = const_of(t.inputs[0])
                if bc is None:
                    continue
                beta, b_in = (bc, t.inputs[0]), t.inputs[1]
            else:
                b_in = _input(t, 0)
            b = _producer(b_in, "Mul")
            if b is None or len(b.inputs) != 2:
                continue
            for xi in (0, 1):
                x, r = a.inputs[xi], a.inputs[1 - xi]
                if r is None or x is r or not any(i is r for i in b.inputs):
                    continue
                mean_v = b.inputs[1] if b.inputs[0] is r else b.inputs[0]
                mred = _mean_of(mean_v)
                if mred is None or mred.src is not x:
                    continue
                var = _find_variance(r, x)
                if var is None:
                    continue
                v, vred, sq, d2 = var
                f = _factor(r)
                if f is None:
                    first_reason = first_reason or self._denominator_reason(
                        r, v, "factor", "1/Sqrt(variance + epsilon)")
                    continue
                ve, den_nodes, folded_gamma = f
                core = [*d2.mean.nodes, d2.sub, *mred.nodes, sq, *vred.nodes, *den_nodes, a, b, t, n]
                m, why = self._complete(g, x, n, core, ve, var, [mred, d2.mean, vred], folded_gamma,
                                        beta=beta, extend=False)
                if m is not None:
                    return m, None
                first_reason = first_reason or why
        return None, first_reason

    def _complete(self, g: Graph, x: Value, final: Node, core: list[Node], ve: Value,
                  var: tuple[Value, _Reduce, Node, _Centered], reds: list[_Reduce],
                  folded_gamma: tuple[np.ndarray, Value] | None, *,
                  beta: tuple[np.ndarray, Value] | None = None,
                  extend: bool = True) -> tuple[_Match | None, str | None]:
        """Check what every form has in common (``ve`` = what the square root is taken of,
        ``reds``: every reduction of the chain) and build the match."""
        v = var[0]
        core = list({id(c): c for c in core}.values())  # a mean shared by two Subs is listed once
        eps = 0.0
        if ve is not v:
            a = _producer(ve, "Add")
            if a is None or len(a.inputs) != 2 or not any(i is v for i in a.inputs):
                return None, "the square root is not taken of the variance plus a constant epsilon"
            e = a.inputs[1] if a.inputs[0] is v else a.inputs[0]
            ec = const_of(e)
            if ec is None or ec.size != 1 or ec.dtype.kind != "f":
                return None, f"epsilon '{e.name}' is not a constant scalar"
            if x.dtype is not None and ec.dtype != x.dtype:
                return None, f"epsilon is {ec.dtype}, the input is {x.dtype}"
            eps = float(np.asarray(ec).reshape(-1)[0])
            core.append(a)
        # types and axes
        if x.dtype not in _FLOATS:
            return None, f"input '{x.name}' has dtype {x.dtype} (float32 / float16 only)"
        rank = len(x.shape) if x.shape is not None else None
        if not all(rd.keepdims for rd in reds):
            return None, "a reduction has keepdims=0"
        if rank is None:
            if any(rd.axes == "all" or any(a >= 0 for a in rd.axes) for rd in reds):
                return None, f"the rank of input '{x.name}' is unknown and the reduction axes are not negative"
            axes = [sorted(set(rd.axes)) for rd in reds]
            trailing = list(range(-len(axes[0]), 0))
        else:
            axes = [_norm_axes(rd.axes, rank) for rd in reds]
            if any(a is None for a in axes):
                return None, f"reduction axes are out of range for a rank-{rank} input"
            trailing = list(range(rank - len(axes[0]), rank))
        where = f"a rank-{rank} input" if rank is not None else f"input '{x.name}' (rank unknown)"
        if any(a != axes[0] for a in axes):
            other = next(a for a in axes if a != axes[0])
            return None, f"mean and variance reduce over different axes ({axes[0]} vs {other}) of {where}"
        k = len(axes[0])
        if axes[0] != trailing:
            return None, (f"reduction axes {axes[0]} of {where} are not the trailing axes "
                          f"(LayerNormalization normalises [axis..-1])")
        norm_shape: tuple[int, ...] | None = None
        if rank is not None:
            tail = x.shape[rank - k:]
            if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t > 0 for t in tail):
                norm_shape = tuple(int(t) for t in tail)
        for nd in core:
            for o in nd.outputs:
                if o.dtype is not None and o.dtype != x.dtype:
                    return None, f"'{o.name}' ({nd.op_type}) has dtype {o.dtype}, the input {x.dtype}"
        m = _Match(x=x, k=k, eps=eps, core=core, final=final, rank=rank, norm_shape=norm_shape)
        for what, pv in (("scale", folded_gamma), ("offset", beta)):
            if pv is None:
                continue
            if m.norm_shape is None:
                m.norm_shape = _shape_from_param(pv[0], k)
            p = _param(pv[0], rank, k, m.norm_shape, x.dtype) if m.norm_shape else None
            if p is None:
                return None, (f"the folded {what} '{pv[1].name}' does not broadcast over the "
                              f"normalised dims only (or has another dtype)")
            if what == "scale":
                m.gamma, m.gamma_value = p, pv[1]
            else:
                m.beta, m.beta_value = p, pv[1]
        why = self._private(g, core, final)
        if why:
            return None, why
        if extend:
            self._extend(g, m)
        if m.norm_shape is None:
            return None, (f"the normalised dims of '{x.name}' are not static (and no gamma / beta "
                          f"constant gives them)")
        count = float(np.prod(m.norm_shape))
        for rd in reds:
            if rd.divisor is not None and not np.isclose(rd.divisor, count, rtol=1e-6, atol=0):
                return None, f"ReduceSum is divided by {rd.divisor:g}, not by the {count:g} reduced elements"
        core_ids = {id(c) for c in m.core}
        seen: set[int] = set()
        for nd in m.core:  # what the chain reads besides x and its own values: constants, aliases
            for i in nd.inputs:
                if (i is not None and i is not x and id(i) not in seen
                        and not (i.producer is not None and id(i.producer) in core_ids)):
                    seen.add(id(i))
                    m.consts.append(i)
        return m, None

    @staticmethod
    def _denominator_reason(other: Value, var: Value, what: str, want: str) -> str:
        p = _producer(other, "Add")
        if p is not None and any(_sqrt_of(i) is not None for i in p.inputs):
            return ("epsilon is added after the Sqrt (to the standard deviation), not to the variance; "
                    "LayerNormalization computes sqrt(variance + epsilon)")
        if p is not None and _rsqrt_of(other) is None and any(_rsqrt_of(i) is not None for i in p.inputs):
            return "epsilon is added after the reciprocal square root"
        return f"the {what} '{other.name}' is not {want} of the variance '{var.name}'"

    @staticmethod
    def _private(g: Graph, core: list[Node], final: Node) -> str | None:
        """Why the chain's intermediates are not private to it (None when they are)."""
        ids = {id(c) for c in core}
        for nd in core:
            if nd.graph is not g:
                return f"node '{nd.name}' is not in this graph"
            for o in nd.outputs:
                if has_implicit_uses(o):
                    return f"'{o.name}' ({nd.op_type}) is read by a subgraph"
                if nd is final:
                    continue
                if is_graph_output(g, o):
                    return f"intermediate '{o.name}' ({nd.op_type}) is a graph output"
                outside = [u.name for u in o.users if id(u) not in ids]
                if outside:
                    return (f"intermediate '{o.name}' ({nd.op_type}) is also used outside the chain "
                            f"(by '{outside[0]}')")
        return None

    @staticmethod
    def _sole_user(g: Graph, v: Value, op: str) -> tuple[Node, Value] | None:
        """The only user of ``v`` when it is a plain ``op`` with a constant other operand."""
        if is_graph_output(g, v) or has_implicit_uses(v) or len(v.uses) != 1:
            return None
        u = v.users[0]
        if u.op_type != op or not is_plain(u) or len(u.inputs) != 2 or len(u.outputs) != 1:
            return None
        other = u.inputs[1] if u.inputs[0] is v else u.inputs[0]
        if other is v or other is None or const_of(other) is None:
            return None
        return u, other

    def _extend(self, g: Graph, m: _Match) -> None:
        """Take a following ``Mul(gamma)`` and ``Add(beta)`` into the match (with the input's
        dims unknown, the first of them fixes the normalised shape)."""
        cur = m.final.outputs[0]
        for op in ("Mul", "Add"):
            if op == "Mul" and m.gamma is not None:
                continue
            hit = self._sole_user(g, cur, op)
            if hit is None:
                if op == "Mul":
                    continue
                return
            c = const_of(hit[1])
            ns = m.norm_shape or _shape_from_param(c, m.k)
            p = _param(c, m.rank, m.k, ns, m.x.dtype) if ns else None
            if p is None:
                if op == "Mul":
                    return  # an Add(beta) after an untaken Mul is not part of the chain
                continue
            m.norm_shape = ns
            if op == "Mul":
                m.gamma, m.gamma_value = p, hit[1]
            else:
                m.beta, m.beta_value = p, hit[1]
            m.core.append(hit[0])
            m.final, cur = hit[0], hit[0].outputs[0]

    # ------------------------------------------------------------------------ rewriting
    def _param_value(self, g: Graph, m: _Match, arr: np.ndarray | None, v: Value | None, fill: float,
                     suffix: str) -> Value:
        shape = tuple(m.norm_shape)
        if arr is None:
            arr = np.full(shape, fill, dtype=m.x.dtype)
        ids = {id(c) for c in m.core}
        if (v is not None and v.is_const and g.initializers.get(v.name) is v and v.const.shape == shape
                and all(id(u) in ids for u in v.users) and not is_graph_output(g, v)):
            return v  # already the right shape and read by this chain only: reuse it
        return g.add_initializer(f"{m.final.name}.{suffix}", np.ascontiguousarray(arr))

    def _rewrite(self, g: Graph, m: _Match) -> str:
        scale = self._param_value(g, m, m.gamma, m.gamma_value, 1.0, "scale")
        bias = self._param_value(g, m, m.beta, m.beta_value, 0.0, "bias")
        ln = rebuild_node(g, m.final, op_type="LayerNormalization", inputs=[m.x, scale, bias],
                          attrs={"axis": -m.k, "epsilon": m.eps}, attr_types={})
        self.changed(ln)
        rest = {id(c) for c in m.core if c is not m.final}
        for nd in reversed(list(g.nodes)):
            if id(nd) in rest:
                g.remove_node(nd)
        for c in m.consts:
            self._drop_if_unused(g, c)
        return ln.name

    @staticmethod
    def _drop_if_unused(g: Graph, v: Value | None) -> None:
        """Remove a constant the chain read once nothing else does: the initializer, and the
        ``Identity`` aliases in front of it (``const_of`` looks through them)."""
        while v is not None and not v.uses and not is_graph_output(g, v):
            p = v.producer
            if p is None:
                g.remove_initializer_if_unused(v)
                return
            if p.op_type != "Identity" or not is_plain(p) or len(p.outputs) != 1 or p.graph is not g:
                return
            g.remove_node(p)
            v = p.inputs[0] if p.inputs else None
