"""Pictures of an Explanation (dlbjax._views): every picture is rendered to a file, and what it
shows is read back from the matplotlib artists (bar lengths, heatmap arrays, token colours, graph
nodes and edges) and compared with the explanation's numbers."""

from __future__ import annotations

import dataclasses

import re
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import dlbjax  # noqa: E402
from dlbjax import Streams  # noqa: E402
from dlbjax._views import layer_flow, relevance_graph  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _png_ok(path, min_bytes=2000):
    """The file exists, is not tiny, and is not one flat colour."""
    assert path.exists() and path.stat().st_size > min_bytes
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.01


# ------------------------------------------------------------------------------------------------
# tiny models (module scope: each is exported and compiled once)
# ------------------------------------------------------------------------------------------------
class ResCNN(nn.Module):
    """1x8x8 input: conv, relu, conv with a residual add, max pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        h = self.act(self.conv1(x))
        h = h + self.conv2(h)
        return self.fc(self.pool(h).flatten(1))


class MaskedBag(nn.Module):
    """Token ids and an attention mask: masked embeddings summed, then a linear head."""

    def __init__(self, vocab=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None].float()
        return self.fc(h.sum(1))


@pytest.fixture(scope="module")
def tabular():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.randn(3, 6)
    return dlbjax.explain(model, x), dlbjax.explain(model, x, mode="contrastive")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    model = ResCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    ex = dlbjax.Explainer(model, x, layers=True)
    return ex, ex(x), x


@pytest.fixture(scope="module")
def bag():
    torch.manual_seed(2)
    model = MaskedBag().eval()
    ids = torch.tensor([[4, 9, 17, 5, 0, 0], [3, 8, 2, 11, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": mask}
    return dlbjax.explain(model, inputs), dlbjax.explain(model, inputs, mode="contrastive"), ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real BERT WordPiece tokenizer from a 32-entry vocabulary written here (no download)."""
    tf = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "<b>",
             "a", "dog", "##s", "ran", "&"] + [f"w{i}" for i in range(16)]
    import inspect
    if "vocab" in inspect.signature(tf.BertTokenizer.__init__).parameters:  # transformers >= 5
        return tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return tf.BertTokenizer(vocab_file=str(path), do_lower_case=False)


def _hand_made(relevance, *, mode="default", layers=None, experts=None, inputs=None, rows=2):
    """An Explanation built by hand (for shapes no tiny model here produces)."""
    zeros = np.zeros(rows, np.float32)
    cons = (dlbjax.Conservation(*(Streams(zeros, zeros),) * 4) if mode == "contrastive"
            else dlbjax.Conservation(zeros + 100, zeros, zeros, zeros))
    return dlbjax.Explanation(relevance=relevance, prediction=np.zeros((rows, 3), np.float32),
                              target=np.arange(rows), conservation=cons, mode=mode,
                              task="classification", multiplier=100.0, layers=layers,
                              experts=experts, inputs=inputs)


# ------------------------------------------------------------------------------------------------
# tabular: bar chart
# ------------------------------------------------------------------------------------------------
def test_bar_chart_lengths_are_the_relevance(tabular, tmp_path):
    e, _ = tabular
    names = [f"f{i}" for i in range(6)]
    fig = dlbjax.plot(e, row=1, feature_names=names, path=tmp_path / "bars.png")
    _png_ok(tmp_path / "bars.png")
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    np.testing.assert_allclose(widths, e.relevance["input"][1], rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    # the method is the same picture
    fig2 = e.plot(row=1, feature_names=names)
    np.testing.assert_allclose([p.get_width() for p in fig2.axes[0].patches], widths)


def test_bar_chart_top_features_and_signs():
    r = np.array([[0.5, -4.0, 3.0, 0.1, -0.2, 2.0]], np.float32)
    e = _hand_made({"x": r}, rows=1)
    ax = dlbjax.plot(e, max_features=3).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x[1]", "x[2]", "x[5]"]
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [-4.0, 3.0, 2.0])
    colours = [p.get_facecolor()[:3] for p in ax.patches]
    assert colours[0][2] > colours[0][0] and colours[1][0] > colours[1][2]  # blue < 0, red > 0


def test_bar_chart_contrastive(tabular, tmp_path):
    _, c = tabular
    pos, neg = c.relevance["input"]
    fig = dlbjax.plot(c, row=0, path=tmp_path / "c.png")
    np.testing.assert_allclose([p.get_width() for p in fig.axes[0].patches], pos[0] - neg[0],
                               rtol=1e-5, atol=1e-6)
    fig = dlbjax.plot(c, row=0, contrastive="both")
    assert len(fig.axes) == 2
    np.testing.assert_allclose([p.get_width() for p in fig.axes[0].patches], pos[0], rtol=1e-6)
    np.testing.assert_allclose([p.get_width() for p in fig.axes[1].patches], neg[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# images: heatmap
# ------------------------------------------------------------------------------------------------
def _heatmaps(fig):
    return [im for ax in fig.axes for im in ax.images if im.get_cmap().name == "bwr"]


def test_heatmap_is_the_channel_sum(cnn, tmp_path):
    _, e, x = cnn
    fig = dlbjax.plot(e, row=1, image=x[1], path=tmp_path / "heat.png")
    _png_ok(tmp_path / "heat.png")
    (hm,) = _heatmaps(fig)
    np.testing.assert_allclose(hm.get_array(), e.relevance["x"][1].sum(0), rtol=1e-6)
    lo, hi = hm.get_clim()
    assert lo == -hi and hi == pytest.approx(np.abs(e.relevance["x"][1]).max())  # centred at 0
    shown = [im for ax in fig.axes for im in ax.images if im.get_cmap().name == "gray"]
    assert len(shown) == 1 and shown[0].get_array().shape == (8, 8)
    # x[1] min-max scaled
    xi = x[1, 0].numpy()
    np.testing.assert_allclose(shown[0].get_array(), (xi - xi.min()) / (xi.max() - xi.min()),
                               rtol=1e-5, atol=1e-6)


def test_heatmap_multichannel_contrastive_and_inputs():
    g = np.random.default_rng(0)
    pos, neg = g.random((2, 3, 4, 5)), g.random((2, 3, 4, 5))
    img = g.random((2, 3, 4, 5))
    e = _hand_made({"pixel_values": Streams(pos, neg)}, mode="contrastive",
                   inputs={"pixel_values": img})
    fig = dlbjax.plot(e, row=1)
    (hm,) = _heatmaps(fig)
    np.testing.assert_allclose(hm.get_array(), (pos[1] - neg[1]).sum(0))
    rgb = [im for ax in fig.axes for im in ax.images if im not in (hm,)]
    assert len(rgb) == 1 and rgb[0].get_array().shape == (4, 5, 3)  # the held input, as RGB
    fig = dlbjax.plot(e, row=1, contrastive="both")
    maps = _heatmaps(fig)
    assert len(maps) == 2
    np.testing.assert_allclose(maps[0].get_array(), pos[1].sum(0))
    np.testing.assert_allclose(maps[1].get_array(), neg[1].sum(0))
    # into a caller's Axes: the relevance panel alone
    f, ax = plt.subplots()
    assert dlbjax.plot(e, ax=ax) is f and len(ax.images) == 1
    # summed over rows
    (hm,) = _heatmaps(dlbjax.plot(e, row=None))
    np.testing.assert_allclose(hm.get_array(), (pos - neg).sum((0, 1)))


# ------------------------------------------------------------------------------------------------
# tokens: highlighted text and HTML
# ------------------------------------------------------------------------------------------------
def _tokens(fig, block=0):
    texts = [t for t in fig.axes[0].texts if (t.get_gid() or "").startswith(f"token:{block}:")]
    return sorted(texts, key=lambda t: int(t.get_gid().rsplit(":", 1)[1]))


def test_highlighted_tokens(bag, tmp_path):
    e, _, ids = bag
    toks = ["the", "<b>", "cat", "sat", "[PAD]", "[PAD]"]
    fig = dlbjax.plot(e, row=0, tokens=toks, path=tmp_path / "tokens.png")
    _png_ok(tmp_path / "tokens.png")
    texts = _tokens(fig)
    assert [t.get_text() for t in texts] == toks
    r = e.relevance["input_ids"][0]
    alphas = np.array([t.get_bbox_patch().get_facecolor()[3] for t in texts])
    assert np.all(r[4:] == 0) and np.all(alphas[4:] == 0)  # masked tokens: no colour
    assert int(np.argmax(alphas)) == int(np.argmax(np.abs(r))) and alphas.max() == 1.0
    np.testing.assert_allclose(alphas, np.abs(r) / np.abs(r).max(), rtol=1e-6)
    # the attention mask carries no relevance, so input_ids is chosen by default; ids when no
    # strings are given
    assert [t.get_text() for t in _tokens(dlbjax.plot(e, row=1, tokens=ids[1]))] == \
        [str(i) for i in ids[1].tolist()]


def test_tokens_decoded_with_a_tokenizer(bag, tokenizer):
    e, _, ids = bag
    fig = dlbjax.plot(e, row=1, tokens=ids[1], tokenizer=tokenizer)
    assert [t.get_text() for t in _tokens(fig)] == \
        tokenizer.convert_ids_to_tokens(ids[1].tolist())
    # the explanation keeps its inputs, so the ids are decoded without tokens=
    assert [t.get_text() for t in _tokens(dlbjax.plot(e, row=1, tokenizer=tokenizer))] == \
        tokenizer.convert_ids_to_tokens(ids[1].tolist())
    bare = _hand_made(dict(e.relevance))
    with pytest.raises(ValueError, match="tokens="):
        dlbjax.plot(bare, tokenizer=tokenizer)  # no ids to decode
    held = _hand_made(dict(e.relevance), inputs={"input_ids": ids.numpy()})
    assert [t.get_text() for t in _tokens(dlbjax.plot(held, row=1, tokenizer=tokenizer))] == \
        tokenizer.convert_ids_to_tokens(ids[1].tolist())


def test_long_token_rows_wrap(tmp_path):
    r = np.linspace(-1, 1, 120)[None]
    e = _hand_made({"input_ids": r}, rows=1)
    fig = dlbjax.plot(e, tokens=[f"token{i}" for i in range(120)], path=tmp_path / "long.png")
    _png_ok(tmp_path / "long.png")
    texts = _tokens(fig)
    ys = {round(t.get_position()[1], 3) for t in texts}
    assert len(ys) > 3  # several lines
    renderer = fig.canvas.get_renderer()
    assert max(t.get_window_extent(renderer).x1 for t in texts) <= fig.bbox.width
    colours = [t.get_bbox_patch().get_facecolor() for t in texts]
    assert colours[0][2] > colours[0][0] and colours[-1][0] > colours[-1][2]  # blue ... red


def test_contrastive_tokens_both_streams(bag):
    _, c, _ = bag
    fig = dlbjax.plot(c, row=0, contrastive="both")
    pos, neg = _tokens(fig, 0), _tokens(fig, 1)
    assert len(pos) == len(neg) == 6
    assert all(t.get_bbox_patch().get_facecolor()[0] > 0.5 for t in pos if
               t.get_bbox_patch().get_facecolor()[3] > 0)  # red
    assert all(t.get_bbox_patch().get_facecolor()[2] > 0.5 for t in neg if
               t.get_bbox_patch().get_facecolor()[3] > 0)  # blue


_SPAN = re.compile(r'<span class="dlbjax-token" style="background-color: rgba\((\d+), (\d+), '
                   r'(\d+), ([0-9.]+)\);[^"]*" title="([^"]+)">(.*?)</span>')


def test_html_tokens(bag):
    e, c, _ = bag
    toks = ["the", "<b>", "a & b", "sat", "[PAD]", "[PAD]"]
    out = dlbjax.to_html(e, 0, tokens=toks)
    spans = _SPAN.findall(out)
    assert [s[5] for s in spans] == ["the", "&lt;b&gt;", "a &amp; b", "sat", "[PAD]", "[PAD]"]
    assert "<b>" not in out
    r = e.relevance["input_ids"][0]
    alphas = np.array([float(s[3]) for s in spans])
    assert int(np.argmax(alphas)) == int(np.argmax(r)) and alphas.max() == 1.0
    assert np.all(alphas[4:] == 0)  # padding
    np.testing.assert_allclose([float(s[4]) for s in spans], r, rtol=1e-5)
    assert all((s[0], s[2]) == ("214", "28") for s in spans)  # red: default relevance >= 0
    assert e._repr_html_() == dlbjax.to_html(e) == e.to_html()
    # contrastive: positive - negative, blue where negative
    pos, neg = c.relevance["input_ids"]
    d = pos[1] - neg[1]
    spans = _SPAN.findall(dlbjax.to_html(c, 1))
    np.testing.assert_allclose([float(s[4]) for s in spans], d, rtol=1e-4, atol=1e-4)
    for s, v in zip(spans, d):
        assert (int(s[2]) > int(s[0])) == (v < 0)


def test_html_table_for_features(tabular):
    e, _ = tabular
    out = e.to_html(row=2, max_features=4)
    r = e.relevance["input"][2]
    cells = re.findall(r"<td>\d+</td><td>input\[(\d+)\]</td><td style=\"background-color: "
                       r"rgba\(\d+, \d+, \d+, ([0-9.]+)\);\" title=\"([^\"]+)\"", out)
    order = np.argsort(-np.abs(r), kind="stable")[:4]
    assert [int(c[0]) for c in cells] == order.tolist()
    np.testing.assert_allclose([float(c[2]) for c in cells], r[order], rtol=1e-5)
    assert float(cells[0][1]) == 1.0


# ------------------------------------------------------------------------------------------------
# the relevance flow graph
# ------------------------------------------------------------------------------------------------
def test_graph_needs_layers(tabular):
    e, _ = tabular
    with pytest.raises(dlbjax.NoLayersError, match="layers=True") as info:
        dlbjax.plot_graph(e)
    assert isinstance(info.value, dlbjax.DLBJaxError) and isinstance(info.value, ValueError)


def test_graph_follows_the_data_flow(cnn, tmp_path):
    ex, e, _ = cnn
    g = relevance_graph(e, None, program=ex)
    names = [n["name"] for n in g["nodes"]]
    assert names == ["x", "conv1", "act", "conv2", "add", "pool", "view", "fc"]
    assert set(g["edges"]) == {("x", "conv1"), ("conv1", "act"), ("act", "conv2"), ("act", "add"),
                               ("conv2", "add"), ("add", "pool"), ("pool", "view"),
                               ("view", "fc")}
    totals = {n["name"]: n["total"] for n in g["nodes"]}
    assert totals["fc"] == pytest.approx(float(e.layers["fc/linear"][0].sum()))
    assert totals["x"] == pytest.approx(float(e.relevance["x"][0].sum()))
    # top_k keeps the largest |total| and joins kept nodes through dropped ones
    g3 = relevance_graph(e, 3, program=ex)
    kept = [n["name"] for n in g3["nodes"]]
    by_size = sorted(totals, key=lambda n: -abs(totals[n]))
    assert len(kept) == 3 and set(kept) == set(by_size[:3])
    for a, b in g3["edges"]:
        assert names.index(a) < names.index(b)
    assert len(g3["edges"]) >= 2

    fig = dlbjax.plot_graph(e, top_k=None, engine="matplotlib", program=ex,
                            path=tmp_path / "graph.png")
    _png_ok(tmp_path / "graph.png")
    ax = fig.axes[0]
    nodes = [t.get_gid()[5:] for t in ax.texts if (t.get_gid() or "").startswith("node:")]
    edges = {tuple(t.get_gid()[5:].split("->")) for t in ax.texts
             if (t.get_gid() or "").startswith("edge:")}
    assert nodes == names and edges == set(g["edges"])
    label = next(t for t in ax.texts if t.get_gid() == "node:fc").get_text()
    assert f"{totals['fc']:.4g}" in label
    # the flow stored on the explanation gives the same graph, without a warning
    e2 = dlbjax.Explanation(**{**e.__dict__, "flow": layer_flow(ex, e.layers)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert relevance_graph(e2, None) == g


def test_graph_without_data_flow_warns(cnn, tmp_path):
    _, e, _ = cnn
    assert e.flow is not None  # an Explainer with layers=True records the flow
    e = dataclasses.replace(e, flow=None)
    with pytest.warns(UserWarning, match="no data flow"):
        fig = dlbjax.plot_graph(e, 4, engine="matplotlib", path=tmp_path / "g.png")
    _png_ok(tmp_path / "g.png")
    nodes = [t for t in fig.axes[0].texts if (t.get_gid() or "").startswith("node:")]
    edges = [t for t in fig.axes[0].texts if (t.get_gid() or "").startswith("edge:")]
    assert len(nodes) == 4 and len(edges) == 3


def test_graph_graphviz(cnn, tmp_path):
    pytest.importorskip("graphviz")
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("the Graphviz 'dot' program is not installed")
    ex, e, _ = cnn
    g = dlbjax.plot_graph(e, 5, program=ex, path=tmp_path / "graph.svg")
    svg = (tmp_path / "graph.svg").read_text()
    assert svg.lstrip().startswith("<?xml") or "<svg" in svg
    kept = [n["name"] for n in relevance_graph(e, 5, program=ex)["nodes"]]
    for name in kept:
        assert name in svg
    assert g.source.count("->") == len(relevance_graph(e, 5, program=ex)["edges"])
    dlbjax.plot_graph(e, 5, program=ex, path=tmp_path / "graph.png", engine="graphviz")
    _png_ok(tmp_path / "graph.png", min_bytes=1000)


# ------------------------------------------------------------------------------------------------
# MoE experts
# ------------------------------------------------------------------------------------------------
def test_plot_experts(tmp_path):
    g = np.random.default_rng(1)
    experts = [{"layer": f"model.layers.{i}.mlp", "per_expert": g.random((2, 4)),
                "per_token": g.random((2, 5, 4))} for i in range(3)]
    e = _hand_made({"input_ids": g.random((2, 5))}, experts=experts)
    fig = dlbjax.plot_experts(e, row=1, path=tmp_path / "experts.png")
    _png_ok(tmp_path / "experts.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), np.stack([x["per_expert"][1]
                                                                   for x in experts]))
    assert [t.get_text() for t in ax.get_yticklabels()] == [x["layer"] for x in experts]
    c = _hand_made({"input_ids": g.random((2, 5))}, mode="contrastive", experts=[
        {"layer": "moe", "per_expert": Streams(g.random((2, 4)), g.random((2, 4))),
         "per_token": Streams(g.random((2, 5, 4)), g.random((2, 5, 4)))}])
    pe = c.experts[0]["per_expert"]
    np.testing.assert_allclose(c.plot_experts(row=0).axes[0].images[0].get_array(),
                               (pe.positive[0] - pe.negative[0])[None])
    with pytest.raises(dlbjax.DLBJaxError, match="mixture-of-experts"):
        dlbjax.plot_experts(_hand_made({"x": g.random((2, 3))}))


def test_import_is_light():
    code = "import sys, dlbjax; print('matplotlib' in sys.modules, 'graphviz' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
