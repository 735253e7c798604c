"""Scale: data-parallel sharding over several (CPU) devices, half-precision models explained in
float32, automatic chunking on out-of-memory, max_batch, precomputed |W|, the opt-in
compilation cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
import torch

import dlbjax
from conftest import MLP, ResidualCNN, randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return randomize_bn(ResidualCNN()).eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(10, 16, generator=torch.Generator().manual_seed(2))


# ---- several devices -----------------------------------------------------------------------------
_MULTI = """
import os, sys, numpy as np, torch
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
sys.path.insert(0, {tests!r})
import dlbjax
from conftest import MLP, ResidualCNN
assert jax.device_count() == 4, jax.devices()
mlp = MLP().eval(); mlp.load_state_dict(torch.load({mlp_w!r}))
cnn = ResidualCNN().eval(); cnn.load_state_dict(torch.load({cnn_w!r}))
x = torch.from_numpy(np.load({x!r})); img = torch.from_numpy(np.load({img!r}))
ex = dlbjax.Explainer(mlp, x[:1])
# the rows of one call are laid out over the 4 devices
arrays, n = ex.plan.rows(x[:8]); cl, sel = ex.plan.task.check(None, n, ex.plan.out_size)
raw = ex.runner.call(arrays, cl, sel)
assert len(raw.relevance["x"][0].sharding.device_set) == 4
out = {{}}
out["batch"] = ex.batch(x, batch_size=6).relevance["x"]          # 6 -> 8 rows per call
out["call"] = ex(x[:3]).relevance["x"]                            # 3 rows, padded to 4
ex.explain_dataset(x, batch_size=4, out={ds!r}, shard_rows=4, progress=False)
c = dlbjax.Explainer(cnn, img[:1])
e = c.batch(img, batch_size=4)
out["cnn"], out["cnn_pred"] = e.relevance["x"], e.prediction
np.savez({res!r}, **out)
"""


def test_multi_device_equals_one_device(mlp, cnn, data, tmp_path):
    img = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    paths = {k: str(tmp_path / f) for k, f in (("mlp_w", "mlp.pt"), ("cnn_w", "cnn.pt"),
                                                ("x", "x.npy"), ("img", "img.npy"),
                                                ("res", "res.npz"), ("ds", "ds"))}
    torch.save(mlp.state_dict(), paths["mlp_w"])
    torch.save(cnn.state_dict(), paths["cnn_w"])
    np.save(paths["x"], data.numpy())
    np.save(paths["img"], img.numpy())
    script = _MULTI.format(tests=os.path.join(ROOT, "tests"), **paths)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(paths["res"])
    assert jax.device_count() == 1  # this process: one device
    ex = dlbjax.Explainer(mlp, data[:1])
    one = ex.batch(data, batch_size=6).relevance["x"]
    np.testing.assert_allclose(got["batch"], one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["call"], ex(data[:3]).relevance["x"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dlbjax.load_results(paths["ds"]).relevance["x"], one, rtol=1e-5,
                               atol=1e-5)
    e = dlbjax.Explainer(cnn, img[:1]).batch(img, batch_size=4)
    np.testing.assert_allclose(got["cnn"], e.relevance["x"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["cnn_pred"], e.prediction, rtol=1e-5, atol=1e-5)


# ---- half precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("which, dtype", [("mlp", torch.bfloat16), ("mlp", torch.float16),
                                          ("cnn", torch.bfloat16)])
def test_half_precision_is_explained_in_float32(which, dtype, mlp, cnn, data):
    model = mlp if which == "mlp" else cnn
    x = data[:4] if which == "mlp" else torch.randn(4, 3, 12, 12,
                                                   generator=torch.Generator().manual_seed(4))
    half = type(model)().eval()
    half.load_state_dict(model.state_dict())
    half = half.to(dtype)
    xh = x.to(dtype)
    ex = dlbjax.Explainer(half, xh[:1])
    assert ex.compute_dtype == "float32"
    assert all(v.dtype != str(dtype).split(".")[1] for v in ex.program.constants)
    e = ex(xh)
    assert e.relevance["x"].dtype == np.float32 and e.prediction.dtype == np.float32
    # exactly the float32 computation with the half-precision weights and inputs
    rounded = type(model)().eval()
    rounded.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ref = dlbjax.explain(rounded, xh.float(), target=e.target)
    np.testing.assert_allclose(e.relevance["x"], ref.relevance["x"], rtol=1e-5, atol=1e-5)
    # and close to the float32 model's relevance (half-precision weights and inputs)
    full = dlbjax.explain(model, x, target=e.target)
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    scale = np.abs(full.relevance["x"]).max()
    assert np.abs(e.relevance["x"] - full.relevance["x"]).max() <= tol * scale
    np.testing.assert_allclose(e.conservation.seed, 100.0, rtol=1e-6)
    # the prediction is a float32 forward: torch's half forward rounds more
    with torch.no_grad():
        torch_half = half(xh).float().numpy()
    np.testing.assert_allclose(e.prediction, torch_half, atol=0.1 * np.abs(torch_half).max())


def test_compute_dtype_none_keeps_half_precision(mlp, data):
    half = MLP().eval()
    half.load_state_dict(mlp.state_dict())
    half = half.to(torch.bfloat16)
    ex = dlbjax.Explainer(half, data[:1].to(torch.bfloat16), compute_dtype=None)
    assert ex.compute_dtype is None
    assert str(ex(data[:2].to(torch.bfloat16)).relevance["x"].dtype) == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype"):
        dlbjax.Explainer(half, data[:1].to(torch.bfloat16), compute_dtype="int8")


# ---- out of memory, max_batch --------------------------------------------------------------------
def test_out_of_memory_is_split_into_chunks(mlp, data, monkeypatch):
    ex = dlbjax.Explainer(mlp, data[:1])
    ref = ex(data)
    real = ex.runner.call
    sizes = []

    def tight(arrays, classes, select):
        sizes.append(len(classes))
        if len(classes) > 3:
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.")
        return real(arrays, classes, select)

    monkeypatch.setattr(ex.runner, "call", tight)
    with pytest.warns(UserWarning, match="out of memory"):
        e = ex(data)
    assert sizes[:3] == [10, 5, 3] and set(sizes[2:]) == {3}
    np.testing.assert_allclose(e.relevance["x"], ref.relevance["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(e.target, ref.target)
    assert ex.runner.chunk_limit == 3
    sizes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the learned size is used directly: no second warning
        b = ex.batch(data, batch_size=8)
    assert set(sizes) == {3}
    np.testing.assert_allclose(b.relevance["x"], ref.relevance["x"], rtol=1e-6, atol=1e-6)

    def broken(arrays, classes, select):
        raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: something else")

    monkeypatch.setattr(ex.runner, "call", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
        ex(data)


def test_max_batch_splits_calls(mlp, data):
    ex = dlbjax.Explainer(mlp, data[:1], max_batch=4)
    before = ex.trace_count
    e = ex(data)
    assert ex.trace_count == before + 1  # 10 rows as 4 + 4 + 2 (padded to 4): one shape
    ref = dlbjax.Explainer(mlp, data[:1])(data)
    np.testing.assert_allclose(e.relevance["x"], ref.relevance["x"], rtol=1e-6, atol=1e-6)


# ---- precomputed |W|, conv weights in the CPU filter layout ----------------------------------------
def test_precomputed_constants_change_nothing(cnn, mlp):

    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    ex = dlbjax.Explainer(cnn, x[:1])
    assert set(ex.plan.mags) == {"stem.0.weight", "conv1.weight", "conv2.weight", "fc.weight"}
    arrays, n = ex.plan.rows(x)
    classes, select = ex.plan.task.check(None, n, ex.plan.out_size)
    args = ex.runner.compiled_args(arrays, classes, select)
    laid = args[-1]
    assert set(laid["consts"]) == {"stem.0.weight", "conv1.weight", "conv2.weight"}
    assert laid["consts"]["stem.0.weight"].shape == (3, 3, 3, 8)  # [kh, kw, in, out]
    # the plain path: OIHW weights, |W| computed inside the pass
    plain = jax.device_get(ex.runner.fn(ex.plan.consts, *args[1:4], {}, None))
    np.testing.assert_array_equal(ex(x).relevance["x"], plain.relevance["x"][0].reshape(x.shape))
    assert dlbjax.Explainer(cnn, x[:1], precompute_magnitudes=False).plan.mags == {}
    assert dlbjax.Explainer(mlp, torch.randn(1, 16), mode="contrastive").plan.mags == {}  # W+, W-


# ---- compilation cache ---------------------------------------------------------------------------
def test_compilation_cache_is_opt_in(mlp, data, tmp_path):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    untouched = {k: getattr(jax.config, k) for k in keys}
    dlbjax.Explainer(mlp, data[:1])(data[:2])
    assert {k: getattr(jax.config, k) for k in keys} == untouched  # explaining changes nothing
    previous = dlbjax.enable_compilation_cache(tmp_path / "cache")
    try:
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        dlbjax.Explainer(mlp, data[:1], multiplier=7.0)(data[:3])
        assert any((tmp_path / "cache").iterdir())
    finally:
        for k, v in previous.items():
            jax.config.update(k, v)
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    assert {k: getattr(jax.config, k) for k in keys} == untouched
