"""The result types: :class:`Explanation` and its :class:`Conservation` report.

They hold numpy arrays and plain values only. Their methods hand the fields to the views
(``dlbjax._views``: pictures, HTML) and to the file format (``dlbjax._save``), which read fields
and never build results themselves: :meth:`Explanation.load` builds the object from the fields
that ``_save.read_fields`` returns.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import _save, _views
from ._types import Streams

__all__ = ["Explanation", "Conservation", "load_explanation"]


@dataclass
class Conservation:
    """Per-row relevance budget: ``seed = inputs + bias + params + lost``.

    ``seed``: total seeded relevance; ``inputs``: total at the model inputs; ``bias``: total kept by
    biases and constant addends (dropped from the explanation, spec §2.5); ``params``: total at the
    learned tensors and constants that index maps copy into the stream (a class token, register
    tokens, padding values; per tensor in ``Explanation.constants``); ``lost``: the remainder, what
    the rules did not pass on (units with D = 0, gated-off one-sided units, T = 0 in contrastive
    mode). In contrastive mode each field is a Streams pair of per-row arrays. ``params`` is None
    for explanations saved before it existed (read as 0).
    """

    seed: Any
    inputs: Any
    bias: Any
    lost: Any
    params: Any = None

    def __str__(self) -> str:
        def rows(name, s, i, b, p, l):
            lines = [f"{name:>8} {'row':>4} {'seed':>12} {'inputs':>12} {'bias':>12} "
                     f"{'params':>12} {'lost':>12}"]
            for r in range(len(s)):
                lines.append(f"{'':>8} {r:>4} {s[r]:12.5f} {i[r]:12.5f} {b[r]:12.5f} "
                             f"{p[r]:12.5f} {l[r]:12.5f}")
            return lines

        def params(k):
            if self.params is None:
                return [0.0] * len(getattr(self.seed, k) if k else self.seed)
            return getattr(self.params, k) if k else self.params
        if isinstance(self.seed, Streams):
            out = rows("positive", self.seed.positive, self.inputs.positive, self.bias.positive,
                       params("positive"), self.lost.positive)
            neg = rows("negative", self.seed.negative, self.inputs.negative, self.bias.negative,
                       params("negative"), self.lost.negative)[1:]
            out += [("negative" + line[8:]) if i == 0 else line for i, line in enumerate(neg)]
            return "\n".join(out)
        return "\n".join(rows("", self.seed, self.inputs, self.bias, params(None), self.lost))


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``relevance``: forward-argument name -> array of that input's shape (contrastive mode: a
    ``Streams(positive, negative)`` pair); integer inputs that carry no relevance by construction
    (attention masks) are zeros. For token ids it is the per-token relevance (the sum over the
    embedding's hidden axis). ``prediction``: the explained model output. ``target``: the seeded
    class per row. ``layers``: relevance at every relevance-carrying IR variable, keyed
    ``"<module path>/<variable>"`` (only with ``layers=True``). ``conservation``: per-row totals.
    ``experts`` (mixture-of-experts models): one dict per routed layer with ``layer`` (module
    path), ``per_expert`` [rows, num_experts] and ``per_token`` [rows, tokens, num_experts]: the
    relevance that went through each selected expert (summed over the hidden axis).

    ``method``: ``"dlb"`` or a gradient-family method (``dlbjax/engine/gradient.py``). For those,
    ``relevance`` holds the signed attributions (``multiplier`` is 1.0: the score is unscaled) and
    ``conservation`` a completeness report: ``seed`` = score(x) - score(reference) (the baseline
    for integrated gradients, the zero input for the others), ``inputs`` = the attributions' sum,
    ``bias`` = ``params`` = 0 and ``lost`` = their difference (integrated gradients: the
    completeness error, which shrinks with ``steps``; gradient x input: 0 on bias-free
    piecewise-linear networks; gradient and SmoothGrad: no conservation is defined, ``lost`` is
    only the difference of the two numbers).
    """

    relevance: dict
    prediction: np.ndarray
    target: np.ndarray
    conservation: Conservation
    mode: str
    task: str
    multiplier: float
    outputs: dict = field(default_factory=dict)
    layers: Optional[dict] = None
    experts: Optional[list] = None
    # optional extras for the pictures (dlbjax._views): ``inputs``: the explained inputs by name
    # (the image beside a heatmap, the token ids to decode); ``flow``: the layers' data flow,
    # {"order": [layer keys in execution order], "edges": [(src key, dst key), ...]}, as built
    # by dlbjax._views.layer_flow(program, layers) (used by plot_graph)
    inputs: Optional[dict] = None
    flow: Optional[dict] = None
    # learned tensor / constant name -> per-row relevance it received through an index map
    # (sums to conservation.params; Streams pairs in contrastive mode)
    constants: Optional[dict] = None
    # the attribution method: "dlb", or a gradient-family method (multiplier 1.0, conservation
    # as described in the class docstring)
    method: str = "dlb"

    def __repr__(self) -> str:
        shapes = {k: (tuple(v.positive.shape) if isinstance(v, Streams) else tuple(v.shape))
                  for k, v in self.relevance.items()}
        return (f"Explanation(mode={self.mode!r}, task={self.task!r}, rows={len(self.target)}, "
                f"target={self.target.tolist()}, relevance={shapes})")

    def __eq__(self, other) -> bool:
        """Exact field-by-field equality (arrays by shape, dtype and value)."""
        return _save.explanations_equal(self, other)

    # ---- pictures and files (dlbjax._views, dlbjax._save) --------------------------------------
    def plot(self, **kw):
        """The natural picture of one row's relevance (heatmap, highlighted tokens or a bar
        chart); see :func:`dlbjax.plot`. Returns the matplotlib Figure."""
        return _views.plot(self, **kw)

    def plot_graph(self, top_k: int = 15, **kw):
        """Relevance flow through the layers (needs ``layers=True``); see
        :func:`dlbjax.plot_graph`."""
        return _views.plot_graph(self, top_k, **kw)

    def plot_experts(self, **kw):
        """Layers x experts heatmap of an MoE explanation; see :func:`dlbjax.plot_experts`."""
        return _views.plot_experts(self, **kw)

    def to_html(self, **kw) -> str:
        """HTML of the tokens coloured by relevance (or a table of the top features); see
        :func:`dlbjax.to_html`."""
        return _views.to_html(self, **kw)

    def _repr_html_(self) -> str:
        """Notebook display: :func:`dlbjax.to_html` of row 0 (the escaped repr if that fails)."""
        try:
            return _views.to_html(self)
        except Exception:  # a display hook must not raise
            return f"<pre>{html.escape(repr(self))}</pre>"

    def save(self, path) -> str:
        """Save to one ``.npz`` file (no pickle); read it with :meth:`Explanation.load` or
        :func:`dlbjax.load_explanation`. Returns the path written."""
        return _save.save_explanation(self, path)

    @classmethod
    def load(cls, path) -> "Explanation":
        """Load an Explanation written by :meth:`save` (no pickle; see ``dlbjax._save``)."""
        f = _save.read_fields(path)
        return cls(conservation=Conservation(*f.pop("conservation")), **f)


def load_explanation(path) -> Explanation:
    """Read an Explanation written by :meth:`Explanation.save` (no pickle: ``allow_pickle=False``).

    Streams pairs come back as :class:`dlbjax.Streams`, conservation as
    :class:`dlbjax.Conservation`; the result equals the saved explanation (``==``)."""
    return Explanation.load(path)
