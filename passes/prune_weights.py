"""Unstructured / N:M magnitude pruning of Conv, Gemm and MatMul weights."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, Node, Value
from ._util import exactly_one_option
from .base import Pass, PassContext, PassResult, register

#: ops whose constant weight this pass prunes
PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class _Layer:
    """One prunable weight and the nodes that read it."""

    weight: Value
    nodes: list[Node]
    op: str
    axis: int  # the input / reduction axis of the weight (where N:M groups run)


@register
class PruneWeights(Pass):
    """Magnitude-prune Conv/Gemm/MatMul weights to exact zeros (threshold, sparsity ratio or N:M).

    Rewrite rules (weights are rewritten in place; names, shapes and nodes are unchanged):

    * ``sparsity=s`` with ``scope=layer``: in every selected weight of ``n`` elements the
      ``round(s * n)`` smallest magnitudes become exactly ``0.0`` (ties broken by position);
    * ``sparsity=s`` with ``scope=global``: the ``round(s * N)`` smallest magnitudes over the
      ``N`` elements of all selected weights together become ``0.0`` (layers end up with
      different sparsities; a layer pruned above 99 % is noted);
    * ``threshold=t``: every weight with ``|w| < t`` becomes ``0.0``; with
      ``threshold_mode=std`` the threshold is ``t * std(w)`` per layer (``scope=layer``) or
      ``t * std`` over all selected weights (``scope=global``), as in Han et al. 2015;
    * ``pattern=N:M`` (e.g. ``2:4``, ``4:8``): along the input / reduction dimension of the
      weight, every group of ``M`` consecutive elements keeps its ``N`` largest magnitudes
      (the layout sparse tensor cores use). The reduction axis is: Conv ``W[Cout, Cin/g, k...]``
      axis 1 (input channels, per output channel and kernel position); MatMul ``X @ W`` axis 0,
      ``W @ X`` axis 1; Gemm ``B`` axis 0 (``transB=1``: axis 1), ``A`` (when it is the constant)
      axis 1 (``transA=1``: axis 0). A layer whose reduction size is not a multiple of ``M``
      is left alone and noted.

    Selection: default-domain nodes of ``ops`` whose weight is a floating-point initializer
    (2-D for Gemm/MatMul, the other operand not constant). Skipped, with a note: weights
    matching ``exclude`` (fnmatch patterns tested against the node name, its provenance
    ``source`` and the weight name), weights with fewer than ``min_params`` elements,
    weights also read by other ops or by an excluded node, weights that are graph outputs.
    Biases are never pruned.

    Masks: pruned weights are exactly ``0.0``, which is the mask other tools keep (the
    distillation engine holds exact zeros at zero). ``graph.meta["sparsity"]`` records, per
    layer (node name): weight name, op, shape, reduction axis, params, zeros, sparsity,
    the rule used and the mask packed with ``np.packbits`` (see :func:`layer_mask`); plus
    totals. The same summary lands in ``ctx.extra["sparsity"]`` and one note per layer.

    Preconditions: none beyond a verified graph. Exactly one of ``sparsity``, ``threshold``
    and ``pattern`` must be given. Not exact: outputs change (drift is reported).
    """

    name = "prune-weights"
    drift_hint = "a lower sparsity, or recover with `nnsculpt distill --teacher INPUT`"
    exact = False

    @dataclass
    class Options:
        # typing.Optional, not ``float | None``: base.coerce_value recognises typing.Union only
        sparsity: Optional[float] = None
        threshold: Optional[float] = None
        pattern: str = ""
        scope: Literal["layer", "global"] = "layer"
        threshold_mode: Literal["abs", "std"] = "abs"
        exclude: list[str] = field(default_factory=list)
        min_params: int = 0
        ops: list[str] = field(default_factory=lambda: list(PRUNABLE_OPS))

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options

        def bad(opt: str, why: str) -> PassOptionError:
            return PassOptionError(f"pass '{self.name}': option '{opt}' has bad value "
                                   f"{getattr(o, opt)!r}: {why}")

        exactly_one_option(self.name, o, ("sparsity", "threshold", "pattern"), "prune-weights{sparsity=0.9}")
        if o.sparsity is not None and not (0.0 <= o.sparsity < 1.0):
            raise bad("sparsity", "must be in [0, 1)")
        if o.threshold is not None and o.threshold < 0:
            raise bad("threshold", "must be >= 0")
        self.nm: tuple[int, int] | None = None
        if o.pattern:
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", o.pattern)
            if not m:
                raise bad("pattern", "expected N:M such as 2:4 or 4:8")
            n, mm = int(m.group(1)), int(m.group(2))
            if not (1 <= n < mm):
                raise bad("pattern", f"N:M needs 1 <= N < M (keep N of every M), got N={n}, M={mm}")
            if o.scope == "global":
                raise bad("scope", "scope=global has no meaning with pattern= (N:M holds per group)")
            self.nm = (n, mm)
        if o.threshold_mode == "std" and o.threshold is None:
            raise bad("threshold_mode", "threshold_mode=std needs threshold=")
        if o.min_params < 0:
            raise bad("min_params", "must be >= 0")
        unknown = [op for op in o.ops if op not in PRUNABLE_OPS]
        if unknown or not o.ops:
            raise bad("ops", f"each must be one of {', '.join(PRUNABLE_OPS)}")

    # ------------------------------------------------------------------------ run
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        layers = self._select(graph, ctx)
        if not layers:
            ctx.note("no prunable weight found")
            return PassResult(changed=False)
        o = self.options
        weights = [np.asarray(l.weight.const) for l in layers]
        if self.nm is not None:
            masks, rule = self._masks_nm(layers, weights, ctx)
        elif o.sparsity is not None:
            masks, rule = self._masks_sparsity(weights), f"sparsity={o.sparsity:g} scope={o.scope}"
        else:
            masks, rule = self._masks_threshold(weights), \
                f"threshold={o.threshold:g} mode={o.threshold_mode} scope={o.scope}"

        record = graph.meta.setdefault("sparsity", {"layers": {}, "total": {}})
        changed = False
        for layer, w, mask in zip(layers, weights, masks):
            if mask is None:
                continue
            new = np.where(mask, w, np.zeros((), dtype=w.dtype)).astype(w.dtype, copy=False)
            if bool(np.any(w[~mask] != 0)):
                layer.weight.set_const(new)
                layer.weight.meta["pass"] = self.name
                for node in layer.nodes:
                    self.changed(node)
                changed = True
            zeros = int(new.size - np.count_nonzero(new))
            frac = zeros / new.size if new.size else 0.0
            for node in layer.nodes:
                record["layers"][node.name] = {
                    "weight": layer.weight.name, "op": layer.op, "source": node.source,
                    "shape": list(new.shape), "reduction_axis": layer.axis,
                    "params": int(new.size), "zeros": zeros, "sparsity": frac, "rule": rule,
                    "mask": np.packbits((new != 0).ravel()),
                }
            ctx.note(f"{'/'.join(n.name for n in layer.nodes)} ({layer.op} {'x'.join(map(str, new.shape))}): "
                     f"{zeros}/{new.size} zero ({frac:.1%})")
            if o.scope == "global" and frac > 0.99:
                ctx.note(f"{layer.nodes[0].name}: pruned to {frac:.1%} by the global ranking")
        total_p = sum(int(v["params"]) for v in _unique_weights(record["layers"]).values())
        total_z = sum(int(v["zeros"]) for v in _unique_weights(record["layers"]).values())
        record["total"] = {"params": total_p, "zeros": total_z,
                           "sparsity": total_z / total_p if total_p else 0.0, "rule": rule}
        ctx.note(f"total: {total_z}/{total_p} pruned weights zero ({record['total']['sparsity']:.1%}), rule {rule}")
        summary = {"layers": {k: {kk: vv for kk, vv in v.items() if kk != "mask"} for k, v in record["layers"].items()},
                   "total": dict(record["total"])}
        return PassResult(changed=changed, artifacts={"sparsity": summary},
                          metrics={"sparsity": record["total"]["sparsity"], "zeros": total_z, "params": total_p})

    # ----------------------------------------------------------------- selection
    def _select(self, g: Graph, ctx: PassContext) -> list[_Layer]:
        o = self.options
        by_weight: dict[int, _Layer] = {}
        order: list[int] = []
        for node in g.nodes:
            if node.op_type not in o.ops or node.domain not in ("", "ai.onnx"):
                continue
            found = _weight_of(node)
            if found is None:
                continue
            w, axis = found
            key = id(w)
            if key not in by_weight:
                by_weight[key] = _Layer(w, [node], node.op_type, axis)
                order.append(key)
            else:
                lay = by_weight[key]
                lay.nodes.append(node)
                if lay.axis != axis:
                    lay.axis = -1  # read along different axes: only unstructured pruning applies
        out = []
        for key in order:
            lay = by_weight[key]
            w = lay.weight
            names = [lay.weight.name] + [n.name for n in lay.nodes] + [n.source for n in lay.nodes]
            hit = next((p for p in o.exclude for s in names if fnmatch.fnmatchcase(s, p)), None)
            if hit is not None:
                ctx.note(f"left {lay.nodes[0].name} alone: excluded by '{hit}'")
                continue
            if w.const.size < o.min_params:
                ctx.note(f"left {lay.nodes[0].name} alone: {w.const.size} params < min_params={o.min_params}")
                continue
            other = [n.name for n in w.users if not any(n is m for m in lay.nodes)]
            if other or any(idx == -1 for _, idx in w.uses):
                ctx.note(f"left {lay.nodes[0].name} alone: weight '{w.name}' is also read by "
                         f"{other or ['a subgraph']}")
                continue
            if any(v is w for v in g.outputs) or g.initializers.get(w.name) is not w:
                ctx.note(f"left {lay.nodes[0].name} alone: weight '{w.name}' is a graph output "
                         f"or not a registered initializer")
                continue
            out.append(lay)
        return out

    # --------------------------------------------------------------------- masks
    def _masks_sparsity(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        s = float(self.options.sparsity)
        mags = [np.abs(w.astype(np.float64, copy=False)).ravel() for w in weights]
        if self.options.scope == "layer":
            return [_keep_largest(m, int(round(s * m.size))).reshape(w.shape) for m, w in zip(mags, weights)]
        allm = np.concatenate(mags) if mags else np.zeros(0)
        keep = _keep_largest(allm, int(round(s * allm.size)))
        out, pos = [], 0
        for w in weights:
            out.append(keep[pos:pos + w.size].reshape(w.shape))
            pos += w.size
        return out

    def _masks_threshold(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        o = self.options
        t = float(o.threshold)
        if o.threshold_mode == "std":
            if o.scope == "global":
                allw = np.concatenate([w.astype(np.float64).ravel() for w in weights])
                ts = [t * float(allw.std())] * len(weights)
            else:
                ts = [t * float(w.astype(np.float64).std()) for w in weights]
        else:
            ts = [t] * len(weights)
        return [np.abs(w.astype(np.float64, copy=False)) >= ti for w, ti in zip(weights, ts)]

    def _masks_nm(self, layers: list[_Layer], weights: list[np.ndarray], ctx: PassContext):
        n, m = self.nm
        out: list[np.ndarray | None] = []
        for lay, w in zip(layers, weights):
            name = lay.nodes[0].name
            if lay.axis < 0:
                ctx.note(f"left {name} alone: its weight is read along different reduction axes")
                out.append(None)
                continue
            k = w.shape[lay.axis]
            if k % m:
                ctx.note(f"left {name} alone: reduction size {k} (axis {lay.axis}) is not a multiple of M={m}")
                out.append(None)
                continue
            out.append(nm_mask(w, n, m, lay.axis))
        return out, f"pattern={n}:{m}"


# ------------------------------------------------------------------------- helpers
def _weight_of(node: Node) -> tuple[Value, int] | None:
    """The constant float weight of a Conv/Gemm/MatMul and its reduction axis, or None."""
    ins = node.inputs

    def const(i: int) -> Value | None:
        v = ins[i] if i < len(ins) else None
        if v is None or not v.is_const or v.const.dtype.kind != "f":
            return None
        return v

    if node.op_type == "Conv":
        w = const(1)
        if w is None or w.const.ndim < 3 or (ins[0] is not None and ins[0].is_const):
            return None
        return w, 1
    if node.op_type in ("Gemm", "MatMul"):
        a, b = const(0), const(1)
        if (a is None) == (b is None):  # no weight, or both constant (a folding job)
            return None
        w = a if a is not None else b
        if w.const.ndim != 2:
            return None
        if node.op_type == "MatMul":
            return (w, 0) if w is b else (w, 1)
        if w is b:
            return w, 1 if int(node.attrs.get("transB", 0)) else 0
        return w, 0 if int(node.attrs.get("transA", 0)) else 1
    return None


def _keep_largest(mag: np.ndarray, n_prune: int) -> np.ndarray:
    """Boolean keep-mask of a 1-D magnitude array with exactly ``n_prune`` False entries:
    the smallest magnitudes, ties broken by position (stable)."""
    keep = np.ones(mag.size, dtype=bool)
    n_prune = max(0, min(int(n_prune), mag.size))
    if n_prune == 0:
        return keep
    if n_prune == mag.size:
        keep[:] = False
        return keep
    order = np.argsort(mag, kind="stable")
    keep[order[:n_prune]] = False
    return keep


def nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with at most ``n`` nonzeros in every group of ``m`` consecutive elements
    along ``axis`` (the ``n`` largest magnitudes; ties broken by position)."""
    moved = np.moveaxis(np.abs(w.astype(np.float64, copy=False)), axis, -1)
    shape = moved.shape
    groups = moved.reshape(-1, m)
    # stable sort of -|w|: largest first, earlier position first among equals
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(shape), -1, axis)


def _unique_weights(layers: dict) -> dict:
    out = {}
    for entry in layers.values():
        out.setdefault(entry["weight"], entry)
    return out


def layer_mask(graph: Graph, layer: str) -> np.ndarray:
    """The keep-mask (bool, weight-shaped) recorded by ``prune-weights`` for node ``layer``."""
    entry = graph.meta["sparsity"]["layers"][layer]
    shape = tuple(entry["shape"])
    n = int(np.prod(shape)) if shape else 1
    return np.unpackbits(entry["mask"], count=n).astype(bool).reshape(shape)
