"""Forward of normalisation layers (inference form) and dropout (identity in eval).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from dlbjax._dtypes import jnp_dtype

from ._table import Kind, lowering



# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------
def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@lowering("aten._native_batch_norm_legit_no_training.default")
def batch_norm_inference(input, weight, bias, running_mean, running_var, momentum, eps):
    y = (input - _channel(running_mean, input.ndim)) * lax.rsqrt(
        _channel(running_var, input.ndim) + eps)
    if weight is not None:
        y = y * _channel(weight, input.ndim)
    if bias is not None:
        y = y + _channel(bias, input.ndim)
    empty = jnp.zeros((0,), input.dtype)
    return y, empty, empty


@lowering("aten.batch_norm.default")
def batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
               cudnn_enabled=True):
    if training:
        raise NotImplementedError("batch_norm in training mode")
    return batch_norm_inference(input, weight, bias, running_mean, running_var, momentum, eps)[0]


def _layer_norm_core(x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


@lowering("aten.layer_norm.default", keep_whole=True)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return _layer_norm_core(input, normalized_shape, weight, bias, eps)[0]


@lowering("aten.native_layer_norm.default")
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    return _layer_norm_core(input, normalized_shape, weight, bias, eps)


@lowering("aten.group_norm.default", keep_whole=True)
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    n, c = input.shape[:2]
    x = input.reshape((n, num_groups, -1))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = ((x - mean) * lax.rsqrt(var + eps)).reshape(input.shape)
    if weight is not None:
        y = y * _channel(weight, input.ndim)
    if bias is not None:
        y = y + _channel(bias, input.ndim)
    return y


@lowering("aten.rms_norm.default", keep_whole=True)
def rms_norm(input, normalized_shape, weight=None, eps=None):
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    eps = jnp.finfo(input.dtype).eps if eps is None else eps
    y = input * lax.rsqrt(jnp.mean(jnp.square(input), axis=axes, keepdims=True) + eps)
    return y if weight is None else y * weight


@lowering("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default",
          kinds=Kind.TRANSPARENT)
def dropout(input, p, train):
    if train:
        raise NotImplementedError("dropout in training mode")
    return input


# ------------------------------------------------------------------------------------------------
# Vector norms (F.normalize, torch.linalg.vector_norm): a normalisation statistic
# ------------------------------------------------------------------------------------------------
@lowering("aten.linalg_vector_norm.default", keep_whole=True, kinds=Kind.STATISTIC)
def linalg_vector_norm(self, ord=2, dim=None, keepdim=False, *, dtype=None):
    """||x||_ord over ``dim`` (all axes when None). Kept whole and flagged as a statistic: like
    layer norm's variance (spec §9.4) its branch carries no relevance, so ``x / ||x||``
    (``F.normalize``, cosine attention) passes relevance through the numerator only."""
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))
    axes = None if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0) else (
        tuple(d % self.ndim for d in ([dim] if isinstance(dim, int) else dim)))
    a = jnp.abs(x)
    ord = float(ord)
    if ord == float("inf"):
        out = jnp.max(a, axis=axes, keepdims=keepdim)
    elif ord == float("-inf"):
        out = jnp.min(a, axis=axes, keepdims=keepdim)
    elif ord == 0:
        out = jnp.sum((a != 0).astype(a.dtype), axis=axes, keepdims=keepdim)
    elif ord == 1:
        out = jnp.sum(a, axis=axes, keepdims=keepdim)
    elif ord == 2:
        out = jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=keepdim))
    else:
        out = jnp.sum(a ** ord, axis=axes, keepdims=keepdim) ** (1.0 / ord)
    return out.astype(self.dtype if dtype is None else jnp_dtype(dtype))
