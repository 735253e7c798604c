"""Forward of activations and element-wise arithmetic, comparisons and logic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dlbjax._dtypes import jnp_dtype

from ._common import _axis
from ._table import Kind, lowering, register_lowering



# ------------------------------------------------------------------------------------------------
# Activations and elementwise math
# ------------------------------------------------------------------------------------------------
def _unary(name, fn, **facts):
    register_lowering(name, fn, **facts)


_unary("aten.relu.default", jax.nn.relu)
_unary("aten.sigmoid.default", jax.nn.sigmoid, kinds=Kind.SIGMOID)
_unary("aten.tanh.default", jnp.tanh)
_unary("aten.silu.default", jax.nn.silu, keep_whole=True)
_unary("aten.exp.default", jnp.exp)
_unary("aten.log.default", jnp.log)
_unary("aten.sqrt.default", jnp.sqrt)
_unary("aten.rsqrt.default", lax.rsqrt, kinds=Kind.STATISTIC)
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
_unary("aten.log_sigmoid.default", jax.nn.log_sigmoid, keep_whole=True)
_unary("aten.mish.default", lambda x: x * jnp.tanh(jax.nn.softplus(x)), keep_whole=True)
_unary("aten.hardswish.default", lambda x: x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0,
       keep_whole=True)
_unary("aten.hardsigmoid.default", lambda x: jnp.clip(x + 3.0, 0.0, 6.0) / 6.0, keep_whole=True)
_unary("aten.relu6.default", lambda x: jnp.clip(x, 0.0, 6.0), keep_whole=True)


@lowering("aten.hardtanh.default", keep_whole=True)
def hardtanh(self, min_val=-1.0, max_val=1.0):
    return jnp.clip(self, min_val, max_val)


@lowering("aten.gelu.default")
def gelu(self, *, approximate="none"):
    return jax.nn.gelu(self, approximate=(approximate == "tanh"))


@lowering("aten.leaky_relu.default", keep_whole=True)
def leaky_relu(self, negative_slope=0.01):
    return jnp.where(self > 0, self, self * negative_slope)


@lowering("aten.elu.default", keep_whole=True)
def elu(self, alpha=1.0, scale=1.0, input_scale=1.0):
    # torch: x > 0 ? scale * x : scale * alpha * (exp(input_scale * x) - 1); input_scale only
    # enters the negative branch.
    return scale * jnp.where(self > 0, self, alpha * jnp.expm1(self * input_scale))


@lowering("aten.selu.default", keep_whole=True)
def selu(self):
    return jax.nn.selu(self)


@lowering("aten.celu.default", keep_whole=True)
def celu(self, alpha=1.0):
    return jnp.where(self > 0, self, alpha * jnp.expm1(self / alpha))


@lowering("aten.softplus.default", keep_whole=True)
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


@lowering("aten._softmax.default", kinds=Kind.SOFTMAX)
def _softmax(self, dim, half_to_float=False):
    return jax.nn.softmax(self, axis=_axis(dim, self.ndim))


@lowering("aten.softmax.int", keep_whole=True, kinds=Kind.SOFTMAX)
def softmax(self, dim, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jax.nn.softmax(x, axis=_axis(dim, x.ndim))


@lowering("aten._log_softmax.default")
def _log_softmax(self, dim, half_to_float=False):
    return jax.nn.log_softmax(self, axis=_axis(dim, self.ndim))


@lowering("aten.log_softmax.int", keep_whole=True)
def log_softmax(self, dim, dtype=None):
    x = self if dtype is None else self.astype(jnp_dtype(dtype))
    return jax.nn.log_softmax(x, axis=_axis(dim, x.ndim))


# binary arithmetic -----------------------------------------------------------------------------
@lowering("aten.add.Tensor", "aten.add.Scalar")
def add(self, other, alpha=1):
    return self + (other if alpha == 1 else alpha * other)


@lowering("aten.sub.Tensor", "aten.sub.Scalar", kinds=Kind.SUBTRACT)
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


@lowering("aten.fmod.Tensor", "aten.fmod.Scalar")
def fmod(self, other):
    """C's fmod: the remainder takes the sign of the dividend (remainder: of the divisor)."""
    return jnp.fmod(self, other)


@lowering("aten.maximum.default")
def maximum(self, other):
    return jnp.maximum(self, other)


@lowering("aten.minimum.default")
def minimum(self, other):
    return jnp.minimum(self, other)


for _name, _fn in [("eq", jnp.equal), ("ne", jnp.not_equal), ("lt", jnp.less), ("le", jnp.less_equal),
                   ("gt", jnp.greater), ("ge", jnp.greater_equal)]:
    register_lowering(f"aten.{_name}.Tensor", _fn)
    register_lowering(f"aten.{_name}.Scalar", _fn)

for _name, _fn in [("logical_and", jnp.logical_and), ("logical_or", jnp.logical_or),
                   ("logical_xor", jnp.logical_xor), ("bitwise_and", jnp.bitwise_and),
                   ("bitwise_or", jnp.bitwise_or), ("bitwise_xor", jnp.bitwise_xor)]:
    register_lowering(f"aten.{_name}.default", _fn)
    register_lowering(f"aten.{_name}.Tensor", _fn)
    register_lowering(f"aten.{_name}.Scalar", _fn)
register_lowering("aten.logical_not.default", jnp.logical_not)
register_lowering("aten.bitwise_not.default", jnp.bitwise_not)
register_lowering("aten.isnan.default", jnp.isnan)
register_lowering("aten.isinf.default", jnp.isinf)
