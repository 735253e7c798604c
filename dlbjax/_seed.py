"""Seeding: where relevance starts, per task and mode (spec §1.3 canonical, §8.4, §8.5).

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

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import TargetError
from ._dtypes import relevance_dtype

__all__ = ["resolve_task", "seed_fn", "check_targets", "target_size", "TASK_ALIASES"]

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


def resolve_task(task: str, out_shape: tuple, batch_axis, model_name: str = "") -> str:
    """The canonical task for an explained output of per-row shape ``out_shape``."""
    if not isinstance(task, str) or task.lower() not in TASK_ALIASES:
        raise TargetError(f"unknown task {task!r}; use one of {sorted(set(TASK_ALIASES))}")
    task = TASK_ALIASES[task.lower()]
    row = out_shape[1:] if batch_axis == 0 and len(out_shape) >= 1 else out_shape
    size = int(np.prod(row, dtype=np.int64))
    big_dims = [d for d in row if d != 1]
    lm = any(k in model_name for k in ("CausalLM", "LMHead", "ForConditionalGeneration"))
    if task == "auto" and lm and len(row) == 2:
        return "next-token"
    if task == "next-token":
        if len(row) != 2:
            raise TargetError(f"next-token needs logits [T, V] per row; the output row has shape {row}")
        return task
    if task == "auto":
        if size == 1:
            return "binary"
        if len(big_dims) <= 1:
            return "classification"
        raise TargetError(
            f"cannot infer the task for an output of shape {out_shape}: pass task='regression' with "
            "target indices into the flattened output row")
    if task == "binary" and size != 1:
        return "classification"  # a two-logit binary head is a two-class classifier
    if task == "classification" and len(big_dims) > 1:
        raise TargetError(f"classification needs one class axis; the output row has shape {row}")
    return task


def check_targets(task: str, target, n_rows: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``target`` on the host; returns (per-row class indices, per-row selection mask).

    Class index -1 means "argmax of the output". The selection mask is used for regression.
    """
    classes = np.full((n_rows,), -1, np.int32)
    select = np.zeros((n_rows, size), np.float32)
    if task == "segmentation":
        select[:] = _region(target, n_rows, size)
        return classes, select
    if task == "regression":
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
    if target is None:
        if task == "binary":
            classes[:] = 0
        return classes, select
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TargetError(f"target must be an int or one int per row, got {t.dtype}")
    if t.ndim == 0:
        t = np.full((n_rows,), int(t))
    if t.shape != (n_rows,):
        raise TargetError(f"target must be an int or one int per row ({n_rows} rows), got shape "
                          f"{t.shape}")
    hi = 1 if task == "binary" else size
    bad = (t < 0) | (t >= hi)
    if bad.any():
        row = int(np.argmax(bad))
        raise TargetError(f"target {int(t[row])} (row {row}) is outside the output: valid classes "
                          f"are 0..{hi - 1}")
    return t.astype(np.int32), select


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


def target_size(task: str, out_shape: tuple) -> int:
    """How many classes (or outputs) a target indexes."""
    if task == "next-token":
        return int(out_shape[-1])
    return int(np.prod(out_shape, dtype=np.int64))


def _next_token(pred, inputs, target, M, contrastive, head, dt):
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
    if not contrastive:
        return ((M * onehot).reshape(pred.shape),), t
    p = row if head == "softmax" else jax.nn.softmax(row)
    at_pos = (jnp.arange(T) == pos).astype(dt)[:, None]
    pos_seed = M * onehot * p[None, :]
    neg_seed = M * at_pos * p[None, :] * (1 - onehot)
    return (pos_seed.reshape(pred.shape), neg_seed.reshape(pred.shape)), t


def seed_fn(task: str, contrastive: bool, multiplier: float, head, target, select,
            thresholding: float = 0.5):
    """A function (prediction, inputs) -> (seeds per stream, target) for one row (traced).

    ``thresholding`` is used by the segmentation task only (pixels with p > thresholding).
    """

    def fn(pred, inputs=None):
        dt = relevance_dtype()
        flat = pred.reshape(-1).astype(dt)
        size = flat.shape[0]
        M = jnp.asarray(multiplier, dt)
        select_ = jnp.asarray(select, dt)
        if task == "next-token":
            return _next_token(pred, inputs or {}, target, M, contrastive, head, dt)
        if task == "segmentation":
            p = flat if head in ("sigmoid", "softmax") else jax.nn.sigmoid(flat)
            chosen = jnp.where(p > jnp.asarray(thresholding, dt), select_, 0).astype(dt)
            k = jnp.sum(chosen)
            share = jnp.where(k > 0, M / jnp.maximum(k, 1), 0).astype(dt)
            if not contrastive:
                return ((share * chosen).reshape(pred.shape),), jnp.int32(-1)
            return ((share * chosen * p).reshape(pred.shape),
                    (share * chosen * (1 - p)).reshape(pred.shape)), jnp.int32(-1)
        if task == "regression":
            seed = M * select_ / jnp.sum(select_)
            return (seed.reshape(pred.shape),), jnp.int32(-1)
        if task == "binary":
            if not contrastive:
                return (jnp.full(pred.shape, M),), jnp.int32(0)
            p = flat[0] if head == "sigmoid" else jax.nn.sigmoid(flat[0])
            return ((M * p).reshape(pred.shape), (M * (1 - p)).reshape(pred.shape)), jnp.int32(0)
        t = jnp.where(target >= 0, target, jnp.argmax(flat)).astype(jnp.int32)
        onehot = (jnp.arange(size) == t).astype(dt)
        if not contrastive:
            return ((M * onehot).reshape(pred.shape),), t
        p = flat if head == "softmax" else jax.nn.softmax(flat)
        pos = M * p * onehot
        neg = M * p * (1 - onehot)
        return (pos.reshape(pred.shape), neg.reshape(pred.shape)), t

    return fn
