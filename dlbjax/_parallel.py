"""Running the compiled relevance pass on many rows.

* **Data parallel over devices.** With several local JAX devices (GPUs, or CPU devices from
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``) every call's rows are placed with a
  ``NamedSharding`` over a 1-D mesh (axis ``"rows"``) and the model's constants (and the cached
  |W|) are replicated once per Explainer. XLA partitions the vmapped pass along the rows; rows are
  independent, so no communication happens and the results equal one device's. Row counts are
  padded to a multiple of the device count (the padding repeats the last row and is dropped).
  Only *local* devices are used: on several hosts (after ``jax.distributed.initialize()``) each
  process explains its own part of the data on its own devices.
* **Fixed-size chunks.** ``run_rows(..., size=k)`` runs chunks of exactly k rows (the last one
  padded), so one compilation serves a whole dataset.
* **Out of memory.** When a call fails with XLA's ``RESOURCE_EXHAUSTED`` (or ``MemoryError``), the
  chunk size is halved and the failed chunk retried, down to one row per device; the size that
  worked is remembered on the Explainer (``explainer.max_batch`` caps it from the start).
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._lowering import jnp_dtype
from ._magnitudes import conv_weight_names, split_layouts

__all__ = ["devices_of", "call_state", "compiled_args", "call_compiled", "run_rows",
           "is_out_of_memory", "ROW_AXIS"]

ROW_AXIS = "rows"


def devices_of(ex) -> tuple:
    """The devices an Explainer's calls run on: its ``devices`` option, or all local devices."""
    chosen = getattr(ex, "devices", None)
    return tuple(chosen) if chosen else tuple(jax.local_devices())


def call_state(ex) -> tuple:
    """(consts, mags, laid_out) to pass to ``ex._fn``: on CPU the conv weights (and their |W|) go
    in the CPU filter layout (``dlbjax._magnitudes``), the rest as they are. Cached per Explainer."""
    cache = getattr(ex, "_call_state", None)
    if cache is None:
        mags = getattr(ex, "_mags", {})
        devs = devices_of(ex)
        names = conv_weight_names(ex.program) if all(d.platform == "cpu" for d in devs) else []
        cache = split_layouts(ex._consts, mags, names) if names else (ex._consts, mags, None)
        ex._call_state = cache
    return cache


def compiled_args(ex, arrays, classes, select) -> tuple:
    """The arguments of ``ex._fn`` for these rows on the default device (benchmarks use it)."""
    consts, mags, laid = call_state(ex)
    dtypes = [jnp_dtype(v.dtype) for v in ex.program.inputs]
    inputs = tuple(jnp.asarray(a, dtype=d) for a, d in zip(arrays, dtypes))
    return consts, inputs, jnp.asarray(classes), jnp.asarray(select), mags, laid


def _placement(ex, devs: tuple):
    cache = getattr(ex, "_placement_cache", None)
    if cache is not None and cache[0] == devs:
        return cache
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devs, dtype=object), (ROW_AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(ROW_AXIS))
    state = jax.device_put(call_state(ex), replicated)  # the model's constants on every device
    cache = (devs, mesh, rows, replicated, state)
    ex._placement_cache = cache
    return cache


def call_compiled(ex, arrays, classes, select):
    """One call of ``ex._fn`` on these rows (host arrays of the caller's dtypes): placed on one
    device, or sharded along the rows over the Explainer's devices when there are several and the
    row count divides evenly (``run_rows`` pads it so)."""
    devs = devices_of(ex)
    n = len(classes)
    default = len(devs) == 1 and devs[0] == jax.devices()[0]
    if default or n % len(devs) != 0:
        return ex._fn(*compiled_args(ex, arrays, classes, select))
    _, _, rows, _, (consts, mags, laid) = _placement(ex, devs)
    dtypes = [jnp_dtype(v.dtype) for v in ex.program.inputs]
    inputs = tuple(jax.device_put(np.asarray(a).astype(np.dtype(d)), rows)
                   for a, d in zip(arrays, dtypes))
    return ex._fn(consts, inputs, jax.device_put(np.asarray(classes), rows),
                  jax.device_put(np.asarray(select), rows), mags, laid)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, (RuntimeError, jax.errors.JaxRuntimeError)):
        return False
    msg = str(exc)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def _round_up(k: int, m: int) -> int:
    return -(-k // m) * m


def run_rows(ex, arrays, classes, select, size: Optional[int] = None,
             progress: bool = False) -> dict:
    """Explain ``n`` rows in chunks of ``size`` (None: all rows in one call); returns the raw
    result (a dict of host arrays with ``n`` rows). Chunks are padded to the same shape (and to a
    multiple of the device count); an out-of-memory failure halves the chunk and retries."""
    n = len(classes)
    ndev = len(devices_of(ex))
    limits = [k for k in (getattr(ex, "max_batch", None), getattr(ex, "_chunk_limit", None)) if k]
    size = n if size is None else int(size)
    if limits:
        size = min(size, *limits)
    size = _round_up(max(1, size), ndev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="dlbjax", unit="row")
    chunks, s = [], 0
    try:
        while s < n:
            if s + size <= n:
                take = (lambda a: a[s:s + size])
            else:
                idx = np.minimum(np.arange(s, s + size), n - 1)
                take = (lambda a: a[idx])
            try:
                raw = jax.device_get(ex._run(tuple(take(a) for a in arrays), take(classes),
                                             take(select)))
            except Exception as exc:  # noqa: BLE001 (re-raised unless it is an OOM)
                if not is_out_of_memory(exc) or size <= ndev:
                    raise
                new = _round_up(-(-size // 2), ndev)
                warnings.warn(f"dlbjax: out of memory explaining {size} rows at once; retrying in "
                              f"chunks of {new} rows (set max_batch to skip this)", stacklevel=3)
                ex._chunk_limit = size = new
                continue
            keep = min(size, n - s)
            chunks.append(raw if keep == size else
                          jax.tree_util.tree_map(lambda x: np.asarray(x)[:keep], raw))
            s += keep
            if bar is not None:
                bar.update(keep)
    finally:
        if bar is not None:
            bar.close()
    if len(chunks) == 1:
        return chunks[0]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0),
                                  *chunks)

