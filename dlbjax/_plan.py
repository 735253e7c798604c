"""Everything built once per Explainer: :func:`prepare` turns a model, an example and a
:class:`~dlbjax._config.Config` into a frozen :class:`Plan`.

``prepare`` binds and checks the example, exports and translates the model (``importers/``), runs
the program passes (module fusion, half-precision promotion; ``dlbjax/passes/``), analyses the
relevance path (``dlbjax/engine/analysis.py``) and reports every unsupported op at once, checks
dtypes and weights, resolves the task, converts the constants to JAX arrays and precomputes the
weight magnitudes. The Plan then validates callers' inputs (:meth:`Plan.rows`) and gives the
relevance pass of one row as a pure function (:meth:`Plan.relevance_function`); compiling and
running it is the runner's job (``dlbjax._runner``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._config import Config
from ._dtypes import jnp_dtype
from ._errors import (DtypeError, InputMismatchError, MethodError, NonFiniteError, TargetError,
                      WeightsChangedError)
from ._tasks import Task, resolve_task
from .engine.analysis import Analysis, analyze
from .engine.gradient import check_gradient_method, gradient_row
from .engine.origins import FILL_OPS, constant_slots
from .engine.interpret import constants_to_jax, evaluate, missing_lowerings
from .engine.relevance import relevance_row
from . import importers  # its torch half (bind_inputs, import_bound, ...) loads on first use
from .importers import bind_jax_inputs, import_jax
from .importers._jax_models import as_jax_function
from .ir import Program, Source
from .composites import resolve
from .passes.canonize import fold_batch_norm
from .lowerings.fused import FUSED_OP
from .passes.fuse import fuse_modules
from .passes.layers import MIN_COUNT, find_runs
from .passes.magnitudes import MemoryPlan, magnitude_names, plan_memory, precompute_magnitudes
from .passes.moe import find_moe_layers
from .passes.precision import resolve_compute_dtype
from .rules import Options
from ._torch import is_module, is_tensor

__all__ = ["Plan", "prepare", "prepare_jax"]

# progress of long builds (export, placing the constants, compiling): INFO lines on the "dlbjax"
# logger, silent unless enabled (logging.getLogger("dlbjax").setLevel("INFO") with a handler,
# or logging.basicConfig(level="INFO"))
_log = logging.getLogger("dlbjax")


@dataclass(frozen=True, eq=False)
class Plan:
    """The imported, analysed and checked model, ready to compile.

    ``program``: the IR (after the passes); ``input_names``: the forward's tensor inputs;
    ``row_specs``: (name, per-example shape, caller dtype) of each input; ``explained``: the index
    of the explained output; ``analysis``: the static facts of the relevance pass; ``options``:
    the rule options; ``task``: the resolved :class:`~dlbjax._tasks.Task` (None when it cannot be
    resolved, with ``task_error`` raised when seeds are first needed); ``out_size``: the entries a
    target indexes; ``consts``: constants as JAX arrays; ``mags``: precomputed |W|; ``moe_layers``:
    routed layers on the relevance path; ``x64``: the model computes in float64;
    ``compute_dtype``: what half precision is computed in (None: unchanged); ``model_name``: the
    model's class name (task resolution); ``constant_names``: the learned tensors and constants
    that index maps copy into the stream, the columns of ``RowResult.constants``; ``shared``:
    the torch model's tensors whose memory ``consts`` aliases (zero-copy, CPU float32 etc.), with
    their version at build time (:meth:`check_weights`); ``memory``: the memory estimate and the
    ``precompute_magnitudes`` decision (``dlbjax.passes.magnitudes.MemoryPlan``).
    """

    config: Config
    program: Program
    input_names: tuple
    row_specs: tuple
    explained: int
    analysis: Analysis
    options: Options
    task: Optional[Task]
    task_error: Optional[Exception]
    out_size: int
    consts: dict
    mags: dict
    moe_layers: tuple
    x64: bool
    compute_dtype: Optional[str]
    model_name: str = ""
    constant_names: tuple = ()  # columns of RowResult.constants (dlbjax.engine.origins)
    # the program as imported, before a method's own passes (batch-norm folding of the LRP
    # family): what Plan.replace derives from
    imported: Optional[Program] = None
    # the model's tensors whose memory ``consts`` shares: (name, tensor alias, version at build)
    shared: tuple = ()
    memory: Optional[MemoryPlan] = None  # the memory estimate and the |W| decision
    # runs of identical layers compiled as one lax.scan each (dlbjax/passes/layers.py)
    runs: tuple = ()
    # (ModuleList path, layers exported, layers in the model) when the model was exported with
    # its first layers only and the rest repeated in the IR (importers/_repeat.py)
    repeated: Optional[tuple] = None

    def replace(self, config: Config) -> "Plan":
        """The same imported program under other options: re-analysed, its task resolved again, its
        magnitudes recomputed, without exporting the model again. Options that change the
        program itself (``batch_axis``, ``compute_dtype``, ``buckets``) raise ValueError."""
        changed = [n for n in REIMPORT_OPTIONS if getattr(config, n) != getattr(self.config, n)]
        if changed:
            raise ValueError(f"{', '.join(changed)} change the imported program; build a new "
                             "Explainer for them")
        plan = _derive(config, self.imported if self.imported is not None else self.program,
                       self.input_names, self.row_specs, self.compute_dtype, self.model_name,
                       self.consts)
        return dataclasses.replace(plan, shared=self.shared, repeated=self.repeated)

    def check_weights(self) -> None:
        """Raise :class:`~dlbjax.WeightsChangedError` when a model tensor that ``consts`` shares
        was changed in place since the Explainer was built (torch's version counter moved)."""
        for name, tensor, version in self.shared:
            if tensor._version != version:
                raise WeightsChangedError(
                    f"the model's tensor '{name}' was changed in place after this Explainer was "
                    "built (training, load_state_dict, an in-place op). The Explainer shares the "
                    "weight memory of the model instead of copying it, so its checks and "
                    "precomputed |W| no longer describe the weights: build a new Explainer "
                    "(dlbjax.Explainer(model, example)) after changing them, or build it from a "
                    "copy (copy.deepcopy(model)) to keep explaining the old weights")

    def check_task(self) -> Task:
        if self.task_error is not None:
            raise self.task_error
        return self.task

    def relevance_function(self):
        """The relevance pass of one example as a pure JAX function ``f(consts, inputs, seeds)``
        (see :meth:`dlbjax.Explainer.relevance_function`)."""
        program, an, opts = self.program, self.analysis, self.options
        explained, layers = self.explained, self.config.layers
        gradient = self.config.gradient_params
        if gradient is not None:  # the gradient family: the score is sum(seeds[0] * output)
            def g(consts, inputs, seeds):
                def fixed(pred, inputs=None):
                    return tuple(seeds), jnp.int32(-1)
                return gradient_row(program, an, consts, tuple(inputs), fixed, gradient,
                                    explained=explained)

            return g

        def f(consts, inputs, seeds):
            def fixed(pred, inputs=None):
                return tuple(seeds), jnp.int32(-1)
            return relevance_row(program, an, opts, consts, tuple(inputs), fixed,
                                 explained=explained, layers=layers)

        return f

    def rows(self, inputs: Any, dataset: bool = False) -> tuple[tuple, int]:
        """Validate the caller's inputs against the example's rows; returns (one host array per
        input in the layout ``[rows, *row_shape]``, the number of rows). ``dataset``: with
        ``batch_axis=None``, a stack of examples along a new axis 0."""
        if (isinstance(inputs, (np.ndarray, jax.Array)) or is_tensor(inputs)):
            given = {self.input_names[0]: inputs} if len(self.input_names) == 1 else None
            if given is None:
                raise InputMismatchError(
                    f"the model takes {len(self.input_names)} tensor inputs {list(self.input_names)}; "
                    "pass a tuple or a dict")
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            given = {str(k): v for k, v in dict(inputs).items()
                     if isinstance(v, (np.ndarray, jax.Array)) or is_tensor(v)}
        elif isinstance(inputs, (tuple, list)):
            tensors = [v for v in inputs if isinstance(v, (np.ndarray, jax.Array)) or is_tensor(v)]
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
        for name, shape, dtype in self.row_specs:
            value = given[name]
            if is_tensor(value) and value.device.type == "meta":
                raise InputMismatchError(f"input '{name}' is on the 'meta' device and holds no "
                                         "values; pass a tensor with data (e.g. on the CPU)")
            arr = importers.tensor_to_numpy(value) if is_tensor(value) else np.asarray(value)
            got_dtype = str(arr.dtype)
            if got_dtype != dtype:
                raise InputMismatchError(f"input '{name}' has dtype {got_dtype}, the example had "
                                         f"{dtype}; cast it (e.g. x.to(torch.{dtype}))")
            if self.config.batch_axis == 0:
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


def prepare(model: torch.nn.Module, example_inputs: Any, config: Config) -> Plan:
    """Import, analyse and check ``model`` on ``example_inputs`` (module docstring)."""
    if not is_module(model):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    bound = importers.bind_inputs(model, example_inputs)
    _check_devices(model, bound)
    args, kwargs, _ = _row_slice(bound, config.batch_axis)
    exported = importers.static_experts_copy(model)
    row = importers.BoundInputs(args, kwargs, bound.names, [])
    repeated = None
    if config.export_layers == "auto":
        t0 = time.perf_counter()
        try:
            repeated = importers.import_repeated(exported, row)
        except Exception as exc:  # noqa: BLE001 (the truncated copy did not export: try it whole)
            _log.info("dlbjax: exporting 3 layers failed (%s: %s); exporting every layer",
                      type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            repeated = None
        if repeated is not None:
            _log.info("dlbjax: %s exported with 3 of its %d layers at %s, the rest repeated in "
                      "the IR, in %.1f s", type(model).__name__, repeated[1][1], repeated[1][0],
                      time.perf_counter() - t0)
            plan = _prepared(repeated[0], bound, config, model)
            try:
                same = _matches_torch(plan, exported, args, kwargs)
            except Exception as exc:  # noqa: BLE001 (any failure: export every layer instead)
                _log.info("dlbjax: checking the repeated layers failed (%s: %s)",
                          type(exc).__name__, exc)
                same = False
            if same:
                path, count = repeated[1]
                return dataclasses.replace(plan, repeated=(path, importers.REPEAT_KEEP, count))
            _log.info("dlbjax: the repeated layers differ from %s's own forward on the "
                      "example: exporting every layer", type(model).__name__)
            del plan
    t0 = time.perf_counter()
    program = importers.import_bound(exported, row)
    _log.info("dlbjax: %s exported and translated (%d equations, %d constants) in %.1f s",
              type(model).__name__, len(program.eqns), len(program.constants),
              time.perf_counter() - t0)
    return _prepared(program, bound, config, model)


def _prepared(program: Program, bound, config: Config, model) -> Plan:
    program = fuse_modules(program)
    # callers pass the model's own dtypes; half precision is computed in compute_dtype
    row_specs = tuple((v.name, tuple(v.shape), v.dtype) for v in program.inputs)
    program, compute_dtype = resolve_compute_dtype(program, config.compute_dtype)
    plan = _derive(config, program, tuple(bound.names), row_specs, compute_dtype,
                   type(model).__name__, None)
    return dataclasses.replace(plan, shared=_shared_tensors(model, plan.consts))


def _matches_torch(plan: Plan, model, args: tuple, kwargs: dict) -> bool:
    """Whether a program written with repeated layers computes the model's own outputs on the
    example row (``importers/_repeat.py``): every output within 1e-3 (half compute: 5e-2) of
    the largest |value| of torch's eager output. The forward is compiled with the plan's runs
    of identical layers as scans reading the weights in place (its compile time is flat in
    depth; op-by-op evaluation spent ~1 s per op type warming caches)."""
    import torch.utils._pytree as pytree  # a torch model is being prepared
    reference = importers.reference_outputs(model, args, kwargs)
    program = plan.program
    if len(reference) != len(program.outputs):
        return False
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if is_tensor(t)]
    inputs = [jnp.asarray(importers.tensor_to_numpy(t), dtype=jnp_dtype(v.dtype))
              for t, v in zip(tensors, program.inputs)]
    runs = plan.runs

    def forward(consts, inputs):  # runs of identical layers as scans: compiles flat in depth
        return evaluate(program, consts, inputs, runs)

    outputs = jax.jit(forward)(plan.consts, inputs)
    tol = 1e-3 if plan.compute_dtype in (None, "float32", "float64") else 5e-2
    for got, want in zip(outputs, reference):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            return False
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        if not float(np.max(np.abs(got - want), initial=0.0)) <= tol * scale:
            return False
    return True


def _shared_tensors(model, consts: dict) -> tuple:
    """(name, tensor alias, version) of the model's parameters and buffers whose memory a JAX
    constant aliases (CPU, same dtype: ``constants_to_jax``). Sharing is a decision: a CPU model
    is not copied (an Explainer costs about its |W| and activations on top of the model, not
    another copy of the weights); in exchange, an in-place change of those tensors (an optimizer
    step, ``load_state_dict``) is detected through torch's version counter and the next call
    raises WeightsChangedError. A change through ``.data`` bypasses the counter and is not
    detected: build a new Explainer after changing weights that way."""
    tensors = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "cpu" and t.numel() > 0:
            tensors.setdefault(t.data_ptr(), (name, t))
    out = []
    for key, value in consts.items():
        try:
            ptr = value.unsafe_buffer_pointer()
        except Exception:  # noqa: BLE001 (a sharded or deleted array: not shared)
            continue
        hit = tensors.get(ptr)
        if hit is not None:
            alias = hit[1].detach()  # shares the version counter, not the Parameter object
            out.append((hit[0], alias, alias._version))
    return tuple(out)


def prepare_jax(fn, params: Any, example_inputs: Any, config: Config) -> Plan:
    """The JAX counterpart of :func:`prepare` for a pure function ``fn(params, *inputs)``
    (``fn(params, **inputs)`` for a dict of inputs) or a native JAX model that holds its own
    parameters (a ``flax.nnx.Module``, a Flax Linen ``(module, variables)`` or bound module, an
    ``equinox.Module``; :func:`importers._jax_models.as_jax_function`, traced in inference mode
    on a copy): traced with ``jax.make_jaxpr`` on the example's first row (``batch_axis=0``), as
    the torch path exports one row."""
    fn, params, model_name, modules = as_jax_function(fn, params,
                                                      batched=config.batch_axis == 0)
    names, arrays, as_kwargs = bind_jax_inputs(example_inputs)
    if config.batch_axis == 0:
        sizes = {a.shape[0] if a.ndim > 0 else None for a in arrays}
        if None in sizes:
            raise InputMismatchError("with batch_axis=0 every input needs a leading batch axis; "
                                     "pass batch_axis=None to explain a single unbatched example")
        if len(sizes) != 1:
            raise InputMismatchError(f"inputs have different leading (batch) sizes {sorted(sizes)}")
        if sizes.pop() == 0:
            raise InputMismatchError("the inputs are an empty batch (0 rows)")
        arrays = [a[:1] for a in arrays]
    example = dict(zip(names, arrays)) if as_kwargs else \
        (arrays[0] if names == ["x"] else tuple(arrays))
    program = import_jax(fn, params, example)
    if modules:  # a Flax model: module paths and classes from its submodule calls
        program = fuse_modules(_module_sources(program, modules), _flax_batch_norm)
    program = fuse_modules(program)
    row_specs = tuple((v.name, tuple(v.shape), v.dtype) for v in program.inputs)
    program, compute_dtype = resolve_compute_dtype(program, config.compute_dtype)
    return _derive(config, program, tuple(names), row_specs, compute_dtype, model_name, None)


def _module_sources(program: Program, modules: dict) -> Program:
    """Each equation's ``Source`` from the Flax submodule it was traced in: the jaxpr name stack
    (``block/conv1``, Linen ``Model/block/conv1``) becomes the dotted module path
    (``block.conv1``, as the torch importer's) with the module's class as ``module_type``; the
    longest recorded prefix of the stack wins and the rest is kept after a ``/``."""
    changed, eqns = False, []
    for e in program.eqns:
        stack = e.source.module_path
        parts = stack.split("/") if stack else []
        for k in range(len(parts), 0, -1):
            hit = modules.get("/".join(parts[:k]))
            if hit is not None:
                path = "/".join([hit[0]] + parts[k:])
                e = dataclasses.replace(e, source=Source(module_path=path, module_type=hit[1]))
                changed = True
                break
        eqns.append(e)
    if not changed:
        return program
    return Program(program.inputs, program.constants, tuple(eqns), program.outputs,
                   program.output_names, program.const_values, program.const_kinds).validate()


def _flax_batch_norm(module_type: str):
    """A Flax BatchNorm in inference is written out as ``(x - mean) * scale' + bias`` with
    constants; fused into one ``dlbjax.fused`` norm equation (the identity rule), as the torch
    importer's batch-norm op, so relevance matches torch's (``passes/fuse.py`` fuses the other
    written-out norms by class name; ``BatchNorm`` is not among its suffixes)."""
    return ("norm", None) if module_type.rsplit(".", 1)[-1] == "BatchNorm" else (None, None)


def _refuse_fused_batch_norms(program: Program, method: str) -> None:
    """The LRP family canonizes batch norms by folding them into the layer before; a Flax
    BatchNorm arrives written out and fused (:func:`_flax_batch_norm`), which
    ``passes/canonize.py`` folds when it directly follows a dense layer or a convolution (and
    its channel-last permute). One left (not after such a layer, or ``canonize=False``) would
    pass relevance through as the fused identity: refused rather than an unverified answer (an
    unfolded one was measured 18x the torch twin's under lrp-epsilon)."""
    for e in program.eqns:
        body = e.kwargs.get("body") if e.op == FUSED_OP else None
        if body is not None and body.kind == "norm" \
                and e.source.module_type.rsplit(".", 1)[-1] == "BatchNorm":
            raise MethodError(
                f"method {method!r} cannot canonize the Flax BatchNorm at "
                f"'{e.source.module_path}': LRP rules need it folded into the layer before, "
                "and it does not directly follow a dense layer or a convolution (or "
                "canonize=False); use the DLB rules "
                "(method='dlb', the default), a gradient method, or the torch version of the "
                "model")


# options that change the imported program itself; Plan.replace refuses them
REIMPORT_OPTIONS = ("batch_axis", "compute_dtype", "buckets", "export_layers")


def _derive(config: Config, program: Program, input_names: tuple, row_specs: tuple,
            compute_dtype: Optional[str], model_name: str, consts: Optional[dict]) -> Plan:
    """Everything of a Plan that follows from the imported program and the options
    (``consts``: the JAX constants when already converted and checked)."""
    options = config.options
    imported = program
    composite = config.composite
    if composite is not None:  # the LRP family: its rules chosen per equation
        if composite.canonize:
            program, _ = fold_batch_norm(program)
        _refuse_fused_batch_norms(program, config.method_name)
        # Options.method names the method in reports; every equation's rule is in choices
        options = dataclasses.replace(options, method=config.method_name,
                                      choices=resolve(composite, program))
    explained = _output_index(program, config.output)
    analysis = analyze(program, options, explained)
    if config.gradient_params is not None:
        # the gradient family differentiates the forward: an op needs a lowering, not a rule
        lowering = set(missing_lowerings(program))
        analysis.problems = [p for p in analysis.problems if p in lowering]
    analysis.raise_if_unsupported()
    if consts is None:
        _check_constants(program)
    x64 = _check_dtypes(program, analysis)
    out_var = program.outputs[explained]
    # the task is needed to build seeds; an unresolvable task only fails when seeds are built
    # (relevance_function with explicit seeds works for any output)
    task, task_error = None, None
    try:
        task = resolve_task(config.task, out_var.shape, 0 if config.batch_axis == 0 else None,
                            model_name)
        if not task.contrastive and options.contrastive:
            raise TargetError("contrastive mode needs competing classes; it is not defined for "
                              f"{task.name} outputs (use mode='default')")
    except TargetError as exc:
        task, task_error = None, exc
    gradient = config.gradient_params
    if gradient is not None:
        check_gradient_method(program, analysis, gradient, input_names)
    # |W| and the constants' columns serve the DLB rules only; whether |W| is kept and whether
    # the model fits at all is decided before anything large is allocated
    names = magnitude_names(program, analysis, options) \
        if config.precompute_magnitudes and gradient is None else []
    devices = config.devices or (jax.devices()[0],)
    memory = plan_memory(program, names, config.precompute_magnitudes, config.max_batch,
                         devices[0], place_weights=consts is None, compute_dtype=compute_dtype)
    t0 = time.perf_counter()
    if consts is None:
        consts = constants_to_jax(program)
        _drop_host_copies(consts, program, imported)
    mags = precompute_magnitudes(program, analysis, options, consts, names) \
        if memory.keep_magnitudes else {}
    _log.info("dlbjax: constants placed (%.2f GiB copied to %s), |W| %s (%.2f GiB) in %.1f s",
              memory.weights / 2**30, devices[0],
              "precomputed" if mags else "computed in each call", memory.magnitudes / 2**30,
              time.perf_counter() - t0)
    moe = tuple(m for m in find_moe_layers(program) if m.weighted in analysis.carries)
    constant_names, slots = constant_slots(program, analysis, options.method) \
        if gradient is None else ((), {})
    runs = ()
    if config.scan_layers is not False and gradient is None and not config.layers and not moe:
        # equations that book relevance at named constants keep their own columns: unrolled
        barriers = {i for i, _ in slots} | {i for i, e in enumerate(program.eqns)
                                            if e.op in FILL_OPS}
        runs = tuple(find_runs(program, analysis, options, mags=mags, barriers=barriers,
                               min_count=MIN_COUNT if config.scan_layers == "auto" else 2))
    return Plan(config=config, program=program, input_names=input_names,
                row_specs=row_specs, explained=explained, analysis=analysis, options=options,
                task=task, task_error=task_error,
                out_size=task.size(out_var.shape) if task else 0, consts=consts, mags=mags,
                moe_layers=moe, x64=x64, compute_dtype=compute_dtype, model_name=model_name,
                constant_names=constant_names, imported=imported, memory=memory, runs=runs)


def _drop_host_copies(consts: dict, *programs: Program) -> None:
    """One copy of each constant, not two: where ``constants_to_jax`` had to copy a host value
    (a float32 promotion of half-precision weights, an unaligned array) the program's numpy value
    is replaced by a read-only view of the JAX array (same dtype, same bits), so the host copy is
    freed. Values the JAX array aliases (a torch model's shared weights) and values of another
    dtype (int64 ids narrowed to int32) stay as they are."""
    for program in programs:
        values = program.const_values
        for name, arr in consts.items():
            old = values.get(name)
            if not isinstance(old, np.ndarray) or arr.dtype != old.dtype:
                continue
            try:
                if arr.unsafe_buffer_pointer() == old.ctypes.data:
                    continue
                view = np.asarray(arr)
            except Exception:  # noqa: BLE001 (an array not on the host)
                continue
            if view.shape == old.shape and \
                    view.ctypes.data == arr.unsafe_buffer_pointer():
                values[name] = view


def _output_index(program: Program, output) -> int:
    names = program.output_names
    if isinstance(output, str):
        if output not in names:
            raise ValueError(f"the model has no output {output!r}; outputs are {list(names)}")
        return names.index(output)
    if not isinstance(output, int) or not 0 <= output < len(names):
        raise ValueError(f"output must be an index below {len(names)} or one of {list(names)}")
    return output


def _check_constants(program: Program) -> None:
    for var in program.constants:
        value = program.const_values[var.name]
        if var.is_float and not np.all(np.isfinite(np.asarray(value, np.float32))):
            raise NonFiniteError(f"parameter or buffer '{var.name}' contains NaN or inf values; "
                                 "fix the model's weights before explaining it")


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
        return x[:1] if is_tensor(x) else x

    import torch.utils._pytree as pytree  # a torch model is being prepared
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
