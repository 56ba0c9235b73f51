"""Weight codes shared by the passes that write them and the training loop that keeps them:
binary / ternary rounding (XNOR-Net, TWN) and the evaluation of constant decode chains
(the codes of ``cluster-weights``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def binarize(w: np.ndarray, out_axis: int, *, ternary: bool = False, threshold: float = 0.7) -> np.ndarray:
    """``alpha_o * sign(W)`` per output channel ``o`` with ``alpha_o = mean |W_o|`` (XNOR-Net; ``sign(0) = +1``),
    or with ``ternary`` the TWN rule: ``delta_o = threshold * mean |W_o|``, weights with ``|w| <= delta_o``
    become 0, the rest ``alpha_o * sign(w)`` with ``alpha_o`` the mean ``|w|`` of those kept. Computed in
    float64, returned in ``w``'s dtype and layout."""
    m = np.moveaxis(np.asarray(w, np.float64), out_axis, 0)
    rows = m.reshape(m.shape[0], -1)
    a = np.abs(rows)
    sign = np.where(rows < 0, -1.0, 1.0)
    if ternary:
        delta = threshold * a.mean(axis=1, keepdims=True)
        keep = a > delta
        cnt = keep.sum(axis=1, keepdims=True)
        alpha = np.where(cnt > 0, (a * keep).sum(axis=1, keepdims=True) / np.maximum(cnt, 1), 0.0)
        q = alpha * sign * keep
    else:
        q = a.mean(axis=1, keepdims=True) * sign
    return np.moveaxis(q.reshape(m.shape), 0, out_axis).astype(np.asarray(w).dtype)


def evaluate_constants(graph, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values named ``names`` that are computed from initializers only (a decode chain such as
    ``codes -> Cast -> Div / Mod -> Reshape``), evaluated by ONNX Runtime on a copy of the graph cut
    down to the nodes that produce them. A name that depends on a graph input is left out."""
    from ..ir.onnx_io import to_onnx_model
    from .ort import session

    g = graph.copy()
    by_name = {v.name: v for v in g.iter_values()}
    out: dict[str, np.ndarray] = {}
    targets = []
    for n in names:
        v = by_name.get(n)
        if v is None:
            continue
        needed: set[int] = set()
        stack, ok = [v], True
        while stack and ok:
            x = stack.pop()
            p = x.producer
            if p is None:
                ok = x.is_const
                continue
            if id(p) in needed:
                continue
            needed.add(id(p))
            stack.extend(i for i in p.inputs if i is not None)
        if ok:
            targets.append((v, needed))
    if not targets:
        return out
    keep = set().union(*(t[1] for t in targets))
    for node in reversed(list(g.nodes)):
        if id(node) not in keep:
            g.remove_node(node, force=True)
    g.outputs[:] = [v for v, _ in targets]
    g.inputs[:] = []
    sess = session(to_onnx_model(g, check=False).SerializeToString())
    for (v, _), arr in zip(targets, sess.run([v.name for v, _ in targets], {})):
        out[v.name] = arr
    return out
