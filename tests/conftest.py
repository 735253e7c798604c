"""Shared fixtures and small model builders for the test-suite (tiny models, no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64 (the forward-vs-torch measure of the model tests)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def stream_totals(conservation, field):
    """A conservation field as a tuple of arrays: (positive, negative) in contrastive mode."""
    v = getattr(conservation, field)
    return (np.asarray(v.positive), np.asarray(v.negative)) if hasattr(v, "positive") \
        else (np.asarray(v),)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give batch-norm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 32, 10), bias=True):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ResidualCNN(nn.Module):
    """conv-bn-relu-maxpool, a residual block (2 x conv-bn, add, relu), adaptive avgpool, linear."""

    def __init__(self, channels=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        h = self.stem(x)
        r = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(h + self.bn2(self.conv2(r)))
        return self.fc(torch.flatten(self.pool(h), 1))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model
