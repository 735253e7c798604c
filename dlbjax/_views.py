"""Pictures of an :class:`~dlbjax.Explanation`: heatmaps, highlighted tokens, bar charts, HTML,
the relevance flow through the layers and the experts of MoE layers.

* :func:`plot` draws the natural picture of one row's relevance for an input: a heatmap for
  image-like inputs, highlighted tokens for token ids, a horizontal bar chart for tabular rows.
* :func:`to_html` writes tokens coloured by relevance (or a table of the top features) as HTML;
  ``Explanation._repr_html_`` uses it, so a notebook shows an explanation coloured.
* :func:`plot_graph` draws the relevance that flows through the model's layers (``layers=True``)
  as a graph of the top-k modules, with graphviz when it is installed and matplotlib otherwise.
* :func:`plot_experts` draws a layers x experts heatmap of a mixture-of-experts explanation.

matplotlib (and graphviz) are imported inside the functions, so ``import dlbjax`` stays light.
Every function draws on a new figure unless ``ax`` is given, never changes matplotlib's global
settings, and works with the non-interactive Agg backend.
"""

from __future__ import annotations

import html
import importlib.util
import shutil
import warnings
from typing import Any, Mapping, Optional

import numpy as np

from ._errors import NoExpertsError, NoLayersError
from ._types import Streams

__all__ = ["plot", "plot_methods", "plot_experts", "plot_graph", "to_html", "relevance_graph",
           "layer_flow"]

_KINDS = ("image", "tokens", "tabular")
_CONTRASTIVE = ("difference", "both", "positive", "negative")
_RED, _BLUE = (0.84, 0.10, 0.11), (0.13, 0.40, 0.75)  # positive / negative relevance


# ------------------------------------------------------------------------------------------------
# selecting what to draw
# ------------------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _n_rows(e) -> int:
    t = e.target
    return 1 if t is None else int(np.asarray(t).reshape(-1).shape[0])


def _row(arr: Any, e, row: Optional[int]) -> np.ndarray:
    """One row of an array laid out [rows, ...] (or the sum over rows for ``row=None``). An
    unbatched explanation (``batch_axis=None``) has no row axis: the array is the example."""
    arr = _np(arr)
    n = _n_rows(e)
    batched = arr.ndim > 0 and arr.shape[0] == n
    if row is None:
        return arr.sum(0) if batched else arr
    if not batched:
        if row not in (0, -1):
            raise IndexError(f"row {row} is out of range: the explanation has 1 row")
        return arr
    if not -n <= row < n:
        raise IndexError(f"row {row} is out of range: the explanation has {n} rows")
    return arr[row]


def _streams(value: Any, e, row, contrastive: str) -> list[tuple[str, np.ndarray]]:
    """The panels to draw: [(label, row array)]; contrastive values per ``contrastive``."""
    if contrastive not in _CONTRASTIVE:
        raise ValueError(f"contrastive must be one of {_CONTRASTIVE}, not {contrastive!r}")
    if isinstance(value, Streams):
        pos = _row(value.positive, e, row).astype(np.float64)
        neg = _row(value.negative, e, row).astype(np.float64)
        return {"difference": [("positive - negative", pos - neg)],
                "both": [("positive", pos), ("negative", neg)],
                "positive": [("positive", pos)],
                "negative": [("negative", neg)]}[contrastive]
    return [("relevance", _row(value, e, row).astype(np.float64))]


def _net(value: Any) -> np.ndarray:
    """positive - negative for a Streams pair, the array otherwise."""
    if isinstance(value, Streams):
        return _np(value.positive).astype(np.float64) - _np(value.negative).astype(np.float64)
    return _np(value).astype(np.float64)


def _pick_input(e, name: Optional[str]) -> str:
    names = list(e.relevance)
    if not names:
        raise ValueError("the explanation holds no relevance")
    if name is not None:
        if name not in e.relevance:
            raise KeyError(f"no input {name!r} in the explanation; inputs are {names}")
        return name
    for n in names:  # the first input that carries relevance (not an attention mask)
        v = e.relevance[n]
        arrs = [v.positive, v.negative] if isinstance(v, Streams) else [v]
        if any(np.any(_np(a) != 0) for a in arrs):
            return n
    return names[0]


def _input_row(e, name: str, row) -> Optional[np.ndarray]:
    inputs = getattr(e, "inputs", None)
    if not inputs or name not in inputs or inputs[name] is None:
        return None
    return _row(inputs[name], e, 0 if row is None else row)


def _kind(e, name: str, r: np.ndarray, tokens, tokenizer, kind: Optional[str]) -> str:
    if kind is not None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, not {kind!r}")
        return kind
    if r.ndim >= 2:
        return "image"
    if tokens is not None or tokenizer is not None:
        return "tokens"
    x = _input_row(e, name, 0)
    if x is not None and x.dtype.kind in "iub":
        return "tokens"
    low = name.lower()
    if low.endswith("ids") or low in ("tokens", "token", "text", "input_tokens"):
        return "tokens"
    return "tabular"


def _image_2d(r: np.ndarray) -> np.ndarray:
    """A heatmap of a per-row relevance map: [H, W] as is, [C, H, W] summed over channels
    (channels-last [H, W, C] with C <= 4 summed over the last axis), higher ranks summed over
    every axis but the last two."""
    r = np.asarray(r, np.float64)
    if r.ndim == 2:
        return r
    if r.ndim == 3:
        channels_last = r.shape[-1] <= 4 and r.shape[0] > 4
        return r.sum(-1) if channels_last else r.sum(0)
    if r.ndim > 3:
        return r.reshape((-1,) + r.shape[-2:]).sum(0)
    return r.reshape(1, -1)


def _display_image(img: Any):
    """An input image for imshow: [H, W] grey, or [H, W, 3|4] colour scaled to [0, 1]."""
    x = _np(img).astype(np.float64)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 3:
        if x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
            x = np.moveaxis(x, 0, -1)
        elif x.shape[0] in (1, 3, 4) and x.shape[-1] in (1, 3, 4) and x.shape[0] < x.shape[-1]:
            x = np.moveaxis(x, 0, -1)
        if x.shape[-1] == 1:
            x = x[..., 0]
        elif x.shape[-1] not in (3, 4):
            x = x.mean(-1)
    elif x.ndim > 3:
        x = x.reshape((-1,) + x.shape[-2:]).mean(0)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return x, ("gray" if x.ndim == 2 else None)


def _token_labels(e, name: str, row, n_tokens: int, tokens, tokenizer) -> list[str]:
    """Token strings: ``tokens`` (strings, or ids decoded with ``tokenizer``), else the
    explanation's input ids decoded with ``tokenizer``, else the ids, else positions."""
    ids = None
    if tokens is not None:
        if hasattr(tokens, "detach") or isinstance(tokens, np.ndarray):
            ids = _np(tokens).reshape(-1).tolist()
        else:
            tokens = list(tokens)
            if tokens and all(isinstance(t, (int, np.integer)) for t in tokens):
                ids = [int(t) for t in tokens]
            else:
                labels = [str(t) for t in tokens]
                if len(labels) != n_tokens:
                    raise ValueError(f"got {len(labels)} tokens for {n_tokens} token relevances")
                return labels
    if ids is None:
        x = _input_row(e, name, row)
        if x is not None:
            ids = x.reshape(-1).tolist()
    if ids is None:
        if tokenizer is not None:
            raise ValueError("to decode tokens with tokenizer=, pass the token ids as tokens= "
                             "(e.g. tokens=inputs['input_ids'][row]); the explanation holds no "
                             "inputs")
        return [f"#{i}" for i in range(n_tokens)]
    ids = [int(i) for i in ids]
    if len(ids) != n_tokens:
        raise ValueError(f"got {len(ids)} token ids for {n_tokens} token relevances")
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [str(tokenizer.decode([i])) for i in ids]


def _colour(v: float, m: float) -> tuple[float, float, float, float]:
    """Red for positive, blue for negative relevance, opacity |v| / max|v|."""
    alpha = min(1.0, abs(v) / m) if m > 0 else 0.0
    return (*(_RED if v >= 0 else _BLUE), alpha)


def _title(e, name: str, row, extra: str = "") -> str:
    t = np.asarray(e.target).reshape(-1) if e.target is not None else None
    what = "all rows" if row is None else f"row {row}"
    tgt = "" if t is None or row is None or row >= len(t) else f", target {t[row]}"
    mode = "" if e.mode == "default" else f", {e.mode}"
    return f"{name}: {what}{tgt}{mode}{extra}"


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------
def plot(explanation, ax=None, *, input: Optional[str] = None, row: Optional[int] = 0,
         image: Any = None, tokens: Any = None, tokenizer: Any = None,
         feature_names: Any = None, path: Any = None, kind: Optional[str] = None,
         contrastive: str = "difference", max_features: int = 30):
    """Draw one row's relevance for one input as the picture that fits the input; return the
    matplotlib Figure (and save it to ``path`` when given).

    * **image-like** relevance (``[C, H, W]`` or ``[H, W]`` per row): a heatmap of the relevance
      summed over channels, on a signed colour map (``bwr``) centred at 0 with symmetric limits
      ``+-max|r|`` and a colour bar; the input image is drawn to its left when ``image=`` is given
      (or the explanation holds its ``inputs``).
    * **token** relevance (``input_ids``, ``[T]`` per row): the tokens as text in boxes whose
      background is red for positive and blue for negative relevance, with opacity
      ``|r| / max|r|`` (tokens with 0 relevance, such as padding, are left clear). The strings come
      from ``tokens=`` (strings, or ids decoded with ``tokenizer=``), else the explanation's input
      ids decoded with ``tokenizer=``, else the ids (else positions).
    * **tabular** relevance (``[F]`` per row): a horizontal bar chart, one bar per feature of
      length equal to its relevance (red positive, blue negative), labelled with
      ``feature_names``. With more than ``max_features`` features, the largest ``|r|`` are shown,
      largest first.

    ``input``: which input to draw (default: the first with non-zero relevance, e.g. input_ids
    rather than the attention mask). ``row``: the row (``None``: summed over rows). ``kind``:
    force "image", "tokens" or "tabular". Contrastive explanations (``Streams`` relevance) are
    drawn as positive minus negative (``contrastive="difference"``), as two panels
    (``"both"``), or one stream (``"positive"``/``"negative"``). ``ax``: draw the (first) relevance
    panel into this Axes, without the input image.
    """
    import matplotlib.pyplot as plt

    e = explanation
    name = _pick_input(e, input)
    panels = _streams(e.relevance[name], e, row, contrastive)
    kind = _kind(e, name, panels[0][1], tokens, tokenizer, kind)
    if kind == "image":
        return _plot_image(e, name, row, panels, image, ax, path, plt)
    if kind == "tokens":
        labels = _token_labels(e, name, row, panels[0][1].size, tokens, tokenizer)
        return _plot_tokens(e, name, row, panels, labels, ax, path, plt)
    return _plot_bars(e, name, row, panels, feature_names, max_features, ax, path, plt)


def plot_methods(explanations, *, input: Optional[str] = None, row: Optional[int] = 0,
                 image: Any = None, tokens: Any = None, tokenizer: Any = None,
                 feature_names: Any = None, path: Any = None, kind: Optional[str] = None,
                 normalize: bool = True):
    """Draw one row explained by several methods side by side; return the matplotlib Figure.

    ``explanations``: a mapping label -> Explanation (``{"DLB": e1, "LRP-eps": e2}``) or a
    sequence of Explanations (labelled by their ``method``). One panel per method, drawn as
    :func:`plot` draws one explanation (heatmap, tokens or bars), titled with the label and the
    panel's share of positive relevance; with ``image=`` (or the explanations' inputs) the input
    is drawn first. ``normalize``: each panel on its own colour scale (methods differ in scale:
    DLB/LRP sum to the seed, gradients do not), so the picture compares *where*, not *how much*.
    Contrastive explanations are drawn as positive minus negative.
    """
    import matplotlib.pyplot as plt

    if isinstance(explanations, Mapping):
        items = list(explanations.items())
    else:
        items = [(getattr(e, "method", None) or f"method {i}", e) for i, e in enumerate(explanations)]
    if not items:
        raise ValueError("plot_methods needs at least one explanation")
    first = items[0][1]
    name = _pick_input(first, input)
    probe = _streams(first.relevance[name], first, row, "difference")[0][1]
    k = _kind(first, name, probe, tokens, tokenizer, kind)
    img = image if image is not None else (_input_row(first, name, row) if k == "image" else None)
    n = len(items) + (img is not None)
    if k == "tokens":
        fig, axes = plt.subplots(len(items), 1, figsize=(10, 1.1 * len(items) + 0.4), squeeze=False)
        axes = axes[:, 0]
    else:
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
        axes = axes[0]
        if img is not None:
            shown, cmap = _display_image(img)
            axes[0].imshow(shown, cmap=cmap)
            axes[0].set_title("input")
            axes[0].axis("off")
            axes = axes[1:]
    scale = None
    if not normalize:
        scale = max(float(np.max(np.abs(_streams(e.relevance[name], e, row, "difference")[0][1])))
                    for _, e in items) or 1.0
    for ax, (label, e) in zip(axes, items):
        r = _streams(e.relevance[name], e, row, "difference")[0][1]
        pos = float(np.sum(np.maximum(r, 0)))
        tot = float(np.sum(np.abs(r))) or 1.0
        if k == "image":
            m2 = _image_2d(r)
            m = scale or float(np.max(np.abs(m2))) or 1.0
            ax.imshow(m2, cmap="bwr", vmin=-m, vmax=m)
            ax.axis("off")
        else:
            plot(e, ax=ax, input=name, row=row, tokens=tokens, tokenizer=tokenizer,
                 feature_names=feature_names, kind=k)
        ax.set_title(f"{label}  ({100 * pos / tot:.0f}% positive)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def _plot_image(e, name, row, panels, image, ax, path, plt):
    maps = [(label, _image_2d(r)) for label, r in panels]
    if image is None and ax is None:
        image = _input_row(e, name, row)
        if image is not None and image.dtype.kind not in "fc":
            image = None
    if ax is not None:
        fig, axes, img_ax = ax.figure, [ax], None
        maps = maps[:1]
    else:
        n = len(maps) + (image is not None)
        fig, grid = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
        axes = list(grid[0])
        img_ax = axes.pop(0) if image is not None else None
    if img_ax is not None:
        shown, cmap = _display_image(image)
        img_ax.imshow(shown, cmap=cmap)
        img_ax.set_title("input", fontsize=9)
        img_ax.set_axis_off()
    lim = max(float(np.max(np.abs(m))) for _, m in maps) or 1.0
    for a, (label, m) in zip(axes, maps):
        im = a.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
        a.set_title(f"{label} (sum {m.sum():.4g})", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
        fig.colorbar(im, ax=a, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    if ax is None:
        fig.suptitle(_title(e, name, row), fontsize=10)
        fig.tight_layout()
    return _finish(fig, path)


def _renderer(fig):
    canvas = fig.canvas
    if hasattr(canvas, "get_renderer"):
        return canvas.get_renderer()
    return fig._get_renderer()  # pragma: no cover - non-Agg canvases


def _plot_tokens(e, name, row, panels, labels, ax, path, plt):
    if ax is None:
        fig = plt.figure(figsize=(10, 2), dpi=100)
        ax = fig.add_axes((0, 0, 1, 1))
        own = True
    else:
        fig, own = ax.figure, False
    ax.set_axis_off()
    renderer = _renderer(fig)
    width_px = ax.get_window_extent(renderer).width
    fontsize = 11
    pad_pt = 2.5
    pad_px = pad_pt * fig.dpi / 72.0
    line_px = fontsize * fig.dpi / 72.0 * 2.1
    gap_px = 4 * fig.dpi / 72.0
    x0 = 8.0
    y = line_px * 0.8
    m = max(float(np.max(np.abs(r))) if r.size else 0.0 for _, r in panels)
    ax.text(x0, y, _title(e, name, row), fontsize=9, color="0.3", ha="left", va="center",
            gid="header")
    y += line_px
    for k, (label, r) in enumerate(panels):
        if len(panels) > 1 or label != "relevance":
            ax.text(x0, y, f"{label} (sum {r.sum():.4g})", fontsize=9, color="0.3", ha="left",
                    va="center", gid=f"label:{k}")
            y += line_px * 0.9
        x = x0
        sign = -1.0 if label == "negative" else 1.0  # the negative stream drawn in blue
        for i, (tok, v) in enumerate(zip(labels, r.reshape(-1))):
            t = ax.text(x, y, tok, fontsize=fontsize, ha="left", va="center", family="monospace",
                        bbox=dict(boxstyle=f"round,pad={pad_pt / fontsize:.3f}",
                                  facecolor=_colour(sign * float(v), m), edgecolor="none"),
                        gid=f"token:{k}:{i}")
            w = t.get_window_extent(renderer).width + 2 * pad_px
            if x > x0 and x + w > width_px - x0:
                x, y = x0, y + line_px
                t.set_position((x, y))
            x += w + gap_px
        y += line_px * 1.2
    height_px = y
    if own:
        fig.set_size_inches(fig.get_size_inches()[0], max(height_px / fig.dpi, 0.6))
        ax.set_xlim(0, width_px)
        ax.set_ylim(max(height_px, 1.0), 0)
    else:
        ax.set_xlim(0, width_px)
        ax.set_ylim(max(height_px, ax.get_window_extent(renderer).height), 0)
    return _finish(fig, path)


def _plot_bars(e, name, row, panels, feature_names, max_features, ax, path, plt):
    size = panels[0][1].size
    if feature_names is None:
        names = [f"{name}[{i}]" for i in range(size)]
    else:
        names = [str(f) for f in feature_names]
        if len(names) != size:
            raise ValueError(f"got {len(names)} feature names for {size} features of {name!r}")
    idx = np.arange(size)
    note = ""
    if size > max_features:
        score = np.max([np.abs(r.reshape(-1)) for _, r in panels], axis=0)
        idx = np.argsort(-score, kind="stable")[:max_features]
        note = f" (top {max_features} of {size} by |relevance|)"
    if ax is not None:
        fig, axes = ax.figure, [ax]
        panels = panels[:1]
    else:
        fig, grid = plt.subplots(1, len(panels), squeeze=False,
                                 figsize=(5.0 * len(panels), 0.32 * len(idx) + 1.4))
        axes = list(grid[0])
    for a, (label, r) in zip(axes, panels):
        vals = r.reshape(-1)[idx]
        y = np.arange(len(idx))
        colours = [_BLUE if label == "negative" or v < 0 else _RED for v in vals]
        a.barh(y, vals, color=colours, height=0.7, gid="bars")
        a.set_yticks(y)
        a.set_yticklabels([names[i] for i in idx], fontsize=8)
        a.invert_yaxis()
        a.axvline(0, color="0.3", linewidth=0.8)
        a.set_xlabel(label if label != "relevance" else "relevance", fontsize=9)
        a.set_title(f"{label} (sum {r.sum():.4g})", fontsize=9)
        a.tick_params(axis="x", labelsize=8)
    if ax is None:
        fig.suptitle(_title(e, name, row, note), fontsize=10)
        fig.tight_layout()
    return _finish(fig, path)


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------
def _css(v: float, m: float) -> str:
    r, g, b, a = _colour(v, m)
    return f"rgba({int(round(r * 255))}, {int(round(g * 255))}, {int(round(b * 255))}, {a:.3f})"


def to_html(explanation, row: Optional[int] = 0, *, tokens: Any = None, tokenizer: Any = None,
            input: Optional[str] = None, kind: Optional[str] = None,
            contrastive: str = "difference", max_features: int = 10) -> str:
    """One row's relevance as an HTML string.

    Token inputs: every token in a ``<span>`` whose background is red (positive relevance) or blue
    (negative) with opacity ``|r| / max|r|`` over the row (0 for tokens with no relevance, e.g.
    padding) and a ``title`` attribute with the value (shown on hover); token strings are
    HTML-escaped and chosen as in :func:`plot`. Other inputs: a table of the ``max_features``
    features with the largest ``|r|`` (index, value), coloured the same way. Contrastive
    explanations show positive minus negative (``contrastive="both"``: one block per stream, the
    negative stream in blue).
    """
    e = explanation
    name = _pick_input(e, input)
    panels = _streams(e.relevance[name], e, row, contrastive)
    kind = _kind(e, name, panels[0][1], tokens, tokenizer, kind)
    both = len(panels) > 1
    header = html.escape(_title(e, name, row))
    out = ['<div class="dlbjax-explanation" style="font-family: sans-serif; line-height: 2.0;">',
           f'<div style="font-size: 85%; color: #555;">dlbjax &middot; {header}</div>']
    if kind == "tokens":
        labels = _token_labels(e, name, row, panels[0][1].size, tokens, tokenizer)
        for label, r in panels:
            vals = r.reshape(-1)
            m = float(np.max(np.abs(vals))) if vals.size else 0.0
            sign = -1.0 if label == "negative" else 1.0  # the negative stream drawn in blue
            if both or label != "relevance":
                out.append(f'<div style="font-size: 85%; color: #555;">{html.escape(label)} '
                           f'(sum {vals.sum():.4g})</div>')
            spans = []
            for tok, v in zip(labels, vals):
                spans.append(f'<span class="dlbjax-token" style="background-color: '
                             f'{_css(sign * float(v), m)}; padding: 1px 3px; margin: 0 1px; '
                             f'border-radius: 3px;" title="{float(v):.6g}">'
                             f'{html.escape(tok)}</span>')
            out.append('<div>' + " ".join(spans) + '</div>')
    else:
        for label, r in panels:
            flat = r.reshape(-1)
            m = float(np.max(np.abs(flat))) if flat.size else 0.0
            sign = -1.0 if label == "negative" else 1.0
            top = np.argsort(-np.abs(flat), kind="stable")[:max_features]
            rows = []
            for rank, i in enumerate(top):
                where = np.unravel_index(int(i), r.shape) if r.ndim > 1 else (int(i),)
                feat = f"{name}[{', '.join(str(int(w)) for w in where)}]"
                v = float(flat[i])
                rows.append(f'<tr><td>{rank + 1}</td><td>{html.escape(feat)}</td>'
                            f'<td style="background-color: {_css(sign * v, m)};" '
                            f'title="{v:.6g}">{v:.4g}</td></tr>')
            caption = (f"{label}: " if both or label != "relevance" else "") + \
                f"top {len(top)} of {flat.size} features (sum {flat.sum():.4g})"
            out.append('<table class="dlbjax-features" style="border-collapse: collapse; '
                       'font-size: 90%;">'
                       f'<caption style="text-align: left;">{html.escape(caption)}</caption>'
                       '<tr><th>#</th><th>feature</th><th>relevance</th></tr>'
                       + "".join(rows) + '</table>')
    out.append('</div>')
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# the relevance flow graph
# ------------------------------------------------------------------------------------------------
def layer_flow(program, layers) -> dict:
    """The data flow between the explanation's layer keys, from the IR program.

    ``program``: a :class:`dlbjax.ir.Program` or an :class:`~dlbjax.Explainer`; ``layers``: the
    layer keys (``explanation.layers``: input names and ``"<module path>/<variable>"``). Returns
    ``{"order": [keys in execution order], "edges": [(src, dst), ...]}``: an edge for every key
    that reaches another through equations whose intermediate values are not layer keys
    (constants and integer values carry no relevance and are skipped)."""
    program = getattr(program, "program", program)
    keys = set(layers)
    key_of: dict[str, str] = {}
    for v in program.inputs:
        if v.name in keys:
            key_of[v.name] = v.name
    for eqn in program.eqns:
        path = eqn.source.module_path
        for o in eqn.outputs:
            k = f"{path}/{o.name}" if path else o.name
            if k in keys:
                key_of[o.name] = k
    order = [key_of[v.name] for v in program.inputs if v.name in key_of]
    edges: dict[tuple, None] = {}
    reach: dict[str, frozenset] = {v.name: frozenset([key_of[v.name]]) if v.name in key_of
                                   else frozenset() for v in program.inputs}
    empty: frozenset = frozenset()
    for eqn in program.eqns:
        src: frozenset = empty
        for u in eqn.inputs:
            r = reach.get(u.name, empty)
            if r:
                src = src | r if src else r
        for o in eqn.outputs:
            k = key_of.get(o.name)
            if k is None:
                reach[o.name] = src
            else:
                order.append(k)
                for s in sorted(src):
                    edges[(s, k)] = None
                reach[o.name] = frozenset([k])
    return {"order": order, "edges": list(edges)}


def _module_of(key: str, inputs: set) -> str:
    if key in inputs:
        return key
    return key.rsplit("/", 1)[0] if "/" in key else key


def relevance_graph(explanation, top_k: Optional[int] = 15, *, row: Optional[int] = 0,
                    program: Any = None) -> dict:
    """The graph :func:`plot_graph` draws, as data.

    Relevance is aggregated per module: a module's total is the relevance (positive minus negative
    in contrastive mode) at the module's output values (those read by other modules or by
    nothing after it), for ``row`` (``None``: summed over rows); an input's total is its
    relevance. The ``top_k`` nodes by ``|total|`` are kept (``None``: all), in execution order,
    with an edge from a kept node to each kept node it reaches through dropped ones.
    Execution order and edges come from the IR's data flow: ``program`` (a Program or an
    Explainer), else ``explanation.flow``; without either, nodes follow the order of
    ``explanation.layers`` and consecutive nodes are joined (a warning says so).

    Returns ``{"nodes": [{"name", "kind" ("input" | "module"), "total", "keys"}],
    "edges": [(src name, dst name)], "dataflow": bool, "total_nodes": int}``.
    """
    e = explanation
    if e.layers is None:
        raise NoLayersError("this explanation holds no per-layer relevance: explain with "
                            "layers=True (dlbjax.explain(model, x, layers=True) or "
                            "dlbjax.Explainer(model, x, layers=True)) to draw the relevance "
                            "flow through the layers")
    inputs = set(e.relevance)
    totals = {k: float(_row(_net(v), e, row).sum()) for k, v in e.layers.items()}
    flow = layer_flow(program, e.layers) if program is not None else getattr(e, "flow", None)
    modules: dict[str, list] = {}
    if flow is not None:
        order = [k for k in flow["order"] if k in totals]
        order += [k for k in totals if k not in set(order)]
        for k in order:
            modules.setdefault(_module_of(k, inputs), []).append(k)
        succ: dict[str, set] = {}
        for a, b in flow["edges"]:
            if a in totals and b in totals:
                succ.setdefault(a, set()).add(b)
        node_total = {}
        for mod, ks in modules.items():
            outs = [k for k in ks if not succ.get(k) or
                    any(_module_of(b, inputs) != mod for b in succ[k])]
            node_total[mod] = sum(totals[k] for k in (outs or ks[-1:]))
        mod_succ: dict[str, set] = {m: set() for m in modules}
        for a, bs in succ.items():
            for b in bs:
                ma, mb = _module_of(a, inputs), _module_of(b, inputs)
                if ma != mb:
                    mod_succ[ma].add(mb)
    else:
        warnings.warn("the explanation records no data flow (explanation.flow is None), so the "
                      "layers are drawn in the order of explanation.layers, joined one after "
                      "another; pass program=explainer (the Explainer that made it) for the "
                      "real order and edges", stacklevel=3)
        for k in totals:
            modules.setdefault(_module_of(k, inputs), []).append(k)
        node_total = {m: max((totals[k] for k in ks), key=abs) for m, ks in modules.items()}
        mod_succ = None
    names = list(modules)
    if top_k is None or top_k <= 0 or top_k >= len(names):
        kept = list(names)
    else:
        rank = sorted(range(len(names)), key=lambda i: (-abs(node_total[names[i]]), i))
        chosen = set(rank[:int(top_k)])
        kept = [n for i, n in enumerate(names) if i in chosen]
    kept_set = set(kept)
    edges = []
    if mod_succ is not None:
        for a in kept:
            seen, stack, found = {a}, list(mod_succ[a]), []
            while stack:
                b = stack.pop()
                if b in seen:
                    continue
                seen.add(b)
                if b in kept_set:
                    found.append(b)
                else:
                    stack.extend(mod_succ.get(b, ()))
            pos = {n: i for i, n in enumerate(kept)}
            edges += [(a, b) for b in sorted(found, key=pos.get)]
    else:
        edges = list(zip(kept, kept[1:]))
    nodes = [{"name": n, "kind": "input" if n in inputs else "module", "total": node_total[n],
              "keys": list(modules[n])} for n in kept]
    return {"nodes": nodes, "edges": edges, "dataflow": mod_succ is not None,
            "total_nodes": len(names)}


def _node_colour(total: float, m: float) -> tuple:
    a = min(1.0, abs(total) / m) if m > 0 else 0.0
    base = _RED if total >= 0 else _BLUE
    return tuple(1.0 - a * 0.85 * (1.0 - c) for c in base)  # white -> red/blue, opaque


def _seed_total(e, row) -> Optional[float]:
    if e.mode != "default" or e.conservation is None or e.conservation.seed is None:
        return None
    s = _np(e.conservation.seed).astype(np.float64)
    if row is None:
        return float(s.sum())
    return float(s.reshape(-1)[row]) if s.ndim else float(s)


def _node_label(n: dict, seed: Optional[float]) -> str:
    name = n["name"] or "<root>"
    kind = " (input)" if n["kind"] == "input" else ""
    share = f" ({100.0 * n['total'] / seed:.0f}%)" if seed else ""
    return f"{name}{kind}\n{n['total']:.4g}{share}"


def _graphviz_ok() -> bool:
    return importlib.util.find_spec("graphviz") is not None and shutil.which("dot") is not None


def plot_graph(explanation, top_k: Optional[int] = 15, *, path: Any = None,
               engine: str = "auto", row: Optional[int] = 0, program: Any = None):
    """Draw the relevance flow through the model's layers, like the original DLBacktrace's
    ``visualize_dlbacktrace(top_k)``; needs an explanation made with ``layers=True``.

    Nodes are the model's inputs and modules (``"<module path>"``, top-level operations by their
    variable), each labelled with its total relevance (and its share of the seed in default mode)
    and filled white-to-red by ``|total|`` (blue for a negative net total in contrastive mode);
    the ``top_k`` nodes by ``|total|`` are kept, in execution order, joined by arrows along the
    data flow (see :func:`relevance_graph` for the aggregation and ``program=``).

    ``engine``: ``"graphviz"`` (the ``graphviz`` package and the ``dot`` binary; returns a
    ``graphviz.Digraph``, shown as SVG in a notebook), ``"matplotlib"`` (returns a Figure) or
    ``"auto"`` (graphviz when both are installed, else matplotlib). ``path``: also write the
    picture there (graphviz: the format from the suffix, ``.svg``/``.png``/``.pdf``, or the DOT
    source for ``.gv``/``.dot``). Raises :class:`NoLayersError` without ``layers=True``.
    """
    if engine not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"engine must be 'auto', 'graphviz' or 'matplotlib', not {engine!r}")
    graph = relevance_graph(explanation, top_k, row=row, program=program)
    seed = _seed_total(explanation, row)
    title = (f"dlbjax relevance flow: {len(graph['nodes'])} of {graph['total_nodes']} nodes, "
             f"{'all rows' if row is None else f'row {row}'}, {explanation.mode} mode")
    if engine == "graphviz" or (engine == "auto" and _graphviz_ok()):
        if importlib.util.find_spec("graphviz") is None:
            raise ImportError("engine='graphviz' needs the graphviz package (pip install graphviz)"
                              " and the Graphviz 'dot' program; or use engine='matplotlib'")
        return _graph_graphviz(graph, seed, title, path)
    return _graph_matplotlib(graph, seed, title, path)


def _graph_graphviz(graph, seed, title, path):
    import graphviz
    from matplotlib.colors import to_hex

    m = max((abs(n["total"]) for n in graph["nodes"]), default=0.0)
    g = graphviz.Digraph("dlbjax", graph_attr={"rankdir": "TB", "label": title, "labelloc": "t",
                                               "fontsize": "12", "fontname": "Helvetica"},
                         node_attr={"shape": "box", "style": "rounded,filled",
                                    "fontname": "Helvetica", "fontsize": "10"})
    ids = {}
    for i, n in enumerate(graph["nodes"]):
        ids[n["name"]] = f"n{i}"
        g.node(f"n{i}", label=_node_label(n, seed).replace("\\", "\\\\").replace("\n", "\\n"),
               fillcolor=to_hex(_node_colour(n["total"], m)),
               shape="ellipse" if n["kind"] == "input" else "box",
               tooltip=f"{n['name']}: {n['total']:.6g}")
    for a, b in graph["edges"]:
        g.edge(ids[a], ids[b])
    if path is not None:
        import os
        path = os.fspath(path)
        fmt = os.path.splitext(path)[1].lstrip(".").lower() or "svg"
        if fmt in ("gv", "dot"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(g.source)
        else:
            with open(path, "wb") as f:
                f.write(g.pipe(format=fmt))
    return g


def _graph_matplotlib(graph, seed, title, path):
    import matplotlib.pyplot as plt

    nodes, edges = graph["nodes"], graph["edges"]
    n = max(len(nodes), 1)
    fig = plt.figure(figsize=(7.0, 0.85 * n + 0.9))
    ax = fig.add_axes((0, 0, 1, 1 - 0.5 / (0.85 * n + 0.9)))
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(-n + 0.5, 0.5)
    m = max((abs(x["total"]) for x in nodes), default=0.0)
    texts = {}
    for i, node in enumerate(nodes):
        texts[node["name"]] = ax.text(
            0.45, -i, _node_label(node, seed), ha="center", va="center", fontsize=9,
            gid=f"node:{node['name']}",
            bbox=dict(boxstyle="round4,pad=0.45" if node["kind"] == "input" else "round,pad=0.45",
                      facecolor=_node_colour(node["total"], m), edgecolor="0.35"))
    pos = {x["name"]: i for i, x in enumerate(nodes)}
    for a, b in edges:
        skip = abs(pos[b] - pos[a]) > 1 or pos[b] < pos[a]
        if skip:  # from the right side of one box to the right side of the other, bowed out
            rad = -min(0.8, 0.25 + 0.08 * abs(pos[b] - pos[a]))
            ax.annotate("", xy=(1.0, 0.5), xycoords=texts[b], xytext=(1.0, 0.5),
                        textcoords=texts[a], gid=f"edge:{a}->{b}",
                        arrowprops=dict(arrowstyle="-|>", color="0.4", lw=1.0,
                                        connectionstyle=f"arc3,rad={rad:.2f}"))
        else:
            ax.annotate("", xy=(0.5, 1.0), xycoords=texts[b], xytext=(0.5, 0.0),
                        textcoords=texts[a], gid=f"edge:{a}->{b}",
                        arrowprops=dict(arrowstyle="-|>", color="0.4", lw=1.0))
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


# ------------------------------------------------------------------------------------------------
# MoE experts
# ------------------------------------------------------------------------------------------------
def plot_experts(explanation, ax=None, *, row: Optional[int] = 0, path: Any = None,
                 contrastive: str = "difference"):
    """Draw a mixture-of-experts explanation as a layers x experts heatmap: cell (l, j) is the
    relevance that went through expert j of routed layer l (``explanation.experts[l]
    ["per_expert"]``) for ``row`` (``None``: summed over rows); contrastive explanations show
    positive minus negative (or one stream with ``contrastive="positive"|"negative"``). Values
    are written in the cells when there are few. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    e = explanation
    if not e.experts:
        raise NoExpertsError("this explanation holds no mixture-of-experts relevance "
                             "(explanation.experts is None): the model has no top-k routed "
                             "layers that dlbjax recognised")
    if contrastive == "both":
        contrastive = "difference"
    rows = [_streams(layer["per_expert"], e, row, contrastive)[0][1].reshape(-1)
            for layer in e.experts]
    width = max(len(r) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r
    names = [str(layer.get("layer", i)) for i, layer in enumerate(e.experts)]
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * width + 0.08 * max(map(len, names)),
                                        1.3 + 0.42 * len(rows)))
        own = True
    else:
        fig, own = ax.figure, False
    finite = grid[np.isfinite(grid)]
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    lim = lim or 1.0
    if finite.size and finite.min() >= 0:
        im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=lim, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(grid, cmap="bwr", vmin=-lim, vmax=lim, aspect="auto",
                       interpolation="nearest")
    ax.set_xticks(range(width))
    ax.set_xticklabels([str(j) for j in range(width)], fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    if grid.size <= 200:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    what = "all rows" if row is None else f"row {row}"
    ax.set_title(f"relevance per expert ({what})", fontsize=10)
    if own:
        fig.tight_layout()
    return _finish(fig, path)
