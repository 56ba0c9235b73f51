"""Shared by the benchmark scripts: ONNX Runtime latency as the median of interleaved rounds.

Each round times ``inner`` calls of every model in turn, so that machine noise (these are
shared 2-core machines) hits all models alike; the result per model is the median over rounds
of the per-call time. Ratios between models of one call are what the pages report.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import onnxruntime as ort


def single_thread_sessions(models: Mapping[str, bytes]) -> dict[str, ort.InferenceSession]:
    """One CPU session per model, 1 intra-op and 1 inter-op thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    return {k: ort.InferenceSession(b, sess_options=so, providers=["CPUExecutionProvider"]) for k, b in models.items()}


def interleaved_median(sessions: Mapping[str, Any], feed: Mapping[str, Any], *, rounds: int, inner: int,
                       warmup: int) -> dict[str, float]:
    """Median seconds per call of each session: ``warmup`` calls each, then ``rounds`` interleaved
    rounds of ``inner`` calls of every session."""
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
