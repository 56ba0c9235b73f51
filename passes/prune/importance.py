"""Importance criteria for ``prune-channels``: one score per unit of every prunable group.

Every criterion first scores *elements* of the channel spaces through the
:class:`~nnsculpt.ir.channel_deps.ParamSpec` s of the dependency analysis (which weight axis is
indexed by which channel space), then sums a unit's elements per parameter, normalizes each
parameter's vector by its mean (so a wide layer does not drown a narrow one), reduces over
the coupled parameters of the group (``mean`` or ``sum``) and finally divides by the group
mean so that scores of different groups are comparable (global ranking).

* ``l1`` / ``l2`` -- filter norms (Li et al. 2017): ``sum |W[c]|^p`` over the weights that
  *produce* the channel (conv filters, linear rows, embedding columns) and the normalization
  scales; with ``consumers`` also the next layers' input slices (DepGraph's group norm).
  A channel whose producing weights are all zero scores exactly 0.
* ``bn_gamma`` -- network slimming (Liu et al. 2017): ``|gamma|`` of the normalization layers
  in the group (groups without one fall back to ``l2``); scores are not mean-normalized across
  groups (slimming compares raw gammas globally).
* ``taylor`` -- first-order Taylor (Molchanov et al. 2017/2019): ``sum |w * dL/dw|`` over the
  group's producing parameters (and biases / norm shifts), gradients from the torch lowering
  (:func:`nnsculpt.runtime.to_torch`) on the calibration data; the loss is cross entropy against
  ``labels`` when given, else against the model's own predictions (classification outputs),
  else ``0.5 * mean(y^2)``.
* ``activation`` -- mean ``|a|`` of the channel's activations, ``apoz`` -- ``1 - APoZ`` (Hu et
  al. 2016: average percentage of zeros, here of ``a <= 0``), both measured on the values the
  group's consumers read, run by ONNX Runtime with those values exposed as extra outputs.
* ``random`` -- uniform random scores (a baseline), seeded.

The data-driven criteria take ``calib`` dense (``dict[str, ndarray]``) or ragged
(``dict[str, list[ndarray]]``, elements of different spatial sizes; see
:mod:`nnsculpt.runtime.ort`); ``max_samples`` counts samples over all elements
(:func:`~nnsculpt.runtime.ort.take_samples`), and ``labels`` run along the samples in element order.
"""

from __future__ import annotations

import logging

import numpy as np

from ...ir.channel_deps import ChannelDeps, DepGroup, ParamSpec, const_value
from ...ir.graph import Graph

log = logging.getLogger("nnsculpt.passes")

CRITERIA = ("l1", "l2", "bn_gamma", "taylor", "activation", "apoz", "random")
DATA_DRIVEN = frozenset({"taylor", "activation", "apoz"})


# ------------------------------------------------------------------------- indexing
def unit_index(deps: ChannelDeps, grp: DepGroup, space_index: int) -> np.ndarray:
    """``(n_units, k)`` local indices of every unit's elements in space ``space_index``."""
    cache = deps.__dict__.setdefault("_unit_index", {})
    key = (grp.index, space_index)
    if key not in cache:
        s = deps.spaces[space_index]
        rows = []
        for u in grp.units:
            sel = u[(u >= s.base) & (u < s.base + s.size)] - s.base
            rows.append(sel)
        k = max(len(r) for r in rows)
        if any(len(r) != k for r in rows):  # cannot happen for a well-formed group
            mat = np.full((len(rows), k), -1, dtype=np.int64)
            for i, r in enumerate(rows):
                mat[i, :len(r)] = r
        else:
            mat = np.stack(rows).astype(np.int64)
        cache[key] = mat
    return cache[key]


def _unit_sum(deps: ChannelDeps, grp: DepGroup, space_index: int, elem: np.ndarray) -> np.ndarray:
    idx = unit_index(deps, grp, space_index)
    vals = np.where(idx >= 0, elem[np.clip(idx, 0, None)], 0.0)
    return vals.sum(axis=1)


def _specs_by_group(deps: ChannelDeps, kinds: set[str]) -> dict[int, list[ParamSpec]]:
    where: dict[int, list[int]] = {}
    for g in deps.groups:
        if g.prunable:
            for si in g.spaces:
                where.setdefault(si, []).append(g.index)
    out: dict[int, list[ParamSpec]] = {}
    for p in deps.params:
        if p.kind not in kinds or p.component is not None:
            continue
        for gi in where.get(p.space.index, ()):
            out.setdefault(gi, []).append(p)
    return out


def _elem_norms(arr: np.ndarray, axis: int, p: float) -> np.ndarray:
    m = np.moveaxis(np.asarray(arr, dtype=np.float64), axis, 0).reshape(arr.shape[axis], -1)
    return (np.abs(m) ** p).sum(axis=1)


def _normalize(v: np.ndarray) -> np.ndarray:
    m = float(np.mean(v)) if v.size else 0.0
    return v / m if m > 0 and np.isfinite(m) else v


def _reduce(vectors: list[np.ndarray], reduction: str) -> np.ndarray:
    stack = np.stack(vectors)
    return stack.sum(axis=0) if reduction == "sum" else stack.mean(axis=0)


# ------------------------------------------------------------------------- criteria
def _from_specs(deps: ChannelDeps, groups: list[DepGroup], kinds: set[str], elem_fn, reduction: str,
                normalize_specs: bool = True) -> dict[int, np.ndarray]:
    by_group = _specs_by_group(deps, kinds)
    out: dict[int, np.ndarray] = {}
    cache: dict[int, np.ndarray | None] = {}
    for grp in groups:
        vecs = []
        for p in by_group.get(grp.index, []):
            key = id(p)
            if key not in cache:
                cache[key] = elem_fn(p)
            elem = cache[key]
            if elem is None or elem.shape[0] != p.space.size:
                continue
            v = _unit_sum(deps, grp, p.space.index, elem)
            vecs.append(_normalize(v) if normalize_specs else v)
        if vecs:
            out[grp.index] = _reduce(vecs, reduction)
    return out


def magnitude(deps: ChannelDeps, groups: list[DepGroup], p: float, reduction: str, consumers: bool):
    kinds = {"out", "norm"} | ({"in"} if consumers else set())

    def elem(spec: ParamSpec):
        arr = const_value(spec.node.inputs[spec.input])
        return None if arr is None else _elem_norms(arr, spec.axis, p)

    return _from_specs(deps, groups, kinds, elem, reduction)


def bn_gamma(deps: ChannelDeps, groups: list[DepGroup], reduction: str):
    def elem(spec: ParamSpec):
        arr = const_value(spec.node.inputs[spec.input])
        return None if arr is None else _elem_norms(arr, spec.axis, 1.0)

    return _from_specs(deps, groups, {"norm"}, elem, reduction, normalize_specs=False)


def taylor(deps: ChannelDeps, groups: list[DepGroup], graph: Graph, calib: dict[str, np.ndarray], *,
           labels=None, reduction: str = "mean", consumers: bool = False, max_samples: int = 256,
           batch_size: int = 32):
    prods = taylor_products(graph, calib, labels=labels, max_samples=max_samples, batch_size=batch_size)
    kinds = {"out", "norm", "shift"} | ({"in"} if consumers else set())

    def elem(spec: ParamSpec):
        v = spec.node.inputs[spec.input]
        pr = prods.get(v.name) if v is not None else None
        if pr is None:
            return None
        return _elem_norms(pr, spec.axis, 1.0)

    return _from_specs(deps, groups, kinds, elem, reduction)


def taylor_products(graph: Graph, calib: dict[str, np.ndarray], *, labels=None, max_samples: int = 256,
                    batch_size: int = 32, stat: str = "taylor") -> dict[str, np.ndarray]:
    """``|w * dL/dw|`` (``stat="taylor"``) or ``(dL/dw)^2`` (``stat="fisher"``, the empirical Fisher
    diagonal of sensitive k-means) accumulated over the calibration batches, per initializer (in the
    initializer's layout). Gradients come from the torch lowering of the graph."""
    import torch
    import torch.nn.functional as F

    from ...runtime.torch_lowering import PARAM_MAP_ATTR, to_torch

    module = to_torch(graph)
    module.eval()
    pmap = getattr(module, PARAM_MAP_ATTR)
    params = dict(module.named_parameters(remove_duplicate=False))
    for t in params.values():
        t.grad = None
    names = [v.name for v in graph.inputs]
    lab = None if labels is None else np.asarray(labels)
    fisher: dict[int, "torch.Tensor"] = {}
    for s, chunk in _chunks(calib, names, max_samples, batch_size):
        xs = [torch.as_tensor(np.ascontiguousarray(chunk[k])) for k in names]
        out = module(*xs)
        y = out[0] if isinstance(out, (tuple, list)) else out
        if y.dim() == 2 and y.is_floating_point() and y.shape[1] > 1:
            target = (torch.as_tensor(lab[s:s + y.shape[0]]).long() if lab is not None
                      else y.detach().argmax(1))
            loss = F.cross_entropy(y, target, reduction="sum")
        else:
            loss = 0.5 * (y.float() ** 2).mean() * y.shape[0]
        loss.backward()
        if stat == "fisher":
            for t in params.values():
                if t.grad is not None:
                    fisher[id(t)] = fisher.get(id(t), 0) + t.grad.detach().double() ** 2
                    t.grad = None
    prods: dict[str, np.ndarray] = {}
    for qual, bind in pmap.items():
        t = params.get(qual)
        if t is None or bind.kind != "parameter" or (t.grad is None and id(t) not in fisher):
            continue
        init = graph.initializers.get(bind.initializer)
        if init is None:
            continue
        if stat == "fisher":
            # the squared gradient w.r.t. the initializer: transforms are transposes / reshapes / a scale
            # s (d/dinit = s * d/dtorch), so undo the layout and multiply by s^2
            g2 = fisher[id(t)].cpu().numpy()
            scale = float(np.prod([st[1] for st in bind.transforms if st[0] == "scale"] or [1.0]))
            arr = bind.to_initializer(g2, tuple(init.const.shape), undo_scale=False) * scale ** 2
            prods[bind.initializer] = prods.get(bind.initializer, 0) + arr
            continue
        w = t.detach().cpu().numpy().astype(np.float64)
        g = t.grad.detach().cpu().numpy().astype(np.float64)
        prod = w * g
        # back to the initializer layout (scales cancel in w * g)
        prod = bind.to_initializer(prod, tuple(init.const.shape), undo_scale=False)
        prods[bind.initializer] = prods.get(bind.initializer, 0) + np.abs(prod)
    return prods


def _chunks(calib, names: list[str], max_samples: int, batch_size: int):
    """``(offset, {name: rows})`` of the first ``max_samples`` samples in chunks of at most
    ``batch_size`` rows; ``offset`` is the chunk's first sample (over all elements)."""
    from ...runtime.ort import is_ragged, iter_elements, num_samples, take_samples

    data = {k: calib[k] for k in names}
    if not is_ragged(data):  # dense: exactly the slicing it always had
        n = min(min(len(calib[k]) for k in names), max_samples)
        for s in range(0, n, batch_size):
            yield s, {k: calib[k][s:s + batch_size] for k in names}
        return
    offset = 0
    for el in iter_elements(take_samples(data, max_samples)):
        c = num_samples(el)
        for s in range(0, c, batch_size):
            yield offset + s, {k: el[k][s:s + batch_size] for k in names}
        offset += c


def activation(deps: ChannelDeps, groups: list[DepGroup], graph: Graph, calib: dict[str, np.ndarray], *,
               stat: str = "mean", reduction: str = "mean", max_samples: int = 256, batch_size: int = 32):
    """Activation statistics on the values read by the group's consumers (fallback: every
    space of the group), measured with ONNX Runtime."""
    from ...ir.onnx_io import to_onnx_model
    from ...runtime.ort import feed_batches, session, take_samples

    # which spaces to measure per group
    consumer_spaces: dict[int, set[int]] = {}
    for p in deps.params:
        if p.kind == "in":
            consumer_spaces.setdefault(p.space.index, set())
    want: dict[int, list[int]] = {}
    for grp in groups:
        sel = [si for si in grp.spaces if si in consumer_spaces]
        if not sel:
            sel = list(grp.spaces)
        want[grp.index] = sel
    needed = sorted({si for v in want.values() for si in v})
    g2 = graph.copy()
    out_names = []
    existing = {o.name for o in g2.outputs}
    for si in needed:
        name = deps.spaces[si].value.name
        v = g2.values.get(name)
        if v is None:
            continue
        if name not in existing:
            g2.outputs.append(v)
        out_names.append(name)
    sess = session(to_onnx_model(g2, check=False), threads=1)
    names = [i.name for i in sess.get_inputs()]
    acc: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for feed in feed_batches(sess, take_samples({k: calib[k] for k in names}, max_samples), batch_size):
        res = sess.run(out_names, feed)
        for name, arr in zip(out_names, res):
            sp = deps.space_of[name]
            a = np.asarray(arr, dtype=np.float64)
            other = tuple(k for k in range(a.ndim) if k not in sp.axes)
            if stat == "apoz":
                val = (a <= 0).sum(axis=other)
            else:
                val = np.abs(a).sum(axis=other)
            # bring the remaining axes into the space's logical order
            rem = [k for k in range(a.ndim) if k in sp.axes]
            val = np.transpose(val, [rem.index(k) for k in sp.axes]).reshape(-1)
            acc[name] = acc.get(name, 0) + val
            count[name] = count.get(name, 0) + int(np.prod([a.shape[k] for k in other]))
    elem = {k: acc[k] / max(1, count[k]) for k in acc}
    if stat == "apoz":
        elem = {k: 1.0 - v for k, v in elem.items()}
    out: dict[int, np.ndarray] = {}
    for grp in groups:
        vecs = []
        for si in want[grp.index]:
            name = deps.spaces[si].value.name
            if name in elem:
                vecs.append(_normalize(_unit_sum(deps, grp, si, elem[name])))
        if vecs:
            out[grp.index] = _reduce(vecs, reduction)
    return out


# ---------------------------------------------------------------------------- entry
def group_importance(deps: ChannelDeps, criterion: str, *, graph: Graph, groups: list[DepGroup] | None = None,
                     calib: dict[str, np.ndarray] | None = None, labels=None, reduction: str = "mean",
                     consumers: bool = False, seed: int = 0, max_samples: int = 256,
                     notes: list[str] | None = None) -> dict[int, np.ndarray]:
    """Scores (higher = more important) for every unit of every prunable group."""
    groups = [g for g in (groups if groups is not None else deps.groups) if g.prunable]
    notes = notes if notes is not None else []
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {g.index: rng.random(g.n_units) for g in groups}
    if criterion in ("l1", "l2"):
        scores = magnitude(deps, groups, 1.0 if criterion == "l1" else 2.0, reduction, consumers)
        group_norm = True
    elif criterion == "bn_gamma":
        scores = bn_gamma(deps, groups, reduction)
        missing = [g for g in groups if g.index not in scores]
        if missing:
            notes.append(f"bn_gamma: {len(missing)} group(s) without a normalization scale use l2")
            scores.update({k: _normalize(v) for k, v in magnitude(deps, missing, 2.0, reduction, consumers).items()})
        group_norm = False
    elif criterion == "taylor":
        scores = taylor(deps, groups, graph, calib, labels=labels, reduction=reduction, consumers=consumers,
                        max_samples=max_samples)
        group_norm = True
    elif criterion in ("activation", "apoz"):
        scores = activation(deps, groups, graph, calib, stat="apoz" if criterion == "apoz" else "mean",
                            reduction=reduction, max_samples=max_samples)
        group_norm = True
    else:
        raise ValueError(f"unknown importance criterion {criterion!r}")
    missing = [g for g in groups if g.index not in scores]
    if missing:
        notes.append(f"{criterion}: {len(missing)} group(s) without scores use l2")
        scores.update(magnitude(deps, missing, 2.0, reduction, consumers))
    out = {}
    for g in groups:
        v = np.nan_to_num(np.asarray(scores[g.index], dtype=np.float64), nan=0.0, posinf=0.0)
        out[g.index] = _normalize(v) if group_norm else v
    return out
