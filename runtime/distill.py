"""Knowledge distillation: train a (compressed) student to match a teacher.

Python::

    from nnsculpt.runtime.distill import distill, kd_loss

    student = distill(student, teacher, "train.npz", epochs=10, val_data="val.npz")

Command line (``add_cli`` adds the subcommand to the ``nnsculpt`` parser; the module is also
an entry point, so it runs data parallel under ``torchrun``)::

    nnsculpt distill STUDENT --teacher TEACHER [--teacher T2 ...] --data train.npz \\
        [--val val.npz] --epochs N -o OUT.onnx [--temperature 4 --alpha 0.9 --beta 0.1 \\
        --lr LR --batch-size 64 --seed 0]
    torchrun --nproc_per_node=2 -m nnsculpt.runtime.distill STUDENT --teacher ... -o OUT.onnx

The loss (Hinton et al. 2015) is::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + beta * CE(s, labels)

with batch-mean reduction. ``T^2`` keeps the gradient of the soft term on the scale of the
hard term (the soft gradients shrink like ``1 / T^2``). An ensemble teacher contributes the
average of its members' softened probabilities. Teacher outputs never carry gradients.

Data parallel: when ``WORLD_SIZE > 1`` (``torchrun``), :func:`distill` initialises the
process group (gloo on CPU, NCCL for CUDA devices), wraps the student in
``DistributedDataParallel`` and shards the data; ``batch_size`` stays the *global* batch
size (each of the ``N`` ranks takes ``ceil(batch_size / N)`` samples per step), so one
process and ``N`` processes take the same number of optimizer steps on the same data.
Validation accuracy is computed over the whole validation set (correct counts summed over
ranks); only rank 0 shows progress and writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ir.errors import InputDataError, ModelLoadError, NNSculptError

log = logging.getLogger("nnsculpt.distill")

__all__ = ["kd_loss", "distill", "DistillConfig", "add_cli", "cmd_distill", "main", "load_npz_data",
           "is_main_process"]

ZOO_PREFIX = "zoo:"
_DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


# ============================================================================ the loss
def _soft_targets(teacher_logits, temperature: float) -> torch.Tensor:
    """Teacher probabilities at temperature T; a sequence of logits is an ensemble whose
    softened probabilities are averaged. Always detached."""
    if isinstance(teacher_logits, (list, tuple)):
        if not teacher_logits:
            raise NNSculptError("kd_loss: the teacher ensemble is empty")
        probs = [F.softmax(t.detach().float() / temperature, dim=-1) for t in teacher_logits]
        return torch.stack(probs).mean(0)
    return F.softmax(teacher_logits.detach().float() / temperature, dim=-1)


def _kd_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels, temperature: float,
                   alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total, soft, hard) with the soft term already scaled by T^2 (not by alpha)."""
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    # KL(p_t || p_s) summed over classes, averaged over the batch ("batchmean")
    soft = F.kl_div(log_p_s, teacher_probs.detach(), reduction="batchmean") * (T * T)
    total = alpha * soft
    hard = None
    if labels is not None:
        hard = F.cross_entropy(student_logits.float(), labels)
        if beta:
            total = total + beta * hard
    return total, soft, hard


def kd_loss(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor | None = None, *,
            temperature: float = 4.0, alpha: float = 0.9, beta: float = 0.1) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015).

    ``L = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + beta * CE(s, labels)``; without
    ``labels`` only the soft term. Both terms are batch means (the KL is summed over classes).
    ``teacher_logits`` is a tensor, or a list of tensors for an ensemble teacher (the soft
    target is the mean of the members' softened probabilities). Teacher logits are detached:
    gradients flow only into ``student_logits``.
    """
    if temperature <= 0:
        raise NNSculptError(f"kd_loss: temperature must be > 0, got {temperature}")
    p_t = _soft_targets(teacher_logits, temperature)
    return _kd_from_probs(student_logits, p_t, labels, temperature, alpha, beta)[0]


# ===================================================================== distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 of a ``torchrun`` job (and in a plain single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _env_world() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, world, local


def _setup_dist(device: str | torch.device) -> _Dist:
    import torch.distributed as dist

    rank, world, local = _env_world()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else 0)
    d = _Dist(rank=rank, world=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise NNSculptError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        backend = "nccl" if (dev.type == "cuda" and dist.is_nccl_available()) else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, init_method="env://")
        d.initialized_here = True
        log.info("rank %d/%d: initialised process group (%s)", rank, world, backend)
    return d


def _all_reduce_sum(values: Sequence[float], d: _Dist) -> list[float]:
    if not d.active:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def _broadcast_module(module: nn.Module, d: _Dist) -> None:
    """Give every rank rank 0's parameters and buffers (BN running stats drift per rank)."""
    if not d.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# ============================================================================ data
def _to_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_npz_data(path: str | os.PathLike, input_names: Sequence[str], *,
                  need_labels: bool = False) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """Read an ``.npz`` of model inputs (keyed by input name) and optional ``labels``.

    Raises :class:`InputDataError` naming the file and the input when an input is missing,
    the arrays disagree on the number of samples, or labels are needed but absent.
    """
    from .ort import read_npz

    p = Path(path)
    arrays = read_npz(p)
    xs = []
    for name in input_names:
        if name not in arrays:
            raise InputDataError(f"{p}: missing input '{name}' (the file has {sorted(arrays)}; "
                                 f"the model needs {list(input_names)})")
        xs.append(arrays[name])
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise InputDataError(f"{p}: 'labels' must be a 1-D integer array, got {labels.dtype} "
                                 f"shape {list(labels.shape)}")
        labels = labels.astype(np.int64)
    elif need_labels:
        raise InputDataError(f"{p}: no 'labels' array (needed to measure accuracy)")
    n = {len(a) for a in xs} | ({len(labels)} if labels is not None else set())
    if len(n) != 1:
        raise InputDataError(f"{p}: arrays disagree on the number of samples: "
                             + ", ".join(f"{k}={len(v)}" for k, v in arrays.items()))
    xs = [a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a for a in xs]
    return tuple(xs), labels


def _parse_batch(batch, input_names: Sequence[str]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """A batch is ``inputs``, ``(inputs, labels)`` or a dict ``{input_name: x, "labels": y}``;
    ``inputs`` is a tensor, a tuple of tensors or a dict by input name."""

    def _inputs(x) -> tuple[torch.Tensor, ...]:
        if isinstance(x, Mapping):
            missing = [n for n in input_names if n not in x]
            if missing:
                raise InputDataError(f"data batch: missing input '{missing[0]}' (the batch has {sorted(x)})")
            return tuple(_to_tensor(x[n]) for n in input_names)
        if isinstance(x, (list, tuple)):
            return tuple(_to_tensor(v) for v in x)
        return (_to_tensor(x),)

    if isinstance(batch, Mapping):
        y = batch.get("labels")
        return _inputs(batch), (None if y is None else _to_tensor(y).long())
    if isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            return _inputs(batch[0]), None
        if len(batch) == 2:
            x, y = batch
        else:
            x, y = tuple(batch[:-1]), batch[-1]
        return _inputs(x), (None if y is None else _to_tensor(y).long())
    return _inputs(batch), None


def _is_array(a) -> bool:
    return isinstance(a, (np.ndarray, torch.Tensor))


class _Data:
    """Training / validation data in one of three forms, sharded across ranks.

    * ``arrays``: in-memory inputs (from an ``.npz``, ``(X, y)`` arrays or a dict); shuffled
      and sharded with :class:`~torch.utils.data.DistributedSampler`;
    * ``dataset``: a map-style torch ``Dataset``; a DataLoader with a DistributedSampler;
    * ``iterable``: any re-iterable of batches (a DataLoader, a list); under DDP each batch
      is split into ``world`` chunks and rank ``r`` takes chunk ``r`` (so the global batch is
      unchanged). A DataLoader that already uses a DistributedSampler is used as is.
    """

    def __init__(self, data, input_names: Sequence[str], *, batch_size: int, seed: int, d: _Dist,
                 shuffle: bool, what: str, need_labels: bool = False):
        from torch.utils.data import DataLoader, Dataset, DistributedSampler

        self.input_names = list(input_names)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.d = d
        self.shuffle = shuffle
        self.what = what
        self.epoch = 0
        self.xs: tuple[torch.Tensor, ...] | None = None
        self.y: torch.Tensor | None = None
        self.source = what
        self.kind = "arrays"
        self._presharded = False
        if isinstance(data, (str, os.PathLike)):
            xs, y = load_npz_data(data, self.input_names, need_labels=need_labels)
            self.xs, self.y = tuple(_to_tensor(a) for a in xs), (None if y is None else _to_tensor(y))
            self.source = str(data)
        elif isinstance(data, Mapping):
            missing = [n for n in self.input_names if n not in data]
            if missing:
                raise InputDataError(f"{what}: missing input '{missing[0]}' (the dict has {sorted(data)})")
            self.xs = tuple(_to_tensor(data[n]) for n in self.input_names)
            y = data.get("labels")
            self.y = None if y is None else _to_tensor(y).long()
        elif isinstance(data, (tuple, list)) and len(data) == 2 and all(_is_array(a) for a in data) \
                and len(data[0]) == len(data[1]) and data[1].ndim == 1:
            self.xs, self.y = (_to_tensor(data[0]),), _to_tensor(data[1]).long()
        elif isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset) \
                and hasattr(data, "__len__"):
            self.kind = "dataset"
            self.dataset = data
        elif isinstance(data, Iterable):
            self.kind = "iterable"
            if iter(data) is data:  # a one-shot iterator: materialise so every epoch sees it
                data = list(data)
            self.batches = data
            self._presharded = isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler)
        else:
            raise InputDataError(f"{what}: expected an .npz path, (inputs, labels) arrays, a Dataset or an "
                                 f"iterable of (inputs, labels) batches, got {type(data).__name__}")
        if self.kind == "arrays":
            self.xs = tuple(x.float() if x.is_floating_point() else x for x in self.xs)
            n = {len(x) for x in self.xs} | ({len(self.y)} if self.y is not None else set())
            if len(n) != 1:
                raise InputDataError(f"{self.source}: inputs and labels disagree on the number of samples")
            self.n = n.pop()
            if self.n == 0:
                raise InputDataError(f"{self.source}: no samples")
            if need_labels and self.y is None:
                raise InputDataError(f"{self.source}: no labels (needed to measure accuracy)")
        self.per_rank_bs = max(1, math.ceil(self.batch_size / d.world))
        if self.kind == "arrays" and shuffle:
            self.sampler = DistributedSampler(range(self.n), num_replicas=d.world, rank=d.rank,
                                              shuffle=True, seed=self.seed, drop_last=False)
        if self.kind == "dataset":
            sampler = DistributedSampler(data, num_replicas=d.world, rank=d.rank, shuffle=shuffle,
                                         seed=self.seed, drop_last=False)
            self.loader = DataLoader(data, batch_size=self.per_rank_bs, sampler=sampler)

    @property
    def has_labels(self) -> bool | None:
        return None if self.kind != "arrays" else self.y is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.kind == "arrays" and self.shuffle:
            self.sampler.set_epoch(epoch)
        elif self.kind == "dataset":
            self.loader.sampler.set_epoch(epoch)
        elif self.kind == "iterable" and self._presharded:
            self.batches.sampler.set_epoch(epoch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            return list(iter(self.sampler))
        return list(range(self.d.rank, self.n, self.d.world))  # evaluation: exact, no padding

    def __len__(self) -> int:
        if self.kind == "arrays":
            return math.ceil(len(self._indices()) / self.per_rank_bs)
        if self.kind == "dataset":
            return len(self.loader)
        try:
            return len(self.batches)
        except TypeError:
            self.batches = list(self.batches)
            return len(self.batches)

    def __iter__(self):
        if self.kind == "arrays":
            idx = torch.tensor(self._indices(), dtype=torch.long)
            for s in range(0, len(idx), self.per_rank_bs):
                b = idx[s:s + self.per_rank_bs]
                yield tuple(x[b] for x in self.xs), (None if self.y is None else self.y[b])
            return
        source = self.loader if self.kind == "dataset" else self.batches
        split = self.kind == "iterable" and self.d.active and not self._presharded
        for batch in source:
            xs, y = _parse_batch(batch, self.input_names)
            if split:
                if len(xs[0]) < self.d.world:  # every rank sees the same batch, so all raise together
                    raise InputDataError(f"{self.what}: a batch of {len(xs[0])} samples cannot be split over "
                                         f"{self.d.world} processes")
                xs = tuple(torch.tensor_split(x, self.d.world)[self.d.rank] for x in xs)
                y = None if y is None else torch.tensor_split(y, self.d.world)[self.d.rank]
            yield xs, y


# ========================================================================= models
def _logits(out) -> torch.Tensor:
    """The logits of a model output: the tensor itself, the first of a tuple, or ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, (list, tuple)) and out:
        return _logits(out[0])
    raise NNSculptError(f"cannot find logits in a model output of type {type(out).__name__}")


def _zoo_module(spec: str, *, pretrained: bool | None = None, seed: int = 0, **kwargs) -> nn.Module:
    from .. import models

    name = spec[len(ZOO_PREFIX):]
    try:
        if pretrained is None:
            pretrained = models.checkpoint_path(name) is not None and not kwargs
        return models.get_model(name, pretrained=pretrained, seed=seed, **kwargs)
    except KeyError as e:
        raise ModelLoadError(f"{spec}: {e}") from None
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ModelLoadError(f"{spec}: {e}") from None


class _OrtTeacher:
    """An ONNX teacher run by ONNX Runtime: numpy in, logits out, never a gradient."""

    def __init__(self, model, label: str, threads: int | None = None):
        from .ort import session

        self.label = label
        self.sess = session(model, threads=threads)
        self.inputs = self.sess.get_inputs()
        outs = [o.name for o in self.sess.get_outputs()]
        self.output = "logits" if "logits" in outs else outs[0]
        self.input_names = [i.name for i in self.inputs]

    _TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

    def __call__(self, xs: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        if len(xs) != len(self.inputs):
            raise InputDataError(f"teacher {self.label}: expects {len(self.inputs)} inputs "
                                 f"{self.input_names}, the data has {len(xs)}")
        feed = {}
        for inp, x in zip(self.inputs, xs):
            a = x.detach().cpu().numpy()
            dt = self._TYPES.get(inp.type)
            feed[inp.name] = a.astype(dt, copy=False) if dt is not None else a
        out = self.sess.run([self.output], feed)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(device)


class _TorchTeacher:
    def __init__(self, module: nn.Module, label: str):
        self.module = module
        self.label = label
        self.was_training = module.training

    def __call__(self, xs, device) -> torch.Tensor:
        with torch.no_grad():
            return _logits(self.module(*xs)).float()


def _resolve_teacher(t, i: int, threads: int | None):
    from ..ir.graph import Graph

    label = f"#{i}" if not isinstance(t, (str, os.PathLike)) else str(t)
    if isinstance(t, nn.Module):
        return _TorchTeacher(t, label)
    if isinstance(t, str) and t.startswith(ZOO_PREFIX):
        return _TorchTeacher(_zoo_module(t), label)
    if isinstance(t, (str, os.PathLike)):
        if not Path(t).exists():
            raise ModelLoadError(f"teacher {t}: no such file")
        return _OrtTeacher(str(t), label, threads)
    import onnx

    if isinstance(t, (Graph, onnx.ModelProto)):
        return _OrtTeacher(t, label, threads)
    raise ModelLoadError(f"teacher {label}: expected an nn.Module, an .onnx path, zoo:NAME, a Graph or a "
                         f"ModelProto, got {type(t).__name__}")


def _lower(graph, label: str) -> nn.Module:
    from .torch_lowering import to_torch

    return to_torch(graph)


def _resolve_student(s) -> tuple[nn.Module, Any, str]:
    """(module, graph or None, label)."""
    from ..ir.graph import Graph

    if isinstance(s, nn.Module):
        return s, None, type(s).__name__
    if isinstance(s, str) and s.startswith(ZOO_PREFIX):
        return _zoo_module(s), None, s
    if isinstance(s, (str, os.PathLike)):
        from ..ir.onnx_io import from_onnx

        if not Path(s).exists():
            raise ModelLoadError(f"student {s}: no such file")
        g = from_onnx(s)
        return _lower(g, str(s)), g, str(s)
    if isinstance(s, Graph):
        return _lower(s, s.name), s, s.name
    raise ModelLoadError(f"student: expected an nn.Module, an IR Graph, an .onnx path or zoo:NAME, "
                         f"got {type(s).__name__}")


# ========================================================================== hints
def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    if isinstance(out, Mapping) and out:
        return _first_tensor(next(iter(out.values())))
    raise NNSculptError("hints: a hooked module produced no tensor")


def _get_sub(module: nn.Module, path: str, who: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n][:12]
        raise NNSculptError(f"hints: the {who} has no submodule '{path}' (some of its modules: {names})") from None


def _make_adapter(s_feat: torch.Tensor, t_feat: torch.Tensor, key: str) -> nn.Module | None:
    cs, ct = s_feat.shape[1] if s_feat.dim() != 3 else s_feat.shape[-1], \
        t_feat.shape[1] if t_feat.dim() != 3 else t_feat.shape[-1]
    if s_feat.dim() != t_feat.dim():
        raise NNSculptError(f"hints: '{key}' student feature has shape {list(s_feat.shape)}, the teacher's "
                            f"{list(t_feat.shape)} (different ranks)")
    if cs == ct:
        return None
    if s_feat.dim() == 4:
        return nn.Conv2d(cs, ct, kernel_size=1, bias=True)
    if s_feat.dim() in (2, 3):
        return nn.Linear(cs, ct)
    raise NNSculptError(f"hints: '{key}': no adapter for rank-{s_feat.dim()} features")


def _match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s = F.adaptive_avg_pool2d(s, size) if s.shape[-2:] != size else s
        t = F.adaptive_avg_pool2d(t, size) if t.shape[-2:] != size else t
    if s.shape != t.shape:
        raise NNSculptError(f"hints: feature shapes {list(s.shape)} (student, adapted) and {list(t.shape)} "
                            f"(teacher) do not match")
    return s, t


class _Student(nn.Module):
    """The student plus hint adapters: one module, so DDP all-reduces the adapters too.
    ``forward`` returns ``(logits, [adapted student features])``."""

    def __init__(self, student: nn.Module, hint_paths: Sequence[str]):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict()
        self.hint_paths = list(hint_paths)
        self._feats: dict[str, torch.Tensor] = {}
        self._handles = []
        for p in self.hint_paths:
            sub = _get_sub(student, p, "student")
            self._handles.append(sub.register_forward_hook(self._hook(p)))

    def _hook(self, path):
        def h(_m, _inp, out):
            self._feats[path] = _first_tensor(out)
        return h

    @staticmethod
    def key(path: str) -> str:
        return path.replace(".", "__") or "root"

    def forward(self, *xs):
        self._feats = {}
        logits = _logits(self.student(*xs))
        feats = []
        for p in self.hint_paths:
            f = self._feats[p]
            k = self.key(p)
            if k in self.adapters:
                f = self.adapters[k](f)
            feats.append(f)
        self._feats = {}
        return logits, feats

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []


class _TeacherFeatures:
    def __init__(self, teacher: nn.Module, paths: Sequence[str]):
        self.feats: dict[str, torch.Tensor] = {}
        self.paths = list(paths)
        self.handles = []
        for p in self.paths:
            sub = _get_sub(teacher, p, "teacher")
            self.handles.append(sub.register_forward_hook(self._hook(p)))

    def _hook(self, path):
        def h(_m, _inp, out):
            self.feats[path] = _first_tensor(out).detach()
        return h

    def take(self) -> list[torch.Tensor]:
        out = [self.feats[p] for p in self.paths]
        self.feats = {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


# ========================================================================== masks
def _collect_masks(module: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Weights (rank >= 2) with exact zeros -- pruned by earlier passes -- and their masks.
    1-D parameters (biases, BN affine) are left free: zero is their ordinary init."""
    masks = {}
    for name, p in module.named_parameters():
        if p.dim() >= 2 and bool((p.detach() == 0).any()):
            masks[name] = (p, (p.detach() != 0).to(p.dtype))
    return masks


def _apply_masks(masks, grads: bool = False) -> None:
    with torch.no_grad():
        for p, m in masks.values():
            if grads:
                if p.grad is not None:
                    p.grad.mul_(m)
            else:
                p.mul_(m)


def _codebook_hooks(module: nn.Module, graph, *, pin_zero: bool) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Codebook fine-tuning (cluster-weights): every trainable parameter whose initializer is the
    data of a ``Gather`` with computed indices is a codebook. Its gradient -- autograd sums the
    gradients of all weights that share a centroid -- is divided by the number of weights sharing
    it (the mean, so ordinary learning rates work; Han et al. sum and lower the rate instead); with
    ``pin_zero`` centroids that are exactly 0 (a pruned layer's zeros) get no gradient and are
    reset to 0 after every step. Returns ``(parameter, zero mask)`` pairs."""
    from .torch_lowering import PARAM_MAP_ATTR

    pmap = getattr(module, PARAM_MAP_ATTR, {})
    params = dict(module.named_parameters())
    books: dict[str, tuple[str, str]] = {}  # qualified param -> (codebook initializer, indices value)
    for qual, bind in pmap.items():
        init = graph.initializers.get(bind.initializer)
        if qual not in params or bind.kind != "parameter" or init is None or bind.transforms:
            continue
        for n, i in init.uses:
            if n.op_type == "Gather" and i == 0 and int(n.attrs.get("axis", 0)) == 0 and n.input(1) is not None \
                    and not n.input(1).is_const:
                books[qual] = (init.name, n.input(1).name)
                break
    if not books:
        return []
    from .weight_codes import evaluate_constants

    decoded = evaluate_constants(graph, [idx for _book, idx in books.values()])  # codes -> unpack -> offsets
    out = []
    for qual, (_book, idx_name) in books.items():
        codes = decoded.get(idx_name)
        if codes is None:
            continue
        p = params[qual]
        counts = np.bincount(np.asarray(codes, np.int64).reshape(-1), minlength=p.shape[0])[:p.shape[0]]
        scale = torch.as_tensor(1.0 / np.maximum(counts, 1), dtype=p.dtype)
        zero = (p.detach() == 0) if pin_zero else torch.zeros_like(p, dtype=torch.bool)
        if zero.dim() > 1:  # product-quantization codebooks (k, d): masks of rank >= 2 are kept already
            zero = torch.zeros_like(zero)
        scale = scale.reshape((-1,) + (1,) * (p.dim() - 1))
        keep = (~zero).to(p.dtype)
        p.register_hook(lambda g, s=scale, k=keep: g * s.to(g.device) * k.to(g.device))
        out.append((p, zero))
    return out


def _pin_codebook_zeros(books) -> None:
    with torch.no_grad():
        for p, zero in books:
            if bool(zero.any()):
                p.masked_fill_(zero.to(p.device), 0.0)


def _binary_weights(module: nn.Module, min_row: int = 8) -> list[dict[str, Any]]:
    """Weights (rank >= 2, output channel on dim 0 as torch lays out Conv / Linear weights) that are binary
    or ternary per output channel -- every non-zero of a row has one magnitude (binarize-weights) and a
    row has at least ``min_row`` elements -- for training with the straight-through estimator: the
    forward / backward use the binarized weight, the optimizer updates a latent float copy (initialized
    to the binarized values), which is binarized again after every step (binary: ``mean|w| * sign(w)``
    per row; ternary: TWN's rule with threshold 0.7)."""
    out = []
    for _name, p in module.named_parameters():
        if p.dim() < 2 or p.shape[0] < 1 or p[0].numel() < min_row:
            continue
        rows = p.detach().reshape(p.shape[0], -1).abs().double()
        mx = rows.max(dim=1).values
        if not bool((mx > 0).all()):
            continue
        nz = rows > 0
        same = ((rows - mx[:, None]).abs() <= 1e-6 * mx[:, None]) | ~nz
        if not bool(same.all()):
            continue
        ternary = bool((~nz).any())
        out.append({"param": p, "ternary": ternary, "latent": p.detach().clone()})
    return out


def _ste_restore_latent(ste) -> None:
    """Before the optimizer step: the parameters hold the latent weights again (their .grad is the
    gradient w.r.t. the binarized ones: the straight-through estimator)."""
    with torch.no_grad():
        for s in ste:
            s["param"].copy_(s["latent"])


def _ste_requantize(ste) -> None:
    from .weight_codes import binarize_tensor

    with torch.no_grad():
        for s in ste:
            p = s["param"]
            s["latent"].copy_(p)
            p.copy_(binarize_tensor(p, 0, ternary=s["ternary"]))


# ========================================================================= evaluate
@torch.no_grad()
def _evaluate(module: nn.Module, val: _Data, device: torch.device) -> tuple[int, int]:
    was = module.training
    module.eval()
    correct = total = 0
    for xs, y in val:
        if y is None:
            raise InputDataError(f"{val.source}: validation data has no labels")
        pred = _logits(module(*(x.to(device) for x in xs))).argmax(-1)
        correct += int((pred.cpu() == y.cpu()).sum())
        total += len(y)
    module.train(was)
    return correct, total


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@contextmanager
def _deterministic(seed: int, device: torch.device):
    """Seed the global RNG (restored afterwards). On CUDA also ask for deterministic kernels;
    CPU kernels are deterministic already, and the switch costs a multi-second import."""
    cuda = device.type == "cuda"
    if cuda:
        prev = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.manual_seed(int(seed))
            yield
    finally:
        if cuda:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


# ========================================================================== distill
@dataclass
class DistillConfig:
    """The training settings of :func:`distill` (everything but the models, the data and the
    callbacks). ``validate()`` checks them and returns a copy with ``lr`` resolved (0.05 for
    SGD, 1e-3 for Adam when None) and ``optimizer`` lower-cased.

    ``epochs``; ``temperature``, ``alpha``, ``beta`` (see :func:`kd_loss`); ``lr``,
    ``optimizer`` (``"sgd"``: Nesterov momentum, ``"adam"``), ``batch_size`` (global, over all
    ranks), ``weight_decay``, ``momentum``, ``schedule`` (``"cosine"`` per step or
    ``"constant"``); ``seed``; ``hints`` (``{student_path: teacher_path}``) and ``hint_weight``;
    ``keep_masks``; ``progress``; ``best_checkpoint``; ``device``; ``input_names``.
    """

    epochs: int = 10
    temperature: float = 4.0
    alpha: float = 0.9
    beta: float = 0.1
    lr: float | None = None
    optimizer: str = "sgd"
    batch_size: int = 64
    seed: int = 0
    hints: dict[str, str] = field(default_factory=dict)
    hint_weight: float = 1.0
    keep_masks: bool = True
    progress: bool = True
    best_checkpoint: bool = True
    device: str = "cpu"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    input_names: list[str] | None = None

    def validate(self) -> "DistillConfig":
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise NNSculptError(f"distill: option 'epochs' must be an integer >= 0, got {self.epochs!r}")
        if not self.temperature or self.temperature <= 0:
            raise NNSculptError(f"distill: option 'temperature' must be > 0, got {self.temperature}")
        if self.alpha < 0 or self.beta < 0 or (self.alpha == 0 and self.beta == 0):
            raise NNSculptError(f"distill: options 'alpha' and 'beta' must be >= 0 and not both 0, "
                                f"got alpha={self.alpha} beta={self.beta}")
        opt = str(self.optimizer).lower()
        if opt not in _DEFAULT_LR:
            raise NNSculptError(f"distill: option 'optimizer' must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.batch_size < 1:
            raise NNSculptError(f"distill: option 'batch_size' must be >= 1, got {self.batch_size}")
        if self.schedule not in ("cosine", "constant"):
            raise NNSculptError(f"distill: option 'schedule' must be 'cosine' or 'constant', got {self.schedule!r}")
        return dataclasses.replace(
            self, temperature=float(self.temperature), alpha=float(self.alpha), beta=float(self.beta),
            lr=float(_DEFAULT_LR[opt] if self.lr is None else self.lr), optimizer=opt,
            batch_size=int(self.batch_size), seed=int(self.seed), hints=dict(self.hints or {}),
            hint_weight=float(self.hint_weight), weight_decay=float(self.weight_decay),
            momentum=float(self.momentum),
            input_names=None if self.input_names is None else list(self.input_names))


def distill(student, teacher, data, *, epochs: int | None = None, temperature: float = 4.0, alpha: float = 0.9,
            beta: float = 0.1, lr: float | None = None, optimizer: str = "sgd", batch_size: int = 64,
            seed: int = 0, val_data=None, hints: Mapping[str, str] | None = None, hint_weight: float = 1.0,
            keep_masks: bool = True, eval_fn: Callable[[nn.Module], float] | None = None,
            progress: bool = True, best_checkpoint: bool = True, device: str | torch.device = "cpu",
            weight_decay: float = 5e-4, momentum: float = 0.9, schedule: str = "cosine",
            input_names: Sequence[str] | None = None,
            on_epoch_end: Callable[[dict], None] | None = None, config: DistillConfig | None = None):
    """Distill ``teacher`` into ``student``; returns the trained student.

    Args:
        student: an ``nn.Module`` (trained in place and returned), or an IR ``Graph`` / ``.onnx``
            path (lowered with :func:`nnsculpt.runtime.to_torch`, trained, and the weights
            written back with :func:`~nnsculpt.runtime.write_back`; the updated Graph is
            returned), or ``zoo:NAME``.
        teacher: an ``nn.Module`` (run in eval mode under ``no_grad``), an ``.onnx`` path /
            Graph / ModelProto (run by ONNX Runtime), ``zoo:NAME``, or a list of these (an
            ensemble: the soft target is the mean of the members' softened probabilities).
        data: an ``.npz`` path (inputs keyed by the model input name, optional ``labels``),
            ``(X, y)`` arrays, a dict of arrays, a map-style ``Dataset``, or a re-iterable of
            ``(inputs, labels)`` batches (e.g. a DataLoader; ``batch_size`` then comes from it).
        epochs, lr, optimizer (``"sgd"``: Nesterov momentum; ``"adam"``), batch_size (global,
            over all ranks), weight_decay, momentum: the optimization; ``lr`` defaults to 0.05
            for SGD, 1e-3 for Adam; ``schedule`` is ``"cosine"`` (per step) or ``"constant"``.
        temperature, alpha, beta: see :func:`kd_loss`. Without labels only the soft term.
        seed: shuffling, adapter init and the global RNG; same seed, same weights.
        val_data: evaluated after every epoch (top-1, in the same forms as ``data``; needs labels).
        hints: ``{student_module_path: teacher_module_path}`` feature distillation against the
            first teacher (an ``nn.Module``): MSE between the features captured by forward hooks,
            through a learned 1x1 conv (or linear) adapter where the widths differ, times
            ``hint_weight``. Adapters are trained with the student and then discarded.
        keep_masks: weights (rank >= 2) that are exactly zero at the start stay zero.
        eval_fn: ``eval_fn(module) -> float`` (higher is better) replaces the default top-1 on
            ``val_data``; under DDP the value is averaged over ranks.
        progress: a tqdm bar per epoch (rank 0 only) with loss and accuracy.
        best_checkpoint: restore the weights of the best validation epoch at the end.
        device: ``"cpu"`` or ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun).
        input_names: names of the model inputs in an ``.npz`` (default: the student graph's or
            an ONNX teacher's input names, else ``("input",)``).
        on_epoch_end: called after every epoch with a record dict (epoch, loss, soft_loss
            (T^2-scaled KL), hint_loss (with hints), train_acc (top-1 against the labels, or
            agreement with the teacher without labels), val_acc, lr, seconds, best_epoch).

    ``config``: a :class:`DistillConfig` holding the training settings instead of the keyword
    arguments above (``val_data``, ``eval_fn`` and ``on_epoch_end`` are still passed here);
    combining it with a training keyword that differs from its default is an error.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the same call trains data parallel (see the module
    docstring).
    """
    given = dict(epochs=epochs, temperature=temperature, alpha=alpha, beta=beta, lr=lr, optimizer=optimizer,
                 batch_size=batch_size, seed=seed, hints=dict(hints or {}), hint_weight=hint_weight,
                 keep_masks=keep_masks, progress=progress, best_checkpoint=best_checkpoint, device=device,
                 weight_decay=weight_decay, momentum=momentum, schedule=schedule,
                 input_names=None if input_names is None else list(input_names))
    if config is None:
        if epochs is None:
            raise NNSculptError("distill: option 'epochs' is required (or pass config=DistillConfig(...))")
        config = DistillConfig(**given)
    else:
        defaults = DistillConfig(epochs=0)
        clash = sorted(k for k, v in given.items() if k != "epochs" and v != getattr(defaults, k))
        if epochs is not None:
            clash.insert(0, "epochs")
        if clash:
            raise NNSculptError(f"distill: pass the training settings either as config= or as keywords, "
                                f"not both (also given: {', '.join(clash)})")
    cfg = config.validate()

    d = _setup_dist(cfg.device)
    dev = d.device
    try:
        return _distill(student, teacher, data, cfg, d=d, dev=dev, val_data=val_data, eval_fn=eval_fn,
                        on_epoch_end=on_epoch_end)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _distill(student, teacher, data, cfg: DistillConfig, *, d: _Dist, dev, val_data, eval_fn, on_epoch_end):
    epochs, temperature, alpha, beta, lr = cfg.epochs, cfg.temperature, cfg.alpha, cfg.beta, cfg.lr
    opt_name, batch_size, seed, hints, hint_weight = cfg.optimizer, cfg.batch_size, cfg.seed, cfg.hints, cfg.hint_weight
    keep_masks, progress, best_checkpoint = cfg.keep_masks, cfg.progress, cfg.best_checkpoint
    weight_decay, momentum, schedule, input_names = cfg.weight_decay, cfg.momentum, cfg.schedule, cfg.input_names
    from tqdm.auto import tqdm

    module, graph, s_label = _resolve_student(student)
    ort_threads = max(1, (os.cpu_count() or 1) // d.world) if d.active else None
    t_list = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if not t_list:
        raise ModelLoadError("teacher: the ensemble is empty")
    teachers = [_resolve_teacher(t, i, ort_threads) for i, t in enumerate(t_list)]
    if input_names is None:
        if graph is not None:
            input_names = [v.name for v in graph.inputs]
        else:
            ort_t = next((t for t in teachers if isinstance(t, _OrtTeacher)), None)
            input_names = ort_t.input_names if ort_t is not None else ["input"]
    input_names = list(input_names)
    if hints and not isinstance(teachers[0], _TorchTeacher):
        raise NNSculptError("hints: feature hints need the (first) teacher to be an nn.Module, "
                            f"teacher {teachers[0].label} is run by ONNX Runtime")

    train = _Data(data, input_names, batch_size=batch_size, seed=seed, d=d, shuffle=True, what="data")
    val = None
    if val_data is not None:
        val = _Data(val_data, input_names, batch_size=max(256, batch_size), seed=seed, d=d, shuffle=False,
                    what="val_data", need_labels=eval_fn is None)
    steps_per_epoch = len(train)
    total_steps = max(1, epochs * steps_per_epoch)

    module.to(dev)
    for t in teachers:
        if isinstance(t, _TorchTeacher):
            t.module.to(dev).eval()
    masks = _collect_masks(module) if keep_masks else {}
    if masks:
        log.info("keeping %d pruning masks (%d zero weights)", len(masks),
                 sum(int((m == 0).sum()) for _, m in masks.values()))
    books = _codebook_hooks(module, graph, pin_zero=keep_masks) if graph is not None else []
    if books:
        log.info("fine-tuning %d codebook(s); codes fixed", len(books))
    ste = _binary_weights(module)
    if ste:
        log.info("training %d binary / ternary weight(s) with the straight-through estimator", len(ste))
        # a ternary weight's zeros are re-chosen by its threshold every step, not pruning masks
        masks = {k: v for k, v in masks.items() if not any(v[0] is s["param"] for s in ste)}

    t_feats = _TeacherFeatures(teachers[0].module, list(hints.values())) if hints else None
    wrapper = _Student(module, list(hints.keys()))
    history: list[dict] = []
    show = bool(progress) and d.is_main
    try:
        with _deterministic(seed, dev):
            if hints:  # probe feature shapes on one batch (eval mode: no BN statistics change)
                xs0, _ = next(iter(train))
                xs0 = tuple(x[:2].to(dev) for x in xs0)
                was = module.training
                module.eval()
                with torch.no_grad():
                    _, sf = wrapper(*xs0)
                    teachers[0](xs0, dev)
                tf = t_feats.take()
                module.train(was)
                for p, s_f, t_f in zip(wrapper.hint_paths, sf, tf):
                    a = _make_adapter(s_f, t_f, p)
                    if a is not None:
                        wrapper.adapters[_Student.key(p)] = a
                wrapper.adapters.to(dev)
            model: nn.Module = wrapper
            if d.active:
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(wrapper, device_ids=[dev.index] if dev.type == "cuda" else None)
            params = [p for p in wrapper.parameters() if p.requires_grad]
            if opt_name == "sgd":
                opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                             weight_decay=weight_decay, nesterov=momentum > 0)
            else:
                opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
            if schedule == "cosine":
                sched = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))
            else:
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

            best_val, best_epoch, best_state = -math.inf, None, None

            def score() -> float:
                if eval_fn is not None:
                    was = module.training
                    module.eval()
                    with torch.no_grad():
                        v = float(eval_fn(module))
                    module.train(was)
                    return _all_reduce_sum([v], d)[0] / d.world
                c, n_ = _all_reduce_sum(list(_evaluate(module, val, dev)), d)
                return c / max(n_, 1)

            if best_checkpoint and (eval_fn is not None or val is not None):
                # the starting weights compete too: training that only makes the model worse on the
                # validation data gives back what it was given (epoch 0), and says so
                best_val, best_epoch, best_state = score(), 0, _snapshot(module)
            for epoch in range(epochs):
                t0 = time.perf_counter()
                train.set_epoch(epoch)
                model.train()
                for t in teachers:
                    if isinstance(t, _TorchTeacher):
                        t.module.eval()
                loss_sum = correct = seen = soft_sum = hint_sum = 0.0
                y = None
                cur_lr = opt.param_groups[0]["lr"]
                bar = tqdm(total=steps_per_epoch, desc=f"distill {epoch + 1}/{epochs}", disable=not show,
                           leave=True, dynamic_ncols=True, file=sys.stderr)
                for xs, y in train:
                    xs = tuple(x.to(dev) for x in xs)
                    y = None if y is None else y.to(dev)
                    t_logits = [t(xs, dev) for t in teachers]
                    p_t = _soft_targets(t_logits, temperature)
                    logits, sf = model(*xs)
                    loss, soft, hard = _kd_from_probs(logits, p_t, y, temperature, alpha, beta)
                    if hints:
                        hint = sum(F.mse_loss(*_match_spatial(s_f, t_f)) for s_f, t_f in zip(sf, t_feats.take()))
                        loss = loss + hint_weight * hint
                        hint_sum += float(hint.detach()) * len(logits)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if masks:
                        _apply_masks(masks, grads=True)
                    if ste:
                        _ste_restore_latent(ste)
                    opt.step()
                    sched.step()
                    if masks:
                        _apply_masks(masks)
                    if books:
                        _pin_codebook_zeros(books)
                    if ste:
                        _ste_requantize(ste)
                    n = len(logits)
                    ref = y if y is not None else p_t.argmax(-1)
                    loss_sum += float(loss.detach()) * n
                    soft_sum += float(soft.detach()) * n
                    correct += float((logits.detach().argmax(-1) == ref).sum())
                    seen += n
                    bar.update(1)
                    if show:
                        bar.set_postfix({"loss": f"{loss_sum / seen:.4f}",
                                         ("acc" if y is not None else "agree"): f"{correct / seen:.3f}"},
                                        refresh=False)
                loss_sum, correct, seen, soft_sum, hint_sum = _all_reduce_sum(
                    [loss_sum, correct, seen, soft_sum, hint_sum], d)
                seen = max(seen, 1)
                rec = {"epoch": epoch + 1, "loss": loss_sum / seen, "soft_loss": soft_sum / seen,
                       "train_acc": correct / seen, "lr": cur_lr}
                if hints:
                    rec["hint_loss"] = hint_sum / seen
                # identical weights *and* BN statistics on every rank before evaluating
                _broadcast_module(module, d)
                if eval_fn is not None or val is not None:
                    v = score()
                    rec["val_acc"] = v
                    if v >= best_val:
                        best_val, best_epoch = v, epoch + 1
                        if best_checkpoint:
                            best_state = _snapshot(module)
                rec["best_epoch"] = best_epoch
                rec["seconds"] = time.perf_counter() - t0
                history.append(rec)
                if show:
                    post = {"loss": f"{rec['loss']:.4f}",
                            ("acc" if y is not None else "agree"): f"{rec['train_acc']:.3f}"}
                    if "val_acc" in rec:
                        post["val"] = f"{rec['val_acc']:.4f}"
                    bar.set_postfix(post, refresh=False)
                bar.close()
                if on_epoch_end is not None:
                    on_epoch_end(dict(rec))
            if best_checkpoint and best_state is not None:
                module.load_state_dict(best_state)
                if best_epoch == 0:
                    log.warning("no epoch improved on the starting weights (val %.4f): kept them -- try a lower "
                                "--lr (BatchNorm-folded students need about 1e-4 with adam)", best_val)
                else:
                    log.info("restored the weights of epoch %s (val %.4f)", best_epoch, best_val)
    finally:
        wrapper.remove_hooks()
        if t_feats is not None:
            t_feats.remove()
        for t in teachers:
            if isinstance(t, _TorchTeacher):
                t.module.train(t.was_training)
    module.eval()
    if graph is not None:
        module.to("cpu")
        from .torch_lowering import write_back

        write_back(graph, module)
        graph.meta["distill"] = {"history": history, "best_epoch": best_epoch}
        return graph
    return module


# ============================================================================== CLI
def _export_module(module: nn.Module, example: tuple, input_names, output_names, out: Path, name: str) -> None:
    """Write a trained nn.Module as ONNX atomically (via the IR when the torch frontend is
    available, else torch.onnx.export)."""
    import io

    import onnx

    from ..ir.onnx_io import save

    module = module.eval().cpu()
    try:
        from ..ir import from_torch

        g = from_torch(module, example, input_names=list(input_names), output_names=list(output_names),
                       name=name)
        save(g, out)
        return
    except ImportError:
        pass
    buf = io.BytesIO()
    dyn = {n: {0: "N"} for n in list(input_names) + list(output_names)}
    torch.onnx.export(module, example, buf, input_names=list(input_names), output_names=list(output_names),
                      dynamic_axes=dyn, opset_version=17, dynamo=False)
    save(onnx.load_from_string(buf.getvalue()), out)


def _add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("student", help="student: .onnx path or zoo:NAME")
    s.add_argument("--teacher", action="append", required=True, metavar="TEACHER",
                   help="teacher: .onnx path (run by ONNX Runtime) or zoo:NAME; repeat for an ensemble")
    s.add_argument("--data", required=True, help=".npz of training inputs (by input name) and optional 'labels'")
    s.add_argument("--val", help=".npz of validation inputs and 'labels' (top-1 after every epoch; the best "
                                 "epoch's weights are kept)")
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically, rank 0 only)")
    s.add_argument("--temperature", type=float, default=4.0)
    s.add_argument("--alpha", type=float, default=0.9, help="weight of the T^2-scaled soft (KL) term")
    s.add_argument("--beta", type=float, default=0.1, help="weight of the hard-label cross-entropy")
    s.add_argument("--lr", type=float, default=None, help="learning rate (default 0.05 sgd, 1e-3 adam)")
    s.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    s.add_argument("--batch-size", type=int, default=64, help="global batch size (over all processes)")
    s.add_argument("--weight-decay", type=float, default=5e-4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hint", action="append", default=[], metavar="S=T",
                   help="feature hint: student module path = teacher module path (zoo teachers)")
    s.add_argument("--hint-weight", type=float, default=1.0)
    s.add_argument("--student-kwargs", default=None, metavar="JSON",
                   help="builder kwargs for a zoo: student, e.g. '{\"widths\": [8, 16, 16]}' (random init)")
    s.add_argument("--no-pretrained", action="store_true",
                   help="zoo: student starts from random init even if the zoo has a checkpoint")
    s.add_argument("--no-keep-masks", action="store_true", help="let pruned (zero) weights change")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")


def cmd_distill(args: argparse.Namespace) -> int:
    """Handler of ``nnsculpt distill``."""
    from .. import models
    from ..ir.onnx_io import save

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        raise NNSculptError(f"-o {out}: the output must be an .onnx path")
    if args.epochs < 0:
        raise NNSculptError(f"--epochs must be >= 0, got {args.epochs}")
    for p in [args.data] + ([args.val] if args.val else []):
        if not Path(p).exists():
            raise InputDataError(f"{p}: no such file")
    main_rank = is_main_process()
    say = print if main_rank else (lambda *a, **k: None)

    hints = {}
    for h in args.hint:
        if "=" not in h:
            raise NNSculptError(f"--hint {h!r}: expected STUDENT_PATH=TEACHER_PATH")
        k, v = h.split("=", 1)
        hints[k.strip()] = v.strip()

    kwargs = {}
    if args.student_kwargs:
        try:
            kwargs = json.loads(args.student_kwargs)
            if not isinstance(kwargs, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise NNSculptError(f"--student-kwargs: not a JSON object ({e})") from None
    spec = args.student
    if spec.startswith(ZOO_PREFIX):
        name = spec[len(ZOO_PREFIX):]
        pretrained = False if (args.no_pretrained or kwargs) else None
        student = _zoo_module(spec, pretrained=pretrained, seed=args.seed, **kwargs)
        in_names, out_names = list(models.input_names(name)), list(models.output_names(name))
        try:
            example = models.example_inputs(name, batch=1, **{k: v for k, v in kwargs.items()
                                                                 if k in ("in_channels", "img_size", "seq_len",
                                                                          "vocab_size")})
        except Exception:  # noqa: BLE001
            example = models.example_inputs(name, batch=1)
    else:
        if kwargs or args.no_pretrained:
            raise NNSculptError("--student-kwargs / --no-pretrained apply to zoo: students only")
        if not Path(spec).exists():
            raise ModelLoadError(f"{spec}: no such file")
        student = spec
        in_names = out_names = example = None

    def report(rec: dict) -> None:
        line = f"epoch {rec['epoch']:3d}/{args.epochs}  loss {rec['loss']:.4f}  train_acc {rec['train_acc']:.4f}"
        if "val_acc" in rec:
            line += f"  val_acc {rec['val_acc']:.4f}"
        say(line, flush=True)

    config = DistillConfig(epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, beta=args.beta,
                           lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed,
                           hints=dict(hints or {}), hint_weight=args.hint_weight, keep_masks=not args.no_keep_masks,
                           progress=not args.no_progress, device=args.device, weight_decay=args.weight_decay,
                           input_names=in_names)
    result = distill(student, args.teacher, args.data, val_data=args.val, on_epoch_end=report, config=config)
    if not main_rank:
        return 0
    if isinstance(result, nn.Module):
        _export_module(result, example, in_names, out_names, out, name=spec[len(ZOO_PREFIX):])
    else:
        save(result, out)
    if args.val:
        from .ort import session

        sess = session(str(out))
        names = [i.name for i in sess.get_inputs()]
        xs, y = load_npz_data(args.val, names, need_labels=True)
        outs = sess.get_outputs()
        oname = "logits" if any(o.name == "logits" for o in outs) else outs[0].name
        pred = np.concatenate([sess.run([oname], {n: x[i:i + 512] for n, x in zip(names, xs)})[0].argmax(-1)
                               for i in range(0, len(y), 512)])
        say(f"final val_acc {float((pred == y).mean()):.4f} (ONNX Runtime on {out})")
    say(f"wrote {out}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``distill`` subcommand (and its handler as ``func``) to an argparse subparsers."""
    s = subparsers.add_parser("distill", help="knowledge distillation: train STUDENT to match TEACHER(s)",
                              description="Knowledge distillation (Hinton et al. 2015): "
                                          "L = alpha*T^2*KL(p_teacher^T || p_student^T) + beta*CE(student, labels). "
                                          "Runs data parallel under torchrun.")
    _add_arguments(s)
    s.set_defaults(func=cmd_distill)
    return s


def main(argv: list[str] | None = None) -> int:
    """``python -m nnsculpt.runtime.distill`` / ``torchrun ... -m nnsculpt.runtime.distill``."""
    p = argparse.ArgumentParser(prog="nnsculpt distill", description="Knowledge distillation; "
                                "run under torchrun for data parallel training.")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(cmd_distill(args) or 0)
    except NNSculptError as e:
        first = str(e).strip().partition("\n")[0]
        print(f"nnsculpt: error: {type(e).__name__}: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
