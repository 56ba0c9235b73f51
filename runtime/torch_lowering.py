"""Lowering of an IR :class:`~nnsculpt.ir.Graph` to a *trainable* ``torch.fx.GraphModule``.

:func:`to_torch` builds a ``torch.fx.Graph`` by hand, node by node, with ONNX semantics, and
wraps it in ``GraphModule(root_dict, fx_graph)``. :func:`write_back` copies (trained)
parameter and buffer values back into the graph's initializers.

Lowering rules
--------------

* Weight-carrying ops become real ``torch.nn`` submodules when their weights are
  initializers used by that node only (shared / computed weights fall back to the
  functional form with shared ``consts`` parameters, which keeps weight tying):

  ============================  ===============================================================
  ``Conv``                      ``nn.Conv{1,2,3}d`` (rank of the weight); asymmetric pads and
                                ``auto_pad=SAME_*`` with unknown input shape -> ``F.pad`` first
  ``ConvTranspose``             ``nn.ConvTranspose{1,2,3}d``; asymmetric pads crop the output;
                                ``output_shape`` / ``auto_pad=SAME_*`` need static input shapes
  ``Gemm`` (const ``B``)        ``nn.Linear``: weight ``= alpha * (B if transB else B.T)``, bias
                                ``= beta * C`` when ``C`` is ``(N,)`` / ``(1, N)`` (else added)
  ``MatMul`` (const 2-D ``B``)  ``nn.Linear(bias=False)``, weight ``= B.T``
  ``BatchNormalization``        ``nn.BatchNorm{1,2,3}d`` by input rank, torch momentum
                                ``= 1 - onnx momentum``; running stats loaded
  ``LayerNormalization``        ``nn.LayerNorm(scale.shape)``
  ``Gather`` (const float 2-D   ``nn.Embedding``
  data, axis 0)
  ``Dropout``                   ``nn.Dropout(ratio)`` (identity in eval mode, as ONNX inference)
  ============================  ===============================================================

* Every other op is functional torch code produced by a converter looked up in
  :data:`CONVERTERS` (``op_type -> converter(builder, node, args)``). Shape-like inputs
  (``Reshape`` shape, ``Slice`` starts, axes, pads, scales...) are read statically when they
  are constants and otherwise computed at run time, so graphs with ``Shape -> Gather ->
  Concat -> Reshape`` chains and dynamic batch sizes run eagerly.
* Non-default domains, subgraph ops (``If``/``Loop``/``Scan``) and unknown ops raise
  :class:`~nnsculpt.ir.errors.UnsupportedOpError` naming the node.
* Initializers not owned by a module live under the ``consts`` container: float arrays with
  more than one element and only finite values become trainable ``nn.Parameter`` s;
  scalars (epsilons, ``Pow`` exponents, ``1/sqrt(d)``), arrays holding ``inf``/``nan``
  (attention masks) and integer/bool arrays become buffers. ``trainable_scalars=True``
  makes finite float scalars trainable too.
* The module is returned in ``eval()`` mode (BatchNorm uses its running statistics, Dropout
  is the identity), i.e. it computes exactly the function of the graph.

Naming scheme (deterministic, collision free)
---------------------------------------------

* Module of a node: its provenance ``node.meta.get("source", node.name)`` cut into parts by
  :func:`source_components`: a torch module path (``layer1.0.conv1``) is split on ``.``; an
  ONNX-exporter scope name (starts with ``/``) is reduced to the innermost module path --
  ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (a scope part extending the previous
  one replaces it; a trailing part naming the op, ``Conv`` / ``Conv_3``, is dropped unless it
  is the only part, so ``/conv/Conv`` -> ``conv`` but ``/Conv_2`` -> ``Conv_2``), so exported
  torch models get back their original module paths and state-dict keys. Every part is then
  sanitized: runs of characters outside ``[A-Za-z0-9_]`` become ``_``, leading/trailing
  ``_`` are stripped (an empty part becomes ``_``), a part that is a Python keyword or an
  attribute of ``GraphModule``/``nn.Module`` gets a trailing ``_``, a top-level ``consts``
  becomes ``consts_``. Numeric parts are kept (``getattr(m, "0")`` as in ``nn.Sequential``).
  Collisions, resolved in node order: if a strict prefix of the path is already a module
  (leaf), that part gets ``_`` appended; if the full path is taken (by a module or a
  container), the last part gets ``_1``, ``_2``...
* Constants: ``consts.<name>`` where ``<name>`` is the whole initializer name sanitized as
  one part (``onnx::Conv_16`` -> ``consts.onnx_Conv_16``, ``/pos/emb`` -> ``consts.pos_emb``),
  made unique with ``_1``, ``_2``...
* Forward arguments: graph input names sanitized to identifiers (``arg_`` prefix when
  they start with a digit, ``_`` suffix for keywords), unique.

Fusions of exporter patterns (so that unfolded ``torch.onnx.export`` graphs get their
``nn.Linear`` back): ``Transpose(W) -> MatMul/Gemm`` where ``W`` is an initializer used only
there takes ``W`` as the weight (transposes cancel in the recorded transforms), and
``MatMul(x, W) -> Add(b)`` with an exclusive 1-D ``b`` of matching size becomes one biased
``nn.Linear``.

The returned module carries ``_nnsculpt_param_map``: ``{qualified torch name:
ParamBinding(initializer, transforms, kind)}`` (also preserved across ``copy.deepcopy``
and ``torch.save``/``torch.load``; the graph's tracer class keeps the run-time helpers as
leaves when the pickled code is re-traced).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nnsculpt.ir.errors import IRError, UnsupportedOpError
from nnsculpt.ir.graph import Graph, Node, Value

__all__ = ["to_torch", "write_back", "ParamBinding", "CONVERTERS", "register_converter",
           "sanitize_component", "source_components", "Builder", "NNSculptTracer"]

PARAM_MAP_ATTR = "_nnsculpt_param_map"
_DEFAULT_DOMAINS = ("", "ai.onnx")


# =============================================================================== bindings
@dataclass(frozen=True)
class ParamBinding:
    """How one torch parameter/buffer relates to an IR initializer.

    ``transforms`` are steps applied, in order, to the initializer array to obtain the torch
    tensor: ``("transpose",)`` (2-D ``.T``), ``("scale", f)`` (multiply by ``f``),
    ``("reshape", shape)``. :meth:`to_initializer` applies the inverse steps in reverse.
    ``kind`` is ``"parameter"`` or ``"buffer"``.
    """

    initializer: str
    transforms: tuple = ()
    kind: str = "parameter"

    def to_torch(self, arr: np.ndarray) -> np.ndarray:
        for step in self.transforms:
            if step[0] == "transpose":
                arr = arr.T
            elif step[0] == "scale":
                arr = arr * np.asarray(step[1], dtype=arr.dtype)
            elif step[0] == "reshape":
                arr = arr.reshape(step[1])
            else:  # pragma: no cover
                raise IRError(f"unknown transform {step!r}")
        return np.array(arr, order="C")

    def to_initializer(self, arr: np.ndarray, shape: tuple, *, undo_scale: bool = True) -> np.ndarray:
        """Map a torch-layout array back to the initializer layout ``shape``. ``undo_scale=False``
        skips the scale steps (for quantities such as w·∂L/∂w that scaling leaves unchanged)."""
        shapes = [tuple(shape)]
        for step in self.transforms:  # shapes before each step
            s = shapes[-1]
            shapes.append(s[::-1] if step[0] == "transpose" else tuple(step[1]) if step[0] == "reshape" else s)
        for i in reversed(range(len(self.transforms))):
            step = self.transforms[i]
            if step[0] == "transpose":
                arr = arr.T
            elif step[0] == "scale" and undo_scale:
                arr = arr / np.asarray(step[1], dtype=arr.dtype)
            elif step[0] == "reshape":
                arr = arr.reshape(shapes[i])
        return np.array(arr, order="C")


# ============================================================================ name helpers
_RESERVED_CACHE: set[str] = set()


def _reserved() -> set[str]:
    if not _RESERVED_CACHE:
        dummy = fx.GraphModule(nn.Module(), fx.Graph())
        _RESERVED_CACHE.update(dir(dummy), dir(nn.Module()), dir(fx.GraphModule), vars(dummy))
    return _RESERVED_CACHE


def sanitize_component(s: str) -> str:
    """One attribute name from an arbitrary string (see the module docstring)."""
    s = re.sub(r"[^0-9A-Za-z_]+", "_", str(s)).strip("_") or "_"
    if keyword.iskeyword(s) or s in _reserved():
        s += "_"
    return s


def source_components(source: str, op_type: str = "") -> list[str]:
    """Raw module-path parts of a provenance string (before sanitizing).

    A torch module path (``layer1.0.conv1``) is split on ``.``. An ONNX-exporter scope name
    (starts with ``/``, e.g. ``/layer1/layer1.0/conv1/Conv``) is reduced to the innermost
    module path: a scope part that extends its predecessor (``layer1`` -> ``layer1.0``)
    replaces it, and a last part naming the op (``Conv``, ``Conv_3``) is dropped unless
    nothing else is left -- so ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (the
    original torch module path) and ``/Add_1`` -> ``Add_1``.
    """
    if not source.startswith("/"):
        return [c for c in re.split(r"[./]", source) if c]
    scopes: list[str] = []
    for part in (p for p in source.split("/") if p):
        if scopes and part.startswith(scopes[-1] + "."):
            scopes[-1] = part
        else:
            scopes.append(part)
    if len(scopes) > 1 and op_type and re.fullmatch(re.escape(op_type) + r"(_\d+)?", scopes[-1]):
        scopes.pop()
    return [c for part in scopes for c in part.split(".") if c]


def _identifier(s: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]+", "_", str(s)).strip("_") or "arg"
    if s[0].isdigit():
        s = "arg_" + s
    if keyword.iskeyword(s) or s == "self":
        s += "_"
    return s


# ============================================================================ dtype helpers
def _torch_dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


def _onnx_to_torch_dtype(elem: int) -> torch.dtype:
    import onnx
    from onnx import helper

    if elem == onnx.TensorProto.BFLOAT16:
        return torch.bfloat16
    try:
        return _torch_dtype(helper.tensor_dtype_to_np_dtype(elem))
    except Exception:
        raise UnsupportedOpError(f"to_torch: ONNX element type {elem} has no torch dtype") from None


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind in "OSU":
        raise UnsupportedOpError(f"to_torch: constant of dtype {arr.dtype} has no torch equivalent")
    return torch.from_numpy(np.array(arr, copy=True, order="C"))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


# ============================================================================ runtime helpers
# Plain functions called from the generated code; they implement ONNX semantics against the
# run-time shapes, and accept shape-like arguments as python lists or tensors.
def _ints(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(x).reshape(-1).tolist()]


def _floats(x) -> list[float]:
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.reshape(-1).tolist()]
    return [float(v) for v in np.asarray(x).reshape(-1).tolist()]


def _scalar(x):
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)[0].item()
    if isinstance(x, np.ndarray):
        return x.reshape(-1)[0].item()
    return x


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b_1..b_n, e_1..e_n]`` (over the last n dims) -> ``F.pad`` order."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def onnx_reshape(x: torch.Tensor, shape, allowzero: int = 0) -> torch.Tensor:
    shape = _ints(shape)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def onnx_flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(math.prod(x.shape[:axis])), int(math.prod(x.shape[axis:])))


def onnx_softmax_legacy(x: torch.Tensor, axis: int, log: bool = False) -> torch.Tensor:
    """Softmax before opset 13: coerce to 2-D at ``axis``, softmax over dim 1."""
    y = onnx_flatten(x, axis)
    y = F.log_softmax(y, dim=1) if log else F.softmax(y, dim=1)
    return y.reshape(x.shape)


def onnx_transpose(x: torch.Tensor, perm) -> torch.Tensor:
    if perm is None:
        perm = list(reversed(range(x.dim())))
    return x.permute(*perm)


def onnx_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not (isinstance(b, torch.Tensor) and b.is_floating_point()):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def onnx_pow(a: torch.Tensor, b) -> torch.Tensor:
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


def onnx_slice(x: torch.Tensor, starts, ends, axes=None, steps=None) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.dim() if a < 0 else a
        d = x.shape[a]
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            x = x[(slice(None),) * a + (slice(s, e, st),)]
        else:
            s, e = min(max(s, -1), d - 1), min(max(e, -1), d - 1)
            idx = torch.arange(s, e, st, device=x.device, dtype=torch.long)
            x = x.index_select(a, idx)
    return x


def onnx_gather(data: torch.Tensor, idx: torch.Tensor, axis: int = 0) -> torch.Tensor:
    axis = axis + data.dim() if axis < 0 else axis
    idx = idx.long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def onnx_split(x: torch.Tensor, axis: int, sizes=None, num_outputs: int = 1):
    d = x.shape[axis]
    if sizes is None:
        cs = -(-d // num_outputs)
        sizes = [cs] * (num_outputs - 1) + [d - cs * (num_outputs - 1)]
    return torch.split(x, _ints(sizes), dim=axis)


def onnx_squeeze(x: torch.Tensor, axes=None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    axes = _ints(axes)
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(a + x.dim() if a < 0 else a for a in axes))


def onnx_unsqueeze(x: torch.Tensor, axes) -> torch.Tensor:
    axes = _ints(axes)
    r = x.dim() + len(axes)
    for a in sorted(a + r if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def onnx_reduce(x: torch.Tensor, axes, keepdims: int, noop_with_empty_axes: int, op: str) -> torch.Tensor:
    axes = [] if axes is None else _ints(axes)
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    if x.dim() == 0:
        return x
    axes = sorted(a + x.dim() if a < 0 else a for a in axes)
    k = bool(keepdims)
    if op == "mean":
        return x.mean(dim=axes, keepdim=k)
    if op == "sum":
        return x.sum(dim=axes, keepdim=k)
    if op == "max":
        return torch.amax(x, dim=axes, keepdim=k)
    if op == "min":
        return torch.amin(x, dim=axes, keepdim=k)
    if op == "prod":
        for a in reversed(axes):
            x = x.prod(dim=a, keepdim=k)
        return x
    if op == "sumsquare":
        return (x * x).sum(dim=axes, keepdim=k)
    if op == "l2":
        return torch.sqrt((x * x).sum(dim=axes, keepdim=k))
    if op == "l1":
        return x.abs().sum(dim=axes, keepdim=k)
    if op == "logsumexp":
        return torch.logsumexp(x, dim=axes, keepdim=k)
    raise ValueError(op)  # pragma: no cover


def onnx_expand(x: torch.Tensor, shape) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def onnx_tile(x: torch.Tensor, repeats) -> torch.Tensor:
    return x.repeat(*_ints(repeats))


def onnx_shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


def onnx_size(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def onnx_constant_of_shape(shape, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a one-element buffer) gives dtype and device."""
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype, device=value.device)


def onnx_range(start, limit, delta) -> torch.Tensor:
    dtype = start.dtype if isinstance(start, torch.Tensor) else None
    dev = start.device if isinstance(start, torch.Tensor) else None
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=dtype, device=dev)


def onnx_clip(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


def onnx_where(cond: torch.Tensor, a, b) -> torch.Tensor:
    return torch.where(cond.bool(), a, b)


def onnx_variadic(op: str, *xs: torch.Tensor) -> torch.Tensor:
    y = xs[0]
    for x in xs[1:]:
        y = torch.maximum(y, x) if op == "max" else torch.minimum(y, x) if op == "min" else y + x
    if op == "mean":
        y = y / len(xs)
    return y


def onnx_argextreme(x: torch.Tensor, axis: int, keepdims: int, last: int, op: str) -> torch.Tensor:
    fn = torch.argmax if op == "max" else torch.argmin
    if last:
        y = fn(x.flip(axis), dim=axis, keepdim=bool(keepdims))
        return x.shape[axis] - 1 - y
    return fn(x, dim=axis, keepdim=bool(keepdims))


def onnx_hardsigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def onnx_prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope)


def onnx_layer_norm(x: torch.Tensor, scale, bias, axis: int, eps: float) -> torch.Tensor:
    axis = axis + x.dim() if axis < 0 else axis
    y = F.layer_norm(x, tuple(x.shape[axis:]), None, None, eps)
    y = y * scale
    return y if bias is None else y + bias


def onnx_global_pool(x: torch.Tensor, op: str) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    return x.mean(dim=dims, keepdim=True) if op == "avg" else torch.amax(x, dim=dims, keepdim=True)


def _same_pads(spatial: Sequence[int], kernel, strides, dilations, upper: bool) -> list[int]:
    n = len(kernel)
    begin, end = [0] * n, [0] * n
    for i in range(n):
        out = -(-int(spatial[i]) // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - int(spatial[i]), 0)
        small = total // 2
        begin[i], end[i] = (small, total - small) if upper else (total - small, small)
    return begin + end


def onnx_same_pad(x: torch.Tensor, kernel, strides, dilations, upper: bool, value: float = 0.0) -> torch.Tensor:
    """``auto_pad=SAME_UPPER/SAME_LOWER`` against the run-time spatial shape."""
    pads = _same_pads(x.shape[2:], kernel, strides, dilations, upper)
    return F.pad(x, _torch_pads(pads), value=value) if any(pads) else x


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def onnx_avg_pool_padded(x: torch.Tensor, kernel, strides, pads, ceil_mode: bool,
                         count_include_pad: bool) -> torch.Tensor:
    """AveragePool with arbitrary (asymmetric) pads: window sums / window element counts."""
    n = len(kernel)
    one_d = n == 1
    if one_d:  # avg_pool1d has no divisor_override: go through 2-D
        x = x.unsqueeze(-2)
        kernel, strides, pads = [1] + list(kernel), [1] + list(strides), [0, pads[0], 0, pads[1]]
        n = 2
    tp = _torch_pads(pads)
    pool = _AVG_POOL[n]
    sums = pool(F.pad(x, tp), kernel, strides, 0, ceil_mode, True, 1)
    mask = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(mask, tp, value=1.0 if count_include_pad else 0.0)
    counts = pool(mask, kernel, strides, 0, ceil_mode, True, 1)
    y = sums / counts
    return y.squeeze(-2) if one_d else y


def onnx_pad(x: torch.Tensor, pads, value=None, axes=None, mode: str = "constant") -> torch.Tensor:
    pads = _ints(pads)
    r = x.dim()
    axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in _ints(axes)]
    n = len(axes)
    begin = {a: pads[i] for i, a in enumerate(axes)}
    end = {a: pads[i + n] for i, a in enumerate(axes)}
    padded = [a for a in range(r) if begin.get(a, 0) or end.get(a, 0)]
    if not padded:
        return x
    first = min(padded)
    tp: list[int] = []
    for a in reversed(range(first, r)):
        tp += [begin.get(a, 0), end.get(a, 0)]
    if mode == "constant":
        v = 0 if value is None else _scalar(value)
        return F.pad(x, tp, mode="constant", value=v)
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    lead = tuple(x.shape[:first])  # torch wants exactly one batch dim before the padded dims
    y = F.pad(x.reshape((-1,) + tuple(x.shape[first:])), tp, mode=tmode)
    return y.reshape(lead + tuple(y.shape[1:]))


def _resize_coords(o: int, n: int, scale: float, mode: str, device) -> torch.Tensor:
    x = torch.arange(o, dtype=torch.float32, device=device)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if o > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (n - 1) / (o - 1) if o > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adj = o / (scale * n)
        center = n / 2
        offset = center * (1 - adj)
        return offset + (x + 0.5) / scale - 0.5
    raise ValueError(mode)  # pragma: no cover


def onnx_resize(x: torch.Tensor, scales, sizes, axes, mode: str, coord: str, nearest_mode: str) -> torch.Tensor:
    r = x.dim()
    axes = list(range(r)) if axes is None else [a + r if a < 0 else a for a in axes]
    sz = _ints(sizes) if sizes is not None else []
    if sz:
        out = dict(zip(axes, sz))
        scale = {a: out[a] / x.shape[a] for a in axes}
    else:
        sc = _floats(scales)
        scale = dict(zip(axes, sc))
        out = {a: int(math.floor(x.shape[a] * scale[a])) for a in axes}
    for a in axes:
        n, o, s = x.shape[a], out[a], float(np.float32(scale[a]))
        if o == n and s == 1.0:
            continue
        c = _resize_coords(o, n, s, coord, x.device)
        if mode == "nearest":
            if nearest_mode == "round_prefer_floor":
                c = torch.ceil(c - 0.5)
            elif nearest_mode == "round_prefer_ceil":
                c = torch.floor(c + 0.5)
            elif nearest_mode == "floor":
                c = torch.floor(c)
            else:
                c = torch.ceil(c)
            idx = c.clamp(0, n - 1).long()
            x = x.index_select(a, idx)
        else:  # linear
            c = c.clamp(0, n - 1)
            i0 = c.floor().long()
            i1 = (i0 + 1).clamp(max=n - 1)
            w = (c - i0.to(c.dtype)).to(x.dtype).reshape((-1,) + (1,) * (r - a - 1))
            x = x.index_select(a, i0) * (1 - w) + x.index_select(a, i1) * w
    return x


#: run-time helpers: leaves for symbolic (re)tracing, e.g. when a pickled module is loaded
RUNTIME_HELPERS: tuple = tuple(f for n, f in sorted(globals().items()) if n.startswith("onnx_") and callable(f))


class NNSculptTracer(fx.Tracer):
    """``fx.Tracer`` that keeps the run-time helpers as leaf calls.

    Set as the graph's tracer class so that ``torch.save`` / ``torch.load`` of the returned
    module (which re-traces the generated code) works.
    """

    def __init__(self, *args, autowrap_functions=(), **kwargs):
        super().__init__(*args, autowrap_functions=tuple(autowrap_functions) + RUNTIME_HELPERS, **kwargs)


# ============================================================================ module helpers
class _AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for inputs of unknown rank (no input-dim check)."""

    def _check_input_dim(self, input):  # noqa: D401
        return None


def _load_(t: torch.Tensor, arr: np.ndarray) -> None:
    with torch.no_grad():
        t.copy_(_to_tensor(arr))


# ============================================================================ the builder
class Builder:
    """State of one lowering; converters use its small API."""

    def __init__(self, graph: Graph, *, trainable_scalars: bool = False):
        self.graph = graph
        self.fx = fx.Graph()
        self.root: dict[str, Any] = {}
        self.param_map: dict[str, ParamBinding] = {}
        self.env: dict[int, fx.Node] = {}
        self.trainable_scalars = trainable_scalars
        self._const_nodes: dict[str, fx.Node] = {}
        self._leaves: set[str] = set()
        self._containers: set[str] = {"consts"}
        self._const_names: set[str] = set()
        self._shapes_inferred = False
        self._hint: str | None = None
        self.node: Node | None = None
        #: nodes lowered as part of another node (skipped by the main loop)
        self.absorbed: set[int] = set()
        #: (id(consumer), input index) -> Transpose node whose constant input feeds it
        self.transposed_weights: dict[tuple[int, int], Node] = {}
        #: id(MatMul) -> (Add node, index of the bias input of the Add)
        self.bias_adds: dict[int, tuple[Node, int]] = {}
        self._plan_fusions()

    def _only_use(self, v: Value) -> tuple[Node, int] | None:
        if len(v.uses) != 1 or any(o is v for o in self.graph.outputs):
            return None
        return v.uses[0]

    def _plan_fusions(self) -> None:
        """Find ``Transpose(W) -> MatMul/Gemm`` weights and ``MatMul -> Add(bias)`` pairs.

        These are what ``torch.onnx.export(do_constant_folding=False)`` produces for
        ``nn.Linear``; lowering them as one ``nn.Linear`` keeps the torch module structure.
        """
        for n in self.graph.nodes:
            if n.op_type != "Transpose" or n.domain not in _DEFAULT_DOMAINS or len(n.outputs) != 1:
                continue
            w = self.exclusive_const(n, 0)
            if w is None or w.ndim != 2 or list(n.attr("perm", [1, 0])) != [1, 0]:
                continue
            use = self._only_use(n.outputs[0])
            if use is not None and use[0].op_type in ("MatMul", "Gemm") and use[1] == 1 \
                    and use[0].domain in _DEFAULT_DOMAINS:
                self.transposed_weights[(id(use[0]), 1)] = n
                self.absorbed.add(id(n))
        for n in self.graph.nodes:
            if n.op_type != "MatMul" or n.domain not in _DEFAULT_DOMAINS:
                continue
            wb = self.weight(n, 1)
            if wb is None or wb[0].ndim != 2 or n.input(0).is_const:
                continue
            use = self._only_use(n.outputs[0])
            if use is None or use[0].op_type != "Add" or use[0].domain not in _DEFAULT_DOMAINS:
                continue
            add, idx = use
            bias = self.exclusive_const(add, 1 - idx)
            if bias is not None and bias.shape == (wb[0].shape[1],) and bias.dtype == wb[0].dtype:
                self.bias_adds[id(n)] = (add, 1 - idx)
                self.absorbed.add(id(add))

    def weight(self, node: Node, i: int) -> tuple[np.ndarray, str, tuple] | None:
        """Constant float input ``i`` owned by ``node``: ``(value, initializer, steps)``.

        ``steps`` turn the initializer into the input's value (a transpose when the weight
        comes through an absorbed ``Transpose``).
        """
        t = self.transposed_weights.get((id(node), i))
        if t is not None:
            return t.input(0).const.T, t.input(0).name, (("transpose",),)
        w = self.exclusive_const(node, i)
        return None if w is None else (w, node.input(i).name, ())

    # ------------------------------------------------------------------ graph queries
    @property
    def opset(self) -> int:
        return self.graph.opset

    def shape(self, v: Value | None):
        """Shape of ``v`` (running shape inference once if it is missing)."""
        if v is None:
            return None
        if v.is_const:
            return tuple(v.const.shape)
        if v.shape is None and not self._shapes_inferred:
            self._shapes_inferred = True
            try:
                from nnsculpt.ir.analysis import infer_shapes

                infer_shapes(self.graph)
            except Exception:  # best effort
                pass
        return v.shape

    def rank(self, v: Value | None) -> int | None:
        s = self.shape(v)
        return None if s is None else len(s)

    def static(self, v: Value | None) -> np.ndarray | None:
        """The compile-time value of ``v`` (initializer, Constant node, Identity of those)."""
        seen = 0
        while v is not None and seen < 64:
            if v.is_const:
                return v.const
            p = v.producer
            if p is None or p.domain not in _DEFAULT_DOMAINS:
                return None
            if p.op_type == "Constant":
                return _constant_attr_value(p)
            if p.op_type != "Identity":
                return None
            v = p.input(0)
            seen += 1
        return None

    def exclusive_const(self, node: Node, i: int, kinds: str = "f") -> np.ndarray | None:
        """Initializer input ``i`` of ``node`` if no other node / output uses it."""
        v = node.input(i)
        if v is None or not v.is_const or self.graph.initializers.get(v.name) is not v:
            return None
        if v.uses != [(node, i)] or any(o is v for o in self.graph.outputs):
            return None
        return v.const if v.const.dtype.kind in kinds else None

    def unsupported(self, node: Node, why: str = "") -> UnsupportedOpError:
        dom = node.domain or "ai.onnx"
        msg = f"to_torch: node '{node.name}' op '{dom}::{node.op_type}' has no torch lowering"
        return UnsupportedOpError(msg + (f" ({why})" if why else ""))

    # ------------------------------------------------------------------ fx emission
    def value(self, v: Value) -> fx.Node:
        n = self.env.get(id(v))
        if n is not None:
            return n
        if v.is_const:
            return self.const_attr(v)
        p = v.producer
        if p is not None and id(p) in self.absorbed and p.op_type == "Transpose":
            self.lower(p)  # a fused weight transpose whose consumer fell back to functional
            return self.env[id(v)]
        raise IRError(f"to_torch: value '{v.name}' is used before it is defined")

    def lower(self, node: Node) -> None:
        """Run the converter of ``node`` and bind its outputs."""
        prev = (self.node, self._hint)
        self.node = node
        self._hint = _identifier(node.outputs[0].name) if node.outputs else None
        result = CONVERTERS[node.op_type](self, node, _Args(self, node))
        outs = list(result) if isinstance(result, (list, tuple)) else [result]
        for i, v in enumerate(node.outputs):
            fxn = outs[i] if i < len(outs) else None
            if fxn is None:
                if _used(self.graph, [v]):
                    raise self.unsupported(node, f"output {i} ('{v.name}') is not supported")
                continue
            fxn.meta.setdefault("nnsculpt_value", v.name)
            fxn.meta.setdefault("source", node.meta.get("source", node.name))
            self.env[id(v)] = fxn
        fused = self.bias_adds.get(id(node))
        if fused is not None:  # MatMul + Add(bias) lowered as one nn.Linear
            self.env[id(fused[0].outputs[0])] = self.env[id(node.outputs[0])]
        self.node, self._hint = prev

    def call(self, fn: Callable, *args, **kwargs) -> fx.Node:
        return self.fx.create_node("call_function", fn, tuple(args), kwargs, name=self._hint)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self.fx.create_node("call_method", name, tuple(args), kwargs, name=self._hint)

    def getitem(self, x: fx.Node, i: int) -> fx.Node:
        return self.call(operator.getitem, x, i)

    def const_attr(self, v: Value) -> fx.Node:
        """Materialize initializer ``v`` under ``consts`` (parameter or buffer)."""
        n = self._const_nodes.get(v.name)
        if n is not None:
            return n
        arr = v.const
        trainable = (arr.dtype.kind == "f" and (arr.size > 1 or self.trainable_scalars) and arr.size > 0
                     and bool(np.isfinite(arr).all()))
        t = _to_tensor(arr)
        name = self._unique_const(v.name)
        qual = f"consts.{name}"
        self.root[qual] = nn.Parameter(t) if trainable else t
        self.param_map[qual] = ParamBinding(v.name, (), "parameter" if trainable else "buffer")
        n = self.fx.get_attr(qual)
        n.meta["nnsculpt_initializer"] = v.name
        self._const_nodes[v.name] = n
        return n

    def const_tensor(self, arr: np.ndarray, hint: str) -> fx.Node:
        """A buffer for a constant that is not an initializer (a Constant node's value)."""
        qual = f"consts.{self._unique_const(hint)}"
        self.root[qual] = _to_tensor(arr)
        return self.fx.get_attr(qual)

    def _unique_const(self, name: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "c"
        if keyword.iskeyword(base) or base in _reserved():
            base += "_"
        cand, k = base, 0
        while cand in self._const_names:
            k += 1
            cand = f"{base}_{k}"
        self._const_names.add(cand)
        return cand

    def module_path(self, node: Node) -> str:
        source = str(node.meta.get("source", node.name) or node.name or node.op_type)
        comps = [sanitize_component(c) for c in source_components(source, node.op_type)]
        comps = comps or [sanitize_component(node.op_type)]
        if comps[0] == "consts":
            comps[0] = "consts_"
        for i in range(len(comps) - 1):
            while ".".join(comps[:i + 1]) in self._leaves:
                comps[i] += "_"
        base, k = comps[-1], 0
        while ".".join(comps) in self._leaves or ".".join(comps) in self._containers:
            k += 1
            comps[-1] = f"{base}_{k}"
        path = ".".join(comps)
        self._leaves.add(path)
        for i in range(1, len(comps)):
            self._containers.add(".".join(comps[:i]))
        return path

    def add_module(self, node: Node, module: nn.Module, bindings: dict[str, ParamBinding]) -> str:
        path = self.module_path(node)
        self.root[path] = module
        for local, b in bindings.items():
            self.param_map[f"{path}.{local}"] = b
        return path

    def call_module(self, path: str, *args) -> fx.Node:
        return self.fx.create_node("call_module", path, tuple(args), {}, name=self._hint)


class _Args:
    """Lazy access to a node's inputs as fx nodes (constants are materialized on demand)."""

    def __init__(self, b: Builder, node: Node):
        self._b, self._node = b, node

    def __len__(self) -> int:
        return len(self._node.inputs)

    def __getitem__(self, i: int) -> fx.Node | None:
        v = self._node.input(i)
        return None if v is None else self._b.value(v)


def _constant_attr_value(node: Node) -> np.ndarray | None:
    a = node.attrs
    if isinstance(a.get("value"), np.ndarray):
        return a["value"]
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64)
    return None


# ============================================================================ converter table
Converter = Callable[[Builder, Node, _Args], Any]
#: op_type -> converter(builder, node, args) -> fx node | list of fx nodes (one per output)
CONVERTERS: dict[str, Converter] = {}


def register_converter(*ops: str):
    def deco(fn: Converter) -> Converter:
        for op in ops:
            CONVERTERS[op] = fn
        return fn
    return deco


def _attr_str(node: Node, name: str, default: str) -> str:
    v = node.attr(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _compose(*steps: tuple) -> tuple:
    """Concatenate transform steps, cancelling adjacent transposes."""
    out: list = []
    for st in (x for group in steps for x in group):
        if st[0] == "transpose" and out and out[-1][0] == "transpose":
            out.pop()
        else:
            out.append(st)
    return tuple(out)


def _static_or_arg(b: Builder, node: Node, args: _Args, i: int, as_list: bool = True):
    """Input ``i`` as a python list when static, else the fx node (resolved at run time)."""
    v = node.input(i)
    if v is None:
        return None
    s = b.static(v)
    if s is not None:
        return s.reshape(-1).tolist() if as_list else s.reshape(-1)[0].item()
    return args[i]


# ---------------------------------------------------------------------------- elementwise
_UNARY: dict[str, Callable] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign,
    "Round": torch.round, "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos,
    "IsNaN": torch.isnan, "Softsign": F.softsign, "HardSwish": F.hardswish, "Mish": F.mish,
}
_BINARY: dict[str, Callable] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": onnx_div, "Pow": onnx_pow,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


def _unary(fn):
    return lambda b, node, args: b.call(fn, args[0])


def _binary(fn):
    return lambda b, node, args: b.call(fn, args[0], args[1])


for _op, _fn in _UNARY.items():
    CONVERTERS[_op] = _unary(_fn)
for _op, _fn in _BINARY.items():
    CONVERTERS[_op] = _binary(_fn)


@register_converter("Identity")
def _identity(b, node, args):
    return args[0]


@register_converter("Mod")
def _mod(b, node, args):
    return b.call(torch.fmod if node.attr("fmod", 0) else torch.remainder, args[0], args[1])


@register_converter("Max", "Min", "Sum", "Mean")
def _variadic(b, node, args):
    xs = [args[i] for i in range(len(args)) if node.input(i) is not None]
    return xs[0] if len(xs) == 1 and node.op_type != "Mean" else b.call(onnx_variadic, node.op_type.lower(), *xs)


@register_converter("Where")
def _where(b, node, args):
    return b.call(onnx_where, args[0], args[1], args[2])


@register_converter("LeakyRelu")
def _leaky(b, node, args):
    return b.call(F.leaky_relu, args[0], float(node.attr("alpha", 0.01)))


@register_converter("Elu")
def _elu(b, node, args):
    return b.call(F.elu, args[0], float(node.attr("alpha", 1.0)))


@register_converter("Selu")
def _selu(b, node, args):
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return b.call(operator.mul, b.call(F.elu, args[0], alpha), gamma)


@register_converter("Celu")
def _celu(b, node, args):
    return b.call(F.celu, args[0], float(node.attr("alpha", 1.0)))


@register_converter("Gelu")
def _gelu(b, node, args):
    return b.call(F.gelu, args[0], approximate=_attr_str(node, "approximate", "none"))


@register_converter("Softplus")
def _softplus(b, node, args):
    return b.call(F.softplus, args[0])


@register_converter("HardSigmoid")
def _hardsigmoid(b, node, args):
    return b.call(onnx_hardsigmoid, args[0], float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5)))


@register_converter("PRelu")
def _prelu(b, node, args):
    return b.call(onnx_prelu, args[0], args[1])


@register_converter("Clip")
def _clip(b, node, args):
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        lo, hi = node.attr("min"), node.attr("max")
        return b.call(onnx_clip, args[0], None if lo is None else float(lo), None if hi is None else float(hi))
    bounds = []
    for i in (1, 2):
        v = node.input(i)
        s = b.static(v)
        bounds.append(None if v is None else s.reshape(-1)[0].item() if s is not None else args[i])
    return b.call(onnx_clip, args[0], *bounds)


@register_converter("Softmax", "LogSoftmax")
def _softmax(b, node, args):
    log = node.op_type == "LogSoftmax"
    if b.opset < 13:
        return b.call(onnx_softmax_legacy, args[0], int(node.attr("axis", 1)), log)
    return b.call(F.log_softmax if log else F.softmax, args[0], dim=int(node.attr("axis", -1)))


@register_converter("Cast")
def _cast(b, node, args):
    return b.method("to", args[0], _onnx_to_torch_dtype(int(node.attr("to"))))


@register_converter("CastLike")
def _cast_like(b, node, args):
    return b.method("type_as", args[0], args[1])


# ---------------------------------------------------------------------------- shape ops
@register_converter("Reshape")
def _reshape(b, node, args):
    if b.opset < 5 or node.input(1) is None:
        shape = node.attr("shape")
    else:
        shape = _static_or_arg(b, node, args, 1)
    return b.call(onnx_reshape, args[0], shape, int(node.attr("allowzero", 0)))


@register_converter("Flatten")
def _flatten(b, node, args):
    return b.call(onnx_flatten, args[0], int(node.attr("axis", 1)))


@register_converter("Transpose")
def _transpose(b, node, args):
    perm = node.attr("perm")
    return b.call(onnx_transpose, args[0], None if perm is None else [int(p) for p in perm])


@register_converter("Concat")
def _concat(b, node, args):
    xs = [args[i] for i in range(len(args)) if node.input(i) is not None]
    return b.call(torch.cat, xs, dim=int(node.attr("axis")))


@register_converter("Split")
def _split(b, node, args):
    axis = int(node.attr("axis", 0))
    sizes = node.attr("split")
    if sizes is None and node.input(1) is not None:
        sizes = _static_or_arg(b, node, args, 1)
    num = int(node.attr("num_outputs", len(node.outputs)))
    parts = b.call(onnx_split, args[0], axis, sizes, num)
    return [b.getitem(parts, i) for i in range(len(node.outputs))]


@register_converter("Slice")
def _slice(b, node, args):
    if b.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
        return b.call(onnx_slice, args[0], starts, ends, axes, None)
    ins = [_static_or_arg(b, node, args, i) for i in range(1, 5)]
    return b.call(onnx_slice, args[0], *ins)


@register_converter("Squeeze")
def _squeeze(b, node, args):
    axes = node.attr("axes") if b.opset < 13 else _static_or_arg(b, node, args, 1)
    return b.call(onnx_squeeze, args[0], axes)


@register_converter("Unsqueeze")
def _unsqueeze(b, node, args):
    axes = node.attr("axes") if b.opset < 13 else _static_or_arg(b, node, args, 1)
    return b.call(onnx_unsqueeze, args[0], axes)


@register_converter("Shape")
def _shape(b, node, args):
    return b.call(onnx_shape, args[0], int(node.attr("start", 0)), node.attr("end"))


@register_converter("Size")
def _size(b, node, args):
    return b.call(onnx_size, args[0])


@register_converter("Expand")
def _expand(b, node, args):
    return b.call(onnx_expand, args[0], _static_or_arg(b, node, args, 1))


@register_converter("Tile")
def _tile(b, node, args):
    return b.call(onnx_tile, args[0], _static_or_arg(b, node, args, 1))


@register_converter("ConstantOfShape")
def _constant_of_shape(b, node, args):
    value = node.attr("value")
    value = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value)
    shape = _static_or_arg(b, node, args, 0)
    if isinstance(shape, list) and int(np.prod(shape)) <= 1 << 16:  # small constant: a buffer
        return b.const_tensor(np.full([int(s) for s in shape], value.reshape(-1)[0], dtype=value.dtype),
                              node.outputs[0].name)
    return b.call(onnx_constant_of_shape, shape, b.const_tensor(value, node.outputs[0].name + "_value"))


@register_converter("Range")
def _range(b, node, args):
    vals = [b.static(node.input(i)) for i in range(3)]
    if all(v is not None for v in vals):  # a constant: a buffer (follows the module's device)
        start, limit, delta = (v.reshape(-1)[0] for v in vals)
        return b.const_tensor(np.arange(start, limit, delta).astype(vals[0].dtype), node.outputs[0].name)
    return b.call(onnx_range, args[0], args[1], args[2])


@register_converter("Constant")
def _constant(b, node, args):
    arr = _constant_attr_value(node)
    if arr is None:
        raise b.unsupported(node, "only dense tensor / numeric Constant values are supported")
    return b.const_tensor(arr, node.outputs[0].name)


@register_converter("Gather")
def _gather(b, node, args):
    axis = int(node.attr("axis", 0))
    data = b.exclusive_const(node, 0)
    idx_v = node.input(1)
    if (data is not None and data.ndim == 2 and axis in (0, -2) and not idx_v.is_const
            and (idx_v.dtype is None or idx_v.dtype.kind in "iu")):
        emb = nn.utils.skip_init(nn.Embedding, data.shape[0], data.shape[1], dtype=_torch_dtype(data.dtype))
        _load_(emb.weight, data)
        path = b.add_module(node, emb, {"weight": ParamBinding(node.input(0).name)})
        return b.call_module(path, args[1])
    return b.call(onnx_gather, args[0], args[1], axis)


@register_converter("GatherElements")
def _gather_elements(b, node, args):
    return b.call(torch.gather, args[0], int(node.attr("axis", 0)), b.method("long", args[1]))


@register_converter("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
                    "ReduceL1", "ReduceL2", "ReduceLogSumExp")
def _reduce(b, node, args):
    op = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min",
          "ReduceProd": "prod", "ReduceSumSquare": "sumsquare", "ReduceL1": "l1", "ReduceL2": "l2",
          "ReduceLogSumExp": "logsumexp"}[node.op_type]
    axes_as_input = b.opset >= (13 if node.op_type == "ReduceSum" else 18)
    axes = _static_or_arg(b, node, args, 1) if axes_as_input else node.attr("axes")
    return b.call(onnx_reduce, args[0], axes, int(node.attr("keepdims", 1)),
                  int(node.attr("noop_with_empty_axes", 0)), op)


@register_converter("ArgMax", "ArgMin")
def _argmax(b, node, args):
    return b.call(onnx_argextreme, args[0], int(node.attr("axis", 0)), int(node.attr("keepdims", 1)),
                  int(node.attr("select_last_index", 0)), "max" if node.op_type == "ArgMax" else "min")


@register_converter("Pad")
def _pad(b, node, args):
    mode = _attr_str(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise b.unsupported(node, f"mode '{mode}'")
    if b.opset < 11:
        pads, value, axes = node.attr("pads"), float(node.attr("value", 0.0)), None
    else:
        pads = _static_or_arg(b, node, args, 1)
        value = _static_or_arg(b, node, args, 2, as_list=False)
        axes = _static_or_arg(b, node, args, 3)
    return b.call(onnx_pad, args[0], pads, value, axes, mode)


@register_converter("Resize", "Upsample")
def _resize(b, node, args):
    mode = _attr_str(node, "mode", "nearest")
    coord = _attr_str(node, "coordinate_transformation_mode", "half_pixel")
    nearest = _attr_str(node, "nearest_mode", "round_prefer_floor")
    if node.op_type == "Upsample":
        coord, nearest = "asymmetric", "floor"
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise b.unsupported(node, f"mode '{mode}'")
    if coord not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_half_pixel_for_nn", "half_pixel_symmetric"):
        raise b.unsupported(node, f"coordinate_transformation_mode '{coord}'")
    if node.attr("antialias", 0):
        raise b.unsupported(node, "antialias=1")
    if _attr_str(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise b.unsupported(node, "keep_aspect_ratio_policy other than 'stretch'")
    if node.op_type == "Upsample" or b.opset < 11:
        scales_i, sizes_i = 1, None
    else:
        scales_i, sizes_i = 2, 3
    scales = _static_or_arg(b, node, args, scales_i) if node.input(scales_i) is not None else None
    sizes = _static_or_arg(b, node, args, sizes_i) if sizes_i is not None and node.input(sizes_i) is not None else None
    if isinstance(scales, list) and not scales:
        scales = None
    if isinstance(sizes, list) and not sizes:
        sizes = None
    if scales is None and sizes is None:
        raise b.unsupported(node, "neither scales nor sizes given")
    axes = node.attr("axes")
    mode = "nearest" if mode == "nearest" else "linear"
    return b.call(onnx_resize, args[0], scales, sizes, None if axes is None else [int(a) for a in axes],
                  mode, coord, nearest)


# ---------------------------------------------------------------------------- matmul family
@register_converter("MatMul")
def _matmul(b, node, args):
    wb = b.weight(node, 1)
    if wb is not None and wb[0].ndim == 2 and not node.input(0).is_const:
        w, wname, pre = wb
        bias_add = b.bias_adds.get(id(node))
        lin = nn.utils.skip_init(nn.Linear, w.shape[0], w.shape[1], bias=bias_add is not None,
                                 dtype=_torch_dtype(w.dtype))
        bind = ParamBinding(wname, _compose(pre, (("transpose",),)))
        _load_(lin.weight, w.T)
        binds = {"weight": bind}
        if bias_add is not None:
            add, bi = bias_add
            _load_(lin.bias, add.input(bi).const)
            binds["bias"] = ParamBinding(add.input(bi).name)
        return b.call_module(b.add_module(node, lin, binds), args[0])
    return b.call(torch.matmul, args[0], args[1])


@register_converter("Gemm")
def _gemm(b, node, args):
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    trans_a, trans_b = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    has_c = node.input(2) is not None and beta != 0.0
    wb = b.weight(node, 1)
    a = args[0]
    if trans_a:
        a = b.call(torch.transpose, a, 0, 1)
    if wb is None or wb[0].ndim != 2 or alpha == 0.0 or node.input(0).is_const:
        bmat = args[1]
        if trans_b:
            bmat = b.call(torch.transpose, bmat, 0, 1)
        y = b.call(torch.matmul, a, bmat)
        if alpha != 1.0:
            y = b.call(operator.mul, y, alpha)
        if has_c:
            c = args[2]
            y = b.call(operator.add, y, c if beta == 1.0 else b.call(operator.mul, c, beta))
        return y
    w, wname, pre = wb
    steps = _compose(pre, () if trans_b else (("transpose",),))
    if alpha != 1.0:
        steps += (("scale", alpha),)
    wbind = ParamBinding(wname, steps)
    wt = (w if trans_b else w.T) * np.asarray(alpha, dtype=w.dtype) if alpha != 1.0 else (w if trans_b else w.T)
    n_out, k_in = wt.shape
    c = b.exclusive_const(node, 2) if has_c else None
    fold_c = c is not None and c.shape in ((n_out,), (1, n_out))
    lin = nn.utils.skip_init(nn.Linear, k_in, n_out, bias=fold_c, dtype=_torch_dtype(w.dtype))
    _load_(lin.weight, wt)
    binds = {"weight": wbind}
    if fold_c:
        csteps: tuple = ((("reshape", (n_out,)),) if c.ndim == 2 else ())
        if beta != 1.0:
            csteps += (("scale", beta),)
        cbind = ParamBinding(node.input(2).name, csteps)
        _load_(lin.bias, cbind.to_torch(c))
        binds["bias"] = cbind
    y = b.call_module(b.add_module(node, lin, binds), a)
    if has_c and not fold_c:
        cn = args[2]
        y = b.call(operator.add, y, cn if beta == 1.0 else b.call(operator.mul, cn, beta))
    return y


# ---------------------------------------------------------------------------- conv family
def _resolve_pads(b: Builder, node: Node, x: Value, kernel, strides, dilations):
    """Explicit ONNX pads, or ``(zeros, upper)`` when SAME padding must be computed at run time."""
    n = len(kernel)
    auto = _attr_str(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return [int(p) for p in node.attr("pads", [0] * (2 * n))], None
    if auto == "VALID":
        return [0] * (2 * n), None
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        shape = b.shape(x)
        if shape is not None and len(shape) == n + 2 and all(isinstance(d, int) for d in shape[2:]):
            return _same_pads(shape[2:], kernel, strides, dilations, auto == "SAME_UPPER"), None
        return [0] * (2 * n), auto == "SAME_UPPER"
    raise b.unsupported(node, f"auto_pad '{auto}'")


def _pad_input(b: Builder, x: fx.Node, pads, dyn, kernel, strides, dilations, value: float, symmetric_ok):
    """Emit run-time / asymmetric padding; returns (x, symmetric padding for the op)."""
    n = len(kernel)
    if dyn is not None:
        x = b.call(onnx_same_pad, x, list(kernel), list(strides), list(dilations), dyn, value)
    if pads[:n] == pads[n:] and symmetric_ok(pads[:n]):
        return x, list(pads[:n])
    if any(pads):
        x = b.call(F.pad, x, _torch_pads(pads), value=value)
    return x, [0] * n


@register_converter("Conv")
def _conv(b, node, args):
    w = b.exclusive_const(node, 1)
    bias = b.exclusive_const(node, 2) if node.input(2) is not None else None
    wv = node.input(1)
    wshape = b.shape(wv)
    n = len(wshape) - 2 if wshape is not None else len(node.attr("kernel_shape", []))
    if n not in (1, 2, 3):
        raise b.unsupported(node, "only 1-D, 2-D and 3-D convolutions")
    kernel = list(wshape[2:]) if wshape is not None else [int(k) for k in node.attr("kernel_shape")]
    strides = [int(s) for s in node.attr("strides", [1] * n)]
    dil = [int(d) for d in node.attr("dilations", [1] * n)]
    group = int(node.attr("group", 1))
    pads, dyn = _resolve_pads(b, node, node.input(0), kernel, strides, dil)
    x, padding = _pad_input(b, args[0], pads, dyn, kernel, strides, dil, 0.0, lambda p: True)
    module_ok = w is not None and (node.input(2) is None or bias is not None) and not node.input(0).is_const
    if not module_ok:
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
        return b.call(fn, x, args[1], args[2], strides, padding, dil, group)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    conv = nn.utils.skip_init(cls, w.shape[1] * group, w.shape[0], tuple(w.shape[2:]), stride=tuple(strides),
                              padding=tuple(padding), dilation=tuple(dil), groups=group,
                              bias=bias is not None, dtype=_torch_dtype(w.dtype))
    _load_(conv.weight, w)
    binds = {"weight": ParamBinding(wv.name)}
    if bias is not None:
        _load_(conv.bias, bias)
        binds["bias"] = ParamBinding(node.input(2).name)
    return b.call_module(b.add_module(node, conv, binds), x)


@register_converter("ConvTranspose")
def _conv_transpose(b, node, args):
    wv = node.input(1)
    wshape = b.shape(wv)
    if wshape is None:
        raise b.unsupported(node, "weight shape unknown")
    n = len(wshape) - 2
    if n not in (1, 2, 3):
        raise b.unsupported(node, "only 1-D, 2-D and 3-D transposed convolutions")
    kernel = list(wshape[2:])
    strides = [int(s) for s in node.attr("strides", [1] * n)]
    dil = [int(d) for d in node.attr("dilations", [1] * n)]
    group = int(node.attr("group", 1))
    out_pad = [int(p) for p in node.attr("output_padding", [0] * n)]
    auto = _attr_str(node, "auto_pad", "NOTSET")
    out_shape = node.attr("output_shape")
    pads = [int(p) for p in node.attr("pads", [0] * (2 * n))]
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        xs = b.shape(node.input(0))
        if xs is None or len(xs) != n + 2 or not all(isinstance(d, int) for d in xs[2:]):
            raise b.unsupported(node, "output_shape / auto_pad SAME need a static input spatial shape")
        target = list(out_shape)[-n:] if out_shape is not None else [int(xs[2 + i]) * strides[i] for i in range(n)]
        pads = [0] * (2 * n)
        for i in range(n):
            total = strides[i] * (int(xs[2 + i]) - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - int(target[i])
            if total < 0:
                raise b.unsupported(node, "output_shape larger than the natural output (needs output_padding)")
            if auto == "SAME_UPPER":
                pads[i], pads[i + n] = total // 2, total - total // 2
            else:
                pads[i], pads[i + n] = total - total // 2, total // 2
    elif auto == "VALID":
        pads = [0] * (2 * n)
    elif auto not in ("NOTSET", ""):
        raise b.unsupported(node, f"auto_pad '{auto}'")
    symmetric = pads[:n] == pads[n:]
    padding = pads[:n] if symmetric else [0] * n
    if any(op >= max(s, d) for op, s, d in zip(out_pad, strides, dil)):
        raise b.unsupported(node, "output_padding must be smaller than stride or dilation")
    w = b.exclusive_const(node, 1)
    bias = b.exclusive_const(node, 2) if node.input(2) is not None else None
    if w is not None and (node.input(2) is None or bias is not None) and not node.input(0).is_const:
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n]
        m = nn.utils.skip_init(cls, w.shape[0], w.shape[1] * group, tuple(kernel), stride=tuple(strides),
                               padding=tuple(padding), output_padding=tuple(out_pad), groups=group,
                               bias=bias is not None, dilation=tuple(dil), dtype=_torch_dtype(w.dtype))
        _load_(m.weight, w)
        binds = {"weight": ParamBinding(wv.name)}
        if bias is not None:
            _load_(m.bias, bias)
            binds["bias"] = ParamBinding(node.input(2).name)
        y = b.call_module(b.add_module(node, m, binds), args[0])
    else:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        y = b.call(fn, args[0], args[1], args[2], strides, padding, out_pad, group, dil)
    if not symmetric:  # crop: negative F.pad
        y = b.call(F.pad, y, [-p for p in _torch_pads(pads)])
    return y


# ---------------------------------------------------------------------------- pooling
@register_converter("MaxPool", "AveragePool")
def _pool(b, node, args):
    kernel = [int(k) for k in node.attr("kernel_shape")]
    n = len(kernel)
    if n not in (1, 2, 3):
        raise b.unsupported(node, "only 1-D, 2-D and 3-D pooling")
    strides = [int(s) for s in node.attr("strides", [1] * n)]
    dil = [int(d) for d in node.attr("dilations", [1] * n)]
    ceil = bool(node.attr("ceil_mode", 0))
    pads, dyn = _resolve_pads(b, node, node.input(0), kernel, strides, dil)
    if node.op_type == "MaxPool":
        if int(node.attr("storage_order", 0)) != 0 and _used(b.graph, node.outputs[1:]):
            raise b.unsupported(node, "storage_order=1 indices")
        x, padding = _pad_input(b, args[0], pads, dyn, kernel, strides, dil, float("-inf"),
                                lambda p: all(2 * pi <= (k - 1) * d + 1 for pi, k, d in zip(p, kernel, dil)))
        return b.call(_MAX_POOL[n], x, kernel, strides, padding, dil, ceil_mode=ceil)
    if any(d != 1 for d in dil):
        raise b.unsupported(node, "dilated AveragePool")
    include = bool(node.attr("count_include_pad", 0))
    x = args[0]
    if dyn is not None:
        x = b.call(onnx_same_pad, x, kernel, strides, dil, dyn, 0.0)  # SAME pads count as input
    if pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel)):
        return b.call(_AVG_POOL[n], x, kernel, strides, pads[:n], ceil, include)
    return b.call(onnx_avg_pool_padded, x, kernel, strides, pads, ceil, include)


@register_converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b, node, args):
    return b.call(onnx_global_pool, args[0], "avg" if node.op_type == "GlobalAveragePool" else "max")


# ---------------------------------------------------------------------------- normalization
@register_converter("BatchNormalization")
def _batchnorm(b, node, args):
    if int(node.attr("training_mode", 0)) or _used(b.graph, node.outputs[1:]):
        raise b.unsupported(node, "training_mode=1 / running-statistics outputs")
    eps = float(node.attr("epsilon", 1e-5))
    momentum = float(node.attr("momentum", 0.9))
    consts = [b.exclusive_const(node, i) for i in range(1, 5)]
    if all(c is not None and c.ndim == 1 for c in consts) and not node.input(0).is_const:
        scale, bias, mean, var = consts
        r = b.rank(node.input(0))
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(r, _AnyRankBatchNorm)
        bn = cls(scale.shape[0], eps=eps, momentum=1.0 - momentum, dtype=_torch_dtype(scale.dtype))
        _load_(bn.weight, scale)
        _load_(bn.bias, bias)
        _load_(bn.running_mean, mean)
        _load_(bn.running_var, var)
        names = [node.input(i).name for i in range(1, 5)]
        binds = {"weight": ParamBinding(names[0]), "bias": ParamBinding(names[1]),
                 "running_mean": ParamBinding(names[2], (), "buffer"),
                 "running_var": ParamBinding(names[3], (), "buffer")}
        return b.call_module(b.add_module(node, bn, binds), args[0])
    # shared/tied statistics: functional form; running stats are statistics, never trained
    mean, var = b.method("detach", args[3]), b.method("detach", args[4])
    return b.call(F.batch_norm, args[0], mean, var, args[1], args[2], False, 0.0, eps)


@register_converter("LayerNormalization")
def _layernorm(b, node, args):
    if _used(b.graph, node.outputs[1:]):
        raise b.unsupported(node, "Mean / InvStdDev outputs")
    axis = int(node.attr("axis", -1))
    eps = float(node.attr("epsilon", 1e-5))
    scale = b.exclusive_const(node, 1)
    bias = b.exclusive_const(node, 2) if node.input(2) is not None else None
    r = b.rank(node.input(0))
    k = -axis if axis < 0 else (r - axis if r is not None else None)
    xs = b.shape(node.input(0))
    ok = (scale is not None and (node.input(2) is None or (bias is not None and bias.shape == scale.shape))
          and k is not None and scale.ndim == k and not node.input(0).is_const)
    if ok and xs is not None and len(xs) >= k:
        ok = all(not isinstance(d, int) or d == s for d, s in zip(xs[len(xs) - k:], scale.shape))
    if not ok:
        return b.call(onnx_layer_norm, args[0], args[1], args[2], axis, eps)
    ln = nn.LayerNorm(tuple(scale.shape), eps=eps, bias=bias is not None, dtype=_torch_dtype(scale.dtype))
    _load_(ln.weight, scale)
    binds = {"weight": ParamBinding(node.input(1).name)}
    if bias is not None:
        _load_(ln.bias, bias)
        binds["bias"] = ParamBinding(node.input(2).name)
    return b.call_module(b.add_module(node, ln, binds), args[0])


@register_converter("InstanceNormalization")
def _instance_norm(b, node, args):
    return b.call(F.instance_norm, args[0], None, None, args[1], args[2], True, 0.0,
                  float(node.attr("epsilon", 1e-5)))


@register_converter("Dropout")
def _dropout(b, node, args):
    if _used(b.graph, node.outputs[1:]):
        raise b.unsupported(node, "mask output")
    ratio = node.attr("ratio", 0.5)
    if node.input(1) is not None:
        s = b.static(node.input(1))
        if s is None:
            return args[0]  # dynamic ratio: identity (inference semantics)
        ratio = float(s.reshape(-1)[0])
    return b.call_module(b.add_module(node, nn.Dropout(float(ratio)), {}), args[0])


def _used(g: Graph, values: Sequence[Value]) -> bool:
    return any(v.uses or any(o is v for o in g.outputs) for v in values if not v.meta.get("optional_unused"))


# ============================================================================ entry points
def _topo_order(graph: Graph) -> list[Node]:
    """Topological order of the nodes (stable), without mutating the graph."""
    return graph.topological_order()


def to_torch(graph: Graph, *, trainable_scalars: bool = False) -> fx.GraphModule:
    """Lower ``graph`` to a trainable ``torch.fx.GraphModule`` (in eval mode) with ONNX semantics.

    Raises :class:`UnsupportedOpError` naming the first node without a lowering.
    """
    b = Builder(graph, trainable_scalars=trainable_scalars)
    nodes = _topo_order(graph)
    for node in nodes:  # fail fast, before building anything
        if node.domain not in _DEFAULT_DOMAINS or node.has_subgraphs or node.op_type not in CONVERTERS:
            raise b.unsupported(node)

    used_args: set[str] = set()
    for v in graph.inputs:
        name = _identifier(v.name)
        cand, k = name, 0
        while cand in used_args:
            k += 1
            cand = f"{name}_{k}"
        used_args.add(cand)
        ph = b.fx.placeholder(cand)
        ph.meta["nnsculpt_value"] = v.name
        b.env[id(v)] = ph

    for node in nodes:
        if id(node) not in b.absorbed:
            b.lower(node)

    results = [b.value(v) for v in graph.outputs]
    b.fx.output(results[0] if len(results) == 1 else tuple(results))
    b.fx.lint()
    b.fx._tracer_cls = NNSculptTracer  # GraphModule keeps it for pickling (re-tracing)
    gm = fx.GraphModule(b.root, b.fx, class_name="NNSculptModule")
    gm.eval()
    pmap = dict(b.param_map)
    setattr(gm, PARAM_MAP_ATTR, pmap)
    try:  # keep the map across copy.deepcopy(gm)
        from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

        gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[PARAM_MAP_ATTR] = pmap
    except Exception:  # pragma: no cover - older torch
        pass
    gm.meta["nnsculpt_graph_name"] = graph.name
    return gm


def write_back(graph: Graph, module: nn.Module, param_map: dict[str, ParamBinding] | None = None) -> list[str]:
    """Copy the module's parameters/buffers back into ``graph``'s initializers.

    Inverts the transforms recorded at lowering time (transposes, alpha/beta scaling,
    reshapes), keeps each initializer's dtype and shape, and only rewrites initializers
    whose torch value differs from the lowered current value. Returns the changed names.
    """
    pmap = param_map if param_map is not None else getattr(module, PARAM_MAP_ATTR, None)
    if pmap is None:
        raise IRError("write_back: module has no parameter map (was it built by to_torch?)")
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(dict(module.named_buffers(remove_duplicate=False)))
    changed: list[str] = []
    for qual, bind in pmap.items():
        t = tensors.get(qual)
        if t is None:
            raise IRError(f"write_back: module has no parameter/buffer '{qual}'")
        v = graph.initializers.get(bind.initializer)
        if v is None or v.const is None:
            raise IRError(f"write_back: graph '{graph.name}' has no initializer '{bind.initializer}' "
                          f"(target of '{qual}')")
        cur = _to_numpy(t)
        old = v.const
        if cur.shape == bind.to_torch(old).shape and np.array_equal(cur, bind.to_torch(old).astype(cur.dtype)):
            continue
        new = bind.to_initializer(cur, old.shape).astype(old.dtype, copy=False)
        if new.shape != old.shape:
            raise IRError(f"write_back: '{qual}' has shape {tuple(cur.shape)}, initializer "
                          f"'{bind.initializer}' needs {tuple(old.shape)}")
        if np.array_equal(new, old):
            continue
        v.set_const(np.array(new, copy=True))
        if bind.initializer not in changed:
            changed.append(bind.initializer)
    return changed
