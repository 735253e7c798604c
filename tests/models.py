"""Random model families for property tests: built from a small hashable spec, exported once per
spec, then re-weighted per example by swapping the constants of the compiled relevance function."""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn

import dlbjax

IN_FEATURES = 6
OUT = 3
IMAGE = (3, 8, 8)


class MLPNet(nn.Module):
    def __init__(self, depth, width, bias):
        super().__init__()
        sizes = [IN_FEATURES] + [width] * depth + [OUT]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNNNet(nn.Module):
    def __init__(self, stride, padding, pool, bias):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "none": nn.Identity()}[pool]
        with torch.no_grad():
            n = self._flat()
        self.fc = nn.Linear(n, OUT, bias=bias)

    def _flat(self):
        return self.features(torch.zeros(1, *IMAGE)).numel()

    def features(self, x):
        return torch.relu(self.conv2(self.pool(torch.relu(self.conv1(x)))))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class ResNet(nn.Module):
    def __init__(self, width, bias, concat):
        super().__init__()
        self.concat = concat
        self.inp = nn.Linear(IN_FEATURES, width, bias=bias)
        self.a = nn.Linear(width, width, bias=bias)
        self.b = nn.Linear(width, width, bias=bias)
        self.out = nn.Linear(2 * width if concat else width, OUT, bias=bias)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        u = torch.relu(self.a(h))
        v = torch.relu(self.b(h))
        z = torch.cat([u, v], dim=1) if self.concat else h + u - v
        return self.out(z)


class GapNet(nn.Module):
    """conv -> relu -> global average pool (a mean over H, W) -> linear."""

    def __init__(self, bias):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        self.fc = nn.Linear(5, OUT, bias=bias)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def build(spec):
    kind = spec[0]
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPNet(*spec[1:])
    if kind == "cnn":
        return CNNNet(*spec[1:])
    if kind == "res":
        return ResNet(*spec[1:])
    if kind == "gap":
        return GapNet(*spec[1:])
    raise ValueError(spec)


def input_shape(spec):
    return (1, IN_FEATURES) if spec[0] in ("mlp", "res") else (1,) + IMAGE


@lru_cache(maxsize=None)
def compiled(spec, mode="default"):
    """(explainer, jitted relevance function with every layer's relevance) for a model family
    member, compiled once per mode."""
    model = build(spec).eval()
    x = torch.randn(input_shape(spec))
    ex = dlbjax.Explainer(model, x, mode=mode, layers=True, task="classification")
    return ex, jax.jit(ex.relevance_function())


def random_weights(ex, rng, zeros=0.15, scale=0.7):
    """New values for every parameter (zeros sprinkled in), buffers unchanged."""
    consts = dict(ex.constants)
    for name, kind in ex.program.const_kinds.items():
        if kind != "parameter":
            continue
        shape = consts[name].shape
        w = rng.normal(size=shape) * scale
        w[rng.random(shape) < zeros] = 0.0
        consts[name] = jnp.asarray(w, consts[name].dtype)
    return consts


def random_input(spec, rng, zeros=0.1, scale=1.0):
    x = rng.normal(size=input_shape(spec)) * scale
    x[rng.random(x.shape) < zeros] = 0.0
    return x.astype(np.float32)


SPECS = (
    [("mlp", d, w, b) for d, w in ((1, 4), (2, 8), (3, 4)) for b in (True, False)]
    + [("cnn", s, p, pool, b) for s, p, pool in ((1, 1, "max"), (2, 0, "avg"), (1, 0, "none"),
                                                 (2, 1, "max")) for b in (True, False)]
    + [("res", 6, b, c) for b in (True, False) for c in (True, False)]
    + [("gap", b) for b in (True, False)]
)
