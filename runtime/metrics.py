"""Task metrics between a reference model's outputs and a compressed model's, as errors
(0 = identical, lower is better) so that one ``budget`` bounds any of them.

===============  ==========================================================================
name             error
===============  ==========================================================================
``rel_l2``       worst over float outputs of ``||got - ref||_2 / ||ref||_2``
``max_rel``      worst over float outputs of ``max |got - ref| / max |ref|``
``cosine``       worst over float outputs of ``1 - cos(ref, got)`` (each output flattened)
``top1``         worst over class-score outputs (rank 2 ``[N, C]`` or 3 ``[N, T, C]``, last
                 dim > 1) of the share of rows whose argmax over the last dim differs
``iou@T``        worst over float outputs of ``1 - IoU(ref > T, got > T)`` (probability maps:
                 text / segmentation masks; two empty masks count as IoU 1)
===============  ==========================================================================

Outputs may be arrays or lists of arrays (the outputs of varying-size inputs, one array per
group of samples): a list is treated as the concatenation of its elements, flattened, so each
metric is computed over every sample at once. :func:`resolve` turns a name or a callable
``fn(ref, got) -> error`` into a metric; :func:`task_errors` computes them all.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence, Union

import numpy as np

__all__ = ["METRICS", "Metric", "resolve", "metric_error", "task_errors", "check_metric_name"]

Outputs = Mapping[str, Union[np.ndarray, Sequence[np.ndarray]]]
Metric = Callable[[Outputs, Outputs], float]

#: metric names (``iou@T`` takes a threshold, e.g. ``iou@0.3``)
METRICS = ("rel_l2", "max_rel", "cosine", "top1", "iou@T")
_IOU = re.compile(r"^iou@([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def check_metric_name(name: str) -> None:
    """Raise ValueError naming the metric when ``name`` is not one of :data:`METRICS`."""
    if name in ("rel_l2", "max_rel", "cosine", "top1") or _IOU.match(name):
        return
    raise ValueError(f"unknown metric '{name}' (known: rel_l2, max_rel, cosine, top1, iou@T such as iou@0.3)")


def _parts(x) -> list[np.ndarray]:
    if isinstance(x, (list, tuple)):
        return [np.asarray(a) for a in x]
    return [np.asarray(x)]


def _pair(ref, got) -> tuple[np.ndarray, np.ndarray] | None:
    """Flattened float64 (ref, got), or None when shapes differ (any element)."""
    a, b = _parts(ref), _parts(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    return (np.concatenate([x.astype(np.float64).ravel() for x in a]),
            np.concatenate([y.astype(np.float64).ravel() for y in b]))


def _float_outputs(ref: Outputs) -> list[str]:
    return [k for k, v in ref.items() if all(p.dtype.kind == "f" for p in _parts(v))]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a))
    num = float(np.linalg.norm(a - b))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    if not a.size:
        return 0.0
    return float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-12)


def _one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    if den == 0:
        return 0.0 if np.array_equal(a, b) else 1.0
    return 1.0 - float(a @ b) / den


def _top1_err(ref, got) -> float | None:
    a, b = _parts(ref), _parts(got)
    if not a or a[0].ndim not in (2, 3) or a[0].shape[-1] < 2:
        return None
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return 1.0
    ra = np.concatenate([x.argmax(-1).ravel() for x in a])
    rb = np.concatenate([y.argmax(-1).ravel() for y in b])
    return float((ra != rb).mean()) if ra.size else 0.0


def _iou_err(a: np.ndarray, b: np.ndarray, t: float) -> float:
    ma, mb = a > t, b > t
    union = int(np.count_nonzero(ma | mb))
    if union == 0:
        return 0.0
    return 1.0 - int(np.count_nonzero(ma & mb)) / union


def metric_error(name: str, ref: Outputs, got: Outputs) -> float:
    """The error ``name`` (see the module table) of ``got`` against ``ref``: the worst over the
    outputs it applies to; ``inf`` when an output's shape changed. ``top1`` with no output of
    class scores raises ValueError (say which metric fits instead)."""
    check_metric_name(name)
    keys = [k for k in _float_outputs(ref) if k in got]
    if name == "top1":
        errs = [e for k in keys if (e := _top1_err(ref[k], got[k])) is not None]
        if not errs:
            raise ValueError("metric 'top1' needs an output of class scores (rank 2 or 3, last dim > 1); the model's "
                             f"float outputs are {keys}: use rel_l2, cosine or iou@T")
        return max(errs)
    worst = 0.0
    iou = _IOU.match(name)
    for k in keys:
        pair = _pair(ref[k], got[k])
        if pair is None:
            return math.inf
        a, b = pair
        if iou:
            e = _iou_err(a, b, float(iou.group(1)))
        elif name == "rel_l2":
            e = _rel_l2(a, b)
        elif name == "max_rel":
            e = _max_rel(a, b)
        else:
            e = _one_minus_cos(a, b)
        worst = max(worst, e)
    return worst


def resolve(metric: "str | Metric") -> tuple[str, Metric]:
    """``(display name, fn(ref, got) -> error)`` for a metric name or a callable."""
    if callable(metric):
        return getattr(metric, "__name__", "callable"), metric
    check_metric_name(metric)
    return metric, lambda ref, got: metric_error(metric, ref, got)


def task_errors(ref: Outputs, got: Outputs) -> dict[str, float]:
    """Every named metric that applies (``iou@0.3`` only for outputs in [0, 1])."""
    out = {"rel_l2": metric_error("rel_l2", ref, got), "max_rel": metric_error("max_rel", ref, got),
           "cosine": metric_error("cosine", ref, got)}
    try:
        out["top1"] = metric_error("top1", ref, got)
    except ValueError:
        pass
    probs = [k for k in _float_outputs(ref)
             if all(p.size and float(p.min()) >= 0.0 and float(p.max()) <= 1.0 for p in _parts(ref[k]))]
    if probs:
        out["iou@0.3"] = metric_error("iou@0.3", {k: ref[k] for k in probs}, got)
    return out
