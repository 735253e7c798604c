"""compute_dtype="bfloat16"/"float16" (dlbjax/passes/precision.py): a half forward, float32 rules
and results, close to the float32 explanation within the bounds measured by
benchmarks/bench_precision.py (with margin); compute_dtype="float32" unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dlbjax
import hf_zoo
from conftest import MLP

# measured (benchmarks/RESULTS.md (i)): MLP bf16 rel. L2 2.2e-3 default / 2.7e-3 contrastive,
# fp16 3.2e-4 / 3.8e-4; tiny LLaMA bf16 1.6e-3 / 7.7e-4 with top-5 agreement 1.00 / 0.95
BOUND_L2 = {"bfloat16": 2e-2, "float16": 3e-3}


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def llama():
    return hf_zoo.tiny("llama")


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                 / np.linalg.norm(np.asarray(b, np.float64)))


def _seeds(ex, mode):
    shape = ex.program.outputs[0].shape
    dt = jnp.dtype(ex.program.outputs[0].dtype)
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.random(shape), dt) for _ in range(2 if mode == "contrastive" else 1))


def test_half_compute_runs_the_forward_in_half_precision(mlp, data):
    ex = dlbjax.Explainer(mlp, data[:1], compute_dtype="bfloat16")
    assert ex.compute_dtype == "bfloat16"
    prog = ex.program
    # the interface stays float32 (callers pass the model's dtype), everything else is bf16
    assert [v.dtype for v in prog.inputs] == [v.dtype for v in prog.outputs] == ["float32"]
    assert {c.dtype for c in prog.constants} == {"bfloat16"}
    assert {str(np.asarray(ex.constants[c.name]).dtype) for c in prog.constants} == {"bfloat16"}
    assert prog.eqns[0].op == prog.eqns[-1].op == "aten._to_copy.default"
    assert {o.dtype for e in prog.eqns[:-1] for o in e.outputs} == {"bfloat16"}
    # in the lowered pass, the forward's dots take bf16 operands; the rules' dots are float32
    f = ex.relevance_function()
    jaxpr = jax.make_jaxpr(f)(ex.constants, (jnp.asarray(data[:1].numpy()),), _seeds(ex, "default"))
    dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in _eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]
    assert ("bfloat16", "bfloat16") in dots and ("float32", "float32") in dots


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _eqns(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_half_compute_is_close_to_float32(mlp, data, dtype, mode):
    ref = dlbjax.Explainer(mlp, data[:1], mode=mode)(data)
    e = dlbjax.Explainer(mlp, data[:1], mode=mode, compute_dtype=dtype)(data, target=ref.target)
    streams = ("positive", "negative") if mode == "contrastive" else (None,)
    for s in streams:
        r = ref.relevance["x"] if s is None else getattr(ref.relevance["x"], s)
        h = e.relevance["x"] if s is None else getattr(e.relevance["x"], s)
        assert h.dtype == np.float32
        assert _rel(h, r) < BOUND_L2[dtype]
    assert e.prediction.dtype == np.float32
    assert _rel(e.prediction, ref.prediction) < 2 * BOUND_L2[dtype]
    # the budget still closes: the rules work in float32, each hand-over rounds once
    c = e.conservation
    seed = c.seed if mode == "default" else c.seed.positive
    inputs = c.inputs if mode == "default" else c.inputs.positive
    bias = c.bias if mode == "default" else c.bias.positive
    np.testing.assert_allclose(inputs + bias, seed, rtol=BOUND_L2[dtype])


def test_float32_model_half_compute_halves_weight_memory(mlp, data):
    full = dlbjax.Explainer(mlp, data[:1])
    half = dlbjax.Explainer(mlp, data[:1], compute_dtype="bfloat16")
    nbytes = lambda ex: sum(np.asarray(v).nbytes for v in ex.constants.values())  # noqa: E731
    assert nbytes(half) * 2 == nbytes(full)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_half_compute_jit_equals_eager(mlp, data, mode):
    ex = dlbjax.Explainer(mlp, data[:1], mode=mode, compute_dtype="bfloat16")
    f = ex.relevance_function()
    args = (ex.constants, (jnp.asarray(data[:1].numpy()),), _seeds(ex, mode))
    eager, jitted = f(*args), jax.jit(f)(*args)
    for a, b in zip(eager.relevance["x"], jitted.relevance["x"]):
        assert a.dtype == jnp.float32
        # XLA may fuse the jitted half arithmetic differently: one bf16 rounding apart at most
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2, atol=1e-3 * float(
            np.abs(np.asarray(a)).max()))


def test_half_compute_batch_equals_rows(mlp, data):
    ex = dlbjax.Explainer(mlp, data[:1], compute_dtype="bfloat16")
    e = ex(data)
    for i in range(len(data)):
        r = ex(data[i:i + 1])
        np.testing.assert_allclose(e.relevance["x"][i], r.relevance["x"][0], rtol=1e-5, atol=1e-6)
        assert e.target[i] == r.target[0]


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_half_compute_text_model_keeps_the_top_tokens(llama, mode):
    x = hf_zoo.inputs("llama", batch=2, length=16)
    example = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in x.items()}
    ref = dlbjax.Explainer(llama, example, mode=mode)(x)
    e = dlbjax.Explainer(llama, example, mode=mode, compute_dtype="bfloat16")(x, target=ref.target)
    r, h = ref.relevance["input_ids"], e.relevance["input_ids"]
    if mode == "contrastive":
        r, h = r.positive, h.positive
    assert h.dtype == np.float32
    assert _rel(h, r) < BOUND_L2["bfloat16"]
    for a, b in zip(h, r):
        top = lambda v: set(np.argsort(-v)[:5])  # noqa: E731
        assert len(top(a) & top(b)) >= 4


def test_half_model_with_float32_compute_is_unchanged(mlp, data):
    """compute_dtype="float32" on a bf16/fp16 model: the float32 computation of its weights,
    exactly (as before half compute existed); a float32 model's program is not touched."""
    for dtype in (torch.bfloat16, torch.float16):
        half = MLP().eval()
        half.load_state_dict(mlp.state_dict())
        half = half.to(dtype)
        ex = dlbjax.Explainer(half, data[:1].to(dtype))
        assert ex.compute_dtype == "float32"
        assert {v.dtype for e in ex.program.eqns for v in e.outputs} == {"float32"}
        rounded = MLP().eval()
        rounded.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
        a = ex(data.to(dtype)).relevance["x"]
        b = dlbjax.Explainer(rounded, data[:1])(data.to(dtype).float()).relevance["x"]
        np.testing.assert_array_equal(a, b)
    ex = dlbjax.Explainer(mlp, data[:1], compute_dtype="float32")
    assert ex.compute_dtype is None
    assert {v.dtype for e in ex.program.eqns for v in e.outputs} == {"float32"}


def test_half_model_with_half_compute_keeps_its_program(mlp, data):
    half = MLP().eval()
    half.load_state_dict(mlp.state_dict())
    half = half.to(torch.bfloat16)
    ex = dlbjax.Explainer(half, data[:1].to(torch.bfloat16), compute_dtype="bfloat16")
    none = dlbjax.Explainer(half, data[:1].to(torch.bfloat16), compute_dtype=None)
    # the same bf16 forward (plus the float32 interface), float32 results
    assert [v.dtype for v in ex.program.inputs] == ["float32"]
    assert len(ex.program.eqns) == len(none.program.eqns) + 2
    e = ex(data.to(torch.bfloat16))
    assert e.relevance["x"].dtype == np.float32
    np.testing.assert_allclose(e.prediction, np.asarray(none(data.to(torch.bfloat16)).prediction,
                                                        np.float32), rtol=1e-2, atol=1e-2)


def test_bad_compute_dtype_is_refused(mlp, data):
    with pytest.raises(ValueError, match="bfloat16"):
        dlbjax.Explainer(mlp, data[:1], compute_dtype="int8")


def test_half_compute_of_a_jax_function():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (8, 16)), "w2": jax.random.normal(k2, (16, 3))}

    def f(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    ref = dlbjax.Explainer(f, x, params=params)(x)
    ex = dlbjax.Explainer(f, x, params=params, compute_dtype="bfloat16")
    assert {c.dtype for c in ex.program.constants} == {"bfloat16"}
    e = ex(x, target=ref.target)
    assert e.relevance["x"].dtype == np.float32
    assert _rel(e.relevance["x"], ref.relevance["x"]) < BOUND_L2["bfloat16"]
