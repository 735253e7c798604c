"""Fuzzing: random models, weights and inputs through the whole pipeline (issue 7).

Models come from ``fuzz_models``: dense, conv1d and conv2d stacks of Linear/Conv (stride, padding,
dilation, groups), batch norm with random running statistics, six activations, max and average
pools (1-d, 2-d, padding, ceil mode), residual adds and subtractions, concatenations, and flatten /
mean / adaptive-average heads with an optional output activation. A skeleton is exported and
compiled once; every example draws new weights (exact zeros, all-zero, all-negative, all-positive,
tiny and large layers), biases, batch-norm statistics, three input rows (zeros, 1e-6, 1e6 and mixed
magnitudes) and seeds, and checks on every row:

* every relevance map, at the input and at every layer (``layers=True``), is finite;
* default mode: every map is >= 0 (non-negative seeds), both streams in contrastive mode;
* **the relevance budget, unit by unit**: relevance leaves the explanation only through a bias
  share R_j |b_j| / D_j of a dense/conv unit with D_j > 0 or at a unit that passes nothing, i.e.
  D_j = g+ P_j + g- N_j + |b_j| = 0 (spec §2.1, §2.4; gates of §2.2/§8.1; adds, average-pool
  windows and means are units with unit weights and no bias, §4.2, §4.4). From the forward values
  the test recomputes P, N, b and the gates of every unit and, with the relevance R_j each unit
  received (its layer map), predicts the total bias share and the total loss; the library's
  ``absorbed`` and ``seed - inputs - absorbed`` must match them (float32, rtol 1e-5 of the seed).
* per-op completeness: for every lossy op whose input feeds nothing else, the relevance at its
  input equals what its units pass on (R_j minus the bias share, for units with D_j > 0);
* bias-free conservation (§7.2.2), asserted exactly when its real preconditions hold: no relevance
  reaches a unit with a bias and no relevance reaches a unit with D = 0. (The spec's wording,
  "no layer entirely dead and the seeded unit has P + N > 0", is not sufficient: a single unit
  with no contribution at all (all-zero weights or receptive field) still receives relevance
  when a batch norm follows it, since the norm's shift makes its output non-zero, and loses it;
  see test_spec_note_batch_norm_after_a_unit_without_contributions.)
* contrastive stream conservation (§7.2.8): no stream takes a bias share (absorbed == 0 exactly);
  each stream is lost only at units with P = N = 0 (no contributor at all; missing from the
  spec's precondition, same example) or with both sides present and T = 0; otherwise
  Σ R± at the input = Σ R± seed;
* jit == eager (row 0; in CI for the two skeletons of ``fuzz_models.CI_EAGER``, since the first
  eager call compiles every primitive separately), and vmap over rows == a loop of single-row
  calls, to rtol 1e-5 of the seed. Not for a row whose relevance reaches a rule's switch within
  rounding (a gate bound, T = 0, a max-pool near-tie, R+ = R-): there two compilations may take
  different branches, each correct for its own forward values (found by the long profile: a conv
  followed by batch norm with tiny weights makes a channel almost constant, and the max-pool
  winner then depends on the last bit).

Cost: exporting and compiling a skeleton (three compilations per mode) dominates; the CI profile
uses four feature-dense skeletons and runs 300 examples in about 100 s of CPU time.

``HYPOTHESIS_PROFILE=long`` runs many more examples, draws random skeletons
(``fuzz_models.skeletons``) besides the fixed CI set, and runs the eager check everywhere.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import event, given, settings, strategies as st

import dlbjax
import fuzz_models as fm

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
M = 100.0
RTOL = 1e-5  # float32 (spec §7.2), relative to the row's seed total
# the long profile compiles most of its (random) skeletons afresh: roughly 20-40 s each, hours in
# all; FUZZ_EXAMPLES=N runs N examples per fuzz test instead
EXAMPLES = {"default": 1500 if LONG else 170, "contrastive": 1000 if LONG else 130}
if os.environ.get("FUZZ_EXAMPLES"):
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["FUZZ_EXAMPLES"]))

skeleton_st = (st.one_of(st.sampled_from(fm.CI_SKELETONS), fm.skeletons()) if LONG
               else st.sampled_from(fm.CI_SKELETONS))


# ------------------------------------------------------------------------------------------------
# drawing one example
# ------------------------------------------------------------------------------------------------
def draw_example(data, c: fm.Compiled, contrastive: bool, rows: int = 3):
    n_w = sum(1 for k in c.ex.program.const_kinds if k.endswith("weight"))
    weight_modes = data.draw(st.lists(st.sampled_from(fm.WEIGHT_MODES), min_size=n_w, max_size=n_w),
                             label="weight modes")
    bias_modes = data.draw(st.lists(st.sampled_from(fm.BIAS_MODES), min_size=n_w, max_size=n_w),
                           label="bias modes")
    scales = data.draw(st.lists(st.sampled_from(fm.INPUT_SCALES), min_size=rows, max_size=rows),
                       label="input scales")
    zero_fracs = data.draw(st.lists(st.sampled_from([0.0, 0.3, 1.0]), min_size=rows, max_size=rows),
                           label="input zero fractions")
    seed = data.draw(st.integers(0, 2**32 - 1), label="numpy seed")
    rng = np.random.default_rng(seed)
    consts = fm.random_constants(c.ex, rng, weight_modes, bias_modes)
    x = fm.random_rows(c.skeleton[1], rng, scales, zero_fracs)
    n_out = int(np.prod(c.out_shape))
    seeds = [np.zeros((rows,) + c.out_shape, np.float32) for _ in range(2 if contrastive else 1)]
    for r in range(rows):
        kind = data.draw(st.sampled_from(["onehot", "spread"]), label="seed kind")
        t = data.draw(st.integers(0, n_out - 1), label="target")
        if kind == "onehot" and not contrastive:
            seeds[0][r].reshape(-1)[t] = M
        elif kind == "onehot":  # spec §8.5 shape: R+ = M p_t at t, R- = M p_k elsewhere
            p = rng.dirichlet(np.ones(n_out))
            seeds[0][r].reshape(-1)[t] = M * p[t]
            neg = M * p
            neg[t] = 0.0
            seeds[1][r].reshape(-1)[:] = neg
        else:  # any non-negative seed, zeros included
            for s in seeds:
                v = np.abs(rng.normal(size=n_out)) * M / n_out
                v[rng.random(n_out) < 0.3] = 0.0
                s[r].reshape(-1)[:] = v
    return consts, x, seeds


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def check_row(c: fm.Compiled, res, units, r: int, contrastive: bool) -> bool:
    """All per-row checks; returns whether the row is *ambiguous*: relevance reaches a place where
    the rules are discontinuous and the forward value sits within rounding of the switch (a gate
    bound, T = 0, a max-pool near-tie, R+ = R- in contrastive mode), so two compilations of the
    same pass (jit/eager, vmap/loop) may legitimately take different branches there."""
    units, ties = units
    S = 2 if contrastive else 1
    name = c.ex.input_names[0]
    maps = [np.asarray(m[r]) for m in res.relevance[name]]
    maps += [np.asarray(m[r]) for v in res.layers.values() for m in v]
    for m in maps:
        assert np.all(np.isfinite(m)), "non-finite relevance"
        assert m.min() >= 0.0, f"negative relevance {m.min()}"

    program = c.ex.program
    consumers = program.consumers()
    layers = {k: [np.asarray(m[r], np.float64) for m in v] for k, v in res.layers.items()}
    layers[name] = [np.asarray(m[r], np.float64) for m in res.relevance[name]]
    ambiguous = any(float(np.sum(layers[var][s][np.asarray(t[r])])) > 0
                    for var, t in ties.items() for s in range(S))
    for s in range(S):
        seed = float(res.seed[r, s])
        inputs = float(res.input_total[r, s])
        absorbed = float(res.absorbed[r, s])
        bias_pred = lost_pred = amb = 0.0
        passed = {}  # var name -> relevance its units pass on to their inputs
        for var, (P, N, b) in units.items():
            P, N, b = (np.asarray(a[r], np.float64) for a in (P, N, b))
            R = layers[var][s]
            T = P - N + b
            scale = 1e-5 * (P + N + np.abs(b))
            if not contrastive:
                lo, hi = c.gates.get(var, (None, None))
                gp = np.ones(P.shape, bool) if lo is None else ~(T < lo)
                gn = np.ones(P.shape, bool) if hi is None else ~(T > hi)
                D = np.where(gp, P, 0) + np.where(gn, N, 0) + np.abs(b)
                ok = D > 0
                share = np.where(ok, np.abs(b) / np.where(ok, D, 1), 0)
                bias_pred += float(np.sum(R * share))
                lost_pred += float(np.sum(R[~ok]))
                near = np.zeros(P.shape, bool)
                for bound in (lo, hi):
                    if bound is not None:  # (a unit with P = N = b = 0 passes nothing either way)
                        near |= (np.abs(T - bound) <= scale) & (scale > 0)
                amb += float(np.sum(R[near]))
                passed[var] = float(np.sum(R[ok] * (1 - share[ok])))
            else:
                both = (P > 0) & (N > 0)
                dead = (P + N == 0) | (both & (T == 0))
                lost_pred += float(np.sum(R[dead]))
                amb += float(np.sum(R[both & ~dead & (np.abs(T) <= scale)]))
                passed[var] = float(np.sum(R[~dead]))
                Rp, Rn = layers[var]
                tie = both & (np.abs(Rp - Rn) <= 1e-5 * (Rp + Rn)) & (Rp + Rn > 0)
                ambiguous |= bool(np.any(tie))
        ambiguous |= amb > 0
        tol = RTOL * max(seed, 1e-30) + amb
        if contrastive:
            assert absorbed == 0.0, "a contrastive stream gave a share to a bias"
        else:
            assert abs(absorbed - bias_pred) <= tol, (absorbed, bias_pred, tol)
        assert abs(seed - inputs - absorbed - lost_pred) <= tol, \
            ("budget", s, seed, inputs, absorbed, lost_pred, tol)
        # per-op completeness where the op's input feeds nothing else
        for eqn in program.eqns:
            out = eqn.outputs[0].name
            if out not in passed:
                continue
            srcs = [a for a in eqn.inputs if a.name in layers]
            if eqn.op in fm.ADDS or len(srcs) != 1 or len(consumers.get(srcs[0], [])) != 1:
                continue
            got = float(np.sum(layers[srcs[0].name][s]))
            assert abs(got - passed[out]) <= tol, (eqn.op, out, got, passed[out], tol)
        # conservation exactly under its preconditions (§7.2.2 default, §7.2.8 contrastive)
        if bias_pred == 0.0 and lost_pred == 0.0 and amb == 0.0:
            event(f"{'contrastive' if contrastive else 'default'}: exact conservation checked")
            assert abs(inputs - seed) <= RTOL * seed, ("conservation", s, inputs, seed)
        elif lost_pred > 0:
            event(f"{'contrastive' if contrastive else 'default'}: relevance lost at D = 0 units")
    return ambiguous


def _close(a, b, scale):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=RTOL, atol=RTOL * scale)


def check_same(one, res, r, scale):
    """A single-row result equals row r of a batched result (relevance, layers, totals)."""
    for k in one.relevance:
        for a, b in zip(one.relevance[k], res.relevance[k]):
            _close(a, b[r], scale)
    for k in one.layers:
        for a, b in zip(one.layers[k], res.layers[k]):
            _close(a, b[r], scale)
    _close(one.absorbed, res.absorbed[r], scale)


def run_example(c: fm.Compiled, consts, x, seeds, contrastive):
    eager_check = LONG or c.skeleton in fm.CI_EAGER
    rows = x.shape[0]
    res, units = jax.device_get(c.batched(consts, x, tuple(seeds)))
    ambiguous = [check_row(c, res, units, r, contrastive) for r in range(rows)]
    for r in range(rows):  # vmap == loop
        if ambiguous[r]:
            event("row within rounding of a rule's switch: jit/eager and vmap/loop not compared")
            continue
        scale = max(float(np.sum(res.seed[r])), 1.0)
        one = jax.device_get(c.jit_f(consts, (x[r],), tuple(s[r] for s in seeds)))
        check_same(one, res, r, scale)
        if r == 0 and eager_check:  # jit == eager
            eager = jax.device_get(c.f(consts, (x[0],), tuple(s[0] for s in seeds)))
            check_same(eager, res, 0, scale)


# ------------------------------------------------------------------------------------------------
# the fuzz tests
# ------------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES["default"])
@given(skeleton=skeleton_st, data=st.data())
def test_fuzz_default(skeleton, data):
    c = fm.compiled(skeleton, "default")
    consts, x, seeds = draw_example(data, c, contrastive=False)
    run_example(c, consts, x, seeds, contrastive=False)


@settings(max_examples=EXAMPLES["contrastive"])
@given(skeleton=skeleton_st, data=st.data())
def test_fuzz_contrastive(skeleton, data):
    c = fm.compiled(skeleton, "contrastive")
    consts, x, seeds = draw_example(data, c, contrastive=True)
    run_example(c, consts, x, seeds, contrastive=True)


# ------------------------------------------------------------------------------------------------
# regressions: bugs the fuzzer found, reduced to minimal reproducers
# ------------------------------------------------------------------------------------------------
def test_regression_gated_side_gets_zero_not_a_negative_residue():
    """Found by test_fuzz_default (conv1d skeleton, relu head): negative default-mode relevance.

    The magnitude form of the dense rule computes R_x = |x| u + x v, which cancels exactly for an
    input whose contributions are all gated off; in floats (XLA contracts it into an FMA) it left
    +-ulp residues, so relevance could be negative (spec §7.2.4) and spread from there. Minimal
    reproducer: one bias-free unit with a ReLU, T = 0.06 - 1.54 < 0, so the positive side is gated
    (§8.2) and input 0 (z = +0.06) must get 0; it got -5.2e-9. Fixed by clamping at 0."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.6, -2.2]]))
    r = dlbjax.explain(model, torch.tensor([[0.1, 0.7]])).relevance["input"]
    assert r.min() >= 0.0
    assert abs(float(r[0, 0])) <= 1e-6 and float(r[0, 1]) == pytest.approx(M, rel=1e-6)


def test_regression_no_negative_relevance_through_gated_layers():
    """The same defect on many rows and units: ReLU-, tanh- and sigmoid-gated dense layers
    (default mode; contrastive mode uses the sign-split form, which has no cancellation)."""
    torch.manual_seed(0)
    for act in (nn.ReLU(), nn.Tanh(), nn.Sigmoid()):
        model = nn.Sequential(nn.Linear(7, 9), act, nn.Linear(9, 4)).eval()
        x = torch.randn(64, 7) * torch.tensor([1e-3, 1.0, 10.0, 1.0, 3.0, 0.1, 1e3])
        e = dlbjax.explain(model, x, layers=True)
        for v in e.layers.values():
            assert np.min(v) >= 0.0


def test_spec_note_batch_norm_after_a_unit_without_contributions():
    """Spec §7.2.2 / §7.2.8 preconditions are not sufficient for conservation (not a library bug).

    Bias-free Linear -> BatchNorm -> ReLU -> Linear; hidden unit 0 has all-zero weights, so P = N =
    0 there, yet the norm's shift (beta = 1) makes its output positive and the head sends it
    relevance, which that unit cannot pass on. No layer is entirely dead, the seeded unit has
    P + N > 0 and there is no bias, but relevance is lost, in both modes, exactly the amount that
    reached the unit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].weight[0] = 0.0
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        model[3].weight.abs_()
    x = torch.tensor([[1.0, 2.0, 0.5]])
    for mode in ("default", "contrastive"):
        e = dlbjax.explain(model, x, target=0, layers=True, mode=mode)
        first = [v for k, v in e.layers.items() if k.startswith("0/")][0]  # the first Linear's output
        for s in (("positive", "negative") if mode == "contrastive" else (None,)):
            lost = e.conservation.lost if s is None else getattr(e.conservation.lost, s)
            r_unit = first if s is None else getattr(first, s)
            assert float(r_unit[0, 0]) > 1.0
            assert float(lost[0]) == pytest.approx(float(r_unit[0, 0]), rel=1e-5)
