"""Explanation.save / Explanation.load / dlbjax.load_explanation: one .npz, no pickle, and the
loaded explanation equals the saved one (Streams and Conservation restored)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax import Conservation, Explanation, Streams
from dlbjax._views import layer_flow


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return model, torch.randn(4, 5)


def _roundtrip(e, tmp_path, name="e.npz"):
    path = e.save(tmp_path / name)
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        files = set(data.files)
        for key in files:
            assert data[key].dtype != object
    loaded = Explanation.load(path)
    assert loaded == e and dlbjax.load_explanation(path) == e
    return loaded, files


def _same_arrays(a, b):
    assert type(a) is type(b)
    if isinstance(a, Streams):
        _same_arrays(a.positive, b.positive)
        _same_arrays(a.negative, b.negative)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_default_roundtrip(mlp, tmp_path):
    model, x = mlp
    e = dlbjax.explain(model, x)
    loaded, files = _roundtrip(e, tmp_path)
    assert {"relevance/input", "prediction", "target", "conservation/seed", "conservation/lost",
            "__dlbjax__"} <= files
    _same_arrays(loaded.relevance["input"], e.relevance["input"])
    _same_arrays(loaded.prediction, e.prediction)
    _same_arrays(loaded.target, e.target)
    assert isinstance(loaded.conservation, Conservation)
    _same_arrays(loaded.conservation.bias, e.conservation.bias)
    assert (loaded.mode, loaded.task, loaded.multiplier) == (e.mode, e.task, e.multiplier)
    assert loaded.layers is None and loaded.experts is None
    assert list(loaded.outputs) == list(e.outputs)
    assert str(loaded.conservation) == str(e.conservation)
    with zipfile.ZipFile(tmp_path / "e.npz") as z:
        meta = json.loads(str(np.load(z.open("__dlbjax__.npy"))))
    assert meta["format"] == "dlbjax-explanation" and meta["format_version"] == 1
    assert meta["dlbjax_version"] == dlbjax.__version__ and meta["mode"] == "default"
    assert meta["streams"] == []


def test_contrastive_roundtrip(mlp, tmp_path):
    model, x = mlp
    c = dlbjax.explain(model, x, mode="contrastive", multiplier=10.0)
    loaded, files = _roundtrip(c, tmp_path)
    assert {"relevance/input/positive", "relevance/input/negative",
            "conservation/seed/positive"} <= files
    assert isinstance(loaded.relevance["input"], Streams)
    _same_arrays(loaded.relevance["input"], c.relevance["input"])
    assert isinstance(loaded.conservation.seed, Streams)
    _same_arrays(loaded.conservation.lost, c.conservation.lost)
    assert loaded.mode == "contrastive" and loaded.multiplier == 10.0


def test_layers_roundtrip_with_inputs_and_flow(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(128, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    ex = dlbjax.Explainer(model, x, layers=True)
    e = ex(x)
    e.inputs = {"input": x.numpy()}
    e.flow = layer_flow(ex, e.layers)
    loaded, files = _roundtrip(e, tmp_path, "layers")  # the suffix is added
    assert (tmp_path / "layers.npz").exists()
    assert list(loaded.layers) == list(e.layers)
    assert any(k.startswith("layers/0/") for k in files)  # "<module path>/<variable>"
    for k in e.layers:
        _same_arrays(loaded.layers[k], e.layers[k])
    _same_arrays(loaded.inputs["input"], e.inputs["input"])
    assert loaded.flow["order"] == e.flow["order"]
    assert loaded.flow["edges"] == [tuple(x) for x in e.flow["edges"]]
    # a loaded explanation draws like the original
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dlbjax._views import relevance_graph
    assert relevance_graph(loaded, 3) == relevance_graph(e, 3)
    fig = loaded.plot(path=tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert any(im.get_cmap().name == "gray" for ax in fig.axes for im in ax.images)  # the input
    plt.close("all")


def test_contrastive_layers_roundtrip(mlp, tmp_path):
    model, x = mlp
    c = dlbjax.explain(model, x[:2], mode="contrastive", layers=True)
    loaded, _ = _roundtrip(c, tmp_path)
    for k, v in c.layers.items():
        assert isinstance(loaded.layers[k], Streams)
        _same_arrays(loaded.layers[k], v)


def _experts_explanation(contrastive: bool):
    g = np.random.default_rng(0)

    def val(shape):
        if contrastive:
            return Streams(g.random(shape).astype(np.float32), g.random(shape).astype(np.float32))
        return g.random(shape).astype(np.float32)

    rows = 2
    zeros = np.zeros(rows, np.float32)
    cons = Conservation(*((Streams(zeros, zeros) if contrastive else zeros),) * 4)
    return Explanation(
        relevance={"input_ids": val((rows, 5)), "attention_mask": val((rows, 5))},
        prediction=g.random((rows, 5, 16)).astype(np.float32), target=np.array([3, 7]),
        conservation=cons, mode="contrastive" if contrastive else "default",
        task="classification", multiplier=100.0,
        outputs={"logits": g.random((rows, 5, 16)).astype(np.float32)},
        experts=[{"layer": f"model.layers.{i}.mlp", "per_expert": val((rows, 4)),
                  "per_token": val((rows, 5, 4))} for i in range(2)])


@pytest.mark.parametrize("contrastive", [False, True])
def test_experts_roundtrip(contrastive, tmp_path):
    e = _experts_explanation(contrastive)
    loaded, files = _roundtrip(e, tmp_path)
    assert {"experts/0/per_expert", "experts/1/per_token"} <= {f.rsplit("/", 1)[0]
                                                               if contrastive else f
                                                               for f in files}
    assert [x["layer"] for x in loaded.experts] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for a, b in zip(loaded.experts, e.experts):
        assert list(a) == list(b)
        _same_arrays(a["per_expert"], b["per_expert"])
        _same_arrays(a["per_token"], b["per_token"])


def test_equality_sees_differences(mlp, tmp_path):
    model, x = mlp
    e = dlbjax.explain(model, x)
    loaded = Explanation.load(e.save(tmp_path / "e.npz"))
    loaded.relevance["input"] = loaded.relevance["input"].copy()
    loaded.relevance["input"][0, 0] += 1e-3
    assert loaded != e
    other = Explanation.load(tmp_path / "e.npz")
    other.multiplier = 50.0
    assert other != e
    assert Explanation.load(tmp_path / "e") == e  # the suffix may be left out


def test_odd_names_do_not_collide(tmp_path):
    r = np.arange(6, dtype=np.float32).reshape(2, 3)
    zeros = np.zeros(2, np.float32)
    e = Explanation(relevance={"x": r}, prediction=r, target=np.array([0, 1]),
                    conservation=Conservation(zeros, zeros, zeros, zeros), mode="default",
                    task="regression", multiplier=1.0,
                    layers={"x": r, "a/b": Streams(r + 1, r + 5), "a": r + 2,
                            "a/b/positive": r + 3, "blk.0/v ä": r + 4})
    loaded, _ = _roundtrip(e, tmp_path)
    for k in e.layers:
        _same_arrays(loaded.layers[k], e.layers[k])


def test_refuses_foreign_files(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved dlbjax Explanation"):
        dlbjax.load_explanation(tmp_path / "plain.npz")
    meta = json.dumps({"format": "dlbjax-explanation", "format_version": 99, "entries": []})
    np.savez(tmp_path / "future.npz", __dlbjax__=np.array(meta))
    with pytest.raises(ValueError, match="upgrade dlbjax"):
        dlbjax.load_explanation(tmp_path / "future.npz")
    zeros = np.zeros(1)
    bad = Explanation(relevance={"x": np.array([object()])}, prediction=zeros, target=zeros,
                      conservation=Conservation(zeros, zeros, zeros, zeros), mode="default",
                      task="regression", multiplier=1.0)
    with pytest.raises(TypeError, match="object array"):
        bad.save(tmp_path / "bad.npz")
