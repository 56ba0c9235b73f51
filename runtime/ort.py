"""ONNX Runtime sessions and model inputs.

* :func:`session` -- an ``onnxruntime.InferenceSession`` (CPU EP by default) for a Graph,
  a ModelProto or a path.
* :func:`run` -- run a graph / session on a dict of named arrays, returning a dict.
* :func:`make_inputs` -- deterministic random inputs from a graph's input types.
* :func:`load_inputs` -- read an ``.npz`` of inputs and check it against the graph.
* :func:`compare_outputs` -- max abs / rel error, cosine similarity, top-1 agreement.

Input data comes in two forms:

* **dense** -- ``dict[str, np.ndarray]``: per input name one array with a leading batch
  (sample) dim; every sample has the same shape. What one ``.npz`` file holds.
* **ragged** -- ``dict[str, list[np.ndarray]]`` (:data:`RaggedInputs`): per input name a
  list of *elements*; element ``i`` of every input together is one batch of samples (each
  array with its own leading sample dim), and different elements may differ in their other
  dims (text lines of different widths, audio of different lengths). Every input's list has
  the same length. What a directory of ``.npz`` files holds (one element per file, in sorted
  name order; :func:`load_inputs` on a directory).

:func:`is_ragged`, :func:`num_samples`, :func:`take_samples`, :func:`iter_elements`,
:func:`batches` and :func:`flatten_values` work on both forms, so a consumer written with
them accepts either. :func:`feed_batches` / :func:`run` feed ragged data element by element
(each element chunked like dense data), and :func:`run` then returns per output a list
aligned with the elements; :func:`compare_outputs` accepts such lists. Dense data takes
exactly the code paths it took before ragged data existed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..ir.errors import InputDataError, ModelLoadError
from ..ir.graph import Graph
from ..ir.onnx_io import to_onnx_model

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

#: ragged input data: per input name a list of elements (one batch each, leading sample dim;
#: elements may differ in their other dims; every input's list has the same length)
RaggedInputs = dict[str, list[np.ndarray]]
#: input data in either form: dense ``dict[str, np.ndarray]`` or :data:`RaggedInputs`
Inputs = Union[Mapping[str, np.ndarray], RaggedInputs]


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
    so.log_severity_level = 4   # errors reach the caller as exceptions (named by nnsculpt), not as log lines
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


def run(model, inputs: "Inputs", output_names: list[str] | None = None, *,
        batch_size: int | None = None) -> dict[str, Any]:
    """Run ``model`` (Graph, ModelProto, path or InferenceSession) on named inputs.

    Any number of samples runs on any model: the inputs are fed in chunks that fit the model
    (:func:`feed_batches`) -- one sample at a time for a batch fixed at 1, ``batch_size`` rows
    for a symbolic batch (all at once when None) -- and the outputs are concatenated along
    dim 0. Ragged inputs (:data:`RaggedInputs`) run element by element, each chunked the same
    way, and give per output a *list* of arrays aligned with the elements."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = output_names or [o.name for o in sess.get_outputs()]
    if is_ragged(inputs):
        per = [_run_dense(sess, names, el, batch_size, f"element {i}: ")
               for i, el in enumerate(_checked_elements(sess, inputs))]
        return {n: [p[n] for p in per] for n in names}
    return _run_dense(sess, names, inputs, batch_size)


def _run_dense(sess, names, inputs, batch_size, where: str = "") -> dict[str, np.ndarray]:
    parts = [sess.run(names, feed) for feed in _feed_dense(sess, inputs, batch_size, where)]
    if len(parts) == 1:
        return dict(zip(names, parts[0]))
    return {n: np.concatenate([np.asarray(p[i]) for p in parts], axis=0) if np.ndim(parts[0][i]) else parts[0][i]
            for i, n in enumerate(names)}


def _fixed_dim0(shape) -> int | None:
    d = shape[0] if shape else None
    return d if isinstance(d, int) and d > 0 else None


def feed_batches(sess: ort.InferenceSession, inputs: "Inputs", batch_size: int | None = None):
    """Yield feeds of ``inputs`` that fit ``sess``'s inputs.

    The sample count ``n`` is the leading dim of the first input with rank >= 1; inputs whose
    leading dim is ``n`` are split, the others (scalars, recurrent state) are fed whole. When
    every split input has a fixed leading dim ``k`` in the model (a batch fixed at 1, say), the
    chunks have ``k`` rows (``n`` must be a multiple of ``k``); with a symbolic batch, chunks of
    ``batch_size`` rows (everything at once when None). Raises :class:`InputDataError` naming
    the input when an input is missing or the sample count does not fit a fixed batch.

    Ragged inputs (:data:`RaggedInputs`) are fed element by element, each element chunked as
    above; every element is first checked against the session's inputs (rank, fixed dims,
    dtype -- a compatible dtype is cast), errors naming the element index and the input."""
    if is_ragged(inputs):
        for i, el in enumerate(_checked_elements(sess, inputs)):
            yield from _feed_dense(sess, el, batch_size, f"element {i}: ")
        return
    yield from _feed_dense(sess, inputs, batch_size)


def _feed_dense(sess: ort.InferenceSession, inputs: Mapping[str, np.ndarray], batch_size: int | None = None,
                where: str = ""):
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
            raise InputDataError(f"{where}input '{bad.name}': {n} samples do not split into the model's fixed batch of "
                                 f"{step} (dim 0 is fixed at {step})")
    else:
        step = int(batch_size) if batch_size else n
    if step >= n:
        yield feed
        return
    for s in range(0, n, step):
        yield {k: (np.ascontiguousarray(v[s:s + step]) if any(m.name == k for m in split) else v)
               for k, v in feed.items()}


# ------------------------------------------------------------------------ ragged data
def is_ragged(data: Any) -> bool:
    """True when ``data`` is in the ragged form (:data:`RaggedInputs`): some value is a list
    (or tuple) of arrays. A dense ``dict[str, np.ndarray]`` gives False."""
    return isinstance(data, Mapping) and any(isinstance(v, (list, tuple)) for v in data.values())


def check_ragged(data: Mapping[str, Any], where: str = "inputs") -> int:
    """Check the ragged form's structure; return the number of elements. Raises
    :class:`InputDataError` when a value is not a list (every input needs one), a list is
    empty, or the lists differ in length (naming the inputs and their lengths)."""
    lens = {}
    for k, v in data.items():
        if not isinstance(v, (list, tuple)):
            raise InputDataError(f"{where}: input '{k}' is a single array while other inputs are lists of "
                                 f"elements; give every input a list (one array per element)")
        lens[k] = len(v)
    if not lens:
        return 0
    if len(set(lens.values())) > 1:
        raise InputDataError(f"{where}: the inputs' lists of elements differ in length "
                             f"({', '.join(f'{k!r}: {n}' for k, n in lens.items())}); element i of every input "
                             f"belongs to batch i")
    n = next(iter(lens.values()))
    if n == 0:
        raise InputDataError(f"{where}: the lists of elements are empty (inputs {sorted(lens)})")
    return n


def _element_count(el: Mapping[str, Any]) -> int:
    """Samples in one dense element: the leading dim of its first input with rank >= 1 (1 when
    every input is a scalar; 0 when there are none)."""
    for v in el.values():
        if np.ndim(v) >= 1:
            return int(np.shape(v)[0])
    return 1 if el else 0


def iter_elements(data: "Inputs") -> Iterator[dict[str, np.ndarray]]:
    """The dense dicts of ``data``: one per element of ragged data; dense data itself, once."""
    if not is_ragged(data):
        yield data  # type: ignore[misc]
        return
    n = check_ragged(data)
    for i in range(n):
        yield {k: v[i] for k, v in data.items()}


def num_samples(data: "Inputs") -> int:
    """Number of samples: the leading dim of the first input with rank >= 1 (dense), summed
    over the elements (ragged)."""
    if not is_ragged(data):
        return _element_count(data)
    return sum(_element_count(el) for el in iter_elements(data))


def _head(el: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a dense dict: arrays whose leading dim is the sample count
    are sliced, the others (scalars, state) kept whole."""
    count = _element_count(el)
    if n >= count:
        return dict(el)
    return {k: (v[:n] if np.ndim(v) >= 1 and np.shape(v)[0] == count else v) for k, v in el.items()}


def take_samples(data: "Inputs", n: int | None) -> "Inputs":
    """The first ``n`` samples of ``data``, in the same form (``None``: all of it).

    Dense: ``{k: v[:n]}`` for the arrays whose leading dim is the sample count. Ragged:
    whole elements while they fit, the element where the count is reached sliced inside
    (so the result may hold fewer elements)."""
    if n is None:
        return data
    n = max(int(n), 0)
    if not is_ragged(data):
        return _head(data, n)
    out: dict[str, list] = {k: [] for k in data}
    left = n
    for el in iter_elements(data):
        if left <= 0:
            break
        c = _element_count(el)
        for k, v in _head(el, left).items():
            out[k].append(v)
        left -= c
    return out


def batches(inputs: "Inputs", batch_size: int):
    """Split data along dim 0 into dense dicts of at most ``batch_size`` rows (ragged data:
    within each element, element after element; a chunk never spans two elements)."""
    for el in iter_elements(inputs):
        n = min(len(a) for a in el.values()) if el else 0
        for s in range(0, n, batch_size):
            yield {k: v[s:s + batch_size] for k, v in el.items()}


def flatten_values(v: Any) -> np.ndarray:
    """One output (or input) as a 1-D array: an array raveled, a list of arrays (a ragged
    output of :func:`run`) raveled and concatenated. Its mean / norm are over every value."""
    if isinstance(v, (list, tuple)):
        parts = [np.asarray(a).ravel() for a in v]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.asarray(v).ravel()


def shapes_of(data: "Inputs") -> dict[str, Any]:
    """``{name: shape}`` (dense) or ``{name: [shape of each element]}`` (ragged), as lists."""
    return {k: ([list(np.shape(e)) for e in v] if isinstance(v, (list, tuple)) else list(np.shape(v)))
            for k, v in data.items()}


_ORT_TYPES = {"float": "FLOAT", "double": "DOUBLE", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "bool": "BOOL"}


def _ort_np_dtype(type_str: str) -> np.dtype | None:
    """numpy dtype of an ORT NodeArg type string (``tensor(float)`` -> float32); None if unknown."""
    if not type_str.startswith("tensor(") or not type_str.endswith(")"):
        return None
    name = type_str[len("tensor("):-1]
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, _ORT_TYPES.get(name, name.upper()))))
    except Exception:
        return None


def _checked_elements(sess: ort.InferenceSession, data: RaggedInputs) -> Iterator[dict[str, np.ndarray]]:
    """The elements of ragged ``data`` checked against the session's inputs (like
    :func:`load_inputs`: rank, fixed dims, dtype, a compatible dtype cast)."""
    metas = sess.get_inputs()
    check_ragged(data)
    for i, el in enumerate(iter_elements(data)):
        out = dict(el)
        for m in metas:
            if m.name not in el:
                raise InputDataError(f"element {i}: missing input '{m.name}' (the element has {sorted(el)}; "
                                     f"the model needs {[x.name for x in metas]})")
            shape = None if m.shape is None else tuple(d if isinstance(d, int) else None for d in m.shape)
            out[m.name] = check_array(np.asarray(el[m.name]), m.name, shape, _ort_np_dtype(m.type), f"element {i}")
        yield out


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


def check_array(arr: np.ndarray, name: str, shape, dtype, where: str) -> np.ndarray:
    """Check one input array against the model's ``shape`` (ints fixed, anything else free;
    None: unknown rank) and ``dtype`` (None: any); return it (cast to ``dtype`` when the kinds
    are compatible). Raises :class:`InputDataError` starting with ``where`` (a file, an
    element) and naming the input. A leading dim that is a multiple of a fixed batch passes
    (the samples are fed that many at a time)."""
    if shape is not None:
        if arr.ndim != len(shape):
            raise InputDataError(f"{where}: input '{name}' has rank {arr.ndim}, the model expects "
                                 f"{len(shape)} (shape {list(shape)})")
        for i, (a, d) in enumerate(zip(arr.shape, shape)):
            if not isinstance(d, int) or d <= 0 or a == d:
                continue
            if i == 0 and a % d == 0:
                continue  # more samples than a fixed batch: they are fed d at a time
            what = "samples, not a multiple of the fixed batch" if i == 0 else "the model expects"
            raise InputDataError(f"{where}: input '{name}' dim {i} is {a}, {what} {d}")
    if dtype is not None and arr.dtype != dtype:
        if arr.dtype.kind == dtype.kind or (arr.dtype.kind in "iu" and dtype.kind in "iu") \
                or (arr.dtype.kind in "iuf" and dtype.kind == "f"):
            arr = arr.astype(dtype)
        else:
            raise InputDataError(f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}")
    return arr


def _check_file(p: Path, data: Mapping[str, np.ndarray], graph: Graph, where: str) -> dict[str, np.ndarray]:
    out = {}
    for v in graph.inputs:
        if v.name not in data:
            raise InputDataError(f"{where}: missing input '{v.name}' (the file has {sorted(data)}; "
                                 f"the model needs {[i.name for i in graph.inputs]})")
        out[v.name] = check_array(data[v.name], v.name, v.shape, v.dtype, where)
    return out


def npz_files(path: str | os.PathLike) -> list[Path]:
    """The ``.npz`` files of a data directory, in sorted name order. Raises
    :class:`InputDataError` naming the directory when it holds none (empty, or other files only)."""
    d = Path(path)
    if not d.is_dir():
        raise InputDataError(f"{d}: not a directory")
    entries = sorted(d.iterdir(), key=lambda q: q.name)
    files = [q for q in entries if q.is_file() and q.suffix.lower() == ".npz"]
    if not files:
        held = [q.name for q in entries]
        raise InputDataError(f"{d}: the directory holds no .npz files"
                             + (f" (it has {held[:10]}{' ...' if len(held) > 10 else ''})" if held else " (it is empty)"))
    return files


def load_inputs(path: str | os.PathLike, graph: Graph) -> "Inputs":
    """Load inputs for ``graph`` from an ``.npz`` file or a directory of them; validate them.

    A file maps input names to arrays (with a batch dim) and gives dense data. A directory
    gives ragged data (:data:`RaggedInputs`): one element per ``.npz`` file, in sorted name
    order, each file holding every input for one or more samples (shapes may differ between
    files; other files in the directory are ignored).

    Raises :class:`InputDataError` naming the file (and, for a directory, the element index)
    and the input when an input is missing, has the wrong rank, a fixed dim differs, or the
    dtype kind is incompatible; and naming the directory when it holds no ``.npz`` file.
    Extra arrays (e.g. ``labels``) are ignored (:func:`load_labels` reads them).
    """
    p = Path(path)
    if p.is_dir():
        out: dict[str, list[np.ndarray]] = {v.name: [] for v in graph.inputs}
        for i, f in enumerate(npz_files(p)):
            for k, arr in _check_file(f, read_npz(f), graph, f"{f} (element {i})").items():
                out[k].append(arr)
        return out
    return _check_file(p, read_npz(p), graph, str(p))


def load_labels(path: str | os.PathLike) -> np.ndarray | None:
    """The ``labels`` array of an ``.npz`` file, or of a directory of them (concatenated in
    file order; None when no file has one). Raises :class:`InputDataError` naming the file
    when only some files of a directory have labels."""
    p = Path(path)
    if not p.is_dir():
        if not p.exists():
            raise InputDataError(f"{p}: no such file")
        try:
            with np.load(p, allow_pickle=False) as z:
                return z["labels"] if "labels" in z.files else None
        except Exception as e:
            raise InputDataError(f"{p}: not a readable .npz file: {e}") from None
    parts = [(f, load_labels(f)) for f in npz_files(p)]
    have = [f for f, lab in parts if lab is not None]
    if not have:
        return None
    if len(have) != len(parts):
        lacking = next(f for f, lab in parts if lab is None)
        raise InputDataError(f"{lacking}: no 'labels' array, while other files of {p} have one "
                             f"(give every file labels, or none)")
    return np.concatenate([np.atleast_1d(lab) for _, lab in parts], axis=0)


# -------------------------------------------------------------------------- comparison
def compare_outputs(ref: Mapping[str, Any], got: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per output: max abs error, max rel error (relative to max |ref|), cosine similarity,
    and top-1 agreement (for outputs whose last dim looks like class scores).

    An output may be a list of arrays (what :func:`run` returns for ragged inputs), in both
    ``ref`` and ``got``, aligned element by element (a different length or any element's
    shape differing is a ``shape_mismatch``). Then ``max_abs`` is the max over all elements,
    ``max_rel`` that divided by the max |ref| over all elements, ``cosine`` the cosine of all
    elements flattened and concatenated, and ``top1_agreement`` the share of agreeing argmaxes
    (over the last dim) among all rows of all elements."""
    res: dict[str, dict[str, float]] = {}
    for name, a in ref.items():
        if name not in got:
            continue
        b = got[name]
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            res[name] = _compare_lists(a, b)
            continue
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
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


def _compare_lists(a, b) -> dict[str, float]:
    """:func:`compare_outputs` of one output given as lists of arrays (one per element)."""
    if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
        return {"shape_mismatch": 1.0}
    a64 = [np.asarray(x, dtype=np.float64) for x in a]
    b64 = [np.asarray(x, dtype=np.float64) for x in b]
    if any(x.shape != y.shape for x, y in zip(a64, b64)):
        return {"shape_mismatch": 1.0}
    sizes = [x.size for x in a64]
    if not sum(sizes):
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    max_abs = max(float(np.abs(x - y).max()) for x, y in zip(a64, b64) if x.size)
    scale = max(max(float(np.abs(x).max()) for x in a64 if x.size), 1e-12)
    dot = sum(float(x.ravel() @ y.ravel()) for x, y in zip(a64, b64))
    na = math.sqrt(sum(float(x.ravel() @ x.ravel()) for x in a64))
    nb = math.sqrt(sum(float(y.ravel() @ y.ravel()) for y in b64))
    denom = na * nb
    same = all(np.allclose(x, y) for x, y in zip(a64, b64))
    entry = {"max_abs": max_abs, "max_rel": max_abs / scale,
             "cosine": float(dot / denom) if denom > 0 else (1.0 if same else 0.0)}
    if all(x.ndim >= 2 and x.shape[-1] > 1 for x in a64):
        agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a64, b64))
        rows = sum(x.size // x.shape[-1] for x in a64)
        if rows:
            entry["top1_agreement"] = agree / rows
    return entry


# ------------------------------------------------------------------------------ timing
def single_thread_sessions(models: Mapping[str, bytes]) -> dict[str, ort.InferenceSession]:
    """One CPU session per model, 1 intra-op and 1 inter-op thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.log_severity_level = 4
    return {k: ort.InferenceSession(b, sess_options=so, providers=["CPUExecutionProvider"]) for k, b in models.items()}


def interleaved_median(sessions: Mapping[str, Any], feed: Mapping[str, Any], *, rounds: int, inner: int,
                       warmup: int) -> dict[str, float]:
    """Median seconds per call of each session: ``warmup`` calls each, then ``rounds`` interleaved rounds
    of ``inner`` calls of every session (machine noise hits all models alike; compare them as ratios)."""
    import statistics
    import time

    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}
