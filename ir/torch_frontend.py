"""PyTorch frontend: :func:`from_torch` turns an ``nn.Module`` into an IR :class:`Graph`.

Main path (``graph.meta["frontend"] == "torch.fx"``):

1. ``torch.fx.symbolic_trace`` the module (in ``eval()`` mode; the training flags of all
   submodules are restored afterwards);
2. run ``ShapeProp`` with the example inputs, recording dtype/shape of every fx node (and
   the value of every non-tensor node: sizes, dtypes...). With ``dynamic_batch`` the graph
   is run a second time with the batch grown by one: tensor dims and python ints that
   change are batch-dependent. Such dims become the symbolic dim ``"N"`` and such ints
   (``x.size(0)``, ``x.shape[0] * 4``...) are computed in the graph with
   ``Shape``/``Gather``/``Unsqueeze``/``Concat``;
3. map every fx node to ONNX-semantics IR nodes through three tables,
   :data:`MODULE_CONVERTERS` (by module class), :data:`FUNCTION_CONVERTERS` (by function
   object) and :data:`METHOD_CONVERTERS` (by ``Tensor`` method name). Nodes made for
   ``call_module`` target ``layer1.0.conv1`` are named ``layer1.0.conv1`` (helper nodes of
   a decomposition ``layer1.0.conv1/<Op>``) and carry ``meta["source"] = "layer1.0.conv1"``;
   function/method nodes are named after the fx node and their source is the enclosing
   module path (fx ``nn_module_stack``) or the fx node name at top level. Parameters become
   initializers named by their qualified name (``layer1.0.conv1.weight``).
   fx nodes whose arguments hold no graph value (``torch.arange(16)``, arithmetic on static
   sizes, ``torch._assert`` of specialised arguments) are folded to constants.

Fallback (``graph.meta["frontend"] == "torch.onnx.export"``): when tracing fails
(``TraceError``, data-dependent control flow) or an fx node has no converter, the module is
exported with the TorchScript ONNX exporter and imported with :func:`from_onnx`; the reason
is logged and kept in ``graph.meta["frontend_fallback_reason"]``.
"""

from __future__ import annotations

import inspect
import io
import logging
import math
import operator
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UnsupportedOpError
from .graph import Graph, Value

log = logging.getLogger("nnsculpt.ir")

_I64_MAX = int(np.iinfo(np.int64).max)

__all__ = ["from_torch", "MODULE_CONVERTERS", "FUNCTION_CONVERTERS", "METHOD_CONVERTERS"]


class _ArgError(ValueError):
    """Bad arguments to :func:`from_torch` (never triggers the fallback)."""


def _unsupported(msg: str) -> UnsupportedOpError:
    return UnsupportedOpError(msg)


# ----------------------------------------------------------------------------- public API
def from_torch(module: nn.Module, example_inputs, *, input_names=None, output_names=None,
               dynamic_batch: bool = True, opset: int = 17, name: str | None = None,
               fallback: bool = True) -> Graph:
    """Convert ``module`` into an IR :class:`Graph` with ONNX semantics at ``opset``.

    ``example_inputs``: a tensor or a tuple of positional arguments (tensors become graph
    inputs; other values are specialised into the graph). ``input_names`` names the tensor
    inputs (default: the ``forward`` parameter names); ``output_names`` the flattened
    outputs (default ``output`` or ``output_0``, ``output_1``...). With ``dynamic_batch``
    dim 0 of every input, and every dim derived from it, is the symbolic dim ``"N"``.
    With ``fallback=False`` an fx failure raises :class:`UnsupportedOpError` instead of
    falling back to ``torch.onnx.export``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise _ArgError(f"example_inputs must be a tensor or a tuple of arguments, got {type(example_inputs).__name__}")
    n_tensors = sum(isinstance(a, torch.Tensor) for a in example_inputs)
    if input_names is not None and len(input_names) != n_tensors:
        raise _ArgError(f"input_names has {len(input_names)} names for {n_tensors} tensor inputs")
    gname = name or type(module).__name__
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        try:
            g = _from_fx(module, example_inputs, input_names, output_names, dynamic_batch, opset, gname)
            g.meta["frontend"] = "torch.fx"
            log.info("from_torch(%s): converted with torch.fx (%d nodes)", gname, len(g.nodes))
            return g
        except _ArgError:
            raise
        except Exception as e:  # noqa: BLE001 - any fx failure may fall back
            reason = f"{type(e).__name__}: {_first_line(e)}"
            if not fallback:
                if isinstance(e, UnsupportedOpError):
                    raise
                raise UnsupportedOpError(f"{gname}: torch.fx conversion failed: {reason}") from e
            log.warning("from_torch(%s): torch.fx path failed (%s); falling back to torch.onnx.export",
                        gname, reason)
            try:
                g = _from_export(module, example_inputs, input_names, output_names, dynamic_batch, opset, gname)
            except _ArgError:
                raise
            except Exception as e2:  # noqa: BLE001
                raise UnsupportedOpError(
                    f"{gname}: cannot convert: torch.fx path failed ({reason}) and the torch.onnx.export "
                    f"fallback failed ({type(e2).__name__}: {_first_line(e2)})") from e2
            g.meta["frontend"] = "torch.onnx.export"
            g.meta["frontend_fallback_reason"] = reason
            log.info("from_torch(%s): converted with torch.onnx.export (%d nodes)", gname, len(g.nodes))
            return g
    finally:
        for m, t in modes:
            m.training = t


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else repr(e))[:500]


# ------------------------------------------------------------------------------ helpers
_NP_DTYPES = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
    torch.uint8: np.uint8, torch.bool: np.bool_,
}


def _np_dtype(tdt) -> np.dtype:
    try:
        return np.dtype(_NP_DTYPES[tdt])
    except KeyError:
        raise _unsupported(f"dtype {tdt} has no numpy/ONNX equivalent here") from None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    _np_dtype(t.dtype)
    return t.numpy().copy()


class _TI:
    """Tensor info recorded by the propagation runs."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype

    def __eq__(self, other):
        return isinstance(other, _TI) and self.shape == other.shape and self.dtype == other.dtype

    def __repr__(self):  # pragma: no cover
        return f"_TI({self.shape}, {self.dtype})"


def _summarize(obj):
    if isinstance(obj, torch.Tensor):
        return _TI(obj.shape, obj.dtype)
    if isinstance(obj, torch.Size):
        return tuple(int(d) for d in obj)
    if isinstance(obj, tuple):
        return tuple(_summarize(o) for o in obj)
    if isinstance(obj, list):
        return [_summarize(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _summarize(v) for k, v in obj.items()}
    return obj


def _has_tensor_info(s) -> bool:
    if isinstance(s, _TI):
        return True
    if isinstance(s, (tuple, list)):
        return any(_has_tensor_info(x) for x in s)
    if isinstance(s, dict):
        return any(_has_tensor_info(x) for x in s.values())
    return False


class _Recorder:
    """Mixin for fx interpreters: keeps a summary of every node's result, and the full
    result of nodes none of whose inputs is a tensor (candidates for constant folding)."""

    def _init_rec(self, keep_consts: bool):
        self.summaries: dict = {}
        self.consts: dict = {}
        self._keep_consts = keep_consts
        # fx's extra traceback logs a structured artifact, which imports torch._inductor
        # (seconds) the first time a run fails: a failing batch-size probe must be cheap
        self.extra_traceback = False
        return self

    def run_node(self, n):
        result = super().run_node(n)
        s = _summarize(result)
        self.summaries[n] = s
        if self._keep_consts and n.op in ("call_function", "call_method"):
            ins = n.all_input_nodes
            if not any(_has_tensor_info(self.summaries.get(i)) for i in ins):
                self.consts[n] = result
        return result


class _RecShapeProp(_Recorder, ShapeProp):
    pass


class _RecInterp(_Recorder, torch.fx.Interpreter):
    pass


def _contig(a: np.ndarray) -> np.ndarray:
    """C-contiguous copy-if-needed that keeps 0-d arrays 0-d (np.ascontiguousarray does not)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _fmt_num(x) -> str:
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, float):
        if math.isinf(x):
            return "-inf" if x < 0 else "inf"
        return repr(round(x, 6))
    return str(x)


def _tup(v, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1 and n > 1:
            return [int(v[0])] * n
        return [int(x) for x in v]
    return [int(v)] * n


class _Dyn:
    """A python int that depends on the batch size (e.g. ``x.size(0)``).

    Either dim ``axis`` of graph value ``src`` or a computed int64 scalar; materialised
    lazily (``_FxConverter.dyn_scalar`` / ``dyn_vec``) so that ``x.view(x.size(0), -1)``
    needs no shape ops at all (``Reshape`` copies dim 0 with a ``0`` entry).
    """

    __slots__ = ("src", "axis", "scalar", "vec")

    def __init__(self, src: Value | None = None, axis: int | None = None, scalar: Value | None = None):
        self.src, self.axis, self.scalar, self.vec = src, axis, scalar, None


def _contains_ir(obj) -> bool:
    if isinstance(obj, (Value, _Dyn)):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_contains_ir(x) for x in obj)
    if isinstance(obj, dict):
        return any(_contains_ir(x) for x in obj.values())
    if isinstance(obj, slice):
        return any(_contains_ir(x) for x in (obj.start, obj.stop, obj.step))
    return False


def _rank(x: Value) -> int:
    if not isinstance(x, Value):
        raise _unsupported(f"expected a tensor, got {type(x).__name__}")
    if x.shape is None:
        raise _unsupported(f"rank of '{x.name}' is unknown")
    return len(x.shape)


def _shape_args(args) -> list:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return list(args[0])
    return list(args)


def _onnx_elem(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _promote(*xs) -> np.dtype:
    """Dtype both operands of a comparison are computed in (torch-like promotion)."""
    dts = [x.dtype for x in xs if isinstance(x, Value) and x.dtype is not None]
    dt = np.result_type(*dts) if dts else np.dtype(np.float32)
    if any(isinstance(x, float) for x in xs) and dt.kind not in "f":
        dt = np.dtype(np.float32)
    if any(isinstance(x, _Dyn) for x in xs) and not dts:
        dt = np.dtype(np.int64)
    return np.dtype(dt)


# --------------------------------------------------------------------------- converter
class _FxConverter:
    """Walks the fx graph once, building the IR graph node by node."""

    def __init__(self, gm: torch.fx.GraphModule, opset: int, gname: str, rec_a: _Recorder,
                 rec_b: _Recorder | None, batch: tuple[int, int] | None):
        self.gm = gm
        self.opset = opset
        self.g = Graph(gname)
        self.g.opset_imports = {"": opset}
        self.modules = dict(gm.named_modules())
        self.sum_a = rec_a.summaries
        self.consts_a = rec_a.consts
        self.sum_b = rec_b.summaries if rec_b is not None else None
        self.batch = batch
        self.env: dict = {}
        self.known: dict[int, tuple[Value, Any, Any]] = {}
        self._param_cache: dict = {}
        self._const_cache: dict = {}
        self._shape_cache: dict[int, Value] = {}
        self._dyn_cache: dict[tuple[int, int], _Dyn] = {}
        self._order: dict | None = None
        # per fx node
        self.fx_node = None
        self.name = ""
        self.source = ""
        self.path = ""
        self._main_done = False
        self._emitted: list = []

    # -------------------------------------------------------------- building blocks
    def emit(self, op: str, inputs, attrs: dict | None = None, *, outputs: int = 1, main: bool = False,
             dtype=None):
        if main and not self._main_done:
            nm = self.name
            self._main_done = True
        else:
            nm = f"{self.name}/{op}"
        meta = {"source": self.source}
        if self.fx_node is not None:
            meta["fx_node"] = self.fx_node.name
        node = self.g.add_node(op, list(inputs), outputs, attrs or {}, name=nm, meta=meta)
        self._emitted.append(node)
        if dtype is not None:
            for o in node.outputs:
                o.dtype = np.dtype(dtype)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, array, purpose: str = "const", *, dtype=None, share: bool = True) -> Value:
        arr = np.asarray(array, dtype=dtype)
        key = None
        if share and arr.size <= 64:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            v = self._const_cache.get(key)
            if v is not None:
                return v
        if key is not None and arr.size <= 8:  # shared small constant: named by its content
            base = "_".join([purpose] + [_fmt_num(x) for x in arr.reshape(-1).tolist()])
        else:
            base = f"{self.name}.{purpose}" if self.name else purpose
        v = self.g.add_initializer(base, _contig(arr))
        if key is not None:
            self._const_cache[key] = v
        return v

    def i64(self, values, purpose: str = "shape") -> Value:
        return self.const(np.asarray(values, dtype=np.int64), purpose)

    def param(self, tensor: torch.Tensor, qualname: str, transform: Callable | None = None,
              tag: str = "") -> Value:
        """An initializer for a parameter/buffer (one per tensor and transform)."""
        key = (id(tensor), tag)
        hit = self._param_cache.get(key)
        if hit is not None and hit[0] is tensor:
            return hit[1]
        arr = _to_numpy(tensor)
        if transform is not None:
            arr = transform(arr)
        v = self.g.add_initializer(qualname, _contig(arr))
        self._param_cache[key] = (tensor, v)
        return v

    def mparam(self, m: nn.Module, attr: str, transform=None, tag: str = "") -> Value:
        return self.param(getattr(m, attr), f"{self.path}.{attr}" if self.path else attr, transform, tag)

    def cast(self, x: Value, dtype) -> Value:
        dtype = np.dtype(dtype)
        if x.dtype is not None and x.dtype == dtype:
            return x
        if x.is_const:
            return self.const(x.const.astype(dtype), "cast")
        y = self.emit("Cast", [x], {"to": _onnx_elem(dtype)}, dtype=dtype)
        y.shape = x.shape
        return y

    def operand(self, x, dtype) -> Value:
        """A graph value for an operand of an elementwise op computed in ``dtype``."""
        dtype = np.dtype(dtype) if dtype is not None else None
        if isinstance(x, Value):
            return self.cast(x, dtype) if dtype is not None else x
        if isinstance(x, _Dyn):
            s = self.dyn_scalar(x)
            return self.cast(s, dtype) if dtype is not None else s
        if isinstance(x, (bool, int, float, np.number)):
            return self.const(np.array(x, dtype=dtype if dtype is not None else None), "scalar")
        raise _unsupported(f"{self._where()}: cannot use {type(x).__name__} {x!r} as a tensor operand")

    def shape_of(self, x: Value) -> Value:
        v = self._shape_cache.get(id(x))
        if v is None:
            v = self.emit("Shape", [x], dtype=np.int64)
            self._shape_cache[id(x)] = v
        return v

    def dyn_scalar(self, d: _Dyn) -> Value:
        if d.scalar is None:
            d.scalar = self.emit("Gather", [self.shape_of(d.src), self.i64(d.axis, "index")], {"axis": 0},
                                 dtype=np.int64)
        return d.scalar

    def dyn_vec(self, d: _Dyn) -> Value:
        if d.vec is None:
            d.vec = self.emit("Unsqueeze", [self.dyn_scalar(d), self.i64([0], "axes")], dtype=np.int64)
        return d.vec

    def dims(self, x: Value) -> tuple:
        """``x.shape`` as python ints (static dims) and :class:`_Dyn` (batch-dependent dims)."""
        r = _rank(x)
        out = []
        for i in range(r):
            d = x.shape[i]
            if isinstance(d, int):
                out.append(d)
            else:
                key = (id(x), i)
                dyn = self._dyn_cache.get(key)
                if dyn is None or dyn.src is not x:
                    dyn = self._dyn_cache[key] = _Dyn(src=x, axis=i)
                out.append(dyn)
        return tuple(out)

    def shape_vec(self, elems, *, src: Value | None = None, marker: int | None = None, offset: int = 0) -> Value:
        """An int64 1-D tensor from ints / :class:`_Dyn`. A ``_Dyn`` that is dim ``i - offset``
        of ``src`` at position ``i`` becomes ``marker`` (0 for Reshape-copy, 1 for Expand)."""
        parts: list[Value] = []
        cur: list[int] = []
        for i, e in enumerate(elems):
            if isinstance(e, _Dyn):
                if marker is not None and src is not None and self._same_dim(e, src, i - offset):
                    cur.append(marker)
                    continue
                if cur:
                    parts.append(self.i64(cur))
                    cur = []
                parts.append(self.dyn_vec(e))
            elif isinstance(e, (int, np.integer)) and not isinstance(e, bool):
                cur.append(int(e))
            else:
                raise _unsupported(f"{self._where()}: shape element {e!r} is not an int")
        if cur or not parts:
            parts.append(self.i64(cur))
        if len(parts) == 1:
            return parts[0]
        return self.emit("Concat", parts, {"axis": 0}, dtype=np.int64)

    @staticmethod
    def _same_dim(e: _Dyn, src: Value, axis: int) -> bool:
        """Whether batch-dependent int ``e`` equals dim ``axis`` of ``src``: it *is* that dim,
        or both are the batch dim ``"N"``."""
        if axis < 0 or src.shape is None or axis >= len(src.shape):
            return False
        if e.src is src and e.axis == axis:
            return True
        return (e.src is not None and e.src.shape is not None and e.src.shape[e.axis] == "N"
                and src.shape[axis] == "N")

    def reduce(self, op: str, x: Value, axes, keepdims: bool, *, main: bool = True) -> Value:
        attrs: dict[str, Any] = {"keepdims": int(bool(keepdims))}
        ins = [x]
        if axes is not None:
            axes = [int(a) for a in axes]
            if op == "ReduceSum" or self.opset >= 18:
                ins.append(self.i64(axes, "axes"))
            else:
                attrs["axes"] = axes
        return self.emit(op, ins, attrs, main=main)

    def unsqueeze(self, x: Value, axes, *, main: bool = False) -> Value:
        return self.emit("Unsqueeze", [x, self.i64(list(axes), "axes")], main=main)

    def out_info(self):
        return self.sum_a.get(self.fx_node)

    def out_dtype(self) -> np.dtype | None:
        s = self.out_info()
        if isinstance(s, _TI):
            return _np_dtype(s.dtype)
        return None

    def _where(self) -> str:
        n = self.fx_node
        if n is None:
            return self.name
        return f"fx node '{n.name}' ({n.op} {_target_name(n.target)})"

    def _sym_shape(self, a: _TI, b):
        if not isinstance(b, _TI) or len(b.shape) != len(a.shape):
            return tuple(a.shape) if b is None else None
        out = []
        for da, db in zip(a.shape, b.shape):
            if da == db:
                out.append(da)
            elif self.batch is not None and da == self.batch[0] and db == self.batch[1]:
                out.append("N")
            else:
                out.append(None)
        return tuple(out)

    # -------------------------------------------------------------------- main loop
    def convert(self, call_vals: list, input_names, output_names) -> Graph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(call_vals):
            raise _unsupported(f"module has {len(placeholders)} inputs, got {len(call_vals)} values")
        ti = 0
        for n, val in zip(placeholders, call_vals):
            self._begin(n)
            if isinstance(val, torch.Tensor):
                nm = input_names[ti] if input_names is not None else str(n.target).lstrip("*")
                ti += 1
                a = self.sum_a[n]
                shape = self._sym_shape(a, self.sum_b.get(n) if self.sum_b is not None else None)
                if self.batch is not None and shape and shape[0] is None:
                    shape = ("N",) + shape[1:]
                if nm in self.g.values:
                    raise _ArgError(f"duplicate input name '{nm}'")
                v = self.g.add_input(nm, _np_dtype(val.dtype), shape)
                self.env[n] = v
            else:
                self.env[n] = val
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                continue
            self._begin(n)
            if n.op == "output":
                self._output(n, output_names)
                continue
            res = self._convert_node(n)
            self._finish(n, res)
        return self.g

    def _begin(self, n):
        self.fx_node = n
        self._main_done = False
        self._emitted = []
        if n.op == "call_module":
            self.name = self.path = self.source = str(n.target)
        else:
            stack = n.meta.get("nn_module_stack") or {}
            enclosing = ""
            if stack:
                last = list(stack.values())[-1]
                enclosing = last[0] if isinstance(last, tuple) else str(last)
            self.name = n.name
            self.path = enclosing
            self.source = enclosing or n.name

    def _convert_node(self, n):
        load = lambda a: self.env[a]  # noqa: E731
        args = torch.fx.node.map_arg(n.args, load)
        kwargs = torch.fx.node.map_arg(n.kwargs, load)
        if n.op == "get_attr":
            return self._get_attr(n.target)
        if n.op == "call_module":
            mod = self.modules.get(n.target)
            if getattr(mod, "inplace", False) is True:
                self._check_inplace(n)
            conv = _lookup_module(type(mod))
            if conv is None:
                raise _unsupported(f"no converter for module '{n.target}' ({type(mod).__module__}."
                                   f"{type(mod).__name__})")
            return conv(self, mod, *args, **dict(kwargs))
        if n.op in ("call_function", "call_method"):
            if not _contains_ir((args, kwargs)) and n in self.consts_a:
                return self._fold(self.consts_a[n])
            if kwargs.get("inplace") is True or n.target in _INPLACE_OPERATORS:
                self._check_inplace(n)
            if n.op == "call_function":
                conv = FUNCTION_CONVERTERS.get(n.target)
            else:
                conv = METHOD_CONVERTERS.get(n.target)
                if conv is None and n.target.endswith("_") and not n.target.startswith("_"):
                    conv = METHOD_CONVERTERS.get(n.target[:-1])  # x.relu_() ...
                    if conv is not None:
                        self._check_inplace(n)
            if conv is None:
                raise _unsupported(f"no converter for {self._where()}")
            try:
                return conv(self, *args, **dict(kwargs))
            except TypeError as e:
                raise _unsupported(f"{self._where()}: unsupported arguments ({e})") from e
        raise _unsupported(f"unknown fx op '{n.op}'")

    def _check_inplace(self, n) -> None:
        """An in-place op is converted as a pure one only if nothing reads the mutated
        tensor afterwards through another name (``y = x; x += 1; return y``)."""
        if not n.args or not isinstance(n.args[0], torch.fx.Node):
            return
        src = n.args[0]
        if self._order is None:
            self._order = {node: i for i, node in enumerate(self.gm.graph.nodes)}
        me = self._order[n]
        later = [u for u in src.users if u is not n and self._order[u] > me]
        if later:
            raise _unsupported(f"{self._where()}: in-place update of '{src.name}' which is read again "
                               f"afterwards by {[u.name for u in later]}")

    def _fold(self, obj):
        if isinstance(obj, torch.Tensor):
            return self.g.add_initializer(self.name, _to_numpy(obj))
        if isinstance(obj, torch.Size):
            return tuple(int(d) for d in obj)
        if isinstance(obj, tuple):
            return tuple(self._fold(o) for o in obj)
        if isinstance(obj, list):
            return [self._fold(o) for o in obj]
        return obj

    def _get_attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return self.param(obj, target)
        return obj

    def _finish(self, n, res):
        self.env[n] = res
        a = self.sum_a.get(n)
        b = self.sum_b.get(n) if self.sum_b is not None else None
        self._annotate(res, a, b)
        if self._emitted and not self._main_done and n.op == "call_module":
            # guarantee a node carrying the module path itself (converters flag it; safety net)
            last = self._emitted[-1]
            last.name = self.g.unique_name(self.name)
            self.g._touch()

    def _annotate(self, res, a, b):
        if isinstance(res, Value):
            if isinstance(a, _TI):
                if isinstance(b, _TI) and len(a.shape) != len(b.shape):
                    raise _unsupported(f"{self._where()}: the rank of the result depends on the batch size "
                                       f"({a.shape} vs {b.shape}; e.g. squeeze() at batch 1)")
                if res.is_const or res in self.g.inputs:
                    return
                res.dtype = _np_dtype(a.dtype)
                res.shape = self._sym_shape(a, b)
                self.known[id(res)] = (res, res.dtype, res.shape)
            return
        if isinstance(res, _Dyn):
            return
        if isinstance(res, (tuple, list)) and isinstance(a, (tuple, list)) and len(res) == len(a):
            bb = b if isinstance(b, (tuple, list)) and len(b) == len(a) else [None] * len(a)
            for r, x, y in zip(res, a, bb):
                self._annotate(r, x, y)
            return
        if b is not None and not _contains_ir(res) and not _has_tensor_info(a):
            try:
                differs = bool(a != b)
            except Exception:  # noqa: BLE001
                differs = False
            if differs:
                raise _unsupported(f"{self._where()}: value {a!r} depends on the batch size but was "
                                   "computed statically")

    def _output(self, n, output_names):
        res = torch.fx.node.map_arg(n.args[0], lambda a: self.env[a])
        flat: list = []
        keys: list = []

        def walk(o, key):
            if isinstance(o, (tuple, list)):
                for i, x in enumerate(o):
                    walk(x, None)
            elif isinstance(o, dict):
                for k, x in o.items():
                    walk(x, str(k))
            else:
                flat.append(o)
                keys.append(key)

        walk(res, None)
        if output_names is not None:
            if len(output_names) != len(flat):
                raise _ArgError(f"output_names has {len(output_names)} names for {len(flat)} outputs")
            names = list(output_names)
        elif len(flat) == 1:
            names = [keys[0] or "output"]
        else:
            names = [k or f"output_{i}" for i, k in enumerate(keys)]
        self.name = self.source = "output"
        for v, nm in zip(flat, names):
            if isinstance(v, _Dyn):
                v = self.dyn_scalar(v)
            if not isinstance(v, Value):
                raise _unsupported(f"output '{nm}' is a python {type(v).__name__} ({v!r}), not a tensor")
            self._add_output(v, nm)

    def _add_output(self, v: Value, name: str):
        g = self.g
        rename_ok = v.producer is not None and v not in g.outputs and v not in g.inputs and not v.is_const
        if rename_ok:
            _rename_value(g, v, name)
            g.outputs.append(v)
            return
        other = g.values.get(name)
        if other is not None:
            _rename_value(g, other, g.unique_name(name + "_value"))
        out = Value(name, v.dtype, v.shape)
        g.add_node("Identity", [v], [out], name=g.unique_name(f"{name}/Identity"),
                   meta={"source": "output"})
        if id(v) in self.known:
            self.known[id(out)] = (out, v.dtype, v.shape)
        g.outputs.append(out)


def _rename_value(g: Graph, v: Value, new: str) -> None:
    """Rename a (non-initializer) value; a value already holding ``new`` is moved aside.
    (Graph has no rename API: see the frontend report.)"""
    if v.name == new:
        return
    other = g.values.get(new)
    if other is not None and other is not v:
        _rename_value(g, other, g.unique_name(new + "_value"))
    if g.values.get(v.name) is v:
        del g.values[v.name]
    if v.name in g.initializers and g.initializers[v.name] is v:
        del g.initializers[v.name]
        g.initializers[new] = v
    v.name = new
    g.values[new] = v
    g._touch()


def _target_name(t) -> str:
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    qn = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{mod}.{qn}" if mod and mod != "builtins" else qn


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _lookup_module(cls):
    for c in cls.__mro__:
        conv = MODULE_CONVERTERS.get(c)
        if conv is not None:
            return conv
    return None


# ----------------------------------------------------------------- fx path driver
def _signature_args(module: nn.Module, args: tuple):
    """(concrete_args for symbolic_trace, values for every placeholder in order)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None, list(args)
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None, list(args)
    if len(args) > len(params):
        raise _ArgError(f"{type(module).__name__}.forward takes {len(params)} arguments, got {len(args)}")
    concrete: dict[str, Any] = {}
    vals: list = []
    for i, p in enumerate(params):
        if i < len(args):
            v = args[i]
            if not isinstance(v, torch.Tensor):
                concrete[p.name] = v
        elif p.default is not inspect.Parameter.empty:
            v = p.default
            concrete[p.name] = v
        else:
            raise _ArgError(f"{type(module).__name__}.forward argument '{p.name}' has no example input")
        vals.append(v)
    return (concrete or None), vals


def _check_trace_sound(traced: list, eager: list) -> None:
    """fx tracing is unsound for some python (aliasing through in-place ops, ``x += 1`` on
    an alias...): the traced GraphModule must reproduce the module on the example inputs."""
    if len(traced) != len(eager):
        raise _unsupported(f"the fx trace returns {len(traced)} tensors, the module {len(eager)}")
    for i, (t, e) in enumerate(zip(traced, eager)):
        if t.shape != e.shape or t.dtype != e.dtype:
            raise _unsupported(f"the fx trace differs from the module on output {i}: "
                               f"{tuple(t.shape)}/{t.dtype} vs {tuple(e.shape)}/{e.dtype}")
        if t.dtype.is_floating_point:
            finite = e[torch.isfinite(e)]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            ok = bool(torch.allclose(t, e, rtol=1e-5, atol=1e-5 * scale, equal_nan=True))
        else:
            ok = bool(torch.equal(t, e))
        if not ok:
            raise _unsupported(f"the fx trace does not reproduce the module on output {i} (python-level "
                               "semantics fx cannot see, e.g. in-place updates through an alias)")


def _clone_args(vals) -> list:
    """Fresh copies of tensor arguments: a module may update its inputs in place."""
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in vals]


def _grow_batch(v):
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] >= 1:
        return torch.cat([v, v[:1]], 0)
    return v


def _from_fx(module, args, input_names, output_names, dynamic_batch, opset, gname) -> Graph:
    from .analysis import infer_shapes
    from .onnx_io import to_onnx_model
    from .verifier import verify

    if opset < 13:
        raise _unsupported(f"the torch.fx frontend needs opset >= 13 (got {opset})")
    concrete, call_vals = _signature_args(module, args)
    gm = torch.fx.symbolic_trace(module, concrete_args=concrete)
    with torch.no_grad():
        rec_a = _RecShapeProp(gm)._init_rec(True)
        traced_out = _flatten_torch(rec_a.propagate(*_clone_args(call_vals)))
        eager_out = _flatten_torch(module(*_clone_args(args)))
        _check_trace_sound(traced_out, eager_out)
        rec_b = None
        batch = None
        if dynamic_batch:
            tensors = [v for v in call_vals if isinstance(v, torch.Tensor) and v.dim() >= 1]
            if tensors:
                b0 = int(tensors[0].shape[0])
                try:
                    rec_b = _RecInterp(gm)._init_rec(False)
                    rec_b.run(*[_grow_batch(v) for v in _clone_args(call_vals)])
                    batch = (b0, b0 + 1)
                except Exception as e:  # noqa: BLE001
                    log.warning("from_torch(%s): module does not run with another batch size (%s); "
                                "converting with a static batch", gname, _first_line(e))
                    rec_b = None
    cv = _FxConverter(gm, opset, gname, rec_a, rec_b, batch)
    g = cv.convert(call_vals, input_names, output_names)
    g.meta["dynamic_batch"] = batch is not None
    infer_shapes(g)
    for v, dt, shape in cv.known.values():  # exact shapes from the two runs win over ONNX inference
        v.dtype = dt
        v.shape = shape
    verify(g)
    to_onnx_model(g)  # onnx.checker
    return g


# ------------------------------------------------------------ fallback: onnx export
def _flatten_torch(o) -> list:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _flatten_torch(x)]
    if isinstance(o, dict):
        return [t for x in o.values() for t in _flatten_torch(x)]
    return []


def _scope_to_path(onnx_name: str, module_paths: set[str]) -> str | None:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (TorchScript exporter scopes)."""
    comps = [c for c in onnx_name.split("/") if c][:-1]
    acc = ""
    for c in comps:
        acc = c if (acc and c.startswith(acc + ".")) or not acc else f"{acc}.{c}"
    return acc if acc in module_paths else None


def _from_export(module, args, input_names, output_names, dynamic_batch, opset, gname) -> Graph:
    import onnx

    from .onnx_io import from_onnx

    args = tuple(_clone_args(args))
    with torch.no_grad():
        outs = _flatten_torch(module(*_clone_args(args)))
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if input_names is None:
        try:
            params = [p.name for p in inspect.signature(module.forward).parameters.values()]
        except (TypeError, ValueError):
            params = []
        input_names = [params[i] if i < len(params) else f"input_{i}" for i in tensor_pos]
    if output_names is None:
        output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    elif len(output_names) != len(outs):
        raise _ArgError(f"output_names has {len(output_names)} names for {len(outs)} outputs")
    dyn = None
    if dynamic_batch and tensor_pos:
        batch = args[tensor_pos[0]].shape[0] if args[tensor_pos[0]].dim() else None
        dyn = {}
        for nm, i in zip(input_names, tensor_pos):
            if args[i].dim() >= 1:
                dyn[nm] = {0: "N"}
        for nm, t in zip(output_names, outs):
            if t.dim() >= 1 and t.shape[0] == batch:
                dyn[nm] = {0: "N"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args), buf, dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dyn or None)
    model = onnx.load_from_string(buf.getvalue())
    g = from_onnx(model)
    g.name = gname
    paths = {p for p, _ in module.named_modules() if p}
    for n in g.nodes:
        p = _scope_to_path(n.name, paths)
        if p:
            n.meta["source"] = p
    return g


# ====================================================================== converters
# Module converters: f(cv, module, *args, **kwargs); function converters: f(cv, *args,
# **kwargs) with torch's signature; method converters: f(cv, self, *args, **kwargs).

# ------------------------------------------------------------------ convolution
def _conv_attrs(nd, kernel, stride, padding, dilation, groups):
    k, s, d = _tup(kernel, nd), _tup(stride, nd), _tup(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            p = [0] * (2 * nd)
        elif padding == "same":
            total = [d[i] * (k[i] - 1) for i in range(nd)]
            left = [t // 2 for t in total]
            p = left + [t - l for t, l in zip(total, left)]
        else:
            raise _unsupported(f"conv padding '{padding}'")
    else:
        pp = _tup(padding, nd)
        p = pp + pp
    return {"kernel_shape": k, "strides": s, "pads": p, "dilations": d, "group": int(groups)}


def _pad_value(cv: _FxConverter, x: Value, begins, ends, mode: str, value=None, main: bool = False) -> Value:
    ins = [x, cv.i64(list(begins) + list(ends), "pads")]
    if value is not None and mode == "constant":
        ins.append(cv.operand(float(value), x.dtype))
    return cv.emit("Pad", ins, {"mode": mode}, main=main)


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "constant": "constant", "zeros": "constant"}


def _pad_mode(cv, mode):
    if mode == "circular":
        if cv.opset >= 19:
            return "wrap"
        raise _unsupported(f"{cv._where()}: circular padding needs opset >= 19")
    if mode not in _PAD_MODES:
        raise _unsupported(f"{cv._where()}: padding mode '{mode}'")
    return _PAD_MODES[mode]


def _m_conv(cv, m, x):
    nd = len(m.kernel_size)
    attrs = _conv_attrs(nd, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
    if m.padding_mode != "zeros":
        p = attrs["pads"]
        x = _pad_value(cv, x, [0, 0] + p[:nd], [0, 0] + p[nd:], _pad_mode(cv, m.padding_mode))
        attrs["pads"] = [0] * (2 * nd)
    ins = [x, cv.mparam(m, "weight")]
    if m.bias is not None:
        ins.append(cv.mparam(m, "bias"))
    return cv.emit("Conv", ins, attrs, main=True)


def _f_conv(nd):
    def conv(cv, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        w = cv.operand(weight, None)
        k = list(w.shape[2:])
        if not all(isinstance(d, int) for d in k):
            raise _unsupported(f"{cv._where()}: conv weight shape unknown")
        attrs = _conv_attrs(nd, k, stride, padding, dilation, groups)
        ins = [input, w] + ([cv.operand(bias, None)] if bias is not None else [])
        return cv.emit("Conv", ins, attrs, main=True)
    return conv


def _m_conv_transpose(cv, m, x, output_size=None):
    if output_size is not None:
        raise _unsupported(f"{cv._where()}: ConvTranspose with output_size")
    if m.padding_mode != "zeros":
        raise _unsupported(f"{cv._where()}: ConvTranspose padding_mode '{m.padding_mode}'")
    nd = len(m.kernel_size)
    attrs = _conv_attrs(nd, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
    attrs["output_padding"] = _tup(m.output_padding, nd)
    ins = [x, cv.mparam(m, "weight")]
    if m.bias is not None:
        ins.append(cv.mparam(m, "bias"))
    return cv.emit("ConvTranspose", ins, attrs, main=True)


# ------------------------------------------------------------------------ linear
def _m_linear(cv, m, x):
    if _rank(x) == 2:
        ins = [x, cv.mparam(m, "weight")]
        if m.bias is not None:
            ins.append(cv.mparam(m, "bias"))
        return cv.emit("Gemm", ins, {"transB": 1}, main=True)
    wt = cv.mparam(m, "weight", transform=lambda a: a.T, tag="T")
    y = cv.emit("MatMul", [x, wt], main=True)
    if m.bias is not None:
        y = cv.emit("Add", [y, cv.mparam(m, "bias")])
    return y


def _f_linear(cv, input, weight, bias=None):
    w = cv.operand(weight, None)
    if _rank(input) == 2:
        ins = [input, w] + ([cv.operand(bias, None)] if bias is not None else [])
        return cv.emit("Gemm", ins, {"transB": 1}, main=True)
    if w.is_const:
        key = (id(w), "T")
        hit = cv._param_cache.get(key)
        wt = hit[1] if hit is not None else cv.g.add_initializer(w.name + ".T", _contig(w.const.T))
        cv._param_cache[key] = (w, wt)
    else:
        wt = cv.emit("Transpose", [w], {"perm": [1, 0]})
    y = cv.emit("MatMul", [input, wt], main=True)
    if bias is not None:
        y = cv.emit("Add", [y, cv.operand(bias, None)])
    return y


def _m_embedding(cv, m, ids):
    if m.max_norm is not None:
        raise _unsupported(f"{cv._where()}: Embedding with max_norm (renormalises weights in forward)")
    return cv.emit("Gather", [cv.mparam(m, "weight"), ids], {"axis": 0}, main=True)


def _f_embedding(cv, input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False):
    if max_norm is not None:
        raise _unsupported(f"{cv._where()}: embedding with max_norm")
    return cv.emit("Gather", [cv.operand(weight, None), input], {"axis": 0}, main=True)


# ------------------------------------------------------------------ normalization
def _bn(cv, x, scale, bias, mean, var, eps, momentum):
    attrs = {"epsilon": float(eps)}
    if momentum is not None:
        attrs["momentum"] = float(1.0 - momentum)
    return cv.emit("BatchNormalization", [x, scale, bias, mean, var], attrs, main=True)


def _m_batchnorm(cv, m, x):
    if not m.track_running_stats or m.running_mean is None:
        raise _unsupported(f"{cv._where()}: BatchNorm without running statistics (uses batch statistics in eval)")
    c = m.num_features
    dt = _to_numpy(m.running_mean).dtype
    scale = cv.mparam(m, "weight") if m.weight is not None else cv.const(np.ones(c, dt), "weight", share=False)
    bias = cv.mparam(m, "bias") if m.bias is not None else cv.const(np.zeros(c, dt), "bias", share=False)
    return _bn(cv, x, scale, bias, cv.mparam(m, "running_mean"), cv.mparam(m, "running_var"), m.eps, m.momentum)


def _f_batch_norm(cv, input, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-5):
    if training or running_mean is None or running_var is None:
        raise _unsupported(f"{cv._where()}: batch_norm with batch statistics")
    mean = cv.operand(running_mean, None)
    c = mean.shape[0]
    dt = mean.dtype
    scale = cv.operand(weight, None) if weight is not None else cv.const(np.ones(c, dt), "weight", share=False)
    b = cv.operand(bias, None) if bias is not None else cv.const(np.zeros(c, dt), "bias", share=False)
    return _bn(cv, input, scale, b, mean, cv.operand(running_var, None), eps, momentum)


def _layer_norm(cv, x, normalized_shape, weight, bias, eps):
    ns = _tup(normalized_shape, 1) if not isinstance(normalized_shape, (list, tuple)) else list(normalized_shape)
    if cv.opset < 17:  # LayerNormalization is opset 17: decompose
        axes = list(range(-len(ns), 0))
        d = cv.emit("Sub", [x, cv.reduce("ReduceMean", x, axes, True, main=False)])
        var = cv.reduce("ReduceMean", cv.emit("Mul", [d, d]), axes, True, main=False)
        std = cv.emit("Sqrt", [cv.emit("Add", [var, cv.operand(float(eps), x.dtype)])])
        y = cv.emit("Div", [d, std], main=weight is None and bias is None)
        if weight is not None:
            y = cv.emit("Mul", [y, weight], main=bias is None)
        if bias is not None:
            y = cv.emit("Add", [y, bias], main=True)
        return y
    if weight is None:
        weight = cv.const(np.ones(ns, x.dtype), "weight", share=False)
    ins = [x, weight] + ([bias] if bias is not None else [])
    return cv.emit("LayerNormalization", ins, {"axis": -len(ns), "epsilon": float(eps)}, main=True)


def _m_layernorm(cv, m, x):
    w = cv.mparam(m, "weight") if getattr(m, "weight", None) is not None else None
    b = cv.mparam(m, "bias") if getattr(m, "bias", None) is not None else None
    return _layer_norm(cv, x, m.normalized_shape, w, b, m.eps)


def _f_layer_norm(cv, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    w = cv.operand(weight, None) if weight is not None else None
    b = cv.operand(bias, None) if bias is not None else None
    return _layer_norm(cv, input, normalized_shape, w, b, eps)


def _group_norm(cv, x, groups, weight, bias, eps):
    dims = cv.dims(x)
    dt = x.dtype
    y = cv.emit("Reshape", [x, cv.shape_vec([dims[0], groups, -1], src=x, marker=0)])
    y = cv.emit("InstanceNormalization", [y, cv.const(np.ones(groups, dt), "ones", share=False),
                                          cv.const(np.zeros(groups, dt), "zeros", share=False)],
                {"epsilon": float(eps)})
    back = list(dims)
    if isinstance(back[0], _Dyn):
        back[0] = 0  # Reshape copies dim 0 (the batch) from its input
    y = cv.emit("Reshape", [y, cv.shape_vec(back)], main=weight is None)
    tail = (1,) * (len(dims) - 2)
    if weight is not None:
        y = cv.emit("Mul", [y, weight(tail)], main=True)
    if bias is not None:
        y = cv.emit("Add", [y, bias(tail)])
    return y


def _m_groupnorm(cv, m, x):
    w = (lambda tail: cv.mparam(m, "weight", lambda a: a.reshape(a.shape + tail), "gn")) if m.affine else None
    b = (lambda tail: cv.mparam(m, "bias", lambda a: a.reshape(a.shape + tail), "gn")) if m.affine else None
    return _group_norm(cv, x, m.num_groups, w, b, m.eps)


def _f_normalize(cv, input, p=2.0, dim=1, eps=1e-12, out=None):
    if p != 2:
        raise _unsupported(f"{cv._where()}: normalize with p={p}")
    n = cv.reduce("ReduceL2", input, [dim % _rank(input)], True, main=False)
    n = cv.emit("Max", [n, cv.operand(eps, input.dtype)])
    return cv.emit("Div", [input, n], main=True)


# ------------------------------------------------------------------- activations
def _act(op, **attrs):
    def f(cv, x, *a, inplace=False, **k):
        return cv.emit(op, [x], dict(attrs), main=True)
    return f


def _clip(cv, x, lo, hi):
    ins = [x, cv.operand(lo, x.dtype) if lo is not None else None,
           cv.operand(hi, x.dtype) if hi is not None else None]
    while ins[-1] is None:
        ins.pop()
    return cv.emit("Clip", ins, main=True)


def _gelu(cv, x, approximate="none"):
    dt = x.dtype
    if approximate == "tanh":
        x3 = cv.emit("Mul", [cv.emit("Mul", [x, x]), x])
        inner = cv.emit("Add", [x, cv.emit("Mul", [x3, cv.operand(0.044715, dt)])])
        t = cv.emit("Tanh", [cv.emit("Mul", [inner, cv.operand(math.sqrt(2.0 / math.pi), dt)])])
        half_x = cv.emit("Mul", [x, cv.operand(0.5, dt)])
        return cv.emit("Mul", [half_x, cv.emit("Add", [t, cv.operand(1.0, dt)])], main=True)
    if approximate != "none":
        raise _unsupported(f"{cv._where()}: gelu approximate='{approximate}'")
    if cv.opset >= 20:
        return cv.emit("Gelu", [x], main=True)
    e = cv.emit("Erf", [cv.emit("Div", [x, cv.operand(math.sqrt(2.0), dt)])])
    half_x = cv.emit("Mul", [x, cv.operand(0.5, dt)])
    return cv.emit("Mul", [half_x, cv.emit("Add", [e, cv.operand(1.0, dt)])], main=True)


def _silu(cv, x):
    return cv.emit("Mul", [x, cv.emit("Sigmoid", [x])], main=True)


def _mish(cv, x):
    return cv.emit("Mul", [x, cv.emit("Tanh", [cv.emit("Softplus", [x])])], main=True)


def _softplus(cv, x, beta=1.0, threshold=20.0):
    if beta == 1:
        return cv.emit("Softplus", [x], main=True)
    y = cv.emit("Softplus", [cv.emit("Mul", [x, cv.operand(beta, x.dtype)])])
    return cv.emit("Div", [y, cv.operand(beta, x.dtype)], main=True)


def _softmax_dim(rank):
    return 0 if rank in (0, 1, 3) else 1


def _softmax(op):
    def f(cv, x, dim=None, _stacklevel=3, dtype=None):
        if dtype is not None:
            x = cv.cast(x, _np_dtype(dtype))
        r = _rank(x)
        d = _softmax_dim(r) if dim is None else dim
        return cv.emit(op, [x], {"axis": int(d) % max(r, 1)}, main=True)
    return f


def _softmin(cv, x, dim=None, _stacklevel=3, dtype=None):
    r = _rank(x)
    d = _softmax_dim(r) if dim is None else dim
    return cv.emit("Softmax", [cv.emit("Neg", [x])], {"axis": int(d) % max(r, 1)}, main=True)


def _prelu_value(cv, x, w: Value):
    r = _rank(x)
    if w.is_const and w.const.size > 1 and r > 2:
        key = (id(w), "prelu")
        hit = cv._param_cache.get(key)
        if hit is None:
            arr = w.const.reshape((-1,) + (1,) * (r - 2))
            hit = (w, cv.g.add_initializer(w.name, arr))
            cv._param_cache[key] = hit
        w = hit[1]
    return cv.emit("PRelu", [x, w], main=True)


def _m_prelu(cv, m, x):
    r = _rank(x)
    w = cv.mparam(m, "weight", (lambda a: a.reshape((-1,) + (1,) * (r - 2))) if r > 2 else None, f"prelu{r}")
    return cv.emit("PRelu", [x, w], main=True)


def _m_act(fn, *names):
    """Module converter from a function converter, passing module attributes."""
    def f(cv, m, x):
        return fn(cv, x, *[getattr(m, n) for n in names])
    return f


def _identity(cv, x, *a, **k):
    return x


# ------------------------------------------------------------------------ pooling
def _max_pool(nd):
    def f(cv, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        if return_indices:
            raise _unsupported(f"{cv._where()}: max pool with return_indices")
        k = _tup(kernel_size, nd)
        s = _tup(stride, nd) if stride not in (None, [], ()) else k
        p = _tup(padding, nd)
        attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(bool(ceil_mode))}
        d = _tup(dilation, nd)
        if any(x != 1 for x in d):
            attrs["dilations"] = d
        return cv.emit("MaxPool", [input], attrs, main=True)
    return f


def _avg_pool(nd):
    def f(cv, input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
          divisor_override=None):
        if divisor_override is not None:
            raise _unsupported(f"{cv._where()}: avg pool with divisor_override")
        k = _tup(kernel_size, nd)
        s = _tup(stride, nd) if stride not in (None, [], ()) else k
        p = _tup(padding, nd)
        attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(bool(ceil_mode)),
                 "count_include_pad": int(bool(count_include_pad))}
        return cv.emit("AveragePool", [input], attrs, main=True)
    return f


def _m_pool(fn, nd):
    def f(cv, m, x):
        if isinstance(m, nn.modules.pooling._MaxPoolNd):
            return fn(cv, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        return fn(cv, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                  getattr(m, "divisor_override", None))
    return f


def _adaptive(nd, kind):
    def f(cv, input, output_size, return_indices=False):
        if return_indices:
            raise _unsupported(f"{cv._where()}: adaptive max pool with return_indices")
        r = _rank(input)
        spatial = input.shape[r - nd:]
        osz = list(output_size) if isinstance(output_size, (list, tuple)) else [output_size] * nd
        if len(osz) == 1 and nd > 1:
            osz = osz * nd
        if all(o == 1 for o in osz):
            return cv.emit("GlobalAveragePool" if kind == "avg" else "GlobalMaxPool", [input], main=True)
        ks = []
        for o, i in zip(osz, spatial):
            if not isinstance(i, int):
                raise _unsupported(f"{cv._where()}: adaptive pool over a dynamic spatial dim")
            o = i if o is None else int(o)
            if i % o:
                raise _unsupported(f"{cv._where()}: adaptive {kind} pool {tuple(spatial)} -> {tuple(osz)} "
                                   "(input size not a multiple of the output size)")
            ks.append(i // o)
        attrs = {"kernel_shape": ks, "strides": ks}
        return cv.emit("AveragePool" if kind == "avg" else "MaxPool", [input], attrs, main=True)
    return f


def _m_adaptive(fn):
    def f(cv, m, x):
        return fn(cv, x, m.output_size, getattr(m, "return_indices", False))
    return f


def _interpolate(cv, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    if antialias:
        raise _unsupported(f"{cv._where()}: interpolate with antialias")
    r = _rank(input)
    nd = r - 2
    attrs: dict[str, Any] = {}
    if mode == "nearest":
        attrs.update(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode == "nearest-exact":
        attrs.update(mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear", "bicubic"):
        attrs["mode"] = "cubic" if mode == "bicubic" else "linear"
        attrs["coordinate_transformation_mode"] = "align_corners" if align_corners else "pytorch_half_pixel"
        if mode == "bicubic":
            attrs["cubic_coeff_a"] = -0.75
    else:
        raise _unsupported(f"{cv._where()}: interpolate mode '{mode}'")
    if scale_factor is not None and not recompute_scale_factor:
        sf = [float(s) for s in _tup_f(scale_factor, nd)]
        scales = cv.const(np.array([1.0, 1.0] + sf, np.float32), "scales")
        return cv.emit("Resize", [input, None, scales], attrs, main=True)
    out = cv.out_info()
    dims = cv.dims(input)
    sizes = cv.shape_vec(list(dims[:2]) + list(out.shape[2:]))
    return cv.emit("Resize", [input, None, None, sizes], attrs, main=True)


def _tup_f(v, n):
    if isinstance(v, (list, tuple)):
        return list(v) if len(v) == n else [v[0]] * n
    return [v] * n


def _m_upsample(cv, m, x):
    return _interpolate(cv, x, m.size, m.scale_factor, m.mode, m.align_corners,
                        getattr(m, "recompute_scale_factor", None))


def _f_pad(cv, input, pad, mode="constant", value=None):
    r = _rank(input)
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):
        ax = r - 1 - i
        begins[ax], ends[ax] = int(pad[2 * i]), int(pad[2 * i + 1])
    return _pad_value(cv, input, begins, ends, _pad_mode(cv, mode), value if value else None, main=True)


# ------------------------------------------------------------------- elementwise
def _dyn_arith(cv, op, a, b):
    if op not in ("Add", "Sub", "Mul", "Div"):
        raise _unsupported(f"{cv._where()}: {op} on a batch-dependent python int")
    va = cv.operand(a, np.int64)
    vb = cv.operand(b, np.int64)
    return _Dyn(scalar=cv.emit(op, [va, vb], main=True, dtype=np.int64))


def _binop(cv, op, a, b, py_op=None):
    if not isinstance(a, Value) and not isinstance(b, Value):
        if isinstance(a, _Dyn) or isinstance(b, _Dyn):
            if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
                return py_op(a, b)
            return _dyn_arith(cv, op, a, b)
        if py_op is None:
            raise _unsupported(f"{cv._where()}: {op} of python values")
        return py_op(a, b)
    if op in _COMPARE:
        dt = _promote(a, b)
    else:
        dt = cv.out_dtype()
    return cv.emit(op, [cv.operand(a, dt), cv.operand(b, dt)], main=True)


_COMPARE = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}


def _binary(op, py_op=None, reverse=False):
    def f(cv, a, b, *, alpha=None, out=None):
        if out is not None:
            raise _unsupported(f"{cv._where()}: out= argument")
        if reverse:
            a, b = b, a
        if alpha is not None and alpha != 1:
            b = b * alpha if isinstance(b, (int, float)) else cv.emit("Mul", [cv.operand(b, cv.out_dtype()),
                                                                              cv.operand(alpha, cv.out_dtype())])
        return _binop(cv, op, a, b, py_op)
    return f


def _sub(cv, a, b, *, alpha=None, out=None):
    return _binary("Sub", operator.sub)(cv, a, b, alpha=alpha, out=out)


def _ne(cv, a, b):
    if not isinstance(a, Value) and not isinstance(b, Value):
        return operator.ne(a, b)
    dt = _promote(a, b)
    eq = cv.emit("Equal", [cv.operand(a, dt), cv.operand(b, dt)])
    return cv.emit("Not", [eq], main=True)


def _div(cv, a, b, *, rounding_mode=None, out=None):
    if not isinstance(a, Value) and not isinstance(b, Value):
        if rounding_mode in ("floor", "trunc") and (isinstance(a, _Dyn) or isinstance(b, _Dyn)):
            return _dyn_arith(cv, "Div", a, b)  # sizes are non-negative: trunc == floor
        if isinstance(a, _Dyn) or isinstance(b, _Dyn):
            raise _unsupported(f"{cv._where()}: true division of a batch-dependent int")
        return operator.truediv(a, b) if rounding_mode is None else operator.floordiv(a, b)
    dt = cv.out_dtype()
    if rounding_mode is None:
        return _binop(cv, "Div", a, b)
    if dt.kind == "f":
        q = cv.emit("Div", [cv.operand(a, dt), cv.operand(b, dt)])
        if rounding_mode == "floor":
            return cv.emit("Floor", [q], main=True)
        raise _unsupported(f"{cv._where()}: float division with rounding_mode='trunc'")
    if rounding_mode == "trunc":
        return cv.emit("Div", [cv.operand(a, dt), cv.operand(b, dt)], main=True)
    q = cv.emit("Div", [cv.operand(a, np.float64), cv.operand(b, np.float64)], dtype=np.float64)
    q = cv.emit("Floor", [q], dtype=np.float64)
    return cv.emit("Cast", [q], {"to": _onnx_elem(dt)}, main=True)


def _floordiv(cv, a, b):
    return _div(cv, a, b, rounding_mode="floor")


def _truediv(cv, a, b, *, out=None):
    return _div(cv, a, b)


def _pow(cv, a, b, *, out=None):
    if not isinstance(a, Value) and not isinstance(b, Value):
        if isinstance(a, _Dyn) or isinstance(b, _Dyn):
            raise _unsupported(f"{cv._where()}: power of a batch-dependent int")
        return operator.pow(a, b)
    dt = cv.out_dtype()
    return cv.emit("Pow", [cv.operand(a, dt), cv.operand(b, dt)], main=True)


def _unary(op, py_op=None):
    def f(cv, x, *, out=None):
        if not isinstance(x, Value):
            if isinstance(x, _Dyn) and op == "Neg":
                return _Dyn(scalar=cv.emit("Neg", [cv.dyn_scalar(x)], main=True, dtype=np.int64))
            if py_op is not None and not isinstance(x, _Dyn):
                return py_op(x)
            raise _unsupported(f"{cv._where()}: {op} of {type(x).__name__}")
        return cv.emit(op, [x], main=True)
    return f


def _rsqrt(cv, x, *, out=None):
    return cv.emit("Reciprocal", [cv.emit("Sqrt", [x])], main=True)


def _square(cv, x, *, out=None):
    return cv.emit("Mul", [x, x], main=True)


def _clamp(cv, x, min=None, max=None, *, out=None):
    if isinstance(min, Value) or isinstance(max, Value):
        y = x
        if min is not None:
            y = cv.emit("Max", [y, cv.operand(min, x.dtype)], main=max is None)
        if max is not None:
            y = cv.emit("Min", [y, cv.operand(max, x.dtype)], main=True)
        return y
    return _clip(cv, x, min, max)


def _clamp_min(cv, x, min):
    return _clamp(cv, x, min=min)


def _clamp_max(cv, x, max):
    return _clamp(cv, x, max=max)


def _where(cv, condition, input=None, other=None, *, out=None):
    if input is None:
        raise _unsupported(f"{cv._where()}: torch.where(condition) (data-dependent shape)")
    dt = cv.out_dtype()
    cond = cv.cast(condition, np.bool_) if isinstance(condition, Value) else cv.operand(condition, np.bool_)
    return cv.emit("Where", [cond, cv.operand(input, dt), cv.operand(other, dt)], main=True)


def _masked_fill(cv, x, mask, value):
    cond = cv.cast(mask, np.bool_)
    return cv.emit("Where", [cond, cv.operand(value, x.dtype), x], main=True)


def _logical(op):
    def f(cv, a, b, *, out=None):
        if not isinstance(a, Value) and not isinstance(b, Value):
            raise _unsupported(f"{cv._where()}: {op} of python values")
        dt = cv.out_dtype()
        if dt is not None and dt.kind != "b":
            raise _unsupported(f"{cv._where()}: bitwise {op} on {dt}")
        return cv.emit(op, [cv.operand(a, np.bool_), cv.operand(b, np.bool_)], main=True)
    return f


def _not(cv, x, *, out=None):
    if x.dtype is not None and x.dtype.kind != "b":
        raise _unsupported(f"{cv._where()}: bitwise not on {x.dtype}")
    return cv.emit("Not", [x], main=True)


def _to_dtype(cv, x, *a, **k):
    """``.to(...)``, ``.float()``, ``.type(...)``, ``type_as``: a Cast to the traced dtype."""
    dt = cv.out_dtype()
    if dt is None or x.dtype == dt:
        return x
    return cv.emit("Cast", [x], {"to": _onnx_elem(dt)}, main=True)


# ------------------------------------------------------------------ matmul & co
def _matmul(cv, a, b, *, out=None):
    return cv.emit("MatMul", [a, b], main=True)


def _einsum(cv, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return cv.emit("Einsum", list(operands), {"equation": equation.replace(" ", "")}, main=True)


def _sdpa(cv, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        raise _unsupported(f"{cv._where()}: scaled_dot_product_attention with enable_gqa")
    r = _rank(query)
    e = query.shape[-1]
    if scale is None:
        if not isinstance(e, int):
            raise _unsupported(f"{cv._where()}: attention head dim unknown")
        scale = 1.0 / math.sqrt(e)
    dt = query.dtype
    perm = list(range(r))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = cv.emit("Transpose", [key], {"perm": perm})
    s = cv.emit("Mul", [cv.emit("MatMul", [query, kt]), cv.operand(float(scale), dt)])
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        if not (isinstance(lq, int) and isinstance(lk, int)):
            raise _unsupported(f"{cv._where()}: causal attention with dynamic sequence length")
        mask = np.tril(np.ones((lq, lk), dtype=bool))
        s = cv.emit("Where", [cv.const(mask, "causal_mask", share=False), s, cv.operand(-np.inf, dt)])
    if attn_mask is not None:
        if attn_mask.dtype is not None and attn_mask.dtype.kind == "b":
            s = cv.emit("Where", [attn_mask, s, cv.operand(-np.inf, dt)])
        else:
            s = cv.emit("Add", [s, cv.cast(attn_mask, dt)])
    p = cv.emit("Softmax", [s], {"axis": -1})
    return cv.emit("MatMul", [p, value], main=True)


# ------------------------------------------------------------------ reductions
def _norm_axes(dim, r):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return sorted(int(d) % r for d in dims)


def _reduction(op):
    def f(cv, x, dim=None, keepdim=False, *, dtype=None, out=None):
        if isinstance(dim, bool):  # torch.sum(x, True)?  not a real overload
            raise _unsupported(f"{cv._where()}: bad dim {dim!r}")
        dt = cv.out_dtype()
        axes = _norm_axes(dim, _rank(x))
        if dt is not None and x.dtype is not None and dt != x.dtype:
            x = cv.cast(x, dt)
        return cv.reduce(op, x, axes, keepdim)
    return f


def _minmax(reduce_op, arg_op, elem_op):
    def f(cv, x, dim=None, keepdim=False, *, out=None):
        if isinstance(dim, Value):  # torch.max(a, b)
            dt = cv.out_dtype()
            return cv.emit(elem_op, [cv.operand(x, dt), cv.operand(dim, dt)], main=True)
        r = _rank(x)
        if dim is None:
            return cv.reduce(reduce_op, x, None, False)
        ax = int(dim) % r
        vals = cv.reduce(reduce_op, x, [ax], keepdim)
        idx = cv.emit(arg_op, [x], {"axis": ax, "keepdims": int(bool(keepdim))}, dtype=np.int64)
        return (vals, idx)
    return f


def _amax(op):
    def f(cv, x, dim=(), keepdim=False, *, out=None):
        return cv.reduce(op, x, _norm_axes(dim, _rank(x)), keepdim)
    return f


def _argminmax(op):
    def f(cv, x, dim=None, keepdim=False):
        if dim is None:
            x = cv.emit("Reshape", [x, cv.i64([-1])])
            return cv.emit(op, [x], {"axis": 0, "keepdims": 0}, main=True)
        return cv.emit(op, [x], {"axis": int(dim) % _rank(x), "keepdims": int(bool(keepdim))}, main=True)
    return f


# -------------------------------------------------------------- shape handling
def _size(cv, x, dim=None):
    dims = cv.dims(x)
    return dims if dim is None else dims[dim]


def _dim(cv, x):
    return _rank(x)


def _numel(cv, x):
    dims = cv.dims(x)
    if all(isinstance(d, int) for d in dims):
        return int(np.prod(dims, dtype=np.int64))
    return _Dyn(scalar=cv.emit("Size", [x], main=True, dtype=np.int64))


def _getattr(cv, obj, attr, *default):
    if isinstance(obj, Value):
        if attr == "shape":
            return cv.dims(obj)
        if attr == "ndim":
            return _rank(obj)
        if attr in ("T", "mT"):
            r = _rank(obj)
            perm = list(range(r))[::-1] if attr == "T" else list(range(r - 2)) + [r - 1, r - 2]
            return cv.emit("Transpose", [obj], {"perm": perm}, main=True)
        s = cv.out_info()
        if not _has_tensor_info(s):
            return s  # dtype, device, requires_grad...
        raise _unsupported(f"{cv._where()}: tensor attribute '{attr}'")
    if isinstance(obj, tuple) and attr in ("values", "indices") and len(obj) == 2:
        return obj[0] if attr == "values" else obj[1]
    return getattr(obj, attr, *default)


def _reshape(cv, x, *shape):
    elems = _shape_args(shape)
    if any(isinstance(e, torch.dtype) for e in elems):
        raise _unsupported(f"{cv._where()}: view(dtype)")
    if any(isinstance(e, int) and not isinstance(e, bool) and e == 0 for e in elems):
        raise _unsupported(f"{cv._where()}: reshape to a zero-size dim")
    return cv.emit("Reshape", [x, cv.shape_vec(elems, src=x, marker=0)], main=True)


def _static_or_shape(cv, other: Value) -> Value:
    dims = cv.dims(other)
    if all(isinstance(d, int) for d in dims):
        return cv.i64(list(dims))
    return cv.shape_of(other)


def _reshape_as(cv, x, other):
    return cv.emit("Reshape", [x, _static_or_shape(cv, other)], main=True)


def _flatten(cv, x, start_dim=0, end_dim=-1):
    r = _rank(x)
    if r == 0:
        return cv.emit("Reshape", [x, cv.i64([1])], main=True)
    s, e = start_dim % r, end_dim % r
    if s == e:
        return x
    if s == 1 and e == r - 1:
        return cv.emit("Flatten", [x], {"axis": 1}, main=True)
    dims = cv.dims(x)
    elems = [dims[i] for i in range(s)] + [-1] + [dims[i] for i in range(e + 1, r)]
    return cv.emit("Reshape", [x, cv.shape_vec(elems, src=x, marker=0)], main=True)


def _m_flatten(cv, m, x):
    return _flatten(cv, x, m.start_dim, m.end_dim)


def _m_unflatten(cv, m, x):
    return _unflatten(cv, x, m.dim, m.unflattened_size)


def _unflatten(cv, x, dim, sizes):
    r = _rank(x)
    d = dim % r
    dims = cv.dims(x)
    elems = list(dims[:d]) + list(sizes) + list(dims[d + 1:])
    # trailing dims moved position: only the leading ones can use the copy marker
    return cv.emit("Reshape", [x, cv.shape_vec(elems, src=x, marker=0)], main=True)


def _permute(cv, x, *dims):
    r = _rank(x)
    perm = [int(d) % r for d in _shape_args(dims)]
    return cv.emit("Transpose", [x], {"perm": perm}, main=True)


def _transpose(cv, x, dim0, dim1):
    r = _rank(x)
    perm = list(range(r))
    a, b = dim0 % r, dim1 % r
    perm[a], perm[b] = perm[b], perm[a]
    if a == b:
        return x
    return cv.emit("Transpose", [x], {"perm": perm}, main=True)


def _t(cv, x):
    if _rank(x) < 2:
        return x
    return cv.emit("Transpose", [x], {"perm": [1, 0]}, main=True)


def _unsqueeze(cv, x, dim):
    r = _rank(x)
    d = dim if dim >= 0 else dim + r + 1
    return cv.unsqueeze(x, [d], main=True)


def _squeeze(cv, x, dim=None):
    r = _rank(x)
    shape = x.shape
    if dim is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    else:
        dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
        axes = []
        for d in dims:
            d = int(d) % r
            if not isinstance(shape[d], int):
                raise _unsupported(f"{cv._where()}: squeeze of dynamic dim {d}")
            if shape[d] == 1:
                axes.append(d)
    if not axes:
        return x
    return cv.emit("Squeeze", [x, cv.i64(sorted(axes), "axes")], main=True)


def _split_from_trace(cv, x, dim):
    r = _rank(x)
    d = int(dim) % r
    if not isinstance(x.shape[d], int):
        raise _unsupported(f"{cv._where()}: split along the dynamic dim {d}")
    res = cv.out_info()
    sizes = [t.shape[d] for t in res]
    outs = cv.emit("Split", [x, cv.i64(sizes, "split")], {"axis": d}, outputs=len(sizes), main=True)
    return tuple(outs) if isinstance(outs, list) else (outs,)


def _split(cv, x, split_size_or_sections, dim=0):
    return _split_from_trace(cv, x, dim)


def _chunk(cv, x, chunks, dim=0):
    return _split_from_trace(cv, x, dim)


def _tensor_split(cv, x, indices_or_sections, dim=0):
    return _split_from_trace(cv, x, dim)


def _unbind(cv, x, dim=0):
    r = _rank(x)
    d = int(dim) % r
    n = x.shape[d]
    if not isinstance(n, int):
        raise _unsupported(f"{cv._where()}: unbind along a dynamic dim")
    outs = cv.emit("Split", [x, cv.i64([1] * n, "split")], {"axis": d}, outputs=n, main=True)
    outs = outs if isinstance(outs, list) else [outs]
    return tuple(cv.emit("Squeeze", [o, cv.i64([d], "axes")]) for o in outs)


def _cat(cv, tensors, dim=0, *, axis=None, out=None):
    if axis is not None:
        dim = axis
    ts = [t for t in tensors]
    if not all(isinstance(t, Value) for t in ts):
        raise _unsupported(f"{cv._where()}: cat of non-tensors")
    r = _rank(ts[0])
    dt = cv.out_dtype()
    ts = [cv.cast(t, dt) for t in ts]
    if len(ts) == 1:
        return ts[0]
    return cv.emit("Concat", ts, {"axis": int(dim) % r}, main=True)


def _stack(cv, tensors, dim=0, *, out=None):
    ts = list(tensors)
    r = _rank(ts[0]) + 1
    d = int(dim) % r
    dt = cv.out_dtype()
    us = [cv.unsqueeze(cv.cast(t, dt), [d]) for t in ts]
    return cv.emit("Concat", us, {"axis": d}, main=True)


def _expand(cv, x, *sizes):
    elems = _shape_args(sizes)
    r = _rank(x)
    off = len(elems) - r
    out = [1 if (isinstance(e, int) and e == -1) else e for e in elems]
    return cv.emit("Expand", [x, cv.shape_vec(out, src=x, marker=1, offset=off)], main=True)


def _expand_as(cv, x, other):
    return cv.emit("Expand", [x, _static_or_shape(cv, other)], main=True)


def _repeat(cv, x, *sizes):
    reps = _shape_args(sizes)
    r = _rank(x)
    if len(reps) > r:
        x = cv.unsqueeze(x, list(range(len(reps) - r)))
    return cv.emit("Tile", [x, cv.shape_vec(reps)], main=True)


def _getitem(cv, obj, idx):
    if isinstance(obj, Value):
        return _tensor_index(cv, obj, idx)
    if isinstance(idx, (_Dyn, Value)):
        raise _unsupported(f"{cv._where()}: indexing a python sequence with a batch-dependent index")
    return obj[idx]


def _tensor_index(cv, x, idx):
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, Value) for i in items):
        if len(items) == 1 and items[0].dtype is not None and items[0].dtype.kind in "iu":
            return cv.emit("Gather", [x, items[0]], {"axis": 0}, main=True)
        raise _unsupported(f"{cv._where()}: advanced (tensor/boolean) indexing")
    r = _rank(x)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    if n_real > r:
        raise _unsupported(f"{cv._where()}: too many indices")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (r - n_real) + items[k + 1:]
    else:
        items = items + [slice(None)] * (r - n_real)
    starts, ends, axes, steps = [], [], [], []
    gathers: list[tuple[int, Any]] = []
    nones: list[int] = []
    axis = out_pos = 0
    for it in items:
        if it is None:
            nones.append(out_pos)
            out_pos += 1
        elif isinstance(it, slice):
            st, en, sp = it.start, it.stop, it.step
            if sp is not None and not isinstance(sp, int) or (isinstance(sp, int) and sp <= 0):
                raise _unsupported(f"{cv._where()}: slice step {sp!r}")
            if not (st in (None, 0) and en is None and sp in (None, 1)):
                starts.append(0 if st is None else st)
                ends.append(_I64_MAX if en is None else en)
                axes.append(axis)
                steps.append(1 if sp is None else sp)
            axis += 1
            out_pos += 1
        elif isinstance(it, (int, _Dyn)) and not isinstance(it, bool):
            gathers.append((axis, it))
            axis += 1
        else:
            raise _unsupported(f"{cv._where()}: index {it!r}")
    y = x
    steps_needed = len(starts) > 0
    n_ops = int(steps_needed) + len(gathers) + int(bool(nones))
    done = 0

    def is_last():
        return done == n_ops - 1

    if steps_needed:
        ins = [y, cv.shape_vec(starts), cv.shape_vec(ends), cv.i64(axes, "axes")]
        if any(s != 1 for s in steps):
            ins.append(cv.i64(steps, "steps"))
        y = cv.emit("Slice", ins, main=is_last())
        done += 1
    for ax, i in reversed(gathers):
        ind = cv.i64(i, "index") if isinstance(i, int) else cv.dyn_scalar(i)
        y = cv.emit("Gather", [y, ind], {"axis": ax}, main=is_last())
        done += 1
    if nones:
        y = cv.unsqueeze(y, nones, main=True)
    if n_ops == 0:
        return x
    return y


# ------------------------------------------------------------------- creation
def _const_of_shape(cv, shape_val: Value, value, dt):
    return cv.emit("ConstantOfShape", [shape_val], {"value": np.array([value], dtype=dt)}, main=True)


def _full_like(value_default):
    def f(cv, input, fill_value=None, *a, dtype=None, **k):
        v = value_default if value_default is not None else fill_value
        dt = cv.out_dtype()
        return _const_of_shape(cv, _static_or_shape(cv, input), v, dt)
    return f


def _full_like_fn(cv, input, fill_value, *a, **k):
    return _full_like(None)(cv, input, fill_value)


def _new_full(value_default):
    def f(cv, x, *size, fill_value=None, **k):
        if value_default is None:
            size, fill_value = size[:-1], size[-1] if fill_value is None else fill_value
        v = value_default if value_default is not None else fill_value
        return _const_of_shape(cv, cv.shape_vec(_shape_args(size)), v, cv.out_dtype())
    return f


def _creation(value_default):
    def f(cv, *size, fill_value=None, dtype=None, **k):
        if value_default is None:  # torch.full(size, fill_value)
            size, fill_value = (size[0],), size[1] if len(size) > 1 else fill_value
        v = value_default if value_default is not None else fill_value
        return _const_of_shape(cv, cv.shape_vec(_shape_args(size)), v, cv.out_dtype())
    return f


def _arange(cv, *args, dtype=None, **k):
    vals = list(args)
    if len(vals) == 1:
        vals = [0, vals[0], 1]
    elif len(vals) == 2:
        vals = [vals[0], vals[1], 1]
    dt = cv.out_dtype()
    ins = [cv.operand(v, dt) for v in vals]
    return cv.emit("Range", ins, main=True)


# ---------------------------------------------------------------------- tables
#: module class -> f(cv, module, *args, **kwargs)
MODULE_CONVERTERS: dict[type, Callable] = {
    nn.Conv1d: _m_conv, nn.Conv2d: _m_conv, nn.Conv3d: _m_conv,
    nn.ConvTranspose1d: _m_conv_transpose, nn.ConvTranspose2d: _m_conv_transpose,
    nn.ConvTranspose3d: _m_conv_transpose,
    nn.Linear: _m_linear,
    nn.Embedding: _m_embedding,
    nn.BatchNorm1d: _m_batchnorm, nn.BatchNorm2d: _m_batchnorm, nn.BatchNorm3d: _m_batchnorm,
    nn.LayerNorm: _m_layernorm, nn.GroupNorm: _m_groupnorm,
    nn.ReLU: _m_act(_act("Relu")), nn.Sigmoid: _m_act(_act("Sigmoid")), nn.Tanh: _m_act(_act("Tanh")),
    nn.ReLU6: lambda cv, m, x: _clip(cv, x, 0.0, 6.0),
    nn.Hardtanh: lambda cv, m, x: _clip(cv, x, m.min_val, m.max_val),
    nn.LeakyReLU: lambda cv, m, x: cv.emit("LeakyRelu", [x], {"alpha": float(m.negative_slope)}, main=True),
    nn.ELU: lambda cv, m, x: cv.emit("Elu", [x], {"alpha": float(m.alpha)}, main=True),
    nn.CELU: lambda cv, m, x: cv.emit("Celu", [x], {"alpha": float(m.alpha)}, main=True),
    nn.SELU: _m_act(_act("Selu", alpha=1.6732632423543772, gamma=1.0507009873554805)),
    nn.GELU: _m_act(_gelu, "approximate"),
    nn.SiLU: _m_act(_silu), nn.Mish: _m_act(_mish),
    nn.Hardswish: _m_act(_act("HardSwish")),
    nn.Hardsigmoid: _m_act(_act("HardSigmoid", alpha=1.0 / 6, beta=0.5)),
    nn.Softplus: _m_act(_softplus, "beta", "threshold"),
    nn.Softsign: _m_act(_act("Softsign")),
    nn.PReLU: _m_prelu,
    nn.Softmax: _m_act(_softmax("Softmax"), "dim"), nn.LogSoftmax: _m_act(_softmax("LogSoftmax"), "dim"),
    nn.Softmin: _m_act(_softmin, "dim"),
    nn.Identity: lambda cv, m, x, *a, **k: x,
    nn.Dropout: lambda cv, m, x: x, nn.Dropout1d: lambda cv, m, x: x, nn.Dropout2d: lambda cv, m, x: x,
    nn.Dropout3d: lambda cv, m, x: x, nn.AlphaDropout: lambda cv, m, x: x,
    nn.MaxPool1d: _m_pool(_max_pool(1), 1), nn.MaxPool2d: _m_pool(_max_pool(2), 2),
    nn.MaxPool3d: _m_pool(_max_pool(3), 3),
    nn.AvgPool1d: _m_pool(_avg_pool(1), 1), nn.AvgPool2d: _m_pool(_avg_pool(2), 2),
    nn.AvgPool3d: _m_pool(_avg_pool(3), 3),
    nn.AdaptiveAvgPool1d: _m_adaptive(_adaptive(1, "avg")), nn.AdaptiveAvgPool2d: _m_adaptive(_adaptive(2, "avg")),
    nn.AdaptiveMaxPool1d: _m_adaptive(_adaptive(1, "max")), nn.AdaptiveMaxPool2d: _m_adaptive(_adaptive(2, "max")),
    nn.Flatten: _m_flatten, nn.Unflatten: _m_unflatten,
    nn.Upsample: _m_upsample,
}

_UNARY_FUNCS = {
    "relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
    "abs": "Abs", "neg": "Neg", "negative": "Neg", "erf": "Erf", "sin": "Sin", "cos": "Cos",
    "reciprocal": "Reciprocal", "floor": "Floor", "ceil": "Ceil", "round": "Round", "sign": "Sign",
}

#: function object -> f(cv, *args, **kwargs)
FUNCTION_CONVERTERS: dict[Any, Callable] = {
    # python operators
    operator.add: _binary("Add", operator.add), operator.iadd: _binary("Add", operator.add),
    operator.sub: _binary("Sub", operator.sub), operator.isub: _binary("Sub", operator.sub),
    operator.mul: _binary("Mul", operator.mul), operator.imul: _binary("Mul", operator.mul),
    operator.truediv: _truediv, operator.itruediv: _truediv, operator.floordiv: _floordiv,
    operator.pow: _pow, operator.matmul: _matmul, operator.neg: _unary("Neg", operator.neg),
    operator.getitem: _getitem, getattr: _getattr,
    operator.eq: _binary("Equal", operator.eq), operator.ne: _ne,
    operator.gt: _binary("Greater", operator.gt), operator.lt: _binary("Less", operator.lt),
    operator.ge: _binary("GreaterOrEqual", operator.ge), operator.le: _binary("LessOrEqual", operator.le),
    operator.and_: _logical("And"), operator.or_: _logical("Or"), operator.xor: _logical("Xor"),
    operator.invert: _not,
    # torch.*
    torch.add: _binary("Add", operator.add), torch.sub: _sub, torch.subtract: _sub,
    torch.mul: _binary("Mul", operator.mul), torch.multiply: _binary("Mul", operator.mul),
    torch.div: _div, torch.divide: _div, torch.true_divide: _truediv, torch.floor_divide: _floordiv,
    torch.pow: _pow, torch.rsqrt: _rsqrt, torch.square: _square,
    torch.matmul: _matmul, torch.mm: _matmul, torch.bmm: _matmul, torch.einsum: _einsum,
    torch.eq: _binary("Equal"), torch.ne: _ne, torch.gt: _binary("Greater"), torch.lt: _binary("Less"),
    torch.ge: _binary("GreaterOrEqual"), torch.le: _binary("LessOrEqual"),
    torch.maximum: _binary("Max"), torch.minimum: _binary("Min"),
    torch.logical_and: _logical("And"), torch.logical_or: _logical("Or"), torch.logical_not: _not,
    torch.clamp: _clamp, torch.clip: _clamp, torch.clamp_min: _clamp_min, torch.clamp_max: _clamp_max,
    torch.where: _where, torch.masked_fill: _masked_fill,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat, torch.stack: _stack,
    torch.split: _split, torch.chunk: _chunk, torch.tensor_split: _tensor_split, torch.unbind: _unbind,
    torch.flatten: _flatten, torch.reshape: _reshape, torch.permute: _permute, torch.transpose: _transpose,
    torch.swapaxes: _transpose, torch.t: _t, torch.squeeze: _squeeze, torch.unsqueeze: _unsqueeze,
    torch.unflatten: _unflatten,
    torch.mean: _reduction("ReduceMean"), torch.sum: _reduction("ReduceSum"), torch.prod: _reduction("ReduceProd"),
    torch.amax: _amax("ReduceMax"), torch.amin: _amax("ReduceMin"),
    torch.max: _minmax("ReduceMax", "ArgMax", "Max"), torch.min: _minmax("ReduceMin", "ArgMin", "Min"),
    torch.argmax: _argminmax("ArgMax"), torch.argmin: _argminmax("ArgMin"),
    torch.softmax: _softmax("Softmax"), torch.log_softmax: _softmax("LogSoftmax"),
    torch.zeros_like: _full_like(0), torch.ones_like: _full_like(1), torch.full_like: _full_like_fn,
    torch.zeros: _creation(0), torch.ones: _creation(1), torch.full: _creation(None), torch.arange: _arange,
    torch.flatten: _flatten, torch.numel: _numel,
    # torch.nn.functional
    F.relu: _act("Relu"), F.relu6: lambda cv, x, inplace=False: _clip(cv, x, 0.0, 6.0),
    F.hardtanh: lambda cv, x, min_val=-1.0, max_val=1.0, inplace=False: _clip(cv, x, min_val, max_val),
    F.leaky_relu: lambda cv, x, negative_slope=0.01, inplace=False:
        cv.emit("LeakyRelu", [x], {"alpha": float(negative_slope)}, main=True),
    F.elu: lambda cv, x, alpha=1.0, inplace=False: cv.emit("Elu", [x], {"alpha": float(alpha)}, main=True),
    F.selu: _act("Selu", alpha=1.6732632423543772, gamma=1.0507009873554805),
    F.gelu: _gelu, F.silu: lambda cv, x, inplace=False: _silu(cv, x),
    F.mish: lambda cv, x, inplace=False: _mish(cv, x),
    F.hardswish: _act("HardSwish"), F.hardsigmoid: _act("HardSigmoid", alpha=1.0 / 6, beta=0.5),
    F.softplus: _softplus, F.softsign: _act("Softsign"),
    F.sigmoid: _act("Sigmoid"), F.tanh: _act("Tanh"),
    F.prelu: lambda cv, x, weight: _prelu_value(cv, x, weight),
    F.softmax: _softmax("Softmax"), F.log_softmax: _softmax("LogSoftmax"), F.softmin: _softmin,
    F.dropout: _identity, F.dropout1d: _identity, F.dropout2d: _identity, F.dropout3d: _identity,
    F.alpha_dropout: _identity,
    F.linear: _f_linear, F.conv1d: _f_conv(1), F.conv2d: _f_conv(2), F.conv3d: _f_conv(3),
    F.embedding: _f_embedding, F.batch_norm: _f_batch_norm, F.layer_norm: _f_layer_norm,
    F.normalize: _f_normalize,
    F.max_pool1d: _max_pool(1), F.max_pool2d: _max_pool(2), F.max_pool3d: _max_pool(3),
    F.avg_pool1d: _avg_pool(1), F.avg_pool2d: _avg_pool(2), F.avg_pool3d: _avg_pool(3),
    F.adaptive_avg_pool1d: _adaptive(1, "avg"), F.adaptive_avg_pool2d: _adaptive(2, "avg"),
    F.adaptive_max_pool1d: _adaptive(1, "max"), F.adaptive_max_pool2d: _adaptive(2, "max"),
    F.interpolate: _interpolate, F.pad: _f_pad,
    F.scaled_dot_product_attention: _sdpa,
}
for _n, _op in _UNARY_FUNCS.items():
    if hasattr(torch, _n):
        FUNCTION_CONVERTERS.setdefault(getattr(torch, _n), _unary(_op))

#: Tensor method name -> f(cv, self, *args, **kwargs)
METHOD_CONVERTERS: dict[str, Callable] = {
    "add": _binary("Add", operator.add), "sub": _sub, "mul": _binary("Mul", operator.mul),
    "div": _div, "true_divide": _truediv, "floor_divide": _floordiv, "pow": _pow,
    "rsub": _binary("Sub", operator.sub, reverse=True),
    "matmul": _matmul, "mm": _matmul, "bmm": _matmul,
    "eq": _binary("Equal"), "ne": _ne, "gt": _binary("Greater"), "lt": _binary("Less"),
    "ge": _binary("GreaterOrEqual"), "le": _binary("LessOrEqual"),
    "logical_not": _not, "logical_and": _logical("And"), "logical_or": _logical("Or"),
    "rsqrt": _rsqrt, "square": _square,
    "clamp": _clamp, "clip": _clamp, "clamp_min": _clamp_min, "clamp_max": _clamp_max,
    "masked_fill": _masked_fill, "where": lambda cv, x, cond, other: _where(cv, cond, x, other),
    "softmax": _softmax("Softmax"), "log_softmax": _softmax("LogSoftmax"),
    "size": _size, "dim": _dim, "numel": _numel,
    "view": _reshape, "reshape": _reshape, "view_as": _reshape_as, "reshape_as": _reshape_as,
    "flatten": _flatten, "unflatten": _unflatten,
    "permute": _permute, "transpose": _transpose, "swapaxes": _transpose, "t": _t,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze,
    "split": _split, "chunk": _chunk, "tensor_split": _tensor_split, "unbind": _unbind,
    "expand": _expand, "expand_as": _expand_as, "repeat": _repeat,
    "mean": _reduction("ReduceMean"), "sum": _reduction("ReduceSum"), "prod": _reduction("ReduceProd"),
    "amax": _amax("ReduceMax"), "amin": _amax("ReduceMin"),
    "max": _minmax("ReduceMax", "ArgMax", "Max"), "min": _minmax("ReduceMin", "ArgMin", "Min"),
    "argmax": _argminmax("ArgMax"), "argmin": _argminmax("ArgMin"),
    "contiguous": _identity, "clone": _identity, "detach": _identity, "cpu": _identity,
    "requires_grad_": _identity,
    "to": _to_dtype, "type": _to_dtype, "type_as": _to_dtype, "float": _to_dtype, "double": _to_dtype,
    "half": _to_dtype, "long": _to_dtype, "int": _to_dtype, "bool": _to_dtype,
    "new_zeros": _new_full(0), "new_ones": _new_full(1), "new_full": _new_full(None),
    "relu": _act("Relu"), "sigmoid": _act("Sigmoid"), "tanh": _act("Tanh"),
}
for _n, _op in _UNARY_FUNCS.items():
    METHOD_CONVERTERS.setdefault(_n, _unary(_op))
