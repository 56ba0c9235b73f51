"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import Graph, Node, Value
from .base import Pass, PassContext, PassResult, register

#: activations f with f(s x) = s f(x) for s > 0, applied per element (PRelu: per channel slope)
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")


def _const_f32(v: Value | None) -> bool:
    return v is not None and v.is_const and v.const.dtype == np.float32


def _only_user(g: Graph, v: Value) -> Node | None:
    if any(o is v for o in g.outputs):
        return None
    uses = v.uses
    if len(uses) != 1 or uses[0][1] < 0:
        return None
    return uses[0][0]


@dataclass
class _Pair:
    first: Node
    second: Node
    act: Node | None


class _Layer:
    """A Conv / Gemm weight (and bias) viewed by output and input channel."""

    def __init__(self, node: Node, w: np.ndarray, b: np.ndarray | None = None):
        self.node, self.w, self.b = node, w, b
        self.op = node.op_type
        self.group = int(node.attrs.get("group", 1))
        self.trans_b = int(node.attrs.get("transB", 0))

    def out_axis(self) -> int:
        if self.op == "Conv":
            return 0
        return 0 if self.trans_b else 1

    def in_axis(self) -> int:  # Gemm only
        return 1 if self.trans_b else 0

    def out_channels(self) -> int:
        return self.w.shape[self.out_axis()]

    def in_channels(self) -> int:
        if self.op == "Conv":
            return self.w.shape[1] * self.group
        return self.w.shape[self.in_axis()]

    def out_range(self) -> np.ndarray:
        w = np.abs(self.w)
        ax = self.out_axis()
        return np.moveaxis(w, ax, 0).reshape(w.shape[ax], -1).max(axis=1)

    def in_range(self) -> np.ndarray:
        """max |W| over everything that multiplies input channel c."""
        w = np.abs(self.w)
        if self.op == "Conv":
            cout, cpg = w.shape[0], w.shape[1]
            wg = w.reshape(self.group, cout // self.group, cpg, -1)
            return wg.max(axis=(1, 3)).reshape(-1)   # (group, cpg) -> channel g*cpg + j
        ax = self.in_axis()
        return np.moveaxis(w, ax, 0).reshape(w.shape[ax], -1).max(axis=1)

    def scale_out(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights/bias with output channel c divided by s[c]."""
        shape = [1] * self.w.ndim
        shape[self.out_axis()] = -1
        return self.w / s.reshape(shape), (None if self.b is None else self.b / s)

    def scale_in(self, s: np.ndarray) -> np.ndarray:
        """Weights with input channel c multiplied by s[c]."""
        w = self.w
        if self.op == "Conv":
            cout, cpg = w.shape[0], w.shape[1]
            sg = s.reshape((self.group, 1, cpg) + (1,) * (w.ndim - 2))
            return (w.reshape((self.group, cout // self.group, cpg) + w.shape[2:]) * sg).reshape(w.shape)
        shape = [1] * w.ndim
        shape[self.in_axis()] = -1
        return w * s.reshape(shape)


@register
class Equalize(Pass):
    """Cross-layer equalization: rescale channels of consecutive layers so their weight ranges match.

    Rewrite rules: for ``A -> f -> B`` where ``A`` and ``B`` are Conv (any ``group``,
    depthwise included) or Gemm with constant float weights, ``f`` is absent or positively
    homogeneous (Relu, LeakyRelu, PRelu, Identity: ``f(s x) = s f(x)`` for ``s > 0``) and
    each intermediate value has exactly one user, output channel ``c`` of ``A`` (weights and
    bias) is divided by ``s_c = sqrt(r1_c / r2_c)`` and input channel ``c`` of ``B`` is
    multiplied by it, where ``r1_c`` is the max |weight| of ``A``'s output channel ``c`` and
    ``r2_c`` that of ``B``'s input channel ``c``. Afterwards both ranges equal
    ``sqrt(r1_c r2_c)``: per-tensor and per-channel weight quantization lose less. All
    pairs are swept ``iterations`` times (chains ``A -> B -> C`` converge). Scales are
    clamped to ``[1/max_scale, max_scale]``; dead channels (range 0) keep scale 1.

    Exact: the function of the network does not change (up to float rounding).

    Preconditions: BatchNormalization folded (done first when ``fold_bn``, itself exact; a
    BN left between the layers stops the match), weights not shared with other nodes. ReLU6 / Clip are not positively
    homogeneous, so pairs through them are left alone (noted).
    """

    name = "equalize"
    exact = True

    @dataclass
    class Options:
        iterations: int = 20
        max_scale: float = 1e3
        tolerance: float = 1e-4
        fold_bn: bool = True

    def _pairs(self, g: Graph, ctx: PassContext) -> list[_Pair]:
        pairs: list[_Pair] = []
        clipped = 0
        for a in g.nodes:
            if a.op_type not in ("Conv", "Gemm") or a.domain not in ("", "ai.onnx") or len(a.inputs) < 2:
                continue
            if not _const_f32(a.inputs[1]) or (len(a.inputs) > 2 and a.inputs[2] is not None
                                              and not _const_f32(a.inputs[2])):
                continue
            if a.op_type == "Gemm" and (int(a.attrs.get("transA", 0)) or a.inputs[1].const.ndim != 2
                                         or (len(a.inputs) > 2 and a.inputs[2] is not None
                                             and a.inputs[2].const.ndim != 1)):
                continue
            nxt = _only_user(g, a.outputs[0])
            act = None
            if nxt is not None and nxt.op_type in _HOMOGENEOUS and nxt.inputs[0] is a.outputs[0]:
                if nxt.op_type == "PRelu" and not _const_f32(nxt.inputs[1]):
                    continue
                act = nxt
                nxt = _only_user(g, act.outputs[0])
            elif nxt is not None and nxt.op_type in ("Clip",):
                clipped += 1
                continue
            if nxt is None or nxt.op_type not in ("Conv", "Gemm") or nxt.domain not in ("", "ai.onnx"):
                continue
            if not _const_f32(nxt.inputs[1]) or nxt.inputs[0] is not (act or a).outputs[0]:
                continue
            if nxt.op_type == "Gemm" and (int(nxt.attrs.get("transA", 0)) or nxt.inputs[1].const.ndim != 2):
                continue
            la, lb = _Layer(a, a.inputs[1].const), _Layer(nxt, nxt.inputs[1].const)
            if la.out_channels() != lb.in_channels():
                continue
            shared = [v for v in (a.inputs[1], nxt.inputs[1], a.inputs[2] if len(a.inputs) > 2 else None)
                      if v is not None and len(v.uses) != 1]
            if shared:
                continue
            pairs.append(_Pair(a, nxt, act))
        if clipped:
            ctx.note(f"{clipped} layer pair(s) through Clip/ReLU6 left alone (not positively homogeneous)")
        return pairs

    def requirements(self) -> frozenset[str]:
        return frozenset({"bn-folded"}) if self.options.fold_bn else frozenset()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        pairs = self._pairs(graph, ctx)
        if not pairs:
            return PassResult(changed=False)
        # float64 working copies, written back once at the end
        weights: dict[str, np.ndarray] = {}
        for p in pairs:
            for n in (p.first, p.second):
                for v in n.inputs[1:3]:
                    if v is not None:
                        weights.setdefault(v.name, v.const.astype(np.float64))
        def layer(n: Node) -> _Layer:
            b = n.inputs[2] if len(n.inputs) > 2 else None
            return _Layer(n, weights[n.inputs[1].name], None if b is None else weights[b.name])

        before = {p.first.name: self._imbalance(layer(p.first)) for p in pairs}
        for it in range(max(1, o.iterations)):
            worst = 0.0
            for p in pairs:
                la, lb = layer(p.first), layer(p.second)
                r1, r2 = la.out_range(), lb.in_range()
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] / r2[ok])
                s = np.clip(s, 1.0 / o.max_scale, o.max_scale)
                w1, b1 = la.scale_out(s)
                weights[p.first.inputs[1].name] = w1
                if b1 is not None:
                    weights[p.first.inputs[2].name] = b1
                weights[p.second.inputs[1].name] = lb.scale_in(s)
                worst = max(worst, float(np.abs(np.log(s)).max()) if s.size else 0.0)
            if worst < o.tolerance:
                break
        for p in pairs:
            for n in (p.first, p.second):
                for v in n.inputs[1:3]:
                    if v is not None and v.name in weights:
                        v.set_const(weights[v.name].astype(v.const.dtype))
                self.changed(n)
        after = {p.first.name: self._imbalance(layer(p.first)) for p in pairs}
        gain = np.median([before[k] / max(after[k], 1e-12) for k in before])
        ctx.note(f"equalized {len(pairs)} layer pair(s) in {it + 1} sweep(s); median per-tensor/per-channel "
                 f"range ratio of the first layers {np.median(list(before.values())):.1f} -> "
                 f"{np.median(list(after.values())):.1f} (x{gain:.1f} tighter)")
        return PassResult(changed=True, metrics={"pairs": len(pairs), "sweeps": it + 1, "range_gain": float(gain)},
                          artifacts={"pairs": [[p.first.name, p.second.name] for p in pairs]})

    @staticmethod
    def _imbalance(lay: _Layer) -> float:
        """max / mean of the output-channel weight ranges (1 = perfectly balanced)."""
        r = lay.out_range()
        return float(r.max() / max(r.mean(), 1e-12))
