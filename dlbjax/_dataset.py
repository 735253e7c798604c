"""Explaining a dataset to disk, resumably, and reading the results back.

Layout of an output directory::

    out/manifest.json        what is done: config, fields, one entry per shard (start, rows, file)
    out/shard-00000.npz      rows [0, k) of every result field
    out/shard-00001.npz      rows [k, 2k) ...

Every shard is written to a temporary file and renamed into place, and only then is the manifest
rewritten (also temporary file + rename, both atomic on POSIX). A run killed at any point leaves a
manifest that lists only complete shards; rows after the last listed shard are explained again on
resume (a half-written shard or an unlisted one is overwritten), so no row is lost or duplicated.
Resuming checks that the Explainer's configuration, the inputs' row layout, the number of rows
(for arrays) and the targets match the manifest; it does not hash the model's weights or the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np

from ._assemble import explain_rows
from ._errors import InputMismatchError, TargetError
from ._result import Conservation, Explanation
from ._torch import is_tensor
from ._types import Streams

__all__ = ["explain_dataset", "load_results"]

FORMAT = "dlbjax-results"
VERSION = 1
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------------
# rows of the caller's inputs
# ------------------------------------------------------------------------------------------------
def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) or is_tensor(x)


def _is_inputs(data) -> bool:
    """Arrays, a dict of arrays or a tuple of arrays (the Explainer's input forms) are one block
    of rows; anything else (a list, a generator, a DataLoader) is an iterable of batches."""
    return _is_array(data) or isinstance(data, (dict, tuple)) or (
        hasattr(data, "keys") and hasattr(data, "__getitem__"))


def _rows_of(data) -> int:
    if _is_array(data):
        return int(data.shape[0])
    values = dict(data).values() if not isinstance(data, (tuple, list)) else data
    sizes = {int(v.shape[0]) for v in values if _is_array(v) and v.ndim > 0}
    if len(sizes) != 1:
        raise InputMismatchError(f"dataset inputs have different numbers of rows {sorted(sizes)}")
    return sizes.pop()


def _slice(data, start: int, stop: int):
    if _is_array(data):
        return data[start:stop]
    if isinstance(data, (tuple, list)):
        return type(data)(v[start:stop] if _is_array(v) else v for v in data)
    return {k: (v[start:stop] if _is_array(v) else v) for k, v in dict(data).items()}


def _concat(parts: list):
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(vs):
        if is_tensor(vs[0]):
            import torch
            return torch.cat(vs, 0)
        return np.concatenate([np.asarray(v) for v in vs], 0)

    if _is_array(first):
        return cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(cat([p[i] for p in parts]) if _is_array(v) else v
                           for i, v in enumerate(first))
    return {k: (cat([dict(p)[k] for p in parts]) if _is_array(v) else v)
            for k, v in dict(first).items()}


def _stream_rows(batches: Iterable, skip: int, shard_rows: int):
    """(start row, shard inputs) of ``shard_rows`` rows each from an iterable of batches, after
    skipping ``skip`` rows (a resumed run)."""
    pending, have, pos = [], 0, 0
    for batch in batches:
        n = _rows_of(batch)
        if pos + n <= skip:
            pos += n
            continue
        if pos < skip:
            batch, n, pos = _slice(batch, skip - pos, n), n - (skip - pos), skip
        pending.append(batch)
        have += n
        while have >= shard_rows:
            whole = _concat(pending)
            yield pos, _slice(whole, 0, shard_rows)
            pos += shard_rows
            have -= shard_rows
            pending = [_slice(whole, shard_rows, shard_rows + have)] if have else []
    if have:
        yield pos, _concat(pending)


# ------------------------------------------------------------------------------------------------
# flattening an Explanation into named arrays
# ------------------------------------------------------------------------------------------------
def _flatten(e) -> dict[tuple, np.ndarray]:
    out: dict[tuple, np.ndarray] = {}

    def put(path, value):
        if isinstance(value, Streams):
            out[path + ("positive",)] = np.asarray(value.positive)
            out[path + ("negative",)] = np.asarray(value.negative)
        else:
            out[path] = np.asarray(value)

    for name, r in e.relevance.items():
        put(("relevance", name), r)
    put(("prediction",), e.prediction)
    put(("target",), e.target)
    for f in ("seed", "inputs", "bias", "lost", "params"):
        if getattr(e.conservation, f) is not None:
            put(("conservation", f), getattr(e.conservation, f))
    for name, r in (e.layers or {}).items():
        put(("layers", name), r)
    return out


def _unflatten(fields: dict[tuple, np.ndarray], meta: dict):

    def get(prefix):
        if prefix in fields:
            return fields[prefix]
        if prefix + ("positive",) in fields:
            return Streams(fields[prefix + ("positive",)], fields[prefix + ("negative",)])
        return None

    def group(head):
        names = []
        for p in fields:
            if p[0] == head and p[1] not in names:
                names.append(p[1])
        return {n: get((head, n)) for n in names}

    layers = group("layers") or None
    return Explanation(relevance=group("relevance"), prediction=get(("prediction",)),
                       target=get(("target",)),
                       conservation=Conservation(*(get(("conservation", f))
                                                   for f in ("seed", "inputs", "bias", "lost",
                                                             "params"))),
                       mode=meta["mode"], task=meta["task"], multiplier=meta["multiplier"],
                       outputs={}, layers=layers,
                       method=meta.get("method", {"method": "dlb"})["method"])


# ------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------
def _config(ex) -> dict:
    out = {
        "mode": ex.mode, "task": ex.task, "multiplier": ex.multiplier,
        "options": repr(ex.options), "layers": bool(ex.layers), "explained": ex.explained,
        "batch_axis": ex.batch_axis,
        "inputs": [[n, list(s), d] for n, s, d in ex.plan.row_specs],
        "compute_dtype": ex.compute_dtype,
        "buckets": list(ex.buckets),
    }
    if ex.config.method != "dlb":  # (a DLB manifest keeps its earlier keys: resumable)
        out["method"] = ex.config.method_options()
        if ex.config.gradient_params is not None:
            out["multiplier"] = 1.0
    return out


def _target_key(target) -> Optional[str]:
    if target is None:
        return None
    t = np.asarray(target)
    return f"{t.dtype}:{t.shape}:" + hashlib.sha1(np.ascontiguousarray(t).tobytes()).hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(out: Path) -> Optional[dict]:
    p = out / MANIFEST
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p} is not a dlbjax results manifest")
    return m


# ------------------------------------------------------------------------------------------------
# explain_dataset
# ------------------------------------------------------------------------------------------------
def explain_dataset(ex, data: Any, batch_size: int = 64, out: Any = None, target: Any = None, *,
                    shard_rows: Optional[int] = None, progress: bool = True,
                    overwrite: bool = False, callback: Optional[Callable] = None) -> dict:
    """Explain ``data`` with the Explainer ``ex`` and write the results to the directory ``out``.

    ``data``: arrays (a tensor or numpy array, or a dict/tuple of them, exactly as the Explainer's
    inputs) with rows along axis 0, or any iterable of such batches (batches may have any
    sizes; they are regrouped into shards; a resumed run skips rows from the start of the
    iterable, so it must yield the same rows in the same order). ``target``: None (the argmax), an
    int, or one int per row of the whole dataset. ``batch_size``: rows per compiled call (every
    call is padded to it: one compilation; sharded over all local devices). ``shard_rows``: rows
    per file (default: ``batch_size`` times the number of batches that make at least 1024 rows).
    ``progress``: a tqdm bar over rows. ``overwrite``: start afresh even if ``out`` holds results.
    ``callback(shard_index, rows_done)`` runs after each shard is committed.

    If ``out`` already holds a manifest of the same configuration, the run resumes after its last
    complete shard. Returns the manifest dict; ``dlbjax.load_results(out)`` reads the results.
    """
    if out is None:
        raise ValueError("explain_dataset needs out=<directory> to write the results to")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch_size = max(1, int(batch_size))
    if shard_rows is None:
        shard_rows = batch_size * max(1, -(-1024 // batch_size))
    shard_rows = max(1, int(shard_rows))
    ex.plan.check_task()

    arrays_given = _is_inputs(data)
    total = _rows_of(data) if arrays_given else None
    if target is not None and np.ndim(target) > 0 and total is not None and len(target) != total:
        raise TargetError(f"target has {len(target)} entries; the dataset has {total} rows")
    config = _config(ex)
    manifest = None if overwrite else _read_manifest(out)
    if manifest is not None:
        problems = [k for k in config if manifest["config"].get(k) != config[k]]
        if problems:
            raise ValueError(f"{out} holds results of a different configuration ({', '.join(problems)} "
                             "differ); use another directory or overwrite=True")
        if manifest.get("target") != _target_key(target):
            raise ValueError(f"{out} holds results for different targets; use another directory "
                             "or overwrite=True")
        if total is not None and manifest.get("total_rows") not in (None, total):
            raise ValueError(f"{out} holds results for a dataset of {manifest['total_rows']} rows, "
                             f"this one has {total}; use another directory or overwrite=True")
    else:
        manifest = {"format": FORMAT, "version": VERSION, "config": config,
                    "target": _target_key(target), "total_rows": total, "rows": 0,
                    "complete": False, "fields": None, "shards": []}
        for p in out.glob("shard-*.npz"):
            p.unlink()
        _write_json_atomic(out / MANIFEST, manifest)
    done = int(manifest["rows"])

    if arrays_given:
        shards = ((s, _slice(data, s, min(s + shard_rows, total)))
                  for s in range(done, total, shard_rows))
    else:
        shards = _stream_rows(data, done, shard_rows)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, desc="dlbjax", unit="row")
    try:
        for start, chunk in shards:
            e = _explain_chunk(ex, chunk, start, target, batch_size)
            flat = _flatten(e)
            if manifest["fields"] is None:
                manifest["fields"] = [list(p) for p in flat]
            keys = {tuple(p): f"f{i}" for i, p in enumerate(manifest["fields"])}
            if set(keys) != set(flat):
                raise ValueError("an explained shard has different result fields than the first")
            index = len(manifest["shards"])
            name = f"shard-{index:05d}.npz"
            rows = len(e.target)
            _write_shard(out / name, {keys[p]: v for p, v in flat.items()})
            manifest["shards"].append({"file": name, "start": start, "rows": rows})
            manifest["rows"] = start + rows
            _write_json_atomic(out / MANIFEST, manifest)
            if bar is not None:
                bar.update(rows)
            if callback is not None:
                callback(index, manifest["rows"])
    finally:
        if bar is not None:
            bar.close()
    manifest["complete"] = True
    if manifest["total_rows"] is None:
        manifest["total_rows"] = manifest["rows"]
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _explain_chunk(ex, chunk, start: int, target, batch_size: int):
    n = _rows_of(chunk)
    if target is not None and np.ndim(target) > 0:
        t = np.asarray(target)[start:start + n]
        if len(t) != n:
            raise TargetError(f"target has no entries for rows {start}..{start + n - 1}")
    else:
        t = target
    if ex.runner is None:  # length buckets: one inner Explainer per bucket
        return ex.batch(chunk, target=t, batch_size=batch_size)
    return explain_rows(ex.plan, ex.runner, chunk, t, dataset=True, size=batch_size, fixed=True,
                        keep_inputs=False)


# ------------------------------------------------------------------------------------------------
# load_results
# ------------------------------------------------------------------------------------------------
def load_results(path: Any):
    """Read the results of :meth:`Explainer.explain_dataset` back, in row order.

    Returns an :class:`~dlbjax.Explanation` whose arrays have the dataset as their leading axis
    (``relevance``, ``prediction``, ``target``, ``conservation``, ``layers`` if they were kept;
    ``outputs`` is empty). A run that has not finished gives the rows done so far, with a warning.
    """
    out = Path(path)
    manifest = _read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {out}")
    if not manifest["shards"]:
        raise ValueError(f"{out} holds no explained rows yet")
    paths = [tuple(p) for p in manifest["fields"]]
    parts: dict[tuple, list] = {p: [] for p in paths}
    expect = 0
    for shard in sorted(manifest["shards"], key=lambda s: s["start"]):
        if shard["start"] != expect:
            raise ValueError(f"{out}: rows {expect}..{shard['start'] - 1} are missing")
        with np.load(out / shard["file"]) as z:
            for i, p in enumerate(paths):
                a = z[f"f{i}"]
                if len(a) != shard["rows"]:
                    raise ValueError(f"{out / shard['file']}: field {'/'.join(p)} has {len(a)} rows, "
                                     f"the manifest says {shard['rows']}")
                parts[p].append(a)
        expect += shard["rows"]
    if not manifest.get("complete"):
        warnings.warn(f"{out}: the run is not finished; returning the {expect} rows done so far",
                      stacklevel=2)
    fields = {p: np.concatenate(v, axis=0) for p, v in parts.items()}
    return _unflatten(fields, manifest["config"])
