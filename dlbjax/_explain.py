"""The public API: :func:`explain`, :class:`Explainer` and :class:`Explanation`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ._buckets import Bucketing
from ._errors import InputMismatchError, NonFiniteError, TargetError
from ._fuse import fuse_modules
from ._interpret import constants_to_jax
from ._lowering import jnp_dtype
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

    def __repr__(self) -> str:
        shapes = {k: (tuple(v.positive.shape) if isinstance(v, Streams) else tuple(v.shape))
                  for k, v in self.relevance.items()}
        return (f"Explanation(mode={self.mode!r}, task={self.task!r}, rows={len(self.target)}, "
                f"target={self.target.tolist()}, relevance={shapes})")


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


class Explainer:
    """Import and compile a model once; explain many inputs with the compiled relevance pass.

    ``Explainer(model, example_inputs, mode=..., multiplier=..., task=..., layers=...)`` exports the
    model on the example's first row (``batch_axis=0``: rows lie along axis 0 of every input, as in
    a batch), checks that every relevance-carrying op has a rule, and jit-compiles the relevance
    pass of one row vmapped over rows. ``explainer(inputs, target=None)`` explains a batch of any
    number of rows (one compilation per row count); ``explainer.batch(data, batch_size=64)``
    explains a whole dataset in fixed-size chunks (one compilation).

    Options: ``mode`` ("default" | "contrastive"), ``multiplier`` (total seed per row, default 100),
    ``task`` ("auto" | "classification" | "binary" | "regression"), ``layers`` (keep relevance at
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
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, *, mode: str = "default",
                 multiplier: float = 100.0, task: str = "auto", layers: bool = False,
                 output: Any = 0, batch_axis: Optional[int] = 0, experimental_gating: bool = False,
                 product_rule: str = "half", attention_value_fraction: float = 0.5,
                 buckets: Any = None):
        self.mode, self.multiplier = _check_options(mode, multiplier, batch_axis, product_rule)
        self._bucketing = None
        self._traces = 0
        if buckets is not None and buckets is not False:
            options = dict(mode=mode, multiplier=multiplier, task=task, layers=layers, output=output,
                           batch_axis=batch_axis, experimental_gating=experimental_gating,
                           product_rule=product_rule,
                           attention_value_fraction=attention_value_fraction)
            if batch_axis != 0:
                raise ValueError("length buckets need rows along axis 0 (batch_axis=0)")
            self._bucketing = Bucketing(model, example_inputs, buckets,
                                        lambda ex: Explainer(model, ex, **options))
            first = self._bucketing.explainer(self._bucketing.bucket_for(
                self._bucketing.kwargs_template[self._bucketing.seq_names[0]].shape[1]))
            for name in ("batch_axis", "layers", "options", "program", "input_names", "analysis",
                         "explained", "task", "_task_error", "_row_specs", "_out_size", "_consts"):
                setattr(self, name, getattr(first, name))
            return
        self.batch_axis = batch_axis
        self.layers = bool(layers)
        self.options = Options(mode=self.mode, experimental_gating=bool(experimental_gating),
                               product_rule=product_rule, phi=_check_phi(attention_value_fraction))
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, str) or task.lower() not in TASK_ALIASES:
            raise TargetError(f"unknown task {task!r}; use one of {sorted(set(TASK_ALIASES))}")
        bound = bind_inputs(model, example_inputs)
        args, kwargs, _ = _row_slice(bound, batch_axis)
        program = fuse_modules(import_bound(model, BoundInputs(args, kwargs, bound.names, [])))
        self.program: Program = program
        self.input_names = tuple(bound.names)
        self._row_specs = [(v.name, tuple(v.shape), v.dtype) for v in program.inputs]
        self.explained = self._output_index(output)
        self.analysis = analyze(program, self.options, self.explained)
        self.analysis.raise_if_unsupported()
        self._check_constants()
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
    def _batched(self, consts, inputs, classes, select):
        self._traces += 1
        program, an, opts = self.program, self.analysis, self.options
        head = an.head

        def row(inputs_row, cls, sel):
            fn = seed_fn(self.task, opts.contrastive, self.multiplier, head, cls, sel)
            return relevance_row(program, an, opts, consts, tuple(inputs_row), fn,
                                 explained=self.explained, layers=self.layers)

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
        inputs = tuple(jnp.asarray(a, dtype=jnp_dtype(spec[2]))
                       for a, spec in zip(arrays, self._row_specs))
        return self._fn(self._consts, inputs, jnp.asarray(classes), jnp.asarray(select))

    def _check_task(self) -> None:
        if self._task_error is not None:
            raise self._task_error

    def __call__(self, inputs: Any, target: Any = None) -> Explanation:
        if self._bucketing is not None:
            return self._bucketing.run(inputs, target, "__call__")
        self._check_task()
        arrays, n = self._to_rows(inputs)
        classes, select = check_targets(self.task, target, n, self._out_size)
        raw = jax.device_get(self._run(arrays, classes, select))
        return self._explanation(raw, n)

    def batch(self, data: Any, target: Any = None, batch_size: int = 64,
              progress: bool = False) -> Explanation:
        """Explain a dataset whose rows lie along axis 0, in chunks of ``batch_size`` rows.

        Every chunk has the same shape (the last is padded and trimmed), so the pass compiles once.
        Equals a Python loop of ``explainer(row)`` over the rows.
        """
        if self._bucketing is not None:
            return self._bucketing.run(data, target, "batch", batch_size=batch_size,
                                       progress=progress)
        self._check_task()
        arrays, n = self._to_rows(data, dataset=True)
        classes, select = check_targets(self.task, target, n, self._out_size)
        size = max(1, min(int(batch_size), n))
        chunks = []
        starts = range(0, n, size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, total=len(starts), desc="dlbjax", unit="batch")
        for s in starts:
            idx = np.minimum(np.arange(s, s + size), n - 1)
            raw = self._run(tuple(a[idx] for a in arrays), classes[idx], select[idx])
            keep = min(size, n - s)
            chunks.append(jax.tree_util.tree_map(lambda x: np.asarray(x)[:keep], jax.device_get(raw)))
        raw = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *chunks)
        return self._explanation(raw, n, dataset=True)

    # ---- results -------------------------------------------------------------------------------
    def _explanation(self, raw: dict, n: int, dataset: bool = False) -> Explanation:
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
        return Explanation(relevance=relevance, prediction=pred, target=target,
                           conservation=Conservation(seed, inputs_total, bias, lost),
                           mode=self.mode, task=self.task, multiplier=self.multiplier,
                           outputs=outputs, layers=layers)


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
