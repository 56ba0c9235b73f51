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
  ``sqrt(sum of dropped sigma^2 / sum(sigma^2))``, is ``<= t`` (``0 <= t < 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, Node, Value, mark_changed
from ._util import const_of, is_default_domain, is_plain
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


def parse_rank_options(pass_name: str, o: RankOptions) -> RankRule:
    """Check the rank options of ``o`` (exactly one given, each in range) and return the rule;
    a :class:`PassOptionError` names the pass and the option otherwise."""

    def bad(opt: str, why: str) -> PassOptionError:
        return PassOptionError(f"pass '{pass_name}': option '{opt}' has bad value {getattr(o, opt)!r}: {why}")

    given = [k for k in ("rank", "rank_ratio", "energy", "max_error") if getattr(o, k) not in (None, "")]
    if not given:
        raise PassOptionError(f"pass '{pass_name}': give one of the options 'rank', 'rank_ratio', 'energy' or "
                              f"'max_error' (e.g. {pass_name}{{rank_ratio=0.5}})")
    if len(given) > 1:
        raise PassOptionError(f"pass '{pass_name}': options {' and '.join(repr(k) for k in given)} exclude each "
                              f"other: give only one")
    k = given[0]
    if k == "rank":
        s = str(o.rank).strip().lower()
        if s == "full":
            return RankRule("full")
        if s == "auto":
            raise bad("rank", "rank=auto (ranks under a budget) is not implemented yet; give N, full, "
                              "rank_ratio=, energy= or max_error=")
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
