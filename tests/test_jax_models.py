"""Native JAX models explained without ``params=`` (``importers/_jax_models.py``): Flax NNX, Flax
Linen and Equinox models built with the same weights as a torch model give the torch import's
forward and relevance (default and contrastive mode, within 1e-5 relative); a batch equals its
rows (jit, vmap); training-mode models are explained in inference mode and the user's object is
left byte-identical; parameters and module paths read like the torch importer's."""

from __future__ import annotations

import inspect

import equinox as eqx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import nnx

import dlbjax

MODES = ["default", "contrastive"]


MEASURED: list = []  # max relative differences seen (printed with -s)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if np.abs(b).max() == 0:
        np.testing.assert_array_equal(a, 0)
        return 0.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())
    MEASURED.append(float(np.abs(a - b).max() / np.abs(b).max()))
    print(f"max relative difference {MEASURED[-1]:.2e}")
    return MEASURED[-1]


def _streams(r, f=lambda a: a):
    """A relevance entry as one array (contrastive: positive and negative stacked)."""
    if isinstance(r, dlbjax.Streams):
        return np.stack([f(np.asarray(r.positive)), f(np.asarray(r.negative))])
    return f(np.asarray(r))


def _nchw_to_nhwc(a):
    return np.moveaxis(a, -3, -1)


def _copy_linear(lin: nn.Linear, kernel, bias):
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(kernel).T.copy()))  # [in,out] -> [out,in]
        lin.bias.copy_(torch.from_numpy(np.asarray(bias)))


def _copy_conv(conv: nn.Conv2d, kernel, bias):
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(bias)))


def _copy_bn(bn: nn.BatchNorm2d, scale, bias, mean, var):
    with torch.no_grad():
        for t, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean),
                     (bn.running_var, var)):
            t.copy_(torch.from_numpy(np.asarray(v)))


def _snapshot(tree):
    """Every array leaf of a pytree as bytes (PRNG keys by their key data)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, (jax.Array, np.ndarray)):
            a = np.asarray(leaf)
            out.append((jax.tree_util.keystr(path), a.dtype.str, a.shape, a.tobytes()))
        else:
            out.append((jax.tree_util.keystr(path), repr(leaf)))
    return out


# ---- Flax NNX: the MLP ---------------------------------------------------------------------------
class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(10, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 12, rngs=rngs)
        self.l3 = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def _torch_mlp(m):
    t = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    for lin, src in zip((t[0], t[2], t[4]), (m.l1, m.l2, m.l3)):
        _copy_linear(lin, src.kernel.value, src.bias.value)
    return t.eval()


# ---- Flax NNX: a CNN with batch norm, residual adds, max and avg pools (NHWC) --------------------
class NnxCNN(nnx.Module):
    def __init__(self, rngs, p_drop=0.0):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, rngs=rngs)
        self.conv3 = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
        self.drop = nnx.Dropout(p_drop, rngs=rngs)
        self.dense = nnx.Linear(2 * 2 * 8, 6, rngs=rngs)

    def __call__(self, x):  # [N, 8, 8, 3]
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)) + h)  # residual
        h = nnx.max_pool(h, (2, 2), (2, 2))
        h = nnx.relu(self.conv3(h)) + h  # residual
        h = nnx.avg_pool(h, (2, 2), (2, 2))
        h = self.drop(h)
        return self.dense(h.reshape(h.shape[0], -1))


def _randomize_bn(bn, rng):
    """Non-trivial eval statistics (and affine parameters)."""
    n = bn.mean.value.shape[0]
    bn.mean.value = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
    bn.var.value = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    bn.scale.value = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
    bn.bias.value = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)


class TorchCNN(nn.Module):
    def __init__(self, m: NnxCNN):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.dense = nn.Linear(32, 6)
        for c, s in ((self.conv1, m.conv1), (self.conv2, m.conv2), (self.conv3, m.conv3)):
            _copy_conv(c, s.kernel.value, s.bias.value)
        for b, s in ((self.bn1, m.bn1), (self.bn2, m.bn2)):
            _copy_bn(b, s.scale.value, s.bias.value, s.mean.value, s.var.value)
        _copy_linear(self.dense, m.dense.kernel.value, m.dense.bias.value)

    def forward(self, x):  # NCHW
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = nn.functional.max_pool2d(h, 2)
        h = torch.relu(self.conv3(h)) + h
        h = nn.functional.avg_pool2d(h, 2)
        return self.dense(h.permute(0, 2, 3, 1).flatten(1))  # flatten in NHWC order, as flax


def _nnx_cnn(seed=0, p_drop=0.0):
    m = NnxCNN(nnx.Rngs(seed), p_drop)
    rng = np.random.default_rng(seed + 10)
    _randomize_bn(m.bn1, rng)
    _randomize_bn(m.bn2, rng)
    for layer in (m.conv1, m.conv2, m.conv3, m.dense):  # nnx initialises biases to zero
        layer.bias.value = jnp.asarray(rng.normal(0, 0.1, layer.bias.value.shape), jnp.float32)
    return m


@pytest.fixture(scope="module")
def mlp_case():
    m = NnxMLP(nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32)
    return m, x, _torch_mlp(m)


@pytest.fixture(scope="module")
def cnn_case():
    m = _nnx_cnn()
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype(np.float32)
    return m, x, TorchCNN(m).eval()


def _eval_forward(m, x):
    """The NNX model's own inference output, on a clone (the fixture's module stays as is)."""
    c = nnx.clone(m)
    c.eval()
    return np.asarray(c(jnp.asarray(x)))


@pytest.mark.parametrize("mode", MODES)
def test_nnx_mlp_equals_torch(mlp_case, mode):
    m, x, t = mlp_case
    ej = dlbjax.explain(m, jnp.asarray(x), mode=mode)
    et = dlbjax.explain(t, torch.from_numpy(x), mode=mode)
    _close(ej.prediction, _eval_forward(m, x))
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["input"]))


@pytest.mark.parametrize("method", ["lrp-epsilon", "epsilon-plus", "gradient-x-input"])
def test_nnx_mlp_other_methods_equal_torch(mlp_case, method):
    m, x, t = mlp_case
    ej = dlbjax.explain(m, jnp.asarray(x), method=method)
    et = dlbjax.explain(t, torch.from_numpy(x), method=method)
    _close(ej.relevance["x"], et.relevance["input"])


LRP_METHODS = ["lrp-epsilon", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"]


def _lrp_kwargs(method):
    return dict(low=-4.0, high=4.0) if "box" in method else {}


@pytest.mark.parametrize("method", LRP_METHODS)
def test_lrp_on_a_flax_batch_norm_folds_it_as_torch(cnn_case, method):
    """The LRP family folds batch norms into the layer before (canonize); a Flax BatchNorm is
    fused from its written-out equations and folded through the conv's channel-last permute
    (passes/canonize.py), so the relevance equals the torch twin's, whose BatchNorm2d is
    folded (unfolded, it was 18x off)."""
    m, x, t = cnn_case
    kw = _lrp_kwargs(method)
    ex = dlbjax.Explainer(m, x, method=method, **kw)
    assert not any(e.op == "dlbjax.fused" and e.source.module_path.startswith("bn")
                   for e in ex.plan.program.eqns)  # both batch norms folded
    ej = ex(x)
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), method=method, **kw)
    _close(ej.prediction, _eval_forward(m, x))
    _close(ej.relevance["x"], _nchw_to_nhwc(np.asarray(et.relevance["x"])))


def test_dlb_and_gradient_methods_keep_the_flax_batch_norm_fused(cnn_case):
    m, x, t = cnn_case
    ex = dlbjax.Explainer(m, x)
    assert sum(e.op == "dlbjax.fused" and e.source.module_path.startswith("bn")
               for e in ex.plan.program.eqns) == 2
    ej = dlbjax.explain(m, x, method="gradient-x-input")
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                        method="gradient-x-input")
    _close(ej.relevance["x"], _nchw_to_nhwc(np.asarray(et.relevance["x"])))


class NnxBnMLP(nnx.Module):
    """A BatchNorm right after a dense layer (no permute between): folded into the linear."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(10, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


@pytest.mark.parametrize("method", ["lrp-epsilon", "epsilon-alpha2-beta1", "dlb"])
def test_flax_batch_norm_after_a_dense_layer_equals_torch(method):
    m = NnxBnMLP(nnx.Rngs(5))
    rng = np.random.default_rng(6)
    _randomize_bn(m.bn, rng)
    m.l1.bias.value = jnp.asarray(rng.normal(0, 0.1, 16), jnp.float32)
    t = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    _copy_linear(t[0], m.l1.kernel.value, m.l1.bias.value)
    _copy_bn(t[1], m.bn.scale.value, m.bn.bias.value, m.bn.mean.value, m.bn.var.value)
    _copy_linear(t[3], m.l2.kernel.value, m.l2.bias.value)
    x = rng.normal(size=(3, 10)).astype(np.float32)
    ex = dlbjax.Explainer(m, x, method=method)
    fused = [e for e in ex.plan.program.eqns if e.op == "dlbjax.fused"]
    assert len(fused) == (1 if method == "dlb" else 0)
    ej = ex(x)
    et = dlbjax.explain(t.eval(), torch.from_numpy(x), method=method)
    _close(ej.prediction, _eval_forward(m, x))
    _close(ej.relevance["x"], et.relevance["input"])


class NnxBnAfterRelu(nnx.Module):
    """A BatchNorm after an activation: nothing affine directly before it to fold into."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.bn(nnx.relu(self.conv(x)))
        return self.dense(h.reshape(h.shape[0], -1))


def test_lrp_on_a_flax_batch_norm_that_cannot_fold_is_refused():
    m = NnxBnAfterRelu(nnx.Rngs(0))
    _randomize_bn(m.bn, np.random.default_rng(3))
    x = np.random.default_rng(4).normal(size=(2, 4, 4, 3)).astype(np.float32)
    for method in ("lrp-epsilon", "epsilon-plus-flat"):
        with pytest.raises(dlbjax.MethodError, match="BatchNorm at 'bn'"):
            dlbjax.explain(m, x, method=method)
    e = dlbjax.explain(m, x)  # DLB explains it
    assert np.isfinite(np.asarray(e.relevance["x"])).all()


@pytest.mark.parametrize("mode", MODES)
def test_nnx_cnn_equals_torch(cnn_case, mode):
    m, x, t = cnn_case
    ej = dlbjax.explain(m, x, mode=mode)
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), mode=mode)
    _close(ej.prediction, _eval_forward(m, x))
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["x"], _nchw_to_nhwc))
    for f in ("seed", "inputs", "bias"):
        _close(_streams(getattr(ej.conservation, f)), _streams(getattr(et.conservation, f)))


def test_nnx_names_and_module_paths(cnn_case):
    m, x, _ = cnn_case
    ex = dlbjax.Explainer(m, x)
    names = {v.name for v in ex.program.constants}
    assert {"conv1.kernel", "conv1.bias", "conv2.kernel", "bn1.mean", "dense.kernel",
            "dense.bias"} <= names, names
    paths = {e.source.module_path for e in ex.program.eqns}
    assert {"conv1", "bn1", "conv2", "conv3", "dense"} <= paths, paths
    conv = [e for e in ex.program.eqns if e.op == "aten.convolution.default"]
    assert [e.source.module_path for e in conv] == ["conv1", "conv2", "conv3"]
    assert ex.plan.model_name == "NnxCNN"


def test_nnx_batch_equals_rows_jit_and_vmap(cnn_case):
    m, x, _ = cnn_case
    ex = dlbjax.Explainer(m, x[:1])
    whole = ex(x)
    for i in range(len(x)):
        _close(whole.relevance["x"][i], ex(x[i:i + 1]).relevance["x"][0])
    batched = ex.batch(x, batch_size=2)
    _close(batched.relevance["x"], whole.relevance["x"])
    f = ex.relevance_function()
    shape = ex.program.outputs[0].shape
    seeds = jnp.asarray(np.random.default_rng(4).random((len(x),) + shape), jnp.float32)
    rows = jnp.asarray(x)[:, None]
    out = jax.jit(jax.vmap(lambda r, s: f(ex.constants, (r,), (s,)).relevance["x"][0]))(
        rows, seeds)
    for i in range(len(x)):
        _close(out[i], f(ex.constants, (rows[i],), (seeds[i],)).relevance["x"][0])


def test_nnx_training_mode_is_explained_in_inference_and_left_unchanged():
    m = _nnx_cnn(seed=3, p_drop=0.5)  # nnx modules start in training mode
    assert m.bn1.use_running_average is False and m.drop.deterministic is False
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
    before = _snapshot(nnx.state(m))
    count = int(m.drop.rngs.count.value)
    e1 = dlbjax.explain(m, x)
    e2 = dlbjax.explain(m, x, mode="contrastive")
    assert _snapshot(nnx.state(m)) == before  # BatchNorm stats, RNG key and count
    assert int(m.drop.rngs.count.value) == count
    assert m.bn1.use_running_average is False and m.drop.deterministic is False
    assert type(m.conv1) is nnx.Conv  # the named-scope wrapping was on the copy only
    _close(e1.prediction, _eval_forward(m, x))  # Dropout off, running statistics
    _close(e2.prediction, e1.prediction)
    et = dlbjax.explain(TorchCNN(m).train(), torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    _close(e1.relevance["x"], _nchw_to_nhwc(np.asarray(et.relevance["x"])))


# ---- the flax.nnx MNIST tutorial's CNN ----------------------------------------------------------
class TutorialCNN(nnx.Module):
    """The CNN of the Flax NNX MNIST tutorial (conv-relu-avgpool twice, two dense layers)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


class TorchTutorialCNN(nn.Module):
    def __init__(self, m: TutorialCNN):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.linear1, self.linear2 = nn.Linear(3136, 256), nn.Linear(256, 10)
        _copy_conv(self.conv1, m.conv1.kernel.value, m.conv1.bias.value)
        _copy_conv(self.conv2, m.conv2.kernel.value, m.conv2.bias.value)
        _copy_linear(self.linear1, m.linear1.kernel.value, m.linear1.bias.value)
        _copy_linear(self.linear2, m.linear2.kernel.value, m.linear2.bias.value)

    def forward(self, x):
        x = nn.functional.avg_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.linear1(x.permute(0, 2, 3, 1).flatten(1)))
        return self.linear2(x)


def test_nnx_mnist_tutorial_cnn_end_to_end():
    m = TutorialCNN(rngs=nnx.Rngs(0))
    x = np.random.default_rng(6).random((2, 28, 28, 1)).astype(np.float32)
    e = dlbjax.explain(m, x)
    assert e.relevance["x"].shape == x.shape
    c = e.conservation
    np.testing.assert_allclose(c.seed, 100.0)
    np.testing.assert_allclose(c.inputs + c.bias + c.lost, c.seed, rtol=1e-5)
    t = TorchTutorialCNN(m).eval()
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    _close(e.prediction, m(jnp.asarray(x)))
    _close(e.prediction, et.prediction)
    _close(e.relevance["x"], _nchw_to_nhwc(np.asarray(et.relevance["x"])))
    for f in ("seed", "inputs", "bias", "lost"):
        np.testing.assert_allclose(getattr(c, f), getattr(et.conservation, f), rtol=1e-4,
                                   atol=1e-4)


# ---- Flax Linen: a small CNN with batch norm and dropout, switched by `train` -------------------
class LinenCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x, train: bool = True):  # [N, 8, 8, 3]
        x = fnn.Conv(6, (3, 3), padding="SAME", name="conv")(x)
        x = fnn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = fnn.relu(x)
        x = fnn.max_pool(x, (2, 2), (2, 2))
        x = fnn.Dropout(0.5, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = fnn.relu(fnn.Dense(10, name="fc1")(x))
        return fnn.Dense(4, name="fc2")(x)


class TorchLinenCNN(nn.Module):
    def __init__(self, v):
        super().__init__()
        p, s = v["params"], v["batch_stats"]
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(96, 10), nn.Linear(10, 4)
        _copy_conv(self.conv, p["conv"]["kernel"], p["conv"]["bias"])
        _copy_bn(self.bn, p["bn"]["scale"], p["bn"]["bias"], s["bn"]["mean"], s["bn"]["var"])
        _copy_linear(self.fc1, p["fc1"]["kernel"], p["fc1"]["bias"])
        _copy_linear(self.fc2, p["fc2"]["kernel"], p["fc2"]["bias"])

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.permute(0, 2, 3, 1).flatten(1))))


@pytest.fixture(scope="module")
def linen_case():
    module = LinenCNN()
    x = np.random.default_rng(7).normal(size=(3, 8, 8, 3)).astype(np.float32)
    v = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), train=False)
    rng = np.random.default_rng(8)
    v = jax.tree_util.tree_map(lambda a: a, dict(v))
    v = {"params": v["params"], "batch_stats": {"bn": {
        "mean": jnp.asarray(rng.normal(0, 0.5, 6), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)}}}
    return module, v, x, TorchLinenCNN(v).eval()


@pytest.mark.parametrize("mode", MODES)
def test_linen_cnn_equals_torch(linen_case, mode):
    module, v, x, t = linen_case
    before = _snapshot(v)
    ej = dlbjax.explain((module, v), x, mode=mode)  # `train` detected and set to False
    assert _snapshot(v) == before
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), mode=mode)
    _close(ej.prediction, module.apply(v, x, train=False))
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["x"], _nchw_to_nhwc))


@pytest.mark.parametrize("method", ["lrp-epsilon", "epsilon-alpha2-beta1"])
def test_linen_batch_norm_folds_under_lrp_as_torch(linen_case, method):
    module, v, x, t = linen_case
    ej = dlbjax.explain((module, v), x, method=method)
    et = dlbjax.explain(t, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), method=method)
    _close(ej.prediction, module.apply(v, x, train=False))
    _close(ej.relevance["x"], _nchw_to_nhwc(np.asarray(et.relevance["x"])))


def test_linen_bound_and_apply_kwargs(linen_case):
    module, v, x, _ = linen_case
    ex = dlbjax.Explainer((module, v), x)
    assert {"conv.kernel", "bn.mean", "bn.bias", "fc1.kernel"} <= \
        {c.name for c in ex.program.constants}
    assert {"conv", "bn", "fc1", "fc2"} <= \
        {e.source.module_path for e in ex.program.eqns}
    e = ex(x)
    _close(dlbjax.explain(module.bind(v), x).relevance["x"], e.relevance["x"])
    _close(dlbjax.explain((module, v, {"train": False}), x).relevance["x"], e.relevance["x"])
    with pytest.raises(TypeError, match="variables"):
        dlbjax.Explainer(module, x)  # unbound: no variables
    with pytest.raises(TypeError, match="holds its own parameters"):
        dlbjax.Explainer((module, v), x, params=v)


# ---- Equinox: an MLP and a CNN (per-example models, vmapped over the rows) ---------------------
def _torch_from_eqx_mlp(m):
    layers = []
    for i, lin in enumerate(m.layers):
        t = nn.Linear(lin.in_features, lin.out_features)
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(np.asarray(lin.weight)))  # already [out, in]
            t.bias.copy_(torch.from_numpy(np.asarray(lin.bias)))
        layers.append(t)
        if i < len(m.layers) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


class EqxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    drop: eqx.nn.Dropout
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
        self.drop = eqx.nn.Dropout(0.5)  # training mode (inference=False)
        self.fc = eqx.nn.Linear(4 * 3 * 3, 5, key=k2)

    def __call__(self, x, *, key=None):  # [C, H, W], one example
        h = jax.nn.relu(self.conv(x))
        h = eqx.nn.MaxPool2d(2, 2)(h)
        h = self.drop(h, key=key)
        return self.fc(h.reshape(-1))


class TorchEqxCNN(nn.Module):
    def __init__(self, m: EqxCNN):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(36, 5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(np.asarray(m.conv.weight)))  # OIHW
            self.conv.bias.copy_(torch.from_numpy(np.asarray(m.conv.bias).reshape(-1)))
            self.fc.weight.copy_(torch.from_numpy(np.asarray(m.fc.weight)))
            self.fc.bias.copy_(torch.from_numpy(np.asarray(m.fc.bias)))

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("mode", MODES)
def test_equinox_mlp_equals_torch(mode):
    m = eqx.nn.MLP(10, 5, 16, 2, key=jax.random.PRNGKey(0))
    x = np.random.default_rng(9).normal(size=(4, 10)).astype(np.float32)
    before = _snapshot(m)
    ej = dlbjax.explain(m, x, mode=mode)
    assert _snapshot(m) == before
    et = dlbjax.explain(_torch_from_eqx_mlp(m), torch.from_numpy(x), mode=mode)
    _close(ej.prediction, jax.vmap(m)(x))
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["input"]))


@pytest.mark.parametrize("mode", MODES)
def test_equinox_cnn_equals_torch(mode):
    m = EqxCNN(jax.random.PRNGKey(1))
    x = np.random.default_rng(10).normal(size=(3, 2, 6, 6)).astype(np.float32)
    before = _snapshot(m)
    ex = dlbjax.Explainer(m, x, mode=mode)
    assert _snapshot(m) == before and m.drop.inference is False
    assert {"conv.weight", "conv.bias", "fc.weight", "fc.bias"} <= \
        {c.name for c in ex.program.constants}
    ej = ex(x)
    et = dlbjax.explain(TorchEqxCNN(m).eval(), torch.from_numpy(x), mode=mode)
    inference = eqx.nn.inference_mode(m)
    _close(ej.prediction, jax.vmap(inference)(x))
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["x"]))


# ---- wrong combinations --------------------------------------------------------------------------
def test_wrong_combinations_raise_type_error(mlp_case):
    m, x, t = mlp_case
    with pytest.raises(TypeError, match="holds its own parameters"):
        dlbjax.Explainer(m, x, params=nnx.state(m))
    with pytest.raises(TypeError, match="holds its own parameters"):
        dlbjax.explain(eqx.nn.MLP(10, 5, 4, 1, key=jax.random.PRNGKey(0)), x, params={})
    with pytest.raises(TypeError, match="params="):
        dlbjax.Explainer(lambda p, x: x, x)
    with pytest.raises(TypeError):
        dlbjax.Explainer(t, torch.from_numpy(x), params={})
    with pytest.raises(TypeError):
        dlbjax.Explainer(42, x)


def test_dict_and_tuple_inputs():
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(4, 3, rngs=rngs), nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, left, right):
            return self.a(left) + self.b(right)

    m = Two(nnx.Rngs(0))
    rng = np.random.default_rng(11)
    left, right = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 2)).astype(
        np.float32)
    et = dlbjax.explain(m, (left, right))
    ed = dlbjax.explain(m, {"left": left, "right": right})
    assert set(et.relevance) == {"input0", "input1"} and set(ed.relevance) == {"left", "right"}
    _close(ed.relevance["left"], et.relevance["input0"])
    _close(ed.prediction, m(left, right))


# ---- Hugging Face Flax models ------------------------------------------------------------------
def test_hugging_face_flax_models():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FlaxBertModel"):
        pytest.skip(f"transformers {transformers.__version__} ships no Flax models "
                    f"(FlaxBertModel was removed in transformers 5)")
    # an older transformers: a tiny random Flax BERT classifier, as (module, variables)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.FlaxBertForSequenceClassification(config, seed=0)
    ids = np.array([[1, 5, 7, 2]], np.int32)
    mask = np.ones_like(ids)

    def fn(params, input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, params=params).logits

    e = dlbjax.explain(fn, {"input_ids": ids, "attention_mask": mask}, params=model.params)
    _close(e.prediction, fn(model.params, ids, mask))


def test_signature_detection_is_documented():
    from dlbjax.importers import _jax_models
    assert "train" in _jax_models._LINEN_INFERENCE and "apply_kwargs" in _jax_models.__doc__
    assert "flax.nnx.Module" in inspect.getdoc(dlbjax.Explainer)
    assert "equinox.Module" in inspect.getdoc(dlbjax.explain)


# ---- Equinox: a stateful BatchNorm, explained as (model, eqx.nn.State) -------------------------
class EqxBnCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: eqx.nn.BatchNorm
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 4, 3, padding=1, key=k1)
        self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")  # training mode
        self.fc = eqx.nn.Linear(4 * 6 * 6, 5, key=k2)

    def __call__(self, x, state):  # [C, H, W], one example
        h, state = self.bn(self.conv(x), state)
        return self.fc(jax.nn.relu(h).reshape(-1)), state


class TorchEqxBnCNN(nn.Module):
    def __init__(self, m: EqxBnCNN, state):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Linear(144, 5)
        mean, var = state.get(m.bn.ema_state_index)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(np.asarray(m.conv.weight)))
            self.conv.bias.copy_(torch.from_numpy(np.asarray(m.conv.bias).reshape(-1)))
            self.fc.weight.copy_(torch.from_numpy(np.asarray(m.fc.weight)))
            self.fc.bias.copy_(torch.from_numpy(np.asarray(m.fc.bias)))
        _copy_bn(self.bn, m.bn.weight, m.bn.bias, mean, var)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def eqx_bn_case():
    m, state = eqx.nn.make_with_state(EqxBnCNN)(jax.random.PRNGKey(2))
    rng = np.random.default_rng(11)
    state = state.set(m.bn.ema_state_index, (jnp.asarray(rng.normal(0, 0.5, 4), jnp.float32),
                                             jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)))
    state = state.set(m.bn.ema_first_time_index, jnp.array(False))
    m = eqx.tree_at(lambda t: (t.bn.weight, t.bn.bias), m,
                    (jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32),
                     jnp.asarray(rng.normal(0, 0.2, 4), jnp.float32)))
    x = rng.normal(size=(3, 2, 6, 6)).astype(np.float32)
    return m, state, x, TorchEqxBnCNN(m, state).eval()


@pytest.mark.parametrize("mode", MODES)
def test_equinox_stateful_batch_norm_equals_torch(eqx_bn_case, mode):
    m, state, x, t = eqx_bn_case
    before = _snapshot((m, state))
    assert m.bn.inference is False
    ex = dlbjax.Explainer((m, state), x, mode=mode)
    ej = ex(x)
    assert _snapshot((m, state)) == before and m.bn.inference is False
    state.get(m.bn.ema_state_index)  # still usable (State.set was called on a copy)
    own = jax.vmap(eqx.nn.inference_mode(m), in_axes=(0, None), out_axes=(0, None),
                   axis_name="batch")(jnp.asarray(x), state)[0]
    _close(ej.prediction, own)
    et = dlbjax.explain(t, torch.from_numpy(x), mode=mode)
    _close(ej.prediction, et.prediction)
    _close(_streams(ej.relevance["x"]), _streams(et.relevance["x"]))


def test_equinox_names_and_module_paths(eqx_bn_case):
    m, state, x, _ = eqx_bn_case
    ex = dlbjax.Explainer((m, state), x)
    assert {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.ema_state_index.0",
            "bn.ema_state_index.1", "fc.weight"} <= {c.name for c in ex.program.constants}
    by_path = {e.source.module_path: e.source.module_type for e in ex.program.eqns}
    assert by_path["conv"].endswith("Conv2d") and by_path["fc"].endswith("Linear")
    bn = [e for e in ex.program.eqns if e.source.module_path == "bn"]
    assert [e.op for e in bn] == ["dlbjax.fused"] and bn[0].source.module_type.endswith(
        "BatchNorm")
    assert [e.source.module_path for e in ex.program.eqns
            if e.op == "aten.linear.default"] == ["fc"]
    # the same explanation as the Explainer on the plain call
    _close(dlbjax.explain((m, state), x).relevance["x"], ex(x).relevance["x"])


@pytest.mark.parametrize("method", ["lrp-epsilon", "epsilon-plus-flat", "epsilon-alpha2-beta1"])
def test_equinox_batch_norm_folds_under_lrp_as_torch(eqx_bn_case, method):
    """Equinox's BatchNorm (channels first, after the conv's squeezed batch axis) is folded into
    the convolution too."""
    m, state, x, t = eqx_bn_case
    ex = dlbjax.Explainer((m, state), x, method=method)
    assert not any(e.op == "dlbjax.fused" for e in ex.plan.program.eqns)
    ej = ex(x)
    et = dlbjax.explain(t, torch.from_numpy(x), method=method)
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["x"], et.relevance["x"])
