"""The public API: :func:`explain`, :class:`Explainer` and :class:`Explanation`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ._buckets import Bucketing
from ._errors import DtypeError, InputMismatchError, NonFiniteError, TargetError
from ._fuse import fuse_modules
from ._moe import find_moe_layers, static_experts_copy
from ._interpret import constants_to_jax
from ._lowering import jnp_dtype
from ._magnitudes import precompute_magnitudes as _precompute_magnitudes
from ._magnitudes import restore_layouts as _restore_layouts
from ._parallel import call_compiled, run_rows
from ._precision import resolve_compute_dtype
from ._relevance import analyze, relevance_row
from ._seed import TASK_ALIASES, check_targets, resolve_task, seed_fn, target_size
from .importers import BoundInputs, bind_inputs, import_bound
from .importers._translate import tensor_to_numpy
from .ir import Program
from .rules import Options, Streams

__all__ = ["explain", "Explainer", "Explanation", "Conservation"]

_MODES = {"default": "default", "contrastive": "contrastive", "contrast": "contrastive"}
# "signal_take_all" is defined for the gate/signal products of recurrent layers only (spec §4.7,
# §10 R4); a generic product of two activations raises with it (rules.elementwise.product_shares).
PRODUCT_RULES = ("half", "dlb", "signal_take_all")


@dataclass
class Conservation:
    """Per-row relevance budget: ``seed = inputs + bias + lost``.

    ``seed``: total seeded relevance; ``inputs``: total at the model inputs; ``bias``: total kept by
    biases and constant addends (dropped from the explanation, spec §2.5); ``lost``: the remainder
    (units with D = 0, gated-off one-sided units, outputs that are constants, T = 0 in contrastive
    mode). In contrastive mode each field is a Streams pair of per-row arrays.
    """

    seed: Any
    inputs: Any
    bias: Any
    lost: Any

    def __str__(self) -> str:
        def rows(name, s, i, b, l):
            lines = [f"{name:>8} {'row':>4} {'seed':>12} {'inputs':>12} {'bias':>12} {'lost':>12}"]
            for r in range(len(s)):
                lines.append(f"{'':>8} {r:>4} {s[r]:12.5f} {i[r]:12.5f} {b[r]:12.5f} {l[r]:12.5f}")
            return lines
        if isinstance(self.seed, Streams):
            out = rows("positive", self.seed.positive, self.inputs.positive, self.bias.positive,
                       self.lost.positive)
            neg = rows("negative", self.seed.negative, self.inputs.negative, self.bias.negative,
                       self.lost.negative)[1:]
            out += [("negative" + line[8:]) if i == 0 else line for i, line in enumerate(neg)]
            return "\n".join(out)
        return "\n".join(rows("", self.seed, self.inputs, self.bias, self.lost))


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

    def __repr__(self) -> str:
        shapes = {k: (tuple(v.positive.shape) if isinstance(v, Streams) else tuple(v.shape))
                  for k, v in self.relevance.items()}
        return (f"Explanation(mode={self.mode!r}, task={self.task!r}, rows={len(self.target)}, "
                f"target={self.target.tolist()}, relevance={shapes})")

    def __eq__(self, other) -> bool:
        """Exact field-by-field equality (arrays by shape, dtype and value)."""
        from ._save import explanations_equal
        return explanations_equal(self, other)

    # ---- pictures and files (dlbjax._views, dlbjax._save) --------------------------------------
    def plot(self, **kw):
        """The natural picture of one row's relevance (heatmap, highlighted tokens or a bar
        chart); see :func:`dlbjax.plot`. Returns the matplotlib Figure."""
        from ._views import plot
        return plot(self, **kw)

    def plot_graph(self, top_k: int = 15, **kw):
        """Relevance flow through the layers (needs ``layers=True``); see
        :func:`dlbjax.plot_graph`."""
        from ._views import plot_graph
        return plot_graph(self, top_k, **kw)

    def plot_experts(self, **kw):
        """Layers x experts heatmap of an MoE explanation; see :func:`dlbjax.plot_experts`."""
        from ._views import plot_experts
        return plot_experts(self, **kw)

    def to_html(self, **kw) -> str:
        """HTML of the tokens coloured by relevance (or a table of the top features); see
        :func:`dlbjax.to_html`."""
        from ._views import to_html
        return to_html(self, **kw)

    def _repr_html_(self) -> str:
        """Notebook display: :func:`dlbjax.to_html` of row 0 (the escaped repr if that fails)."""
        from ._views import to_html
        try:
            return to_html(self)
        except Exception:  # a display hook must not raise
            import html
            return f"<pre>{html.escape(repr(self))}</pre>"

    def save(self, path) -> str:
        """Save to one ``.npz`` file (no pickle); read it with :meth:`Explanation.load` or
        :func:`dlbjax.load_explanation`. Returns the path written."""
        from ._save import save_explanation
        return save_explanation(self, path)

    @classmethod
    def load(cls, path) -> "Explanation":
        """Load an Explanation written by :meth:`save`."""
        from ._save import load_explanation
        return load_explanation(path)


def _check_options(mode, multiplier, batch_axis, product_rule):
    if not isinstance(mode, str) or mode.lower() not in _MODES:
        raise ValueError(f"mode must be 'default' or 'contrastive' (or 'contrast'), not {mode!r}")
    try:
        m = float(multiplier)
    except (TypeError, ValueError):
        raise ValueError(f"multiplier must be a positive number, not {multiplier!r}") from None
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"multiplier must be a positive finite number, not {multiplier!r}")
    if batch_axis not in (0, None):
        raise ValueError("batch_axis must be 0 (rows along axis 0) or None (inputs are one example)")
    if product_rule not in PRODUCT_RULES:
        raise ValueError(f"product_rule must be one of {', '.join(map(repr, PRODUCT_RULES))}, not "
                         f"{product_rule!r}")
    return _MODES[mode.lower()], m


def _check_phi(phi) -> float:
    try:
        phi = float(phi)
    except (TypeError, ValueError):
        raise ValueError(f"attention_value_fraction must be a number in [0, 1], not {phi!r}") from None
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"attention_value_fraction must be in [0, 1], not {phi}")
    return phi


def _row_slice(bound, batch_axis):
    """The example's first row (batch_axis=0) as torch inputs, plus the number of rows."""
    if batch_axis is None:
        return bound.args, bound.kwargs, 1
    sizes = {t.shape[0] if t.ndim > 0 else None for t in bound.tensors}
    if None in sizes:
        raise InputMismatchError("with batch_axis=0 every tensor input needs a leading batch axis; "
                                 "pass batch_axis=None to explain a single unbatched example")
    if len(sizes) != 1:
        raise InputMismatchError(f"tensor inputs have different leading (batch) sizes {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise InputMismatchError("the inputs are an empty batch (0 rows)")

    def first(x):
        return x[:1] if isinstance(x, torch.Tensor) else x

    import torch.utils._pytree as pytree
    return pytree.tree_map(first, bound.args), pytree.tree_map(first, bound.kwargs), n


def _check_devices(model, bound) -> None:
    """Before export: tensors with values, inputs on one device, the model's device (torch.export
    would fail later with a fake-tensor device error), float inputs of the parameters' dtype.
    dlbjax copies weights and inputs to the host and computes on JAX's default device, whatever
    the torch device."""
    tensors = list(model.parameters()) + list(model.buffers())
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        raise InputMismatchError(
            f"the model's parameter or buffer '{meta[0]}' is on the 'meta' device and holds no "
            "values; materialise the weights first (e.g. model.to_empty(device='cpu') and "
            "load_state_dict, or from_pretrained without device_map='meta')")
    devices = {}
    for name, t in zip(bound.names, bound.tensors):
        if t.device.type == "meta":
            raise InputMismatchError(f"input '{name}' is on the 'meta' device and holds no values; "
                                     "pass a tensor with data (e.g. on the CPU)")
        devices.setdefault(t.device, name)
    if len(devices) > 1:
        where = ", ".join(f"'{n}' on {d}" for d, n in devices.items())
        raise InputMismatchError(f"the inputs are on different devices ({where}); move them to "
                                 "the model's device")
    model_devices = {t.device for t in tensors}
    if len(model_devices) == 1 and devices and set(devices) != model_devices:
        (md,), ((d, n),) = model_devices, devices.items()
        raise InputMismatchError(
            f"input '{n}' is on {d} but the model's parameters are on {md}; move the inputs to the "
            f"model's device (x.to('{md}')) or the model to the inputs'. dlbjax copies both to the "
            "host and computes on JAX's default device either way")
    model_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if len(model_dtypes) == 1:
        (md,) = model_dtypes
        for name, t in zip(bound.names, bound.tensors):
            if t.is_floating_point() and t.dtype != md:
                raise InputMismatchError(
                    f"input '{name}' has dtype {t.dtype} but the model's parameters are {md}; cast "
                    f"the input (x.to({md})) or the model (model.to({t.dtype}))")


def _check_dtypes(program, analysis) -> bool:
    """Raise DtypeError for what would otherwise explain silently wrong; returns whether the
    program needs jax_enable_x64 (float64 inputs, parameters or buffers)."""
    def wide(vs):
        return sorted({v.name for v in vs if v.dtype in ("float64", "complex128")})

    model_wide = wide(list(program.inputs) + list(program.constants))
    x64 = jax.config.jax_enable_x64
    if model_wide and not x64:
        raise DtypeError(
            f"the model computes in float64 ({', '.join(model_wide[:3])}"
            f"{', ...' if len(model_wide) > 3 else ''}) but JAX's 64-bit mode is off, so it would "
            "silently run in float32. Turn it on (jax.config.update('jax_enable_x64', True), or "
            "`with jax.enable_x64(True):` around building and calling the Explainer) to explain in "
            "float64, or convert the model and inputs to float32 (model.float(), x.float())")
    casts = wide(o for e in program.eqns for o in e.outputs)
    if casts and not x64:
        warnings.warn(f"the forward casts to float64 ({', '.join(casts[:3])}); with "
                      "jax_enable_x64 off dlbjax computes these values in float32", stacklevel=3)
    if not any(v.is_float or v in analysis.tokens for v in program.inputs):
        raise DtypeError(
            f"no input can carry relevance: the inputs {[v.name for v in program.inputs]} are "
            f"{sorted({v.dtype for v in program.inputs})} tensors and none feeds an embedding "
            "lookup, so every relevance would be 0. Relevance is defined for float inputs and for "
            "token ids read by nn.Embedding; if the integers are numeric features, pass them as "
            "floats (x.float()) and cast nothing inside forward")
    return bool(model_wide)


def _check_finite_relevance(raw: dict) -> None:
    """Finite inputs and weights can still overflow inside the forward (float32 tops out at 3e38);
    relevance of non-finite values is undefined, so refuse rather than return NaN."""
    named = [(f"input '{k}'", s) for k, streams in raw["relevance"].items() for s in streams]
    for what, arr in named + [("the bias totals", raw["absorbed"])]:
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            row = int(np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0][0])
            raise NonFiniteError(
                f"the relevance of {what} is NaN or inf (first at row {row}): the forward pass "
                "produced non-finite values (an overflow: float32 ends at 3.4e38) although inputs "
                "and weights are finite. Scale the inputs down, or explain in float64 "
                "(jax_enable_x64 and model.double())")


class Explainer:
    """Import and compile a model once; explain many inputs with the compiled relevance pass.

    ``Explainer(model, example_inputs, mode=..., multiplier=..., task=..., layers=...)`` exports the
    model on the example's first row (``batch_axis=0``: rows lie along axis 0 of every input, as in
    a batch), checks that every relevance-carrying op has a rule, and jit-compiles the relevance
    pass of one row vmapped over rows. ``explainer(inputs, target=None)`` explains a batch of any
    number of rows (one compilation per row count); ``explainer.batch(data, batch_size=64)``
    explains a whole dataset in fixed-size chunks (one compilation).

    Options: ``mode`` ("default" | "contrastive"), ``multiplier`` (total seed per row, default 100),
    ``task`` ("auto" | "classification" | "binary" | "regression" | "bbox-regression" |
    "segmentation"; see ``dlbjax._seed``), ``thresholding`` (segmentation: seed the pixels whose
    probability exceeds it, default 0.5), ``layers`` (keep relevance at
    every IR variable), ``output`` (index or name of the explained model output), ``batch_axis``
    (0 or None), ``experimental_gating`` (GELU/SiLU/relu6/hardtanh entries of spec §2.2),
    ``product_rule`` ("half" | "dlb" | "signal_take_all", for products of two activations and the
    gate products of LSTM/GRU layers; "signal_take_all" gives gates 0 and is defined only for
    recurrent layers: a model with another product of two activations raises ValueError),
    ``attention_value_fraction`` (phi of spec §4.9: the share of attention relevance that goes to
    the values; 1 - phi goes to queries and keys; default 1/2), ``buckets`` (None, True for powers
    of two from 8 up to the model's maximum length, or a list of lengths: token inputs are padded
    on the right to the smallest bucket that fits, with the attention mask, and the results are
    stripped back; one compilation per bucket; needs an ``attention_mask`` input).

    Scale options: ``compute_dtype`` ("float32" default: a bf16/fp16 model is computed and
    explained in float32, see ``dlbjax._precision``; None keeps half precision),
    ``precompute_magnitudes`` (True: |W| of the dense/conv weights is computed once and kept, one
    more copy of those weights in memory; False recomputes it per call), ``max_batch`` (most rows
    per compiled call; larger inputs are split; out-of-memory failures also halve it
    automatically), ``devices`` (the devices to shard rows over; default all local devices).
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, *, mode: str = "default",
                 multiplier: float = 100.0, task: str = "auto", layers: bool = False,
                 output: Any = 0, batch_axis: Optional[int] = 0, experimental_gating: bool = False,
                 product_rule: str = "half", attention_value_fraction: float = 0.5,
                 buckets: Any = None, router_relevance: bool = False,
                 compute_dtype: Any = "float32", precompute_magnitudes: bool = True,
                 max_batch: Optional[int] = None, devices: Any = None,
                 thresholding: float = 0.5):
        self.mode, self.multiplier = _check_options(mode, multiplier, batch_axis, product_rule)
        self.thresholding = float(thresholding)  # segmentation: pixels with p > thresholding
        self._bucketing = None
        self._traces = 0
        self.max_batch = None if max_batch is None else max(1, int(max_batch))  # rows per call
        self.devices = tuple(devices) if devices else None  # None: all local devices (_parallel)
        if buckets is not None and buckets is not False:
            options = dict(mode=mode, multiplier=multiplier, task=task, layers=layers, output=output,
                           batch_axis=batch_axis, experimental_gating=experimental_gating,
                           product_rule=product_rule,
                           attention_value_fraction=attention_value_fraction,
                           router_relevance=router_relevance, compute_dtype=compute_dtype,
                           precompute_magnitudes=precompute_magnitudes, max_batch=max_batch,
                           devices=devices, thresholding=thresholding)
            if batch_axis != 0:
                raise ValueError("length buckets need rows along axis 0 (batch_axis=0)")
            self._bucketing = Bucketing(model, example_inputs, buckets,
                                        lambda ex: Explainer(model, ex, **options))
            first = self._bucketing.explainer(self._bucketing.bucket_for(
                self._bucketing.kwargs_template[self._bucketing.seq_names[0]].shape[1]))
            for name in ("batch_axis", "layers", "options", "program", "input_names", "analysis",
                         "explained", "task", "_task_error", "_row_specs", "_out_size", "_consts",
                         "moe_layers"):
                setattr(self, name, getattr(first, name))
            return
        self.batch_axis = batch_axis
        self.layers = bool(layers)
        self.options = Options(mode=self.mode, experimental_gating=bool(experimental_gating),
                               product_rule=product_rule, phi=_check_phi(attention_value_fraction),
                               router_relevance=bool(router_relevance))
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, str) or task.lower() not in TASK_ALIASES:
            raise TargetError(f"unknown task {task!r}; use one of {sorted(set(TASK_ALIASES))}")
        bound = bind_inputs(model, example_inputs)
        _check_devices(model, bound)
        args, kwargs, _ = _row_slice(bound, batch_axis)
        program = fuse_modules(import_bound(static_experts_copy(model),
                                            BoundInputs(args, kwargs, bound.names, [])))
        # callers pass the model's own dtypes; half precision is computed in compute_dtype
        self._row_specs = [(v.name, tuple(v.shape), v.dtype) for v in program.inputs]
        program, self.compute_dtype = resolve_compute_dtype(program, compute_dtype)
        self.program: Program = program
        self.input_names = tuple(bound.names)
        self.explained = self._output_index(output)
        self.analysis = analyze(program, self.options, self.explained)
        self.analysis.raise_if_unsupported()
        self._check_constants()
        self._x64 = _check_dtypes(program, self.analysis)
        out_var = program.outputs[self.explained]
        # the task is needed to build seeds; an unresolvable task only fails when seeds are built
        # (relevance_function with explicit seeds works for any output)
        self._task_error = None
        try:
            self.task = resolve_task(task, out_var.shape, 0 if batch_axis == 0 else None,
                                     type(model).__name__)
            if self.task == "regression" and self.options.contrastive:
                raise TargetError("contrastive mode needs competing classes; it is not defined for "
                                  "regression outputs (use mode='default')")
        except TargetError as exc:
            self.task, self._task_error = None, exc
        self._out_size = target_size(self.task, out_var.shape) if self.task else 0
        self._consts = constants_to_jax(program)
        self._mags = _precompute_magnitudes(program, self.analysis, self.options, self._consts) \
            if precompute_magnitudes else {}
        self.moe_layers = [m for m in find_moe_layers(program)
                           if m.weighted in self.analysis.carries]
        self._fn = jax.jit(self._batched)

    # ---- construction helpers ------------------------------------------------------------------
    def _output_index(self, output) -> int:
        names = self.program.output_names
        if isinstance(output, str):
            if output not in names:
                raise ValueError(f"the model has no output {output!r}; outputs are {list(names)}")
            return names.index(output)
        if not isinstance(output, int) or not 0 <= output < len(names):
            raise ValueError(f"output must be an index below {len(names)} or one of {list(names)}")
        return output

    def _check_constants(self) -> None:
        for var in self.program.constants:
            value = self.program.const_values[var.name]
            if var.is_float and not np.all(np.isfinite(np.asarray(value, np.float32))):
                raise NonFiniteError(f"parameter or buffer '{var.name}' contains NaN or inf values; "
                                     "fix the model's weights before explaining it")

    # ---- the compiled function -----------------------------------------------------------------
    def _batched(self, consts, inputs, classes, select, mags=None, laid_out=None):
        # mags: precomputed |W| of the affine weights (dlbjax._magnitudes), an argument so that
        # it is not baked into the executable; laid_out: conv weights in the CPU filter layout
        self._traces += 1
        if laid_out:
            consts, mags = _restore_layouts(consts, mags, laid_out)
        program, an, opts = self.program, self.analysis, self.options
        head = an.head

        def row(inputs_row, cls, sel):
            fn = seed_fn(self.task, opts.contrastive, self.multiplier, head, cls, sel,
                         thresholding=self.thresholding)
            return relevance_row(program, an, opts, consts, tuple(inputs_row), fn,
                                 explained=self.explained, layers=self.layers,
                                 taps=tuple(m.weighted.name for m in self.moe_layers),
                                 probes=tuple(m.indices.name for m in self.moe_layers),
                                 magnitudes=mags)

        return jax.vmap(row)(inputs, classes, select)

    @property
    def trace_count(self) -> int:
        """How many times the relevance pass was traced (= compiled), buckets included."""
        return self._traces + (self._bucketing.trace_count if self._bucketing else 0)

    @property
    def buckets(self) -> tuple:
        """The sequence-length buckets (empty without bucketing)."""
        return self._bucketing.buckets if self._bucketing else ()

    @property
    def constants(self) -> dict:
        """The model's parameters, buffers and lifted constants as JAX arrays, by name."""
        return dict(self._consts)

    def relevance_function(self):
        """The relevance pass of one example as a pure JAX function ``f(consts, inputs, seeds)``.

        ``inputs``: one array per model input in the example's row layout (``[1, ...]`` with
        ``batch_axis=0``), ordered as ``self.input_names``; ``seeds``: one array of the explained
        output's per-row shape per stream (two in contrastive mode). Returns the same dict as the
        compiled pass (``relevance``, ``absorbed``, ``seed``, ``prediction``, ...). It composes
        with ``jax.jit``, ``jax.vmap`` and ``jax.grad``-free transformations like any JAX function.
        """
        program, an, opts = self.program, self.analysis, self.options

        def f(consts, inputs, seeds):
            def fixed(pred, inputs=None):
                return tuple(seeds), jnp.int32(-1)
            return relevance_row(program, an, opts, consts, tuple(inputs), fixed,
                                 explained=self.explained, layers=self.layers)

        return f

    # ---- inputs --------------------------------------------------------------------------------
    def _to_rows(self, inputs: Any, dataset: bool = False) -> tuple[tuple, int]:
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            given = {self.input_names[0]: inputs} if len(self.input_names) == 1 else None
            if given is None:
                raise InputMismatchError(
                    f"the model takes {len(self.input_names)} tensor inputs {list(self.input_names)}; "
                    "pass a tuple or a dict")
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            given = {str(k): v for k, v in dict(inputs).items()
                     if isinstance(v, (torch.Tensor, np.ndarray))}
        elif isinstance(inputs, (tuple, list)):
            tensors = [v for v in inputs if isinstance(v, (torch.Tensor, np.ndarray))]
            if len(tensors) != len(self.input_names):
                raise InputMismatchError(
                    f"expected {len(self.input_names)} tensor inputs {list(self.input_names)}, got "
                    f"{len(tensors)}")
            given = dict(zip(self.input_names, tensors))
        else:
            raise InputMismatchError(f"unsupported input type {type(inputs).__name__}")
        missing = [n for n in self.input_names if n not in given]
        extra = [n for n in given if n not in self.input_names]
        if missing or extra:
            raise InputMismatchError(
                f"input names differ from the example's {list(self.input_names)}: "
                + (f"missing {missing}" if missing else "") + (" " if missing and extra else "")
                + (f"unexpected {extra}" if extra else ""))
        arrays, n_rows = [], None
        for name, shape, dtype in self._row_specs:
            value = given[name]
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise InputMismatchError(f"input '{name}' is on the 'meta' device and holds no "
                                         "values; pass a tensor with data (e.g. on the CPU)")
            arr = tensor_to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
            got_dtype = str(arr.dtype)
            if got_dtype != dtype:
                raise InputMismatchError(f"input '{name}' has dtype {got_dtype}, the example had "
                                         f"{dtype}; cast it (e.g. x.to(torch.{dtype}))")
            if self.batch_axis == 0:
                if arr.ndim != len(shape) or tuple(arr.shape[1:]) != tuple(shape[1:]):
                    raise InputMismatchError(
                        f"input '{name}' has shape {tuple(arr.shape)}; rows of the example have shape "
                        f"{tuple(shape[1:])} (expected [N, {', '.join(map(str, shape[1:]))}])")
                rows = arr.shape[0]
                arr = arr.reshape((rows, 1) + tuple(shape[1:]))
            elif dataset:
                if tuple(arr.shape[1:]) != tuple(shape):
                    raise InputMismatchError(f"input '{name}' has shape {tuple(arr.shape)}; a dataset "
                                             f"of examples of shape {tuple(shape)} must be [N, "
                                             f"{', '.join(map(str, shape))}]")
                rows = arr.shape[0]
            else:
                if tuple(arr.shape) != tuple(shape):
                    raise InputMismatchError(f"input '{name}' has shape {tuple(arr.shape)}, the "
                                             f"example had {tuple(shape)}")
                rows = 1
                arr = arr[None]
            if n_rows is not None and rows != n_rows:
                raise InputMismatchError(f"inputs have different numbers of rows ({n_rows} and {rows})")
            n_rows = rows
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0]
                raise NonFiniteError(f"input '{name}' contains NaN or inf (first at row {bad[0]}); "
                                     "relevance of non-finite inputs is undefined")
            arrays.append(arr)
        if n_rows == 0:
            raise InputMismatchError("the inputs are an empty batch (0 rows)")
        return tuple(arrays), n_rows

    # ---- running -------------------------------------------------------------------------------
    def _run(self, arrays, classes, select):
        if self._x64 and not jax.config.jax_enable_x64:
            raise DtypeError("this Explainer was built for a float64 model with jax_enable_x64 on; "
                             "turn it on again (jax.config.update('jax_enable_x64', True)) before "
                             "calling it, or rebuild the Explainer from a float32 model")
        # cast to the program's dtypes (compute_dtype), one device or sharded over several
        return call_compiled(self, arrays, classes, select)

    def _check_task(self) -> None:
        if self._task_error is not None:
            raise self._task_error

    def __call__(self, inputs: Any, target: Any = None) -> Explanation:
        if self._bucketing is not None:
            return self._bucketing.run(inputs, target, "__call__")
        self._check_task()
        arrays, n = self._to_rows(inputs)
        classes, select = check_targets(self.task, target, n, self._out_size)
        raw = run_rows(self, arrays, classes, select)  # chunked only past max_batch or on OOM
        return self._explanation(raw, n, arrays=arrays)

    def batch(self, data: Any, target: Any = None, batch_size: int = 64,
              progress: bool = False) -> Explanation:
        """Explain a dataset whose rows lie along axis 0, in chunks of ``batch_size`` rows.

        Every chunk has the same shape (the last is padded and trimmed), so the pass compiles once.
        Equals a Python loop of ``explainer(row)`` over the rows.
        """
        if self._bucketing is not None:
            return self._bucketing.run(data, target, "batch", batch_size=batch_size,
                                       progress=progress)
        return self._batch(data, target, batch_size, progress)

    def _batch(self, data, target, batch_size: int, progress: bool = False,
               fixed: bool = False) -> Explanation:
        """:meth:`batch` without buckets. ``fixed``: chunks of exactly ``batch_size`` rows even
        when there are fewer rows (padded), so that calls with any row count share one
        compilation; otherwise a smaller dataset is one chunk of its own size."""
        self._check_task()
        arrays, n = self._to_rows(data, dataset=True)
        classes, select = check_targets(self.task, target, n, self._out_size)
        size = max(1, int(batch_size) if fixed else min(int(batch_size), n))
        # fixed-size chunks, sharded over the devices, halved on out-of-memory (dlbjax._parallel)
        raw = run_rows(self, arrays, classes, select, size=size, progress=progress)
        return self._explanation(raw, n, dataset=True, arrays=arrays)

    def explain_dataset(self, data: Any, batch_size: int = 64, out: Any = None, target: Any = None,
                        **options):
        """Explain a dataset to disk, resumably: ``data`` is arrays (or a dict/tuple of arrays,
        as this Explainer's inputs) with rows along axis 0, or an iterable of such batches.
        Results go to the directory ``out`` in shards with a JSON manifest; an interrupted run
        continues where it stopped. Read them with :func:`dlbjax.load_results`. Options and
        details: :func:`dlbjax._dataset.explain_dataset`. Returns the manifest (a dict)."""
        from ._dataset import explain_dataset
        return explain_dataset(self, data, batch_size=batch_size, out=out, target=target, **options)

    # ---- results -------------------------------------------------------------------------------
    def _explanation(self, raw: dict, n: int, dataset: bool = False,
                     arrays: Optional[tuple] = None) -> Explanation:
        _check_finite_relevance(raw)
        contrastive = self.options.contrastive

        def finish(streams, input_shape: bool):
            # rows are vmapped: [n, *row_shape]; a row's own batch axis of 1 merges into the rows
            arrs = [np.asarray(s) for s in streams]
            if self.batch_axis == 0 and (input_shape or (arrs[0].ndim > 1 and arrs[0].shape[1] == 1)):
                arrs = [a.reshape((n,) + a.shape[2:]) for a in arrs]
            elif input_shape and not dataset:
                arrs = [a[0] for a in arrs]
            return Streams(*arrs) if contrastive else arrs[0]

        relevance = {name: finish(raw["relevance"][name], True) for name, _, _ in self._row_specs}
        pred = np.asarray(raw["prediction"])
        pred = pred.reshape((n,) + pred.shape[2:]) if self.batch_axis == 0 else (
            pred if dataset else pred[0])
        outputs = {}
        for name, o in zip(self.program.output_names, raw["outputs"]):
            o = np.asarray(o)
            outputs[name] = o.reshape((n,) + o.shape[2:]) if self.batch_axis == 0 else (
                o if dataset else o[0])

        def per_stream(a):
            a = np.asarray(a)
            return Streams(a[:, 0], a[:, 1]) if contrastive else a[:, 0]

        seed = per_stream(raw["seed"])
        inputs_total = per_stream(raw["input_total"])
        bias = per_stream(raw["absorbed"])
        if contrastive:
            lost = Streams(*(s - i - b for s, i, b in zip(seed, inputs_total, bias)))
        else:
            lost = seed - inputs_total - bias
        experts = [_expert_relevance(m, raw, contrastive) for m in self.moe_layers] or None
        layers = None
        if self.layers:
            layers = {name: finish(raw["relevance"][name], True) for name, _, _ in self._row_specs}
            labels = {o.name: (e.source.module_path, o.name) for e in self.program.eqns
                      for o in e.outputs}
            for var_name, streams in raw["layers"].items():
                path, v = labels[var_name]
                key = f"{path}/{v}" if path else v
                layers[key] = finish(streams, False)
        target = np.asarray(raw["target"]).reshape(-1)
        kept = None
        if arrays is not None:  # the explained inputs, in the layout of their relevance
            kept = {}
            for (name, _, _), a in zip(self._row_specs, arrays):
                ref = relevance[name].positive if contrastive else relevance[name]
                a = np.asarray(a)
                kept[name] = a.reshape(ref.shape) if a.size == ref.size else a
        flow = None
        if layers:
            from ._views import layer_flow
            flow = layer_flow(self.program, layers)
        return Explanation(relevance=relevance, prediction=pred, target=target,
                           conservation=Conservation(seed, inputs_total, bias, lost),
                           mode=self.mode, task=self.task, multiplier=self.multiplier,
                           outputs=outputs, layers=layers, experts=experts, inputs=kept,
                           flow=flow)


def _expert_relevance(layer, raw: dict, contrastive: bool) -> dict:
    """Per-expert relevance of one MoE layer from the weighted expert outputs' relevance."""
    idx = np.asarray(raw["probes"][layer.indices.name]).astype(np.int64)  # [n, tokens, k]
    onehot = np.eye(layer.num_experts)[idx]  # [n, tokens, k, E]

    def one(stream):
        r = np.asarray(stream).sum(-1)  # [n, tokens, k]
        per_token = np.einsum("ntk,ntke->nte", r, onehot)
        return per_token.sum(1), per_token

    streams = raw["layers"][layer.weighted.name]
    if contrastive:
        (pe_p, pt_p), (pe_n, pt_n) = one(streams[0]), one(streams[1])
        return {"layer": layer.name, "per_expert": Streams(pe_p, pe_n),
                "per_token": Streams(pt_p, pt_n)}
    pe, pt = one(streams[0])
    return {"layer": layer.name, "per_expert": pe, "per_token": pt}


def explain(model: torch.nn.Module, inputs: Any, *, target: Any = None, mode: str = "default",
            multiplier: float = 100.0, task: str = "auto", layers: bool = False,
            **options) -> Explanation:
    """Explain ``model`` on ``inputs`` with DLBacktrace relevance.

    ``inputs``: a tensor, a tuple of positional tensors or a dict of keyword tensors (a tokenizer's
    BatchEncoding works), with rows along axis 0. ``target``: the class to explain (an int, one int
    per row, or None for the argmax). Other options as for :class:`Explainer`. The model is not
    modified.
    """
    explainer = Explainer(model, inputs, mode=mode, multiplier=multiplier, task=task, layers=layers,
                          **options)
    return explainer(inputs, target=target)
