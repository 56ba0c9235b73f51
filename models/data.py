"""Real (tiny) data for end-to-end tests: the scikit-learn handwritten digits.

:func:`sklearn.datasets.load_digits` ships with scikit-learn (no download):
1797 grayscale 8x8 images, pixel values 0..16, 10 classes.  Images are scaled
to [0, 1], bilinearly upscaled to ``size x size`` with
:func:`torch.nn.functional.interpolate` (``align_corners=False``) and
standardised with the mean/std of the *train* split.

The split is a fixed permutation (``numpy.random.default_rng(seed)``) cut
70% / 15% / 15% into train / val / test (1257 / 269 / 271 samples).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SPLITS", "load_digits_dataset", "digits_split_indices", "digits_npz"]

SPLITS = ("train", "val", "test", "all")
_TRAIN_FRAC = 0.70
_VAL_FRAC = 0.15


@lru_cache(maxsize=None)
def _raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    return images, d.target.astype(np.int64)


def digits_split_indices(seed: int = 0) -> Dict[str, np.ndarray]:
    """Indices of each split for the deterministic 70/15/15 partition."""
    n = len(_raw_digits()[1])
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(_TRAIN_FRAC * n)
    n_val = int(_VAL_FRAC * n)
    return {
        "train": perm[:n_train],
        "val": perm[n_train:n_train + n_val],
        "test": perm[n_train + n_val:],
        "all": np.arange(n),
    }


@lru_cache(maxsize=None)
def _upscaled(size: int) -> np.ndarray:
    images, _ = _raw_digits()
    if size == images.shape[-1]:
        return images
    with torch.no_grad():
        up = F.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear",
                           align_corners=False)
    return up.numpy().astype(np.float32)


@lru_cache(maxsize=None)
def _normalisation(size: int, seed: int) -> Tuple[float, float]:
    x = _upscaled(size)[digits_split_indices(seed)["train"]]
    return float(x.mean()), float(x.std())


def load_digits_dataset(size: int = 16, split: str = "train", seed: int = 0,
                        normalize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Load a split of the digits data set as numpy arrays.

    Args:
        size: output side length (8 = original resolution; 16 by default).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed: seed of the split permutation.
        normalize: standardise with the train-split mean/std (else values in [0, 1]).

    Returns:
        ``(X, y)``: ``X`` float32 of shape ``(N, 1, size, size)``, ``y`` int64 ``(N,)``.
        Fresh copies; callers may modify them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    idx = digits_split_indices(seed)[split]
    X = _upscaled(size)[idx].copy()
    y = _raw_digits()[1][idx].copy()
    if normalize:
        mean, std = _normalisation(size, seed)
        X = (X - mean) / std
    return X.astype(np.float32, copy=False), y


def digits_npz(path: Union[str, Path], split: str = "test", n: Optional[int] = None, *,
               size: int = 16, seed: int = 0, input_name: str = "input") -> Path:
    """Write a digits split to ``path`` as an ``.npz`` file.

    The archive maps ``input_name`` (the zoo input name, ``"input"``) to the
    images ``(N, 1, size, size)`` float32 and ``"labels"`` to int64 labels.
    ``n`` keeps only the first ``n`` samples.  Returns the path written.
    """
    X, y = load_digits_dataset(size=size, split=split, seed=seed)
    if n is not None:
        X, y = X[:n], y[:n]
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # file handle: np.savez would append '.npz' to a str path
        np.savez(fh, **{input_name: X, "labels": y})
    return path


def main(argv=None) -> int:
    """``python -m nnsculpt.models.data OUT.npz [--split train|val|test] [-n N]``: write a digits split."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m nnsculpt.models.data",
                                description="Write a split of scikit-learn's digits (16x16) as an .npz "
                                            "of zoo inputs ('input') and 'labels'.")
    p.add_argument("out")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("-n", type=int, default=None, help="keep only the first N samples")
    args = p.parse_args(argv)
    path = digits_npz(args.out, args.split, args.n)
    print(f"wrote {path} ({args.split} split)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
