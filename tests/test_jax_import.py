"""The JAX importer (``dlbjax.importers.import_jax``) and ``Explainer(fn, x, params=...)``: the same
MLP and NHWC CNN written in JAX and in torch with identical weights give the same forward and the
same relevance in both modes; a batch equals its rows one by one (jit, vmap); a primitive without
a mapping is reported by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax.importers import import_jax
from twins import close as _close


# ---- the MLP -----------------------------------------------------------------------------------
def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(10, 16), (16, 12), (12, 5)]
    return {"layers": [{"kernel": rng.normal(0, 0.5, s).astype(np.float32),
                        "bias": rng.normal(0, 0.1, s[1]).astype(np.float32)} for s in sizes]}


def mlp(params, x):
    layers = params["layers"]
    for i, layer in enumerate(layers):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def _torch_mlp(params):
    mods = []
    layers = params["layers"]
    for i, layer in enumerate(layers):
        lin = nn.Linear(*layer["kernel"].shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(layer["kernel"].T.copy()))  # [in,out] -> [out,in]
            lin.bias.copy_(torch.from_numpy(layer["bias"]))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


# ---- the NHWC CNN ------------------------------------------------------------------------------
def _cnn_params(seed=1):
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": rng.normal(0, 0.4, (3, 3, 3, 4)).astype(np.float32),  # HWIO
                     "bias": rng.normal(0, 0.1, 4).astype(np.float32)},
            "dense": {"kernel": rng.normal(0, 0.3, (4 * 4 * 4, 6)).astype(np.float32),
                      "bias": rng.normal(0, 0.1, 6).astype(np.float32)}}


def cnn(params, x, pool="max"):  # x: [N, 8, 8, 3]
    y = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + params["conv"]["bias"])
    if pool == "max":
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    else:
        y = jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    y = y.reshape(y.shape[0], -1)
    return y @ params["dense"]["kernel"] + params["dense"]["bias"]


class TorchCNN(nn.Module):
    def __init__(self, params, pool="max"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        self.dense = nn.Linear(64, 6)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(
                params["conv"]["kernel"].transpose(3, 2, 0, 1).copy()))  # HWIO -> OIHW
            self.conv.bias.copy_(torch.from_numpy(params["conv"]["bias"]))
            self.dense.weight.copy_(torch.from_numpy(params["dense"]["kernel"].T.copy()))
            self.dense.bias.copy_(torch.from_numpy(params["dense"]["bias"]))

    def forward(self, x):  # x: NCHW
        y = self.pool(torch.relu(self.conv(x)))
        return self.dense(y.permute(0, 2, 3, 1).flatten(1))  # flatten in NHWC order, as JAX




@pytest.fixture(scope="module")
def mlp_case():
    params = _mlp_params()
    x = np.random.default_rng(2).normal(size=(4, 10)).astype(np.float32)
    return params, x, _torch_mlp(params)


@pytest.fixture(scope="module", params=["max", "avg"])
def cnn_case(request):
    params = _cnn_params()
    x = np.random.default_rng(3).normal(size=(3, 8, 8, 3)).astype(np.float32)
    pool = request.param
    return (params, x, TorchCNN(params, pool).eval(),
            lambda p, x: cnn(p, x, pool))


def test_program_names_and_forward(mlp_case):
    params, x, _ = mlp_case
    program = import_jax(mlp, params, x[:1])
    assert program.input_names() == ("x",)
    names = {v.name for v in program.constants}
    assert {"layers.0.kernel", "layers.0.bias", "layers.2.bias"} <= names
    assert [e.op for e in program.eqns].count("aten.linear.default") == 3
    assert "aten.relu.default" in [e.op for e in program.eqns]
    ex = dlbjax.Explainer(mlp, x, params=params)
    _close(ex(x).prediction, mlp(params, x))


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_mlp_relevance_equals_torch(mlp_case, mode):
    params, x, tmodel = mlp_case
    ej = dlbjax.explain(mlp, jnp.asarray(x), params=params, mode=mode)
    et = dlbjax.explain(tmodel, torch.from_numpy(x), mode=mode)
    _close(ej.prediction, mlp(params, x))
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["x"], et.relevance["input"])  # nn.Sequential.forward(input)
    if mode == "contrastive":
        assert np.asarray(ej.relevance["x"]).shape == (2,) + x.shape  # positive, negative


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_cnn_relevance_equals_torch(cnn_case, mode):
    params, x, tmodel, fn = cnn_case
    ej = dlbjax.explain(fn, x, params=params, mode=mode)
    et = dlbjax.explain(tmodel, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), mode=mode)
    _close(ej.prediction, fn(params, x))
    _close(ej.prediction, et.prediction)
    # NCHW -> NHWC (contrastive: both streams, positive and negative, stacked in front)
    _close(ej.relevance["x"], np.moveaxis(np.asarray(et.relevance["x"]), -3, -1))


def test_batch_equals_rows_jit_and_vmap(cnn_case):
    params, x, _, fn = cnn_case
    ex = dlbjax.Explainer(fn, x[:1], params=params)
    whole = ex(x)
    for i in range(len(x)):
        one = ex(x[i:i + 1])
        _close(whole.relevance["x"][i], one.relevance["x"][0])
    f = ex.relevance_function()
    shape = ex.program.outputs[0].shape
    seeds = jnp.asarray(np.random.default_rng(4).random((len(x),) + shape), jnp.float32)
    rows = jnp.asarray(x)[:, None]
    batched = jax.jit(jax.vmap(lambda r, s: f(ex.constants, (r,), (s,)).relevance["x"][0]))(
        rows, seeds)
    for i in range(len(x)):
        one = f(ex.constants, (rows[i],), (seeds[i],)).relevance["x"][0]
        _close(batched[i], one)


@pytest.mark.parametrize("op,name", [(jnp.sort, "sort"), (jnp.cumsum, "cumsum")])
def test_unsupported_primitive_is_named(mlp_case, op, name):
    params, x, _ = mlp_case

    def bad(params, x):
        with jax.named_scope("head"):
            return op(mlp(params, x), axis=-1)

    with pytest.raises(dlbjax.UnsupportedOperationError, match=name) as info:
        dlbjax.Explainer(bad, x, params=params)
    assert "head" in str(info.value)


def test_params_is_for_functions_only(mlp_case):
    params, x, tmodel = mlp_case
    with pytest.raises(TypeError):
        dlbjax.Explainer(tmodel, torch.from_numpy(x), params=params)
    with pytest.raises(TypeError):
        dlbjax.Explainer(mlp, x)


def test_inputs_named_and_activations_recognised():
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32)}

    def two(params, a, b):
        return jax.nn.silu(a @ params["w"]) + jax.nn.sigmoid(b) * 2.0

    a, b = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    program = import_jax(two, params, (a[:1], b[:1]))
    assert program.input_names() == ("input0", "input1")
    ops = [e.op for e in program.eqns]
    assert "aten.silu.default" in ops and "aten.sigmoid.default" in ops
    assert [v.name for v in program.constants] == ["w"]

    def kw(params, left, right):
        return two(params, left, right)

    program = import_jax(kw, params, {"left": a[:1], "right": b[:1]})
    assert program.input_names() == ("left", "right")
    ex = dlbjax.Explainer(kw, {"left": a, "right": b}, params=params, task="regression")
    _close(ex({"left": a, "right": b}).prediction, two(params, a, b))


def test_a_jitted_function_is_inlined(mlp_case):
    params, x, _ = mlp_case
    plain = dlbjax.explain(mlp, x, params=params)
    jitted = dlbjax.explain(jax.jit(mlp), x, params=params)
    _close(jitted.relevance["x"], plain.relevance["x"])


def test_bias_is_folded_only_into_a_single_use():
    rng = np.random.default_rng(6)
    params = {"w": rng.normal(size=(4, 4)).astype(np.float32),
              "b": rng.normal(size=4).astype(np.float32)}

    def residual(params, x):
        y = x @ params["w"]
        return (y + params["b"]) + y  # y is read twice: the bias must not enter the linear

    x = rng.normal(size=(3, 4)).astype(np.float32)
    program = import_jax(residual, params, x[:1])
    (lin,) = [e for e in program.eqns if e.op == "aten.linear.default"]
    assert lin.args[2] is None
    ex = dlbjax.Explainer(residual, x, params=params, task="regression")
    _close(ex(x).prediction, residual(params, x))
    program = import_jax(mlp, _mlp_params(), x[:1, :1].repeat(10, 1))
    assert all(e.args[2] is not None for e in program.eqns if e.op == "aten.linear.default")


def test_output_names_and_name_stacks(mlp_case):
    params, x, _ = mlp_case

    def two_heads(params, x):
        with jax.named_scope("body"):
            h = mlp(params, x)
        with jax.named_scope("head"):
            return {"logits": h, "probs": jax.nn.sigmoid(h)}

    program = import_jax(two_heads, params, x[:1])
    assert program.output_names == ("logits", "probs")
    paths = {e.source.module_path for e in program.eqns}
    assert {"body", "head"} <= paths
    ex = dlbjax.Explainer(two_heads, x, params=params, output="logits")
    _close(ex(x).prediction, mlp(params, x))


def test_softmax_is_recognised_and_equals_torch(mlp_case):
    params, x, tmodel = mlp_case

    def probs(params, x):
        return jax.nn.softmax(mlp(params, x), axis=-1)

    program = import_jax(probs, params, x[:1])
    assert program.eqns[-1].op == "aten.softmax.int"
    assert "aten.exp.default" not in [e.op for e in program.eqns]
    ej = dlbjax.explain(probs, x, params=params)
    et = dlbjax.explain(nn.Sequential(*tmodel, nn.Softmax(dim=-1)).eval(), torch.from_numpy(x))
    _close(ej.prediction, probs(params, x))
    _close(ej.relevance["x"], et.relevance["input"])


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_is_recognised_and_equals_torch(mlp_case, approximate):
    params, x, _ = mlp_case

    def gelu_mlp(params, x):
        layers = params["layers"]
        for i, layer in enumerate(layers):
            x = x @ layer["kernel"] + layer["bias"]
            if i < len(layers) - 1:
                x = jax.nn.gelu(x, approximate=approximate)
        return x

    program = import_jax(gelu_mlp, params, x[:1])
    assert [e.op for e in program.eqns].count("aten.gelu.default") == 2
    tmodel = _torch_mlp(params)
    for i in (1, 3):
        tmodel[i] = nn.GELU(approximate="tanh" if approximate else "none")
    ej = dlbjax.explain(gelu_mlp, x, params=params)
    et = dlbjax.explain(tmodel, torch.from_numpy(x))
    _close(ej.prediction, gelu_mlp(params, x))
    _close(ej.relevance["x"], et.relevance["input"])


def test_a_tied_kernel_is_one_constant():
    rng = np.random.default_rng(7)
    params = {"w": rng.normal(size=(4, 4)).astype(np.float32)}

    def tied(params, x):
        return jax.nn.relu(x @ params["w"]) @ params["w"]

    x = rng.normal(size=(2, 4)).astype(np.float32)
    program = import_jax(tied, params, x[:1])
    assert [v.name for v in program.constants] == ["w"]
    ex = dlbjax.Explainer(tied, x, params=params)
    _close(ex(x).prediction, tied(params, x))


def test_replace_and_batch_work_on_a_jax_plan(mlp_case):
    params, x, tmodel = mlp_case
    ex = dlbjax.Explainer(mlp, x[:1], params=params)
    _close(ex.batch(x, batch_size=3).relevance["x"], ex(x).relevance["x"])
    contrastive = ex.replace(mode="contrastive")
    et = dlbjax.explain(tmodel, torch.from_numpy(x), mode="contrastive")
    _close(contrastive(x).relevance["x"], et.relevance["input"])


def test_a_jax_model_needs_no_torch():
    """Explaining a JAX function or a Flax NNX module never imports torch: run in a process
    where ``import torch`` fails."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        "import jax, numpy as np\n"
        "from flax import nnx\n"
        "import dlbjax\n"
        "def f(p, x):\n"
        "    return jax.nn.relu(x @ p['w'] + p['b']) @ p['v']\n"
        "rng = np.random.default_rng(0)\n"
        "p = {'w': rng.normal(size=(3, 4)).astype('float32'), 'b': np.zeros(4, 'float32'),\n"
        "     'v': rng.normal(size=(4, 2)).astype('float32')}\n"
        "x = rng.normal(size=(5, 3)).astype('float32')\n"
        "e = dlbjax.explain(f, x, params=p, mode='contrastive')\n"
        "assert np.asarray(e.relevance['x']).shape == (2, 5, 3)\n"
        "m = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,\n"
        "                   nnx.Linear(4, 2, rngs=nnx.Rngs(1)))\n"
        "e = dlbjax.Explainer(m, x, method='lrp-epsilon')(x)\n"
        "assert np.isfinite(np.asarray(e.relevance['x'])).all()\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_the_primitive_table_lists_exactly_the_handled_primitives():
    """README's lax table (importers/_jax.py PRIMITIVE_MAP) names every primitive with a
    handler or an inlined call, and nothing else (patterns are marked by a space)."""
    from dlbjax.importers._jax import _INLINE, PRIMITIVE_MAP, _Translator
    handled = {n[2:] for n in dir(_Translator) if n.startswith("p_")} | set(_INLINE)
    assert {k for k in PRIMITIVE_MAP if " " not in k} == handled
