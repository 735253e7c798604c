"""Runs of identical layers compiled as one lax.scan (dlbjax/passes/layers.py, scan_layers=).

* detection on hand-built programs: a run is found; a differing layer breaks it; a value used
  outside the run breaks it;
* the scanned pass equals the unrolled one (prediction and relevance at every input <= 1e-6
  relative to the map's largest entry; bias, params, lost <= 1e-6 of the seeded total) in default and contrastive mode, jitted and vmapped over a
  batch, on the Hugging Face encoders and decoders of ``tests/hf_zoo.py``;
* compile size flat in depth: the jaxpr of the compiled pass has as many equations for a 2- as
  for an 8-layer LLaMA (counted, not timed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlbjax
from dlbjax.engine.analysis import analyze
from dlbjax.engine.interpret import constants_to_jax, evaluate
from dlbjax.engine.relevance import relevance_row
from dlbjax.ir import Eqn, Program, Var
from dlbjax.passes.layers import find_runs, stack_weights
from dlbjax.rules import Options

RTOL = 1e-6
RTOL_IN_PLACE = 1e-5  # weights read in place: each layer's forward recomputed (see below)


# ------------------------------------------------------------------------------------------------
# hand-built programs
# ------------------------------------------------------------------------------------------------
def _mlp(acts=("relu",) * 4, extra_use=None, width=4, seed=0):
    """x -> [linear(W_k, b_k) -> act_k] * len(acts); ``extra_use=k``: the output adds layer
    k's activation (a value used outside the run)."""
    rng = np.random.default_rng(seed)
    x = Var("x", (1, width), "float32")
    consts, values, eqns = [], {}, []
    h = x
    acts_out = []
    for k, act in enumerate(acts):
        w = Var(f"w{k}", (width, width), "float32")
        b = Var(f"b{k}", (width,), "float32")
        consts += [w, b]
        values[w.name] = rng.standard_normal((width, width)).astype(np.float32)
        values[b.name] = rng.standard_normal((width,)).astype(np.float32) * 0.1
        z = Var(f"z{k}", (1, width), "float32")
        eqns.append(Eqn("aten.linear.default", (h, w, b), {}, (z,)))
        a = Var(f"a{k}", (1, width), "float32")
        eqns.append(Eqn(f"aten.{act}.default", (z,), {}, (a,)))
        acts_out.append(a)
        h = a
    if extra_use is not None:
        y = Var("y", (1, width), "float32")
        eqns.append(Eqn("aten.add.Tensor", (h, acts_out[extra_use]), {}, (y,)))
        h = y
    return Program((x,), tuple(consts), tuple(eqns), (h,), ("out",), values).validate()


def _runs(program, **kw):
    opts = Options()
    return find_runs(program, analyze(program, opts), opts, **kw)


def test_a_run_is_found():
    program = _mlp(("relu",) * 5)
    (run,) = _runs(program)
    assert (run.start, run.period, run.count) == (0, 2, 5)
    assert [v.name for v in run.init] == ["x"] and [v.name for v in run.final] == ["a4"]
    # weights and biases stacked per position, in block order
    assert [[v.name for v in blocks] for _, blocks in run.weights] == \
        [[f"w{k}" for k in range(5)], [f"b{k}" for k in range(5)]]


def test_a_differing_layer_breaks_the_run():
    # layer 2 differs: no three identical consecutive blocks remain in 0..2 or 3..4
    assert _runs(_mlp(("relu", "relu", "tanh", "relu", "relu"))) == []
    # a different layer at the start shortens the run to the identical ones after it
    (run,) = _runs(_mlp(("tanh", "relu", "relu", "relu", "relu")))
    assert (run.start, run.count) == (2, 4)
    # different shapes break it too
    assert _runs(_mlp(("relu",) * 2)) == []  # too short for "auto" (3 blocks)
    assert len(_runs(_mlp(("relu",) * 2), min_count=2)) == 1


def test_an_outside_use_breaks_the_run():
    # a1 is read after the run: block 1 may only end a run (its carry is then a1)
    program = _mlp(("relu",) * 6, extra_use=1)
    runs = _runs(program, min_count=2)
    a1 = next(i for i, e in enumerate(program.eqns) if e.outputs[0].name == "a1")
    for r in runs:
        assert not (r.start <= a1 < r.stop - r.period), r
    assert runs and all(r.count >= 2 for r in runs)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_hand_built_scan_equals_unrolled(mode):
    program = _mlp(("relu",) * 5)
    opts = Options(mode=mode)
    an = analyze(program, opts)
    runs = tuple(find_runs(program, an, opts))
    assert runs
    consts = constants_to_jax(program)
    scanned, _ = stack_weights(runs, consts)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 4)), jnp.float32)
    out_u = evaluate(program, consts, [x])[0]

    def seed(pred, inputs):
        s = jnp.abs(pred) * 0 + 1.0
        return ((s,) if mode == "default" else (s, 0.5 * s)), jnp.int32(-1)

    ru = relevance_row(program, an, opts, consts, (x,), seed)
    # the weights stacked (stack_weights) and read in place (the per-layer constants:
    # scan_weights picks each layer's with lax.switch in a checkpointed body, whose forward the
    # relevance pass recomputes; XLA fuses the recomputation differently, so its float32
    # rounding differs from the unrolled pass by ~1e-6 of the largest entry, measured 1.01e-6)
    for form, tol in ((scanned, RTOL), (consts, RTOL_IN_PLACE)):
        out_s = jax.jit(lambda c, x: evaluate(program, c, [x], runs=runs)[0])(form, x)
        np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_u), rtol=RTOL, atol=1e-7)
        rs = jax.jit(lambda c, x: relevance_row(program, an, opts, c, (x,), seed, runs=runs))(
            form, x)
        for a, b in zip(jax.tree_util.tree_leaves(ru), jax.tree_util.tree_leaves(rs)):
            _close(b, a, tol=tol)


def test_weights_read_in_place_are_not_copied():
    """The relevance pass scanning per-layer constants (the runner's form) holds no stacked
    copy of the weights: XLA's temporaries stay below one copy of them, while the pass over
    weights stacked inside the call needs at least one (compiled sizes, not timings)."""
    width, layers = 256, 12
    program = _mlp(("relu",) * layers, width=width)
    opts = Options()
    an = analyze(program, opts)
    runs = tuple(find_runs(program, an, opts))
    assert runs and runs[0].count >= layers - 1
    consts = constants_to_jax(program)
    x = jnp.ones((1, width), jnp.float32)

    def seed(pred, inputs):
        return (jnp.ones_like(pred),), jnp.int32(-1)

    def temp(fn):
        return jax.jit(fn).lower(consts, x).compile().memory_analysis().temp_size_in_bytes

    in_place = temp(lambda c, x: relevance_row(program, an, opts, c, (x,), seed, runs=runs))
    stacked = temp(lambda c, x: relevance_row(program, an, opts, stack_weights(runs, c)[0], (x,),
                                              seed, runs=runs))
    weights = sum(v.size * 4 for v in program.constants if len(v.shape) == 2)
    print(f"temp bytes: in place {in_place}, stacked {stacked}, weights {weights}")
    assert stacked >= 0.8 * weights
    # a few layer-sized buffers (the picked layer, its |W|, layer 0's |W|), not one per layer
    assert in_place < 0.4 * weights


def _close(got, want, what="", scale=None, tol=RTOL):
    """max |got - want| / max |want| (or / ``scale``) <= ``tol``; returns it."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    if scale is None:
        scale = max(np.max(np.abs(want)), 1e-30) if want.size else 1.0
    err = np.max(np.abs(got - want)) / scale if want.size else 0.0
    assert err <= tol, f"{what}: relative difference {err:.3g}"
    return err


# ------------------------------------------------------------------------------------------------
# Hugging Face encoders and decoders
# ------------------------------------------------------------------------------------------------
def _fields(e) -> dict:
    """Every number of an Explanation worth comparing, flattened by name."""
    out = {"prediction": e.prediction}
    for name, r in e.relevance.items():
        out[f"relevance.{name}"] = r
    c = e.conservation
    for k in ("seed", "inputs", "bias", "lost", "params"):
        v = getattr(c, k)
        if v is not None:
            out[f"conservation.{k}"] = v
    flat = {}
    for k, v in out.items():
        leaves = jax.tree_util.tree_leaves(v) if not isinstance(v, np.ndarray) else [v]
        for j, leaf in enumerate(leaves):
            flat[f"{k}[{j}]"] = np.asarray(leaf)
    return flat


def _compare(a, b, tol=RTOL) -> float:
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    # the budget's terms (lost is a remainder, often ~0) relative to the seeded total
    seed = max(np.max(np.abs(v)) for k, v in fb.items() if k.startswith("conservation.seed"))
    worst = 0.0
    for k in fa:
        worst = max(worst, _close(fa[k], fb[k], k,
                                  seed if k.startswith("conservation.") else None, tol=tol))
    return worst


HF = pytest.importorskip("hf_zoo", reason="transformers is needed")


def _extra(name):
    """Decoders not in hf_zoo: GPT-2 (Conv1D layers) and Mistral (sliding-window attention)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128,
                                             n_positions=64, attn_implementation="sdpa"))
    else:
        m = tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128, max_position_embeddings=64, sliding_window=4,
            attn_implementation="sdpa"))
    return m.eval(), HF.inputs("llama")


@pytest.mark.parametrize("name", [n for n in HF.ALL] + ["gpt2", "mistral"])
def test_hf_scanned_equals_unrolled(name):
    model, x = (HF.tiny(name), HF.inputs(name)) if name in HF.ALL else _extra(name)
    unrolled = dlbjax.Explainer(model, x, scan_layers=False)
    assert unrolled.plan.runs == ()
    scanned = unrolled.replace(scan_layers=True)  # 2 layers: scanned with True (>= 2)
    assert scanned.plan.runs, f"{name}: no run of identical layers found"
    assert sum(r.count for r in scanned.plan.runs) >= 2
    for mode in ("default", "contrastive"):
        u = unrolled if mode == "default" else unrolled.replace(mode=mode)
        s = scanned if mode == "default" else scanned.replace(mode=mode)
        err = _compare(s(x), u(x))
        print(f"{name} {mode}: max relative difference {err:.3g}")
        assert s.runner.runs, "the runner did not scan"


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_runner_reads_weights_in_place_when_the_stack_would_not_fit(name, monkeypatch):
    """With no room for a stacked copy (the cap monkeypatched to 0 bytes), the runner scans
    the per-layer weights in place (scan_weights) and equals the unrolled pass within
    RTOL_IN_PLACE in both modes; with room (the default for a tiny model) it stacks them."""
    from dlbjax.passes import magnitudes
    model, x = HF.tiny(name, layers=3), HF.inputs(name)
    unrolled = dlbjax.Explainer(model, x, scan_layers=False)
    stacked = unrolled.replace(scan_layers=True)
    stacked(x)
    assert stacked.runner.runs and not stacked.runner.scan_in_place
    monkeypatch.setattr(magnitudes, "AUTO_MAGNITUDE_BYTES", 0)
    for mode in ("default", "contrastive"):
        u = unrolled if mode == "default" else unrolled.replace(mode=mode)
        s = unrolled.replace(scan_layers=True, mode=mode)
        err = _compare(s(x), u(x), tol=RTOL_IN_PLACE)
        print(f"{name} {mode} in place: max relative difference {err:.3g}")
        assert s.runner.runs and s.runner.scan_in_place


def test_auto_needs_three_layers_and_features_fall_back():
    model, x = HF.tiny("llama"), HF.inputs("llama")
    ex = dlbjax.Explainer(model, x)  # "auto": 2 layers are not scanned
    assert ex.plan.runs == ()
    assert ex.replace(scan_layers=True).plan.runs
    # per-layer relevance reads inside the layers: unrolled
    assert ex.replace(scan_layers=True, layers=True).plan.runs == ()
    assert ex.replace(scan_layers=True, method="gradient").plan.runs == ()
    with pytest.raises(ValueError):
        ex.replace(scan_layers="yes")


# ------------------------------------------------------------------------------------------------
# compile size flat in depth (counted, not timed)
# ------------------------------------------------------------------------------------------------
def _llama(layers: int, hidden: int = 32):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=128,
        max_position_embeddings=64)).eval()
    return m, HF.inputs("llama")


def _jaxpr_size(ex, x) -> int:
    plan = ex.plan
    arrays, n = plan.rows(x)
    classes = np.zeros((n,), np.int32)
    select = np.zeros((n,), bool)
    args = ex.runner.compiled_args(arrays, classes, select)
    jaxpr = jax.make_jaxpr(ex.runner._batched)(*args)

    def count(j):
        total = 0
        for e in j.eqns:
            total += 1
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        total += count(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        total += count(sub)
        return total

    return count(jaxpr.jaxpr)


def test_compile_size_is_flat_in_depth():
    sizes = {}
    for layers in (3, 8):
        model, x = _llama(layers)
        ex = dlbjax.Explainer(model, x, scan_layers=True)
        assert [r.count for r in ex.plan.runs] == [layers]
        sizes[layers] = (_jaxpr_size(ex, x), _jaxpr_size(ex.replace(scan_layers=False), x))
    (s3, u3), (s8, u8) = sizes[3], sizes[8]
    assert s3 == s8, sizes           # scanned: the same program whatever the depth
    assert u8 > u3 + 4 * (u3 // 4), sizes  # unrolled grows with every layer


ZOO_SEQUENCES = ["BERT (HF)", "LLaMA (HF)", "XLNet (HF)", "T5 (HF, decoder_input_ids)",
                 "Swin (HF)", "Mamba (HF)"]


@pytest.mark.parametrize("name", ZOO_SEQUENCES)
def test_zoo_scanned_equals_unrolled(name):
    """tests/zoo.py's sequence models as built there (padded rows in BERT and LLaMA); a model
    without a run of identical layers is explained unrolled, which is also checked."""
    zoo = pytest.importorskip("zoo")
    entry = zoo.ZOO[name]
    model, x = entry.build()
    unrolled = dlbjax.Explainer(model, x, scan_layers=False, **entry.options)
    scanned = unrolled.replace(scan_layers=True)
    print(f"{name}: runs {scanned.plan.runs}")
    for mode in ("default", "contrastive"):
        u = unrolled if mode == "default" else unrolled.replace(mode=mode)
        s = scanned if mode == "default" else scanned.replace(mode=mode)
        err = _compare(s(x), u(x))
        print(f"{name} {mode}: max relative difference {err:.3g}")
