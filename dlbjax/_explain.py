"""The public entry points: :func:`explain` and the :class:`Explainer` facade.

The Explainer is a thin facade over three seams: a validated :class:`~dlbjax._config.Config`,
the :class:`~dlbjax._plan.Plan` built once by :func:`~dlbjax._plan.prepare`, and the
:class:`~dlbjax._runner.Runner` that owns the compiled pass; results are assembled by
``dlbjax._assemble``. Length buckets (``dlbjax._buckets``) hold one inner Explainer per bucket.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _dataset
from ._assemble import explain_rows
from ._buckets import Bucketing
from ._config import Config
from ._plan import Plan, prepare, prepare_jax
from ._result import Explanation
from ._runner import Runner
from .importers._jax_models import is_jax_model, model_kind
from ._torch import is_module

__all__ = ["explain", "Explainer"]


class Explainer:
    """Import and compile a model once; explain many inputs with the compiled relevance pass.

    ``Explainer(model, example_inputs, **options)`` exports the model on the example's first row,
    checks that every relevance-carrying op has a rule, and jit-compiles the relevance pass of one
    row vmapped over rows. ``explainer(inputs, target=None)`` explains a batch of any number of
    rows (one compilation per row count); ``explainer.batch(data, batch_size=64)`` explains a
    whole dataset in fixed-size chunks (one compilation); ``explainer.explain_dataset(data,
    out=...)`` writes a dataset's results to disk, resumably.

    Arguments:

    - ``model``: a ``torch.nn.Module`` (never modified; one in training mode is exported from an
      eval-mode copy), or a JAX model, traced with ``jax.make_jaxpr``
      (``dlbjax.importers.import_jax``; inputs are JAX or NumPy arrays): a ``flax.nnx.Module``,
      a Flax Linen module as ``(module, variables)``, ``(module, variables, apply_kwargs)`` or
      bound (``module.bind(variables)``), an ``equinox.Module`` (called per example: the row is
      traced without its batch axis), all without ``params=``; or a pure function
      ``fn(params, *inputs)`` (``fn(params, **inputs)`` for a dict) with its parameter pytree as
      ``params=``. Native models are explained in inference mode (Dropout off, BatchNorm on
      running statistics; Linen: ``train``/``training``/``is_training`` False, ``deterministic`` and
      ``use_running_average`` True where ``__call__`` has them, unless ``apply_kwargs`` given) on
      a copy, never modified; parameters are named by path (``conv1.kernel``). See
      ``dlbjax.importers._jax_models``. ``params=`` with a model that holds its parameters, or a
      function without ``params=``, raises TypeError.
    - ``example_inputs``: a tensor, a tuple of positional tensors or a dict of keyword tensors (a
      tokenizer's BatchEncoding works), with rows along axis 0 (``batch_axis=0``).
    - ``mode``: ``"default"`` or ``"contrastive"`` (``"contrast"``).
    - ``multiplier``: the total seed per row (default 100).
    - ``task``: ``"auto"``, ``"classification"``, ``"binary"``, ``"regression"``,
      ``"bbox-regression"``, ``"segmentation"`` / ``"binary-segmentation"`` or ``"next-token"``.
    - ``layers``: also keep the relevance at every intermediate IR variable.
    - ``output``: index or name of the explained model output.
    - ``batch_axis``: 0 (rows along axis 0) or None (the inputs are one example).
    - ``experimental_gating``: the GELU/SiLU/relu6/hardtanh entries of spec §2.2.
    - ``product_rule``: ``"half"``, ``"dlb"`` or ``"signal_take_all"`` (products of two
      activations and LSTM/GRU gates; ``"signal_take_all"`` only for recurrent layers).
    - ``attention_value_fraction``: phi of spec §4.9, the values' share of attention relevance.
    - ``buckets``: None, True or a list of sequence lengths (pad token inputs to the smallest
      bucket that fits; one compilation per bucket; needs an ``attention_mask`` input).
    - ``router_relevance``: MoE routing weights carry relevance.
    - ``compute_dtype``: ``"float32"`` (default; half-precision models computed in float32),
      ``"bfloat16"``/``"float16"`` (half forward, float32 rules and results), ``"float64"`` or
      None.
    - ``precompute_magnitudes``: ``"auto"`` (default: keep |W| of dense/conv weights when it is
      at most 512 MiB and 1/8 of the free device memory), True (keep it) or False (recompute it
      in each call); bitwise-equal relevance either way. A CPU torch model's weights are
      shared, not copied (zero-copy views): a weight changed in place afterwards makes the next
      call raise :class:`dlbjax.WeightsChangedError` (build a new Explainer after training); a
      model that will not fit raises :class:`dlbjax.ModelTooLargeError` with the estimate and
      the options that would make it fit; build stages are logged on the ``"dlbjax"`` logger.
    - ``max_batch``: most rows per compiled call.
    - ``devices``: the devices to shard rows over (default: all local devices).
    - ``thresholding``: segmentation, the probability above which a pixel is seeded.
    - ``method``: ``"dlb"`` (default, DLBacktrace), or the gradient family on the same imported
      JAX forward: ``"gradient"``, ``"gradient-x-input"``, ``"integrated-gradients"`` (options
      ``steps=50``, ``baseline=0.0``, ``ig_method="riemann_trapezoid"``) and ``"smoothgrad"``
      (``samples=25``, ``noise=0.15``, ``seed=0``, ``multiply_by_inputs=False``). Gradient
      methods explain the task's score at multiplier 1 (raw values, comparable with torch
      autograd and Captum); an option of another method raises :class:`dlbjax.MethodError`.
      The LRP family on the same rule registry: ``"lrp-0"``, ``"lrp-epsilon"`` (``epsilon``),
      ``"lrp-gamma"`` (``gamma``), ``"lrp-alpha-beta"`` (``alpha``, ``beta``), ``"flat"``,
      ``"w-square"``, ``"zb"`` (``low``, ``high``), Zennit's composites
      (``"epsilon-plus-flat"``, ``"epsilon-gamma-box"``, ``"epsilon-alpha2-beta1"``, ...), a
      :class:`dlbjax.composites.Composite` and ``"attnlrp"``; ``stabilizer``, ``canonize``
      (fold batch norm, default True). See :class:`dlbjax._config.Config`.
    - ``scan_layers``: ``"auto"`` (default: a run of >= 3 identical layers compiles as one
      ``lax.scan``, so build and first call stay flat in depth), True (>= 2) or False (unrolled).
      Unrolled anyway with ``layers=True``, MoE models, the gradient family and
      ``relevance_function`` (``dlbjax/passes/layers.py``, :class:`dlbjax._config.Config`).
    - ``export_layers``: ``"auto"`` (default: a stack of >= 8 identical layers is exported
      with 3 of them and the rest repeated in the IR, checked against the model's own forward)
      or ``"all"`` (export every layer).

    Each option is documented and validated in :class:`dlbjax._config.Config`. Attributes:
    ``config``, ``plan`` (the imported program, analysis, constants: ``dlbjax._plan.Plan``) and
    ``runner`` (the compiled pass: ``dlbjax._runner.Runner``; None with buckets), plus the
    read-only views below.
    """

    def __init__(self, model: Any, example_inputs: Any, *, params: Any = None, mode: str = "default",
                 multiplier: float = 100.0, task: str = "auto", layers: bool = False,
                 output: Any = 0, batch_axis: Optional[int] = 0, experimental_gating: bool = False,
                 product_rule: str = "half", attention_value_fraction: float = 0.5,
                 buckets: Any = None, router_relevance: bool = False,
                 compute_dtype: Any = "float32", precompute_magnitudes: Any = "auto",
                 max_batch: Optional[int] = None, devices: Any = None,
                 thresholding: float = 0.5, method: str = "dlb", steps: Optional[int] = None,
                 baseline: Any = None, ig_method: Optional[str] = None,
                 samples: Optional[int] = None, noise: Optional[float] = None,
                 seed: Optional[int] = None, multiply_by_inputs: Optional[bool] = None,
                 epsilon: Optional[float] = None, gamma: Optional[float] = None,
                 alpha: Optional[float] = None, beta: Optional[float] = None,
                 stabilizer: Optional[float] = None, low: Any = None, high: Any = None,
                 canonize: Optional[bool] = None, scan_layers: Any = "auto",
                 export_layers: str = "auto"):
        self.config = Config(
            mode=mode, multiplier=multiplier, task=task, layers=layers, output=output,
            batch_axis=batch_axis, experimental_gating=experimental_gating,
            product_rule=product_rule, attention_value_fraction=attention_value_fraction,
            buckets=buckets, router_relevance=router_relevance, compute_dtype=compute_dtype,
            precompute_magnitudes=precompute_magnitudes, max_batch=max_batch, devices=devices,
            thresholding=thresholding, method=method, steps=steps, baseline=baseline,
            ig_method=ig_method, samples=samples, noise=noise, seed=seed,
            multiply_by_inputs=multiply_by_inputs, epsilon=epsilon, gamma=gamma, alpha=alpha,
            beta=beta, stabilizer=stabilizer, low=low, high=high, canonize=canonize,
            scan_layers=scan_layers, export_layers=export_layers)
        self._bucketing: Optional[Bucketing] = None
        self.runner: Optional[Runner] = None
        if not is_module(model):
            # a native JAX model (flax.nnx, Flax Linen (module, variables), equinox) or a JAX
            # function fn(params, *inputs) with params=; wrong combinations raise TypeError
            if params is None and not is_jax_model(model):
                raise TypeError(f"expected a torch.nn.Module, or a function fn(params, *inputs) "
                                f"with params=..., got {type(model).__name__}; native JAX models "
                                f"(a flax.nnx.Module, a Flax Linen (module, variables) or bound "
                                f"module, an equinox.Module) need no params="
                                + (" (a Linen module needs its variables: pass (module, "
                                   "variables))" if model_kind(model) == "linen-unbound" else ""))
            if self.config.buckets is not None:
                raise ValueError("length buckets are available for torch models only")
            self.plan = prepare_jax(model, params, example_inputs, self.config)
            self.runner = Runner(self.plan)
            return
        if params is not None:
            raise TypeError("params= is for a JAX function fn(params, *inputs); a torch module "
                            "holds its own parameters")
        if self.config.buckets is not None:
            inner = self.config.replace(buckets=None).as_dict()
            self._bucketing = Bucketing(model, example_inputs, self.config.buckets,
                                        lambda ex: Explainer(model, ex, **inner))
            self.plan: Plan = self._bucketing.first().plan
        else:
            self.plan = prepare(model, example_inputs, self.config)
            self.runner = Runner(self.plan)

    # ---- read-only views -----------------------------------------------------------------------
    program = property(lambda self: self.plan.program, doc="The imported IR program.")
    analysis = property(lambda self: self.plan.analysis, doc="The relevance path's static facts.")
    options = property(lambda self: self.plan.options, doc="The static rule options.")
    input_names = property(lambda self: self.plan.input_names, doc="The tensor inputs' names.")
    explained = property(lambda self: self.plan.explained, doc="Index of the explained output.")
    moe_layers = property(lambda self: list(self.plan.moe_layers), doc="Routed MoE layers.")
    compute_dtype = property(lambda self: self.plan.compute_dtype,
                             doc="What half precision is computed in (None: unchanged).")
    mode = property(lambda self: self.config.mode)
    multiplier = property(lambda self: self.config.multiplier)
    layers = property(lambda self: self.config.layers)
    batch_axis = property(lambda self: self.config.batch_axis)
    thresholding = property(lambda self: self.config.thresholding)
    max_batch = property(lambda self: self.config.max_batch)
    devices = property(lambda self: self.config.devices)

    @property
    def task(self) -> Optional[str]:
        """The resolved task's name (None when it could not be resolved)."""
        return self.plan.task.name if self.plan.task is not None else None

    @property
    def trace_count(self) -> int:
        """How many times the relevance pass was traced (= compiled), buckets included."""
        if self._bucketing is not None:
            return self._bucketing.trace_count
        return self.runner.trace_count

    @property
    def buckets(self) -> tuple:
        """The sequence-length buckets (empty without bucketing)."""
        return self._bucketing.buckets if self._bucketing else ()

    @property
    def constants(self) -> dict:
        """The model's parameters, buffers and lifted constants as JAX arrays, by name."""
        return dict(self.plan.consts)

    def relevance_function(self):
        """The relevance pass of one example as a pure JAX function ``f(consts, inputs, seeds)``.

        ``inputs``: one array per model input in the example's row layout (``[1, ...]`` with
        ``batch_axis=0``), ordered as ``self.input_names``; ``seeds``: one array of the explained
        output's per-row shape per stream (two in contrastive mode). Returns a
        :class:`~dlbjax.engine.relevance.RowResult` (a NamedTuple pytree: ``relevance``,
        ``absorbed``, ``seed``, ``prediction``, ...). It composes with ``jax.jit``, ``jax.vmap``
        and ``jax.grad``-free transformations like any JAX function.
        """
        return self.plan.relevance_function()

    def replace(self, **options) -> "Explainer":
        """A new Explainer on the same imported model with some options changed, e.g.
        ``ex.replace(mode="contrastive")`` or ``ex.replace(product_rule="dlb")``: the program is
        re-analysed and the pass compiled anew, but the model is not exported again. Options that
        change the imported program (``batch_axis``, ``compute_dtype``, ``buckets``) raise
        ValueError, as does an Explainer with length buckets; this Explainer is unchanged."""
        if self._bucketing is not None:
            raise ValueError("replace() is not available with length buckets; build a new "
                             "Explainer with the options")
        config = self.config.replace(**options)
        other = object.__new__(Explainer)
        other.config, other._bucketing = config, None
        other.plan = self.plan.replace(config)
        other.runner = Runner(other.plan)
        return other

    # ---- explaining ----------------------------------------------------------------------------
    def __call__(self, inputs: Any, target: Any = None) -> Explanation:
        if self._bucketing is not None:
            return self._bucketing.run(inputs, target, lambda ex, x, t: ex(x, target=t))
        # one call; chunked only past max_batch or on out-of-memory
        return explain_rows(self.plan, self.runner, inputs, target)

    def batch(self, data: Any, target: Any = None, batch_size: int = 64,
              progress: bool = False) -> Explanation:
        """Explain a dataset whose rows lie along axis 0, in chunks of ``batch_size`` rows.

        Every chunk has the same shape (the last is padded and trimmed), so the pass compiles once.
        Equals a Python loop of ``explainer(row)`` over the rows.
        """
        if self._bucketing is not None:
            return self._bucketing.run(
                data, target, lambda ex, x, t: ex.batch(x, t, batch_size, progress))
        return explain_rows(self.plan, self.runner, data, target, dataset=True, size=batch_size,
                            progress=progress)

    def explain_dataset(self, data: Any, batch_size: int = 64, out: Any = None, target: Any = None,
                        **options):
        """Explain a dataset to disk, resumably: ``data`` is arrays (or a dict/tuple of arrays,
        as this Explainer's inputs) with rows along axis 0, or an iterable of such batches.
        Results go to the directory ``out`` in shards with a JSON manifest; an interrupted run
        continues where it stopped. Read them with :func:`dlbjax.load_results`. Options and
        details: :func:`dlbjax._dataset.explain_dataset`. Returns the manifest (a dict)."""
        return _dataset.explain_dataset(self, data, batch_size=batch_size, out=out, target=target,
                                        **options)


def explain(model: Any, inputs: Any, *, params: Any = None, target: Any = None,
            mode: str = "default",
            multiplier: float = 100.0, task: str = "auto", layers: bool = False,
            method: str = "dlb", **options) -> Explanation:
    """Explain ``model`` on ``inputs`` with DLBacktrace relevance (``method="dlb"``, the
    default) or a gradient-family method (``"gradient"``, ``"gradient-x-input"``,
    ``"integrated-gradients"``, ``"smoothgrad"``; see :class:`Explainer` for their options).

    ``model``: a ``torch.nn.Module``, a ``flax.nnx.Module``, a Flax Linen ``(module, variables)``
    or bound module, an ``equinox.Module``, or a JAX function ``fn(params, *inputs)`` with
    ``params=`` (details under :class:`Explainer`).

    ``inputs``: a tensor, a tuple of positional tensors or a dict of keyword tensors (a tokenizer's
    BatchEncoding works; JAX or NumPy arrays for a JAX model), with rows along axis 0. ``target``:
    the class to explain (an int, one int per row, or None for the argmax). Other options as for
    :class:`Explainer`. The model is not modified.
    """
    explainer = Explainer(model, inputs, params=params, mode=mode, multiplier=multiplier, task=task,
                          layers=layers, method=method, **options)
    return explainer(inputs, target=target)
