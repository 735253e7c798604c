"""Random model skeletons for the fuzz tests (tests/test_fuzz.py).

A *skeleton* is a hashable description of an architecture: the input kind (dense features,
1-d or 2-d images), a list of blocks and a head. Each block is one of

* ``("lin", width, act, bias, bn)``: Linear (+ BatchNorm1d) + activation (dense inputs);
* ``("conv", out_ch, k, stride, pad, dil, groups, act, bias, bn)``: Conv1d/2d (+ BatchNorm) +
  activation; ``k``, ``stride``, ``pad``, ``dil`` hold one value per spatial axis;
* ``("pool", "max"|"avg", k, stride, pad, ceil)``: MaxPool/AvgPool 1d/2d (per-axis values);
* ``("res", inner, sign)``: ``x + inner(x)`` or ``x - inner(x)`` (inner keeps the shape);
* ``("cat", a, b)``: ``torch.cat([a(x), b(x)], dim=1)``;

and the head is ``(reduce, n_out, bias, act)``: flatten, ``mean`` over the spatial axes or an
adaptive average pool to 1, then Linear(n_out) and an optional output activation.
Activations: relu, tanh, sigmoid, identity, gelu, leaky_relu (softmax too, for heads).

A skeleton is exported and compiled once (:func:`compiled`); weights, batch-norm statistics and
inputs are drawn per example and swapped into the compiled relevance function.

:func:`unit_data` recomputes, from the IR forward values, the contribution masses of every unit
that can absorb or lose relevance (dense/conv output elements, adds, average-pool windows, means):
P (positive mass), N (negative mass) and the bias b. The fuzz tests use them for an exact
relevance budget (see test_fuzz.py).
"""

from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
from hypothesis import strategies as st

import dlbjax
from dlbjax.lowerings import windows as _windows
from dlbjax.ir import substitute
from dlbjax.lowerings import call_lowering
from dlbjax.lowerings import LOWERINGS
from dlbjax.lowerings.pooling import pool_table

ACTS = ("relu", "tanh", "sigmoid", "identity", "gelu", "leaky_relu")
HEAD_ACTS = ("identity", "relu", "tanh", "sigmoid", "softmax")
# spec §2.2 canonical activation table: (lower, upper) bounds of the entries that gate
GATE_BOUNDS = {"aten.relu.default": (0.0, None), "aten.tanh.default": (-2.0, 2.0),
               "aten.sigmoid.default": (-4.0, 4.0), "aten.softmax.int": (-1.0, 2.0),
               "aten._softmax.default": (-1.0, 2.0)}


# ------------------------------------------------------------------------------------------------
# torch modules
# ------------------------------------------------------------------------------------------------
def make_act(name):
    return {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "identity": nn.Identity(),
            "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.1), "softmax": nn.Softmax(dim=-1)}[name]


def conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out(n, k, s, p, ceil):
    if n + 2 * p < k:
        return 0
    if not ceil:
        return (n + 2 * p - k) // s + 1
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


def out_shape(block, shape):
    """The per-example shape (no batch axis) after ``block``."""
    kind = block[0]
    if kind == "lin":
        return (block[1],)
    if kind == "conv":
        _, oc, k, s, p, d = block[:6]
        return (oc,) + tuple(conv_out(n, *a) for n, a in zip(shape[1:], zip(k, s, p, d)))
    if kind == "pool":
        _, _, k, s, p, ceil = block
        return (shape[0],) + tuple(pool_out(n, kk, ss, pp, ceil)
                                   for n, kk, ss, pp in zip(shape[1:], k, s, p))
    if kind == "res":
        return shape
    if kind == "cat":
        a, b = out_shape(block[1], shape), out_shape(block[2], shape)
        return (a[0] + b[0],) + a[1:]
    raise ValueError(block)


class Unit(nn.Module):
    """Linear or Conv, optional batch norm, activation."""

    def __init__(self, block, shape):
        super().__init__()
        nd = len(shape) - 1
        if block[0] == "lin":
            _, width, act, bias, bn = block
            self.layer = nn.Linear(shape[0], width, bias=bias)
            self.bn = nn.BatchNorm1d(width) if bn else None
        else:
            _, oc, k, s, p, d, g, act, bias, bn = block
            conv = nn.Conv1d if nd == 1 else nn.Conv2d
            self.layer = conv(shape[0], oc, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)
            self.bn = (nn.BatchNorm1d if nd == 1 else nn.BatchNorm2d)(oc) if bn else None
        self.act = make_act(act)

    def forward(self, x):
        h = self.layer(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.act(h)


class Pool(nn.Module):
    def __init__(self, block, shape):
        super().__init__()
        _, kind, k, s, p, ceil = block
        nd = len(shape) - 1
        cls = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("avg", 1): nn.AvgPool1d,
               ("avg", 2): nn.AvgPool2d}[kind, nd]
        self.pool = cls(k, stride=s, padding=p, ceil_mode=ceil)

    def forward(self, x):
        return self.pool(x)


class Res(nn.Module):
    def __init__(self, block, shape):
        super().__init__()
        self.inner = make_block(block[1], shape)
        self.sign = block[2]

    def forward(self, x):
        return x + self.inner(x) if self.sign > 0 else x - self.inner(x)


class Cat(nn.Module):
    def __init__(self, block, shape):
        super().__init__()
        self.a = make_block(block[1], shape)
        self.b = make_block(block[2], shape)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def make_block(block, shape):
    return {"lin": Unit, "conv": Unit, "pool": Pool, "res": Res, "cat": Cat}[block[0]](block, shape)


class FuzzNet(nn.Module):
    def __init__(self, skeleton):
        super().__init__()
        kind, shape, blocks, head = skeleton
        mods = []
        for b in blocks:
            mods.append(make_block(b, shape))
            shape = out_shape(b, shape)
        self.blocks = nn.ModuleList(mods)
        reduce, n_out, bias, act = head
        self.reduce = reduce
        self.nd = len(shape) - 1
        if reduce == "adaptive" and self.nd > 0:
            self.gap = (nn.AdaptiveAvgPool1d if self.nd == 1 else nn.AdaptiveAvgPool2d)(1)
        features = shape[0] if reduce in ("mean", "adaptive") and self.nd > 0 else math.prod(shape)
        self.fc = nn.Linear(features, n_out, bias=bias)
        self.out_act = make_act(act)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.nd > 0:
            if self.reduce == "mean":
                x = x.mean(dim=tuple(range(2, 2 + self.nd)))
            elif self.reduce == "adaptive":
                x = torch.flatten(self.gap(x), 1)
            else:
                x = torch.flatten(x, 1)
        return self.out_act(self.fc(x))


# ------------------------------------------------------------------------------------------------
# Skeleton strategies
# ------------------------------------------------------------------------------------------------
def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def lin_blocks(draw, shape, width=None):
    w = width if width is not None else draw(st.integers(1, 8))
    return ("lin", w, draw(st.sampled_from(ACTS)), draw(st.booleans()), draw(st.booleans()))


@st.composite
def conv_blocks(draw, shape, same=False, out_ch=None):
    nd = len(shape) - 1
    cin = shape[0]
    oc = out_ch if out_ch is not None else draw(st.integers(1, 6))
    common = [g for g in _divisors(cin) if oc % g == 0]
    g = draw(st.sampled_from(common))  # groups divide both channel counts
    k, s, p, d = [], [], [], []
    for n in shape[1:]:
        if same:
            kk = draw(st.sampled_from([1, 3]))
            dd = draw(st.integers(1, 2))
            ss, pp = 1, dd * (kk // 2)
        else:
            kk, ss, pp, dd = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2)),
                              draw(st.integers(1, 2)))
            if conv_out(n, kk, ss, pp, dd) < 1:
                kk, ss, pp, dd = 1, 1, 0, 1
        k.append(kk), s.append(ss), p.append(pp), d.append(dd)
    return ("conv", oc, tuple(k), tuple(s), tuple(p), tuple(d), g, draw(st.sampled_from(ACTS)),
            draw(st.booleans()), draw(st.booleans()))


@st.composite
def pool_blocks(draw, shape):
    kind = draw(st.sampled_from(["max", "avg"]))
    ceil = draw(st.booleans())
    k, s, p = [], [], []
    for n in shape[1:]:
        kk = draw(st.integers(1, 3))
        ss = draw(st.integers(1, 3))
        pp = draw(st.integers(0, kk // 2))
        if pool_out(n, kk, ss, pp, ceil) < 1:
            kk, ss, pp = 1, 1, 0
        k.append(kk), s.append(ss), p.append(pp)
    return ("pool", kind, tuple(k), tuple(s), tuple(p), ceil)


@st.composite
def blocks_for(draw, shape):
    dense = len(shape) == 1
    kind = draw(st.sampled_from(["unit", "res", "cat"] + ([] if dense else ["pool"])))
    if kind == "unit":
        return draw(lin_blocks(shape) if dense else conv_blocks(shape))
    if kind == "pool":
        return draw(pool_blocks(shape))
    if kind == "res":
        inner = draw(lin_blocks(shape, width=shape[0]) if dense
                     else conv_blocks(shape, same=True, out_ch=shape[0]))
        return ("res", inner, draw(st.sampled_from([1, -1])))
    branch = (lambda: lin_blocks(shape)) if dense else (lambda: conv_blocks(shape, same=True))
    return ("cat", draw(branch()), draw(branch()))


@st.composite
def skeletons(draw):
    """Any architecture of the family (the long profile draws from this)."""
    kind = draw(st.sampled_from(["dense", "conv1d", "conv2d"]))
    if kind == "dense":
        shape = (draw(st.integers(1, 8)),)
    elif kind == "conv1d":
        shape = (draw(st.integers(1, 4)), draw(st.integers(3, 12)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    first = shape
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        b = draw(blocks_for(shape))
        blocks.append(b)
        shape = out_shape(b, shape)
    reduce = "flatten" if kind == "dense" else draw(st.sampled_from(["flatten", "mean", "adaptive"]))
    head = (reduce, draw(st.integers(1, 4)), draw(st.booleans()), draw(st.sampled_from(HEAD_ACTS)))
    return (kind, first, tuple(blocks), head)


# Fixed skeletons for CI: together they cover every block type, activation, pool, conv option,
# batch norm, residual add and subtract, concatenation and head, with and without biases.
# (Exporting and compiling dominates the cost, so CI uses few, feature-dense skeletons.)
CI_SKELETONS = (
    ("dense", (6,), (
        ("lin", 8, "relu", True, False),
        ("res", ("lin", 8, "tanh", True, True), 1),
        ("cat", ("lin", 3, "sigmoid", True, False), ("lin", 4, "gelu", False, False)),
        ("lin", 5, "leaky_relu", True, False),
    ), ("flatten", 3, True, "identity")),
    ("dense", (5,), (  # bias-free ReLU / ungated: the conservation setting of spec §2.4
        ("lin", 6, "relu", False, False),
        ("res", ("lin", 6, "relu", False, False), -1),
        ("cat", ("lin", 4, "identity", False, False), ("lin", 3, "relu", False, False)),
    ), ("flatten", 4, False, "identity")),
    ("conv2d", (2, 7, 6), (
        ("conv", 4, (3, 2), (1, 2), (1, 0), (1, 1), 2, "relu", True, True),
        ("pool", "max", (2, 3), (2, 1), (1, 1), True),
        ("res", ("conv", 4, (3, 3), (1, 1), (2, 2), (2, 2), 4, "sigmoid", True, False), 1),
        ("cat", ("conv", 2, (1, 1), (1, 1), (0, 0), (1, 1), 1, "tanh", False, False),
         ("conv", 2, (3, 3), (1, 1), (1, 1), (1, 1), 2, "gelu", True, True)),
        ("pool", "avg", (2, 2), (1, 2), (1, 0), False),
    ), ("adaptive", 3, True, "softmax")),
    ("conv1d", (3, 10), (  # bias-free, ungated activations, batch norm (identity), relu head
        ("conv", 6, (3,), (2,), (1,), (1,), 3, "gelu", False, True),
        ("cat", ("conv", 2, (3,), (1,), (2,), (2,), 2, "identity", False, False),
         ("conv", 3, (1,), (1,), (0,), (1,), 1, "leaky_relu", False, False)),
        ("pool", "max", (3,), (2,), (1,), True),
        ("res", ("conv", 5, (3,), (1,), (1,), (1,), 1, "relu", False, False), -1),
        ("pool", "avg", (2,), (1,), (1,), False),
    ), ("mean", 3, False, "relu")),
)
# skeletons whose examples also run the eager (un-jitted) pass in CI; its first call compiles every
# primitive separately (5-20 s per skeleton on two cores), so CI does it for one dense and one
# conv skeleton (the long profile does it for all)
CI_EAGER = (CI_SKELETONS[0], CI_SKELETONS[2])


# ------------------------------------------------------------------------------------------------
# Compilation (once per skeleton and mode)
# ------------------------------------------------------------------------------------------------
def build(skeleton):
    torch.manual_seed(0)
    return FuzzNet(skeleton).eval()


class Compiled:
    """One skeleton exported and compiled in one mode.

    ``f``: the relevance function of one row (eager); ``jit_f``: it jitted; ``batched``: jitted
    vmap over rows of (relevance, unit data)."""

    def __init__(self, skeleton, mode):
        self.skeleton = skeleton
        self.model = build(skeleton)
        x = torch.zeros((1,) + tuple(skeleton[1]))
        self.ex = dlbjax.Explainer(self.model, x, mode=mode, layers=True, task="classification")
        self.f = self.ex.relevance_function()
        self.jit_f = jax.jit(self.f)
        units = unit_data_fn(self.ex.program)

        def both(consts, x_row, seeds_row):
            return self.f(consts, (x_row,), seeds_row), units(consts, (x_row,))

        self.batched = jax.jit(jax.vmap(both, in_axes=(None, 0, 0)))
        self.gates = gate_bounds(self.ex.program)
        self.out_shape = tuple(self.ex.program.outputs[0].shape)


@lru_cache(maxsize=16)  # the long profile draws many skeletons; keep memory bounded
def compiled(skeleton, mode):
    return Compiled(skeleton, mode)


# ------------------------------------------------------------------------------------------------
# Unit data: contribution masses of every unit that can absorb or lose relevance
# ------------------------------------------------------------------------------------------------
AFFINE = {"aten.linear.default", "aten.conv1d.default", "aten.conv2d.default"}
POOLS = {"aten.avg_pool1d.default", "aten.avg_pool2d.default", "aten.adaptive_avg_pool1d.default",
         "aten.adaptive_avg_pool2d.default", "aten.mean.dim"}
ADDS = {"aten.add.Tensor", "aten.sub.Tensor"}
MAX_POOLS = {"aten.max_pool1d.default": 1, "aten.max_pool2d.default": 2,
             "aten.max_pool1d_with_indices.default": 1, "aten.max_pool2d_with_indices.default": 2}
LOSSLESS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
            "aten.cat.default", "aten.relu.default", "aten.tanh.default", "aten.sigmoid.default",
            "aten.gelu.default", "aten.leaky_relu.default", "aten.softmax.int",
            "aten._softmax.default", "aten._native_batch_norm_legit_no_training.default",
            "aten.clone.default", "aten.alias.default", "aten.squeeze.dims", "aten.unsqueeze.default",
            "aten.permute.default", "aten.flatten.using_ints"} | set(MAX_POOLS)
TIE_RTOL = 1e-5  # window values this close to the maximum (but not equal) are near-ties


def _relu(x):
    return jnp.maximum(x, 0)


def unit_data_fn(program):
    """A function (consts, inputs) -> ({output var name: (P, N, b)} for every lossy op,
    {max-pool output var name: near-tie mask}).

    A max-pool window is a near-tie when another cell is within TIE_RTOL of the maximum without
    being equal: which cell wins (spec §8.6) then depends on the last bits of the forward values,
    which may differ between two compilations (jit vs eager, vmap vs a loop)."""
    unknown = {e.op for e in program.eqns} - AFFINE - POOLS - ADDS - LOSSLESS
    if unknown:
        raise AssertionError(f"fuzz accounting does not know the ops {sorted(unknown)}")
    const_names = {c.name for c in program.constants}

    def fn(consts, inputs):
        env = dict(zip(program.inputs, inputs))
        for c in program.constants:
            env[c] = consts[c.name]
        data, ties = {}, {}
        for eqn in program.eqns:
            args = substitute(eqn.args, env)
            kwargs = substitute(eqn.kwargs, env)
            outs = call_lowering(eqn, args, kwargs)
            for v, o in zip(eqn.outputs, outs):
                env[v] = o
            lower = LOWERINGS[eqn.op]
            if eqn.op in MAX_POOLS:
                x, pargs = args[0], list(args[1:]) + [None] * 5
                k, st, pad, dil, ceil = pargs[:5]
                table = pool_table(MAX_POOLS[eqn.op], x.shape, k, st if st is not None else (),
                                   pad if pad is not None else 0, dil if dil is not None else 1,
                                   bool(ceil))
                win = _windows.gather_windows(x, table, -jnp.inf)
                top = jnp.max(win, axis=-1, keepdims=True)
                valid = jnp.asarray(table >= 0)
                close = jnp.abs(win - top) <= TIE_RTOL * jnp.maximum(jnp.abs(top), 1e-30)
                ties[eqn.outputs[0].name] = jnp.any(valid & close & (win != top), axis=-1)
                continue
            if eqn.op in AFFINE:
                x, w = args[0], args[1]
                b = args[2] if len(args) > 2 else None
                rest = tuple(args[3:])
                xp, xn, wp, wn = _relu(x), _relu(-x), _relu(w), _relu(-w)
                P = lower(xp, wp, None, *rest) + lower(xn, wn, None, *rest)
                N = lower(xp, wn, None, *rest) + lower(xn, wp, None, *rest)
                bias = jnp.zeros_like(P) if b is None else lower(jnp.zeros_like(x), jnp.zeros_like(w),
                                                                 b, *rest)
            elif eqn.op in POOLS:
                x, rest = args[0], tuple(args[1:])
                P = lower(_relu(x), *rest, **kwargs)
                N = lower(_relu(-x), *rest, **kwargs)
                bias = jnp.zeros_like(P)
            elif eqn.op in ADDS:
                assert all(a.name not in const_names for a in eqn.args[:2]), eqn
                alpha = kwargs.get("alpha", 1)
                a, b = args[0], args[1] * alpha * (-1 if eqn.op == "aten.sub.Tensor" else 1)
                P, N, bias = _relu(a) + _relu(b), _relu(-a) + _relu(-b), jnp.zeros_like(a)
            else:
                continue
            data[eqn.outputs[0].name] = (P, N, bias)
        return data, ties

    return fn


def gate_bounds(program):
    """{affine output var name: (lower, upper)} for dense/conv ops gated by the activation that
    directly and solely consumes them (spec §8.1; GELU and leaky ReLU gate nothing, §9.6)."""
    consumers = program.consumers()
    out = {}
    for eqn in program.eqns:
        if eqn.op not in AFFINE:
            continue
        v = eqn.outputs[0]
        uses = consumers.get(v, [])
        if len(uses) == 1 and v not in program.outputs and uses[0].op in GATE_BOUNDS:
            out[v.name] = GATE_BOUNDS[uses[0].op]
    return out


# ------------------------------------------------------------------------------------------------
# Random weights and inputs
# ------------------------------------------------------------------------------------------------
WEIGHT_MODES = ("normal", "sparse", "all_zero", "all_negative", "all_positive", "tiny", "large")
BIAS_MODES = ("normal", "zero", "all_negative", "sparse")
INPUT_SCALES = (1.0, 0.0, 1e-6, 1e6, "mixed", 1e-3, 1e3)


def random_constants(ex, rng, weight_modes, bias_modes):
    """New values for every parameter and batch-norm statistic, one mode per tensor."""
    consts = dict(ex.constants)
    wi = bi = 0
    for name, kind in ex.program.const_kinds.items():
        value = consts[name]
        if not jnp.issubdtype(value.dtype, jnp.floating):
            continue
        shape = value.shape
        if ".bn." in f".{name}":
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                v = rng.uniform(1e-3, 4.0, size=shape)
            elif leaf == "running_mean":
                v = rng.normal(size=shape)
            elif leaf == "weight":  # gamma: negative and zero scales included
                v = rng.normal(size=shape)
                v[rng.random(shape) < 0.2] = 0.0
            else:
                v = rng.normal(size=shape) * 0.5
        elif name.endswith("bias"):
            mode = bias_modes[bi % len(bias_modes)]
            bi += 1
            v = rng.normal(size=shape) * 0.5
            if mode == "zero":
                v[:] = 0.0
            elif mode == "all_negative":
                v = -np.abs(v)
            elif mode == "sparse":
                v[rng.random(shape) < 0.5] = 0.0
        else:
            mode = weight_modes[wi % len(weight_modes)]
            wi += 1
            v = rng.normal(size=shape)
            if mode == "sparse":
                v[rng.random(shape) < 0.5] = 0.0
            elif mode == "all_zero":
                v[:] = 0.0
            elif mode == "all_negative":
                v = -np.abs(v)
            elif mode == "all_positive":
                v = np.abs(v)
            elif mode == "tiny":
                v *= 1e-3
            elif mode == "large":
                v *= 10.0
        consts[name] = jnp.asarray(v, value.dtype)
    return consts


def random_rows(shape, rng, scales, zero_fracs):
    """One input row per entry of ``scales`` (shape [rows, 1, *shape])."""
    rows = []
    for scale, zf in zip(scales, zero_fracs):
        x = rng.normal(size=(1,) + tuple(shape))
        if scale == "mixed":
            x *= rng.choice([1e-6, 1.0, 1e6], size=x.shape)
        else:
            x *= scale
        x[rng.random(x.shape) < zf] = 0.0
        rows.append(x)
    return np.stack(rows).astype(np.float32)
