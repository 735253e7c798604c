"""The gradient family of attribution methods, with ``jax.grad`` on the imported JAX forward.

Methods (``GradientParams.method``):

* ``"gradient"``: d score / d input;
* ``"gradient-x-input"``: gradient x input;
* ``"integrated-gradients"`` (Sundararajan et al. 2017): (x - b) x sum_k w_k grad(b + a_k (x - b))
  with the points a_k and weights w_k of ``ig_method``, exactly Captum's definitions so that
  results compare: ``riemann_left``/``right``/``middle`` (weights 1/n), ``riemann_trapezoid``
  (a_k = linspace(0, 1, n), weights 1/n with both ends halved: they sum to (n - 1)/n, so the sum
  of attributions is short of f(x) - f(b) by about 1/n of it, as in Captum) and
  ``gausslegendre`` (n-point Gauss-Legendre on [0, 1], the most accurate); the points are one
  ``jax.vmap``;
* ``"smoothgrad"`` (Smilkov et al. 2017): the mean over ``samples`` noisy copies x + eps,
  eps ~ N(0, (noise (max x - min x))^2), of the gradient (or of gradient x noisy input with
  ``multiply_by_inputs``), one ``jax.vmap`` over the samples.

The score is ``sum(seed * output)`` of the explained output, the seed being the task's seed with
multiplier 1 (``dlbjax._tasks``): the target logit for classification, the last position's token
logit for next-token, the mean of the selected outputs for regression. The target is fixed at the
input x (the argmax there), also along an integrated-gradients path.

Token ids: the features are the outputs of the embedding lookups they feed (``aten.embedding``);
each method works in embedding space (baseline and noise there) and a token's attribution is the
sum over the hidden axis, carried back to the ids' positions through the same exact index maps the
DLB pass routes them through (as a float "shadow" of the ids).

Every method returns a :class:`~dlbjax.engine.relevance.RowResult` of one stream, whose ``seed``
is score(x) - score(reference) (reference: the baseline for integrated gradients, zero for the
others) and whose ``input_total`` is the attributions' sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dlbjax._dtypes import relevance_dtype
from dlbjax._errors import MethodError
from dlbjax.engine.analysis import Analysis
from dlbjax.engine.relevance import RowResult
from dlbjax.ir import Program, Var, substitute
from dlbjax.lowerings import TABLE, Kind, call_lowering, is_kind

__all__ = ["GradientParams", "GRADIENT_METHODS", "IG_METHODS", "ig_points", "gradient_row",
           "check_gradient_method", "ArrayOption"]

GRADIENT_METHODS = ("gradient", "gradient-x-input", "integrated-gradients", "smoothgrad")
IG_METHODS = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle",
              "gausslegendre")


class ArrayOption:
    """An array-valued option (a baseline) inside the frozen, comparable Config: an array, or a
    dict input name -> array, compared and hashed by value."""

    def __init__(self, value):
        if isinstance(value, dict):
            self.value = {str(k): _as_numpy(v) for k, v in value.items()}
        else:
            self.value = _as_numpy(value)

    def _key(self):
        items = self.value.items() if isinstance(self.value, dict) else [(None, self.value)]
        return tuple((k, v.dtype.str, v.shape, v.tobytes()) for k, v in sorted(
            items, key=lambda kv: str(kv[0])))

    def __eq__(self, other):
        return isinstance(other, ArrayOption) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        if isinstance(self.value, dict):
            return "ArrayOption({" + ", ".join(f"{k!r}: shape {v.shape}"
                                               for k, v in self.value.items()) + "})"
        return f"ArrayOption(shape {self.value.shape})"


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if a.dtype.kind not in "fiub":
        raise MethodError(f"a baseline must be numeric, got dtype {a.dtype}")
    return a


@dataclass(frozen=True)
class GradientParams:
    """The static options of one gradient-family pass (validated by ``dlbjax._config``)."""

    method: str
    steps: int = 50
    ig_method: str = "riemann_trapezoid"
    baseline: Any = 0.0          # a float, or an ArrayOption
    samples: int = 25
    noise: float = 0.15
    seed: int = 0
    multiply_by_inputs: bool = False


def ig_points(n: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of an n-point rule on [0, 1], as Captum defines them."""
    if method == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), np.full(n, 1.0 / n)
    if method == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), np.full(n, 1.0 / n)
    if method == "riemann_middle":
        return np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n), np.full(n, 1.0 / n)
    if method == "riemann_trapezoid":
        if n < 2:
            raise MethodError("riemann_trapezoid needs steps >= 2")
        # Captum's weights: 1/n with the two ends halved (they sum to (n - 1)/n, not 1, so the
        # attributions' sum falls short of completeness by about 1/n of f(x) - f(baseline))
        w = np.full(n, 1.0 / n)
        w[0] = w[-1] = 1.0 / (2 * n)
        return np.linspace(0.0, 1.0, n), w
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    raise MethodError(f"unknown ig_method {method!r}; use one of {', '.join(IG_METHODS)}")


# ------------------------------------------------------------------------------------------------
# the features a method differentiates
# ------------------------------------------------------------------------------------------------
def _embedding_eqns(program: Program, an: Analysis) -> list:
    """Indices of the lookups whose indices are token ids (their outputs are the features)."""
    out = []
    for i, e in enumerate(program.eqns):
        if is_kind(e.op, Kind.INDEX_TABLE) and len(e.args) > 1 and isinstance(e.args[1], Var) \
                and e.args[1] in an.tokens:
            out.append(i)
    return out


def check_gradient_method(program: Program, an: Analysis, params: GradientParams,
                          input_names: tuple) -> None:
    """Raise MethodError for what the method cannot do with this program (before compiling)."""
    for i in _embedding_eqns(program, an):
        e = program.eqns[i]
        if e.op != "aten.embedding.default":
            raise MethodError(
                f"method {params.method!r} attributes token ids through nn.Embedding lookups; "
                f"{e.op} in module '{e.source.module_path}' (an embedding bag) sums several tokens "
                "into one vector, so per-token gradients are not defined there; use method='dlb'")
    b = params.baseline
    if isinstance(b, ArrayOption):
        floats = {v.name: v for v in program.inputs if v.is_float and v in an.carries}
        tokens = [v.name for v in program.inputs if v in an.tokens]
        if isinstance(b.value, dict):
            for name, arr in b.value.items():
                if name in tokens:
                    raise MethodError(f"input '{name}' holds token ids: its baseline lives in "
                                      "embedding space; give a number (default 0) for it")
                if name not in floats:
                    raise MethodError(f"baseline for unknown or non-float input {name!r}; float "
                                      f"inputs are {sorted(floats)}")
                _check_broadcast(name, arr, floats[name].shape)
        else:
            if len(floats) != 1 or tokens:
                raise MethodError("an array baseline needs a model with exactly one float input; "
                                  "pass a dict input name -> baseline (token inputs take a number)")
            (name, var), = floats.items()
            _check_broadcast(name, b.value, var.shape)


def _check_broadcast(name, arr, row_shape):
    try:
        np.broadcast_to(arr, tuple(row_shape))
    except ValueError:
        raise MethodError(f"the baseline of input '{name}' has shape {arr.shape}, which does not "
                          f"broadcast to one row of it {tuple(row_shape)} (a baseline is shared "
                          "by every row)") from None


def _baseline_of(params: GradientParams, name: str, x):
    b = params.baseline
    if isinstance(b, ArrayOption):
        value = b.value.get(name, 0.0) if isinstance(b.value, dict) else b.value
        return jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape)
    return jnp.full(x.shape, b, x.dtype)


# ------------------------------------------------------------------------------------------------
# one row
# ------------------------------------------------------------------------------------------------
def gradient_row(program: Program, an: Analysis, consts: dict, inputs: tuple, seed_fn: Callable,
                 params: GradientParams, *, explained: int = 0,
                 n_constants: int = 0) -> RowResult:
    """Attributions of one example by a gradient-family method (module docstring).
    ``seed_fn(prediction, inputs_by_name) -> (seeds, target)`` as for the relevance pass (called
    with multiplier 1 by the runner)."""
    rd = relevance_dtype()
    emb_eqns = _embedding_eqns(program, an)
    emb_set = set(emb_eqns)
    float_names = [v.name for v in program.inputs if v.is_float and v in an.carries]
    token_vars = [v for v in program.inputs if v in an.tokens]
    by_name = {v.name: x for v, x in zip(program.inputs, inputs)}

    def run(points: dict, shadow_in: dict):
        """The forward with ``points`` replacing float inputs (by name) and embedding outputs
        (``"emb:<i>"``); returns (outputs, embedding outputs, shadows of their indices)."""
        env: dict = {}
        shadows: dict = {}
        for v, x in zip(program.inputs, inputs):
            env[v] = points.get(v.name, x)
            if v.name in shadow_in:
                shadows[v] = shadow_in[v.name]
        for c in program.constants:
            env[c] = consts[c.name]
        embs, idx_shadows = {}, {}
        for i, eqn in enumerate(program.eqns):
            outs = call_lowering(eqn, substitute(eqn.args, env), substitute(eqn.kwargs, env))
            if i in emb_set:
                embs[i] = outs[0]
                idx_shadows[i] = shadows.get(eqn.args[1])
                key = f"emb:{i}"
                if key in points:
                    outs = (points[key].astype(outs[0].dtype),) + tuple(outs[1:])
            elif shadows and any(v in shadows for v in eqn.inputs) \
                    and any(o in an.tokens for o in eqn.outputs):
                # an exact index map of token ids: the same map on the float shadow
                sargs = substitute(eqn.args, {**env, **shadows})
                skw = substitute(eqn.kwargs, {**env, **shadows})
                souts = TABLE[eqn.op](*sargs, **skw)
                souts = souts if isinstance(souts, tuple) else (souts,)
                for o, s in zip(eqn.outputs, souts):
                    if o in an.tokens:
                        shadows[o] = jnp.asarray(s, rd)
            for var, value in zip(eqn.outputs, outs):
                env[var] = value
        return [env[v] for v in program.outputs], embs, idx_shadows

    outs0, embs0, _ = run({}, {})
    pred = outs0[explained]
    seeds, target = seed_fn(pred, by_name)
    seed = jax.lax.stop_gradient(jnp.asarray(seeds[0], rd))

    x0 = {name: by_name[name] for name in float_names}
    x0.update({f"emb:{i}": embs0[i] for i in emb_eqns})

    def score(points):
        return jnp.sum(run(points, {})[0][explained].astype(rd) * seed)

    grad = jax.grad(score)
    m = params.method
    if m in ("gradient", "gradient-x-input"):
        g = grad(x0)
        attr = g if m == "gradient" else {k: g[k] * x0[k] for k in x0}
        ref = {k: jnp.zeros_like(x) for k, x in x0.items()}
    elif m == "integrated-gradients":
        alphas, weights = ig_points(params.steps, params.ig_method)
        ref = {k: (_baseline_of(params, k, x) if not k.startswith("emb:")
                   else jnp.full(x.shape, params.baseline if not isinstance(
                       params.baseline, ArrayOption) else 0.0, x.dtype))
               for k, x in x0.items()}
        a = jnp.asarray(alphas, rd)
        w = jnp.asarray(weights, rd)

        def at(alpha):
            return grad({k: (ref[k] + alpha.astype(x.dtype) * (x - ref[k])) for k, x in x0.items()})

        gs = jax.vmap(at)(a)
        attr = {k: (x0[k] - ref[k]) * jnp.tensordot(w, gs[k].astype(rd), axes=1).astype(x0[k].dtype)
                for k in x0}
    elif m == "smoothgrad":
        key = jax.random.PRNGKey(params.seed)
        keys = {k: jax.random.fold_in(key, j) for j, k in enumerate(sorted(x0))}
        eps = {k: jax.random.normal(keys[k], (params.samples,) + tuple(x.shape), rd)
               for k, x in x0.items()}
        sigma = {k: jnp.asarray(params.noise, rd) * (jnp.max(x) - jnp.min(x)).astype(rd)
                 for k, x in x0.items()}

        def sample(e):
            pts = {k: (x + (sigma[k] * e[k]).astype(x.dtype)) for k, x in x0.items()}
            g = grad(pts)
            return {k: g[k] * pts[k] for k in pts} if params.multiply_by_inputs else g

        gs = jax.vmap(sample)(eps)
        attr = {k: jnp.mean(v, axis=0) for k, v in gs.items()}
        ref = {k: jnp.zeros_like(x) for k, x in x0.items()}
    else:  # pragma: no cover (validated by the Config)
        raise MethodError(f"unknown gradient method {m!r}")

    relevance = {}
    for name in float_names:
        relevance[name] = (attr[name].astype(rd),)
    if token_vars:
        per_pos = {i: jnp.sum(attr[f"emb:{i}"].astype(rd), axis=-1) for i in emb_eqns}
        shadow0 = {v.name: jnp.zeros(v.shape, rd) for v in token_vars}
        _, pull = jax.vjp(lambda s: run(x0, s)[2], shadow0)
        tok, = pull({i: per_pos[i] for i in emb_eqns})
        for v in token_vars:
            relevance[v.name] = (tok[v.name],)
    for v in program.inputs:
        if v.name not in relevance:
            relevance[v.name] = (jnp.zeros(v.shape, rd),)
    total = sum(jnp.sum(r[0]) for r in relevance.values())
    delta = score(x0) - score(ref)
    return RowResult(outputs=tuple(outs0), prediction=pred, target=target, relevance=relevance,
                     absorbed=jnp.zeros((1,), rd), seed=jnp.stack([delta.astype(rd)]),
                     input_total=jnp.stack([jnp.asarray(total, rd)]), layers=None, probes=None,
                     constants=jnp.zeros((1, n_constants), rd))
