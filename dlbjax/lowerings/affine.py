"""Forward of the affine family: dense layers, matrix products and convolutions.

Matrix products and convolutions run at ``Precision.HIGHEST`` so that GPUs with TF32 match CPU
results. ``conv_nd``/``conv_transpose_nd`` are shared with the relevance rules (``rules/affine.py``),
whose transposed products are ``jax.linear_transpose`` of these very functions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import windows as W
from ._common import HIGHEST
from ._table import Kind, lowering


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------
@lowering("aten.linear.default", keep_whole=True)
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


@lowering("aten.matmul.default", keep_whole=True, kinds=Kind.MATMUL)
@lowering("aten.mm.default", "aten.bmm.default", kinds=Kind.MATMUL)
def matmul(self, other):
    return jnp.matmul(self, other, precision=HIGHEST)



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


def is_transposed_conv(eqn) -> bool:
    """Whether a ``Kind.CONV`` equation is a transposed convolution (weight [in, out/g, *k])."""
    return eqn.op == "aten.convolution.default" and len(eqn.args) > 6 and bool(eqn.args[6])


@lowering("aten.convolution.default", kinds=Kind.CONV)
def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    nd = weight.ndim - 2
    if transposed:
        y = conv_transpose_nd(input, weight, stride, padding, output_padding, groups, dilation)
    else:
        y = conv_nd(input, weight, stride, padding, dilation, groups)
    return _add_channel_bias(y, bias, nd)


@lowering("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
          "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding", keep_whole=True,
          kinds=Kind.CONV)
def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _add_channel_bias(conv_nd(input, weight, stride, padding, dilation, groups), bias,
                             weight.ndim - 2)


@lowering("aten.conv_transpose1d.default", "aten.conv_transpose2d.input",
          "aten.conv_transpose3d.input", keep_whole=True)
def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    y = conv_transpose_nd(input, weight, stride, padding, output_padding, groups, dilation)
    return _add_channel_bias(y, bias, weight.ndim - 2)
