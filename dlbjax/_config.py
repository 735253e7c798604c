"""The Explainer's options: one frozen, validated :class:`Config` (the only place that checks them).

Every option of :class:`dlbjax.Explainer` (and :func:`dlbjax.explain`) is a field here, checked
and normalised once in ``__post_init__``; everything later reads the validated values.
"""

from __future__ import annotations

import math

import numpy as np
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

from ._errors import MethodError, TargetError
from ._tasks import TASK_ALIASES
from ._types import Mode, ProductRule
from .composites import PRESETS, Composite
from .engine.gradient import GRADIENT_METHODS, IG_METHODS, ArrayOption, GradientParams
from .rules import DLB, Options
from .rules._lrp import ATTNLRP, LRP_METHODS

__all__ = ["Config", "MODES", "PRODUCT_RULES", "METHODS", "METHOD_OPTIONS"]

# accepted spellings of the two modes
MODES = {"default": "default", "contrastive": "contrastive", "contrast": "contrastive"}
# "signal_take_all" is defined for the gate/signal products of recurrent layers only (spec §4.7,
# §10 R4); a generic product of two activations raises with it (rules.elementwise.product_shares).
PRODUCT_RULES = ("half", "dlb", "signal_take_all")
# attribution methods: DLBacktrace (the rule registry) and the gradient family (jax.grad on the
# same imported forward, dlbjax/engine/gradient.py)
# and the LRP family (rules on the same registry: single rules and Zennit's composites,
# dlbjax/composites.py; a Composite object is accepted too)
# whole-model rule methods that are not a composite: one method for every equation
WHOLE_METHODS = (ATTNLRP,)
RULE_METHODS = LRP_METHODS + tuple(PRESETS) + WHOLE_METHODS
METHODS = (DLB,) + RULE_METHODS + GRADIENT_METHODS
# the options each method takes (None in a Config: not given, the default below applies)
METHOD_OPTIONS = {
    DLB: (),
    "gradient": (),
    "gradient-x-input": (),
    "integrated-gradients": ("steps", "baseline", "ig_method"),
    "smoothgrad": ("samples", "noise", "seed", "multiply_by_inputs"),
    "lrp-0": ("stabilizer", "canonize"),
    "lrp-epsilon": ("epsilon", "stabilizer", "canonize"),
    "lrp-gamma": ("gamma", "stabilizer", "canonize"),
    "lrp-alpha-beta": ("alpha", "beta", "stabilizer", "canonize"),
    "flat": ("stabilizer", "canonize"),
    "w-square": ("stabilizer", "canonize"),
    "zb": ("low", "high", "epsilon", "stabilizer", "canonize"),
    ATTNLRP: ("epsilon", "stabilizer"),
    "composite": (),  # a Composite object carries its own rules, parameters and canonize flag
    **{name: opts + ("canonize",) for name, (_, opts) in PRESETS.items()},
}
METHOD_DEFAULTS = {"steps": 50, "baseline": 0.0, "ig_method": "riemann_trapezoid",
                   "samples": 25, "noise": 0.15, "seed": 0, "multiply_by_inputs": False,
                   "epsilon": 1e-6, "gamma": 0.25, "alpha": 2.0, "beta": 1.0,
                   "stabilizer": 1e-6, "low": None, "high": None, "canonize": True}


@dataclass(frozen=True)
class Config:
    """What to explain and how. Fields (as :class:`dlbjax.Explainer` takes them):

    - ``mode``: ``"default"`` (one non-negative map) or ``"contrastive"`` (``"contrast"`` too): a
      positive and a negative stream (spec §3).
    - ``multiplier``: the total seed per row (default 100), a positive finite number.
    - ``task``: ``"auto"``, ``"classification"``, ``"binary"``, ``"regression"``,
      ``"bbox-regression"``, ``"segmentation"``/``"binary-segmentation"`` or ``"next-token"``
      (see ``dlbjax._tasks``).
    - ``layers``: also keep the relevance at every intermediate IR variable.
    - ``output``: index or name of the explained model output.
    - ``batch_axis``: 0 (rows along axis 0 of every input) or None (the inputs are one example).
    - ``experimental_gating``: use the GELU/SiLU/relu6/hardtanh entries of spec §2.2.
    - ``product_rule``: ``"half"``, ``"dlb"`` or ``"signal_take_all"``, for products of two
      activations and the gate products of LSTM/GRU layers; ``"signal_take_all"`` gives gates 0
      and is defined for recurrent layers only (another product of two activations raises).
    - ``attention_value_fraction``: phi of spec §4.9, the share of attention relevance that goes
      to the values (1 - phi to queries and keys), in [0, 1]; default 1/2.
    - ``buckets``: None, True (powers of two from 8 up to the model's maximum length) or a list
      of sequence lengths: token inputs are right-padded to the smallest bucket that fits, with
      the attention mask; one compilation per bucket; needs an ``attention_mask`` input.
    - ``router_relevance``: MoE routing weights carry relevance (the router gets its share).
    - ``compute_dtype``: ``"float32"`` (default on every backend: bf16/fp16 models are computed
      and explained in float32, ``dlbjax/passes/precision.py``), ``"bfloat16"``/``"float16"``
      (half compute: weights and forward in the half dtype, the rules' sums and ratios in float32,
      float32 results; bf16 is within 1e-3 to 4e-2 relative L2 error of the float32 explanation
      on the test models, ``benchmarks/RESULTS.md`` (i), which is why it is not the GPU default),
      ``"float64"`` (needs jax_enable_x64) or None (keep the model's dtypes).
    - ``precompute_magnitudes``: ``"auto"`` (default), True or False. True computes |W| of the
      dense/conv weights once and keeps it (one more copy of those weights; 15-20% faster calls
      on CPU); False computes it inside each call (no resident copy); ``"auto"`` keeps it when
      its bytes are at most 512 MiB and at most 1/8 of the memory available on the device at
      build time (``dlbjax/passes/magnitudes.py``, ``AUTO_MAGNITUDE_BYTES``), so small models
      get the speed and LLM-sized ones stay near their own weights' memory. The relevance is
      bitwise the same either way.
    - ``max_batch``: most rows per compiled call (larger inputs are split; out-of-memory failures
      halve it automatically).
    - ``devices``: the devices to shard rows over (default: all local devices).
    - ``thresholding``: segmentation, seed the pixels whose probability exceeds it (default 0.5).
    - ``method``: ``"dlb"`` (default: DLBacktrace relevance), ``"gradient"``,
      ``"gradient-x-input"``, ``"integrated-gradients"`` or ``"smoothgrad"`` (``_`` for ``-``
      and any case accepted). The gradient family differentiates the task's score
      ``sum(seed * output)`` with the seed built at multiplier 1 (the target logit, not 100 x it):
      gradient methods return raw, unscaled values, comparable with torch autograd and Captum;
      ``multiplier`` applies to DLB only. They are defined in default mode without ``layers``.
    - method options (each only with its method; None: the default): integrated gradients
      ``steps`` (50), ``baseline`` (0.0: a number, an array broadcasting to one row of the one
      float input, or a dict input name -> array; token inputs take a number, in embedding
      space), ``ig_method`` (``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"``,
      ``"riemann_middle"``, ``"gausslegendre"``); SmoothGrad ``samples`` (25), ``noise`` (0.15:
      the noise std as a fraction of max - min of each input row), ``seed`` (0),
      ``multiply_by_inputs`` (False: mean gradient; True: mean of gradient x noisy input).
    - the LRP family (rules on the same registry, ``rules/_lrp.py``; relevance seeded with
      ``multiplier`` like DLB, default mode only, ``layers`` allowed): ``"lrp-0"``,
      ``"lrp-epsilon"`` (``epsilon``, 1e-6), ``"lrp-gamma"`` (``gamma``, 0.25),
      ``"lrp-alpha-beta"`` (``alpha`` 2, ``beta`` 1, alpha - beta = 1; one given fixes the
      other; alpha=1 is z-plus), ``"flat"``, ``"w-square"``, ``"zb"`` (``low``, ``high``: the
      input's bounds, required; the first layer z^B, LRP-epsilon above), Zennit's composites
      ``"epsilon-plus"``, ``"epsilon-plus-flat"``, ``"epsilon-gamma-box"`` (``low``, ``high``,
      ``gamma``), ``"epsilon-alpha2-beta1"``, ``"epsilon-alpha2-beta1-flat"`` (CamelCase names
      accepted), a :class:`dlbjax.composites.Composite` (or a dict selector -> rule), and
      ``"attnlrp"`` (``epsilon``) for transformers. ``stabilizer`` (1e-6) is the denominator
      shift of every rule but epsilon's, and of the z-rule at sums, average pools and mean
      reductions under every LRP method (Zennit's ``Norm``); ``stabilizer=0`` makes ``"lrp-0"``
      exactly gradient x input on bias-free ReLU networks; ``canonize`` (True) folds batch norm into the layer
      before it (``dlbjax/passes/canonize.py``).
    - ``scan_layers``: ``"auto"`` (default), True or False. Runs of structurally identical layers
      (same equations, shapes, analysis facts and rules; only the weights differ,
      ``dlbjax/passes/layers.py``) are compiled as one ``jax.lax.scan`` over their weights, so
      build and first-call time stay flat in depth; results equal the unrolled pass up to float
      rounding. ``"auto"`` scans a run of at least 3 identical blocks, True of at least 2, False
      never. The runner stacks a run's weights for the scan when that copy is small (at most
      512 MiB and 1/8 of the free memory) and otherwise reads each layer's weights in place,
      holding no copy and recomputing each layer's forward in the relevance pass. Unrolled
      whatever the value: ``layers=True`` (per-layer relevance reads inside the
      layers), MoE models (router probes), the gradient family, equations that book relevance at
      named constants (``Explanation.constants``), CPU conv weights in the CPU layout, and
      ``relevance_function`` (it takes the per-layer constants).
    - ``export_layers``: ``"auto"`` (default) or ``"all"``. A torch model whose layers are a
      ``nn.ModuleList`` of at least 8 structurally identical layers is exported with its first 3
      layers only and the others written as copies in the IR with their own weights
      (``importers/_repeat.py``), so ``torch.export`` time stays flat in depth; the result is
      checked against the model's own forward on the example and the whole model is exported
      when they differ. ``"all"`` always exports every layer.
    """

    mode: Mode = "default"
    multiplier: float = 100.0
    task: str = "auto"
    layers: bool = False
    output: Union[int, str] = 0
    batch_axis: Optional[int] = 0
    experimental_gating: bool = False
    product_rule: ProductRule = "half"
    attention_value_fraction: float = 0.5
    buckets: Any = None
    router_relevance: bool = False
    compute_dtype: Any = "float32"
    precompute_magnitudes: Union[bool, str] = "auto"
    max_batch: Optional[int] = None
    devices: Optional[tuple] = None
    thresholding: float = 0.5
    method: str = DLB
    steps: Optional[int] = None
    baseline: Any = None
    ig_method: Optional[str] = None
    samples: Optional[int] = None
    noise: Optional[float] = None
    seed: Optional[int] = None
    multiply_by_inputs: Optional[bool] = None
    epsilon: Optional[float] = None
    gamma: Optional[float] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    stabilizer: Optional[float] = None
    low: Any = None
    high: Any = None
    canonize: Optional[bool] = None
    scan_layers: Any = "auto"
    export_layers: str = "auto"

    def __post_init__(self):
        mode = self.mode
        if not isinstance(mode, str) or mode.lower() not in MODES:
            raise ValueError(f"mode must be 'default' or 'contrastive' (or 'contrast'), not {mode!r}")
        try:
            m = float(self.multiplier)
        except (TypeError, ValueError):
            raise ValueError(f"multiplier must be a positive number, not {self.multiplier!r}") from None
        if not math.isfinite(m) or m <= 0:
            raise ValueError(f"multiplier must be a positive finite number, not {self.multiplier!r}")
        if self.batch_axis not in (0, None):
            raise ValueError("batch_axis must be 0 (rows along axis 0) or None (inputs are one example)")
        if self.product_rule not in PRODUCT_RULES:
            raise ValueError(f"product_rule must be one of {', '.join(map(repr, PRODUCT_RULES))}, not "
                             f"{self.product_rule!r}")
        buckets = self.buckets if self.buckets is not False else None
        if buckets is not None and self.batch_axis != 0:
            raise ValueError("length buckets need rows along axis 0 (batch_axis=0)")
        set_ = object.__setattr__
        set_(self, "mode", MODES[mode.lower()])
        set_(self, "multiplier", m)
        set_(self, "buckets", buckets)
        set_(self, "thresholding", float(self.thresholding))
        set_(self, "layers", bool(self.layers))
        set_(self, "max_batch", None if self.max_batch is None else max(1, int(self.max_batch)))
        set_(self, "devices", tuple(self.devices) if self.devices else None)
        set_(self, "attention_value_fraction", _phi(self.attention_value_fraction))
        set_(self, "experimental_gating", bool(self.experimental_gating))
        set_(self, "router_relevance", bool(self.router_relevance))
        pm = self.precompute_magnitudes
        if isinstance(pm, str) and pm.lower() == "auto":
            set_(self, "precompute_magnitudes", "auto")
        elif isinstance(pm, (bool, np.bool_)):
            set_(self, "precompute_magnitudes", bool(pm))
        else:
            raise ValueError(f"precompute_magnitudes must be True, False or 'auto', not {pm!r}")
        if self.scan_layers not in ("auto", True, False) or isinstance(self.scan_layers, int) \
                and not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be 'auto', True or False, not {self.scan_layers!r}")
        if self.export_layers not in ("auto", "all"):
            raise ValueError(f"export_layers must be 'auto' or 'all', not {self.export_layers!r}")
        if not isinstance(self.task, str) or self.task.lower() not in TASK_ALIASES:
            raise TargetError(f"unknown task {self.task!r}; use one of {sorted(set(TASK_ALIASES))}")
        self._check_method()

    def _check_method(self) -> None:
        set_ = object.__setattr__
        method = self.method
        if isinstance(method, (dict, list)):
            method = Composite(method)
        if isinstance(method, Composite):
            name = "composite"
        else:
            name = method.lower().replace("_", "-") if isinstance(method, str) else None
            name = _PRESET_SPELLINGS.get(name, name)
            if name not in METHODS:
                raise MethodError(f"unknown method {method!r}; known methods are "
                                  f"{', '.join(map(repr, METHODS))}, or a "
                                  "dlbjax.composites.Composite")
            method = name
        set_(self, "method", method)
        takes = METHOD_OPTIONS[name]
        given = [k for k in METHOD_DEFAULTS if getattr(self, k) is not None]
        wrong = [k for k in given if k not in takes]
        if wrong:
            owners = {k: [m for m, opts in METHOD_OPTIONS.items() if k in opts] for k in wrong}
            raise MethodError(
                f"method {name!r} takes no option{'s' if len(wrong) > 1 else ''} "
                + ", ".join(f"{k}= (an option of {' / '.join(map(repr, owners[k]))})"
                            for k in wrong)
                + (f"; its options are {', '.join(takes)}" if takes else ""))
        if name == DLB:
            return
        if self.mode != "default":
            raise MethodError(f"method {name!r} has one signed map; contrastive mode is defined "
                              "for method='dlb' only")
        if name in RULE_METHODS or name == "composite":
            self._check_rule_options(name)
            return
        if self.layers:
            raise MethodError(f"layers=True (per-layer relevance) is defined for method='dlb' "
                              f"and the LRP family, not {name!r}")
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) \
                    or self.steps < 1:
                raise MethodError(f"steps must be a positive int, not {self.steps!r}")
            set_(self, "steps", int(self.steps))
        if self.ig_method is not None and self.ig_method not in IG_METHODS:
            raise MethodError(f"unknown ig_method {self.ig_method!r}; use one of "
                              f"{', '.join(map(repr, IG_METHODS))}")
        if self.ig_method == "riemann_trapezoid" or (self.ig_method is None and name ==
                                                      "integrated-gradients"):
            if (self.steps or METHOD_DEFAULTS["steps"]) < 2:
                raise MethodError("ig_method='riemann_trapezoid' needs steps >= 2")
        if self.baseline is not None and not isinstance(self.baseline, ArrayOption):
            b = self.baseline
            if isinstance(b, (int, float, np.number)) and not isinstance(b, bool) \
                    or (hasattr(b, "ndim") and b.ndim == 0):
                b = float(b)
                if not math.isfinite(b):
                    raise MethodError(f"baseline must be finite, not {b}")
            else:
                b = ArrayOption(b)
                values = b.value.values() if isinstance(b.value, dict) else [b.value]
                if not all(np.all(np.isfinite(v)) for v in values):
                    raise MethodError("the baseline contains NaN or inf")
            set_(self, "baseline", b)
        if self.samples is not None:
            if isinstance(self.samples, bool) or not isinstance(self.samples, (int, np.integer)) \
                    or self.samples < 1:
                raise MethodError(f"samples must be a positive int, not {self.samples!r}")
            set_(self, "samples", int(self.samples))
        if self.noise is not None:
            try:
                noise = float(self.noise)
            except (TypeError, ValueError):
                raise MethodError(f"noise must be a number >= 0, not {self.noise!r}") from None
            if not math.isfinite(noise) or noise < 0:
                raise MethodError(f"noise must be a finite number >= 0, not {self.noise!r}")
            set_(self, "noise", noise)
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
                raise MethodError(f"seed must be an int, not {self.seed!r}")
            set_(self, "seed", int(self.seed))
        if self.multiply_by_inputs is not None:
            set_(self, "multiply_by_inputs", bool(self.multiply_by_inputs))

    def _check_rule_options(self, name: str) -> None:
        set_ = object.__setattr__
        for k in ("epsilon", "gamma", "stabilizer"):
            v = getattr(self, k)
            if v is None:
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise MethodError(f"{k} must be a number >= 0, not {v!r}") from None
            if not math.isfinite(f) or f < 0:
                raise MethodError(f"{k} must be a finite number >= 0, not {v!r}")
            set_(self, k, f)
        if self.canonize is not None:
            set_(self, "canonize", bool(self.canonize))
        # alpha - beta = 1: one of them given fixes the other
        if self.alpha is not None or self.beta is not None:
            a = float(self.alpha) if self.alpha is not None else float(self.beta) + 1.0
            b = float(self.beta) if self.beta is not None else a - 1.0
            if a < 0 or b < 0 or abs(a - b - 1.0) > 1e-12:
                raise MethodError(f"lrp-alpha-beta needs alpha, beta >= 0 and alpha - beta = 1 "
                                  f"(Bach et al. 2015), not alpha={a}, beta={b}")
            set_(self, "alpha", a)
            set_(self, "beta", b)
        if name in ("zb", "epsilon-gamma-box") and (self.low is None or self.high is None):
            raise MethodError(f"method {name!r} needs low= and high=, the bounds of the input "
                              "(numbers, or arrays broadcasting to one input row, e.g. per "
                              "channel)")
        self.composite  # builds it: a bad rule parameter raises here

    @property
    def composite(self) -> Optional[Composite]:
        """The rules of an LRP-family method as a Composite (None for other methods)."""
        if isinstance(self.method, Composite):
            return self.method
        if self.method not in RULE_METHODS or self.method in WHOLE_METHODS:
            return None
        v = {k: (getattr(self, k) if getattr(self, k) is not None else d)
             for k, d in METHOD_DEFAULTS.items()}
        name, stab, canon = self.method, v["stabilizer"], v["canonize"]
        if name in PRESETS:
            preset, opts = PRESETS[name]
            return preset(**{k: v[k] for k in opts}, canonize=canon)
        if name == "zb":  # defined for the layer that reads the input; epsilon above it
            return Composite([("first", ("zb", {"low": v["low"], "high": v["high"]}))],
                             default=("lrp-epsilon", {"epsilon": v["epsilon"]}), stabilizer=stab,
                             canonize=canon, name="zb")
        params = {k: v[k] for k in METHOD_OPTIONS[name] if k not in ("canonize", "stabilizer")}
        return Composite((), default=(name, params), stabilizer=stab, canonize=canon, name=name)

    @property
    def whole_method(self) -> Optional[tuple]:
        """(name, params) of a whole-model rule method (``attnlrp``), else None."""
        if self.method not in WHOLE_METHODS:
            return None
        params = {k: (getattr(self, k) if getattr(self, k) is not None else METHOD_DEFAULTS[k])
                  for k in METHOD_OPTIONS[self.method]}
        return self.method, tuple(sorted(params.items()))

    @property
    def method_name(self) -> str:
        """The method as a name (a Composite object reports its ``name``)."""
        return self.method.name if isinstance(self.method, Composite) else self.method

    @property
    def gradient_params(self) -> Optional[GradientParams]:
        """The static options of a gradient-family method (None for DLB and the LRP family)."""
        if self.method not in GRADIENT_METHODS:
            return None
        values = {k: (getattr(self, k) if getattr(self, k) is not None else d)
                  for k, d in METHOD_DEFAULTS.items() if k in _GRADIENT_FIELDS}
        return GradientParams(method=self.method, **values)

    def method_options(self) -> dict:
        """The method and the options it ran with (defaults filled in), e.g. for a manifest."""
        composite = self.composite
        if composite is not None:
            return {"method": self.method_name, "rules": composite.describe()}
        if self.whole_method is not None:
            return {"method": self.method, **dict(self.whole_method[1])}
        params = self.gradient_params
        if params is None:
            return {"method": DLB}
        out = {"method": self.method}
        for k in METHOD_OPTIONS[self.method]:
            v = getattr(params, k)
            out[k] = repr(v) if isinstance(v, ArrayOption) else v
        return out

    @property
    def options(self) -> Options:
        """The static rule options of the relevance pass."""
        whole = self.whole_method
        return Options(mode=self.mode, experimental_gating=self.experimental_gating,
                       product_rule=self.product_rule, phi=self.attention_value_fraction,
                       router_relevance=self.router_relevance,
                       method=whole[0] if whole else DLB, params=whole[1] if whole else ())

    def replace(self, **changes) -> "Config":
        """A validated copy with ``changes``; an unknown option name raises TypeError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; options are {sorted(known)}")
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_GRADIENT_FIELDS = ("steps", "baseline", "ig_method", "samples", "noise", "seed",
                    "multiply_by_inputs")
# CamelCase preset names (Zennit's class names) accepted as method strings
_PRESET_SPELLINGS = {n.replace("-", ""): n for n in PRESETS}


def _phi(phi) -> float:
    try:
        phi = float(phi)
    except (TypeError, ValueError):
        raise ValueError(f"attention_value_fraction must be a number in [0, 1], not {phi!r}") from None
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"attention_value_fraction must be in [0, 1], not {phi}")
    return phi
