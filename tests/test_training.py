"""dlbjax._training.fit: trains through the JAX forward, never touches the caller's model,
is deterministic given the seed, and keeps buffers (BatchNorm statistics) and frozen
parameters fixed."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from dlbjax._training import fit


def _blobs(n=96, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, classes, n)
    X = (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32)
    return X, y


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_learns_and_leaves_the_model_alone():
    X, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    before = _state(model)
    trained = fit(model, X, y, epochs=30, lr=3e-2, batch_size=40, seed=1)
    assert trained is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        acc_before = (model(torch.from_numpy(X)).argmax(1).numpy() == y).mean()
        acc_after = (trained(torch.from_numpy(X)).argmax(1).numpy() == y).mean()
    assert acc_after >= 0.9 and acc_after > acc_before
    again = fit(model, X, y, epochs=30, lr=3e-2, batch_size=40, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                 again.state_dict().values()))


def test_fit_keeps_buffers_and_frozen_parameters():
    X, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)
    trained = fit(model, X, y, epochs=2, lr=1e-2, batch_size=32, seed=0)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "0.bias"):
        assert torch.equal(trained.state_dict()[name], model.state_dict()[name]), name
    for name in ("0.weight", "1.weight", "3.weight"):
        assert not torch.equal(trained.state_dict()[name], model.state_dict()[name]), name
    assert trained.training == model.training
