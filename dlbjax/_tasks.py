"""Tasks: where relevance starts, per task and mode (spec §1.3 canonical, §8.4, §8.5).

A small registry of :class:`Task` objects, each with ``size`` (how many entries a target indexes),
``check`` (validate the caller's target on the host) and ``seed`` (the traced seed of one row).
Tasks:

* ``"classification"`` (multi-class; also a two-logit binary head): the target is the argmax of
  the output row or the given class. Default mode seeds ``multiplier`` (value 1 x M) at the target,
  never the output value or the logit (§8.4). Contrastive: p = softmax(logits) (or the output
  itself when the graph ends in a softmax), R+ = M p_t at t, R- = M p_k at every k != t (§8.5).
* ``"binary"`` (one logit): seeded at index 0 whatever its sign; default M there; contrastive
  R+ = M sigma(o), R- = M (1 - sigma(o)) at index 0 (no second sigmoid when the graph ends in one).
* ``"regression"`` (also ``"bbox-regression"``: a box head [4] per row, or [K, 4], is a
  regression over its coordinates): the chosen output indices S into the flattened output row
  (default: all, e.g. all four box coordinates) each get M / |S| (§1.3 canonical "Regression /
  bbox"). The values of the outputs never enter the seed (the original 0.1.24 seeds the argmax
  coordinate, defect B13). Contrastive mode is not defined for regression and raises.
* ``"segmentation"`` (``"binary-segmentation"``): a per-pixel logit or probability map per row
  ([1, H, W], [H, W], or any shape: every element of the output row is one pixel-and-channel).
  The probability is p = sigma(o), or o itself when the graph ends in a sigmoid or softmax. The
  selected pixels are those with p > ``thresholding`` (strict; default 0.5), restricted to the
  region given as ``target`` (flat indices into the output row, or a boolean mask of the row's
  shape, shared by all rows or one per row; default: the whole map). With K selected pixels, each
  gets M / K in default mode (§1.3 canonical "Segmentation"; the output values never weight the
  seed). Contrastive mode (the spec is silent here; dlbjax's decision): every selected pixel is a
  binary decision of budget M / K, seeded as §8.5 seeds one logit: R+ = (M / K) p_i and
  R- = (M / K) (1 - p_i) at that pixel, so R+ + R- = M per row; unselected pixels get nothing in
  either stream. If no pixel passes the threshold the row's seed is all zeros: its relevance is 0
  everywhere and ``conservation.seed`` reports 0 for that row (no error, so a batch with some
  empty masks still runs in one compiled call; check ``conservation.seed`` or lower
  ``thresholding``).
* ``"next-token"`` (logits [T, V] per row, a causal LM): seeded at the last position, or the last
  position whose ``attention_mask`` is non-zero when the model takes one (right padding), at the
  target token (the argmax there, or the given token id) (§9.11). Contrastive: the softmax of that
  position's logits, R+ = M p_t, R- = M p_k for k != t.

Each row is seeded independently and its seed sums to M (§1.3 "Batch").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import relevance_dtype
from ._errors import TargetError
from ._types import TaskName

__all__ = ["Task", "Seeding", "TASKS", "TASK_ALIASES", "get_task", "resolve_task"]

TASK_ALIASES = {
    "auto": "auto",
    "classification": "classification",
    "multi-class classification": "classification",
    "multiclass": "classification",
    "multi-class": "classification",
    "image-classification": "classification",
    "tabular-classification": "classification",
    "text-classification": "classification",
    "binary": "binary",
    "binary-classification": "binary",
    "regression": "regression",
    "bbox-regression": "regression",
    "segmentation": "segmentation",
    "binary-segmentation": "segmentation",
    "next-token": "next-token",
    "generation": "next-token",
    "causal-lm": "next-token",
}


@dataclass(frozen=True)
class Seeding:
    """The static seeding options of one compiled pass."""

    multiplier: float
    contrastive: bool
    head: Any = None            # "softmax"/"sigmoid" when the graph ends in one (analysis.head)
    thresholding: float = 0.5   # segmentation: pixels with p > thresholding


class Task:
    """One task: ``size`` of its targets, host-side ``check`` of a target, traced ``seed``."""

    name: TaskName
    contrastive: bool = True  # whether contrastive mode is defined for it

    def size(self, out_shape: tuple) -> int:
        """How many classes (or outputs) a target indexes."""
        return int(np.prod(out_shape, dtype=np.int64))

    def check(self, target, n_rows: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``target``; returns (per-row class indices, per-row selection [rows, size]).
        Class index -1 means "argmax of the output"."""
        raise NotImplementedError

    def seed(self, pred, inputs: dict, target, select, s: Seeding) -> tuple:
        """(seeds per stream, target) for one row's explained output ``pred`` (traced)."""
        raise NotImplementedError

    def seed_fn(self, s: Seeding, target, select) -> Callable:
        """``fn(prediction, inputs=None) -> (seeds, target)`` for one row (what the pass calls)."""
        def fn(pred, inputs=None):
            return self.seed(pred, inputs or {}, target, select, s)
        return fn

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _no_selection(n_rows: int, size: int):
    return np.full((n_rows,), -1, np.int32), np.zeros((n_rows, size), np.float32)


def _class_targets(target, n_rows: int, size: int, hi: int, default: int = -1):
    classes, select = _no_selection(n_rows, size)
    if target is None:
        classes[:] = default
        return classes, select
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TargetError(f"target must be an int or one int per row, got {t.dtype}")
    if t.ndim == 0:
        t = np.full((n_rows,), int(t))
    if t.shape != (n_rows,):
        raise TargetError(f"target must be an int or one int per row ({n_rows} rows), got shape "
                          f"{t.shape}")
    bad = (t < 0) | (t >= hi)
    if bad.any():
        row = int(np.argmax(bad))
        raise TargetError(f"target {int(t[row])} (row {row}) is outside the output: valid classes "
                          f"are 0..{hi - 1}")
    return t.astype(np.int32), select


def _flat(pred):
    dt = relevance_dtype()
    return pred.reshape(-1).astype(dt), dt


class Classification(Task):
    name = "classification"

    def check(self, target, n_rows, size):
        return _class_targets(target, n_rows, size, size)

    def seed(self, pred, inputs, target, select, s):
        flat, dt = _flat(pred)
        M = jnp.asarray(s.multiplier, dt)
        t = jnp.where(target >= 0, target, jnp.argmax(flat)).astype(jnp.int32)
        onehot = (jnp.arange(flat.shape[0]) == t).astype(dt)
        if not s.contrastive:
            return ((M * onehot).reshape(pred.shape),), t
        p = flat if s.head == "softmax" else jax.nn.softmax(flat)
        pos = M * p * onehot
        neg = M * p * (1 - onehot)
        return (pos.reshape(pred.shape), neg.reshape(pred.shape)), t


class Binary(Task):
    name = "binary"

    def check(self, target, n_rows, size):
        return _class_targets(target, n_rows, size, 1, default=0)

    def seed(self, pred, inputs, target, select, s):
        flat, dt = _flat(pred)
        M = jnp.asarray(s.multiplier, dt)
        if not s.contrastive:
            return (jnp.full(pred.shape, M),), jnp.int32(0)
        p = flat[0] if s.head == "sigmoid" else jax.nn.sigmoid(flat[0])
        return ((M * p).reshape(pred.shape), (M * (1 - p)).reshape(pred.shape)), jnp.int32(0)


class Regression(Task):
    name = "regression"
    contrastive = False

    def check(self, target, n_rows, size):
        classes, select = _no_selection(n_rows, size)
        if target is None:
            select[:] = 1.0
            return classes, select
        idx = np.asarray(target)
        if idx.dtype.kind not in "iu":
            raise TargetError(f"regression targets must be integer output indices, got {idx.dtype}")
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.size == 0:
            raise TargetError("regression target selects no output")
        if idx.min() < 0 or idx.max() >= size:
            raise TargetError(f"regression target {idx.tolist()} is outside the output (size {size})")
        select[:, np.unique(idx)] = 1.0
        return classes, select

    def seed(self, pred, inputs, target, select, s):
        _, dt = _flat(pred)
        M = jnp.asarray(s.multiplier, dt)
        select_ = jnp.asarray(select, dt)
        seed = M * select_ / jnp.sum(select_)
        return (seed.reshape(pred.shape),), jnp.int32(-1)


class Segmentation(Task):
    name = "segmentation"

    def check(self, target, n_rows, size):
        classes, select = _no_selection(n_rows, size)
        select[:] = _region(target, n_rows, size)
        return classes, select

    def seed(self, pred, inputs, target, select, s):
        flat, dt = _flat(pred)
        M = jnp.asarray(s.multiplier, dt)
        select_ = jnp.asarray(select, dt)
        p = flat if s.head in ("sigmoid", "softmax") else jax.nn.sigmoid(flat)
        chosen = jnp.where(p > jnp.asarray(s.thresholding, dt), select_, 0).astype(dt)
        k = jnp.sum(chosen)
        share = jnp.where(k > 0, M / jnp.maximum(k, 1), 0).astype(dt)
        if not s.contrastive:
            return ((share * chosen).reshape(pred.shape),), jnp.int32(-1)
        return ((share * chosen * p).reshape(pred.shape),
                (share * chosen * (1 - p)).reshape(pred.shape)), jnp.int32(-1)


class NextToken(Task):
    name = "next-token"

    def size(self, out_shape):
        return int(out_shape[-1])

    def check(self, target, n_rows, size):
        return _class_targets(target, n_rows, size, size)

    def seed(self, pred, inputs, target, select, s):
        dt = relevance_dtype()
        M = jnp.asarray(s.multiplier, dt)
        T, V = pred.shape[-2], pred.shape[-1]
        logits = pred.reshape(T, V).astype(dt)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.size == T:
            idx = jnp.max(jnp.where(mask.reshape(-1) != 0, jnp.arange(T), -1))
            pos = jnp.where(idx >= 0, idx, T - 1)
        else:
            pos = T - 1
        row = logits[pos]
        t = jnp.where(target >= 0, target, jnp.argmax(row)).astype(jnp.int32)
        onehot = ((jnp.arange(T)[:, None] == pos) & (jnp.arange(V)[None, :] == t)).astype(dt)
        if not s.contrastive:
            return ((M * onehot).reshape(pred.shape),), t
        p = row if s.head == "softmax" else jax.nn.softmax(row)
        at_pos = (jnp.arange(T) == pos).astype(dt)[:, None]
        pos_seed = M * onehot * p[None, :]
        neg_seed = M * at_pos * p[None, :] * (1 - onehot)
        return (pos_seed.reshape(pred.shape), neg_seed.reshape(pred.shape)), t


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Binary(), Regression(),
                                               Segmentation(), NextToken())}


def get_task(name: str) -> Task:
    return TASKS[name]


def resolve_task(task: str, out_shape: tuple, batch_axis, model_name: str = "") -> Task:
    """The task for an explained output of per-row shape ``out_shape`` (``task`` may be "auto")."""
    if not isinstance(task, str) or task.lower() not in TASK_ALIASES:
        raise TargetError(f"unknown task {task!r}; use one of {sorted(set(TASK_ALIASES))}")
    task = TASK_ALIASES[task.lower()]
    row = out_shape[1:] if batch_axis == 0 and len(out_shape) >= 1 else out_shape
    size = int(np.prod(row, dtype=np.int64))
    big_dims = [d for d in row if d != 1]
    lm = any(k in model_name for k in ("CausalLM", "LMHead", "ForConditionalGeneration"))
    if task == "auto" and lm and len(row) == 2:
        return TASKS["next-token"]
    if task == "next-token":
        if len(row) != 2:
            raise TargetError(f"next-token needs logits [T, V] per row; the output row has shape {row}")
        return TASKS[task]
    if task == "auto":
        if size == 1:
            return TASKS["binary"]
        if len(big_dims) <= 1:
            return TASKS["classification"]
        raise TargetError(
            f"cannot infer the task for an output of shape {out_shape}: pass task='regression' with "
            "target indices into the flattened output row")
    if task == "binary" and size != 1:
        return TASKS["classification"]  # a two-logit binary head is a two-class classifier
    if task == "classification" and len(big_dims) > 1:
        raise TargetError(f"classification needs one class axis; the output row has shape {row}")
    return TASKS[task]


def _region(target, n_rows: int, size: int) -> np.ndarray:
    """The segmentation region: [size] or [n_rows, size] 0/1 (target None: everything)."""
    if target is None:
        return np.ones((size,), np.float32)
    t = target.detach().cpu().numpy() if hasattr(target, "detach") else np.asarray(target)
    if t.dtype == np.bool_:
        if t.size == size:
            return t.reshape(size).astype(np.float32)
        if t.size == n_rows * size and t.shape[0] == n_rows:
            return t.reshape(n_rows, size).astype(np.float32)
        raise TargetError(f"a segmentation region mask must have the output row's size ({size}) "
                          f"or one row per input row ({n_rows} x {size}); got shape {t.shape}")
    if t.dtype.kind not in "iu":
        raise TargetError(f"a segmentation target is a boolean mask or integer pixel indices into "
                          f"the flattened output row, got {t.dtype}")
    t = t.reshape(-1)
    if t.size == 0:
        raise TargetError("segmentation target selects no pixel")
    if t.min() < 0 or t.max() >= size:
        raise TargetError(f"segmentation target indices must lie in 0..{size - 1}")
    out = np.zeros((size,), np.float32)
    out[t] = 1.0
    return out
