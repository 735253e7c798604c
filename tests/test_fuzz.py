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
  "no layer entirely dead and the seeded unit has P + N > 0", is not sufficient: a single conv
  unit with an all-zero receptive field still receives relevance through a following batch norm,
  whose shift makes its output non-zero, and a max pool over an all-zero window routes relevance
  to zeros; both lose it. The fuzzer finds such cases quickly.)
* contrastive stream conservation (§7.2.8): no stream takes a bias share (absorbed == 0 exactly);
  each stream is lost only at units with P = N = 0 (no contributor at all; missing from the spec's
  precondition) or with both sides present and T = 0; otherwise Σ R± at the input = Σ R± seed;
* jit == eager (row 0; in CI for the skeletons of ``fuzz_models.CI_EAGER``, since the first eager
  call compiles every primitive separately), and vmap over rows == a loop of single-row calls.

``HYPOTHESIS_PROFILE=long`` runs many more examples and also draws random skeletons
(``fuzz_models.skeletons``) instead of the fixed CI set.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from hypothesis import event, given, settings, strategies as st

import fuzz_models as fm

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
M = 100.0
RTOL = 1e-5  # float32 (spec §7.2), relative to the row's seed total
EXAMPLES = {"default": 3000 if LONG else 160, "contrastive": 2000 if LONG else 110}

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
def _rel_maps(out, name):
    return [np.asarray(m, np.float64) for m in out["relevance"][name]]


def check_row(c: fm.Compiled, res, units, r: int, contrastive: bool):
    S = 2 if contrastive else 1
    name = c.ex.input_names[0]
    maps = [np.asarray(m[r]) for m in res["relevance"][name]]
    maps += [np.asarray(m[r]) for v in res["layers"].values() for m in v]
    for m in maps:
        assert np.all(np.isfinite(m)), "non-finite relevance"
        assert m.min() >= 0.0, f"negative relevance {m.min()}"

    program = c.ex.program
    consumers = program.consumers()
    layers = {k: [np.asarray(m[r], np.float64) for m in v] for k, v in res["layers"].items()}
    layers[name] = [np.asarray(m[r], np.float64) for m in res["relevance"][name]]
    for s in range(S):
        seed = float(res["seed"][r, s])
        inputs = float(res["input_total"][r, s])
        absorbed = float(res["absorbed"][r, s])
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
                    if bound is not None:
                        near |= np.abs(T - bound) <= scale
                amb += float(np.sum(R[near]))
                passed[var] = float(np.sum(R[ok] * (1 - share[ok])))
            else:
                both = (P > 0) & (N > 0)
                dead = (P + N == 0) | (both & (T == 0))
                lost_pred += float(np.sum(R[dead]))
                amb += float(np.sum(R[both & ~dead & (np.abs(T) <= scale)]))
                passed[var] = float(np.sum(R[~dead]))
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


def _close(a, b, scale):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=RTOL, atol=RTOL * scale)


def check_same(one, res, r, scale):
    """A single-row result equals row r of a batched result (relevance, layers, totals)."""
    for k in one["relevance"]:
        for a, b in zip(one["relevance"][k], res["relevance"][k]):
            _close(a, b[r], scale)
    for k in one["layers"]:
        for a, b in zip(one["layers"][k], res["layers"][k]):
            _close(a, b[r], scale)
    _close(one["absorbed"], res["absorbed"][r], scale)


def run_example(c: fm.Compiled, consts, x, seeds, contrastive):
    eager_check = LONG or c.skeleton in fm.CI_EAGER
    rows = x.shape[0]
    res, units = jax.device_get(c.batched(consts, x, tuple(seeds)))
    for r in range(rows):
        check_row(c, res, units, r, contrastive)
    for r in range(rows):  # vmap == loop
        scale = max(float(np.sum(res["seed"][r])), 1.0)
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
