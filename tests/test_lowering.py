"""OpInfo-style checks of every entry of ``dlbjax.lowerings.LOWERINGS`` against PyTorch.

Each case names an ATen overload and its arguments in ATen's order and names. The same arguments
are given to ``torch.ops.aten.<op>.<overload>`` (numpy arrays -> tensors) and to the JAX lowering
(numpy arrays -> ``jnp`` arrays, ``torch.dtype`` -> dtype name, exactly what the importer hands the
interpreter). The lowering's result is cast to torch's dtype as ``dlbjax.lowerings.call_lowering``
does, and then compared: shapes must match exactly, float values to a max abs error of 1e-5 relative
to max |ref|, integer and bool values (indices included) exactly. Inputs come from a seeded numpy
RNG; ops that return indices get inputs without ties.

``test_every_lowering_is_tested`` fails listing any entry of LOWERINGS without a case here.
"""

from __future__ import annotations

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dlbjax  # noqa: F401  (registers the lowerings that live outside _lowering.py)
from dlbjax._dtypes import jnp_dtype
from dlbjax.lowerings import LOWERINGS

RTOL = 1e-5
BIG = 9223372036854775807  # what torch.export records for an open-ended slice

RNG = np.random.default_rng(20240601)

# Overloads that torch does not define (the lowering table registers them for robustness). Each is
# compared against the torch overload with the same semantics.
REF_ALIASES = {
    "aten._adaptive_avg_pool1d.default": "aten.adaptive_avg_pool1d.default",
    "aten.bitwise_and.default": "aten.bitwise_and.Tensor",
    "aten.bitwise_or.default": "aten.bitwise_or.Tensor",
    "aten.bitwise_xor.default": "aten.bitwise_xor.Tensor",
    "aten.logical_and.Tensor": "aten.logical_and.default",
    "aten.logical_or.Tensor": "aten.logical_or.default",
    "aten.logical_xor.Tensor": "aten.logical_xor.default",
    "aten.logical_and.Scalar": "aten.logical_and.default",
    "aten.logical_or.Scalar": "aten.logical_or.default",
    "aten.logical_xor.Scalar": "aten.logical_xor.default",
}

# Entries of LOWERINGS that cannot be checked against torch, each with the reason. Keep this short:
# uninitialised creation ops (empty*) are still checked for shape and dtype below.
UNTESTABLE: dict[str, str] = {
    # Not an ATen op: the interpreter's forward of a fused element-wise module (dlbjax/_fuse.py),
    # which replays the module's own recorded equations; each of those is tested here on its own.
    "dlbjax.fused": "no torch counterpart; runs other lowerings (tested with the fusion pass)",
}


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def positive(*shape):
    return RNG.uniform(0.1, 3.0, shape).astype(np.float32)


def away_from_zero(*shape):
    x = RNG.uniform(0.2, 3.0, shape) * RNG.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


def distinct(*shape):
    """Values with no ties (for ops that return indices)."""
    n = int(np.prod(shape))
    return ((RNG.permutation(n) - n / 2) / n * 4).astype(np.float32).reshape(shape)


def randint(lo, hi, *shape):
    return RNG.integers(lo, hi, shape).astype(np.int64)


def randbool(*shape):
    return RNG.random(shape) < 0.5


def special(*shape):
    """Normal values with NaN, +-inf and zeros mixed in."""
    x = randn(*shape).reshape(-1)
    x[:4] = [np.nan, np.inf, -np.inf, 0.0]
    return RNG.permutation(x).reshape(shape).astype(np.float32)


def halves(*shape):
    """Values on and near the .5 boundaries (round-half-to-even) and integers."""
    base = RNG.integers(-5, 5, shape) + RNG.choice([0.0, 0.5, 0.25, 0.75, -0.5], shape)
    return base.astype(np.float32)


def scalar_array(v, dtype=np.float32):
    return np.asarray(v, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Cases and the harness
# ------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, op, *args, values=True, xfail=None, **kwargs):
        self.op = op
        self.args = args
        self.kwargs = kwargs
        # True: compare every output's values; False: shapes and dtypes only (uninitialised
        # memory); a tuple: the values of just those outputs (the rest: torch bookkeeping)
        self.values = values
        self.xfail = xfail  # a known divergence from torch: the reason (a strict xfail)

    def __repr__(self):
        def short(a):
            if isinstance(a, np.ndarray):
                return f"{a.dtype.name}{list(a.shape)}"
            if isinstance(a, (list, tuple)):
                inner = ",".join(short(x) for x in a)
                return f"[{inner}]" if isinstance(a, list) else f"({inner})"
            if isinstance(a, torch.dtype):
                return str(a).replace("torch.", "")
            if isinstance(a, int) and a == BIG:
                return "BIG"
            return repr(a)

        parts = [short(a) for a in self.args] + [f"{k}={short(v)}" for k, v in self.kwargs.items()]
        return f"{self.op.removeprefix('aten.')}({', '.join(parts)})"


def params(cases):
    ids, seen = [], {}
    for c in cases:
        base = repr(c)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return [pytest.param(c, id=i, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)]
                         if c.xfail else []) for c, i in zip(cases, ids)]


def resolve(name):
    ns, op, overload = (name.split(".") + ["", ""])[:3]
    if ns not in ("aten", "dlbjax"):  # dlbjax: torch custom ops of dlbjax.importers
        return None
    packet = getattr(getattr(torch.ops, ns), op, None)
    if packet is None or overload not in packet.overloads():
        return None
    return getattr(packet, overload)


def to_torch(a):
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a.copy())
    if isinstance(a, list):
        return [to_torch(x) for x in a]
    if isinstance(a, tuple):
        return tuple(to_torch(x) for x in a)
    if isinstance(a, dict):
        return {k: to_torch(v) for k, v in a.items()}
    return a


def to_jax(a):
    if isinstance(a, np.ndarray):
        # int64 -> int32 without x64. Cast in numpy and device_put: jnp.asarray would compile a
        # conversion/copy per shape, and XLA compilations are what this file spends its time on.
        return jax.device_put(a.astype(jnp_dtype(a.dtype.name)))
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, list):
        return [to_jax(x) for x in a]
    if isinstance(a, tuple):
        return tuple(to_jax(x) for x in a)
    if isinstance(a, dict):
        return {k: to_jax(v) for k, v in a.items()}
    return a


def compare(expected, got, values=True, where="output"):
    if isinstance(expected, (tuple, list)):
        assert isinstance(got, tuple), f"{where}: want a tuple of {len(expected)}, got {type(got)}"
        assert len(got) == len(expected), f"{where}: {len(got)} outputs, torch has {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            v = (i in values) if isinstance(values, tuple) else values
            compare(e, g, v, f"{where}[{i}]")
        return
    assert isinstance(expected, torch.Tensor)
    assert isinstance(got, jax.Array), f"{where}: a {type(got).__name__}, not an array"
    assert tuple(got.shape) == tuple(expected.shape), (
        f"{where}: shape {tuple(got.shape)} != torch {tuple(expected.shape)}")
    want = jnp_dtype(str(expected.dtype).replace("torch.", ""))
    got = np.asarray(got).astype(want)  # the interpreter's cast (done in numpy: no XLA compile)
    if not values:
        return
    ref = expected.detach().numpy()
    if ref.dtype.kind == "f":
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        nan_r, nan_g = np.isnan(ref64), np.isnan(got64)
        np.testing.assert_array_equal(nan_g, nan_r, err_msg=f"{where}: NaN positions differ")
        inf_r = np.isinf(ref64)
        np.testing.assert_array_equal(got64[inf_r], ref64[inf_r], err_msg=f"{where}: inf differ")
        finite = ~(nan_r | inf_r)
        if not finite.any():
            return
        err = np.max(np.abs(got64[finite] - ref64[finite]))
        scale = max(np.max(np.abs(ref64[finite])), np.finfo(np.float32).tiny)
        assert err <= RTOL * scale, f"{where}: max abs err {err:.3g} vs max |ref| {scale:.3g}"
    else:
        np.testing.assert_array_equal(got.astype(ref.dtype), ref, err_msg=where)


def traced_shapes(fn, args, kwargs):
    """The lowering's output shapes/dtypes when traced abstractly, as under the interpreter's jit
    (catches Python control flow on array values; costs no XLA compilation)."""
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=lambda v: v is None)
    where = [i for i, v in enumerate(leaves) if isinstance(v, jax.Array)]

    def call(*arrays):
        filled = list(leaves)
        for i, a in zip(where, arrays):
            filled[i] = a
        a, k = jax.tree_util.tree_unflatten(tree, filled)
        return fn(*a, **k)

    return jax.eval_shape(call, *[leaves[i] for i in where])


def run_case(case: Case):
    fn = LOWERINGS[case.op]
    reference = resolve(case.op) or resolve(REF_ALIASES[case.op])
    expected = reference(*to_torch(case.args), **to_torch(case.kwargs))
    args, kwargs = to_jax(case.args), to_jax(case.kwargs)
    got = fn(*args, **kwargs)
    compare(expected, got, case.values)
    eager = jax.tree_util.tree_map(lambda v: (tuple(v.shape), v.dtype), got)
    traced = jax.tree_util.tree_map(lambda v: (tuple(v.shape), v.dtype),
                                    traced_shapes(fn, args, kwargs))
    assert traced == eager, f"traced {traced} != eager {eager}"


ALL_CASES: list[Case] = []


def group(cases):
    ALL_CASES.extend(cases)
    return params(cases)


# ------------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------------
LINALG = [
    Case("aten.linear.default", randn(4, 5), randn(3, 5), randn(3)),
    Case("aten.linear.default", randn(2, 3, 5), randn(3, 5)),
    Case("aten.linear.default", randn(5), randn(3, 5), randn(3)),
    Case("aten.addmm.default", randn(3), randn(4, 5), randn(5, 3)),
    Case("aten.addmm.default", randn(4, 3), randn(4, 5), randn(5, 3), beta=0.5, alpha=2.0),
    # beta=0: torch ignores self, so its NaNs must not propagate
    Case("aten.addmm.default", np.full((4, 3), np.nan, np.float32), randn(4, 5), randn(5, 3),
         beta=0),
    Case("aten.mm.default", randn(4, 5), randn(5, 3)),
    Case("aten.bmm.default", randn(2, 4, 5), randn(2, 5, 3)),
    Case("aten.matmul.default", randn(2, 1, 4, 5), randn(3, 5, 2)),
    Case("aten.matmul.default", randn(5), randn(2, 5, 3)),
    Case("aten.matmul.default", randn(2, 4, 5), randn(5)),
    Case("aten.matmul.default", randn(5), randn(5)),
    Case("aten.t.default", randn(3, 4)),
    Case("aten.t.default", randn(3)),
]


@pytest.mark.parametrize("case", group(LINALG))
def test_linalg(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------------
def _ints(v, nd):
    """torch's conv overloads want int lists (SymInt[n]); the lowerings accept both."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * nd


def _conv_cases():
    cases = []
    sp = {1: (9,), 2: (7, 6), 3: (5, 6, 4)}
    for nd in (1, 2, 3):
        op = f"aten.conv{nd}d.default"
        size = sp[nd]
        k = (3,) * nd
        # (cin, cout, groups, stride, padding, dilation, bias)
        configs = [
            (2, 3, 1, 1, 0, 1, True),
            (2, 3, 1, 2, 1, 1, False),
            (4, 6, 2, 1, 1, 2, True),
            (3, 3, 3, 1, 1, 1, True),  # depthwise
            (2, 6, 2, 2, 2, 1, False),
            (2, 4, 1, [2] * nd, [1] * nd, [1] * nd, True),
        ]
        if nd >= 2:
            configs += [
                (2, 3, 1, [1, 2] + [1] * (nd - 2), [0, 2] + [1] * (nd - 2), [2, 1] + [1] * (nd - 2),
                 True),
                (4, 4, 4, [2, 1] + [2] * (nd - 2), [1, 0] + [0] * (nd - 2), 1, False),
            ]
        # a spread of the combinations per dimensionality (each case costs XLA compilations)
        configs = [configs[i] for i in {1: (1, 2, 4), 2: (0, 2, 3, 5, 6, 7), 3: (3, 6)}[nd]]
        for cin, cout, g, s, p, d, b in configs:
            x = randn(2, cin, *size)
            w = randn(cout, cin // g, *k)
            bias = randn(cout) if b else None
            cases.append(Case(op, x, w, bias, _ints(s, nd), _ints(p, nd), _ints(d, nd), g))
        # defaults only, and unbatched input
        cases.append(Case(op, randn(1, 2, *size), randn(3, 2, *(2,) * nd)))
        cases.append(Case(op, randn(2, *size), randn(3, 2, *k), randn(3), [2] * nd, [1] * nd))
        # string padding overloads
        opp = f"aten.conv{nd}d.padding"
        kk = (4, 3, 2)[:nd]  # an even kernel: torch puts the extra "same" padding on the right
        one = [1] * nd
        cases.append(Case(opp, randn(2, 2, *size), randn(3, 2, *kk), None, one, "same", [2] * nd))
        cases.append(Case(opp, randn(2, 2, *size), randn(3, 2, *k), randn(3), [2] * nd, "valid"))
        if nd == 2:
            cases.append(Case(opp, randn(2, 2, *size), randn(3, 2, *kk), randn(3), one, "same"))
            cases.append(Case(opp, randn(2, 4, *size), randn(4, 2, *k), None, one, "same", one, 2))
            cases.append(Case(opp, randn(2, *size), randn(3, 2, *k), randn(3), one, "same"))
            cases.append(Case(opp, randn(1, 2, *size), randn(3, 2, *k)))  # default "valid"
    # aten.convolution (the core overload), forward and transposed
    for nd in (1, 2):
        size = sp[nd]
        z, o = [0] * nd, [1] * nd
        cases.append(Case("aten.convolution.default", randn(2, 4, *size), randn(6, 2, *(3,) * nd),
                          randn(6), [2] * nd, [1] * nd, [1] * nd, False, z, 2))
        cases.append(Case("aten.convolution.default", randn(2, 3, *size), randn(3, 1, *(3,) * nd),
                          None, o, [2] * nd, [2] * nd, False, z, 3))
        cases.append(Case("aten.convolution.default", randn(2, 4, *size), randn(4, 3, *(3,) * nd),
                          randn(6), [2] * nd, [1] * nd, o, True, [1] * nd, 2))
        cases.append(Case("aten.convolution.default", randn(2, 2, *size), randn(2, 3, *(2,) * nd),
                          None, [3] * nd, [2] * nd, [2] * nd, True, [1] * nd, 1))
    return cases


def _conv_transpose_cases():
    cases = []
    sp = {1: (6,), 2: (4, 5), 3: (3, 4, 3)}
    names = {1: "aten.conv_transpose1d.default", 2: "aten.conv_transpose2d.input",
             3: "aten.conv_transpose3d.input"}
    for nd in (1, 2, 3):
        op, size = names[nd], sp[nd]
        # (cin, cout_per_group, groups, k, stride, padding, output_padding, dilation, bias)
        configs = [
            (2, 3, 1, 3, 1, 0, 0, 1, True),
            (2, 3, 1, 3, 2, 1, 1, 1, True),
            (4, 2, 2, 3, 2, 0, 1, 1, False),
            (3, 1, 3, 3, 3, 1, 2, 1, True),  # depthwise
            (2, 2, 1, 3, 2, 2, 0, 2, True),
            (2, 3, 1, 2, 3, 2, 1, 1, False),  # padding > dilation*(kernel-1): a crop
            (4, 2, 2, 2, 1, 1, 1, 2, True),  # output_padding < dilation with stride 1
        ]
        if nd >= 2:
            configs.append((2, 2, 1, [3, 2] + [2] * (nd - 2), [2, 3] + [1] * (nd - 2),
                            [1, 0] + [0] * (nd - 2), [0, 2] + [0] * (nd - 2),
                            [1, 2] + [1] * (nd - 2), True))
        configs = [configs[i] for i in {1: (4, 5), 2: (1, 2, 3, 5, 6, 7), 3: (2, 7)}[nd]]
        for cin, cg, g, k, s, p, op_, d, b in configs:
            kk = tuple(k) if isinstance(k, list) else (k,) * nd
            x = randn(2, cin, *size)
            w = randn(cin, cg, *kk)
            bias = randn(cg * g) if b else None
            cases.append(Case(op, x, w, bias, _ints(s, nd), _ints(p, nd), _ints(op_, nd), g,
                              _ints(d, nd)))
        cases.append(Case(op, randn(1, 2, *size), randn(2, 3, *(3,) * nd)))  # defaults
        if nd < 3:
            cases.append(Case(op, randn(2, *size), randn(2, 3, *(3,) * nd), randn(3), [2] * nd,
                              [1] * nd, [1] * nd))
    return cases


@pytest.mark.parametrize("case", group(_conv_cases() + _conv_transpose_cases()))
def test_conv(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------------
# (size, kernel, stride, padding, dilation, ceil_mode) per spatial dim; all valid for torch.
_MAX_1D = [
    (8, 2, None, 0, 1, False),
    (9, 3, 2, 1, 1, False),
    (6, 3, 2, 0, 1, True),   # the last ceil window runs off the end
    (7, 2, 3, 1, 1, True),   # ceil correction: the would-be last window starts in the padding
    (10, 3, 2, 1, 2, True),  # dilation with ceil_mode
    (8, 3, 3, 1, 2, False),
    (5, 5, 1, 2, 1, True),
    (11, 4, 3, 2, 1, True),
    (5, 2, 2, 1, 1, True),
]


def _max_pool_cases():
    cases = []
    for size, k, s, p, d, c in [_MAX_1D[i] for i in (1, 2, 3, 4, 7)]:
        stride = [] if s is None else s
        x = distinct(2, 3, size)
        cases.append(Case("aten.max_pool1d_with_indices.default", x, [k], stride, [p], [d], c))
        if c:  # the values-only overload shares the window code: its ceil-mode cases suffice
            cases.append(Case("aten.max_pool1d.default", x, [k], stride, [p], [d], c))
    # per-dimension mixes of the rows above (ceil_mode is one flag: the first row's)
    mixes = {2: [(1, 5), (2, 2), (3, 4)], 3: [(2, 2, 2), (3, 4, 6)]}
    for nd, rows in mixes.items():
        for row in rows:
            combo = [_MAX_1D[r] for r in row]
            ceil = combo[0][5]
            strides = [s for _, _, s, _, _, _ in combo]
            stride = [] if None in strides else strides
            args = ([k for _, k, *_ in combo], stride, [p for _, _, _, p, _, _ in combo],
                    [d for *_, d, _ in combo], ceil)
            x = distinct(2, 2, *[sz for sz, *_ in combo])
            cases.append(Case(f"aten.max_pool{nd}d_with_indices.default", x, *args))
            if ceil:
                cases.append(Case(f"aten.max_pool{nd}d.default", x, *args))
    # scalar kernel / stride / padding, defaults, unbatched
    cases.append(Case("aten.max_pool2d.default", distinct(1, 2, 7, 7), 3, 2, 1))
    cases.append(Case("aten.max_pool2d_with_indices.default", distinct(2, 7, 6), [3, 2], [2, 2],
                      [1, 1], [1, 1], True))
    cases.append(Case("aten.max_pool1d.default", distinct(3, 9), [3], [2], [1], [1], True))
    # NaN and inf propagate like torch
    x = special(2, 2, 6, 6)
    x[0, 0, 0, 0] = np.nan
    cases.append(Case("aten.max_pool2d.default", x, [2, 2], [2, 2]))
    return cases


# (size, kernel, stride, padding, ceil_mode) per spatial dim
_AVG_1D = [
    (8, 2, None, 0, False),
    (9, 3, 2, 1, False),
    (6, 3, 2, 1, True),   # last window: 1 real cell + 1 pad cell (count_include_pad matters)
    (6, 3, 2, 0, True),   # last window runs off the end
    (7, 2, 3, 1, True),   # ceil correction
    (10, 4, 3, 2, True),
    (5, 5, 1, 2, False),
]


def _avg_pool_cases():
    cases = []
    for (size, k, s, p, c), cip in itertools.product(_AVG_1D, (True, False)):
        stride = [] if s is None else [s]
        cases.append(Case("aten.avg_pool1d.default", randn(2, 3, size), [k], stride, [p], c, cip))
    # per-dimension mixes of the rows above (ceil_mode is one flag: the first row's); each with
    # count_include_pad True and False and a divisor_override
    mixes = {2: [(1, 6), (2, 2), (4, 5), (0, 3)], 3: [(2, 2, 2), (5, 1, 4)]}
    for nd, rows in mixes.items():
        for i, row in enumerate(rows):
            combo = [_AVG_1D[r] for r in row]
            ceil = combo[0][4]
            strides = [s for _, _, s, _, _ in combo]
            stride = [] if None in strides else strides
            x = randn(2, 2, *[sz for sz, *_ in combo])
            args = ([k for _, k, *_ in combo], stride, [p for _, _, _, p, _ in combo], ceil)
            for cip, div in [(True, None), (False, None), (bool(i % 2), 3)]:
                cases.append(Case(f"aten.avg_pool{nd}d.default", x, *args, cip, div))
    cases.append(Case("aten.avg_pool2d.default", randn(1, 2, 6, 6), [2]))
    cases.append(Case("aten.avg_pool2d.default", randn(2, 7, 6), [3, 2], [2, 2], [1, 1], True,
                      False))
    cases.append(Case("aten.avg_pool3d.default", randn(2, 5, 6, 5), [2, 2, 2], [], 0, True))
    cases.append(Case("aten.avg_pool1d.default", randn(3, 7), [3]))
    return cases


def _adaptive_cases():
    cases = []
    for op in ("aten.adaptive_avg_pool1d.default", "aten._adaptive_avg_pool1d.default"):
        for size, out in [(5, 3), (7, 4), (1, 7), (3, 5)]:
            cases.append(Case(op, randn(2, 3, size), [out]))
        cases.append(Case(op, randn(3, 7), [3]))
    for size, out in [(5, 3), (7, 4), (3, 5)]:
        cases.append(Case("aten.adaptive_max_pool1d.default", distinct(2, 3, size), [out]))
    cases.append(Case("aten.adaptive_max_pool1d.default", distinct(3, 7), [3]))
    for op in ("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default"):
        for size, out in [((5, 7), [3, 4]), ((1, 1), [7, 7]), ((2, 3), [7, 7]), ((6, 5), [1, 1])]:
            cases.append(Case(op, randn(2, 3, *size), out))
        cases.append(Case(op, randn(3, 5, 7), [3, 4]))
    for size, out in [((5, 7), [3, 4]), ((2, 3), [4, 5])]:
        cases.append(Case("aten.adaptive_max_pool2d.default", distinct(2, 3, *size), out))
    cases.append(Case("aten.adaptive_max_pool2d.default", distinct(3, 5, 7), [3, 4]))
    for op in ("aten.adaptive_avg_pool3d.default", "aten._adaptive_avg_pool3d.default"):
        cases.append(Case(op, randn(2, 2, 1, 4, 7), [3, 4, 2]))  # 1->3 (larger), 4->4, 7->2
    cases.append(Case("aten.adaptive_max_pool3d.default", distinct(2, 2, 5, 4, 7), [3, 4, 2]))
    return cases


@pytest.mark.parametrize("case", group(_max_pool_cases() + _avg_pool_cases() + _adaptive_cases()))
def test_pool(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Interpolation and pixel shuffle
# ------------------------------------------------------------------------------------------------
_LINEAR_FAMILY = {1: "upsample_linear1d", 2: "upsample_bilinear2d", 3: "upsample_trilinear3d"}


def _resample_cases():
    cases = []
    shapes = {1: (2, 3, 5), 2: (2, 3, 4, 5), 3: (1, 2, 3, 4, 5)}
    # (output_size, scale_factors) of the .vec overloads: up, down, fractional, exact doubling
    plans = {1: [([9], None), ([3], None), (None, [2.0]), (None, [1.7]), (None, [0.6])],
             2: [([7, 9], None), ([3, 2], None), (None, [2.0, 2.0]), (None, [1.5, 0.7]),
                 ([4, 5], None)],
             3: [([5, 7, 9], None), (None, [2.0, 1.5, 0.8]), ([2, 3, 3], None)]}
    for nd, shape in shapes.items():
        x = randn(*shape)
        for size, sf in plans[nd]:
            cases.append(Case(f"aten.upsample_nearest{nd}d.vec", x, size, sf))
            cases.append(Case(f"aten._upsample_nearest_exact{nd}d.vec", x, size, sf))
            for ac in (False, True):
                if ac and sf is not None and size is None and nd == 3:
                    continue
                cases.append(Case(f"aten.{_LINEAR_FAMILY[nd]}.vec", x, size, ac, sf))
        # .default overloads: output size plus optional per-axis scales
        out = [2 * n for n in shape[2:]]
        scales = [2.0] * nd
        cases.append(Case(f"aten.upsample_nearest{nd}d.default", x, out))
        cases.append(Case(f"aten.upsample_nearest{nd}d.default", x, [n + 3 for n in shape[2:]]))
        cases.append(Case(f"aten.upsample_nearest{nd}d.default", x, out, *scales))
        cases.append(Case(f"aten._upsample_nearest_exact{nd}d.default", x,
                          [n + 3 for n in shape[2:]]))
        cases.append(Case(f"aten.{_LINEAR_FAMILY[nd]}.default", x, out, False, *scales))
        cases.append(Case(f"aten.{_LINEAR_FAMILY[nd]}.default", x, [n + 1 for n in shape[2:]], True))
    x = randn(2, 3, 6, 7)
    for op in ("upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"):
        for size, sf in [([9, 11], None), ([3, 2], None), ([4, 5], None), (None, [1.5, 0.6]),
                         (None, [2.0, 2.0]), ([1, 1], None)]:
            for ac in (False, True):
                cases.append(Case(f"aten.{op}.vec", x, size, ac, sf))
        cases.append(Case(f"aten.{op}.default", x, [12, 14], False, 2.0, 2.0))
        cases.append(Case(f"aten.{op}.default", x, [5, 3], True))
    cases.append(Case("aten.upsample_bilinear2d.vec", randn(1, 2, 3, 4).astype(np.float64),
                      None, False, [1.7, 2.3]))
    cases.append(Case("aten.upsample_nearest2d.vec", randn(1, 2, 3, 4).astype(np.float64),
                      None, [1.7, 2.3]))
    cases.append(Case("aten.pixel_shuffle.default", randn(2, 8, 3, 4), 2))
    cases.append(Case("aten.pixel_shuffle.default", randn(9, 2, 3), 3))
    cases.append(Case("aten.pixel_unshuffle.default", randn(2, 2, 6, 4), 2))
    cases.append(Case("aten.pixel_unshuffle.default", randn(1, 3, 2, 9, 6), 3))
    return cases


@pytest.mark.parametrize("case", group(_resample_cases()))
def test_resample(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------
def _norm_cases():
    cases = []
    for shape in [(2, 3), (2, 3, 4, 5), (1, 3, 2, 3, 4)]:
        c = shape[1]
        w, b, m, v = randn(c), randn(c), randn(c), positive(c)
        x = randn(*shape, scale=3.0)
        cases.append(Case("aten._native_batch_norm_legit_no_training.default", x, w, b, m, v, 0.1,
                          1e-5))
        cases.append(Case("aten.batch_norm.default", x, w, b, m, v, False, 0.1, 1e-3, True))
    x = randn(2, 3, 4, 4)
    cases.append(Case("aten._native_batch_norm_legit_no_training.default", x, None, None,
                      randn(3), positive(3), 0.1, 1e-5))
    cases.append(Case("aten.batch_norm.default", x, None, randn(3), randn(3), positive(3), False,
                      0.1, 1e-5, False))
    for shape, ns in [((2, 3, 4, 5), [4, 5]), ((6,), [6]), ((2, 3, 4), [2, 3, 4])]:
        x = randn(*shape, scale=2.0) + 1.5
        w, b = randn(*ns), randn(*ns)
        cases.append(Case("aten.layer_norm.default", x, ns, w, b, 1e-5))
        cases.append(Case("aten.native_layer_norm.default", x, ns, w, b, 1e-5))
        cases.append(Case("aten.native_layer_norm.default", x, ns, None, None, 1e-3))
        cases.append(Case("aten.rms_norm.default", x, ns, w, 1e-6))
        cases.append(Case("aten.rms_norm.default", x, ns, None, None))  # eps None: finfo.eps
    cases.append(Case("aten.layer_norm.default", randn(2, 5), [5]))
    cases.append(Case("aten.rms_norm.default", randn(2, 5), [5], randn(5)))  # weight, eps None
    for shape, g in [((2, 6, 5), 3), ((2, 4, 3, 3), 4)]:
        c = shape[1]
        x = randn(*shape, scale=2.0) - 1.0
        cases.append(Case("aten.group_norm.default", x, g, randn(c), randn(c), 1e-5, True))
        cases.append(Case("aten.group_norm.default", x, g))
    cases.append(Case("aten.group_norm.default", randn(2, 6), 2, None, randn(6), 1e-2))
    x = randn(2, 3, 4)
    for ord_, dim, keep in [(2, [-1], True), (2, None, False), (1, [0, 2], False),
                            (float("inf"), [1], True), (float("-inf"), [1], False), (0, [2], False),
                            (3.5, [-1], False), (2, [], False)]:
        cases.append(Case("aten.linalg_vector_norm.default", x, ord_, dim, keep))
    cases.append(Case("aten.linalg_vector_norm.default", x.astype(np.float16), 2, [-1], False,
                      dtype=torch.float32))
    return cases


@pytest.mark.parametrize("case", group(_norm_cases()))
def test_norm(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Activations and unary elementwise math
# ------------------------------------------------------------------------------------------------
def _wide(*shape):
    """Normal values, some large, plus exact zeros and the hard*-op breakpoints."""
    x = randn(*shape, scale=4.0).reshape(-1)
    x[:8] = [0.0, -3.0, 3.0, 6.0, -30.0, 30.0, 60.0, -60.0]
    return x.reshape(shape)


def _unary_cases():
    cases = []
    plain = ["relu", "sigmoid", "tanh", "silu", "exp", "abs", "neg", "sin", "cos", "erf", "sign",
             "log_sigmoid", "mish", "hardswish", "hardsigmoid", "relu6", "selu", "floor", "ceil",
             "trunc"]
    for name in plain:
        x = _wide(3, 8) if name != "exp" else randn(3, 8, scale=3.0)
        cases.append(Case(f"aten.{name}.default", x))
    for name in ("log", "sqrt", "rsqrt"):
        cases.append(Case(f"aten.{name}.default", positive(3, 8)))
    cases.append(Case("aten.reciprocal.default", away_from_zero(3, 8)))
    cases.append(Case("aten.round.default", halves(3, 8)))
    cases.append(Case("aten.floor.default", halves(3, 8)))
    cases.append(Case("aten.ceil.default", halves(3, 8)))
    cases.append(Case("aten.trunc.default", halves(3, 8)))
    cases.append(Case("aten.sign.default", halves(3, 8)))
    cases.append(Case("aten.abs.default", randint(-5, 5, 3, 4)))
    cases.append(Case("aten.neg.default", randint(-5, 5, 3, 4)))
    cases.append(Case("aten.sign.default", randint(-5, 5, 3, 4)))
    x = _wide(3, 8)
    cases += [
        Case("aten.hardtanh.default", x),
        Case("aten.hardtanh.default", x, -2.0, 3.5),
        Case("aten.gelu.default", x),
        Case("aten.gelu.default", x, approximate="tanh"),
        Case("aten.leaky_relu.default", x),
        Case("aten.leaky_relu.default", x, 0.2),
        Case("aten.leaky_relu.default", x, -1.5),
        Case("aten.elu.default", randn(3, 8, scale=2.0)),
        Case("aten.elu.default", randn(3, 8, scale=2.0), 0.5),
        Case("aten.elu.default", randn(3, 8, scale=2.0), 1.5, 2.0),
        Case("aten.elu.default", randn(3, 8, scale=2.0), 1.5, 2.0, 0.5),
        Case("aten.elu.default", randn(3, 8, scale=2.0), 1.0, 1.0, 3.0),
        Case("aten.celu.default", randn(3, 8, scale=2.0)),
        Case("aten.celu.default", randn(3, 8, scale=2.0), 0.5),
        Case("aten.softplus.default", x),
        Case("aten.softplus.default", x, 2.0),
        Case("aten.softplus.default", randn(3, 8, scale=3.0), 0.5, 1.0),
        Case("aten.softplus.default", randn(3, 8, scale=3.0), 3.0, 2.0),
        Case("aten.clamp.default", x, -1.0),
        Case("aten.clamp.default", x, None, 0.5),
        Case("aten.clamp.default", x, -0.5, 2.0),
        Case("aten.clamp.default", x, 2.0, -1.0),  # min > max: everything becomes max
        Case("aten.clamp.default", randint(-5, 5, 3, 4), -2, 3),
        Case("aten.clamp_min.default", x, 0.3),
        Case("aten.clamp_max.default", x, -0.3),
        Case("aten.clamp_min.default", randint(-5, 5, 3, 4), 0),
        Case("aten.pow.Tensor_Scalar", x, 2),
        Case("aten.pow.Tensor_Scalar", x, 3),
        Case("aten.pow.Tensor_Scalar", away_from_zero(3, 8), -2),
        Case("aten.pow.Tensor_Scalar", positive(3, 8), 0.5),
        Case("aten.pow.Tensor_Scalar", randint(-4, 4, 3, 4), 3),
        Case("aten.pow.Tensor_Scalar", randint(-4, 4, 3, 4), 0.5),
        Case("aten.pow.Tensor_Tensor", positive(3, 8), randn(8)),
        Case("aten.pow.Tensor_Tensor", randn(3, 4), randint(0, 4, 3, 1).astype(np.float32)),
        Case("aten.pow.Tensor_Tensor", randint(0, 4, 3, 4), randint(0, 4, 4)),
        Case("aten.pow.Scalar", 2.0, randn(3, 4)),
        Case("aten.pow.Scalar", 2, randint(0, 6, 3, 4)),
        Case("aten.pow.Scalar", 0.5, randint(0, 6, 3)),
        Case("aten.isnan.default", special(3, 8)),
        Case("aten.isinf.default", special(3, 8)),
        Case("aten.logical_not.default", randbool(3, 4)),
        Case("aten.logical_not.default", special(3, 8)),
        Case("aten.logical_not.default", randint(-2, 2, 3, 4)),
        Case("aten.bitwise_not.default", randbool(3, 4)),
        Case("aten.bitwise_not.default", randint(-100, 100, 3, 4)),
    ]
    for name in ("relu", "sigmoid", "sign", "log_sigmoid"):
        cases.append(Case(f"aten.{name}.default", special(3, 8)))
    return cases


@pytest.mark.parametrize("case", group(_unary_cases()))
def test_unary(case):
    run_case(case)


def _softmax_cases():
    cases = []
    x = randn(2, 3, 5, scale=3.0)
    for dim in (0, -1, -2):
        cases.append(Case("aten._softmax.default", x, dim, False))
        cases.append(Case("aten._log_softmax.default", x, dim, False))
        cases.append(Case("aten.softmax.int", x, dim))
        cases.append(Case("aten.log_softmax.int", x, dim))
    big = randn(2, 6, scale=30.0)
    cases += [
        Case("aten.softmax.int", x, -1, torch.float32),
        Case("aten.log_softmax.int", x, 1, torch.float32),
        Case("aten.softmax.int", x, 1, torch.float64),
        Case("aten.softmax.int", big, -1),
        Case("aten.log_softmax.int", big, -1),
        Case("aten._softmax.default", big, 1, False),
        Case("aten._log_softmax.default", big, 0, False),
        Case("aten.softmax.int", randn(7), 0),
        # torch accepts dim 0 / -1 on a 0-d tensor
        Case("aten._softmax.default", scalar_array(3.0), 0, False),
        Case("aten.log_softmax.int", scalar_array(3.0), -1),
    ]
    return cases


@pytest.mark.parametrize("case", group(_softmax_cases()))
def test_softmax(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Binary elementwise ops
# ------------------------------------------------------------------------------------------------
def _binary_cases():
    cases = []
    a, b, c = randn(2, 3, 4), randn(3, 1), randn(4)
    ia, ib = randint(-9, 9, 2, 3, 4), randint(1, 5, 3, 1)
    for name in ("add", "sub", "rsub"):
        cases += [
            Case(f"aten.{name}.Tensor", a, b),
            Case(f"aten.{name}.Tensor", c if name == "add" else b, a),
            Case(f"aten.{name}.Tensor", a, b, alpha=2.5),
            Case(f"aten.{name}.Tensor", a, scalar_array(1.5)),
            Case(f"aten.{name}.Tensor", a, scalar_array(2.0), alpha=-3),
            Case(f"aten.{name}.Tensor", ia, ib),
            Case(f"aten.{name}.Tensor", ia, ib, alpha=3),
            Case(f"aten.{name}.Tensor", ia, scalar_array(0.5)),
            Case(f"aten.{name}.Tensor", ia, scalar_array(3, np.int64), alpha=2),
            Case(f"aten.{name}.Tensor", ia, a),
        ]
        if name != "rsub":  # torch.export records `x + 2` as add.Tensor with a Python scalar
            cases.append(Case(f"aten.{name}.Tensor", a, 1.5))
            cases.append(Case(f"aten.{name}.Tensor", ia, 2, alpha=-3))
            cases.append(Case(f"aten.{name}.Scalar", a, 1.25))
            cases.append(Case(f"aten.{name}.Scalar", a, 1.25, 2))
            cases.append(Case(f"aten.{name}.Scalar", ia, 3, -2))
        else:
            cases.append(Case("aten.rsub.Scalar", a, 1.25))
            cases.append(Case("aten.rsub.Scalar", a, 1.25, 2.0))
            cases.append(Case("aten.rsub.Scalar", ia, 3, 2))
    cases += [
        Case("aten.mul.Tensor", a, b),
        Case("aten.mul.Tensor", a, -2.5),
        Case("aten.mul.Tensor", ia, ib),
        Case("aten.mul.Tensor", ia, 0.5),
        Case("aten.mul.Tensor", randbool(2, 3), randbool(3)),
        Case("aten.mul.Scalar", a, 3),
        Case("aten.mul.Scalar", ia, 3),
        Case("aten.div.Tensor", a, away_from_zero(3, 1)),
        Case("aten.div.Tensor", a, 4.0),
        Case("aten.div.Tensor", ia, ib),  # integer true division -> float
        Case("aten.div.Scalar", a, -0.5),
        Case("aten.div.Scalar", ia, 4),
    ]
    num, den = randn(3, 8, scale=5.0), away_from_zero(8)
    for mode in (None, "floor", "trunc"):
        cases += [
            Case("aten.div.Tensor_mode", num, den, rounding_mode=mode),
            Case("aten.div.Tensor_mode", randint(-20, 20, 3, 8),
                 randint(1, 6, 8) * RNG.choice([-1, 1], 8), rounding_mode=mode),
            Case("aten.div.Scalar_mode", num, 0.75, rounding_mode=mode),
            Case("aten.div.Scalar_mode", num, -2, rounding_mode=mode),
            Case("aten.div.Scalar_mode", randint(-20, 20, 3, 8), 3, rounding_mode=mode),
            Case("aten.div.Scalar_mode", randint(-20, 20, 3, 8), -4, rounding_mode=mode),
        ]
    cases += [
        Case("aten.floor_divide.default", num, den),
        Case("aten.floor_divide.default", randint(-20, 20, 3, 8), randint(1, 6, 8) * -1),
        Case("aten.floor_divide.default", randint(-20, 20, 3, 8), scalar_array(3, np.int64)),
        Case("aten.remainder.Tensor", num, den),
        Case("aten.remainder.Tensor", randint(-20, 20, 3, 8),
             randint(1, 6, 8) * RNG.choice([-1, 1], 8)),
        Case("aten.remainder.Scalar", num, 1.5),
        Case("aten.remainder.Scalar", num, -1.5),
        Case("aten.remainder.Scalar", randint(-20, 20, 3, 8), 7),
        Case("aten.remainder.Scalar", randint(-20, 20, 3, 8), -3),
        Case("aten.fmod.Tensor", num, den),
        Case("aten.fmod.Tensor", randint(-20, 20, 3, 8), randint(1, 6, 8) * RNG.choice([-1, 1], 8)),
        Case("aten.fmod.Scalar", num, 1.5),
        Case("aten.fmod.Scalar", num, -1.5),
        Case("aten.fmod.Scalar", randint(-20, 20, 3, 8), 7),
        Case("aten.fmod.Scalar", randint(-20, 20, 3, 8), -3),
        Case("aten.maximum.default", a, b),
        Case("aten.minimum.default", a, c),
        Case("aten.maximum.default", ia, ib),
        Case("aten.minimum.default", special(2, 5), special(2, 5)),
        Case("aten.maximum.default", special(2, 5), randn(5)),
    ]
    q, qb = halves(3, 4), halves(4)
    for name in ("eq", "ne", "lt", "le", "gt", "ge"):
        cases += [
            Case(f"aten.{name}.Tensor", q, qb),
            Case(f"aten.{name}.Tensor", ia, a),
            Case(f"aten.{name}.Scalar", q, 0.5),
        ]
    for name in ("logical_and", "logical_or", "logical_xor"):
        cases += [
            Case(f"aten.{name}.default", randbool(3, 4), randbool(4)),
            Case(f"aten.{name}.default", halves(3, 4), randint(-1, 2, 3, 1)),
            Case(f"aten.{name}.Tensor", randbool(3, 4), randbool(4)),
            Case(f"aten.{name}.Scalar", randbool(3, 4), randbool(4)),
        ]
    for name in ("bitwise_and", "bitwise_or", "bitwise_xor"):
        cases += [
            Case(f"aten.{name}.Tensor", randint(-50, 50, 3, 4), randint(-50, 50, 4)),
            Case(f"aten.{name}.Tensor", randbool(3, 4), randbool(4)),
            Case(f"aten.{name}.Scalar", randint(-50, 50, 3, 4), 6),
            Case(f"aten.{name}.Scalar", randbool(3, 4), True),
            Case(f"aten.{name}.default", randint(0, 50, 3, 4), randint(0, 50, 4)),
        ]
    cond = randbool(3, 1)
    cases += [
        Case("aten.eq.Tensor", q, scalar_array(0.5)),
        Case("aten.lt.Scalar", ia, 2),
        Case("aten.ge.Scalar", ia, 1.5),
        Case("aten.le.Tensor", ia, ib),
        Case("aten.ne.Scalar", randbool(3, 4), True),
        Case("aten.where.self", cond, a, b),
        Case("aten.where.self", randbool(2, 3, 4), c, scalar_array(0.0)),
        Case("aten.where.self", cond, ia, ib),
        Case("aten.where.ScalarSelf", randbool(3, 4), 1.5, randn(3, 4)),
        Case("aten.where.ScalarSelf", randbool(3, 4), 2, randint(0, 5, 4)),
        Case("aten.where.ScalarOther", randbool(3, 4), randn(4), -1.0),
        Case("aten.where.ScalarOther", randbool(3, 4), randint(0, 5, 3, 4), 7),
        Case("aten.where.Scalar", randbool(3, 4), 1.0, 0.0),
        Case("aten.where.Scalar", randbool(3, 4), 1, 0),
        Case("aten.masked_fill.Scalar", a, randbool(3, 1), -1e9),
        Case("aten.masked_fill.Scalar", a, randbool(2, 3, 4), float("-inf")),
        Case("aten.masked_fill.Scalar", ia, randbool(4), 5),
        Case("aten.masked_fill.Scalar", ia, randbool(4), 2.7),
        Case("aten.masked_fill.Tensor", a, randbool(4), scalar_array(3.5)),
        Case("aten.masked_fill.Tensor", ia, randbool(3, 4), scalar_array(2, np.int64)),
    ]
    return cases


@pytest.mark.parametrize("case", group(_binary_cases()))
def test_binary(case):
    run_case(case)


def _attention_cases():
    op = "aten.scaled_dot_product_attention.default"
    q, k, v = randn(2, 2, 5, 4), randn(2, 2, 6, 4), randn(2, 2, 6, 4)
    bool_mask = randbool(5, 6)
    bool_mask[:, 0] = True
    dead = bool_mask.copy()
    dead[2] = False  # a query row with every key masked: torch gives zeros
    return [
        Case(op, q, k, v, dead),
        Case(op, q, k, v, None, 0.0, True, scale=0.3),  # causal, L < S (top-left aligned)
        Case(op, randn(2, 4, 5, 4), k, v, randn(2, 1, 5, 6), enable_gqa=True),  # float mask
        Case(op, randn(5, 4), randn(6, 4), randn(6, 4)),
    ]


@pytest.mark.parametrize("case", group(_attention_cases()))
def test_attention(case):
    run_case(case)


def _rnn_params(kind, input_size, hidden, layers, bidirectional, bias):
    gates = {"lstm": 4, "gru": 3}[kind]
    dirs = 2 if bidirectional else 1
    params = []
    for layer in range(layers):
        for _ in range(dirs):
            size = input_size if layer == 0 else hidden * dirs
            params += [randn(gates * hidden, size, scale=0.5),
                       randn(gates * hidden, hidden, scale=0.5)]
            if bias:
                params += [randn(gates * hidden, scale=0.5), randn(gates * hidden, scale=0.5)]
    return params


def _sequence_cases():
    cases = []
    # recurrent layers kept whole: (input, hx, params, has_biases, layers, dropout, train, bidir,
    # batch_first)
    for kind, layers, bidir, bias, batch_first in [("lstm", 2, True, True, True),
                                                   ("lstm", 1, False, False, False),
                                                   ("gru", 2, True, False, False)]:
        dirs = 2 if bidir else 1
        x = randn(2, 4, 3) if batch_first else randn(4, 2, 3)  # T=4, B=2, I=3
        h0, c0 = randn(layers * dirs, 2, 5), randn(layers * dirs, 2, 5)  # H=5
        hx = [h0, c0] if kind == "lstm" else h0
        cases.append(Case(f"aten.{kind}.input", x, hx, _rnn_params(kind, 3, 5, layers, bidir, bias),
                          bias, layers, 0.0, False, bidir, batch_first))
    # Mamba's selective scan (dlbjax::selective_scan, importers/_mamba.py): u, delta, A, B, C, D,
    # z, delta_bias, delta_softplus; with and without the optional operands
    u, dl, z = randn(2, 3, 5), randn(2, 3, 5), randn(2, 3, 5)
    A, B, C = -positive(3, 4), randn(2, 4, 5), randn(2, 4, 5)
    cases += [Case("dlbjax.selective_scan.default", u, dl, A, B, C, randn(3), z, randn(3), True),
              Case("dlbjax.selective_scan.default", u, dl, A, B, C, None, None, None, False)]
    # top-k routing (no ties)
    d = distinct(3, 8)
    cases += [Case("aten.topk.default", d, 3), Case("aten.topk.default", d, 2, 0),
              Case("aten.topk.default", d, 4, -1, False),
              Case("aten.topk.default", d, 1, 1, True, True)]
    # nn.EmbeddingBag: the bags' values are compared; torch's auxiliary outputs (offset2bag,
    # bag_size, max_indices: backward bookkeeping that no graph consumer reads) by shape only
    w, idx = randn(10, 3), np.asarray([1, 2, 4, 5, 4, 3, 2, 9], np.int64)
    for op in ("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default"):
        for mode, last, pad in [(0, False, -1), (1, False, 4), (2, False, -1), (0, True, 4),
                                (1, True, -1), (2, True, 4)]:
            off = np.asarray([0, 2, 2, 8] if last else [0, 2, 2, 5], np.int64)
            cases.append(Case(op, w, idx, off, False, mode, False, None, last, pad, values=(0,)))
        cases.append(Case(op, w, idx, np.asarray([0, 3, 3], np.int64), False, 0, False, randn(8),
                          values=(0,)))  # per_sample_weights (sum mode)
    return cases


@pytest.mark.parametrize("case", group(_sequence_cases()))
def test_sequence(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Shape and indexing
# ------------------------------------------------------------------------------------------------
def _shape_cases():
    x = randn(2, 3, 4)
    y = randn(2, 1, 4, 1)
    cases = []
    for op in ("aten.view.default", "aten.reshape.default"):
        cases += [Case(op, x, [6, 4]), Case(op, x, [-1]), Case(op, x, [2, -1, 2]),
                  Case(op, randn(5), [1, 5, 1]), Case(op, scalar_array(3.0), [1, 1])]
    cases += [Case("aten._unsafe_view.default", x, [4, -1]),
              Case("aten.view_copy.default", x, [3, 2, -1])]
    cases += [Case("aten.permute.default", x, [2, 0, 1]),
              Case("aten.permute.default", x, [-1, 0, -2]),
              Case("aten.permute.default", y, [3, 1, 0, 2]),
              Case("aten.permute_copy.default", x, [-2, -1, 0])]
    cases += [
        Case("aten.transpose.int", x, 0, 2),
        Case("aten.transpose.int", x, -1, -2),
        Case("aten.transpose.int", x, 1, 1),
        Case("aten.transpose.int", scalar_array(1.0), 0, -1),
        Case("aten.squeeze.default", y),
        Case("aten.squeeze.default", randn(1, 1)),
        Case("aten.squeeze.default", x),
        Case("aten.squeeze.dim", y, 1),
        Case("aten.squeeze.dim", y, -1),
        Case("aten.squeeze.dim", y, 2),  # not size 1: unchanged
        Case("aten.squeeze.dim", scalar_array(2.0), 0),
        Case("aten.squeeze.dim", scalar_array(2.0), -1),
        Case("aten.squeeze.dims", y, [1, 3]),
        Case("aten.squeeze.dims", y, [0, -1, 2]),  # 0 and 2 are not size 1
        Case("aten.squeeze.dims", y, []),
        Case("aten.squeeze.dims", scalar_array(2.0), [0]),
        Case("aten.unsqueeze.default", x, 0),
        Case("aten.unsqueeze.default", x, -1),
        Case("aten.unsqueeze.default", x, -2),
        Case("aten.unsqueeze.default", x, 3),
        Case("aten.unsqueeze.default", scalar_array(1.0), 0),
        Case("aten.flatten.using_ints", x),
        Case("aten.flatten.using_ints", x, 1),
        Case("aten.flatten.using_ints", y, 1, 2),
        Case("aten.flatten.using_ints", y, -3, -2),
        Case("aten.flatten.using_ints", x, 2, 2),
        Case("aten.flatten.using_ints", scalar_array(1.0)),
        Case("aten.flatten.using_ints", np.zeros((0, 3, 2), np.float32), 1),
        Case("aten.flatten.using_ints", np.zeros((2, 0, 3), np.float32), 0, 1),
        Case("aten.unflatten.int", x, 1, [3, 1]),
        Case("aten.unflatten.int", x, -1, [2, -1]),
        Case("aten.unflatten.int", x, 0, [1, 2]),
    ]
    op = "aten.expand.default"
    cases += [Case(op, y, [2, 5, 4, 3]), Case(op, y, [-1, 5, -1, 2]),
              Case(op, randn(3, 1), [2, 4, -1, 6]), Case(op, scalar_array(1.5), [2, 3]),
              Case("aten.expand_copy.default", y, [3, -1, 2, 4, -1])]
    cases.append(Case("aten.expand.default", randn(3, 1), [3, 4], implicit=True))
    z = randn(5, 7)
    for op in ("aten.slice.Tensor",):
        cases += [
            Case(op, z, 1, -3, None),
            Case(op, z, 0, 0, BIG, 2),
            Case(op, z, -1, 1, -1, 2),
            Case(op, z, 1, None, None, 3),
            Case(op, z, 0, 5, BIG),  # empty
            Case(op, z, 1, -100, 3),
            Case(op, z, 1, 2, 100),
            Case(op, z, 0, 3, 1),  # start > end: empty
            Case(op, z),
            Case(op, z, 1, 1, BIG, 4),
        ]
    cases += [Case("aten.slice_copy.Tensor", z, -1, -5, BIG, 2)]
    op = "aten.select.int"
    cases += [Case(op, x, 1, 2), Case(op, x, -1, -1), Case(op, x, 0, -2), Case(op, randn(4), 0, 3),
              Case("aten.select_copy.int", x, -2, -3)]
    cases += [
        Case("aten.cat.default", [randn(2, 3), randn(1, 3), randn(3, 3)]),
        Case("aten.cat.default", [randn(2, 3), randn(2, 1)], 1),
        Case("aten.cat.default", [randn(2, 3, 2), randn(2, 3, 1)], -1),
        Case("aten.cat.default", [np.zeros((0,), np.float32), randn(2, 3), randn(1, 3)]),
        Case("aten.cat.default", [randn(2, 3), np.zeros((0,), np.float32), randn(2, 2)], 1),
        Case("aten.cat.default", [np.zeros((0,), np.float32), np.zeros((0,), np.float32)]),
        Case("aten.cat.default", [np.zeros((0, 3), np.float32), randn(2, 3)]),
        Case("aten.cat.default", [randint(0, 5, 2), randint(0, 5, 3)]),
        Case("aten.cat.default", [randn(4)]),
        Case("aten.stack.default", [randn(2, 3), randn(2, 3), randn(2, 3)]),
        Case("aten.stack.default", [randn(2, 3), randn(2, 3)], 1),
        Case("aten.stack.default", [randn(2, 3), randn(2, 3)], -1),
        Case("aten.stack.default", [randn(2, 3)], 2),
        Case("aten.split.Tensor", randn(7, 3), 3),
        Case("aten.split.Tensor", randn(7, 3), 2, 1),
        Case("aten.split.Tensor", randn(2, 6), 3, -1),
        Case("aten.split.Tensor", randn(5, 3), 10),
        Case("aten.split.Tensor", np.zeros((0, 3), np.float32), 0),
        Case("aten.split_with_sizes.default", randn(7, 3), [2, 4, 1]),
        Case("aten.split_with_sizes.default", randn(3, 7), [7], -1),
        Case("aten.split_with_sizes.default", randn(3, 7), [2, 0, 5], 1),
        Case("aten.chunk.default", randn(7, 3), 3),
        Case("aten.chunk.default", randn(7, 3), 2, -1),
        Case("aten.chunk.default", randn(6, 5), 4),  # 6 / 4: 3 chunks of 2
        Case("aten.chunk.default", randn(2, 5), 5, 1),
        Case("aten.chunk.default", randn(2, 3), 7, 1),
        Case("aten.chunk.default", np.zeros((0, 3), np.float32), 2),  # 2 empty pieces
        Case("aten.unbind.int", x),
        Case("aten.unbind.int", x, 1),
        Case("aten.unbind.int", x, -1),
        Case("aten.constant_pad_nd.default", x, [1, 2]),
        Case("aten.constant_pad_nd.default", x, [1, 0, 0, 2], 1.5),
        Case("aten.constant_pad_nd.default", x, [-1, 2, 1, -1, 0, 1]),
        Case("aten.constant_pad_nd.default", x, [-2, -1]),
        Case("aten.constant_pad_nd.default", randint(0, 5, 3, 4), [1, 1], 7),
        Case("aten.constant_pad_nd.default", x, []),
        Case("aten.repeat.default", x, [2, 1, 3]),
        Case("aten.repeat.default", x, [2, 1, 1, 2]),
        Case("aten.repeat.default", randn(3), [2, 2]),
        Case("aten.repeat.default", x, [1, 0, 1]),
        Case("aten.flip.default", x, [0]),
        Case("aten.flip.default", x, [-1, 1]),
        Case("aten.flip.default", x, []),
        Case("aten.slice_scatter.default", x, randn(2, 2, 4), 1, 1, 3),
        Case("aten.slice_scatter.default", x, randn(2, 3, 2), -1, 0, BIG, 2),
        Case("aten.slice_scatter.default", x, randn(1, 3, 4), 0, -1),
        Case("aten.slice_scatter.default", x, x.copy()),
        Case("aten.select_scatter.default", x, randn(2, 4), 1, 2),
        Case("aten.select_scatter.default", x, randn(3, 4), 0, -1),
        Case("aten.copy.default", x, randn(2, 3, 4)),
        Case("aten.copy.default", x, randn(3, 1)),
        Case("aten.copy.default", randint(0, 5, 3, 4), randn(3, 4)),
        Case("aten.roll.default", x, [2]),
        Case("aten.roll.default", x, [-5]),
        Case("aten.roll.default", x, [1], [1]),
        Case("aten.roll.default", x, [1, -2], [0, -1]),
        Case("aten.roll.default", x, [7], [-1]),
        Case("aten.narrow.default", x, 1, 1, 2),
        Case("aten.narrow.default", x, -1, 0, 4),
        Case("aten.narrow.default", x, 2, -2, 2),  # negative start counts from the end
        Case("aten.narrow.default", x, 1, -3, 1),
        Case("aten.narrow.default", x, 0, 1, 0),
        Case("aten.index_select.default", x, 1, randint(0, 3, 5)),
        Case("aten.index_select.default", x, -1, np.asarray([3, 0, 3], np.int64)),
        Case("aten.index_select.default", x, 0, np.asarray([1], np.int64)),
        Case("aten.index_select.default", randn(6), 0, randint(0, 6, 4)),
        Case("aten.index_select.default", x, 1, scalar_array(2, np.int64)),  # keeps the dim
        Case("aten.index.Tensor", x, [randint(0, 2, 4)]),
        Case("aten.index.Tensor", x, [None, randint(-3, 3, 2, 2)]),
        Case("aten.index.Tensor", x, [randint(0, 2, 3, 1), None, randint(0, 4, 5)]),  # separated
        Case("aten.index.Tensor", x, [None, randint(0, 3, 3, 1), randint(0, 4, 1, 5)]),  # adjacent
        Case("aten.index.Tensor", x, [scalar_array(1, np.int64)]),
        Case("aten.gather.default", x, 1, randint(0, 3, 2, 5, 4)),
        Case("aten.gather.default", x, -1, randint(0, 4, 2, 3, 2)),
        Case("aten.gather.default", x, 0, randint(0, 2, 1, 2, 3)),  # smaller than self elsewhere
        Case("aten.gather.default", randn(5), 0, randint(0, 5, 3)),
        Case("aten.embedding.default", randn(10, 4), randint(0, 10, 2, 3)),
        Case("aten.embedding.default", randn(10, 4), randint(0, 10, 5), 0),
        Case("aten.embedding.default", randn(10, 4), scalar_array(3, np.int64)),
        Case("aten.embedding.default", randn(10, 4), randint(0, 10, 2, 2, 2), -1, False, False),
    ]
    return cases


@pytest.mark.parametrize("case", group(_shape_cases()))
def test_shape(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------
def _reduction_cases():
    x = randn(2, 3, 4)
    ix = randint(-5, 5, 2, 3, 4)
    bx = randbool(2, 3, 4)
    d = distinct(2, 3, 4)
    cases = []
    for op in ("aten.sum.dim_IntList", "aten.mean.dim"):
        cases += [
            Case(op, x, [1]),
            Case(op, x, [-1, 0]),
            Case(op, x, [0, 2], True),
            Case(op, x, []),
            Case(op, x, [], True),
            Case(op, x, None),
            Case(op, x, None, True),
            Case(op, x, [1], False, dtype=torch.float64),
            Case(op, ix, [2], dtype=torch.float32),
            Case(op, scalar_array(2.5), []),
        ]
    cases += [
        Case("aten.sum.dim_IntList", ix, [1, 2]),
        Case("aten.sum.dim_IntList", bx, [0]),
        Case("aten.sum.dim_IntList", ix, [1], dtype=torch.float32),
        Case("aten.sum.default", x),
        Case("aten.sum.default", ix),
        Case("aten.sum.default", bx),
        Case("aten.sum.default", ix, dtype=torch.float32),
        Case("aten.mean.default", x),
        Case("aten.mean.default", x, dtype=torch.float64),
        Case("aten.mean.default", ix, dtype=torch.float32),
    ]
    for op in ("aten.amax.default", "aten.amin.default"):
        cases += [Case(op, x), Case(op, x, [1]), Case(op, x, [0, -1], True), Case(op, x, [], True),
                  Case(op, ix, [2]), Case(op, special(3, 4), [1])]
    for op in ("aten.max.dim", "aten.min.dim"):
        cases += [Case(op, d, 1), Case(op, d, -1, True), Case(op, d, 0, False),
                  Case(op, np.arange(15, dtype=np.int64).reshape(3, 5)[:, RNG.permutation(5)], 1)]
    cases += [Case("aten.max.dim", scalar_array(1.5), 0),
              Case("aten.min.dim", scalar_array(1.5), -1, True),
              Case("aten.argmax.default", scalar_array(1.5), 0, True),
              Case("aten.amax.default", scalar_array(1.5), [0]),
              Case("aten.any.dims", scalar_array(True, bool), [0]),
              Case("aten.sum.dim_IntList", scalar_array(1.5), [-1], True),
              Case("aten.cumsum.default", scalar_array(1.5), 0)]
    for op in ("aten.max.default", "aten.min.default"):
        cases += [Case(op, x), Case(op, ix), Case(op, bx)]
    for op in ("aten.argmax.default", "aten.argmin.default"):
        cases += [Case(op, d), Case(op, d, 1), Case(op, d, -1, True), Case(op, d, None, True),
                  Case(op, d, 0), Case(op, distinct(7), 0, True)]
    for name in ("any", "all"):
        fx = np.where(bx, 0.0, randn(2, 3, 4)).astype(np.float32)
        for s in (bx, fx):
            cases += [Case(f"aten.{name}.default", s), Case(f"aten.{name}.dims", s, [0, 2])]
        cases.append(Case(f"aten.{name}.default", np.ones((2, 3, 4), bool)))
        cases += [Case(f"aten.{name}.dim", bx, 1), Case(f"aten.{name}.dim", fx, -1, True),
                  Case(f"aten.{name}.dims", fx, [1], True)]
        cases += [Case(f"aten.{name}.dims", bx), Case(f"aten.{name}.dims", bx, None, True),
                  Case(f"aten.{name}.dims", bx, []), Case(f"aten.{name}.dims", bx, [], True),
                  Case(f"aten.{name}.dim", ix, 0)]
    cases += [
        Case("aten.cumsum.default", x, 1),
        Case("aten.cumsum.default", x, -1),
        Case("aten.cumsum.default", ix, 0),
        Case("aten.cumsum.default", bx, 2),
        Case("aten.cumsum.default", ix, 2, dtype=torch.float32),
        Case("aten.cumsum.default", x, 0, dtype=torch.float64),
        Case("aten.cumsum.default", randn(6), 0),
    ]
    return cases


@pytest.mark.parametrize("case", group(_reduction_cases()))
def test_reduction(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Creation ops, dtype conversions and identities
# ------------------------------------------------------------------------------------------------
def _creation_cases():
    x, ix = randn(2, 3), randint(0, 5, 2, 3)
    cases = [
        Case("aten.arange.default", 5),
        Case("aten.arange.default", 5.0),
        Case("aten.arange.default", 6, dtype=torch.float32),
        Case("aten.arange.default", 6, dtype=torch.int32),
        Case("aten.arange.start", 2, 7),
        Case("aten.arange.start", 0.5, 4),
        Case("aten.arange.start", 1, 4, dtype=torch.float32),
        Case("aten.arange.start_step", 0, 10, 3),
        Case("aten.arange.start_step", 10, 0, -3),
        Case("aten.arange.start_step", -1.0, 1.0, 0.25),
        Case("aten.arange.start_step", 0, 1, 0.1),
        Case("aten.arange.start_step", 0, 12, 2, dtype=torch.float32),
        Case("aten.arange.start_step", 0.0, 5.0, 1.0, dtype=torch.int64),
        Case("aten.arange.start_step", 3, 3, 1),
        Case("aten.full.default", [2, 3], 1.5),
        Case("aten.full.default", [2], 3),
        Case("aten.full.default", [2, 2], True),
        Case("aten.full.default", [2, 2], 2, dtype=torch.float32),
        Case("aten.full.default", [], -1.0),
        Case("aten.full.default", [3], float("-inf")),
        Case("aten.full_like.default", x, 2.5),
        Case("aten.full_like.default", ix, 7),
        Case("aten.full_like.default", x, 1, dtype=torch.int64),
        Case("aten.full_like.default", ix, 0.5, dtype=torch.float32),
        Case("aten.zeros.default", [2, 3]),
        Case("aten.zeros.default", [4], dtype=torch.int64),
        Case("aten.zeros.default", [], dtype=torch.bool),
        Case("aten.ones.default", [3, 1]),
        Case("aten.ones.default", [2], dtype=torch.int32),
        Case("aten.zeros_like.default", x),
        Case("aten.zeros_like.default", ix, dtype=torch.float32),
        Case("aten.ones_like.default", ix),
        Case("aten.ones_like.default", x, dtype=torch.bool),
        Case("aten.new_zeros.default", x, [4, 1]),
        Case("aten.new_zeros.default", ix, [2], dtype=torch.float32),
        Case("aten.new_ones.default", ix, [3, 2]),
        Case("aten.new_ones.default", x, [2], dtype=torch.int64),
        Case("aten.scalar_tensor.default", 2.5),
        Case("aten.scalar_tensor.default", 3),
        Case("aten.scalar_tensor.default", 3, dtype=torch.int64),
        Case("aten.scalar_tensor.default", True, dtype=torch.bool),
        # uninitialised memory: shape and dtype only
        Case("aten.empty.memory_format", [2, 3], values=False),
        Case("aten.empty.memory_format", [4], dtype=torch.int64, values=False),
        Case("aten.empty_like.default", ix, values=False),
        Case("aten.empty_like.default", x, dtype=torch.bool, values=False),
        Case("aten.new_empty.default", x, [3, 1], values=False),
        Case("aten.new_empty.default", x, [2], dtype=torch.int64, values=False),
        Case("aten.empty_permuted.default", [2, 3, 4], [0, 2, 1], values=False),
        Case("aten.empty_permuted.default", [2, 3], [1, 0], dtype=torch.int64, values=False),
    ]
    return cases


def _conversion_cases():
    x = randn(3, 4, scale=4.0)
    ix = randint(-5, 5, 3, 4)
    cases = [
        Case("aten._to_copy.default", x),
        Case("aten._to_copy.default", x, dtype=torch.int64),
        Case("aten._to_copy.default", x, dtype=torch.int32),
        Case("aten._to_copy.default", x, dtype=torch.bool),
        Case("aten._to_copy.default", x, dtype=torch.float64),
        Case("aten._to_copy.default", ix, dtype=torch.float32),
        Case("aten._to_copy.default", randbool(3), dtype=torch.float32),
        Case("aten._to_copy.default", x, dtype=torch.float16),
        Case("aten.to.dtype", x, torch.int64),
        Case("aten.to.dtype", ix, torch.float32),
        Case("aten.to.dtype", ix, torch.bool),
        Case("aten.to.dtype", x, torch.float32, False, True),
        Case("aten.type_as.default", x, ix),
        Case("aten.type_as.default", ix, x),
    ]
    for op in ("aten.clone.default", "aten.alias.default", "aten.contiguous.default",
               "aten.detach.default", "aten.lift_fresh_copy.default", "aten.alias_copy.default"):
        cases += [Case(op, x), Case(op, ix)]
    cases.append(Case("aten.clone.default", x, memory_format=torch.contiguous_format))
    for op in ("aten.dropout.default", "aten.feature_dropout.default",
               "aten.alpha_dropout.default"):
        cases += [Case(op, randn(2, 3, 4), 0.5, False), Case(op, randn(2, 3), 0.0, False)]
    return cases


@pytest.mark.parametrize("case", group(_creation_cases() + _conversion_cases()))
def test_creation_and_conversion(case):
    run_case(case)


# ------------------------------------------------------------------------------------------------
# Table-wide checks
# ------------------------------------------------------------------------------------------------
def test_every_lowering_is_tested():
    tested = {c.op for c in ALL_CASES}
    untested = sorted(set(LOWERINGS) - tested - set(UNTESTABLE))
    assert not untested, f"LOWERINGS entries without a test case: {untested}"
    stale = sorted(set(UNTESTABLE) - set(LOWERINGS)) + sorted(set(REF_ALIASES) - set(LOWERINGS))
    assert not stale, f"allow-list / alias entries that are not in LOWERINGS: {stale}"
    unknown = sorted(c.op for c in ALL_CASES if c.op not in LOWERINGS)
    assert not unknown, f"cases for ops that have no lowering: {unknown}"


def test_ref_aliases_are_still_needed():
    """An alias is only for overloads torch lacks; once torch has one, test against it directly."""
    for name, alias in REF_ALIASES.items():
        assert resolve(alias) is not None, f"{alias} (reference for {name}) is not a torch overload"
        assert resolve(name) is None, f"torch now defines {name}: drop it from REF_ALIASES"


# Keyword arguments the importer drops (they say where or how a tensor is stored).
_STORAGE_KWARGS = {"device", "layout", "pin_memory", "memory_format", "non_blocking"}


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_signature_accepts_aten_schema(name):
    """The lowering takes the overload's positional arguments (trailing defaults omitted or not)
    and its keyword-only arguments by name, as the importer passes them."""
    if name in UNTESTABLE:
        pytest.skip(UNTESTABLE[name])
    op = resolve(name) or resolve(REF_ALIASES.get(name, "aten.none.none"))
    assert op is not None, f"{name}: not a torch overload and no reference alias"
    sig = _signature(LOWERINGS[name])
    if sig is None:
        pytest.skip("lowering has no inspectable signature")
    args = op._schema.arguments
    positional = [a for a in args if not a.kwarg_only]
    required = [a for a in positional if not a.has_default_value()]
    kwonly = [a.name for a in args if a.kwarg_only and a.name not in _STORAGE_KWARGS]
    sig.bind(*range(len(required)))
    sig.bind(*range(len(positional)))
    for k in kwonly:
        sig.bind(*range(len(required)), **{k: None})
