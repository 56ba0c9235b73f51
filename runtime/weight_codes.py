"""Weight codes shared by the passes that write them and the training loop that keeps them:
binary / ternary rounding (XNOR-Net, TWN) and the evaluation of constant decode chains
(the codes of ``cluster-weights``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def binarize_tensor(w, out_axis: int = 0, *, ternary: bool = False, threshold: float = 0.7):
    """``alpha_o * sign(W)`` per output channel ``o`` (the slices along ``out_axis``) with
    ``alpha_o = mean |W_o|`` (XNOR-Net; ``sign(0) = +1``), or with ``ternary`` the TWN rule:
    ``delta_o = threshold * mean |W_o|``, weights with ``|w| <= delta_o`` become 0, the rest
    ``alpha_o * sign(w)`` with ``alpha_o`` the mean ``|w|`` of those kept. ``w`` is a torch tensor
    (the training loop binarizes its parameters in place, on their device); computed in float64,
    returned in ``w``'s dtype and layout."""
    import torch

    m = torch.movedim(w.detach().to(torch.float64), out_axis, 0)
    rows = m.reshape(m.shape[0], -1)
    a = rows.abs()
    sign = torch.where(rows < 0, -1.0, 1.0).to(torch.float64)
    if ternary:
        keep = a > threshold * a.mean(dim=1, keepdim=True)
        cnt = keep.sum(dim=1, keepdim=True)
        alpha = (a * keep).sum(dim=1, keepdim=True) / cnt.clamp(min=1)
        q = alpha * sign * keep
    else:
        q = a.mean(dim=1, keepdim=True) * sign
    return torch.movedim(q.reshape(m.shape), 0, out_axis).to(w.dtype)


def binarize(w: np.ndarray, out_axis: int, *, ternary: bool = False, threshold: float = 0.7) -> np.ndarray:
    """:func:`binarize_tensor` for a numpy weight (the passes' form), returned in its dtype and layout."""
    import torch

    arr = np.array(w)  # a writable copy (initializers may be read-only views)
    return binarize_tensor(torch.from_numpy(arr), out_axis, ternary=ternary, threshold=threshold).numpy()


def evaluate_constants(graph, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values named ``names`` that are computed from initializers only (a decode chain such as
    ``codes -> Cast -> Div / Mod -> Reshape``), evaluated by ONNX Runtime on a copy of the graph cut
    down to the nodes that produce them. A name that depends on a graph input is left out."""
    from ..ir.graph import constant_chain
    from ..ir.onnx_io import to_onnx_model
    from .ort import session

    g = graph.copy()
    by_name = {v.name: v for v in g.iter_values()}
    targets = []
    keep: set[int] = set()
    for n in dict.fromkeys(names):
        v = by_name.get(n)
        chain = None if v is None else constant_chain(v)
        if chain:
            targets.append(v)
            keep.update(id(x) for x in chain)
    if not targets:
        return {}
    for node in reversed(list(g.nodes)):
        if id(node) not in keep:
            g.remove_node(node, force=True)
    g.outputs[:] = targets
    g.inputs[:] = []
    sess = session(to_onnx_model(g, check=False).SerializeToString())
    return dict(zip([v.name for v in targets], sess.run([v.name for v in targets], {})))
