"""Train a PyTorch classifier through dlbjax's own JAX forward, with optax.

>>> from dlbjax._training import fit
>>> trained = fit(model, X_train, y_train, epochs=10, lr=1e-2, batch_size=64, seed=0)

:func:`fit` is a small helper for demos and tests: it lets a torch ``nn.Module`` be trained without
a torch training loop, using the very forward (the imported :class:`~dlbjax.ir.Program` lowered to
JAX) that dlbjax later explains. How it works:

1. the model is imported with :func:`dlbjax.importers.import_model` on **one** example row
   (``X[:1]``), so the exported graph has a batch axis of 1;
2. the forward of one row is ``evaluate(program, consts, [row])``; it is ``jax.vmap``-ed over the
   rows of a mini-batch, so any batch size (including a shorter last batch) uses the same program;
3. the loss is the mean softmax cross-entropy with integer labels
   (``optax.softmax_cross_entropy_with_integer_labels``) and the optimiser is ``optax.adam(lr)``;
4. gradients are taken with ``jax.grad`` with respect to the model's *parameters* only (constants
   whose ``program.const_kinds`` entry is ``"parameter"`` and whose torch parameter has
   ``requires_grad=True``); buffers and lifted constants are held fixed. The train step is
   ``jax.jit``-ed and compiles once: a short last mini-batch is padded with zero-weight rows;
5. the trained values are copied into a ``copy.deepcopy`` of the model (the constant names of the
   program equal the model's ``state_dict`` keys), which is returned. **The caller's model is never
   modified.**

Limitations (by design, this is not a general training library):

* The forward is the model's **eval-mode** graph (that is what ``torch.export`` captures for
  dlbjax). Dropout is therefore inactive during training, and **BatchNorm running statistics are
  not updated**: batch-norm layers normalise with the running mean/variance the model already has
  (buffers are frozen); their affine ``weight``/``bias`` are trained like any other parameter.
  Models without BatchNorm (or with meaningful running statistics) train as expected.
* The model must have a single tensor input with rows along axis 0 and a first output of shape
  ``[N, C]`` (class logits).
* Training is full float32 on whatever device JAX uses by default.

Determinism: the initial weights are the model's own; ``seed`` fixes the mini-batch shuffling
(``numpy.random.default_rng(seed)``), so equal inputs and ``seed`` give equal results on the same
machine and JAX backend.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from .engine.interpret import constants_to_jax, evaluate
from .importers import import_model

__all__ = ["fit"]


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"{what} must have at least one row along axis 0, got shape {a.shape}")
    return a


def fit(model: torch.nn.Module, X: Any, y: Any, *, epochs: int = 10, lr: float = 1e-2,
        batch_size: int = 64, seed: int = 0,
        log: Optional[Callable[[int, float], None]] = None) -> torch.nn.Module:
    """Train ``model`` (a classifier) on ``(X, y)`` with optax Adam and return a trained copy.

    ``X``: inputs ``[N, ...]`` (torch tensor or numpy array; cast to float32). ``y``: integer class
    labels ``[N]``. ``epochs``: passes over the data; each pass visits the rows in a fresh random
    order in mini-batches of ``batch_size`` (the last one may hold fewer real rows). ``lr``: Adam
    learning rate. ``seed``: seeds the shuffling. ``log``: optional ``log(epoch, mean_loss)``
    called after every epoch.

    Returns a deep copy of ``model`` holding the trained parameters, in the training mode flags
    the model had; ``model`` itself is left untouched. See the module docstring for how training
    runs (through dlbjax's JAX forward) and its limitations (BatchNorm statistics are not updated,
    dropout is inactive).
    """

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, not {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    X = _to_numpy(X, "X").astype(np.float32, copy=False)
    y = _to_numpy(y, "y")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be a vector of {X.shape[0]} integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y must hold integer class labels")
    y = y.astype(np.int32)

    # 1. import on one row: the forward of one example, vmapped over the rows of a batch.
    program, _ = import_model(model, torch.from_numpy(np.ascontiguousarray(X[:1])))
    if len(program.inputs) != 1:
        raise ValueError(f"fit supports models with one tensor input, this one has "
                         f"{len(program.inputs)}")
    out_shape = tuple(program.outputs[0].shape)
    if len(out_shape) != 2 or out_shape[0] != 1:
        raise ValueError(f"fit needs class logits of shape [N, C] as the first model output; the "
                         f"exported output has shape {out_shape} for one row")
    n_classes = out_shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")

    consts = constants_to_jax(program)
    torch_params = dict(model.named_parameters())
    trainable = [v.name for v in program.constants
                 if program.const_kinds[v.name] == "parameter" and v.is_float
                 and (v.name not in torch_params or torch_params[v.name].requires_grad)]
    params = {k: consts[k] for k in trainable}
    frozen = {k: v for k, v in consts.items() if k not in params}

    def forward(p, xb):
        def row(x):
            return evaluate(program, {**frozen, **p}, [x[None]])[0][0]
        return jax.vmap(row)(xb)

    def loss_fn(p, xb, yb, wb):
        # wb: 1 for real rows, 0 for the padding of a short last batch
        logits = forward(p, xb).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(wb * losses) / jnp.sum(wb)

    optimiser = optax.adam(lr)
    opt_state = optimiser.init(params)

    @jax.jit
    def step(p, state, xb, yb, wb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb, wb)
        updates, state = optimiser.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    # 2. the loop: a fresh permutation per epoch from one seeded generator.
    # A short last batch is padded to batch_size with zero-weight rows, so the step has one
    # static shape and compiles once; its loss and gradient are those of the real rows.
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    size = min(batch_size, n)
    for epoch in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for s in range(0, n, size):
            idx = order[s:s + size]
            weight = np.zeros(size, np.float32)
            weight[:len(idx)] = 1.0
            padded = np.concatenate([idx, np.full(size - len(idx), idx[0])])
            params, opt_state, loss = step(params, opt_state, jnp.asarray(X[padded]),
                                           jnp.asarray(y[padded]), jnp.asarray(weight))
            total += float(loss) * len(idx)
        if log is not None:
            log(epoch, total / n)

    # 3. load the trained values into a copy of the model.
    trained = copy.deepcopy(model)
    named = dict(trained.named_parameters())
    missing = [k for k in params if k not in named]
    if missing:
        raise RuntimeError(f"trained constants {missing} are not parameters of the model "
                           "(the exported names should equal the state_dict keys)")
    with torch.no_grad():
        for k, v in params.items():
            target = named[k]
            target.copy_(torch.from_numpy(np.array(v)).to(dtype=target.dtype, device=target.device))
    return trained
