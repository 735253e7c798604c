"""The public API: input forms, Explanation fields, seeding per task, Explainer compile-once,
batch == loop (vmap), jit == eager, layers, and that the user's model is never changed."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from conftest import MLP, ResidualCNN, randomize_bn


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return randomize_bn(ResidualCNN()).eval()


@pytest.fixture(scope="module")
def cnn_explainer(cnn):
    x = torch.randn(1, 3, 12, 12)
    return dlbjax.Explainer(cnn, x)


def test_explanation_fields(cnn):
    x = torch.randn(3, 3, 12, 12)
    e = dlbjax.explain(cnn, x, layers=True)
    assert set(e.relevance) == {"x"} and e.relevance["x"].shape == (3, 3, 12, 12)
    assert e.prediction.shape == (3, 5) and e.target.shape == (3,)
    assert e.task == "classification" and e.mode == "default" and e.multiplier == 100.0
    assert e.conservation.seed.shape == (3,)
    # layers: inputs plus every relevance-carrying variable, keyed by module path / variable
    assert "x" in e.layers and any(k.startswith("stem.0/") for k in e.layers)
    assert any(k.startswith("fc/") for k in e.layers)
    fc = [v for k, v in e.layers.items() if k.startswith("fc/")][0]
    np.testing.assert_allclose(fc.sum(axis=-1), 100.0, rtol=1e-5)  # the seed sits on fc's output
    np.testing.assert_allclose(e.layers["x"], e.relevance["x"])
    assert "Explanation(" in repr(e) and "seed" in str(e.conservation)


def test_explainer_compiles_once_per_shape(cnn_explainer):
    ex = cnn_explainer
    before = ex.trace_count
    for seed in range(3):
        ex(torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed)))
    assert ex.trace_count == before + 1
    ex(torch.randn(2, 3, 12, 12), target=[1, 2])
    assert ex.trace_count == before + 1


def test_batch_equals_python_loop(cnn_explainer):
    ex = cnn_explainer
    data = torch.randn(7, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    before = ex.trace_count
    e = ex.batch(data, batch_size=3)
    assert ex.trace_count - before <= 1  # three chunks of the same shape: one compilation
    assert e.relevance["x"].shape == (7, 3, 12, 12)
    for i in range(7):
        r = ex(data[i:i + 1])
        np.testing.assert_allclose(e.relevance["x"][i], r.relevance["x"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e.prediction[i], r.prediction[0], rtol=1e-5, atol=1e-6)
        assert e.target[i] == r.target[0]
        assert e.conservation.bias[i] == pytest.approx(r.conservation.bias[0], rel=1e-5, abs=1e-6)


def test_jit_equals_eager(cnn):
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    for mode in ("default", "contrastive"):
        ex = dlbjax.Explainer(cnn, x, mode=mode)
        f = ex.relevance_function()
        shape = ex.program.outputs[0].shape
        seeds = [jnp.asarray(np.random.default_rng(0).random(shape), jnp.float32)
                 for _ in range(2 if mode == "contrastive" else 1)]
        args = (ex.constants, (jnp.asarray(x.numpy()),), tuple(seeds))
        eager = f(*args)
        jitted = jax.jit(f)(*args)
        for a, b in zip(eager.relevance["x"], jitted.relevance["x"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(eager.absorbed), np.asarray(jitted.absorbed),
                                   rtol=1e-5, atol=1e-6)


def test_vmap_of_relevance_function_equals_loop(cnn):
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    ex = dlbjax.Explainer(cnn, x[:1])
    f = ex.relevance_function()
    shape = ex.program.outputs[0].shape
    seeds = jnp.asarray(np.random.default_rng(1).random((4,) + shape), jnp.float32)
    rows = jnp.asarray(x.numpy())[:, None]
    batched = jax.jit(jax.vmap(lambda r, s: f(ex.constants, (r,), (s,)).relevance["x"][0]))(rows, seeds)
    for i in range(4):
        one = f(ex.constants, (rows[i],), (seeds[i],)).relevance["x"][0]
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), rtol=1e-5, atol=1e-6)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, left, right, scale: float = 1.0):
        return self.a(left) * scale + self.b(right)


@pytest.mark.parametrize("form", ["tuple", "dict", "dict_reordered"])
def test_input_forms_and_names(form):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    left, right = torch.randn(2, 4), torch.randn(2, 2)
    inputs = {"tuple": (left, right), "dict": {"left": left, "right": right},
              "dict_reordered": {"right": right, "left": left}}[form]
    e = dlbjax.explain(model, inputs)
    assert set(e.relevance) == {"left", "right"}
    assert e.relevance["left"].shape == (2, 4) and e.relevance["right"].shape == (2, 2)
    with torch.no_grad():
        np.testing.assert_allclose(e.prediction, model(left, right).numpy(), rtol=1e-5)
    # the add of the two branches splits relevance, the two inputs together hold it all
    c = e.conservation
    np.testing.assert_allclose(c.inputs + c.bias + c.lost, 100, rtol=1e-5)


def test_single_tensor_and_numpy_inputs():
    torch.manual_seed(0)
    model = MLP((5, 8, 3)).eval()
    x = torch.randn(2, 5)
    a = dlbjax.explain(model, x)
    b = dlbjax.Explainer(model, x)(x.numpy())
    np.testing.assert_allclose(a.relevance["x"], b.relevance["x"])


def test_targets_and_multiplier():
    torch.manual_seed(0)
    model = MLP((5, 8, 4)).eval()
    x = torch.randn(3, 5)
    ex = dlbjax.Explainer(model, x)
    e = ex(x, target=2)
    assert e.target.tolist() == [2, 2, 2]
    e2 = ex(x, target=np.array([0, 1, 3]))
    assert e2.target.tolist() == [0, 1, 3]
    e3 = dlbjax.explain(model, x, target=[0, 1, 3], multiplier=1.0)
    np.testing.assert_allclose(e3.relevance["x"] * 100, e2.relevance["x"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e3.conservation.seed, 1.0)


class OneLogit(nn.Module):
    def __init__(self, sigmoid=False):
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.sigmoid = sigmoid

    def forward(self, x):
        y = self.fc(x)
        return torch.sigmoid(y) if self.sigmoid else y


@pytest.mark.parametrize("sigmoid", [False, True])
def test_binary_single_logit_seeding(sigmoid):
    torch.manual_seed(1)
    model = OneLogit(sigmoid).eval()
    x = torch.randn(3, 4)
    e = dlbjax.explain(model, x)
    assert e.task == "binary" and e.target.tolist() == [0, 0, 0]
    np.testing.assert_allclose(e.conservation.seed, 100)
    ec = dlbjax.explain(model, x, mode="contrastive")
    with torch.no_grad():
        out = model(x).numpy()[:, 0]
    p = out if sigmoid else 1 / (1 + np.exp(-out))  # no second sigmoid after a sigmoid head
    np.testing.assert_allclose(ec.conservation.seed.positive, 100 * p, rtol=1e-5)
    np.testing.assert_allclose(ec.conservation.seed.negative, 100 * (1 - p), rtol=1e-4, atol=1e-4)
    with pytest.raises(dlbjax.TargetError):
        dlbjax.explain(model, x, target=1)


def test_binary_two_logits_is_two_class_classification():
    torch.manual_seed(2)
    model = MLP((4, 6, 2)).eval()
    x = torch.randn(3, 4)
    e = dlbjax.explain(model, x, task="binary-classification")
    assert e.task == "classification"
    with torch.no_grad():
        np.testing.assert_array_equal(e.target, model(x).argmax(1).numpy())


def test_regression_seeds_selected_outputs():
    torch.manual_seed(3)
    model = MLP((4, 6, 5)).eval()
    x = torch.randn(2, 4)
    ex = dlbjax.Explainer(model, x, task="regression")
    e_all = ex(x)
    e_two = ex(x, target=[1, 3])
    e1, e3 = ex(x, target=1), ex(x, target=3)
    np.testing.assert_allclose(e_all.conservation.seed, 100)
    # default mode is linear in the seed: M/2 at outputs 1 and 3
    np.testing.assert_allclose(e_two.relevance["x"], (e1.relevance["x"] + e3.relevance["x"]) / 2,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(dlbjax.TargetError):
        dlbjax.Explainer(model, x, task="regression", mode="contrastive")(x)
    with pytest.raises(dlbjax.TargetError):
        ex(x, target=[7])


def test_layers_have_readable_names_and_sum_rules(cnn):
    x = torch.randn(1, 3, 12, 12)
    e = dlbjax.explain(cnn, x, layers=True)
    names = list(e.layers)
    assert len(names) == len(set(names))
    add = [k for k in names if k.split("/")[-1].startswith("add")]
    assert add, names
    # the residual add's output relevance equals the relevance of what consumes it (relu, identity)
    relu_after_add = [k for k in names if k.endswith("relu_2") or k.endswith("relu_1")]
    assert relu_after_add


def test_model_is_never_changed():
    torch.manual_seed(0)
    model = randomize_bn(ResidualCNN())
    model.train()  # training mode: dlbjax must explain an eval copy and leave this one alone
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 12, 12)
    e = dlbjax.explain(model, x)
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(e.prediction, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_batch_axis_none_single_example():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):  # takes one example [6] and adds the batch axis itself
            return self.fc(x[None])

    torch.manual_seed(0)
    model = Unbatched().eval()
    x = torch.randn(6)
    ex = dlbjax.Explainer(model, x, batch_axis=None)
    e = ex(x)
    assert e.relevance["x"].shape == (6,)
    data = torch.randn(4, 6)
    eb = ex.batch(data)
    assert eb.relevance["x"].shape == (4, 6)
    np.testing.assert_allclose(eb.relevance["x"][2], ex(data[2]).relevance["x"], rtol=1e-5, atol=1e-6)


def test_progress_bar_batch(cnn_explainer):
    e = cnn_explainer.batch(torch.randn(5, 3, 12, 12), batch_size=2, progress=True)
    assert e.relevance["x"].shape[0] == 5


def test_replace_equals_a_fresh_explainer_without_exporting_again(cnn, monkeypatch):
    """Explainer.replace re-analyses the imported program under new options: the same relevance
    as an Explainer built with them, no second export, and the original Explainer unchanged."""
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    ex = dlbjax.Explainer(cnn, x[:1])
    before = ex(x)
    import dlbjax.importers as plan_module  # _plan calls importers.import_bound at call time

    def no_export(*args, **kwargs):
        raise AssertionError("replace() exported the model again")

    monkeypatch.setattr(plan_module, "import_bound", no_export)
    for changes in ({"mode": "contrastive"}, {"multiplier": 7.0, "layers": True},
                    {"product_rule": "dlb", "precompute_magnitudes": False}):
        other = ex.replace(**changes)
        assert other.config == ex.config.replace(**changes) and other.plan.program is ex.program
        monkeypatch.undo()
        fresh = dlbjax.Explainer(cnn, x[:1], **changes)
        monkeypatch.setattr(plan_module, "import_bound", no_export)
        got, want = other(x), fresh(x)
        assert got.mode == want.mode and got.multiplier == want.multiplier
        for k in want.relevance:
            np.testing.assert_array_equal(got.relevance[k], want.relevance[k])
        assert (got.layers is None) == (want.layers is None)
    after = ex(x)
    assert ex.mode == "default"
    np.testing.assert_array_equal(after.relevance["x"], before.relevance["x"])
    for bad in ({"compute_dtype": "float64"}, {"batch_axis": None}):
        with pytest.raises(ValueError, match="new Explainer"):
            ex.replace(**bad)
    with pytest.raises(TypeError, match="unknown option 'mdoe'"):
        ex.replace(mdoe="contrastive")
    with pytest.raises(ValueError, match="mode must be"):
        ex.replace(mode="sideways")
