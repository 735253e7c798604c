"""Every registered rule against an independent reference, and the registries' completeness.

The inputs are the forward cases of ``test_lowering.py`` (one or more per operator). Each DLB rule
is called directly on a case's arguments and compared with a reference that does not use
dlbjax's code:

* exact index maps, casts and selections (``rules/shape.py``, ``rules/moe.py``): the rule equals
  torch's autograd VJP of the same ATen op (spec §4.3, §4.5);
* max pools and max reductions: on tie-free inputs the winner takes all, which is torch's VJP
  (§4.2, §8.6);
* affine ops, average pools, mean/sum reductions and interpolation: the dense rule of the op's explicit matrix
  (built column by column with torch), per unit in float64 (``reference.py``; §2.1, §2.6, §3.2,
  §8.7), in default and contrastive mode;
* identities (activations, norms, dropout, softmax): the relevance passes to the first operand;
* add/sub, products, division, embedding, fused modules: their formulas written out here;
* recurrent layers, embedding bags and attention: the per-step / per-unit reference tests named
  in ``REFERENCE_TESTS``.

``test_every_op_is_tested`` fails for a registered rule in none of these groups, and
``test_every_rule_has_a_lowering`` for a rule without a forward.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dlbjax
import reference as ref
import test_lowering as L
from dlbjax import DuplicateRegistrationError, Streams
from dlbjax.lowerings import TABLE, register_lowering
from dlbjax.lowerings.fused import FUSED_OP
from dlbjax.rules import (DLB, PER_STREAM, RULE_TABLE, RULES, Options, RuleContext, RuleResult,
                          get_rule, methods, register)
from dlbjax.rules.elementwise import identity
from dlbjax.rules.shape import route

RNG = np.random.default_rng(20261206)

# rules checked against per-unit or per-step references elsewhere (module::test)
REFERENCE_TESTS = {
    "aten.lstm.input": ["test_recurrent::test_scan_rule_equals_per_step_reference"],
    "aten.gru.input": ["test_recurrent::test_scan_rule_equals_per_step_reference"],
    "aten._embedding_bag.default": ["test_recurrent::test_embedding_bag_equals_per_unit_reference"],
    "aten._embedding_bag_forward_only.default": [
        "test_recurrent::test_embedding_bag_equals_per_unit_reference"],
    "dlbjax.selective_scan.default": [
        "test_mamba::test_selective_scan_rule_equals_per_element_reference",
        "test_mamba::test_relevance_at_the_scan_equals_the_reference_on_a_two_layer_mamba"],
    "aten.scaled_dot_product_attention.default": [
        "test_attention::test_sdpa_kept_whole_equals_its_decomposition",
        "test_attention::test_bilinear_rule_against_per_unit_reference"],
}
# formulas checked in this file (tests below)
DIRECT = {"aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar",
          "aten.rsub.Scalar", "aten.rsub.Tensor", "aten.mul.Tensor", "aten.mul.Scalar",
          "aten.div.Tensor", "aten.div.Scalar", "aten.embedding.default", FUSED_OP}
MAX_OPS = {op for op in RULES if "max_pool" in op or op in ("aten.max.dim", "aten.amax.default")}
LINEAR_OPS = {op for op, r in RULES.items() if r.affine} | {
    op for op in RULES if "avg_pool" in op or op.startswith(("aten.mean.", "aten.sum."))} | {
    op for op, r in RULES.items() if r.family == "resample" and r.default is not route}
ROUTE_OPS = {op for op, r in RULES.items() if r.default is route}
IDENTITY_OPS = {op for op, r in RULES.items() if r.default is identity}


# ------------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------------
def _is_float(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _carries(args, only=None):
    """Carry mask: float arrays carry (``only``: just that argument position)."""
    out = []
    for i, a in enumerate(args):
        if only is not None and i != only:
            out.append([False] * len(a) if isinstance(a, list) else False)
        elif isinstance(a, list):
            out.append([_is_float(x) for x in a])
        else:
            out.append(_is_float(a))
    return tuple(out)


def _outputs(op, args, kwargs):
    outs = TABLE[op].fn(*L.to_jax(args), **L.to_jax(kwargs))
    return outs if isinstance(outs, tuple) else (outs,)


def _shapes(op, args, kwargs):
    """The outputs' shapes and dtypes (abstract evaluation: no compilation)."""
    outs = L.traced_shapes(TABLE[op].fn, L.to_jax(args), L.to_jax(kwargs))
    return outs if isinstance(outs, tuple) else (outs,)


def call_rule(op, args, kwargs, carries, R, mode="default"):
    """The DLB rule of ``op`` on numpy ``args`` (one jitted call); returns (per-argument
    relevance, absorbed)."""
    rule = RULES[op]
    jargs, jkwargs = L.to_jax(args), L.to_jax(kwargs)
    leaves, tree = jax.tree_util.tree_flatten((jargs, jkwargs), is_leaf=lambda v: v is None)
    where = [i for i, v in enumerate(leaves) if isinstance(v, jax.Array)]

    def rebuild(arrays):
        filled = list(leaves)
        for i, a in zip(where, arrays):
            filled[i] = a
        return jax.tree_util.tree_unflatten(tree, filled)

    def apply(arrays, R):
        a, k = rebuild(arrays)
        outs = TABLE[op].fn(*a, **k)
        ctx = RuleContext(carries=carries, outputs=outs if isinstance(outs, tuple) else (outs,),
                          gate=None, options=Options(mode=mode), op=op, where="test")

        def run(fn, r):
            res = fn(ctx, r, *a, **k)
            return (res.relevance, res.absorbed) if isinstance(res, RuleResult) else (res, None)

        if mode == "default" or rule.contrastive is not PER_STREAM:
            return run(rule.default if mode == "default" else rule.contrastive, R)
        (pos, _), (neg, _) = run(rule.default, R.positive), run(rule.default, R.negative)
        return [None if p is None else Streams(p, n) for p, n in zip(pos, neg)], None

    return jax.jit(apply)([leaves[i] for i in where], R)


def _usable(case, need_float=True):
    return (not case.xfail and case.values is True and case.op in RULES
            and (not need_float or any(_is_float(a) or (isinstance(a, list) and any(map(_is_float, a)))
                                       for a in case.args)))


def _arrays(case):
    return [x for a in case.args for x in (a if isinstance(a, list) else [a]) if _is_float(x)]


def _finite_without_ties(case):
    """Relevance of non-finite values is undefined, and max rules split ties (torch does not)."""
    return all(np.all(np.isfinite(x)) and np.unique(x).size == x.size for x in _arrays(case))


def _smallest_per_op(cases):
    """One case per op (the one with the fewest input elements): each case costs compilations."""
    best = {}
    for c in cases:
        size = sum(x.size for x in _arrays(c))
        if c.op not in best or size < best[c.op][0]:
            best[c.op] = (size, c)
    return [c for _, c in best.values()]


def _cases(ops, keep=lambda c: True):
    return _smallest_per_op([c for c in L.ALL_CASES if c.op in ops and _usable(c)
                             and _finite_without_ties(c) and keep(c)])


def _ids(cases):
    return [p.id for p in L.params(cases)]


# torch ops whose VJP is the reference of another op's rule: detach is the identity for
# relevance (a value-preserving copy), while torch's gradient stops there by design
# ops whose torch form has no derivative: an equivalent torch function to differentiate
VJP_REFERENCE = {
    "aten.detach.default": "aten.alias.default",
    # aten::copy has no autograd formula; the functional copy_ is src broadcast into self's shape
    "aten.copy.default": lambda self, src, non_blocking=False: (
        src.expand(self.shape).to(self.dtype) + 0 * self),
}


def _reference_op(op):
    ref = VJP_REFERENCE.get(op, op)
    if callable(ref):
        return ref
    return L.resolve(ref) or L.resolve(L.REF_ALIASES[op])


def _torch_vjp(case, R_outs):
    """torch.autograd's VJP of the case's op w.r.t. every float array argument."""
    targs = L.to_torch(case.args)
    leaves = []
    for a in targs:
        for t in (a if isinstance(a, list) else [a]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.requires_grad_(True)
                leaves.append(t)
    out = _reference_op(case.op)(*targs, **L.to_torch(case.kwargs))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    pairs = [(o, torch.from_numpy(np.asarray(r)).to(o.dtype)) for o, r in zip(outs, R_outs)
             if r is not None and o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [r for _, r in pairs],
                                allow_unused=True)
    return [np.zeros(t.shape) if g is None else g.detach().double().numpy()
            for t, g in zip(leaves, grads)]


def _flat_results(res, args):
    out = []
    for r, a in zip(res, args):
        if isinstance(a, list):
            out += [np.asarray(x, np.float64) for x, ai in zip(r or [None] * len(a), a)
                    if _is_float(ai)]
        elif _is_float(a):
            out.append(np.asarray(r, np.float64))
    return out


def _seed_for(op, outs):
    rule = RULES[op]
    idx = rule.outputs if rule.outputs is not None else range(len(outs))
    R = [RNG.uniform(0.1, 1.0, o.shape).astype(np.float32)
         if i in idx and jnp.issubdtype(o.dtype, jnp.floating) else None
         for i, o in enumerate(outs)]
    return R


def _tol(case):
    half = any(isinstance(a, np.ndarray) and a.dtype in (np.float16,) for a in case.args) or \
        any(d in repr(case) for d in ("float16", "bfloat16"))
    return dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# exact index maps and maxima: torch's VJP
# ------------------------------------------------------------------------------------------------
def _float_output(case) -> bool:
    outs = _shapes(case.op, case.args, case.kwargs)
    return any(r is not None for r in _seed_for(case.op, outs))


VJP_CASES = _cases(ROUTE_OPS | MAX_OPS, _float_output)


@pytest.mark.parametrize("case", VJP_CASES, ids=_ids(VJP_CASES))
def test_index_map_and_max_rules_equal_torchs_vjp(case):
    outs = _shapes(case.op, case.args, case.kwargs)
    R = _seed_for(case.op, outs)
    Rj = tuple(None if r is None else jnp.asarray(r) for r in R)
    res, absorbed = call_rule(case.op, case.args, case.kwargs, _carries(case.args),
                              Rj[0] if len(Rj) == 1 else Rj)
    assert absorbed is None
    for got, want in zip(_flat_results(res, case.args), _torch_vjp(case, R)):
        np.testing.assert_allclose(got, want, **_tol(case))


# ------------------------------------------------------------------------------------------------
# linear operators: the dense rule of their explicit matrix, per unit
# ------------------------------------------------------------------------------------------------
def _carried_position(case):
    rule = RULES[case.op]
    for i, a in enumerate(case.args):
        if _is_float(a) and (rule.check is None or rule.check(_carries(case.args, only=i)) is None):
            return i
    return None


LINEAR_CASES = _cases(LINEAR_OPS, lambda c: _carried_position(c) is not None)


def _matrix_and_bias(case, pos):
    """M [out, in] and the constant part b of the op as a function of argument ``pos`` (torch,
    float64)."""
    fn = _reference_op(case.op)
    base = [L.to_torch(a) for a in case.args]
    base = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in base]
    kwargs = L.to_torch(case.kwargs)
    x = base[pos]

    def f(v):
        args = list(base)
        args[pos] = v
        return fn(*args, **kwargs)

    zero = f(torch.zeros_like(x)).reshape(-1)
    cols = []
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = 1
        cols.append((f(e.reshape(x.shape)).reshape(-1) - zero).numpy())
    M = np.stack(cols, axis=1)
    if RULES[case.op].family == "resample":
        # torch's interpolation kernels leave rounding dust (~1e-8) where a weight is exactly 0;
        # the rule reads the exact taps (dlbjax.lowerings.resample.DUST)
        M = np.where(np.abs(M) < 1e-6, 0.0, M)
    return M, zero.numpy(), x.numpy().reshape(-1)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=_ids(LINEAR_CASES))
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_linear_rules_equal_the_dense_rule_of_their_matrix(case, mode):
    pos = _carried_position(case)
    M, b, x = _matrix_and_bias(case, pos)
    outs = _shapes(case.op, case.args, case.kwargs)
    shape = outs[0].shape
    carries = _carries(case.args, only=pos)
    tol = dict(rtol=2e-4, atol=2e-5 * 100)
    if mode == "default":
        R = RNG.uniform(0.1, 1.0, shape)
        res, absorbed = call_rule(case.op, case.args, case.kwargs, carries,
                                  jnp.asarray(R, jnp.float32))
        want, kept = ref.dense_default(x, M, b, R.reshape(-1))
        np.testing.assert_allclose(np.asarray(res[pos], np.float64).reshape(-1), want, **tol)
        got_kept = 0.0 if absorbed is None else float(absorbed)
        assert got_kept == pytest.approx(kept, rel=2e-4, abs=1e-4)
    else:
        Rp, Rn = RNG.uniform(0.1, 1.0, shape), RNG.uniform(0.1, 1.0, shape)
        res, _ = call_rule(case.op, case.args, case.kwargs, carries,
                           Streams(jnp.asarray(Rp, jnp.float32), jnp.asarray(Rn, jnp.float32)),
                           mode="contrastive")
        wp, wn = ref.dense_contrastive(x, M, b, Rp.reshape(-1), Rn.reshape(-1))
        np.testing.assert_allclose(np.asarray(res[pos].positive, np.float64).reshape(-1), wp, **tol)
        np.testing.assert_allclose(np.asarray(res[pos].negative, np.float64).reshape(-1), wn, **tol)


# ------------------------------------------------------------------------------------------------
# identities
# ------------------------------------------------------------------------------------------------
IDENTITY_CASES = _cases(IDENTITY_OPS)


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=_ids(IDENTITY_CASES))
def test_identity_rules_pass_relevance_to_the_first_operand(case):
    outs = _shapes(case.op, case.args, case.kwargs)
    R = tuple(None if r is None else jnp.asarray(r) for r in _seed_for(case.op, outs))
    res, absorbed = call_rule(case.op, case.args, case.kwargs, _carries(case.args, only=0),
                              R[0] if len(R) == 1 else R)
    assert absorbed is None and all(r is None for r in res[1:])
    np.testing.assert_array_equal(np.asarray(res[0]), np.asarray(R[0]))


# ------------------------------------------------------------------------------------------------
# add / sub, products, division, embedding, fused modules: the formulas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,sign_a,sign_b", [("aten.add.Tensor", 1, 1), ("aten.sub.Tensor", 1, -1),
                                              ("aten.rsub.Tensor", -1, 1)])
@pytest.mark.parametrize("both", [True, False])
def test_add_rule_is_proportional_to_the_signed_terms(op, sign_a, sign_b, both):
    """§4.4: R_m = R |v_m| / sum |v_n| over the signed operand terms; a constant keeps its share
    (absorbed); a broadcast operand sums over the broadcast axis."""
    a, b = L.randn(3, 4), L.randn(4)
    R = RNG.uniform(0.1, 1.0, (3, 4))
    carries = (True, both)
    res, absorbed = call_rule(op, (a, b), {}, carries, jnp.asarray(R, jnp.float32))
    va, vb = sign_a * a.astype(np.float64), np.broadcast_to(sign_b * b.astype(np.float64), (3, 4))
    share = R / (np.abs(va) + np.abs(vb))
    np.testing.assert_allclose(res[0], share * np.abs(va), rtol=1e-5)
    if both:
        np.testing.assert_allclose(res[1], (share * np.abs(vb)).sum(0), rtol=1e-5)
        assert absorbed is None
    else:
        assert res[1] is None
        assert float(absorbed) == pytest.approx((share * np.abs(vb)).sum(), rel=1e-5)


@pytest.mark.parametrize("op", ["aten.add.Scalar", "aten.sub.Scalar", "aten.rsub.Scalar"])
def test_add_with_a_python_scalar_keeps_the_scalars_share(op):
    a = L.randn(2, 5)
    R = RNG.uniform(0.1, 1.0, (2, 5))
    res, absorbed = call_rule(op, (a, 0.5), {}, (True, False), jnp.asarray(R, jnp.float32))
    share = R / (np.abs(a) + 0.5)
    np.testing.assert_allclose(res[0], share * np.abs(a), rtol=1e-5)
    assert float(absorbed) == pytest.approx((share * 0.5).sum(), rel=1e-5)


@pytest.mark.parametrize("op", ["aten.mul.Tensor", "aten.div.Tensor"])
@pytest.mark.parametrize("rule", ["half", "dlb"])
def test_products_and_division(op, rule):
    """§4.8: by a constant, identity to the other operand; between two carriers, the product
    rule (§9.5): half each, or the DLB split |ab - a| : |ab - b| (division: with 1/b)."""
    a, b = L.away_from_zero(3, 4), L.away_from_zero(3, 4)
    R = RNG.uniform(0.1, 1.0, (3, 4))
    Rj = jnp.asarray(R, jnp.float32)
    const, _ = call_rule(op, (a, b), {}, (True, False), Rj)
    np.testing.assert_array_equal(np.asarray(const[0]), np.asarray(Rj))
    assert const[1] is None
    rule_ = RULES[op]
    ctx = RuleContext(carries=(True, True), outputs=_outputs(op, (a, b), {}), gate=None,
                      options=Options(product_rule=rule), op=op, where="test")
    ra, rb = rule_.default(ctx, Rj, jnp.asarray(a), jnp.asarray(b))
    f = b if op == "aten.mul.Tensor" else 1.0 / b.astype(np.float64)
    if rule == "half":
        wa = R / 2
    else:
        y = a * f
        da, db = np.abs(y - a), np.abs(y - f)
        wa = R * da / (da + db)
    np.testing.assert_allclose(ra, wa, rtol=1e-4)
    np.testing.assert_allclose(rb, R - wa, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["aten.mul.Scalar", "aten.div.Scalar"])
def test_scaling_by_a_number_is_identity(op):
    a = L.randn(2, 3)
    R = jnp.asarray(RNG.uniform(0.1, 1.0, (2, 3)), jnp.float32)
    res, _ = call_rule(op, (a, -2.5), {}, (True, False), R)
    np.testing.assert_array_equal(np.asarray(res[0]), np.asarray(R))


def test_embedding_gives_each_position_the_sum_over_hidden():
    """§4.6, §9.3: the token score is the sum of its row's relevance over the hidden axis."""
    w, idx = L.randn(7, 4), L.randint(0, 7, 2, 5)
    R = RNG.uniform(0.1, 1.0, (2, 5, 4))
    res, _ = call_rule("aten.embedding.default", (w, idx), {}, (False, True),
                       jnp.asarray(R, jnp.float32))
    assert res[0] is None
    np.testing.assert_allclose(res[1], R.sum(-1), rtol=1e-6)


def test_fused_module_is_identity_to_its_single_carrier():
    from dlbjax.engine.analysis import analyze
    from dlbjax.passes.fuse import fuse_modules
    from dlbjax.importers import import_model
    from transformers.activations import NewGELUActivation

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.act = NewGELUActivation()

        def forward(self, x):
            return self.act(self.lin(x))

    program = fuse_modules(import_model(M(), torch.randn(1, 4))[0])
    eqn = next(e for e in program.eqns if e.op == FUSED_OP)
    assert analyze(program, Options()).problems == []
    x = L.randn(1, 4)
    R = jnp.asarray(RNG.uniform(0.1, 1.0, (1, 4)), jnp.float32)
    ctx = RuleContext(carries=(True,), outputs=(jnp.asarray(x),), gate=None, options=Options(),
                      op=FUSED_OP, where="test")
    (r,) = RULES[FUSED_OP].default(ctx, R, jnp.asarray(x), **eqn.kwargs)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(R))


# ------------------------------------------------------------------------------------------------
# the registries
# ------------------------------------------------------------------------------------------------
def test_every_rule_has_a_lowering():
    missing = sorted(op for op, _ in RULE_TABLE if op not in TABLE)
    assert not missing, f"rules without a forward lowering: {missing}"


def test_rule_and_lowering_live_in_the_same_family():
    """``rules/<family>.py`` registers the rules of the ops ``lowerings/<family>.py`` runs."""
    wrong = [f"{op}: rule in rules/{r.family}.py, lowering in lowerings/{TABLE[op].family}.py"
             for (op, method), r in RULE_TABLE.items()
             if method == DLB and r.family != TABLE[op].family]
    assert not wrong, "\n".join(wrong)


def test_every_op_is_tested():
    """Every registered rule is checked against a reference (above or in REFERENCE_TESTS), and
    every lowering has a forward case in test_lowering.py."""
    covered = {c.op for c in VJP_CASES} | {c.op for c in LINEAR_CASES} | \
        {c.op for c in IDENTITY_CASES} | DIRECT | set(REFERENCE_TESTS)
    untested = sorted(set(RULES) - covered)
    assert not untested, f"rules without a reference test: {untested}"
    for op, names in REFERENCE_TESTS.items():
        assert op in RULES, f"REFERENCE_TESTS names {op}, which has no rule"
        for name in names:
            module, test = name.split("::")
            assert hasattr(importlib.import_module(module), test), f"{name} does not exist"
    assert not (set(TABLE) - {c.op for c in L.ALL_CASES} - set(L.UNTESTABLE))


def test_duplicate_registrations_raise():
    with pytest.raises(DuplicateRegistrationError, match="already has a 'dlb' rule"):
        register("aten.relu.default", default=identity)
    with pytest.raises(DuplicateRegistrationError, match="already has a lowering"):
        register_lowering("aten.relu.default", jax.nn.relu)
    assert RULES["aten.relu.default"].default is identity  # unchanged


def test_keep_whole_is_a_field_of_the_lowering():
    from dlbjax.importers import KEEP_WHOLE
    names = {str(op) for op in KEEP_WHOLE}
    assert "aten.linear.default" in names and "aten.add.Tensor" not in names
    assert names == {op for op, e in TABLE.items() if e.keep_whole} & names


_PROBE = "test-zero-relu"  # a method that overrides one op; registered once per process
if _PROBE not in methods():
    register("aten.relu.default", default=lambda ctx, R, *a, **k: (jnp.zeros_like(R),),
             method=_PROBE, section="test only")


def test_a_method_overrides_only_its_ops():
    assert get_rule("aten.relu.default", _PROBE).method == _PROBE
    assert get_rule("aten.linear.default", _PROBE).method == DLB  # falls back to the DLB rule
    assert RULES["aten.relu.default"].method == DLB
    torch.manual_seed(0)  # unseeded weights could leave every ReLU dead for x > 0 (flaky)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.abs_()  # positive weights and x > 0: the ReLUs are live
    ex = dlbjax.Explainer(model, torch.randn(1, 3), task="regression")
    seeds = (jnp.ones((1, 2)),)
    x = (jnp.asarray(np.abs(L.randn(1, 3)) + 0.1),)
    dlb = ex.relevance_function()(ex.constants, x, seeds)
    import dataclasses
    probe = dataclasses.replace(ex.plan, options=dataclasses.replace(ex.options, method=_PROBE))
    zero = probe.relevance_function()(ex.constants, x, seeds)
    assert float(jnp.sum(dlb.relevance["input"][0])) > 0
    assert float(jnp.sum(jnp.abs(zero.relevance["input"][0]))) == 0.0
