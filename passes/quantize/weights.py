"""Weight and bias quantization shared by the strategies: symmetric (per-channel / blockwise)
weight quantization and the constant ``DequantizeLinear`` builders for weights and int32 biases."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...ir.graph import Graph, Node, Value

__all__ = ["FLOAT32", "is_f32", "quantize_weight", "broadcast_scale", "dq_const", "weight_dq", "bias_dq",
           "drop_unused"]

FLOAT32 = np.dtype(np.float32)

#: stamps provenance on a node the pass created / changed (``Pass.changed``)
Stamp = Callable[[Node], Node]


def is_f32(v: Value | None) -> bool:
    return v is not None and v.dtype is not None and np.dtype(v.dtype) == FLOAT32


def quantize_weight(w: np.ndarray, axis: int | None, *, bits: int = 8, block_size: int | None = None,
                    scale: np.ndarray | None = None, storage=np.int8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight quantization: ``q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``.

    ``axis=None``: one scale. ``axis`` without ``block_size``: one scale per slice along
    ``axis`` (per channel), shape ``(w.shape[axis],)``. With ``block_size``: blocks of
    ``block_size`` consecutive elements along ``axis`` share a scale (ONNX blocked
    quantization, opset 21): the scale has ``w``'s shape with ``ceil(D/block)`` along
    ``axis``. ``scale`` overrides the computed scale (learned by QAT). Returns
    ``(q, scale)``; zero points are 0.
    """
    w = np.asarray(w, dtype=np.float32)
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        a = np.abs(w)
        if axis is None:
            amax = np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
        elif block_size:
            d = w.shape[axis]
            nb = -(-d // block_size)
            pad = nb * block_size - d
            ap = np.moveaxis(a, axis, 0)
            if pad:
                ap = np.concatenate([ap, np.zeros((pad,) + ap.shape[1:], ap.dtype)], axis=0)
            ap = ap.reshape((nb, block_size) + ap.shape[1:]).max(axis=1)
            amax = np.moveaxis(ap, 0, axis)
        else:
            red = tuple(i for i in range(w.ndim) if i != axis)
            amax = a.max(axis=red) if red else a
        s = (amax / qmax).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    else:
        s = np.asarray(scale, dtype=np.float32)
    sb = broadcast_scale(s, w, axis, block_size)
    q = np.clip(np.round(w / sb), -qmax, qmax)
    return q.astype(storage), s


def broadcast_scale(s: np.ndarray, w: np.ndarray, axis: int | None, block_size: int | None) -> np.ndarray:
    """``s`` (one scale, per channel along ``axis``, or per block) broadcastable against ``w``."""
    if axis is None or s.ndim == 0:
        return s
    if block_size:
        return np.repeat(s, block_size, axis=axis).take(np.arange(w.shape[axis]), axis=axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return s.reshape(shape)


def dq_const(g: Graph, n: Node, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
             axis: int | None, block_size: int | None = None, *, stamp: Stamp) -> Value:
    """``DequantizeLinear(q, scale[, zp])`` of constant initializers, inserted before ``n``."""
    qv = g.add_initializer(f"{base}_quantized", q)
    sv = g.add_initializer(f"{base}_scale", scale)
    ins = [qv, sv]
    if zp is not None:
        ins.append(g.add_initializer(f"{base}_zero_point", zp))
    attrs = {}
    if axis is not None and scale.ndim > 0:
        attrs["axis"] = int(axis)
    if block_size:
        attrs["block_size"] = int(block_size)
    out = Value(g.unique_name(f"{base}_dequantized"), FLOAT32, tuple(q.shape))
    dq = g.add_node("DequantizeLinear", ins, [out], attrs, name=f"{base}_DequantizeLinear", before=n,
                    meta={"source": n.source, "quant_helper": True})
    stamp(dq)
    return out


def weight_dq(g: Graph, n: Node, w: Value, axis: int | None, *, bits: int, scale: np.ndarray | None,
              stamp: Stamp) -> tuple[Value, np.ndarray]:
    """The int8-stored (``bits`` = 8 or 4) weight ``w`` of ``n`` behind a DequantizeLinear;
    ``scale`` (learned by QAT) replaces the computed one. Returns ``(dequantized, scale)``."""
    if scale is not None and axis is not None and scale.size != w.const.shape[axis]:
        scale = scale.reshape(-1)
    q, s = quantize_weight(w.const, axis, bits=bits, scale=scale)
    zp = np.zeros(s.shape, dtype=np.int8)
    return dq_const(g, n, w.name, q, s.astype(np.float32), zp, axis, stamp=stamp), s


def bias_dq(g: Graph, n: Node, index: int, w_scale: np.ndarray, x_scale, *, stamp: Stamp) -> None:
    """Input ``index`` (the bias) of ``n`` as int32 with scale ``x_scale * w_scale``, zero point 0."""
    b = n.inputs[index]
    bias = b.const.astype(np.float32)
    ws = np.asarray(w_scale, np.float32).reshape(-1)
    if ws.size not in (1, bias.size):
        if bias.size % ws.size:
            return
        ws = np.tile(ws, bias.size // ws.size)  # ConvTranspose with groups
    scale = (np.float32(x_scale) * ws).astype(np.float32)
    if scale.size == 1:
        scale = np.full(bias.shape, scale.reshape(()), np.float32)
    q = np.clip(np.round(bias.astype(np.float64) / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
    zp = np.zeros(bias.shape, np.int32)
    dqv = dq_const(g, n, b.name, q, scale, zp, 0, stamp=stamp)
    n.set_input(index, dqv)


def drop_unused(g: Graph) -> None:
    """Remove initializers nothing reads any more (the float originals of quantized weights)."""
    for v in list(g.initializers.values()):
        if not v.uses and v not in g.outputs:
            g.remove_initializer(v)
