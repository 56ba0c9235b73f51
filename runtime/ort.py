"""ONNX Runtime sessions and model inputs.

* :func:`session` -- an ``onnxruntime.InferenceSession`` (CPU EP by default) for a Graph,
  a ModelProto or a path.
* :func:`run` -- run a graph / session on a dict of named arrays, returning a dict.
* :func:`make_inputs` -- deterministic random inputs from a graph's input types.
* :func:`load_inputs` -- read an ``.npz`` of inputs and check it against the graph.
* :func:`compare_outputs` -- max abs / rel error, cosine similarity, top-1 agreement.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from ..ir.errors import InputDataError, ModelLoadError
from ..ir.graph import Graph
from ..ir.onnx_io import to_onnx_model

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def _model_bytes(model: "Graph | onnx.ModelProto | str | os.PathLike | bytes") -> bytes | str:
    if isinstance(model, Graph):
        return to_onnx_model(model).SerializeToString()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    p = Path(model)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    return str(p)


def session(model: "Graph | onnx.ModelProto | str | os.PathLike | bytes", *, providers=None,
            optimization_level: str = "all", threads: int | None = None,
            optimized_model_path: str | None = None, **provider_options: Any) -> ort.InferenceSession:
    """Create an InferenceSession (CPU EP unless ``providers`` says otherwise).

    ``optimization_level`` is one of ``disable``, ``basic``, ``extended``, ``all``.
    ``threads`` sets intra-op threads (default: ORT's choice).
    """
    so = ort.SessionOptions()
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization_level not in levels:
        raise ValueError(f"optimization_level must be one of {sorted(levels)}, got {optimization_level!r}")
    so.graph_optimization_level = levels[optimization_level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    src = _model_bytes(model)
    try:
        return ort.InferenceSession(src, sess_options=so, providers=list(providers or DEFAULT_PROVIDERS))
    except Exception as e:
        what = src if isinstance(src, str) else getattr(model, "name", "model")
        raise ModelLoadError(f"{what}: ONNX Runtime cannot load the model: {str(e).strip().splitlines()[0]}") from None


def run(model, inputs: Mapping[str, np.ndarray], output_names: list[str] | None = None, *,
        batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` (Graph, ModelProto, path or InferenceSession) on named inputs.

    Any number of samples runs on any model: the inputs are fed in chunks that fit the model
    (:func:`feed_batches`) -- one sample at a time for a batch fixed at 1, ``batch_size`` rows
    for a symbolic batch (all at once when None) -- and the outputs are concatenated along
    dim 0."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = output_names or [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, feed) for feed in feed_batches(sess, inputs, batch_size)]
    if len(parts) == 1:
        return dict(zip(names, parts[0]))
    return {n: np.concatenate([np.asarray(p[i]) for p in parts], axis=0) if np.ndim(parts[0][i]) else parts[0][i]
            for i, n in enumerate(names)}


def _fixed_dim0(shape) -> int | None:
    d = shape[0] if shape else None
    return d if isinstance(d, int) and d > 0 else None


def feed_batches(sess: ort.InferenceSession, inputs: Mapping[str, np.ndarray], batch_size: int | None = None):
    """Yield feeds of ``inputs`` that fit ``sess``'s inputs.

    The sample count ``n`` is the leading dim of the first input with rank >= 1; inputs whose
    leading dim is ``n`` are split, the others (scalars, recurrent state) are fed whole. When
    every split input has a fixed leading dim ``k`` in the model (a batch fixed at 1, say), the
    chunks have ``k`` rows (``n`` must be a multiple of ``k``); with a symbolic batch, chunks of
    ``batch_size`` rows (everything at once when None). Raises :class:`InputDataError` naming
    the input when an input is missing or the sample count does not fit a fixed batch."""
    metas = [m for m in sess.get_inputs() if m.name in inputs]  # a missing one: ORT names it
    feed = {m.name: np.asarray(inputs[m.name]) for m in metas}
    ranked = [m for m in metas if feed[m.name].ndim >= 1]
    if not ranked:
        yield feed
        return
    n = feed[ranked[0].name].shape[0]
    split = [m for m in ranked if feed[m.name].shape[0] == n]
    fixed = {_fixed_dim0(m.shape) for m in split}
    if len(fixed) == 1 and None not in fixed:
        step = fixed.pop()
        if n % step:
            bad = split[0]
            raise InputDataError(f"input '{bad.name}': {n} samples do not split into the model's fixed batch of "
                                 f"{step} (dim 0 is fixed at {step})")
    else:
        step = int(batch_size) if batch_size else n
    if step >= n:
        yield feed
        return
    for s in range(0, n, step):
        yield {k: (np.ascontiguousarray(v[s:s + step]) if any(m.name == k for m in split) else v)
               for k, v in feed.items()}


# ----------------------------------------------------------------------------- inputs
def _gather_bounds(graph: Graph) -> dict[str, int]:
    """For integer inputs feeding a Gather on a constant table, the table size (token ids)."""
    bounds: dict[str, int] = {}
    for v in graph.inputs:
        for n in v.users:
            if n.op_type == "Gather" and n.inputs[1] is v and n.inputs[0] is not None and n.inputs[0].is_const:
                axis = int(n.attrs.get("axis", 0))
                size = n.inputs[0].const.shape[axis]
                bounds[v.name] = min(bounds.get(v.name, size), size)
    return bounds


def make_inputs(graph: Graph, *, batch: int = 1, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Deterministic random inputs matching the graph's input types.

    The first symbolic dim becomes ``batch``; other symbolic dims take ``dims[name]`` or
    32 (a multiple of the usual down-sampling factors, so detectors with free H/W run). Floats are standard normal, integer inputs that index an embedding table are drawn
    below the table size, other integers from [0, 10), booleans at random.
    """
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(graph)
    out: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.shape is None:
            raise InputDataError(f"input '{v.name}' has unknown rank: pass inputs explicitly (--inputs X.npz)")
        shape = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            else:
                shape.append(int((dims or {}).get(d, 32)) if isinstance(d, str) else 32)
        dt = v.dtype or np.dtype(np.float32)
        if dt.kind == "f":
            arr = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            arr = rng.integers(0, bounds.get(v.name, 10), size=shape).astype(dt)
        elif dt.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputDataError(f"input '{v.name}': cannot generate data of dtype {dt}")
        out[v.name] = arr
    return out


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file; InputDataError naming the file if it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise InputDataError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # any unreadable file is a data error
        raise InputDataError(f"{p}: not a readable .npz file: {e}") from None


def load_inputs(path: str | os.PathLike, graph: Graph) -> dict[str, np.ndarray]:
    """Load an ``.npz`` mapping input names to arrays (with a batch dim); validate it.

    Raises :class:`InputDataError` naming the file and the input when an input is missing,
    has the wrong rank, a fixed dim differs, or the dtype kind is incompatible.
    Extra arrays (e.g. ``labels``) are ignored.
    """
    p = Path(path)
    data = read_npz(p)
    out = {}
    for v in graph.inputs:
        if v.name not in data:
            raise InputDataError(f"{p}: missing input '{v.name}' (the file has {sorted(data)}; "
                                 f"the model needs {[i.name for i in graph.inputs]})")
        arr = data[v.name]
        if v.shape is not None:
            if arr.ndim != len(v.shape):
                raise InputDataError(f"{p}: input '{v.name}' has rank {arr.ndim}, the model expects "
                                     f"{len(v.shape)} (shape {list(v.shape)})")
            for i, (a, d) in enumerate(zip(arr.shape, v.shape)):
                if not isinstance(d, int) or d <= 0 or a == d:
                    continue
                if i == 0 and a % d == 0:
                    continue  # more samples than a fixed batch: they are fed d at a time
                what = "samples, not a multiple of the fixed batch" if i == 0 else "the model expects"
                raise InputDataError(f"{p}: input '{v.name}' dim {i} is {a}, {what} {d}")
        if v.dtype is not None and arr.dtype != v.dtype:
            if arr.dtype.kind == v.dtype.kind or (arr.dtype.kind in "iu" and v.dtype.kind in "iu") \
                    or (arr.dtype.kind in "iuf" and v.dtype.kind == "f"):
                arr = arr.astype(v.dtype)
            else:
                raise InputDataError(f"{p}: input '{v.name}' has dtype {arr.dtype}, the model expects {v.dtype}")
        out[v.name] = arr
    return out


def batches(inputs: Mapping[str, np.ndarray], batch_size: int):
    """Split a dict of arrays along dim 0 into dicts of at most ``batch_size`` rows."""
    n = min(len(a) for a in inputs.values()) if inputs else 0
    for s in range(0, n, batch_size):
        yield {k: v[s:s + batch_size] for k, v in inputs.items()}


# -------------------------------------------------------------------------- comparison
def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs error, max rel error (relative to max |ref|), cosine similarity,
    and top-1 agreement (for outputs whose last dim looks like class scores)."""
    res: dict[str, dict[str, float]] = {}
    for name, a in ref.items():
        if name not in got:
            continue
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(got[name], dtype=np.float64)
        if a64.shape != b64.shape:
            res[name] = {"shape_mismatch": 1.0}
            continue
        diff = np.abs(a64 - b64)
        scale = max(float(np.abs(a64).max()) if a64.size else 0.0, 1e-12)
        fa, fb = a64.ravel(), b64.ravel()
        denom = float(np.linalg.norm(fa) * np.linalg.norm(fb))
        cos = float(fa @ fb / denom) if denom > 0 else (1.0 if np.allclose(fa, fb) else 0.0)
        entry = {"max_abs": float(diff.max()) if diff.size else 0.0,
                 "max_rel": float(diff.max() / scale) if diff.size else 0.0,
                 "cosine": cos}
        if a64.ndim >= 2 and a64.shape[-1] > 1:
            entry["top1_agreement"] = float((a64.argmax(-1) == b64.argmax(-1)).mean())
        res[name] = entry
    return res
