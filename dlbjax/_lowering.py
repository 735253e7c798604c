"""The forward op-lowering table: ATen operator overload name -> JAX function.

Each function takes the ATen call's arguments in ATen's order and names (arrays where the graph
had tensors), and returns a JAX array (a tuple for multi-output ops). The interpreter casts every
result to the dtype torch recorded, so promotion details do not leak. Matrix products and
convolutions run at ``Precision.HIGHEST`` so that GPUs with TF32 match CPU results.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _windows as W

__all__ = ["LOWERINGS", "lowering", "jnp_dtype", "HIGHEST", "conv_nd", "conv_transpose_nd"]

HIGHEST = lax.Precision.HIGHEST
LOWERINGS: dict[str, Callable] = {}


def lowering(*names: str):
    """Register a function as the forward of one or more ATen overloads."""

    def deco(fn):
        for n in names:
            LOWERINGS[n] = fn
        return fn

    return deco


def jnp_dtype(name):
    """dtype name -> JAX dtype, honouring jax_enable_x64 (int64 -> int32, float64 -> float32)."""
    if name is None:
        return None
    x64 = jax.config.jax_enable_x64
    if name == "int64" and not x64:
        return jnp.int32
    if name == "float64" and not x64:
        return jnp.float32
    if name == "complex128" and not x64:
        return jnp.complex64
    return jnp.dtype(name)


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _axis(dim, ndim):
    """One ATen dim as a JAX axis; torch accepts dim 0 / -1 on a 0-d tensor, which has no axis."""
    return None if ndim == 0 else _dim(dim, ndim)


def _dims(dims, ndim):
    if ndim == 0:  # torch accepts [], [0], [-1] on a 0-d tensor: nothing to reduce
        return ()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(_dim(d, ndim) for d in dims))


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------
@lowering("aten.linear.default")
def linear(input, weight, bias=None):
    y = jnp.matmul(input, weight.T, precision=HIGHEST)
    return y if bias is None else y + bias


@lowering("aten.addmm.default")
def addmm(self, mat1, mat2, *, beta=1, alpha=1):
    prod = jnp.matmul(mat1, mat2, precision=HIGHEST)
    prod = prod if alpha == 1 else alpha * prod
    if beta == 0:  # torch ignores self then: NaN/inf in it do not propagate
        return jnp.broadcast_to(prod, jnp.broadcast_shapes(prod.shape, self.shape))
    return prod + (self if beta == 1 else beta * self)


@lowering("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def matmul(self, other):
    return jnp.matmul(self, other, precision=HIGHEST)


@lowering("aten.t.default")
def t(self):
    return self.T if self.ndim == 2 else self


# ------------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------------
def _conv_dn(nd):
    sp = "DHW"[-nd:] if nd <= 3 else None
    return ("NC" + sp, "OI" + sp, "NC" + sp)


def conv_nd(x, w, stride, padding, dilation, groups):
    """Cross-correlation in PyTorch layout (N, C, *spatial) / (O, I/groups, *k), no bias."""
    nd = w.ndim - 2
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    stride, dilation = W.as_tuple(stride, nd), W.as_tuple(dilation, nd)
    if isinstance(padding, str):
        pad = padding.upper()
    else:
        pad = [(p, p) for p in W.as_tuple(padding, nd)]
    y = lax.conv_general_dilated(x, w, window_strides=stride, padding=pad, rhs_dilation=dilation,
                                 dimension_numbers=_conv_dn(nd), feature_group_count=groups,
                                 precision=HIGHEST)
    return y[0] if unbatched else y


def conv_transpose_nd(x, w, stride, padding, output_padding, groups, dilation):
    """PyTorch's transposed convolution; weight layout (C_in, C_out/groups, *k), no bias."""
    nd = w.ndim - 2
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    stride, dilation = W.as_tuple(stride, nd), W.as_tuple(dilation, nd)
    padding, output_padding = W.as_tuple(padding, nd), W.as_tuple(output_padding, nd)
    cin, cout_g = w.shape[0], w.shape[1]
    k = w.shape[2:]
    wg = w.reshape((groups, cin // groups, cout_g) + k)
    wg = jnp.swapaxes(wg, 1, 2).reshape((groups * cout_g, cin // groups) + k)
    wg = jnp.flip(wg, axis=tuple(range(2, 2 + nd)))
    pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op)
            for kk, p, op, d in zip(k, padding, output_padding, dilation)]
    y = lax.conv_general_dilated(x, wg, window_strides=(1,) * nd, padding=pads, lhs_dilation=stride,
                                 rhs_dilation=dilation, dimension_numbers=_conv_dn(nd),
                                 feature_group_count=groups, precision=HIGHEST)
    return y[0] if unbatched else y


def _add_channel_bias(y, bias, nd):
    if bias is None:
        return y
    return y + bias.reshape((-1,) + (1,) * nd)


@lowering("aten.convolution.default")
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    nd = weight.ndim - 2
    if transposed:
        y = conv_transpose_nd(input, weight, stride, padding, output_padding, groups, dilation)
    else:
        y = conv_nd(input, weight, stride, padding, dilation, groups)
    return _add_channel_bias(y, bias, nd)


@lowering("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
          "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding")
def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _add_channel_bias(conv_nd(input, weight, stride, padding, dilation, groups), bias,
                             weight.ndim - 2)


@lowering("aten.conv_transpose1d.default", "aten.conv_transpose2d.input",
          "aten.conv_transpose3d.input")
def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    y = conv_transpose_nd(input, weight, stride, padding, output_padding, groups, dilation)
    return _add_channel_bias(y, bias, weight.ndim - 2)


# ------------------------------------------------------------------------------------------------
# Pooling (window tables shared with the relevance rules)
# ------------------------------------------------------------------------------------------------
def pool_table(op_nd: int, x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    nd = op_nd
    kernel = W.as_tuple(kernel_size, nd)
    stride = W.as_tuple(stride, nd)
    stride = tuple(k if s is None else s for s, k in zip(stride, kernel))
    padding = W.as_tuple(padding, nd)
    dilation = W.as_tuple(dilation, nd)
    spatial = tuple(x_shape[-nd:])
    return W.sliding_windows(spatial, kernel, stride, padding, dilation, bool(ceil_mode))


def _max_pool(nd):
    def fn(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, dilation, ceil_mode)
        return jnp.max(W.gather_windows(self, table, -jnp.inf), axis=-1)

    return fn


def _winner_index(win, table):
    """Flat spatial index of each window's first maximum (PyTorch's returned indices)."""
    arg = jnp.argmax(win, axis=-1)
    tab = jnp.broadcast_to(jnp.asarray(table), win.shape)
    return jnp.take_along_axis(tab, arg[..., None], axis=-1)[..., 0]


def _max_pool_indices(nd):
    def fn(self, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
        table = pool_table(nd, self.shape, kernel_size, stride, padding, dilation, ceil_mode)
        win = W.gather_windows(self, table, -jnp.inf)
        return jnp.max(win, axis=-1), _winner_index(win, table)

    return fn


for _nd in (1, 2, 3):
    LOWERINGS[f"aten.max_pool{_nd}d.default"] = _max_pool(_nd)
    LOWERINGS[f"aten.max_pool{_nd}d_with_indices.default"] = _max_pool_indices(_nd)


def _avg_pool(nd):
    def fn(self, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
           divisor_override=None):
        kernel = W.as_tuple(kernel_size, nd)
        st = tuple(k if s is None else s for s, k in zip(W.as_tuple(stride, nd), kernel))
        pad = W.as_tuple(padding, nd)
        spatial = tuple(self.shape[-nd:])
        table = W.sliding_windows(spatial, kernel, st, pad, (1,) * nd, bool(ceil_mode))
        div = W.avg_divisors(spatial, kernel, st, pad, bool(ceil_mode), bool(count_include_pad),
                             divisor_override)
        total = jnp.sum(W.gather_windows(self, table, 0.0), axis=-1)
        return total / jnp.asarray(div, dtype=self.dtype)

    return fn


for _nd in (1, 2, 3):
    LOWERINGS[f"aten.avg_pool{_nd}d.default"] = _avg_pool(_nd)


def adaptive_table(nd, x_shape, output_size):
    out = tuple(x_shape[-nd + i] if o is None else int(o) for i, o in enumerate(W.as_tuple(output_size, nd)))
    return W.adaptive_windows(tuple(x_shape[-nd:]), out)


def _adaptive_avg(nd):
    def fn(self, output_size):
        table = adaptive_table(nd, self.shape, output_size)
        count = jnp.asarray((table >= 0).sum(-1), dtype=self.dtype)
        return jnp.sum(W.gather_windows(self, table, 0.0), axis=-1) / count

    return fn


def _adaptive_max(nd):
    def fn(self, output_size):
        table = adaptive_table(nd, self.shape, output_size)
        win = W.gather_windows(self, table, -jnp.inf)
        return jnp.max(win, axis=-1), _winner_index(win, table)

    return fn


for _nd in (1, 2, 3):
    LOWERINGS[f"aten.adaptive_avg_pool{_nd}d.default"] = _adaptive_avg(_nd)
    LOWERINGS[f"aten._adaptive_avg_pool{_nd}d.default"] = _adaptive_avg(_nd)
    LOWERINGS[f"aten.adaptive_max_pool{_nd}d.default"] = _adaptive_max(_nd)


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


@lowering("aten.layer_norm.default")
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return _layer_norm_core(input, normalized_shape, weight, bias, eps)[0]


@lowering("aten.native_layer_norm.default")
def native_layer_norm(input, normalized_shape, weight, bias, eps):
    return _layer_norm_core(input, normalized_shape, weight, bias, eps)


@lowering("aten.group_norm.default")
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


@lowering("aten.rms_norm.default")
def rms_norm(input, normalized_shape, weight=None, eps=None):
    axes = tuple(range(input.ndim - len(normalized_shape), input.ndim))
    eps = jnp.finfo(input.dtype).eps if eps is None else eps
    y = input * lax.rsqrt(jnp.mean(jnp.square(input), axis=axes, keepdims=True) + eps)
    return y if weight is None else y * weight


# ------------------------------------------------------------------------------------------------
# Activations and elementwise math
# ------------------------------------------------------------------------------------------------
def _unary(name, fn):
    LOWERINGS[name] = fn


_unary("aten.relu.default", jax.nn.relu)
_unary("aten.sigmoid.default", jax.nn.sigmoid)
_unary("aten.tanh.default", jnp.tanh)
_unary("aten.silu.default", jax.nn.silu)
_unary("aten.exp.default", jnp.exp)
_unary("aten.log.default", jnp.log)
_unary("aten.sqrt.default", jnp.sqrt)
_unary("aten.rsqrt.default", lax.rsqrt)
_unary("aten.abs.default", jnp.abs)
_unary("aten.neg.default", jnp.negative)
_unary("aten.sin.default", jnp.sin)
_unary("aten.cos.default", jnp.cos)
_unary("aten.erf.default", jax.scipy.special.erf)
_unary("aten.reciprocal.default", jnp.reciprocal)
_unary("aten.sign.default", lambda x: x if x.dtype == jnp.bool_ else jnp.where(
    jnp.isnan(x), jnp.zeros((), x.dtype), jnp.sign(x)))  # torch: sign(NaN) == 0
_unary("aten.floor.default", jnp.floor)
_unary("aten.ceil.default", jnp.ceil)
_unary("aten.round.default", jnp.round)
_unary("aten.trunc.default", jnp.trunc)
_unary("aten.log_sigmoid.default", jax.nn.log_sigmoid)
_unary("aten.mish.default", lambda x: x * jnp.tanh(jax.nn.softplus(x)))
_unary("aten.hardswish.default", lambda x: x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0)
_unary("aten.hardsigmoid.default", lambda x: jnp.clip(x + 3.0, 0.0, 6.0) / 6.0)
_unary("aten.relu6.default", lambda x: jnp.clip(x, 0.0, 6.0))


@lowering("aten.hardtanh.default")
def hardtanh(self, min_val=-1.0, max_val=1.0):
    return jnp.clip(self, min_val, max_val)


@lowering("aten.gelu.default")
def gelu(self, *, approximate="none"):
    return jax.nn.gelu(self, approximate=(approximate == "tanh"))


@lowering("aten.leaky_relu.default")
def leaky_relu(self, negative_slope=0.01):
    return jnp.where(self > 0, self, self * negative_slope)


@lowering("aten.elu.default")
def elu(self, alpha=1.0, scale=1.0, input_scale=1.0):
    # torch: x > 0 ? scale * x : scale * alpha * (exp(input_scale * x) - 1); input_scale only
    # enters the negative branch.
    return scale * jnp.where(self > 0, self, alpha * jnp.expm1(self * input_scale))


@lowering("aten.selu.default")
def selu(self):
    return jax.nn.selu(self)


@lowering("aten.celu.default")
def celu(self, alpha=1.0):
    return jnp.where(self > 0, self, alpha * jnp.expm1(self / alpha))


@lowering("aten.softplus.default")
def softplus(self, beta=1.0, threshold=20.0):
    bx = self * beta
    return jnp.where(bx > threshold, self, jax.nn.softplus(bx) / beta)


@lowering("aten.clamp.default")
def clamp(self, min=None, max=None):
    return jnp.clip(self, min, max)


@lowering("aten.clamp_min.default")
def clamp_min(self, min):
    return jnp.maximum(self, min)


@lowering("aten.clamp_max.default")
def clamp_max(self, max):
    return jnp.minimum(self, max)


@lowering("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor")
def pow_(self, exponent):
    if isinstance(exponent, int):
        return lax.integer_pow(self, exponent) if exponent >= 0 else jnp.power(self, exponent)
    return jnp.power(self, exponent)


@lowering("aten.pow.Scalar")
def pow_scalar(self, exponent):
    return jnp.power(self, exponent)


@lowering("aten._softmax.default")
def _softmax(self, dim, half_to_float=False):
    return jax.nn.softmax(self, axis=_axis(dim, self.ndim))


@lowering("aten.softmax.int")
def softmax(self, dim, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jax.nn.softmax(x, axis=_axis(dim, x.ndim))


@lowering("aten._log_softmax.default")
def _log_softmax(self, dim, half_to_float=False):
    return jax.nn.log_softmax(self, axis=_axis(dim, self.ndim))


@lowering("aten.log_softmax.int")
def log_softmax(self, dim, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jax.nn.log_softmax(x, axis=_axis(dim, x.ndim))


# binary arithmetic -----------------------------------------------------------------------------
@lowering("aten.add.Tensor", "aten.add.Scalar")
def add(self, other, alpha=1):
    return self + (other if alpha == 1 else alpha * other)


@lowering("aten.sub.Tensor", "aten.sub.Scalar")
def sub(self, other, alpha=1):
    return self - (other if alpha == 1 else alpha * other)


@lowering("aten.rsub.Scalar", "aten.rsub.Tensor")
def rsub(self, other, alpha=1):
    return other - (self if alpha == 1 else alpha * self)


@lowering("aten.mul.Tensor", "aten.mul.Scalar")
def mul(self, other):
    return self * other


@lowering("aten.div.Tensor", "aten.div.Scalar")
def div(self, other):
    return jnp.true_divide(self, other)


@lowering("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def div_mode(self, other, *, rounding_mode=None):
    if rounding_mode is None:
        return jnp.true_divide(self, other)
    if rounding_mode == "floor":
        return jnp.floor_divide(self, other)
    return jnp.trunc(jnp.true_divide(self, other))


@lowering("aten.floor_divide.default")
def floor_divide(self, other):
    return jnp.floor_divide(self, other)


@lowering("aten.remainder.Tensor", "aten.remainder.Scalar")
def remainder(self, other):
    return jnp.remainder(self, other)


@lowering("aten.maximum.default")
def maximum(self, other):
    return jnp.maximum(self, other)


@lowering("aten.minimum.default")
def minimum(self, other):
    return jnp.minimum(self, other)


for _name, _fn in [("eq", jnp.equal), ("ne", jnp.not_equal), ("lt", jnp.less), ("le", jnp.less_equal),
                   ("gt", jnp.greater), ("ge", jnp.greater_equal)]:
    LOWERINGS[f"aten.{_name}.Tensor"] = _fn
    LOWERINGS[f"aten.{_name}.Scalar"] = _fn

for _name, _fn in [("logical_and", jnp.logical_and), ("logical_or", jnp.logical_or),
                   ("logical_xor", jnp.logical_xor), ("bitwise_and", jnp.bitwise_and),
                   ("bitwise_or", jnp.bitwise_or), ("bitwise_xor", jnp.bitwise_xor)]:
    LOWERINGS[f"aten.{_name}.default"] = _fn
    LOWERINGS[f"aten.{_name}.Tensor"] = _fn
    LOWERINGS[f"aten.{_name}.Scalar"] = _fn
LOWERINGS["aten.logical_not.default"] = jnp.logical_not
LOWERINGS["aten.bitwise_not.default"] = jnp.bitwise_not
LOWERINGS["aten.isnan.default"] = jnp.isnan
LOWERINGS["aten.isinf.default"] = jnp.isinf


@lowering("aten.where.self")
def where(condition, self, other):
    return jnp.where(condition, self, other)


@lowering("aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where_scalar(condition, self, other):
    return jnp.where(condition, self, other)


@lowering("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(self, mask, value):
    return jnp.where(mask, value, self)


# ------------------------------------------------------------------------------------------------
# Shape and indexing
# ------------------------------------------------------------------------------------------------
@lowering("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
          "aten.view_copy.default")
def view(self, size):
    return jnp.reshape(self, tuple(size))


@lowering("aten.permute.default", "aten.permute_copy.default")
def permute(self, dims):
    return jnp.transpose(self, [_dim(d, self.ndim) for d in dims])


@lowering("aten.transpose.int")
def transpose(self, dim0, dim1):
    return self if self.ndim == 0 else jnp.swapaxes(self, dim0, dim1)


@lowering("aten.squeeze.default")
def squeeze(self):
    return jnp.squeeze(self)


@lowering("aten.squeeze.dim", "aten.squeeze.dims")
def squeeze_dims(self, dim):
    if self.ndim == 0:  # torch accepts dim 0 / -1 on a 0-d tensor and returns it unchanged
        return self
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = tuple(_dim(d, self.ndim) for d in dims if self.shape[_dim(d, self.ndim)] == 1)
    return jnp.squeeze(self, axis=dims) if dims else self


@lowering("aten.unsqueeze.default")
def unsqueeze(self, dim):
    return jnp.expand_dims(self, _dim(dim, self.ndim + 1))


@lowering("aten.flatten.using_ints")
def flatten(self, start_dim=0, end_dim=-1):
    if self.ndim == 0:
        return self.reshape(1)
    s, e = _dim(start_dim, self.ndim), _dim(end_dim, self.ndim)
    merged = int(np.prod(self.shape[s:e + 1], dtype=np.int64))  # not -1: zero-size inputs
    return self.reshape(self.shape[:s] + (merged,) + self.shape[e + 1:])


@lowering("aten.unflatten.int")
def unflatten(self, dim, sizes):
    d = _dim(dim, self.ndim)
    return self.reshape(self.shape[:d] + tuple(sizes) + self.shape[d + 1:])


@lowering("aten.expand.default", "aten.expand_copy.default")
def expand(self, size, *, implicit=False):
    lead = len(size) - self.ndim
    shape = tuple(self.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(self, shape)


@lowering("aten.slice.Tensor", "aten.slice_copy.Tensor")
def slice_(self, dim=0, start=None, end=None, step=1):
    d = _dim(dim, self.ndim)
    idx = [slice(None)] * self.ndim
    idx[d] = slice(start, end, step)
    return self[tuple(idx)]


@lowering("aten.select.int", "aten.select_copy.int")
def select(self, dim, index):
    return jnp.take(self, index, axis=_dim(dim, self.ndim))


@lowering("aten.cat.default")
def cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or list(tensors)
    return jnp.concatenate(tensors, axis=_dim(dim, tensors[0].ndim))


@lowering("aten.stack.default")
def stack(tensors, dim=0):
    return jnp.stack(tensors, axis=_dim(dim, tensors[0].ndim + 1))


@lowering("aten.split.Tensor")
def split(self, split_size, dim=0):
    d = _dim(dim, self.ndim)
    n = self.shape[d]
    if split_size == 0:  # torch allows it only on an empty dim: one empty piece
        return (self,)
    points = list(range(split_size, n, split_size))
    return tuple(jnp.split(self, points, axis=d))


@lowering("aten.split_with_sizes.default")
def split_with_sizes(self, split_sizes, dim=0):
    d = _dim(dim, self.ndim)
    return tuple(jnp.split(self, list(np.cumsum(split_sizes)[:-1]), axis=d))


@lowering("aten.chunk.default")
def chunk(self, chunks, dim=0):
    d = _dim(dim, self.ndim)
    size = -(-self.shape[d] // chunks)
    if size == 0:  # an empty dim: torch returns `chunks` empty pieces
        return tuple(self for _ in range(chunks))
    return split(self, size, d)


@lowering("aten.unbind.int")
def unbind(self, dim=0):
    d = _dim(dim, self.ndim)
    return tuple(jnp.moveaxis(self, d, 0)[i] for i in range(self.shape[d]))


@lowering("aten.clone.default", "aten.alias.default", "aten.contiguous.default",
          "aten.detach.default", "aten.lift_fresh_copy.default", "aten.alias_copy.default")
def identity(self, *, memory_format=None):
    return self


@lowering("aten._to_copy.default")
def _to_copy(self, *, dtype=None, **_):
    return self if dtype is None else self.astype(jnp_dtype(dtype))


@lowering("aten.to.dtype")
def to_dtype(self, dtype, non_blocking=False, copy=False, memory_format=None):
    return self.astype(jnp_dtype(dtype))


@lowering("aten.type_as.default")
def type_as(self, other):
    return self.astype(other.dtype)


@lowering("aten.constant_pad_nd.default")
def constant_pad_nd(self, pad, value=0):
    cfg = [(0, 0, 0)] * self.ndim
    for i in range(len(pad) // 2):
        axis = self.ndim - 1 - i
        cfg[axis] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(self, jnp.asarray(value, self.dtype), cfg)


@lowering("aten.repeat.default")
def repeat(self, repeats):
    lead = len(repeats) - self.ndim
    x = self.reshape((1,) * lead + self.shape)
    return jnp.tile(x, tuple(repeats))


@lowering("aten.flip.default")
def flip(self, dims):
    return jnp.flip(self, axis=tuple(dims))


@lowering("aten.roll.default")
def roll(self, shifts, dims=()):
    if not dims:
        return jnp.roll(self.reshape(-1), shifts).reshape(self.shape)
    return jnp.roll(self, tuple(shifts), axis=tuple(dims))


@lowering("aten.narrow.default")
def narrow(self, dim, start, length):
    d = _dim(dim, self.ndim)
    start = start + self.shape[d] if start < 0 else start  # negative: counted from the end
    return slice_(self, d, start, start + length)


@lowering("aten.index_select.default")
def index_select(self, dim, index):
    # a 0-d index selects one entry but keeps the dim (size 1), unlike jnp.take
    return jnp.take(self, jnp.atleast_1d(index), axis=_dim(dim, self.ndim))


@lowering("aten.index.Tensor")
def index(self, indices):
    idx = tuple(slice(None) if i is None else i for i in indices)
    return self[idx]


@lowering("aten.gather.default")
def gather(self, dim, index, *, sparse_grad=False):
    d = _dim(dim, self.ndim)
    src = self[tuple(slice(0, s) if a != d else slice(None) for a, s in enumerate(index.shape))]
    return jnp.take_along_axis(src, index, axis=d)


@lowering("aten.embedding.default")
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return jnp.take(weight, indices, axis=0)


def embedding_bag_members(indices, offsets, n_bags, include_last_offset=False, padding_idx=-1):
    """Bag id of every index (offsets mark bag starts) and whether it counts (inside a bag and
    not ``padding_idx``). Works for offsets that are traced values."""
    pos = jnp.arange(indices.shape[0])
    starts = offsets[:n_bags]
    bag = jnp.searchsorted(starts, pos, side="right") - 1
    valid = bag >= 0
    if include_last_offset:
        valid = valid & (pos < offsets[n_bags])
    if padding_idx is not None and padding_idx >= 0:
        valid = valid & (indices != padding_idx)
    return jnp.clip(bag, 0, max(n_bags - 1, 0)), valid


@lowering("aten._embedding_bag.default")
def embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                  per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    """``nn.EmbeddingBag`` on flat indices: bag b = sum (mode 0), mean (1) or max (2) of the rows
    of its members (times ``per_sample_weights`` in sum mode); empty bags give zeros. The three
    auxiliary outputs (offset2bag, bag_size, max_indices) have torch's shapes; their values are
    the bag ids, member counts and the row index of each maximum (or zeros)."""
    n = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    bag, valid = embedding_bag_members(indices, offsets, n, include_last_offset, padding_idx)
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None].astype(rows.dtype)
    count = jax.ops.segment_sum(valid.astype(jnp.int32), bag, num_segments=n)
    if mode == 2:
        masked = jnp.where(valid[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(masked, bag, num_segments=n)
        out = jnp.where(count[:, None] > 0, out, 0).astype(weight.dtype)
        winner = jnp.where(valid[:, None] & (masked == out[bag]), indices[:, None], -1)
        max_idx = jnp.maximum(jax.ops.segment_max(winner, bag, num_segments=n), 0)
    else:
        out = jax.ops.segment_sum(jnp.where(valid[:, None], rows, 0), bag, num_segments=n)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
        max_idx = jnp.zeros((n,), indices.dtype)
    # torch's CPU kernel (and its meta function) skip offset2bag on the float32/float16 sum path
    fast_sum = mode == 0 and (padding_idx is None or padding_idx < 0) and \
        weight.dtype in (jnp.float32, jnp.float16)
    offset2bag = jnp.zeros((0,), indices.dtype) if fast_sum else bag.astype(indices.dtype)
    return out, offset2bag, count.astype(indices.dtype), max_idx.astype(indices.dtype)


@lowering("aten._embedding_bag_forward_only.default")
def embedding_bag_forward_only(weight, indices, offsets, scale_grad_by_freq=False, mode=0,
                               sparse=False, per_sample_weights=None, include_last_offset=False,
                               padding_idx=-1):
    """As :func:`embedding_bag`; but in sum mode torch sizes bag_size and max_indices by
    ``offsets`` (one more than the bags with ``include_last_offset``), so they are resized here:
    the interpreter checks every output's shape against torch's."""
    out, offset2bag, bag_size, max_idx = embedding_bag(
        weight, indices, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
        include_last_offset, padding_idx)
    if mode == 0 and include_last_offset:
        extra = jnp.zeros((1,), bag_size.dtype)
        bag_size = jnp.concatenate([bag_size, extra])
        max_idx = jnp.concatenate([max_idx, extra])
    return out, offset2bag, bag_size, max_idx


# ------------------------------------------------------------------------------------------------
# Recurrent layers, kept whole (aten.lstm.input, aten.gru.input): one lax.scan per layer and
# direction. The relevance rules (rules/recurrent.py) reuse these cells.
# ------------------------------------------------------------------------------------------------
def rnn_weights(params, has_biases, num_layers, bidirectional):
    """torch's flat ``params`` list -> ``[layer][direction] = (w_ih, w_hh, b_ih, b_hh, w_hr)``.

    torch orders it per layer, per direction (forward, then ``_reverse``): w_ih, w_hh, then with
    biases b_ih, b_hh, then with ``proj_size > 0`` (LSTM) the projection w_hr. Absent entries are
    None."""
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) == num_layers * dirs * (per + 1):
        per += 1  # LSTM projection weight_hr
    elif len(params) != num_layers * dirs * per:
        raise NotImplementedError(f"unexpected recurrent parameter list of length {len(params)}")
    proj = per in (3, 5)
    layers = []
    for k in range(0, len(params), per):
        p = params[k:k + per]
        if (k // per) % dirs == 0:
            layers.append([])
        layers[-1].append((p[0], p[1], p[2] if has_biases else None, p[3] if has_biases else None,
                           p[-1] if proj else None))
    return layers


def rnn_affine(x, w, b):
    """x W^T + b over the last axis (one of the two bracketed terms of a gate pre-activation)."""
    y = jnp.matmul(x, w.T, precision=HIGHEST)
    return y if b is None else y + b


def lstm_step(w_hh, b_hh, xg, h, c, w_hr=None):
    """One LSTM step from the input term xg = W_ih x_t + b_ih; gates i, f, g, o (torch order);
    with a projection (proj_size > 0) h_t = W_hr (o tanh c_t)."""
    a = xg + rnn_affine(h, w_hh, b_hh)
    i, f, g, o = jnp.split(a, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h if w_hr is None else rnn_affine(h, w_hr, None)), c


def gru_step(w_hh, b_hh, xg, h):
    """One GRU step from xg = W_ih x_t + b_ih; gates r, z, n (torch order):
    n = tanh(x_n + r (W_hn h + b_hn)), h' = (1 - z) n + z h."""
    xr, xz, xn = jnp.split(xg, 3, axis=-1)
    hr, hz, hn = jnp.split(rnn_affine(h, w_hh, b_hh), 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def stack_directions(layer):
    """One layer's directions stacked on a leading axis (same shapes), for one vmapped scan."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layer)


def by_direction(x, dirs):
    """[T, ...] -> [dirs, T, ...] in each direction's processing order (reverse: time flipped)."""
    return jnp.stack([x, jnp.flip(x, 0)][:dirs])


def from_directions(hs):
    """[dirs, T, B, H] in processing order -> [T, B, dirs*H] (forward features first)."""
    return jnp.concatenate([hs[0]] + [jnp.flip(h, 0) for h in hs[1:]], axis=-1)


def _rnn(kind, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first):
    if train and dropout:
        raise NotImplementedError("recurrent layer with dropout in training mode")
    if input.ndim != 3:
        raise NotImplementedError("recurrent layer on an unbatched (2-D) input")
    x = jnp.swapaxes(input, 0, 1) if batch_first else input  # [T, B, I]
    states = list(hx) if kind == "lstm" else [hx]
    step = lstm_step if kind == "lstm" else gru_step

    def direction(w, xd, *init):
        w_ih, w_hh, b_ih, b_hh, w_hr = w

        def body(carry, xg_t):
            new = step(w_hh, b_hh, xg_t, *carry, **({} if w_hr is None else {"w_hr": w_hr}))
            new = new if isinstance(new, tuple) else (new,)
            return new, new[0]

        last, hs = lax.scan(body, init, rnn_affine(xd, w_ih, b_ih))
        return hs, last

    finals = []
    for layer_index, layer in enumerate(rnn_weights(params, has_biases, num_layers, bidirectional)):
        D = len(layer)
        init = tuple(s[layer_index * D:(layer_index + 1) * D] for s in states)
        hs, last = jax.vmap(direction)(stack_directions(layer), by_direction(x, D), *init)
        x = from_directions(hs)  # inter-layer dropout: identity in eval
        finals.append(last)
    out = jnp.swapaxes(x, 0, 1) if batch_first else x
    return (out,) + tuple(jnp.concatenate(f, axis=0) for f in zip(*finals))


@lowering("aten.lstm.input")
def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``nn.LSTM``: returns (output, h_n, c_n)."""
    return _rnn("lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                batch_first)


@lowering("aten.gru.input")
def gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``nn.GRU``: returns (output, h_n)."""
    return _rnn("gru", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                batch_first)


@lowering("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default")
def dropout(input, p, train):
    if train:
        raise NotImplementedError("dropout in training mode")
    return input


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------
@lowering("aten.sum.dim_IntList")
def sum_dim(self, dim, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.sum(x, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.sum.default")
def sum_all(self, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.sum(x)


@lowering("aten.mean.dim")
def mean_dim(self, dim, keepdim=False, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.mean(x, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.mean.default")
def mean_all(self, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jnp.mean(x)


@lowering("aten.amax.default")
def amax(self, dim=(), keepdim=False):
    return jnp.max(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.amin.default")
def amin(self, dim=(), keepdim=False):
    return jnp.min(self, axis=_dims(dim, self.ndim), keepdims=keepdim)


@lowering("aten.max.dim")
def max_dim(self, dim, keepdim=False):
    axis = _axis(dim, self.ndim)
    return jnp.max(self, axis=axis, keepdims=keepdim), jnp.argmax(self, axis=axis, keepdims=keepdim)


@lowering("aten.min.dim")
def min_dim(self, dim, keepdim=False):
    axis = _axis(dim, self.ndim)
    return jnp.min(self, axis=axis, keepdims=keepdim), jnp.argmin(self, axis=axis, keepdims=keepdim)


@lowering("aten.max.default")
def max_all(self):
    return jnp.max(self)


@lowering("aten.min.default")
def min_all(self):
    return jnp.min(self)


@lowering("aten.argmax.default")
def argmax(self, dim=None, keepdim=False):
    if dim is None:
        flat = jnp.argmax(self.reshape(-1))
        return flat.reshape((1,) * self.ndim) if keepdim else flat
    return jnp.argmax(self, axis=_axis(dim, self.ndim), keepdims=keepdim)


@lowering("aten.argmin.default")
def argmin(self, dim=None, keepdim=False):
    if dim is None:
        flat = jnp.argmin(self.reshape(-1))
        return flat.reshape((1,) * self.ndim) if keepdim else flat
    return jnp.argmin(self, axis=_axis(dim, self.ndim), keepdims=keepdim)


def _bool_reduce_axes(dim, ndim):
    """any/all: None reduces every dim but an empty list reduces none (unlike sum/mean/amax)."""
    if isinstance(dim, (list, tuple)) and len(dim) == 0:
        return ()
    return _dims(dim, ndim)


@lowering("aten.any.dim", "aten.any.dims")
def any_dim(self, dim=None, keepdim=False):
    return jnp.any(self, axis=_bool_reduce_axes(dim, self.ndim), keepdims=keepdim)


@lowering("aten.any.default")
def any_all(self):
    return jnp.any(self)


@lowering("aten.all.dim", "aten.all.dims")
def all_dim(self, dim=None, keepdim=False):
    return jnp.all(self, axis=_bool_reduce_axes(dim, self.ndim), keepdims=keepdim)


@lowering("aten.all.default")
def all_all(self):
    return jnp.all(self)


@lowering("aten.cumsum.default")
def cumsum(self, dim, *, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return x if x.ndim == 0 else jnp.cumsum(x, axis=_dim(dim, x.ndim))


# ------------------------------------------------------------------------------------------------
# Creation (constants inside the graph)
# ------------------------------------------------------------------------------------------------
def _default_dtype(dtype, *values):
    if dtype is not None:
        return jnp_dtype(dtype)
    if any(isinstance(v, float) for v in values):
        return jnp.float32
    if all(isinstance(v, bool) for v in values):
        return jnp.bool_
    return jnp_dtype("int64")


@lowering("aten.arange.start_step", "aten.arange.start")
def arange(start, end, step=1, *, dtype=None, **_):
    return jnp.arange(start, end, step, dtype=_default_dtype(dtype, start, end, step))


@lowering("aten.arange.default")
def arange_end(end, *, dtype=None, **_):
    return jnp.arange(end, dtype=_default_dtype(dtype, end))


@lowering("aten.full.default")
def full(size, fill_value, *, dtype=None, **_):
    return jnp.full(tuple(size), fill_value, dtype=_default_dtype(dtype, fill_value))


@lowering("aten.full_like.default")
def full_like(self, fill_value, *, dtype=None, **_):
    return jnp.full(self.shape, fill_value, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.zeros.default", "aten.empty.memory_format")
def zeros(size, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.ones.default")
def ones(size, *, dtype=None, **_):
    return jnp.ones(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.zeros_like.default", "aten.empty_like.default")
def zeros_like(self, *, dtype=None, **_):
    return jnp.zeros(self.shape, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.ones_like.default")
def ones_like(self, *, dtype=None, **_):
    return jnp.ones(self.shape, dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.new_zeros.default", "aten.new_empty.default")
def new_zeros(self, size, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.new_ones.default")
def new_ones(self, size, *, dtype=None, **_):
    return jnp.ones(tuple(size), dtype=jnp_dtype(dtype) if dtype else self.dtype)


@lowering("aten.scalar_tensor.default")
def scalar_tensor(s, *, dtype=None, **_):
    return jnp.asarray(s, dtype=jnp_dtype(dtype) if dtype else jnp.float32)


@lowering("aten.empty_permuted.default")
def empty_permuted(size, physical_layout, *, dtype=None, **_):
    return jnp.zeros(tuple(size), dtype=jnp_dtype(dtype) if dtype else jnp.float32)

