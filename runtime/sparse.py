"""Sparse weights after ``prune-weights``: compact storage and sparse execution in ONNX Runtime.

Storage -- :func:`save_sparse` / :func:`to_sparse_storage` / :func:`load_sparse`
    ``format="coo"`` (default): float initializers whose COO form is smaller move to the
    model's ``sparse_initializer`` list (``SparseTensorProto``: nonzero values plus linear
    indices). ONNX Runtime accepts them as they are: at session creation it expands every
    sparse initializer to an ordinary dense initializer, so kernels, memory use at run time
    and outputs are those of the dense model (outputs bitwise identical; checked by the
    tests). Only the file shrinks. ``index_dtype="int64"`` is what the ONNX spec and
    ``onnx.checker`` require (12 bytes per nonzero: pays off above 2/3 sparsity);
    ``index_dtype="int32"`` (8 bytes per nonzero: pays off above 1/2) is loaded by ONNX Runtime
    but rejected by ``onnx.checker``. ``nnsculpt.ir.from_onnx`` densifies sparse initializers
    on import, so such a file round-trips through the IR.

    ``format="bitmask"``: 1 bit per element + the nonzero values (4.125 bytes per nonzero-ish:
    0.53 of dense at 50 %, 0.13 at 90 %), rebuilt by a few standard ops that ONNX Runtime
    constant-folds when the session is created (same run-time cost and outputs as the dense
    model; with graph optimizations disabled they run on every call). About 1.6 kB of decode
    nodes per tensor, so it is only chosen where it pays; :func:`load_sparse` reads either
    format back into the IR with dense weights.

Execution -- :func:`lower_sparse`, :func:`session`, :func:`densify`
    ``lower_sparse`` replaces MatMul / Gemm nodes with a constant, sparse enough weight by a
    custom node ``ai.onnx.contrib::NnsculptSparseMatMul`` -- only where a micro-benchmark on
    this machine says the sparse kernel beats ORT's dense kernel by ``min_speedup``. The node
    carries its weight as CSR tensor attributes (``values``/``indices``/``indptr`` of W^T,
    int32 indices) and a content ``key``. The kernel is a small C routine
    (``sparse_kernels/spmm.c``, built with gcc on first use, AVX-512 paths when the CPU has
    them, single threaded) behind an onnxruntime-extensions *Python* custom op; without gcc it
    falls back to ``scipy.sparse``. ONNX Runtime's C API headers (``onnxruntime_c_api.h``) ship
    in none of the wheels checked (onnxruntime, onnxruntime-extensions 0.15.2, onnx-extended
    0.5.0), so a native ORT custom op was not built; the Python hop costs about 20 us per node
    call at batch 1 and 35 us at 32x1024 (see ``benchmarks/sparse.md``).

    Such a file needs :func:`session` (which registers the op and the node's kernel) and
    onnxruntime-extensions. A plain ``onnxruntime.InferenceSession`` refuses it ("Could not
    find an implementation for NnsculptSparseMatMul"); :func:`densify` turns it back into a
    standard model (MatMul / MatMul+Add with the dense weight), and :func:`session` does that
    itself, with a warning, when onnxruntime-extensions is not installed. Keep the dense
    model (or the ``save_sparse`` file) as the portable artefact.

The onnxruntime-extensions PyOp bridge returns outputs to C++ as ``tolist()`` lists, which costs
milliseconds for a 32x1024 output; this module installs an invocation hook that hands over
numpy arrays instead for its own op only (every other PyOp keeps the stock path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir.graph import Graph, Node, mark_changed
from ..ir.onnx_io import to_onnx_model, write_bytes_atomic

log = logging.getLogger("nnsculpt.runtime.sparse")

CUSTOM_DOMAIN = "ai.onnx.contrib"
OP_TYPE = "NnsculptSparseMatMul"

# =============================================================================== storage
_IDX_DTYPES = {"int64": (np.int64, 8), "int32": (np.int32, 4)}


def _as_model(graph_or_model) -> onnx.ModelProto:
    if isinstance(graph_or_model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(graph_or_model)
        return m
    if isinstance(graph_or_model, Graph):
        return to_onnx_model(graph_or_model)
    return onnx.load(str(graph_or_model))


def to_sparse_storage(graph_or_model, *, format: str = "coo", index_dtype: str = "int64",
                      min_elements: int = 64, max_ratio: float = 0.9) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the model with eligible initializers stored compactly.

    ``format="coo"``: moved to ``sparse_initializer`` (nonzero values + ``index_dtype``
    linear indices). ``format="bitmask"``: replaced by a packed bit mask (1 bit per element,
    uint8) + the nonzero values, and a small standard-op subgraph (``Reshape``, ``BitShift``,
    ``Mod``, ``Slice``, ``CumSum``, ``Gather``, ``Where``) that rebuilds the dense tensor
    under its original name; ONNX Runtime constant-folds it when the session is created
    (graph optimizations >= basic; with optimizations disabled it runs on every call, still
    exact). Needs default opset >= 11. Smaller than COO from ~1 % density up; onnx.checker
    valid; ``nnsculpt.ir.from_onnx`` sees the decode nodes -- use :func:`load_sparse`
    (or :func:`densify_storage`) to get dense weights back.

    Eligible: a floating-point initializer of the main graph with at least ``min_elements``
    elements whose compact size is at most ``max_ratio`` of its dense size, not listed as a
    graph input. Returns the model and a summary (per tensor: elements, nonzeros, dense and
    sparse bytes).
    """
    if format not in ("coo", "bitmask"):
        raise ValueError(f"format must be 'coo' or 'bitmask', got {format!r}")
    if index_dtype not in _IDX_DTYPES:
        raise ValueError(f"index_dtype must be one of {sorted(_IDX_DTYPES)}, got {index_dtype!r}")
    idx_np, idx_bytes = _IDX_DTYPES[index_dtype]
    model = _as_model(graph_or_model)
    g = model.graph
    if format == "bitmask":
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 11:
            raise ValueError(f"format='bitmask' needs default opset >= 11 (model has {opset})")
    input_names = {i.name for i in g.input}
    keep, moved, tensors = [], [], []
    decode_nodes: list[onnx.NodeProto] = []
    bitmask_meta: list[dict[str, Any]] = []
    shared: dict[str, onnx.TensorProto] = {}
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | input_names
    for t in g.initializer:
        arr = numpy_helper.to_array(t) if t.data_type in _FLOAT_TYPES else None
        if arr is None or arr.size < min_elements or t.name in input_names:
            keep.append(t)
            continue
        flat = arr.ravel()
        nz = np.flatnonzero(flat)
        dense_b = arr.nbytes
        if format == "coo":
            sparse_b = nz.size * (arr.itemsize + idx_bytes)
            if sparse_b > max_ratio * dense_b:
                keep.append(t)
                continue
            values = numpy_helper.from_array(np.ascontiguousarray(flat[nz]), t.name)
            indices = numpy_helper.from_array(nz.astype(idx_np), "")
            moved.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
        else:
            if (arr.size + 7) // 8 + nz.size * arr.itemsize > max_ratio * dense_b:
                keep.append(t)
                continue
            new_shared: dict[str, onnx.TensorProto] = {}
            nodes, inits = _bitmask_encode(g, t.name, arr, new_shared if not shared else shared, taken)
            # what the file really pays: the tensor's initializers and decode nodes (names included)
            sparse_b = sum(x.ByteSize() for x in inits) + sum(n.ByteSize() for n in nodes)
            if sparse_b > max_ratio * t.ByteSize():
                keep.append(t)
                continue
            shared.update(new_shared)
            decode_nodes.extend(nodes)
            keep.extend(inits)
            bitmask_meta.append({"name": t.name, "bits": inits[0].name, "values": inits[1].name,
                                 "shape": list(arr.shape), "nodes": [n.name for n in nodes]})
        tensors.append({"name": t.name, "elements": int(arr.size), "nonzeros": int(nz.size),
                        "dense_bytes": int(dense_b), "sparse_bytes": int(sparse_b)})
    if tensors:
        del g.initializer[:]
        g.initializer.extend(keep + list(shared.values()))
        g.sparse_initializer.extend(moved)
    if decode_nodes:
        import json

        rest = list(g.node)
        del g.node[:]
        g.node.extend(decode_nodes + rest)
        p = model.metadata_props.add()
        p.key, p.value = _BITMASK_KEY, json.dumps(bitmask_meta)
    info = {"format": format, "index_dtype": index_dtype if format == "coo" else None, "tensors": tensors,
            "dense_weight_bytes": int(sum(x["dense_bytes"] for x in tensors)),
            "sparse_weight_bytes": int(sum(x["sparse_bytes"] for x in tensors))}
    return model, info


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def save_sparse(graph_or_model, path: str | os.PathLike, *, format: str = "coo", index_dtype: str = "int64",
                min_elements: int = 64, max_ratio: float = 0.9, check: bool = True) -> dict[str, Any]:
    """Write the model with compactly stored sparse weights (see :func:`to_sparse_storage`).

    Returns the summary plus ``bytes`` (file size), ``dense_bytes`` (the same model written
    with dense initializers) and ``ratio`` = bytes / dense_bytes. With ``check`` the written
    model is run through ``onnx.checker`` (skipped for int32 COO indices, which it rejects).
    """
    dense = _as_model(graph_or_model)
    model, info = to_sparse_storage(dense, format=format, index_dtype=index_dtype, min_elements=min_elements,
                                    max_ratio=max_ratio)
    if check and (format == "bitmask" or index_dtype == "int64"):
        onnx.checker.check_model(model)
    data = model.SerializeToString()
    p = write_bytes_atomic(Path(path), data)
    dense_bytes = len(dense.SerializeToString())
    info.update(path=str(p), bytes=len(data), dense_bytes=dense_bytes,
                ratio=len(data) / dense_bytes if dense_bytes else 1.0)
    return info


_BITMASK_KEY = "nnsculpt.sparse_bitmask"


def _bitmask_encode(g: onnx.GraphProto, name: str, arr: np.ndarray, shared: dict[str, onnx.TensorProto],
                    taken: set[str]):
    """Decode nodes (writing ``name``) and the tensor's own initializers (bits first, values
    second). Small constants common to every tensor go to ``shared`` (added once)."""
    counter = [0]

    def fresh(suffix: str) -> str:
        cand, i = f"{name}__{suffix}", 1
        while cand in taken:
            cand, i = f"{name}__{suffix}{i}", i + 1
        taken.add(cand)
        return cand

    def common(key: str, value: np.ndarray) -> str:
        n = f"nnsculpt_bitmask__{key}"
        if n not in shared:
            shared[n] = numpy_helper.from_array(value, n)
        return n

    flat = arr.ravel()
    mask = flat != 0
    nnz = int(mask.sum())
    bits_n, vals_n = fresh("bits"), fresh("values")
    inits = [numpy_helper.from_array(np.packbits(mask, bitorder="little"), bits_n),
             numpy_helper.from_array(np.ascontiguousarray(flat[mask]), vals_n)]
    elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
    shape = fresh("shape")
    inits.append(numpy_helper.from_array(np.asarray(arr.shape, dtype=np.int64), shape))
    nodes: list[onnx.NodeProto] = []

    def node(op: str, ins: list[str], out: str | None = None, **attrs) -> str:
        counter[0] += 1
        o = out or fresh(f"t{counter[0]}")
        nodes.append(helper.make_node(op, ins, [o], name=fresh(f"d{counter[0]}"), **attrs))
        return o

    if nnz == 0:
        nodes.append(helper.make_node("ConstantOfShape", [shape], [name], name=fresh("d0"),
                                      value=helper.make_tensor("value", elem, [1], [0])))
        return nodes, inits
    end = fresh("size")
    inits.append(numpy_helper.from_array(np.asarray([arr.size], np.int64), end))
    col = node("Reshape", [bits_n, common("col", np.asarray([-1, 1], np.int64))])
    sh = node("BitShift", [col, common("shifts", np.arange(8, dtype=np.uint8).reshape(1, 8))], direction="RIGHT")
    bit = node("Mod", [sh, common("two", np.asarray(2, np.uint8))])
    flat_bits = node("Reshape", [bit, common("flat", np.asarray([-1], np.int64))])
    used = node("Slice", [flat_bits, common("start", np.asarray([0], np.int64)), end])
    mask_b = node("Cast", [used], to=onnx.TensorProto.BOOL)
    pos = node("CumSum", [node("Cast", [used], to=onnx.TensorProto.INT64), common("axis", np.asarray(0, np.int64))])
    idx = node("Sub", [pos, common("one", np.asarray(1, np.int64))])  # -1 before the first nonzero: valid
    gathered = node("Gather", [vals_n, idx], axis=0)
    flat_w = node("Where", [mask_b, gathered, common(f"zero_{arr.dtype.name}", np.zeros((), dtype=arr.dtype))])
    node("Reshape", [flat_w, shape], out=name)
    return nodes, inits


def densify_storage(model) -> onnx.ModelProto:
    """Dense initializers back from a :func:`save_sparse` file (COO or bitmask)."""
    import json

    proto = _as_model(model)
    g = proto.graph
    for st in list(g.sparse_initializer):
        from ..ir.onnx_io import sparse_to_dense

        g.initializer.append(numpy_helper.from_array(sparse_to_dense(st), st.values.name))
    del g.sparse_initializer[:]
    meta = next((p for p in proto.metadata_props if p.key == _BITMASK_KEY), None)
    if meta is not None:
        entries = json.loads(meta.value)
        inits = {t.name: t for t in g.initializer}
        drop_nodes = {n for e in entries for n in e["nodes"]}
        drop_inits = set()
        for e in entries:
            decode = [n for n in g.node if n.name in set(e["nodes"])]
            drop_inits |= {i for n in decode for i in n.input if i in inits}
            shape = tuple(e["shape"])
            size = int(np.prod(shape)) if shape else 1
            mask = np.unpackbits(numpy_helper.to_array(inits[e["bits"]]), count=size, bitorder="little").astype(bool)
            vals = numpy_helper.to_array(inits[e["values"]])
            dense = np.zeros(size, dtype=vals.dtype)
            dense[mask] = vals
            g.initializer.append(numpy_helper.from_array(dense.reshape(shape), e["name"]))
        keep_nodes = [n for n in g.node if n.name not in drop_nodes]
        del g.node[:]
        g.node.extend(keep_nodes)
        keep = [t for t in g.initializer if t.name not in drop_inits
                and not t.name.startswith("nnsculpt_bitmask__")]
        del g.initializer[:]
        g.initializer.extend(keep)
        props = [p for p in proto.metadata_props if p.key != _BITMASK_KEY]
        del proto.metadata_props[:]
        proto.metadata_props.extend(props)
    return proto


def load_sparse(path) -> Graph:
    """Import a :func:`save_sparse` file into the IR with dense weights (either format)."""
    from ..ir.onnx_io import from_onnx_model, load_model

    return from_onnx_model(densify_storage(load_model(path)))


# ======================================================================== the C kernel
_KERNEL_SRC = Path(__file__).with_name("sparse_kernels") / "spmm.c"
_lib: Any = None
_lib_error: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("NNSCULPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nnsculpt")
    return Path(base) / "sparse_kernels"


def kernel_library():
    """The compiled C kernel (``ctypes.CDLL``) or ``None`` (gcc missing / build failed)."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    try:
        src = _KERNEL_SRC.read_bytes()
        flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
        tag = hashlib.sha1(src + " ".join(flags).encode() + platform.node().encode()
                           + platform.machine().encode()).hexdigest()[:16]
        out = _cache_dir() / f"libnnsculpt_spmm_{tag}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            cc = os.environ.get("CC", "gcc")
            with tempfile.TemporaryDirectory(dir=out.parent) as td:
                tmp = Path(td) / out.name
                r = subprocess.run([cc, *flags, "-o", str(tmp), str(_KERNEL_SRC)],
                                   capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")
                os.replace(tmp, out)  # atomic: concurrent builders write the same bytes
        lib = ctypes.CDLL(str(out))
        f = lib.nnsculpt_spmm_xwt
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        f.argtypes = [I64, I64, I64, P, P, P, P, P, P]
        f.restype = ctypes.c_int
        lib.nnsculpt_spmm_isa.restype = ctypes.c_int
        _lib = lib
    except Exception as e:  # no compiler, read-only cache...: scipy fallback
        _lib_error = f"{type(e).__name__}: {e}"
        log.warning("sparse C kernel unavailable (%s); using scipy.sparse", _lib_error)
    return _lib


def kernel_info() -> dict[str, Any]:
    """Which kernel backend is in use (for benchmark reports)."""
    lib = kernel_library()
    if lib is not None:
        return {"backend": "c", "isa": "avx512" if lib.nnsculpt_spmm_isa() == 512 else "portable C"}
    return {"backend": "scipy", "reason": _lib_error}


class SparseLinear:
    """``Y = X @ W + bias`` for a CSR-held ``W`` (``K x N``): the kernel behind the custom op.

    The CSR arrays describe ``W^T`` (one row per output column ``n``), int32 indices.
    ``backend``: ``"c"`` (the gcc-built kernel), ``"scipy"``, or ``"auto"`` (C if it builds).
    """

    def __init__(self, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_in: int,
                 n_out: int, bias: np.ndarray | None = None, backend: str = "auto"):
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.K, self.N = int(n_in), int(n_out)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(self.N)
        if self.indptr.size != self.N + 1 or self.indices.size != self.values.size:
            raise ValueError("inconsistent CSR arrays")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.K):
            raise ValueError("CSR column index out of range")
        lib = kernel_library() if backend in ("auto", "c") else None
        if backend == "c" and lib is None:
            raise RuntimeError(f"C sparse kernel unavailable: {_lib_error}")
        self._fn = lib.nnsculpt_spmm_xwt if lib is not None else None
        # raw pointers of the constant arrays (kept alive by self): ctypes' .ctypes.data costs ~2 us each
        self._ptrs = (self.indptr.ctypes.data, self.indices.ctypes.data, self.values.ctypes.data,
                      None if self.bias is None else self.bias.ctypes.data)
        self._csr = None
        if self._fn is None:
            import scipy.sparse as sp

            self._csr = sp.csr_matrix((self.values, self.indices, self.indptr), shape=(self.N, self.K))
        self.backend = "c" if self._fn is not None else "scipy"

    @classmethod
    def from_dense(cls, w: np.ndarray, bias: np.ndarray | None = None, backend: str = "auto") -> "SparseLinear":
        """From a dense ``K x N`` weight (``X @ w``)."""
        v, i, p = csr_of_transpose(w)
        return cls(v, i, p, w.shape[0], w.shape[1], bias, backend)

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def dense(self) -> np.ndarray:
        """The ``K x N`` dense weight."""
        wt = np.zeros((self.N, self.K), dtype=np.float32)
        rows = np.repeat(np.arange(self.N), np.diff(self.indptr))
        wt[rows, self.indices] = self.values
        return np.ascontiguousarray(wt.T)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.K:
            raise ValueError(f"sparse matmul: input last dim {x.shape[-1]} != {self.K}")
        lead = x.shape[:-1]
        x2 = np.ascontiguousarray(x.reshape(-1, self.K))
        b = x2.shape[0]
        if self._fn is not None:
            y = np.empty((b, self.N), dtype=np.float32)
            if b:
                ip, ix, va, bi = self._ptrs
                rc = self._fn(b, self.K, self.N, ip, ix, va, x2.ctypes.data, bi, y.ctypes.data)
                if rc:
                    raise MemoryError("sparse matmul: scratch allocation failed")
        else:
            y = np.asarray((self._csr @ x2.T).T, dtype=np.float32)
            if self.bias is not None:
                y = y + self.bias
            y = np.ascontiguousarray(y)
        return y.reshape(lead + (self.N,))


def csr_of_transpose(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (values f32, column indices i32, row pointers i32) of ``w.T``."""
    wt = np.ascontiguousarray(np.asarray(w, dtype=np.float32).T)
    rows, cols = np.nonzero(wt)
    values = wt[rows, cols].astype(np.float32)
    indptr = np.zeros(wt.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=wt.shape[0]), out=indptr[1:])
    if indptr[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many nonzeros for int32 CSR")
    return values, cols.astype(np.int32), indptr.astype(np.int32)


# ===================================================================== custom-op bridge
_KERNELS: dict[str, SparseLinear] = {}
_pyop_id: int | None = None
_pyop_error: str | None = None


def extensions_available() -> bool:
    try:
        import onnxruntime_extensions  # noqa: F401
    except Exception:
        return False
    return True


def _ensure_pyop() -> None:
    """Register the Python custom op with onnxruntime-extensions (once per process)."""
    global _pyop_id, _pyop_error
    if _pyop_id is not None:
        return
    if _pyop_error is not None:
        raise RuntimeError(_pyop_error)
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
        from onnxruntime_extensions import _ocos
    except Exception as e:
        _pyop_error = f"onnxruntime-extensions is not installed ({e}); pip install onnxruntime-extensions"
        raise RuntimeError(_pyop_error) from None

    def nnsculpt_sparse_matmul(x, key):
        k = _KERNELS.get(key)
        if k is None:
            raise RuntimeError(f"{OP_TYPE}: no kernel registered for key '{key}': create the session with "
                               f"nnsculpt.runtime.sparse.session(), or call register_model(model) first")
        return k(x)

    opdef = onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float], outputs=[PyCustomOpDef.dt_float],
                    attrs={"key": PyCustomOpDef.dt_string})(nnsculpt_sparse_matmul)
    our_id = id(opdef)
    stock = _ocos._on_pyop_invocation

    def hook(k_id, feed, attributes):
        # the stock hook returns outputs as python lists (slow); numpy arrays are accepted too
        if k_id != our_id:
            return stock(k_id, feed, attributes)
        op = _ocos.Opdef._odlist[k_id]
        rv = op.body(*feed, **op.cast_attributes(attributes))
        return (k_id, rv.shape, np.ascontiguousarray(rv, dtype=np.float32).ravel())

    PyCustomOpDef.install_hooker(hook)
    _pyop_id = our_id


def _node_attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return numpy_helper.to_array(v) if a.type == onnx.AttributeProto.TENSOR else v
    return None


def _iter_sparse_nodes(model: onnx.ModelProto) -> Iterable[onnx.NodeProto]:
    for n in model.graph.node:
        if n.op_type == OP_TYPE and n.domain == CUSTOM_DOMAIN:
            yield n


def register_model(model, backend: str = "auto") -> int:
    """Build and register the kernels of every sparse node of ``model``; returns the count."""
    model = model if isinstance(model, onnx.ModelProto) else _as_model(model)
    count = 0
    for n in _iter_sparse_nodes(model):
        key = _node_attr(n, "key")
        key = key.decode() if isinstance(key, bytes) else key
        if key in _KERNELS and (backend == "auto" or _KERNELS[key].backend == backend):
            count += 1
            continue
        _KERNELS[key] = SparseLinear(_node_attr(n, "values"), _node_attr(n, "indices"), _node_attr(n, "indptr"),
                                     int(_node_attr(n, "n_in")), int(_node_attr(n, "n_out")),
                                     _node_attr(n, "bias"), backend)
        count += 1
    return count


def has_sparse_nodes(model) -> bool:
    model = model if isinstance(model, onnx.ModelProto) else _as_model(model)
    return any(True for _ in _iter_sparse_nodes(model))


def session(model, *, threads: int | None = 1, optimization_level: str = "all", fallback: str = "densify",
            backend: str = "auto"):
    """An ONNX Runtime session for a model that may hold sparse custom nodes.

    Registers the custom op and every node's kernel. Without onnxruntime-extensions,
    ``fallback="densify"`` runs the :func:`densify` d model (standard ops, same outputs up to
    float summation order) and warns; ``fallback="error"`` raises. ``threads``: ORT intra-op
    threads (the sparse kernel itself is single threaded).
    """
    from .ort import session as ort_session

    proto = _as_model(model)
    if not has_sparse_nodes(proto):
        return ort_session(proto, threads=threads, optimization_level=optimization_level)
    try:
        _ensure_pyop()
    except RuntimeError as e:
        if fallback != "densify":
            raise
        warnings.warn(f"{e}; running the dense fallback (densify) instead", RuntimeWarning, stacklevel=2)
        return ort_session(densify(proto), threads=threads, optimization_level=optimization_level)
    register_model(proto, backend)
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    so = ort.SessionOptions()
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so.graph_optimization_level = levels[optimization_level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def densify(model) -> onnx.ModelProto:
    """The dense fallback: every sparse custom node becomes ``MatMul`` (+ ``Add`` for a bias)
    with its dense weight as an initializer. The result runs on a plain ONNX Runtime."""
    proto = _as_model(model)
    g = proto.graph
    nodes, inits = [], []
    for n in g.node:
        if n.op_type != OP_TYPE or n.domain != CUSTOM_DOMAIN:
            nodes.append(n)
            continue
        k = SparseLinear(_node_attr(n, "values"), _node_attr(n, "indices"), _node_attr(n, "indptr"),
                         int(_node_attr(n, "n_in")), int(_node_attr(n, "n_out")), _node_attr(n, "bias"),
                         backend="scipy" if _has_scipy() else "auto")
        base = n.name or n.output[0]
        wname = _free_name(g, f"{base}_weight_dense")
        inits.append(numpy_helper.from_array(k.dense(), wname))
        if k.bias is None:
            nodes.append(helper.make_node("MatMul", [n.input[0], wname], [n.output[0]], name=n.name))
        else:
            bname, tmp = _free_name(g, f"{base}_bias_dense"), _free_name(g, f"{base}_matmul_out")
            inits.append(numpy_helper.from_array(k.bias, bname))
            nodes.append(helper.make_node("MatMul", [n.input[0], wname], [tmp], name=n.name))
            nodes.append(helper.make_node("Add", [tmp, bname], [n.output[0]], name=f"{n.name}_bias"))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    if not any(n.domain == CUSTOM_DOMAIN for n in g.node):
        keep = [o for o in proto.opset_import if o.domain != CUSTOM_DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
    return proto


def _has_scipy() -> bool:
    try:
        import scipy.sparse  # noqa: F401
    except Exception:
        return False
    return True


def _free_name(g: onnx.GraphProto, base: str) -> str:
    used = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    return name


# ======================================================================== lowering
def _sparse_plan(node: Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """``(W [K x N], bias [N] | None)`` such that ``node(x) == x @ W + bias``, or why not."""
    ins = list(node.inputs) + [None] * 3
    if node.domain not in ("", "ai.onnx"):
        return "not a default-domain op"
    x, w = ins[0], ins[1]
    if x is None or x.is_const or w is None or not w.is_const:
        return "weight is not a constant second input"
    wc = w.const
    if wc.dtype != np.float32 or wc.ndim != 2:
        return "weight is not a 2-D float32 tensor"
    if node.op_type == "MatMul":
        if x.rank is not None and x.rank < 1:
            return "input rank < 1"
        return wc, None
    if node.op_type == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "transA=1"
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        wk = wc.T if int(node.attrs.get("transB", 0)) else wc
        wk = (wk * np.float32(alpha)).astype(np.float32) if alpha != 1.0 else wk
        c = ins[2]
        if c is None:
            return np.ascontiguousarray(wk), None
        if not c.is_const:
            return "C is not constant"
        cc = np.asarray(c.const, dtype=np.float32)
        n = wk.shape[1]
        if cc.size == 1:
            bias = np.full(n, cc.reshape(()).item(), dtype=np.float32)
        elif cc.shape in ((n,), (1, n)):
            bias = cc.reshape(n)
        else:
            return f"C of shape {cc.shape} is not a per-column bias"
        return np.ascontiguousarray(wk), (bias * np.float32(beta)).astype(np.float32)
    return f"op {node.op_type} has no sparse kernel"


def _sparse_node_attrs(name: str, w: np.ndarray, bias: np.ndarray | None) -> dict[str, Any]:
    values, indices, indptr = csr_of_transpose(w)
    h = hashlib.sha1()
    for a in (values, indices, indptr, np.asarray(w.shape, np.int64)) + ((bias,) if bias is not None else ()):
        h.update(np.ascontiguousarray(a).tobytes())
    attrs: dict[str, Any] = {"key": f"{name}:{h.hexdigest()[:16]}", "values": values, "indices": indices,
                             "indptr": indptr, "n_in": int(w.shape[0]), "n_out": int(w.shape[1])}
    if bias is not None:
        attrs["bias"] = np.asarray(bias, dtype=np.float32)
    return attrs


def _single_node_models(w: np.ndarray, bias: np.ndarray | None, attrs: dict[str, Any], opset: int):
    """(dense, sparse) one-node models computing ``X[B, K] @ w (+ bias)``."""
    k, n = w.shape
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["B", k])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["B", n])
    inits = [numpy_helper.from_array(w, "W")]
    if bias is None:
        dnodes = [helper.make_node("MatMul", ["X", "W"], ["Y"])]
    else:
        inits.append(numpy_helper.from_array(bias.reshape(n), "C"))
        dnodes = [helper.make_node("Gemm", ["X", "W", "C"], ["Y"])]
    dense = helper.make_model(helper.make_graph(dnodes, "dense", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", max(opset, 13))])
    dense.ir_version = 8
    snode = helper.make_node(OP_TYPE, ["X"], ["Y"], domain=CUSTOM_DOMAIN)
    for key, val in attrs.items():
        snode.attribute.append(helper.make_attribute(key, numpy_helper.from_array(val) if isinstance(val, np.ndarray) else val))
    sparse = helper.make_model(helper.make_graph([snode], "sparse", [x], [y]),
                               opset_imports=[helper.make_opsetid("", max(opset, 13)),
                                              helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    sparse.ir_version = 8
    return dense, sparse


def time_session(sess, feed: dict[str, np.ndarray], *, runs: int = 7, min_time: float = 2e-3,
                 clock=None) -> float:
    """Median seconds per ``sess.run`` over ``runs`` measurements (each the mean of enough
    back-to-back calls to last ``min_time``).

    ``clock`` defaults to :func:`time.thread_time` -- CPU time of the calling thread, which is
    where ONNX Runtime runs every kernel when ``intra_op_num_threads=1`` (and the PyOp too):
    on a machine shared with other jobs it leaves out the time this thread was descheduled.
    Pass ``time.perf_counter`` for wall time (needed with more intra-op threads).
    """
    clock = clock or time.thread_time
    sess.run(None, feed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    one = max(time.perf_counter() - t0, 1e-6)
    number = int(min(200, max(1, min_time / one)))
    out = []
    for _ in range(runs):
        t0 = clock()
        for _ in range(number):
            sess.run(None, feed)
        out.append((clock() - t0) / number)
    return float(np.median(out))


def compare_dense_sparse(w: np.ndarray, bias: np.ndarray | None = None, *, batch: int = 1, runs: int = 7,
                         threads: int = 1, seed: int = 0, backend: str = "auto") -> dict[str, float]:
    """Median ORT latency of the dense one-node model vs the sparse custom-op model for
    ``X[batch, K] @ w``; both measured in this call, interleaved run by run; ``speedup`` is
    the median of the per-run ratios dense / sparse (quartiles alongside). With
    ``threads=1`` the clock is the thread's CPU time (see :func:`time_session`), else wall time."""
    _ensure_pyop()
    attrs = _sparse_node_attrs("bench", w, bias)
    dense, sparse = _single_node_models(w, bias, attrs, 17)
    ds = session(dense, threads=threads)
    ss = session(sparse, threads=threads, backend=backend)
    feed = {"X": np.random.default_rng(seed).standard_normal((batch, w.shape[0])).astype(np.float32)}
    clock = time.thread_time if threads == 1 else time.perf_counter
    td, tsp = [], []
    for _ in range(runs):  # interleave so that load from other processes hits both alike
        td.append(time_session(ds, feed, runs=1, clock=clock))
        tsp.append(time_session(ss, feed, runs=1, clock=clock))
    ratios = np.asarray(td) / np.maximum(np.asarray(tsp), 1e-12)  # paired: adjacent runs share conditions
    return {"dense_s": float(np.median(td)), "sparse_s": float(np.median(tsp)),
            "speedup": float(np.median(ratios)), "speedup_q25": float(np.percentile(ratios, 25)),
            "speedup_q75": float(np.percentile(ratios, 75))}


def lower_sparse(graph: Graph, *, batch: int = 1, min_speedup: float | None = 1.1, min_sparsity: float = 0.5,
                 runs: int = 7, threads: int = 1, ops: tuple[str, ...] = ("MatMul", "Gemm"),
                 backend: str = "auto") -> tuple[Graph, dict[str, Any]]:
    """A copy of ``graph`` where MatMul/Gemm layers that run faster sparse use the sparse custom op.

    Candidates: MatMul ``X @ W`` / Gemm (``transA=0``, per-column or scalar ``C``) with a
    constant 2-D float32 weight of sparsity >= ``min_sparsity``. Each candidate is timed in
    ONNX Runtime (``threads`` intra-op threads, input ``[batch, K]``; median of ``runs``,
    dense and sparse interleaved) and swapped only if dense / sparse >= ``min_speedup``.
    ``min_speedup=None`` swaps every candidate without timing (tests, forced lowering).

    Returns ``(new_graph, report)``; the report (also in ``new_graph.meta["sparse_exec"]``)
    lists every candidate with its sparsity, timings, speedup and decision. The input graph
    is not modified: keep it (or :func:`densify` the result) as the dense fallback.
    """
    _ensure_pyop()
    g = graph.copy()
    report: dict[str, Any] = {"batch": batch, "threads": threads, "min_speedup": min_speedup,
                              "kernel": kernel_info(), "layers": {}}
    for node in list(g.nodes):
        if node.op_type not in ops:
            continue
        plan = _sparse_plan(node)
        if isinstance(plan, str):
            continue
        w, bias = plan
        sparsity = 1.0 - np.count_nonzero(w) / w.size
        entry: dict[str, Any] = {"op": node.op_type, "shape": list(w.shape), "sparsity": round(float(sparsity), 6)}
        report["layers"][node.name] = entry
        if sparsity < min_sparsity:
            entry["decision"] = f"dense (sparsity < {min_sparsity:g})"
            continue
        attrs = _sparse_node_attrs(node.name, w, bias)
        if min_speedup is not None:
            res = compare_dense_sparse(w, bias, batch=batch, runs=runs, threads=threads, backend=backend)
            entry.update(dense_us=round(res["dense_s"] * 1e6, 2), sparse_us=round(res["sparse_s"] * 1e6, 2),
                         speedup=round(res["speedup"], 3))
            if res["speedup"] < min_speedup:
                entry["decision"] = f"dense (speedup {res['speedup']:.2f} < {min_speedup:g})"
                continue
        _swap(g, node, attrs)
        _KERNELS.setdefault(attrs["key"], SparseLinear(attrs["values"], attrs["indices"], attrs["indptr"],
                                                       attrs["n_in"], attrs["n_out"], attrs.get("bias"), backend))
        entry["decision"] = "sparse"
    g.meta["sparse_exec"] = report
    return g, report


def _swap(g: Graph, node: Node, attrs: dict[str, Any]) -> Node:
    x = node.inputs[0]
    old_inputs = [v for v in node.inputs[1:] if v is not None]
    outs = list(node.outputs)
    idx = g.nodes.index(node)
    anchor = g.nodes[idx + 1] if idx + 1 < len(g.nodes) else None
    meta = dict(node.meta)
    if "history" in meta:
        meta["history"] = list(meta["history"])
    g.remove_node(node, force=True)
    new = Node(OP_TYPE, [x], outs, attrs, name=node.name, domain=CUSTOM_DOMAIN, meta=meta)
    new.meta["lowered_from"] = node.op_type
    g.insert_node(new, before=anchor) if anchor is not None else g.insert_node(new)
    mark_changed(new, "lower-sparse")
    for v in old_inputs:
        g.remove_initializer_if_unused(v)
    g.opset_imports.setdefault(CUSTOM_DOMAIN, 1)
    return new


# ============================================================================ command line
def main(argv: list[str] | None = None) -> int:
    """``python -m nnsculpt.runtime.sparse {store,lower,densify} IN.onnx OUT.onnx [...]``

    store: compact weight storage (plain-ORT compatible); lower: sparse custom op where it
    measured faster; densify: a lowered file back to standard ops. ``store`` also works on a
    lowered file (it only touches initializers)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m nnsculpt.runtime.sparse", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("store", help="move sparse initializers to sparse_initializer (plain-ORT compatible)")
    s.add_argument("input"), s.add_argument("output")
    s.add_argument("--format", choices=["coo", "bitmask"], default="coo")
    s.add_argument("--index-dtype", choices=sorted(_IDX_DTYPES), default="int64")
    s = sub.add_parser("lower", help="swap MatMul/Gemm layers to the sparse custom op where it is faster")
    s.add_argument("input"), s.add_argument("output")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--min-speedup", type=float, default=1.1)
    s.add_argument("--min-sparsity", type=float, default=0.5)
    s.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("densify", help="replace sparse custom nodes by dense MatMul (plain ORT)")
    s.add_argument("input"), s.add_argument("output")
    args = ap.parse_args(argv)
    if args.cmd == "store":
        info = save_sparse(args.input, args.output, format=args.format, index_dtype=args.index_dtype,
                           check=args.index_dtype == "int64")
        print(json.dumps({k: v for k, v in info.items() if k != "tensors"}, indent=1))
    elif args.cmd == "lower":
        from ..ir.onnx_io import from_onnx, save

        g, rep = lower_sparse(from_onnx(args.input), batch=args.batch, min_speedup=args.min_speedup,
                              min_sparsity=args.min_sparsity, threads=args.threads)
        save(g, args.output)
        print(json.dumps(rep, indent=1))
    else:
        write_bytes_atomic(Path(args.output), densify(args.input).SerializeToString())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
