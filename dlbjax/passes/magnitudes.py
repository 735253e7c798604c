"""Precomputed |W| of the constant weights of affine ops (a hot-path optimisation).

The default-mode dense/conv rule (``rules/_math.py``, ``_magnitude_rule``) needs |W| for its two extra
products. Computed inside the compiled pass, |W| is a full read and write of every weight on every
call: about 15-20% of a BERT-base explanation at batch 1 on CPU (see benchmarks/RESULTS.md). The
Explainer can compute it once, keep it next to the constants (the dense/conv weights' memory once
more) and pass it to the compiled function as an argument; the relevance pass hands it to the
rule as ``ctx.magnitude(i)``. Results are bit-identical: it is the same ``jnp.abs``. Whether it
does is ``precompute_magnitudes`` (True, False, or ``"auto"``: only when |W| fits a budget, see
:func:`plan_memory`), which also checks that the model fits on its device at all.

Only weights that the magnitude form will read are cached: constant operands with two or more
axes of affine ops on the relevance path, in default mode, not gated by a non-monotone
(experimental) activation entry. Contrastive mode uses the sign-split form (W+ and W-) and caches
nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from dlbjax._dtypes import jnp_dtype
from dlbjax._errors import ModelTooLargeError

from dlbjax.ir import Program, Var
from dlbjax.lowerings import Kind, is_kind
from dlbjax.lowerings.affine import is_transposed_conv
from dlbjax.rules import Options

__all__ = ["magnitude_names", "precompute_magnitudes", "conv_weight_names", "split_layouts",
           "restore_layouts", "available_bytes", "plan_memory", "MemoryPlan",
           "AUTO_MAGNITUDE_BYTES", "AUTO_MAGNITUDE_FRACTION"]


def magnitude_names(program: Program, analysis, options: Options) -> list[str]:
    if options.contrastive:
        return []
    consts = {c.name for c in program.constants}
    names: list[str] = []
    for i, eqn in enumerate(program.eqns):
        rule = options.rule(i, eqn.op)
        if rule is None or not rule.affine or not any(o in analysis.carries for o in eqn.outputs):
            continue
        gate = analysis.gates.get(i)
        if gate is not None and gate.fn is not None:
            continue
        for a in eqn.args:
            if isinstance(a, Var) and a.name in consts and a.is_float and len(a.shape) >= 2 \
                    and a.name not in names:
                names.append(a.name)
    return names


def precompute_magnitudes(program: Program, analysis, options: Options, consts: dict,
                          names: Optional[list] = None) -> dict:
    """name -> |value| for every weight the magnitude form reads (computed once, eagerly);
    ``names``: those weights when already known (:func:`magnitude_names`)."""
    if names is None:
        names = magnitude_names(program, analysis, options)
    return {n: jnp.abs(consts[n]) for n in names}


# ------------------------------------------------------------------------------------------------
# Memory: does the model fit, and is there room for |W|?
# ------------------------------------------------------------------------------------------------
# precompute_magnitudes="auto" (the default) keeps |W| only when its bytes are at most
# AUTO_MAGNITUDE_BYTES and at most AUTO_MAGNITUDE_FRACTION of the memory available on the device
# when the Explainer is built: BERT-base (|W| ~0.34 GB) keeps the 15-20% speed-up of a cached
# |W|; a LLaMA-shaped model of a few GB computes |W| inside each call instead (a transient
# per-weight buffer, not a resident copy), so the Explainer's resident memory stays near the
# model's own weights. The relevance is bitwise the same either way (the same jnp.abs).
AUTO_MAGNITUDE_BYTES = 512 * 2**20
AUTO_MAGNITUDE_FRACTION = 1 / 8


def available_bytes(device=None) -> Optional[int]:
    """Bytes free on ``device`` (default: JAX's default device), or None when unknown: an
    accelerator's ``memory_stats()`` (``bytes_limit - bytes_in_use``); the host's available RAM
    (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``) for CPU devices."""
    if device is None:
        device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 (a backend without statistics)
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _nbytes(var: Var) -> int:
    return int(np.prod(var.shape, dtype=np.int64)) * np.dtype(jnp_dtype(var.dtype)).itemsize


def _shared_on_cpu(value, var: Var) -> bool:
    """Whether ``jax.device_put`` can alias this constant (constants_to_jax) rather than copy."""
    value = np.asarray(value)
    return value.dtype == np.dtype(jnp_dtype(var.dtype)) and value.flags.c_contiguous \
        and value.ctypes.data % 64 == 0


@dataclass(frozen=True)
class MemoryPlan:
    """What building and calling the Explainer will allocate on its device, in bytes:
    ``weights`` (constants copied to the device: all of them on an accelerator; on the CPU only
    those that cannot be shared, e.g. int64 buffers narrowed to int32), ``magnitudes`` (|W|,
    when kept), ``activations`` (an estimate for one call of ``rows`` rows: the forward's values,
    which the relevance pass keeps, and as many relevances), ``available`` (None: unknown) and
    ``keep_magnitudes`` (the decision for ``precompute_magnitudes``)."""

    weights: int
    magnitudes: int
    activations: int
    rows: int
    available: Optional[int]
    keep_magnitudes: bool

    @property
    def needed(self) -> int:
        return self.weights + (self.magnitudes if self.keep_magnitudes else 0) + self.activations


def stack_fits(nbytes: int, device=None) -> bool:
    """Whether a scan's stacked copy of its layers' weights (``nbytes``) is cheap enough to keep
    (``dlbjax/passes/layers.py``: ``stack_weights``): the same cap as kept |W|, at most
    AUTO_MAGNITUDE_BYTES and AUTO_MAGNITUDE_FRACTION of the free memory. Otherwise the scan
    reads each layer's weights in place (``scan_weights``), holding no copy, at the price of
    recomputing each layer's forward in the relevance pass."""
    available = available_bytes(device)
    cap = AUTO_MAGNITUDE_BYTES if available is None else \
        min(AUTO_MAGNITUDE_BYTES, int(available * AUTO_MAGNITUDE_FRACTION))
    return nbytes <= cap


def plan_memory(program: Program, mag_names: list, precompute: Union[bool, str],
                max_batch: Optional[int], device=None, place_weights: bool = True,
                compute_dtype: Optional[str] = None) -> MemoryPlan:
    """Decide ``precompute_magnitudes`` (True, False or ``"auto"``: see AUTO_MAGNITUDE_BYTES) and
    check that the model fits: raises :class:`~dlbjax._errors.ModelTooLargeError` with the
    estimate and the options that would make it fit when the bytes needed exceed the bytes
    available (``available_bytes``; no check when unknown). ``place_weights``: the constants
    are still to be placed (False when an Explainer re-derives from placed constants)."""
    if device is None:
        device = jax.devices()[0]
    cpu = device.platform == "cpu"
    weights = 0
    if place_weights:
        for c in program.constants:
            if not cpu or not _shared_on_cpu(program.const_values[c.name], c):
                weights += _nbytes(c)
    by_name = {c.name: c for c in program.constants}
    mags = sum(_nbytes(by_name[n]) for n in mag_names)
    rows = max_batch or 1
    per_row = sum(_nbytes(o) for e in program.eqns for o in e.outputs)
    per_row += sum(_nbytes(v) for v in program.inputs)
    activations = 2 * per_row * rows
    available = available_bytes(device)
    if precompute == "auto":
        cap = AUTO_MAGNITUDE_BYTES if available is None else \
            min(AUTO_MAGNITUDE_BYTES, int(available * AUTO_MAGNITUDE_FRACTION))
        keep = bool(mag_names) and mags <= cap
    else:
        keep = bool(precompute) and bool(mag_names)
    plan = MemoryPlan(weights, mags, activations, rows, available, keep)
    if available is not None and plan.needed > available:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        options = []
        if keep:
            options.append(f"precompute_magnitudes=False (or 'auto'): saves {gib(mags)} of |W|, "
                           "computed inside each call instead")
        if compute_dtype is not None:
            options.append("compute_dtype=None: keeps the half-precision weights as they are "
                           "instead of float32 copies (relevance then has the model's rounding)")
        if rows > 1:
            options.append(f"a smaller max_batch (now {rows}): activations are about "
                           f"{gib(2 * per_row)} per row")
        elif max_batch is None:
            options.append(f"max_batch=1 bounds each call's activations (about "
                           f"{gib(2 * per_row)} per row)")
        options.append("a device with more memory (devices=[...]), or a smaller model")
        parts = {"weights": weights, "magnitudes": mags if keep else 0,
                 "activations": activations}
        raise ModelTooLargeError(
            f"the model will not fit on {device}: dlbjax needs about {gib(plan.needed)} "
            f"(weights copied to the device {gib(weights)}, |W| {gib(mags if keep else 0)}, "
            f"activations for {rows} row{'s' if rows > 1 else ''} {gib(activations)}) and "
            f"{gib(available)} is available. Options:\n"
            + "\n".join(f"  - {o}" for o in options),
            needed=plan.needed, available=available, parts=parts, options=tuple(options))
    return plan


# ------------------------------------------------------------------------------------------------
# Convolution weights in the CPU's filter layout
# ------------------------------------------------------------------------------------------------
# XLA:CPU runs convolutions with the filter as [*kernel, in, out] (row-major). A PyTorch weight
# [out, in, *kernel] passed as an argument is therefore transposed (copied) inside every call, once
# per use: the forward, the S = |x| * |W| product and its transpose each copy a weight (and |W|).
# On CPU the Explainer passes conv weights (and their |W|) already transposed and undoes the
# transpose at the start of the compiled function, where XLA cancels the pair; the program still
# sees [out, in, *kernel]. Bit-identical results; resnet18 at 224x224 explains ~15% faster.
def conv_weight_names(program: Program) -> list[str]:
    consts = {c.name for c in program.constants}
    names: list[str] = []
    for eqn in program.eqns:
        if not is_kind(eqn.op, Kind.CONV) or is_transposed_conv(eqn):
            continue  # (a transposed convolution's weight has another layout)
        w = eqn.args[1] if len(eqn.args) > 1 else None
        if isinstance(w, Var) and w.name in consts and w.is_float and len(w.shape) >= 3 \
                and w.name not in names:
            names.append(w.name)
    return names


def _perm(ndim: int) -> tuple:
    return tuple(range(2, ndim)) + (1, 0)


def to_filter_layout(w):
    """[out, in, *kernel] -> [*kernel, in, out]."""
    return jnp.transpose(w, _perm(w.ndim))


def from_filter_layout(w):
    """The inverse of :func:`to_filter_layout` (inside the compiled function)."""
    perm = _perm(w.ndim)
    inverse = tuple(sorted(range(w.ndim), key=lambda i: perm[i]))
    return jnp.transpose(w, inverse)


def split_layouts(consts: dict, mags: dict, names) -> tuple[dict, dict, dict]:
    """(consts, mags) without the named conv weights, plus those in the filter layout."""
    names = set(names)
    laid = {"consts": {k: to_filter_layout(consts[k]) for k in names if k in consts},
            "mags": {k: to_filter_layout(mags[k]) for k in names if k in mags}}
    return ({k: v for k, v in consts.items() if k not in names},
            {k: v for k, v in mags.items() if k not in names}, laid)


def restore_layouts(consts: dict, mags: Optional[dict], laid_out: dict) -> tuple[dict, dict]:
    """Inside the compiled function: put the conv weights back as [out, in, *kernel]."""
    consts = dict(consts, **{k: from_filter_layout(v) for k, v in laid_out["consts"].items()})
    mags = dict(mags or {}, **{k: from_filter_layout(v) for k, v in laid_out["mags"].items()})
    return consts, mags
