"""Saving one :class:`~dlbjax.Explanation` to a single ``.npz`` file and loading it back.

Saving reads the fields of an Explanation; loading returns them (:func:`read_fields`) and the
class builds itself (:meth:`dlbjax.Explanation.load`). Layout of the file
(``np.savez_compressed``, read with ``allow_pickle=False``)::

    relevance/<input>                  an input's relevance (default mode)
    relevance/<input>/positive         ... and /negative: a Streams pair (contrastive mode)
    prediction, target
    conservation/seed|inputs|bias|lost|params (each possibly .../positive and .../negative)
    constants/<name>                   relevance at each learned tensor / constant (its per-row total)
    outputs/<name>                     every model output
    layers/<module path>/<variable>    layers=True
    experts/<i>/per_expert             MoE layers (and experts/<i>/per_token)
    inputs/<name>                      the explained inputs, when the Explanation holds them
    __dlbjax__                         a JSON string: format name and version, dlbjax version,
                                       mode, task, multiplier, the table of every array entry
                                       (npz key, group, name, stream), the expert layers' names
                                       and the layers' data-flow graph (``Explanation.flow``)

The JSON table makes the layout unambiguous (module paths and variable names may contain
anything but are never parsed back from the npz keys). Nothing is pickled: object arrays are
refused when saving.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any

import numpy as np

from ._types import Streams
from ._version import __version__

__all__ = ["save_explanation", "read_fields", "explanations_equal", "FORMAT", "VERSION"]

FORMAT = "dlbjax-explanation"
VERSION = 1
META_KEY = "__dlbjax__"
_STREAMS = ("positive", "negative")
_CONSERVATION = ("seed", "inputs", "bias", "lost", "params")


def _version() -> str:
    return str(__version__)


def _array(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"cannot save {where}: it is an object array (only numeric arrays are "
                        "stored, without pickle)")
    return arr


def save_explanation(explanation, path) -> str:
    """Write ``explanation`` to ``path`` (a ``.npz`` file; the suffix is added when missing, as
    numpy does) and return the path written. Every field is stored: relevance (Streams pairs
    too), prediction, target, conservation, outputs, layers, experts, inputs and the layers'
    flow graph, plus mode, task and multiplier."""
    e = explanation
    arrays: dict[str, np.ndarray] = {}
    entries: list[list] = []  # [npz key, group, name, stream or None]

    def put(group: str, name: Any, value: Any) -> None:
        if value is None:
            return
        base = group if name is None else f"{group}/{name}"
        parts = ([(s, getattr(value, s)) for s in _STREAMS] if isinstance(value, Streams)
                 else [(None, value)])
        for stream, v in parts:
            key = base if stream is None else f"{base}/{stream}"
            if key in arrays or key == META_KEY:  # names that collide after joining with '/'
                i = 1
                while f"{key}#{i}" in arrays:
                    i += 1
                key = f"{key}#{i}"
            arrays[key] = _array(v, key)
            entries.append([key, group, name, stream])

    for name, r in e.relevance.items():
        put("relevance", str(name), r)
    put("prediction", None, e.prediction)
    put("target", None, e.target)
    for f in _CONSERVATION:
        put("conservation", f, getattr(e.conservation, f))
    for name, r in (getattr(e, "constants", None) or {}).items():
        put("constants", str(name), r)
    for name, o in (e.outputs or {}).items():
        put("outputs", str(name), o)
    for name, r in (e.layers or {}).items():
        put("layers", str(name), r)
    experts_meta = None
    if e.experts is not None:
        experts_meta = []
        for i, layer in enumerate(e.experts):
            experts_meta.append({"layer": layer.get("layer"),
                                 "fields": [k for k in layer if k != "layer"]})
            for k, v in layer.items():
                if k != "layer":
                    put(f"experts/{i}", k, v)
    inputs = getattr(e, "inputs", None)
    for name, x in (inputs or {}).items():
        put("inputs", str(name), x)

    flow = getattr(e, "flow", None)
    meta = {
        "format": FORMAT, "format_version": VERSION, "dlbjax_version": _version(),
        "mode": e.mode, "task": e.task, "multiplier": float(e.multiplier),
        "method": getattr(e, "method", "dlb"),
        "entries": entries,
        "streams": sorted({f"{g}/{n}" if n is not None else g
                           for _, g, n, s in entries if s is not None}),
        "has": {"layers": e.layers is not None, "outputs": e.outputs is not None,
                "inputs": inputs is not None,
                "constants": getattr(e, "constants", None) is not None},
        "experts": experts_meta,
        "flow": None if flow is None else {"order": list(flow["order"]),
                                           "edges": [list(x) for x in flow["edges"]]},
    }
    arrays[META_KEY] = np.array(json.dumps(meta))
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_fields(path) -> dict:
    """The fields of an Explanation written by :func:`save_explanation`, as keyword arguments of
    ``Explanation`` (``conservation`` as the tuple (seed, inputs, bias, lost, params)); no pickle:
    ``allow_pickle=False``. :meth:`dlbjax.Explanation.load` builds the object from them."""
    path = os.fspath(path)
    if not os.path.exists(path) and os.path.exists(path + ".npz"):
        path += ".npz"
    with np.load(path, allow_pickle=False) as data:
        if META_KEY not in data.files:
            raise ValueError(f"{path} is not a saved dlbjax Explanation (no {META_KEY} entry); "
                             "a directory of dataset shards is read with dlbjax.load_results")
        meta = json.loads(str(data[META_KEY]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, not {FORMAT!r}")
        if int(meta.get("format_version", 0)) > VERSION:
            raise ValueError(f"{path} was written in format version {meta['format_version']} by "
                             f"dlbjax {meta.get('dlbjax_version')}; this dlbjax reads up to "
                             f"version {VERSION}: upgrade dlbjax")
        groups: dict[str, dict] = {}
        for key, group, name, stream in meta["entries"]:
            slot = groups.setdefault(group, {})
            arr = data[key]
            if stream is None:
                slot[name] = arr
            else:
                slot.setdefault(name, {})[stream] = arr

    def value(v):
        return Streams(v["positive"], v["negative"]) if isinstance(v, dict) else v

    def group(name):
        return {k: value(v) for k, v in groups.get(name, {}).items()}

    cons = group("conservation")
    has = meta.get("has", {})
    experts = None
    if meta.get("experts") is not None:
        experts = []
        for i, info in enumerate(meta["experts"]):
            layer = {"layer": info["layer"]}
            layer.update(group(f"experts/{i}"))
            experts.append(layer)
    flow = meta.get("flow")
    if flow is not None:
        flow = {"order": list(flow["order"]), "edges": [tuple(x) for x in flow["edges"]]}
    return dict(
        relevance=group("relevance"), prediction=group("prediction").get(None),
        target=group("target").get(None),
        conservation=tuple(cons.get(f) for f in _CONSERVATION),
        mode=meta["mode"], task=meta["task"], multiplier=meta["multiplier"],
        outputs=group("outputs") if has.get("outputs", True) else None,
        layers=group("layers") if has.get("layers") else None,
        experts=experts,
        inputs=group("inputs") if has.get("inputs") else None,
        flow=flow, constants=group("constants") if has.get("constants") else None,
        method=meta.get("method", "dlb"))


# ------------------------------------------------------------------------------------------------
# equality (Explanation.__eq__)
# ------------------------------------------------------------------------------------------------
def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Streams) or isinstance(b, Streams):
        return (isinstance(a, Streams) and isinstance(b, Streams)
                and _equal(a.positive, b.positive) and _equal(a.negative, b.negative))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
                and all(_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    if isinstance(a, (str, bytes)) or isinstance(b, (str, bytes)):
        return a == b
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))


def explanations_equal(a, b) -> bool:
    """Field-by-field exact equality of two Explanations (arrays: same shape, dtype and values;
    NaNs equal; Streams only equal Streams)."""
    if type(a) is not type(b):
        return False
    for f in fields(a):
        if not f.compare:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name == "conservation":
            if not all(_equal(getattr(va, g), getattr(vb, g))
                       for g in _CONSERVATION):
                return False
        elif f.name == "multiplier":
            if float(va) != float(vb):
                return False
        elif f.name == "flow":
            norm = (lambda fl: None if fl is None else
                    (list(fl["order"]), [tuple(x) for x in fl["edges"]]))
            if norm(va) != norm(vb):
                return False
        elif not _equal(va, vb):
            return False
    return True
