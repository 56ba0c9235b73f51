"""Quantization-aware training: fake quantization with learned scales (LSQ) and a
straight-through estimator. Exporting the learned scales as QDQ in the graph runs the
``quantize`` pass, so it is a driver: :func:`nnsculpt.qat.export_qat`.

    from nnsculpt.runtime import to_torch
    from nnsculpt.runtime.qat import prepare_qat, finetune_qat
    from nnsculpt.qat import export_qat

    g = ...                                   # IR graph, BatchNormalization folded (fold-bn)
    module = to_torch(g)                      # fx.GraphModule with real nn.Conv2d / nn.Linear
    prepare_qat(module, weight_bits=4, calib_data={"input": x_calib})
    finetune_qat(module, teacher=g, data=(x_train, y_train), epochs=5)   # distillation if available
    export_qat(g, module, calib_data={"input": x_calib})                # QDQ with the learned scales

Fake quantization (Esser et al. 2020, "Learned Step Size Quantization")::

    y = (clamp(round_ste(x / s) + z, qmin, qmax) - z) * s

``round_ste`` rounds in the forward pass and passes the gradient straight through (STE), so
``dy/dx = 1`` inside the range and 0 where it clamps, and ``dy/ds = round(x/s) - x/s`` inside
/ ``qmin - z`` or ``qmax - z`` outside: the step size itself is learned. Its gradient is scaled
by ``1 / sqrt(numel * qmax)`` (LSQ). Weights: symmetric, per output channel, initialized by an
MSE-optimal clipping search (important at 4 bits). Activations (the input of every Conv /
Linear): asymmetric uint8 with the zero point fixed at initialization, initialized from
calibration histograms (``act_calibration``, percentile by default) when ``calib_data`` is
given, else from the first batch's min/max.

:func:`prepare_qat` swaps the class of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` to a QAT
subclass (like ``torch.ao`` QAT modules) and adds two children, ``weight_fake_quant`` and
``input_fake_quant``; parameter names (``layer1.0.conv1.weight``) do not change, so
``write_back`` keeps working. :func:`strip_qat` undoes it.
"""

from __future__ import annotations


import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FakeQuantize", "prepare_qat", "strip_qat", "qat_modules", "calibrate_qat", "finetune_qat",
           "fake_quant"]


# ============================================================================ fake quant
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward: ``x``; backward: gradient times ``scale``."""
    return (x - x * scale).detach() + x * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quantization (``scale``/``zero_point`` already broadcastable to ``x``)."""
    s = _grad_scale(scale, grad_factor)
    q = torch.clamp(_RoundSTE.apply(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


class FakeQuantize(nn.Module):
    """Learned-step-size fake quantizer for weights (per channel) or activations (per tensor)."""

    def __init__(self, bits: int = 8, *, symmetric: bool = True, channels: int = 1, axis: int | None = None):
        super().__init__()
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.axis = axis
        if symmetric:
            self.qmin, self.qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2 ** bits - 1
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.observer = None  # a calibrate.Histogram while observing

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"channels={self.scale.numel()}, axis={self.axis}")

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_from_range(self, lo: float, hi: float) -> None:
        from .calibrate import compute_qparams

        dt = np.int8 if self.symmetric else np.uint8
        s, z = compute_qparams(lo, hi, dt, symmetric=self.symmetric, bits=self.bits)
        self.scale.fill_(float(s))
        self.zero_point.fill_(float(int(z)))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_weight(self, w: torch.Tensor, search: bool | None = None) -> None:
        """Per-channel symmetric scale; MSE-optimal clipping search (default below 8 bits)."""
        ax = self.axis if self.axis is not None else 0
        wc = w.detach().transpose(0, ax).reshape(w.shape[ax], -1) if self.scale.numel() > 1 else w.reshape(1, -1)
        amax = wc.abs().max(dim=1).values.clamp_min(1e-12)
        best = amax / self.qmax
        if search if search is not None else self.bits < 8:
            best_err = torch.full_like(amax, float("inf"))
            for r in torch.linspace(0.3, 1.0, 36):
                s = (amax * r / self.qmax)[:, None]
                err = ((torch.clamp(torch.round(wc / s), self.qmin, self.qmax) * s - wc) ** 2).sum(dim=1)
                better = err < best_err
                best = torch.where(better, s[:, 0], best)
                best_err = torch.where(better, err, best_err)
        self.scale.copy_(best)
        self.zero_point.zero_()
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ run
    def _shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.scale.numel() > 1 and self.axis is not None:
            shape[self.axis] = -1
        return shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach().cpu().numpy())
            return x
        if not self.enabled:
            return x
        if not bool(self.initialized):
            with torch.no_grad():
                if self.axis is None and self.scale.numel() == 1 and not self.symmetric:
                    self.init_from_range(float(x.min()), float(x.max()))
                else:
                    self.init_weight(x)
        shape = self._shape(x)
        scale = self.scale.abs().clamp_min(1e-8).reshape(shape)
        zp = self.zero_point.reshape(shape)
        per = x.numel() / max(self.scale.numel(), 1)
        g = 1.0 / math.sqrt(per * self.qmax)
        return fake_quant(x, scale, zp, self.qmin, self.qmax, g)

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, zero_point)`` as numpy (scale float32, zero point int)."""
        s = self.scale.detach().abs().clamp_min(1e-8).cpu().numpy().astype(np.float32)
        z = self.zero_point.detach().cpu().numpy().round().astype(np.int64)
        return s, z


# ============================================================================= modules
class _QATMixin:
    """Forward with fake-quantized input and weight; everything else as the base class."""

    def _qat_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x):  # type: ignore[override]
        x = self.input_fake_quant(x)
        w = self.weight_fake_quant(self.weight)
        return self._qat_forward(x, w)


class QATConv1d(_QATMixin, nn.Conv1d):
    def _qat_forward(self, x, w):
        return self._conv_forward(x, w, self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    def _qat_forward(self, x, w):
        return self._conv_forward(x, w, self.bias)


class QATConv3d(_QATMixin, nn.Conv3d):
    def _qat_forward(self, x, w):
        return self._conv_forward(x, w, self.bias)


class QATLinear(_QATMixin, nn.Linear):
    def _qat_forward(self, x, w):
        return F.linear(x, w, self.bias)


_QAT_CLASS = {nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d, nn.Linear: QATLinear}
_FLOAT_CLASS = {v: k for k, v in _QAT_CLASS.items()}


def qat_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of the QAT-prepared submodules."""
    return {n: m for n, m in module.named_modules() if type(m) in _FLOAT_CLASS}


def prepare_qat(module, *, weight_bits: int = 8, act_bits: int = 8, per_channel: bool = True,
                act_symmetric: bool = False, quantize_inputs: bool = True, exclude: Sequence[str] = (),
                calib_data: Mapping[str, np.ndarray] | tuple | np.ndarray | None = None,
                act_calibration: str = "percentile", percentile: float = 99.99,
                batch_size: int = 64) -> nn.Module:
    """Make ``module`` (in place; returned) train with fake-quantized Conv/Linear weights and inputs.

    ``module``: any ``nn.Module``, or an IR ``Graph`` (lowered with ``to_torch`` first; export
    the result with ``nnsculpt.qat.export_qat(graph, module)``).
    ``exclude``: qualified names left in float (e.g. the first conv / the classifier).
    ``calib_data``: inputs to initialize the activation quantizers from histograms.
    """
    from ..ir.graph import Graph

    if isinstance(module, Graph):
        from .torch_lowering import to_torch

        module = to_torch(module)
    for name, m in list(module.named_modules()):
        cls = type(m)
        if cls not in _QAT_CLASS or name in exclude:
            continue
        ch = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        m.__class__ = _QAT_CLASS[cls]
        wq = FakeQuantize(weight_bits, symmetric=True, channels=ch if per_channel else 1,
                          axis=0 if per_channel else None)
        aq = FakeQuantize(act_bits, symmetric=act_symmetric, channels=1, axis=None)
        aq.enabled = quantize_inputs
        m.add_module("weight_fake_quant", wq)
        m.add_module("input_fake_quant", aq)
        wq.to(m.weight.device)
        aq.to(m.weight.device)
        wq.init_weight(m.weight)
    if calib_data is not None:
        calibrate_qat(module, calib_data, method=act_calibration, percentile=percentile, batch_size=batch_size)
    return module


def _as_batches(data, batch_size: int) -> Iterable[tuple]:
    if isinstance(data, Mapping):
        arrays = list(data.values())
    elif isinstance(data, tuple):
        arrays = [data[0]]
    else:
        arrays = [data]
    n = len(arrays[0])
    for s in range(0, n, batch_size):
        yield tuple(torch.as_tensor(np.asarray(a[s:s + batch_size])) for a in arrays)


@torch.no_grad()
def calibrate_qat(module: nn.Module, data, *, method: str = "percentile", percentile: float = 99.99,
                  batch_size: int = 64, num_bins: int = 2048) -> None:
    """Initialize every input quantizer from a histogram of its input over ``data``."""
    from .calibrate import Histogram, compute_range

    quants = [m.input_fake_quant for m in qat_modules(module).values()]
    for q in quants:
        q.observer = Histogram(num_bins)
    was = module.training
    module.eval()
    try:
        for batch in _as_batches(data, batch_size):
            module(*batch)
    finally:
        module.train(was)
        hists = [q.observer for q in quants]
        for q in quants:
            q.observer = None
    for q, h in zip(quants, hists):
        if h is None or h.empty:
            continue
        dt = np.int8 if q.symmetric else np.uint8
        lo, hi = compute_range(h, method, dtype=dt, symmetric=q.symmetric, percentile=percentile)
        q.init_from_range(lo, hi)


def strip_qat(module: nn.Module) -> nn.Module:
    """Turn QAT modules back into plain Conv/Linear (in place; trained float weights kept)."""
    for _, m in qat_modules(module).items():
        del m.weight_fake_quant
        del m.input_fake_quant
        m.__class__ = _FLOAT_CLASS[type(m)]
    return module


# ============================================================================ training
def finetune_qat(module: nn.Module, *, data, epochs: int = 3, teacher=None, val_data=None, lr: float | None = None,
                 batch_size: int = 64, seed: int = 0, progress: bool = False, distillation: bool = True,
                 **kwargs) -> nn.Module:
    """Fine-tune a QAT-prepared module. With a ``teacher`` and
    :func:`nnsculpt.runtime.distill.distill` available: knowledge distillation (soft targets
    plus labels); otherwise a plain cross-entropy loop. Adam, no weight decay (the learned
    step sizes must not be decayed)."""
    if teacher is not None and distillation:
        try:
            from .distill import distill
        except ImportError:  # pragma: no cover - distillation written by another engineer
            distill = None
        if distill is not None:
            return distill(module, teacher, data, epochs=epochs, optimizer="adam", lr=lr or 1e-4,
                           weight_decay=0.0, batch_size=batch_size, seed=seed, val_data=val_data,
                           progress=progress, **kwargs)
    x, y = data if isinstance(data, tuple) else (data["input"], data["labels"])
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr or 1e-4)
    rng = np.random.default_rng(seed)
    module.train()
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            out = module(torch.as_tensor(x[idx]))
            loss = F.cross_entropy(out if isinstance(out, torch.Tensor) else out[0], torch.as_tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    module.eval()
    return module
