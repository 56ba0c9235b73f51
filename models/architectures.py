"""Reference PyTorch architectures for the nnsculpt model zoo.

Everything here is written from scratch (no torchvision) and follows a few
rules so that the models are good compiler test inputs:

* Every model is traceable with :func:`torch.fx.symbolic_trace`: there is no
  data-dependent Python control flow, only branches on attributes fixed at
  construction time (``if self.downsample is not None``).
* Graphs are shape-static: flattening uses ``torch.flatten(x, 1)`` and the
  attention blocks reshape with ``-1`` for the batch dimension and static
  sequence length / head counts, so no ``x.size()`` / ``x.shape`` nodes appear
  in the default configurations.
* Layers are standard ``torch.nn`` modules with conventional attribute names
  (``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc`` ...) because module
  paths become provenance in the compiler IR.
* Models do not use in-place activations or in-place tensor updates.

Weights are initialised with PyTorch's default initialisers (plus a few
explicit ones), i.e. deterministically from the global torch RNG.  The public
entry point :func:`nnsculpt.models.get_model` seeds that RNG and additionally
makes BatchNorm statistics non-trivial.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    # building blocks
    "BasicBlock",
    "SEBasicBlock",
    "SqueezeExcitation",
    "CifarResNet",
    "ResNet",
    "VGG",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "DenseLayer",
    "DenseBlock",
    "Transition",
    "DenseNet",
    "Conv",
    "Bottleneck",
    "C2f",
    "Classify",
    "C2fNet",
    "PatchEmbed",
    "MultiHeadSelfAttention",
    "Mlp",
    "ViTBlock",
    "VisionTransformer",
    "BertEmbeddings",
    "BertLayer",
    "BertPooler",
    "BertTiny",
    # zoo builders
    "resnet20",
    "resnet56",
    "resnet18",
    "vgg11_bn",
    "mobilenetv2",
    "densenet_block",
    "c2f_net",
    "se_net",
    "vit_tiny",
    "bert_tiny",
    "digits_resnet",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _kaiming_init_convs(module: nn.Module) -> None:
    """He-normal (fan_out) init for every Conv2d, as torchvision does for CNNs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# ResNets
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, residual add, ReLU.

    ``downsample`` (a ``Sequential(conv1x1, BN)``, i.e. the "option B"
    projection shortcut) is used whenever the stride or channel count changes.
    As in torchvision, the single ``relu`` module is applied twice.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation: global avg pool -> 1x1 conv -> ReLU -> 1x1 conv
    -> sigmoid -> channel-wise multiply (torchvision attribute names)."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.avgpool(x)
        scale = self.activation(self.fc1(scale))
        scale = self.scale_activation(self.fc2(scale))
        return x * scale


class SEBasicBlock(BasicBlock):
    """:class:`BasicBlock` with a :class:`SqueezeExcitation` on the residual
    branch (applied after ``bn2``, before the residual add)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, reduction: int = 4) -> None:
        super().__init__(inplanes, planes, stride, downsample)
        self.se = SqueezeExcitation(planes, max(1, planes // reduction))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.se(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


def _make_res_layer(block: Callable[..., nn.Module], inplanes: int, planes: int,
                    blocks: int, stride: int) -> Tuple[nn.Sequential, int]:
    """Stack ``blocks`` residual blocks; the first one may downsample."""
    expansion = getattr(block, "expansion", 1)
    downsample = None
    if stride != 1 or inplanes != planes * expansion:
        downsample = nn.Sequential(
            _conv1x1(inplanes, planes * expansion, stride),
            nn.BatchNorm2d(planes * expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes))
    return nn.Sequential(*layers), inplanes


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2), with option-B shortcuts.

    3x3 stem (stride 1), then ``len(layers)`` stages of ``block`` whose widths
    are given by ``widths`` (16/32/64 by default); every stage after the first
    halves the resolution.  Global average pool and a linear classifier.

    ``CifarResNet(BasicBlock, [n, n, n])`` is ResNet-(6n+2): n=3 -> ResNet-20,
    n=9 -> ResNet-56.
    """

    def __init__(self, block: Callable[..., nn.Module] = BasicBlock,
                 layers: Sequence[int] = (3, 3, 3), num_classes: int = 10,
                 in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        inplanes = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            stage, inplanes = _make_res_layer(block, inplanes, w, n, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _kaiming_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ResNet(nn.Module):
    """ImageNet-style ResNet (torchvision layout): 7x7/2 stem, 3x3/2 max pool,
    four stages (64, 128, 256, 512 x ``width / 64``), avg pool, ``fc``.

    Works for any input resolution >= 32 (the zoo uses 64x64 to keep tests
    fast; 224x224 is the classic setting).
    """

    def __init__(self, block: Callable[..., nn.Module] = BasicBlock,
                 layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        self.layer1, inplanes = _make_res_layer(block, inplanes, width, layers[0], 1)
        self.layer2, inplanes = _make_res_layer(block, inplanes, width * 2, layers[1], 2)
        self.layer3, inplanes = _make_res_layer(block, inplanes, width * 4, layers[2], 2)
        self.layer4, inplanes = _make_res_layer(block, inplanes, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _kaiming_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------

_VGG11_CFG: Tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG with optional BatchNorm, CIFAR-style head.

    ``features`` is a flat ``Sequential`` of conv3x3[-BN]-ReLU and 2x2 max pools
    (torchvision indexing, e.g. ``features.0``, ``features.1``).  After the
    features an ``AdaptiveAvgPool2d(1)`` (a no-op at 32x32 input) makes the
    model resolution-agnostic.  ``classifier`` is ``Linear(C, hidden) - ReLU -
    Linear(hidden, num_classes)`` or a single ``Linear`` when ``hidden`` is
    ``None``.
    """

    def __init__(self, cfg: Sequence = _VGG11_CFG, batch_norm: bool = True,
                 num_classes: int = 10, in_channels: int = 3,
                 width_mult: float = 1.0, hidden: Optional[int] = 256) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = max(1, int(round(v * width_mult)))
                layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if hidden is None:
            self.classifier = nn.Sequential(nn.Linear(c, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        _kaiming_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (not going below 90%)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d - ReLU6, as a Sequential (``.0 .1 .2``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: [1x1 expand] - 3x3 depthwise - 1x1 linear
    projection (BN, no activation); residual add when stride 1 and in == out."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with the CIFAR stride configuration.

    Differences to the ImageNet model: the stem conv has stride 1 and the
    second stage (24 channels) has stride 1, so a 32x32 input ends at 4x4.
    ``width_mult`` scales every channel count (rounded to multiples of 8).
    """

    # t (expansion), c (channels), n (repeats), s (first stride)
    CIFAR_SETTING: Tuple[Tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),  # stride 2 in the ImageNet config
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 inverted_residual_setting: Optional[Sequence[Tuple[int, int, int, int]]] = None,
                 round_nearest: int = 8, dropout: float = 0.2, stem_stride: int = 1) -> None:
        super().__init__()
        setting = inverted_residual_setting or self.CIFAR_SETTING
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=stem_stride)]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                 s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.uniform_(m.bias, -0.1, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# DenseNet
# ---------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-conv1x1 (bottleneck) - BN-ReLU-conv3x3, whose
    ``growth_rate`` new channels are concatenated onto the input."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` :class:`DenseLayer` s (``denselayer1`` ...)."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))


class Transition(nn.Sequential):
    """DenseNet transition: BN - ReLU - conv1x1 (compression) - 2x2 avg pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """Small CIFAR-style DenseNet-BC (torchvision attribute layout).

    ``features`` = conv0 - norm0 - relu0 - (denseblockN - transitionN)* -
    denseblock - norm5 - relu5, then avg pool and ``classifier``.
    """

    def __init__(self, growth_rate: int = 12, block_config: Sequence[int] = (4, 4, 4),
                 bn_size: int = 4, compression: float = 0.5, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        num_features = 2 * growth_rate
        features: "OrderedDict[str, nn.Module]" = OrderedDict([
            ("conv0", nn.Conv2d(in_channels, num_features, 3, padding=1, bias=False)),
            ("norm0", nn.BatchNorm2d(num_features)),
            ("relu0", nn.ReLU()),
        ])
        for i, num_layers in enumerate(block_config):
            features[f"denseblock{i + 1}"] = DenseBlock(num_layers, num_features, bn_size, growth_rate)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out = int(num_features * compression)
                features[f"transition{i + 1}"] = Transition(num_features, out)
                num_features = out
        features["norm5"] = nn.BatchNorm2d(num_features)
        features["relu5"] = nn.ReLU()
        self.features = nn.Sequential(features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(num_features, num_classes)
        _kaiming_init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------
# YOLOv8-style C2f
# ---------------------------------------------------------------------------


def _autopad(k: int, p: Optional[int] = None) -> int:
    """'same' padding for odd kernel sizes."""
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Ultralytics ``Conv``: Conv2d (no bias) - BatchNorm2d - SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: Optional[int] = None,
                 g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, _autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Ultralytics ``Bottleneck``: two 3x3 :class:`Conv` s, optional residual."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        if self.add:
            return x + y
        return y


class C2f(nn.Module):
    """YOLOv8 C2f: ``cv1`` then ``chunk(2, 1)``; each bottleneck in ``m``
    consumes the previous output and every intermediate is concatenated
    along channels before ``cv2``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, e=1.0) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        parts = self.cv1(x).chunk(2, 1)
        y = [parts[0], parts[1]]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Classify(nn.Module):
    """Ultralytics-style classification head: Conv - global avg pool - Linear."""

    def __init__(self, c1: int, c2: int, c_: int = 256) -> None:
        super().__init__()
        self.conv = Conv(c1, c_, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_, c2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.flatten(self.pool(self.conv(x)), 1))


class C2fNet(nn.Module):
    """Small YOLOv8-cls-like backbone built from :class:`Conv` and :class:`C2f`
    (``model.0`` ... ``model.7``, mirroring the Ultralytics layout)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 depth: Sequence[int] = (1, 2, 1)) -> None:
        super().__init__()
        w = width
        self.model = nn.Sequential(
            Conv(in_channels, w, 3, 1),          # 0
            Conv(w, 2 * w, 3, 2),                # 1
            C2f(2 * w, 2 * w, depth[0], True),   # 2
            Conv(2 * w, 4 * w, 3, 2),            # 3
            C2f(4 * w, 4 * w, depth[1], True),   # 4
            Conv(4 * w, 8 * w, 3, 2),            # 5
            C2f(8 * w, 8 * w, depth[2], True),   # 6
            Classify(8 * w, num_classes, c_=16 * w),  # 7
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# ---------------------------------------------------------------------------
# Transformers
# ---------------------------------------------------------------------------


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention written with plain ops.

    Separate ``q``/``k``/``v`` Linear projections, ``softmax(q k^T * scale) v``
    via ``torch.matmul``, output projection ``proj``.  Head splitting uses
    ``reshape(-1, seq_len, num_heads, head_dim)`` with a *static* sequence
    length, so the traced graph contains no shape queries; inputs must have
    exactly ``seq_len`` tokens.
    """

    def __init__(self, dim: int, num_heads: int, seq_len: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.seq_len = seq_len
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, t: Tensor) -> Tensor:
        # (B, N, C) -> (B, H, N, D)
        return t.reshape(-1, self.seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, v)                                 # (B, H, N, D)
        out = out.transpose(1, 2).reshape(-1, self.seq_len, self.dim)  # (B, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """Transformer feed-forward: ``fc1`` - GELU - ``fc2``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided Conv2d: (B,C,H,W) -> (B,N,dim)."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 dim: int = 64) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError("img_size must be divisible by patch_size")
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, seq_len: int, mlp_ratio: float = 2.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadSelfAttention(dim, num_heads, seq_len)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """Small ViT encoder for classification.

    ``pool="mean"`` (default) averages the patch tokens, which keeps the graph
    free of batch-size-dependent ops.  ``pool="cls"`` prepends a learned class
    token (``cls_token.expand(x.shape[0], -1, -1)``, which introduces shape
    nodes in the traced graph) and classifies from it.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, dim: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 2.0, pool: str = "mean") -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.pool = pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_channels, dim)
        seq_len = self.patch_embed.num_patches + (1 if pool == "cls" else 0)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.cls_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, seq_len, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        if self.pool == "cls":
            x = x[:, 0]
        else:
            x = x.mean(dim=1)
        return self.head(x)


class BertEmbeddings(nn.Module):
    """Token + learned absolute position embeddings, then LayerNorm.

    Position ids are a non-persistent buffer ``position_ids`` of shape
    ``(1, max_len)``; the input must have exactly ``max_len`` tokens.
    """

    def __init__(self, vocab_size: int, hidden: int, max_len: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Post-norm BERT encoder layer: LN(x + attn(x)); LN(x + mlp(x))."""

    def __init__(self, hidden: int, num_heads: int, seq_len: int, intermediate: int,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(hidden, num_heads, seq_len)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = Mlp(hidden, intermediate)
        self.output_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention_norm(x + self.attention(x))
        x = self.output_norm(x + self.mlp(x))
        return x


class BertPooler(nn.Module):
    """Take the first ([CLS]) token, ``dense`` Linear, tanh."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(x[:, 0]))


class BertTiny(nn.Module):
    """Tiny BERT-style sequence classifier over int64 token ids ``(B, seq_len)``."""

    def __init__(self, vocab_size: int = 1000, hidden: int = 64, num_layers: int = 2,
                 num_heads: int = 4, intermediate: int = 256, seq_len: int = 16,
                 num_classes: int = 2) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden, seq_len)
        self.encoder = nn.Sequential(*[BertLayer(hidden, num_heads, seq_len, intermediate)
                                       for _ in range(num_layers)])
        self.pooler = BertPooler(hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        x = self.encoder(x)
        return self.classifier(self.pooler(x))


# ---------------------------------------------------------------------------
# Zoo builders
# ---------------------------------------------------------------------------


def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (3x3 BasicBlocks, 16/32/64 channels), ~0.27M params."""
    return CifarResNet(BasicBlock, (3, 3, 3), num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (3x9 BasicBlocks, 16/32/64 channels), ~0.86M params."""
    return CifarResNet(BasicBlock, (9, 9, 9), num_classes=num_classes, in_channels=in_channels, **kwargs)


def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> ResNet:
    """ImageNet ResNet-18 (torchvision layout), ~11.7M params at 1000 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, **kwargs)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, **kwargs) -> VGG:
    """VGG-11 with BatchNorm, CIFAR head (512 -> 256 -> num_classes)."""
    return VGG(_VGG11_CFG, batch_norm=True, num_classes=num_classes, in_channels=in_channels, **kwargs)


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                **kwargs) -> MobileNetV2:
    """MobileNetV2 with CIFAR strides (32x32 input)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


def densenet_block(num_classes: int = 10, in_channels: int = 3, **kwargs) -> DenseNet:
    """Small DenseNet-BC: growth 12, three dense blocks of 4 layers."""
    return DenseNet(num_classes=num_classes, in_channels=in_channels, **kwargs)


def c2f_net(num_classes: int = 10, in_channels: int = 3, **kwargs) -> C2fNet:
    """YOLOv8-style Conv/C2f classifier (width 16)."""
    return C2fNet(num_classes=num_classes, in_channels=in_channels, **kwargs)


def se_net(num_classes: int = 10, in_channels: int = 3, reduction: int = 4,
           layers: Sequence[int] = (2, 2, 2), **kwargs) -> CifarResNet:
    """CIFAR ResNet-14 layout with Squeeze-and-Excitation blocks."""
    block = partial(SEBasicBlock, reduction=reduction)
    return CifarResNet(block, layers, num_classes=num_classes, in_channels=in_channels, **kwargs)


def vit_tiny(num_classes: int = 10, in_channels: int = 3, **kwargs) -> VisionTransformer:
    """ViT: 32x32 input, 4x4 patches (64 tokens), dim 64, depth 4, 4 heads."""
    return VisionTransformer(num_classes=num_classes, in_channels=in_channels, **kwargs)


def bert_tiny(num_classes: int = 2, **kwargs) -> BertTiny:
    """BERT: vocab 1000, 16 tokens, hidden 64, 2 layers, 4 heads, FFN 256."""
    return BertTiny(num_classes=num_classes, **kwargs)


def digits_resnet(num_classes: int = 10, in_channels: int = 1,
                  widths: Sequence[int] = (16, 32, 32), **kwargs) -> CifarResNet:
    """ResNet-8 (one BasicBlock per stage, widths 16/32/32) for 16x16 digits."""
    return CifarResNet(BasicBlock, (1, 1, 1), num_classes=num_classes, in_channels=in_channels,
                       widths=widths, **kwargs)
