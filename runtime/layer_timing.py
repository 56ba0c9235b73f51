"""Latency of small standalone models (one layer, or the chain that replaces it) in ONNX Runtime
on this machine, cached on disk.

:func:`time_graphs` times IR graphs whose inputs have static shapes (random normal float
inputs, seeded): a few warm-up runs fix how many inferences one *run* repeats (about
``run_ms`` milliseconds of work, at least one inference), then ``repeats`` runs of the models
are interleaved (model A, B, A, B, ...: machine noise hits both alike) and each model's time
is the median over its runs of the per-inference time, in milliseconds. One timing costs
about ``repeats * run_ms`` plus the warm-up: tens of milliseconds.

Results are cached per *signature*: the ops, attributes, wiring, input / initializer shapes
and dtypes and opsets of the model (not its weight values or names), the ONNX Runtime
version, the thread count and the machine (CPU model, architecture, logical CPU count), in
the JSON file ``layer_timings.json`` under the cache directory: ``$NNSCULPT_CACHE_DIR``, else
``$XDG_CACHE_HOME/nnsculpt``, else ``~/.cache/nnsculpt``. The file is rewritten atomically
(a temporary file then ``os.replace``), merged with what another process wrote meanwhile; a
damaged file is ignored (and replaced on the next write).

Timings are machine-dependent and noisy (a busy machine makes them so): whatever is decided
from them is too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..ir.graph import Graph

__all__ = ["cache_dir", "cache_path", "signature", "time_graphs", "machine_id"]

CACHE_FILE = "layer_timings.json"
_MACHINE: str | None = None


def cache_dir() -> Path:
    """``$NNSCULPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/nnsculpt``, else ``~/.cache/nnsculpt``."""
    env = os.environ.get("NNSCULPT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "nnsculpt" if xdg else Path(os.path.expanduser("~")) / ".cache" / "nnsculpt"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def machine_id() -> str:
    """CPU model, architecture and logical CPU count (what a timing depends on besides ORT)."""
    global _MACHINE
    if _MACHINE is None:
        model = ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        _MACHINE = f"{model or platform.processor() or 'cpu'} | {platform.machine()} | {os.cpu_count()} cpus"
    return _MACHINE


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"array": list(v.shape), "dtype": str(v.dtype), "sha1": hashlib.sha1(v.tobytes()).hexdigest()[:12]}
    if isinstance(v, (bytes, bytearray)):
        return v.decode(errors="replace")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(type(v).__name__)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def signature(g: Graph, threads: int) -> dict[str, Any]:
    """What a timing of ``g`` depends on: structure and shapes (not weight values or names),
    ORT version, threads, machine."""
    ids: dict[str, str] = {}
    for i, v in enumerate(g.inputs):
        ids[v.name] = f"in{i}"
    inits = []
    for v in g.initializers.values():
        ids[v.name] = f"w{len(inits)}"
        inits.append([list(v.const.shape), str(v.const.dtype)])
    nodes = []
    for j, n in enumerate(g.nodes):
        for k, o in enumerate(n.outputs):
            ids.setdefault(o.name, f"n{j}.{k}")
        nodes.append([n.domain, n.op_type, [ids.get(x.name, "?") if x is not None else "" for x in n.inputs],
                      {k: _jsonable(v) for k, v in sorted(n.attrs.items())}])
    # outputs of later nodes read by earlier ones cannot happen in a sorted graph; ids are stable
    return {"inputs": [[list(v.shape or []), str(v.dtype)] for v in g.inputs], "initializers": inits,
            "nodes": nodes, "outputs": [ids.get(v.name, "?") for v in g.outputs],
            "opsets": dict(sorted(g.opset_imports.items())), "ort": _ort_version(), "threads": int(threads),
            "machine": machine_id()}


def _key(sig: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, new: dict[str, Any]) -> None:
    """Merge ``new`` into the file at ``path`` and replace it atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data.update(new)
        fd, tmp = tempfile.mkstemp(prefix=".layer_timings.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError:  # a read-only cache dir: timings are just not kept
        pass


def _feed(g: Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for v in g.inputs:
        shape = v.shape or []
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"input '{v.name}' of '{g.name}' has no static shape ({list(shape)}): cannot time it")
        dt = np.dtype(v.dtype or np.float32)
        feed[v.name] = rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt)
    return feed


def _measure(sessions: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]], *, warmup: int, repeats: int,
             run_ms: float) -> list[float]:
    """Per-inference milliseconds of each session: ``warmup`` single runs, then ``repeats``
    interleaved runs of ``n`` inferences each; the median."""
    loops = []
    for s, f in zip(sessions, feeds):
        best = math.inf
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            s.run(None, f)
            best = min(best, time.perf_counter() - t0)
        loops.append(int(min(10000, max(1, math.ceil(run_ms / 1e3 / max(best, 1e-7))))))
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(max(repeats, 1)):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            n = loops[i]
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, f)
            samples[i].append((time.perf_counter() - t0) / n * 1e3)
    return [float(np.median(x)) for x in samples]


def time_graphs(graphs: Sequence[Graph], *, threads: int = 1, cache: bool = True, warmup: int = 3,
                repeats: int = 7, run_ms: float = 2.0) -> list[dict[str, Any]]:
    """Time each graph (static input shapes) in ONNX Runtime (CPU, ``threads`` intra-op
    threads, all graph optimizations); per graph ``{"ms": median per-inference milliseconds,
    "cached": bool}``. Graphs not in the cache are timed together, interleaved; their results
    are added to the cache (``cache=False``: neither read nor written)."""
    from .ort import session

    sigs = [signature(g, threads) for g in graphs]
    keys = [_key(s) for s in sigs]
    path = cache_path()
    known = _read_cache(path) if cache else {}
    out: list[dict[str, Any] | None] = [None] * len(graphs)
    todo = []
    for i, k in enumerate(keys):
        e = known.get(k)
        if isinstance(e, dict) and isinstance(e.get("ms"), (int, float)):
            out[i] = {"ms": float(e["ms"]), "cached": True}
        elif k not in [keys[j] for j in todo]:
            todo.append(i)
    if todo:
        sessions = [session(graphs[i], threads=threads) for i in todo]
        feeds = [_feed(graphs[i]) for i in todo]
        times = _measure(sessions, feeds, warmup=warmup, repeats=repeats, run_ms=run_ms)
        new = {}
        for i, ms in zip(todo, times):
            out[i] = {"ms": ms, "cached": False}
            ops = "+".join(n.op_type for n in graphs[i].nodes)
            new[keys[i]] = {"ms": ms, "ops": ops, "input": sigs[i]["inputs"], "ort": sigs[i]["ort"],
                            "threads": int(threads), "machine": sigs[i]["machine"], "repeats": repeats,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if cache:
            _write_cache(path, new)
    for i, k in enumerate(keys):  # duplicates of a graph timed in this call
        if out[i] is None:
            j = keys.index(k)
            out[i] = dict(out[j])  # type: ignore[arg-type]
    return out  # type: ignore[return-value]
