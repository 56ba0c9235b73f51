"""nnsculpt model zoo: small reference networks used to exercise the compiler.

Public API::

    list_models()                       -> sorted list of zoo names
    get_model(name, pretrained=False)   -> torch.nn.Module in eval mode
    example_inputs(name, batch=1, seed=0) -> tuple of deterministic tensors
    input_names(name) / output_names(name) -> tuple of graph I/O names
    model_spec(name)                    -> ModelSpec (description, shapes, ...)

``get_model`` is deterministic: the same name (and seed / kwargs) always gives
the same weights.  Unless ``pretrained=True``, BatchNorm layers get random
affine parameters and running statistics calibrated on random inputs, so that
they are far from the identity and BN folding is genuinely exercised.

Only ``digits_resnet`` has a bundled checkpoint (``checkpoints/digits_resnet.pt``,
trained on the scikit-learn digits data, see :mod:`nnsculpt.models.data` and
:mod:`nnsculpt.models.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import architectures

__all__ = [
    "UnknownModelError",
    "ModelSpec",
    "list_models",
    "get_model",
    "example_inputs",
    "input_names",
    "output_names",
    "model_spec",
    "checkpoint_path",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


class UnknownModelError(KeyError):
    """Raised for names that are not in the zoo."""

    def __str__(self) -> str:  # KeyError would repr() the message (extra quotes)
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """Static description of a zoo entry.

    Attributes:
        name: zoo name.
        builder: callable returning a freshly initialised ``nn.Module``.
        description: one-line human description.
        input_shape: per-sample input shape (without the batch dimension).
        input_dtype: dtype of the (single) input tensor.
        num_classes: default number of output classes.
        input_names / output_names: names to use for graph inputs/outputs.
        vocab_size: for integer token inputs, ids are drawn from ``[0, vocab_size)``.
        checkpoint: file name under ``checkpoints/`` for ``pretrained=True``.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    input_shape: Tuple[int, ...]
    input_dtype: torch.dtype = torch.float32
    num_classes: int = 10
    input_names: Tuple[str, ...] = ("input",)
    output_names: Tuple[str, ...] = ("logits",)
    vocab_size: Optional[int] = None
    checkpoint: Optional[str] = None


_A = architectures
_REGISTRY: Dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("resnet20", _A.resnet20,
                  "CIFAR ResNet-20 (BasicBlock, 16/32/64 ch, 1x1 conv+BN shortcuts)", (3, 32, 32)),
        ModelSpec("resnet56", _A.resnet56,
                  "CIFAR ResNet-56 (BasicBlock, 16/32/64 ch, 1x1 conv+BN shortcuts)", (3, 32, 32)),
        ModelSpec("resnet18", _A.resnet18,
                  "ImageNet ResNet-18 (7x7 stem, maxpool, 64..512 ch); 64x64 example input",
                  (3, 64, 64), num_classes=1000),
        ModelSpec("vgg11_bn", _A.vgg11_bn,
                  "VGG-11 with BatchNorm, CIFAR head 512-256-10", (3, 32, 32)),
        ModelSpec("mobilenetv2", _A.mobilenetv2,
                  "MobileNetV2 (inverted residuals, depthwise, ReLU6), CIFAR strides", (3, 32, 32)),
        ModelSpec("densenet_block", _A.densenet_block,
                  "Small DenseNet-BC (growth 12, 3 dense blocks x 4 layers, torch.cat)", (3, 32, 32)),
        ModelSpec("c2f", _A.c2f_net,
                  "YOLOv8-style Conv-BN-SiLU + C2f (chunk/concat) classifier", (3, 32, 32)),
        ModelSpec("se_net", _A.se_net,
                  "CIFAR ResNet-14 with Squeeze-and-Excitation blocks", (3, 32, 32)),
        ModelSpec("vit_tiny", _A.vit_tiny,
                  "ViT: 4x4 patches, dim 64, depth 4, 4 heads, mean pooling", (3, 32, 32)),
        ModelSpec("bert_tiny", _A.bert_tiny,
                  "BERT-style encoder: vocab 1000, 16 tokens, hidden 64, 2 layers, 4 heads",
                  (16,), input_dtype=torch.int64, num_classes=2,
                  input_names=("input_ids",), vocab_size=1000),
        ModelSpec("digits_resnet", _A.digits_resnet,
                  "ResNet-8 (16/32/32 ch) for 16x16 sklearn digits; pretrained checkpoint",
                  (1, 16, 16), checkpoint="digits_resnet.pt"),
    ]
}


def list_models() -> List[str]:
    """Sorted list of all zoo model names."""
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; raises :class:`UnknownModelError`."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownModelError(
            f"unknown zoo model '{name}' (known: {', '.join(list_models())})") from None


def input_names(name: str) -> Tuple[str, ...]:
    """Names of the model's graph inputs, e.g. ``("input",)``."""
    return model_spec(name).input_names


def output_names(name: str) -> Tuple[str, ...]:
    """Names of the model's graph outputs, e.g. ``("logits",)``."""
    return model_spec(name).output_names


def checkpoint_path(name: str) -> Optional[Path]:
    """Path of the bundled checkpoint for ``name`` (``None`` if it has none)."""
    spec = model_spec(name)
    return CHECKPOINT_DIR / spec.checkpoint if spec.checkpoint else None


def _input_shape(spec: ModelSpec, model_kwargs: Dict[str, Any]) -> Tuple[int, ...]:
    """Per-sample input shape, honouring shape-changing builder kwargs."""
    shape = list(spec.input_shape)
    if spec.input_dtype.is_floating_point:
        if "in_channels" in model_kwargs:
            shape[0] = int(model_kwargs["in_channels"])
        if "img_size" in model_kwargs:
            shape[1] = shape[2] = int(model_kwargs["img_size"])
    elif "seq_len" in model_kwargs:
        shape[0] = int(model_kwargs["seq_len"])
    return tuple(shape)


def example_inputs(name: str, batch: int = 1, seed: int = 0,
                   **model_kwargs: Any) -> Tuple[torch.Tensor, ...]:
    """Deterministic example inputs for ``name``.

    Image models get standard-normal ``float32`` tensors of shape
    ``(batch, *input_shape)``; token models get ``int64`` ids uniform in
    ``[0, vocab_size)``.  The result depends only on ``(name, batch, seed)``
    (and on ``in_channels`` / ``img_size`` / ``seq_len`` / ``vocab_size`` if
    given, mirroring :func:`get_model` kwargs); the global RNG is untouched.
    """
    spec = model_spec(name)
    gen = torch.Generator().manual_seed(int(seed))
    shape = (int(batch),) + _input_shape(spec, model_kwargs)
    if spec.input_dtype.is_floating_point:
        x = torch.randn(shape, generator=gen, dtype=spec.input_dtype)
    else:
        vocab = int(model_kwargs.get("vocab_size", spec.vocab_size or 2))
        x = torch.randint(0, vocab, shape, generator=gen, dtype=spec.input_dtype)
    return (x,)


@torch.no_grad()
def _make_batchnorm_nontrivial(model: nn.Module, calib_inputs: Tuple[torch.Tensor, ...]) -> None:
    """Give every BatchNorm random affine params and realistic running stats.

    The affine parameters are drawn first (weight ~ U(0.5, 1.5), bias ~
    N(0, 0.2^2)); then the running mean/var are set to the exact batch
    statistics seen on ``calib_inputs`` (cumulative average, momentum=None),
    so activations stay well-scaled while each BN is far from the identity.
    Uses the global RNG (the caller seeds it).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    model(*calib_inputs)
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.eval()


def get_model(name: str, *, pretrained: bool = False, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` in eval mode.

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the bundled checkpoint (only models whose spec has a
            ``checkpoint``; currently ``digits_resnet``).
        seed: RNG seed for initialisation (default 0, so the same name gives
            the same weights).  The caller's global RNG state is preserved.
        **kwargs: forwarded to the architecture builder (e.g. ``num_classes``,
            ``in_channels``, ``width_mult``).

    Raises:
        UnknownModelError: ``name`` is not in the zoo.
        ValueError: ``pretrained=True`` for a model without a checkpoint.
        FileNotFoundError: the checkpoint file is missing.
    """
    spec = model_spec(name)
    if pretrained and spec.checkpoint is None:
        raise ValueError(f"zoo model '{name}' has no pretrained checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = spec.builder(**kwargs)
        if pretrained:
            path = checkpoint_path(name)
            if path is None or not path.is_file():
                raise FileNotFoundError(f"checkpoint for '{name}' not found at {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(
                    f"checkpoint for '{name}' does not match the architecture built with "
                    f"kwargs {kwargs!r}: {exc}") from exc
        else:
            calib = example_inputs(name, batch=16, seed=1234 + int(seed), **kwargs)
            _make_batchnorm_nontrivial(model, calib)
    return model.eval()
