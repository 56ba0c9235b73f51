"""Shared fixtures: small ONNX models built from torch, temp dirs, tolerance helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch


#: only guards 0/0 (an all-zero reference); far below any float32 output magnitude
REL_FLOOR = 1e-30


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max |a|``: the largest error relative to the reference's largest
    magnitude (a reference of 1e-3 is held to 1e-3 x the tolerance, not to an absolute one).
    The denominator is floored at :data:`REL_FLOOR` only so an all-zero reference is defined."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(REL_FLOOR, float(np.abs(a).max())))


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y))) + y
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


def make_small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = SmallNet()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def small_onnx(tmp_path):
    """Path to an ONNX export (opset 13, BN kept as nodes, dynamic batch) of SmallNet."""
    m = make_small_net()
    path = tmp_path / "small.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13, dynamo=False,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return path
