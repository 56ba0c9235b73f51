"""Shared by the benchmark scripts: ONNX Runtime latency as the median of interleaved rounds.

Each round times ``inner`` calls of every model in turn, so that machine noise (these are
shared 2-core machines) hits all models alike; the result per model is the median over rounds
of the per-call time. Ratios between models of one call are what the pages report. The timer
lives in :mod:`nnsculpt.runtime.ort` (``compile --report-latency`` uses it too).
"""

from __future__ import annotations

from nnsculpt.runtime.ort import interleaved_median, single_thread_sessions

__all__ = ["interleaved_median", "single_thread_sessions"]
