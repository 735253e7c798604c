"""Compiling and running the relevance pass: :class:`Runner` owns the compiled function of one
:class:`~dlbjax._plan.Plan` and its caches (constants in their call layout, device placement,
the chunk size that fits in memory).

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
  worked is remembered (``Runner.chunk_limit``; ``max_batch`` caps it from the start).
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._dtypes import jnp_dtype
from ._errors import DtypeError
from ._plan import Plan
from ._tasks import Seeding
from .engine.gradient import gradient_row
from .engine.relevance import RowResult, relevance_row
from .passes.layers import stack_weights
from .passes.magnitudes import conv_weight_names, restore_layouts, split_layouts, stack_fits

__all__ = ["Runner", "is_out_of_memory", "ROW_AXIS"]

ROW_AXIS = "rows"


class Runner:
    """The compiled relevance pass of a Plan, vmapped over rows, and how to call it.

    ``fn(consts, inputs, classes, select, mags, laid_out)`` is the jitted pass (``trace_count``
    counts its compilations); :meth:`call` runs it on one block of rows, :meth:`run_rows` on any
    number of rows in fixed-size chunks."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.trace_count = 0
        self.chunk_limit: Optional[int] = None  # learned from an out-of-memory failure
        self._call_state = None
        self._placement = None
        self.runs: tuple = ()  # the runs scanned (set with the call state)
        self.scan_in_place = False  # their weights read in place, not stacked (call state)
        self.fn = jax.jit(self._batched)

    @property
    def devices(self) -> tuple:
        """The devices calls run on: the ``devices`` option, or all local devices."""
        chosen = self.plan.config.devices
        return tuple(chosen) if chosen else tuple(jax.local_devices())

    # ---- the compiled function -----------------------------------------------------------------
    def _batched(self, consts, inputs, classes, select, mags=None, laid_out=None):
        # mags: precomputed |W| of the affine weights (dlbjax/passes/magnitudes.py), an argument
        # so that it is not baked into the executable; laid_out: conv weights in the CPU layout
        self.trace_count += 1
        if laid_out:
            consts, mags = restore_layouts(consts, mags, laid_out)
        plan = self.plan
        program, an, opts, cfg = plan.program, plan.analysis, plan.options, plan.config
        gradient = cfg.gradient_params
        if gradient is not None:
            # the gradient family (dlbjax/engine/gradient.py): the task's seed at multiplier 1
            unit = Seeding(1.0, False, an.head, cfg.thresholding)

            def grad_row(inputs_row, cls, sel):
                return gradient_row(program, an, consts, tuple(inputs_row),
                                    plan.task.seed_fn(unit, cls, sel), gradient,
                                    explained=plan.explained)

            return jax.vmap(grad_row)(inputs, classes, select)
        seeding = Seeding(cfg.multiplier, opts.contrastive, an.head, cfg.thresholding)
        taps = tuple(m.weighted.name for m in plan.moe_layers)
        probes = tuple(m.indices.name for m in plan.moe_layers)

        def row(inputs_row, cls, sel):
            return relevance_row(program, an, opts, consts, tuple(inputs_row),
                                 plan.task.seed_fn(seeding, cls, sel), explained=plan.explained,
                                 layers=cfg.layers, taps=taps, probes=probes, magnitudes=mags,
                                 runs=self.runs)

        return jax.vmap(row)(inputs, classes, select)

    # ---- arguments -----------------------------------------------------------------------------
    def call_state(self) -> tuple:
        """(consts, mags, laid_out) to pass to ``fn``: on CPU the conv weights (and their |W|) go
        in the CPU filter layout (``dlbjax/passes/magnitudes.py``), the rest as they are."""
        if self._call_state is None:
            plan = self.plan
            names = conv_weight_names(plan.program) \
                if all(d.platform == "cpu" for d in self.devices) else []
            consts, mags, laid = split_layouts(plan.consts, plan.mags, names) if names else (
                plan.consts, plan.mags, None)
            # runs of identical layers: one lax.scan each over their weights stacked, when the
            # stacked copy is small (stack_fits), else reading each layer's weights in place
            # (passes/layers.scan_weights: no copy, each layer's forward recomputed in the
            # relevance pass); a run with a weight in the CPU conv layout stays unrolled
            self.runs = tuple(r for r in plan.runs if not any(
                v.name in names for _, blocks in r.weights for v in blocks))
            if self.runs:
                nbytes = sum(int(consts[v.name].nbytes) + (int(mags[v.name].nbytes)
                                                           if v.name in mags else 0)
                             for r in self.runs for _, blocks in r.weights for v in blocks)
                self.scan_in_place = not stack_fits(nbytes, self.devices[0])
                if not self.scan_in_place:
                    consts, mags = stack_weights(self.runs, consts, mags)
            self._call_state = (consts, mags, laid)
        return self._call_state

    def compiled_args(self, arrays, classes, select) -> tuple:
        """The arguments of ``fn`` for these rows on the default device (benchmarks use it)."""
        consts, mags, laid = self.call_state()
        dtypes = [jnp_dtype(v.dtype) for v in self.plan.program.inputs]
        inputs = tuple(jnp.asarray(a, dtype=d) for a, d in zip(arrays, dtypes))
        return consts, inputs, jnp.asarray(classes), jnp.asarray(select), mags, laid

    def _placed(self, devs: tuple):
        if self._placement is not None and self._placement[0] == devs:
            return self._placement
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(devs, dtype=object), (ROW_AXIS,))
        replicated = NamedSharding(mesh, PartitionSpec())
        rows = NamedSharding(mesh, PartitionSpec(ROW_AXIS))
        state = jax.device_put(self.call_state(), replicated)  # the constants on every device
        self._placement = (devs, mesh, rows, replicated, state)
        return self._placement

    # ---- running -------------------------------------------------------------------------------
    def call(self, arrays, classes, select) -> RowResult:
        """One call of ``fn`` on these rows (host arrays of the caller's dtypes): placed on one
        device, or sharded along the rows over the devices when there are several and the row
        count divides evenly (``run_rows`` pads it so)."""
        if self.plan.x64 and not jax.config.jax_enable_x64:
            raise DtypeError("this Explainer was built for a float64 model with jax_enable_x64 on; "
                             "turn it on again (jax.config.update('jax_enable_x64', True)) before "
                             "calling it, or rebuild the Explainer from a float32 model")
        self.plan.check_weights()  # a shared torch weight changed in place: WeightsChangedError
        devs = self.devices
        n = len(classes)
        default = len(devs) == 1 and devs[0] == jax.devices()[0]
        if default or n % len(devs) != 0:
            return self.fn(*self.compiled_args(arrays, classes, select))
        _, _, rows, _, (consts, mags, laid) = self._placed(devs)
        dtypes = [jnp_dtype(v.dtype) for v in self.plan.program.inputs]
        inputs = tuple(jax.device_put(np.asarray(a).astype(np.dtype(d)), rows)
                       for a, d in zip(arrays, dtypes))
        return self.fn(consts, inputs, jax.device_put(np.asarray(classes), rows),
                       jax.device_put(np.asarray(select), rows), mags, laid)

    def run_rows(self, arrays, classes, select, size: Optional[int] = None,
                 progress: bool = False) -> RowResult:
        """Explain ``n`` rows in chunks of ``size`` (None: all rows in one call); returns the raw
        result (host arrays with ``n`` rows). Chunks are padded to the same shape (and to a
        multiple of the device count); an out-of-memory failure halves the chunk and retries."""
        n = len(classes)
        ndev = len(self.devices)
        limits = [k for k in (self.plan.config.max_batch, self.chunk_limit) if k]
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
                    raw = jax.device_get(self.call(tuple(take(a) for a in arrays), take(classes),
                                                   take(select)))
                except Exception as exc:  # noqa: BLE001 (re-raised unless it is an OOM)
                    if not is_out_of_memory(exc) or size <= ndev:
                        raise
                    new = _round_up(-(-size // 2), ndev)
                    warnings.warn(f"dlbjax: out of memory explaining {size} rows at once; retrying "
                                  f"in chunks of {new} rows (set max_batch to skip this)",
                                  stacklevel=3)
                    self.chunk_limit = size = new
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
        return jax.tree_util.tree_map(
            lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *chunks)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, (RuntimeError, jax.errors.JaxRuntimeError)):
        return False
    msg = str(exc)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def _round_up(k: int, m: int) -> int:
    return -(-k // m) * m
