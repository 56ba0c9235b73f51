"""Physical channel removal: the rewriting half of structured pruning.

The channel-dependency analysis (:mod:`nnsculpt.ir.channel_deps`) says which channels live or
die together (dependency groups of units), which weight axis each channel space indexes
(:class:`~nnsculpt.ir.channel_deps.ParamSpec`) and, per node, the facts an update needs
(``ChannelDeps.info``: grouped conv, split axis, slice bounds, resize sizes). This module turns a
removal -- ``{group index: [unit, ...]}`` -- into graph rewrites:

* weights and other constants are sliced generically from the ParamSpecs;
* attributes / shape constants are rewritten by the per-op update functions of
  :data:`UPDATE_RULES` (``op_type -> update(rewriter, node)``: ``group``, ``Split`` sizes,
  ``Slice`` bounds, ``Reshape`` targets, ``Resize`` sizes); every op type listed there has a
  coupling rule in :data:`~nnsculpt.ir.channel_deps.CHANNEL_RULES`;
* value shapes shrink, and constant-folding chains and initializers nobody reads any more
  are dropped.

Public API::

    deps = channel_dependencies(graph, protect=["fc"])
    apply_channel_removal(graph, deps, {group_index: [unit, ...]})   # physical removal
    zero_channels(graph, deps, {group_index: [unit, ...]})           # soft pruning (zero them)
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...ir.channel_deps import ChannelDeps, ParamSpec, Space, const_value, shape_pieces
from ...ir.errors import IRError
from ...ir.graph import Graph, Node, mark_changed

__all__ = ["Rewriter", "UPDATE_RULES", "keep_masks", "apply_channel_removal", "zero_channels"]

#: provenance stamped on rewritten nodes and initializers
_PASS = "prune-channels"


# ==================================================================== masks and state
def keep_masks(deps: ChannelDeps, removal: dict[int, Any]) -> list[np.ndarray]:
    """Per space, a boolean keep mask over its flat channels, for ``removal``
    (``{group index: unit indices to remove}``)."""
    keep = np.ones(deps.n_channels, dtype=bool)
    for gi, units in removal.items():
        grp = deps.groups[gi]
        for u in units:
            keep[grp.units[int(u)]] = False
    return [keep[s.base:s.base + s.size] for s in deps.spaces]


def _axis_sets(s: Space, mask: np.ndarray) -> list[np.ndarray]:
    """Kept indices per logical component; the mask must be a Cartesian product."""
    m = mask.reshape(s.dims)
    sets = []
    for c in range(len(s.dims)):
        other = tuple(k for k in range(len(s.dims)) if k != c)
        sets.append(np.nonzero(m.any(axis=other) if other else m)[0])
    prod = np.ones(s.dims, dtype=bool)
    for c, st in enumerate(sets):
        sel = np.zeros(s.dims[c], dtype=bool)
        sel[st] = True
        shape = [1] * len(s.dims)
        shape[c] = s.dims[c]
        prod &= sel.reshape(shape)
    if not np.array_equal(prod, m):
        raise IRError(f"prune: the kept channels of '{s.name}' are not a product of per-axis sets")
    return sets


class Rewriter:
    """State of one removal: the analysis, the keep mask of every channel space, the nodes
    touched so far, and the helpers the per-op updates (:data:`UPDATE_RULES`) use."""

    def __init__(self, g: Graph, deps: ChannelDeps, masks: list[np.ndarray]):
        self.g = g
        self.deps = deps
        self.masks = masks
        self.touched: set[str] = set()
        self._sets: dict[int, list[np.ndarray]] = {}
        self.dead_candidates: list[Node] = []

    def remove_dead(self) -> None:
        """Drop constant-folding chains (Reshape / Cast of constants) our rewrites bypassed."""
        work = list(self.dead_candidates)
        while work:
            n = work.pop()
            if n.graph is not self.g or n.has_subgraphs:
                continue
            if any(o.uses or o in self.g.outputs for o in n.outputs):
                continue
            ins = [v for v in n.inputs if v is not None]
            self.g.remove_node(n)
            for v in ins:
                if v.producer is not None:
                    work.append(v.producer)
                elif self.g.initializers.get(v.name) is v and not v.uses and v not in self.g.outputs:
                    self.g.remove_initializer(v)

    def keep(self, s: Space) -> np.ndarray:
        return self.masks[s.index]

    def port(self, node: Node, kind: str, i: int) -> Space | None:
        return self.deps.ports.get(node.name, {}).get((kind, i))

    def axis_sets(self, s: Space) -> list[np.ndarray]:
        if s.index not in self._sets:
            self._sets[s.index] = _axis_sets(s, self.keep(s))
        return self._sets[s.index]

    def axis_counts(self, s: Space) -> list[int]:
        return [len(x) for x in self.axis_sets(s)]

    def set_const_input(self, node: Node, idx: int, arr: np.ndarray) -> None:
        """Give ``node`` input ``idx`` the array ``arr``: in place when only this node reads
        the initializer, else through a fresh initializer (copy on write)."""
        v = node.inputs[idx]
        arr = np.ascontiguousarray(arr)
        if v is not None and self.g.initializers.get(v.name) is v \
                and {id(n) for n, _ in v.uses} == {id(node)} and v not in self.g.outputs:
            v.set_const(arr)
            v.meta["pass"] = _PASS
            return
        base = v.name if v is not None else f"{node.name}.const"
        nv = self.g.add_initializer(base + "_pruned", arr)
        nv.meta["pass"] = _PASS
        node.set_input(idx, nv)
        if v is not None and v.producer is not None:
            self.dead_candidates.append(v.producer)


# ======================================================== per-op attribute / shape updates
def _update_conv_group(rw: Rewriter, node: Node) -> None:
    info = rw.deps.info.get(node.name, {})
    if not info.get("grouped"):
        return
    g = int(node.attrs.get("group", 1))
    o = rw.port(node, "out", 0)
    keep = rw.keep(o)
    n_keep = int(keep.sum())
    if n_keep == o.size:
        return
    new_g = n_keep * g // o.size
    if new_g * o.size != n_keep * g:
        raise IRError(f"prune: '{node.name}' would keep a partial group")
    node.attrs["group"] = int(new_g)
    rw.touched.add(node.name)


def _update_split(rw: Rewriter, node: Node) -> None:
    k = rw.deps.info.get(node.name, {}).get("split_axis")
    if k is None:
        return
    sizes = []
    changed = False
    for j, out in enumerate(node.outputs):
        o = rw.deps.space_of.get(out.name)
        n = int(rw.keep(o).sum()) if o is not None else 0
        if o is not None and n != o.size:
            changed = True
        sizes.append(n)
    if not changed:
        return
    if rw.g.opset >= 13:
        arr = np.asarray(sizes, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            rw.set_const_input(node, 1, arr)
        else:
            v = rw.g.add_initializer(f"{node.name}.split", arr)
            ins = list(node.inputs) + [None] * max(0, 2 - len(node.inputs))
            ins[1] = v
            node.set_inputs(ins)
        node.attrs.pop("num_outputs", None)
        node.attr_types.pop("num_outputs", None)
    else:
        node.attrs["split"] = sizes
    rw.touched.add(node.name)


def _update_slice(rw: Rewriter, node: Node) -> None:
    sl = rw.deps.info.get(node.name, {}).get("slice")
    if sl is None:
        return
    j, st, en = sl
    s = rw.port(node, "in", 0)
    keep = rw.keep(s)
    if keep.all():
        return
    nst = int(keep[:st].sum())
    nen = int(keep[:en].sum())
    for idx, val in ((1, nst), (2, nen)):
        arr = np.array(const_value(node.inputs[idx]), copy=True)
        arr.reshape(-1)[j] = val
        rw.set_const_input(node, idx, arr)
    rw.touched.add(node.name)


def _update_reshape(rw: Rewriter, node: Node) -> None:
    o = rw.deps.space_of.get(node.outputs[0].name)
    if o is None:
        return
    counts = rw.axis_counts(o)
    if all(c == d for c, d in zip(counts, o.dims)):
        return
    shp = node.inputs[1]
    allowzero = int(node.attrs.get("allowzero", 0))
    shp_c = const_value(shp)
    if shp_c is not None:
        arr = np.array(shp_c, copy=True).reshape(-1)
        for a, c in zip(o.axes, counts):
            e = int(arr[a])
            if e == -1:
                continue
            if e == 0 and not allowzero:
                s_in = rw.port(node, "in", 0)
                if a in s_in.axes and rw.axis_counts(s_in)[s_in.axes.index(a)] == c:
                    continue
            arr[a] = c
        rw.set_const_input(node, 1, arr.reshape(shp_c.shape))
        rw.touched.add(node.name)
        return
    pieces = shape_pieces(shp)
    if pieces is None:
        raise IRError(f"prune: reshape '{node.name}' has a dynamic target shape")
    cat, parts = pieces
    for a, c in zip(o.axes, counts):
        for idx, (v, off, ln) in enumerate(parts):
            if off <= a < off + ln:
                cv = const_value(v)
                arr = np.array(cv, copy=True).reshape(-1)
                if int(arr[a - off]) not in (-1,):
                    arr[a - off] = c
                    rw.set_const_input(cat, idx, arr.reshape(cv.shape))
                break
    rw.touched.add(node.name)


def _update_resize(rw: Rewriter, node: Node) -> None:
    info = rw.deps.info.get(node.name, {}).get("sizes_index")
    if not info:
        return
    s = rw.port(node, "in", 0)
    counts = rw.axis_counts(s)
    arr = np.array(const_value(node.inputs[3]), copy=True).reshape(-1)
    changed = False
    for a, k in info:
        c = counts[s.axes.index(a)]
        if arr[k] != c:
            arr[k] = c
            changed = True
    if changed:
        rw.set_const_input(node, 3, arr)
        rw.touched.add(node.name)


#: op_type -> update(rewriter, node): rewrites the attributes / shape constants of a node whose
#: channels changed (weights are sliced generically from the ParamSpecs). Ops not listed need
#: no update (their channel count follows from their inputs; Flatten / Squeeze / Unsqueeze
#: share the Reshape coupling rule but have no target shape to rewrite).
UPDATE_RULES: dict[str, Callable[[Rewriter, Node], None]] = {
    "Conv": _update_conv_group,
    "ConvTranspose": _update_conv_group,
    "Reshape": _update_reshape,
    "Split": _update_split,
    "Slice": _update_slice,
    "Resize": _update_resize,
}


# =========================================================================== rewriting
def _slice_param(rw: Rewriter, p: ParamSpec) -> None:
    v = p.node.inputs[p.input]
    arr = const_value(v)
    if arr is None:
        return
    s = p.space
    if p.component is None:
        idx = np.nonzero(rw.keep(s))[0]
    else:
        idx = rw.axis_sets(s)[p.component]
    if arr.shape[p.axis] == len(idx):
        return
    if p.component is None and arr.shape[p.axis] != s.size:
        raise IRError(f"prune: parameter '{v.name}' axis {p.axis} has {arr.shape[p.axis]} entries for "
                      f"{s.size} channels")
    rw.set_const_input(p.node, p.input, np.take(arr, idx, axis=p.axis))
    rw.touched.add(p.node.name)


def apply_channel_removal(g: Graph, deps: ChannelDeps, removal: dict[int, Any]) -> dict[str, Any]:
    """Physically remove the ``removal`` units (``{group index: [unit, ...]}``) from ``g``:
    weights sliced, attributes / shape constants updated, value shapes updated, unused
    initializers dropped. Returns a summary."""
    for gi in removal:
        if not deps.groups[gi].prunable:
            raise IRError(f"prune: group {gi} is not prunable ({deps.groups[gi].reason})")
    masks = keep_masks(deps, removal)
    rw = Rewriter(g, deps, masks)
    changed_spaces = [s for s in deps.spaces if not masks[s.index].all()]
    for s in changed_spaces:
        rw.axis_sets(s)  # validate product structure before touching anything
    old_inits = set(g.initializers)
    nodes_with_change = set()
    for p in deps.params:
        if not masks[p.space.index].all():
            nodes_with_change.add(p.node.name)
    for s in changed_spaces:
        for n, _ in s.value.uses:
            nodes_with_change.add(n.name)
        if s.value.producer is not None:
            nodes_with_change.add(s.value.producer.name)
    for p in deps.params:
        if p.node.name in nodes_with_change:
            _slice_param(rw, p)
    for node in list(g.nodes):
        if node.name not in nodes_with_change:
            continue
        update = UPDATE_RULES.get(node.op_type)
        if update is not None:
            update(rw, node)
    # value shapes
    for s in changed_spaces:
        v = s.value
        if v.shape is None:
            continue
        shape = list(v.shape)
        for a, c in zip(s.axes, rw.axis_counts(s)):
            shape[a] = int(c)
        v.shape = tuple(shape)
        if v.producer is not None:
            rw.touched.add(v.producer.name)
    rw.remove_dead()
    for node in g.nodes:
        if node.name in rw.touched:
            mark_changed(node, _PASS)
    for name in sorted(set(g.initializers) & old_inits):
        v = g.initializers[name]
        if not v.uses and v not in g.outputs:
            g.remove_initializer(v)
    g.invalidate()
    removed = int(sum((~m).sum() for m in masks))
    return {"removed_channel_entries": removed, "changed_nodes": sorted(rw.touched)}


def zero_channels(g: Graph, deps: ChannelDeps, removal: dict[int, Any]) -> int:
    """Soft pruning: set every parameter that *produces* the removed channels to zero (filters,
    biases, normalization scale and shift, additive constants), so that the channels compute
    exactly 0 where the downstream ops map 0 to 0. Shapes are unchanged. Returns the number
    of parameters zeroed."""
    masks = keep_masks(deps, removal)
    rw = Rewriter(g, deps, masks)
    zeroed = 0
    for p in deps.params:
        if p.kind not in ("out", "norm", "shift"):
            continue
        m = masks[p.space.index]
        if m.all():
            continue
        v = p.node.inputs[p.input]
        cv = const_value(v)
        if cv is None:
            continue
        if p.component is None:
            drop = np.nonzero(~m)[0]
        else:
            kept = rw.axis_sets(p.space)[p.component]
            sel = np.ones(p.space.dims[p.component], dtype=bool)
            sel[kept] = False
            drop = np.nonzero(sel)[0]
        arr = np.array(cv, copy=True)
        idx = [slice(None)] * arr.ndim
        idx[p.axis] = drop
        zeroed += int(np.count_nonzero(arr[tuple(idx)]))
        arr[tuple(idx)] = 0
        rw.set_const_input(p.node, p.input, arr)
        mark_changed(p.node, _PASS)
    rw.remove_dead()
    g.invalidate()
    return zeroed
