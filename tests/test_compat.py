"""dlbjax.compat: the original DLBacktrace API (constructor, predict, evaluation, run_task, the
sampler, the views) returns the original's keys, with dlbjax.explain's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax import Streams
from dlbjax.compat import DLBacktrace, DLBAutoSampler
from conftest import MLP, ResidualCNN, randomize_bn

import hf_zoo


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    return model, x, DLBacktrace(model, (x,))


def test_predict_returns_node_io_with_the_model_output(mlp):
    model, x, dlb = mlp
    node_io = dlb.predict(x)
    out = node_io["output"]["output_values"]
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-5)
    # every intermediate value, keyed by its graph name, with the original's fields
    relus = [v for v in node_io.values() if v["func_name"] == "aten.relu.default"]
    assert len(relus) == 2
    first = torch.relu(model.net[0](x)).detach().numpy()
    assert any(np.allclose(v["output_values"], first, atol=1e-5) for v in relus)
    assert node_io["x"]["output_values"].shape == (4, 16)
    # temperature rescales only the reported output values (never relevance)
    hot = dlb.predict(x, temperature=2.0)
    torch.testing.assert_close(hot["output"]["output_values"], out / 2)
    torch.testing.assert_close(hot["output"]["input_values"], out)


def test_evaluation_keys_and_values_equal_explain(mlp):
    model, x, dlb = mlp
    dlb.predict(x)
    all_wt = dlb.evaluation()
    ref = dlbjax.explain(model, x, layers=True)
    keys = list(all_wt)
    assert keys[0] == "output" and keys[-1] == "x"
    np.testing.assert_array_equal(all_wt["x"], ref.relevance["x"])
    for k, v in ref.layers.items():
        if k != "x":
            np.testing.assert_array_equal(all_wt[k.rsplit("/", 1)[-1]], v)
    # the seed: 1 x multiplier at the argmax of every row
    seed = np.zeros((4, 10), np.float32)
    seed[np.arange(4), ref.target] = 100.0
    np.testing.assert_allclose(all_wt["output"], seed)
    # evaluation can be repeated after one predict (the original allows one), with a target
    again = dlb.evaluation(target_token_ids=3, multiplier=10.0)
    np.testing.assert_allclose(again["x"], dlbjax.explain(model, x, target=3, multiplier=10.0)
                               .relevance["x"], rtol=1e-5, atol=1e-6)
    # start_wt is honoured: the same one-hot seed gives the same relevance
    given = dlb.evaluation(start_wt=torch.from_numpy(seed))
    np.testing.assert_allclose(given["x"], ref.relevance["x"], rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="scaler"):
        dlb.evaluation(scaler=5.0)


def test_contrastive_and_bbox_evaluation(mlp):
    model, x, dlb = mlp
    dlb.predict(x)
    c = dlb.evaluation(mode="contrastive")
    ref = dlbjax.explain(model, x, mode="contrastive", layers=True)
    assert isinstance(c["x"], Streams)
    np.testing.assert_array_equal(c["x"].positive, ref.relevance["x"].positive)
    np.testing.assert_array_equal(c["x"].negative, ref.relevance["x"].negative)
    torch.manual_seed(1)
    box = MLP(sizes=(16, 8, 4)).eval()
    dlb_box = DLBacktrace(box, x)
    dlb_box.predict(x)
    w = dlb_box.evaluation(task="bbox-regression")
    np.testing.assert_allclose(w["output"], np.full((4, 4), 25.0))
    np.testing.assert_allclose(w["x"], dlbjax.explain(box, x, task="bbox-regression")
                               .relevance["x"], rtol=1e-5, atol=1e-6)


def test_run_task_tabular(mlp):
    model, x, dlb = mlp
    r = dlb.run_task(inputs=x, return_scores=True, return_relevance=True,
                     return_layerwise_output=True)
    assert r["task"] == "tabular-classification"
    assert {"task", "node_io", "relevance", "predictions", "scores_trace", "relevance_trace",
            "layerwise_output_trace"} <= set(r)
    assert r["scores_trace"][0] is r["predictions"] and r["relevance_trace"][0] is r["relevance"]
    assert r["layerwise_output_trace"][0] is r["node_io"]
    np.testing.assert_array_equal(r["relevance"]["x"], dlbjax.explain(model, x, layers=True)
                                  .relevance["x"])


def test_run_task_image_cnn():
    torch.manual_seed(0)
    model = randomize_bn(ResidualCNN()).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    dlb = DLBacktrace(model, x, device="cpu")
    r = dlb.run_task(inputs=x)
    assert r["task"] == "image-classification"
    ref = dlbjax.explain(model, x, layers=True)
    np.testing.assert_array_equal(r["relevance"]["x"], ref.relevance["x"])
    torch.testing.assert_close(r["predictions"], model(x).detach(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r["relevance"]["output"].sum(-1), 100.0, rtol=1e-6)


def test_text_classification_bert():
    model = hf_zoo.tiny("bert")
    enc = hf_zoo.inputs("bert")
    args = (enc["input_ids"], enc["attention_mask"])
    dlb = DLBacktrace(model, args)
    r = dlb.run_task(inputs=args)  # BERT cannot generate: auto -> text-classification
    assert r["task"] == "text-classification"
    ref = dlbjax.explain(model, args, layers=True)
    rel = r["relevance"]
    assert rel["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(rel["input_ids"], ref.relevance["input_ids"])
    assert np.all(rel["attention_mask"] == 0)
    torch.testing.assert_close(r["predictions"], model(*args).logits.detach(), rtol=1e-4,
                               atol=1e-4)


def test_misuse_errors(mlp):
    model, x, _ = mlp
    with pytest.raises(ValueError):
        DLBacktrace(model, x, device="tpu")
    fresh = DLBacktrace(model, x)
    with pytest.raises(RuntimeError, match="predict"):
        fresh.evaluation()
    with pytest.raises(dlbjax.TargetError):
        fresh.run_task(task="object-detection", inputs=x)
    with pytest.raises(NotImplementedError):
        fresh.run_task(inputs=x, save_relevance=True)
    threads = torch.get_num_threads()
    fresh.predict(x)
    fresh.evaluation()
    assert torch.get_num_threads() == threads  # no process-wide setting changed


def test_sampler_strategy_rule():
    pick = DLBAutoSampler._strategy
    assert pick("auto", None, None, None, 1) == ("greedy", {})
    assert pick("auto", 1.0, 0, 1.5, 1) == ("greedy", {})
    assert pick("auto", 0.7, None, None, 1)[0] == "sample"
    assert pick("auto", None, 5, None, 1) == ("sample", dict(temperature=1.0, top_k=5, top_p=None))
    assert pick("auto", 0.7, 5, 0.9, 3) == ("beam", dict(num_beams=3))
    assert DLBAutoSampler._steps(2, 4) == [0, 1] and DLBAutoSampler._steps([3, 1], 4) == [1, 3]


@pytest.mark.skipif(not hasattr(dlbjax, "generate"), reason="dlbjax.generate is not available yet")
def test_run_task_generation_keeps_every_step():
    model = hf_zoo.tiny("llama")
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dlb = DLBacktrace(model, dict(enc, use_cache=False))
    r = dlb.run_task(inputs=enc, max_new_tokens=3, return_relevance=True, return_scores=True,
                     eos_token_id=[])
    assert r["task"] == "generation"
    g = r["generation"]
    assert r["generated_ids"].shape == (1, 8)
    np.testing.assert_array_equal(r["generated_ids"].numpy(), g.sequences)
    assert [t["input_ids"].shape for t in r["relevance_trace"]] == [(1, 5), (1, 6), (1, 7)]
    for s, t in enumerate(r["relevance_trace"]):
        np.testing.assert_array_equal(t["input_ids"], g.token_relevance[:, s, :5 + s])
        np.testing.assert_allclose(t["input_ids"].sum(), g.explanation.conservation.inputs[s],
                                   rtol=1e-5)
    assert r["relevance"] is r["relevance_trace"][-1]
    assert len(r["scores_trace"]) == 3 and r["scores_trace"][0].shape == (1, 128)
    # greedy: each step's token is the argmax of its scores
    chosen = [int(s.argmax()) for s in r["scores_trace"]]
    assert chosen == r["generated_ids"][0, 5:].tolist()


def _plot_graph_available() -> bool:
    try:
        from dlbjax._views import plot_graph  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _plot_graph_available(),
                    reason="dlbjax._views.plot_graph is being written by another engineer")
def test_views_write_files(mlp, tmp_path):
    model, x, dlb = mlp
    dlb.predict(x)
    dlb.evaluation()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the graph gets the real data flow (program=)
        figs = [dlb.visualize(save_path=str(tmp_path / "graph.png")),
                dlb.visualize_dlbacktrace(output_path=str(tmp_path / "backtrace_graph"), top_k=5)]
    import matplotlib.pyplot as plt
    for f in figs:
        if isinstance(f, plt.Figure):
            plt.close(f)
    assert (tmp_path / "graph.png").exists() and (tmp_path / "backtrace_graph.png").exists()
