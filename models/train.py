"""Minimal deterministic classifier training, and the digits checkpoint recipe.

Reproduce the bundled checkpoint with::

    python -m nnsculpt.models.train --out models/checkpoints/digits_resnet.pt
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train_classifier", "evaluate", "random_shift", "train_digits_checkpoint"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(a: ArrayLike, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype) if dtype is not None else t


@torch.no_grad()
def evaluate(model: nn.Module, X: ArrayLike, y: ArrayLike, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(X, y)``; runs in eval mode, restores the mode."""
    X, y = _as_tensor(X), _as_tensor(y, torch.int64)
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(X[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def random_shift(max_shift: int = 1) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Augmentation factory: translate each image of a ``(B, C, H, W)`` batch by
    an independent random offset of up to ``max_shift`` pixels per axis.

    Borders are filled by edge replication (a zero fill would not be "blank"
    in standardised input space).  Returns ``f(batch, generator) -> batch``.
    """

    def _aug(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        p = max_shift
        h, w = xb.shape[-2:]
        padded = F.pad(xb, (p, p, p, p), mode="replicate")
        offs = torch.randint(0, 2 * p + 1, (xb.shape[0], 2), generator=gen)
        out = torch.empty_like(xb)
        for i in range(xb.shape[0]):
            dy, dx = int(offs[i, 0]), int(offs[i, 1])
            out[i] = padded[i, :, dy:dy + h, dx:dx + w]
        return out

    return _aug


def train_classifier(model: nn.Module, X: ArrayLike, y: ArrayLike, *, epochs: int, lr: float,
                     batch_size: int, seed: int, weight_decay: float = 5e-4,
                     optimizer: str = "sgd", momentum: float = 0.9,
                     label_smoothing: float = 0.0,
                     augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
                     X_val: Optional[ArrayLike] = None, y_val: Optional[ArrayLike] = None,
                     verbose: bool = False) -> Dict[str, Any]:
    """Train ``model`` in place with cross-entropy and a per-step cosine LR schedule.

    Deterministic for a given ``seed`` on a given machine: shuffling and
    augmentation use a private ``torch.Generator``; the global RNG is seeded
    with ``seed`` inside :func:`torch.random.fork_rng` (so dropout etc. are
    reproducible and the caller's RNG state is preserved), and
    ``torch.use_deterministic_algorithms(True)`` is enabled for the duration.

    Args:
        model: classifier producing logits ``(B, num_classes)``.
        X, y: training inputs and int labels (numpy arrays or tensors).
        epochs, lr, batch_size, seed: the usual.
        weight_decay: L2 penalty (decoupled for ``optimizer="adamw"``).
        optimizer: ``"sgd"`` (Nesterov momentum), ``"adam"`` or ``"adamw"``.
        augment: optional ``f(batch, generator) -> batch`` applied to training batches.
        X_val, y_val: optional validation data evaluated after every epoch.

    Returns:
        history dict with per-epoch lists ``"loss"``, ``"train_acc"``, ``"lr"``,
        ``"val_acc"`` (if validation data given), plus ``"epochs"`` and ``"seconds"``.
        The model is left in eval mode.
    """
    X, y = _as_tensor(X), _as_tensor(y, torch.int64)
    if X.is_floating_point():
        X = X.float()
    n = len(y)
    if n == 0:
        raise ValueError("empty training set")
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)

    params = [p for p in model.parameters() if p.requires_grad]
    opt_name = optimizer.lower()
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                     weight_decay=weight_decay, nesterov=momentum > 0)
    elif opt_name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))

    history: Dict[str, Any] = {"loss": [], "train_acc": [], "lr": []}
    if X_val is not None and y_val is not None:
        history["val_acc"] = []
    gen = torch.Generator().manual_seed(int(seed))
    prev_det = torch.are_deterministic_algorithms_enabled()
    t0 = time.perf_counter()
    try:
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(n, generator=gen)
                tot_loss, tot_correct = 0.0, 0
                history["lr"].append(opt.param_groups[0]["lr"])
                for i in range(0, n, batch_size):
                    idx = perm[i:i + batch_size]
                    xb, yb = X[idx], y[idx]
                    if augment is not None:
                        xb = augment(xb, gen)
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    tot_loss += float(loss.detach()) * len(idx)
                    tot_correct += int((logits.detach().argmax(1) == yb).sum())
                history["loss"].append(tot_loss / n)
                history["train_acc"].append(tot_correct / n)
                msg = f"epoch {epoch + 1:3d}/{epochs} loss {tot_loss / n:.4f} train {tot_correct / n:.4f}"
                if "val_acc" in history:
                    va = evaluate(model, X_val, y_val)
                    history["val_acc"].append(va)
                    msg += f" val {va:.4f}"
                if verbose:
                    print(msg, flush=True)
    finally:
        torch.use_deterministic_algorithms(prev_det)
    history["epochs"] = epochs
    history["seconds"] = time.perf_counter() - t0
    model.eval()
    return history


# Recipe of the bundled checkpoint (keep README.md in sync).
DIGITS_RECIPE: Dict[str, Any] = dict(epochs=30, lr=0.05, batch_size=64, seed=0,
                                     weight_decay=5e-4, optimizer="sgd", max_shift=1)


def train_digits_checkpoint(out_path: Optional[Union[str, Path]] = None, *, verbose: bool = True,
                            **overrides: Any) -> Dict[str, Any]:
    """Train ``digits_resnet`` on the digits train split and save its state_dict.

    Uses :data:`DIGITS_RECIPE` (overridable by keyword).  The model starts from
    the architecture's plain initialisation (seeded with the recipe seed), not
    from the zoo's randomised-BatchNorm variant.

    Args:
        out_path: where to write the state_dict; defaults to the bundled
            ``checkpoints/digits_resnet.pt`` next to this module.

    Returns:
        dict with ``path``, ``val_acc``, ``test_acc``, ``history``, ``recipe``.
    """
    from . import CHECKPOINT_DIR
    from .architectures import digits_resnet
    from .data import load_digits_dataset

    recipe = {**DIGITS_RECIPE, **overrides}
    max_shift = int(recipe.pop("max_shift"))
    out = Path(out_path) if out_path is not None else CHECKPOINT_DIR / "digits_resnet.pt"

    Xtr, ytr = load_digits_dataset(16, "train")
    Xva, yva = load_digits_dataset(16, "val")
    Xte, yte = load_digits_dataset(16, "test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        model = digits_resnet()
    history = train_classifier(model, Xtr, ytr, X_val=Xva, y_val=yva, verbose=verbose,
                               augment=random_shift(max_shift) if max_shift > 0 else None,
                               **recipe)
    val_acc, test_acc = evaluate(model, Xva, yva), evaluate(model, Xte, yte)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out)
    if verbose:
        print(f"saved {out} ({out.stat().st_size} bytes): val {val_acc:.4f} test {test_acc:.4f} "
              f"in {history['seconds']:.1f}s", flush=True)
    return {"path": out, "val_acc": val_acc, "test_acc": test_acc, "history": history,
            "recipe": {**recipe, "max_shift": max_shift}}


def main(argv: Optional[list] = None) -> int:
    """CLI: ``python -m nnsculpt.models.train [--out PATH] [--epochs N] [--seed S]``."""
    p = argparse.ArgumentParser(description="Train the bundled digits_resnet checkpoint.")
    p.add_argument("--out", type=Path, default=None, help="output .pt (default: bundled path)")
    p.add_argument("--epochs", type=int, default=DIGITS_RECIPE["epochs"])
    p.add_argument("--seed", type=int, default=DIGITS_RECIPE["seed"])
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    train_digits_checkpoint(args.out, epochs=args.epochs, seed=args.seed, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
