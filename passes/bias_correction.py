"""Bias correction for weight quantization (Nagel et al., 2019; Banner et al., 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..ir.graph import Graph, Node
from .base import Pass, PassContext, PassResult, register
from .quantize.weights import FLOAT32, quantize_weight


@register
class BiasCorrection(Pass):
    """Correct the expected output shift that weight quantization causes, using calibration data.

    Rewrite rules: for every Conv (any ``group``) / Gemm with a constant float weight ``W``,
    let ``W_q`` be the weight exactly as ``quantize`` will store it (symmetric, per channel
    unless ``per_channel=false``, ``weights`` = int8 | int4) and ``E[x]`` the per-channel
    mean of its input over ``ctx.calib_data`` (dense, or ragged -- a list of arrays per input
    whose elements may differ in spatial size: every value counts once; run by ONNX Runtime on
    the float model). The
    quantized layer's output is shifted in expectation by ``eps = (W_q - W) E[x]`` per
    output channel (Conv: summed over input channels of the group and the kernel window,
    i.e. away from the padded border; Gemm: times ``alpha``). The bias becomes ``b - eps``
    (a zero bias is added when there is none). The float model changes; the quantized one
    gets back its mean.

    Preconditions: calibration data; BatchNormalization folded (done first when
    ``fold_bn``); run *after* ``equalize`` and right before ``quantize`` with the same
    ``weights`` / ``per_channel`` (the correction targets that exact weight rounding).
    ConvTranspose and MatMul (no bias input) are left alone.
    """

    name = "bias-correction"
    exact = False

    @dataclass
    class Options:
        weights: Literal["int8", "int4"] = "int8"
        per_channel: bool = True
        calib_batch_size: int = 16
        fold_bn: bool = True
        min_shift: float = 0.0

    def requirements(self) -> frozenset[str]:
        return frozenset({"calib-data", "shapes"} | ({"bn-folded"} if self.options.fold_bn else set()))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from ..runtime.calibrate import collect_channel_means

        o = self.options
        layers = [n for n in graph.nodes if self._eligible(n)]
        if not layers:
            return PassResult(changed=False)
        inputs = sorted({n.inputs[0].name for n in layers})
        axis_of = {n.inputs[0].name: (1 if n.op_type == "Conv" else -1) for n in layers}
        means: dict[str, np.ndarray] = {}
        for ax in sorted(set(axis_of.values())):
            names = [k for k in inputs if axis_of[k] == ax]
            means.update(collect_channel_means(graph, names, ctx.calib_data, axis=ax,
                                               batch_size=o.calib_batch_size, progress=False))
        bits = 4 if o.weights == "int4" else 8
        corrected = 0
        shifts = []
        for n in layers:
            mx = means.get(n.inputs[0].name)
            if mx is None:
                continue
            eps = self._shift(n, mx, bits)
            if eps is None:
                continue
            if o.min_shift and np.abs(eps).max() < o.min_shift:
                continue
            b = n.inputs[2] if len(n.inputs) > 2 else None
            new_b = (np.zeros(eps.shape, np.float64) if b is None else b.const.astype(np.float64).reshape(-1)) - eps
            if b is None:
                bv = graph.add_initializer(f"{n.name}_bias", new_b.astype(np.float32))
                ins = list(n.inputs) + [None] * (3 - len(n.inputs))
                ins[2] = bv
                n.set_inputs(ins)
            elif len(b.uses) == 1:
                b.set_const(new_b.astype(b.const.dtype))
            else:  # shared bias: give this node its own copy
                n.set_input(2, graph.add_initializer(f"{b.name}_corrected", new_b.astype(b.const.dtype)))
            self.changed(n)
            corrected += 1
            shifts.append(float(np.abs(eps).mean()))
        ctx.note(f"corrected the bias of {corrected} layer(s) for {o.weights} "
                 f"{'per-channel' if o.per_channel else 'per-tensor'} weights; mean |shift| "
                 f"{np.mean(shifts) if shifts else 0:.3g}")
        return PassResult(changed=corrected > 0, metrics={"corrected_layers": corrected,
                                                         "mean_abs_shift": float(np.mean(shifts)) if shifts else 0.0})

    @staticmethod
    def _eligible(n: Node) -> bool:
        if n.domain not in ("", "ai.onnx") or n.op_type not in ("Conv", "Gemm") or len(n.inputs) < 2:
            return False
        x, w = n.inputs[0], n.inputs[1]
        if x is None or x.is_const or w is None or not w.is_const or w.const.dtype != FLOAT32:
            return False
        if n.op_type == "Gemm" and (int(n.attrs.get("transA", 0)) or w.const.ndim != 2):
            return False
        b = n.inputs[2] if len(n.inputs) > 2 else None
        if b is not None and (not b.is_const or b.const.ndim != 1 or b.const.dtype != FLOAT32):
            return False
        if n.op_type == "Gemm" and b is not None and float(n.attrs.get("beta", 1.0)) != 1.0:
            return False
        return True

    def _shift(self, n: Node, mx: np.ndarray, bits: int) -> np.ndarray | None:
        w = n.inputs[1].const
        mx = np.asarray(mx, np.float64).reshape(-1)
        if n.op_type == "Conv":
            axis = 0 if self.options.per_channel else None
            q, s = quantize_weight(w, axis, bits=bits)
            sb = s.reshape((-1,) + (1,) * (w.ndim - 1)) if s.ndim else s
            dw = q.astype(np.float64) * sb - w.astype(np.float64)    # (Cout, Cin/g, k...)
            group = int(n.attrs.get("group", 1))
            cout, cpg = w.shape[0], w.shape[1]
            if mx.size != cpg * group:
                return None
            per_in = dw.reshape(cout, cpg, -1).sum(axis=2)            # (Cout, Cin/g)
            mx_g = mx.reshape(group, cpg)
            out_group = np.arange(cout) // (cout // group)
            return (per_in * mx_g[out_group]).sum(axis=1)
        # Gemm: B is (N, K) with transB else (K, N)
        trans_b = int(n.attrs.get("transB", 0))
        axis = (0 if trans_b else 1) if self.options.per_channel else None
        q, s = quantize_weight(w, axis, bits=bits)
        if s.ndim:
            shape = [1, 1]
            shape[axis] = -1
            s = s.reshape(shape)
        dw = q.astype(np.float64) * s - w.astype(np.float64)
        wk = dw.T if trans_b else dw                                 # (K, N)
        if mx.size != wk.shape[0]:
            return None
        return float(n.attrs.get("alpha", 1.0)) * (mx @ wk)
