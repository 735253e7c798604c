"""Faithfulness metrics of explanations, computed on the Explainer's imported JAX forward.

Every metric that perturbs inputs runs the imported forward (``plan.program`` evaluated with
``plan.consts``, :func:`dlbjax.engine.interpret.evaluate`) jit-compiled and vmapped over a
fixed-size block of evaluations (``batch_size``, default 1024; less work pads to the next power
of two): all rows x all perturbation steps (or random subsets) go through that one compiled
function in chunks, the last chunk padded, so a metric compiles once per (Explainer, perturbed
input, score, chunk size) and never per step. Metrics that re-explain (max-sensitivity,
randomisation) call the Explainer's own compiled pass (``Explainer.batch``, or the Runner's
jitted function with other constants).

Common arguments:

- ``explainer``: a :class:`dlbjax.Explainer` (``batch_axis=0``).
- ``inputs``: as the Explainer takes them (tensor, tuple, dict incl. ``input_ids`` and
  ``attention_mask``).
- ``relevance``: an :class:`~dlbjax.Explanation`, a dict input name -> array, or one array of
  the perturbed input's relevance (rows first). Contrastive Streams use positive - negative.
- ``target``: the explained class per row (int or one int per row). None: the explanation's
  ``target`` when ``relevance`` is an Explanation, else the argmax of the unperturbed output.
- ``score``: ``"logit"`` (default; entry ``target`` of the flattened explained output) or
  ``"probability"`` (of its softmax; the sigmoid of a single-logit output). Target -1 (what a
  regression Explanation holds) scores the mean of the outputs.
- ``input``: the name of the perturbed input. None: the only input; else ``input_ids`` when
  present; else the only float input.

Features. An image input (a row of shape [C, H, W]) is perturbed per *pixel*: one feature is a
pixel across all channels and its relevance is the sum over the channels (with ``patch=p``, one
feature is a p x p patch, relevance summed over the patch). Token ids [T] are perturbed per token
(relevance per token, as the Explanation gives it); tokens whose ``attention_mask`` is 0 are
never flipped nor drawn. Any other input is perturbed per element. Sorting is stable (ties go to
the lower feature index first).

Baselines (what a perturbed feature is replaced by): ``"zero"``, ``"mean"`` (the row's mean over
all elements of the unperturbed input), ``"blur"`` (the row's image blurred with a Gaussian of
``blur_sigma`` pixels over H and W, ``scipy.ndimage.gaussian_filter``, mode "reflect"), a number,
an array broadcastable to the input's row shape (or [rows, *row shape]), and, for token ids, an
int token id (``tokenizer.mask_token_id``, ``unk_token_id``, ``pad_token_id``; ``"zero"`` is id 0).

Randomness: every random metric takes ``seed`` and is reproducible bit for bit (numpy
``default_rng(seed)`` draws on the host, independent of the chunk size).
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._assemble import explain_rows
from ._errors import InputMismatchError, MethodError, TargetError
from ._result import Explanation
from ._types import Streams
from .engine.interpret import evaluate
from .passes.magnitudes import precompute_magnitudes

__all__ = ["flipping_curve", "region_perturbation", "aopc", "abpc", "faithfulness_correlation",
           "random_subsets", "max_sensitivity", "randomisation", "randomization",
           "parameter_layers", "sparseness", "complexity", "similarity"]

SCORES = ("logit", "probability")
ORDERS = ("morf", "lerf")
SIMILARITIES = ("spearman", "pearson", "cosine", "ssim")


# ------------------------------------------------------------------------------------------------
# inputs, features, baselines
# ------------------------------------------------------------------------------------------------
class _Features(NamedTuple):
    """How a feature mask [F] of one row becomes an element mask of the perturbed input's row."""

    index: int            # which program input
    row_shape: tuple      # element shape of one row (without the row's leading axis of 1)
    kind: str             # "element" | "pixel" | "token"
    patch: int            # pixel kind: patch side (1 = pixels)

    @property
    def grid(self) -> tuple:
        if self.kind == "pixel":
            _, h, w = self.row_shape
            return (h // self.patch, w // self.patch)
        return tuple(self.row_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.grid, dtype=np.int64))

    def to_elements(self, mask):
        """Feature mask [F] (jnp or np) -> element mask of ``row_shape``."""
        xp = jnp if isinstance(mask, jax.Array) else np
        m = mask.reshape(self.grid)
        if self.kind == "pixel":
            if self.patch > 1:
                m = xp.repeat(xp.repeat(m, self.patch, axis=0), self.patch, axis=1)
            m = xp.broadcast_to(m[None], self.row_shape)
        return m

    def aggregate(self, rel: np.ndarray) -> np.ndarray:
        """Relevance [rows, *row_shape] (or a pixel map [rows, H, W] / [rows, 1, H, W] for an
        image) -> per-feature relevance [rows, F] in float64."""
        rel = np.asarray(rel, np.float64)
        n = rel.shape[0]
        if self.kind == "pixel":
            c, h, w = self.row_shape
            if rel.shape[1:] == (c, h, w):
                rel = rel.sum(1)
            elif rel.shape[1:] == (1, h, w):
                rel = rel[:, 0]
            elif rel.shape[1:] != (h, w):
                raise InputMismatchError(f"relevance of shape {rel.shape} does not match the "
                                         f"image rows {self.row_shape}")
            p = self.patch
            rel = rel.reshape(n, h // p, p, w // p, p).sum((2, 4))
            return rel.reshape(n, -1)
        if rel.shape[1:] != tuple(self.row_shape):
            raise InputMismatchError(f"relevance of shape {rel.shape} does not match the input's "
                                     f"rows {tuple(self.row_shape)}")
        return rel.reshape(n, -1)


class _Prepared(NamedTuple):
    arrays: tuple          # plan.rows: one array [rows, 1, ...] per program input
    n: int
    feats: _Features
    name: str
    valid: np.ndarray      # [rows, F] bool: features that may be perturbed


def _check_explainer(explainer) -> None:
    if not hasattr(explainer, "plan") or not hasattr(explainer.plan, "program"):
        raise TypeError(f"expected a dlbjax.Explainer, got {type(explainer).__name__}")
    if explainer.plan.config.batch_axis != 0:
        raise MethodError("the metrics need an Explainer with batch_axis=0 (rows along axis 0)")


def _pick_input(plan, input: Optional[str]) -> int:
    names = list(plan.input_names)
    if input is not None:
        if input not in names:
            raise InputMismatchError(f"the model has no input {input!r}; inputs are {names}")
        return names.index(input)
    if len(names) == 1:
        return 0
    if "input_ids" in names:
        return names.index("input_ids")
    floats = [i for i, v in enumerate(plan.program.inputs) if v.is_float]
    if len(floats) == 1:
        return floats[0]
    raise InputMismatchError(f"the model takes several inputs {names}; say which one to perturb "
                             "with input=")


def _prepare(explainer, inputs, input: Optional[str], patch: Optional[int]) -> _Prepared:
    _check_explainer(explainer)
    plan = explainer.plan
    arrays, n = plan.rows(inputs)
    idx = _pick_input(plan, input)
    var = plan.program.inputs[idx]
    row_shape = tuple(var.shape[1:])
    if not var.is_float:
        kind = "token"
    elif len(row_shape) == 3:
        kind = "pixel"
    else:
        kind = "element"
    if patch is not None:
        if kind != "pixel":
            raise ValueError(f"patch= needs an image input (rows [C, H, W]); input "
                             f"{var.name!r} has rows {row_shape}")
        if not isinstance(patch, (int, np.integer)) or patch < 1:
            raise ValueError(f"patch must be a positive int, got {patch!r}")
        if row_shape[1] % patch or row_shape[2] % patch:
            raise ValueError(f"patch {patch} does not divide the image size {row_shape[1:]}")
    feats = _Features(idx, row_shape, kind, int(patch or 1))
    valid = np.ones((n, feats.size), bool)
    names = list(plan.input_names)
    if kind == "token" and "attention_mask" in names:
        mask = np.asarray(arrays[names.index("attention_mask")]).reshape(n, -1)
        if mask.shape[1] == feats.size:
            valid = mask != 0
    return _Prepared(arrays, n, feats, names[idx], valid)


def _relevance(relevance, name: str) -> np.ndarray:
    if isinstance(relevance, Explanation):
        relevance = relevance.relevance
    if isinstance(relevance, dict):
        if name not in relevance:
            raise InputMismatchError(f"the relevance has no entry for input {name!r} "
                                     f"(it has {list(relevance)})")
        relevance = relevance[name]
    if isinstance(relevance, Streams):
        return np.asarray(relevance.positive, np.float64) - np.asarray(relevance.negative,
                                                                        np.float64)
    if hasattr(relevance, "detach"):
        relevance = relevance.detach().cpu().numpy()
    return np.asarray(relevance)


def _baseline(prep: _Prepared, baseline, blur_sigma: float) -> np.ndarray:
    """The replacement values [rows, *row_shape] in the input's dtype."""
    x = np.asarray(prep.arrays[prep.feats.index]).reshape((prep.n,) + prep.feats.row_shape)
    shape = x.shape
    if prep.feats.kind == "token":
        if isinstance(baseline, str) and baseline == "zero":
            baseline = 0
        if isinstance(baseline, (bool, np.bool_)) or not isinstance(baseline, (int, np.integer)):
            raise ValueError(f"token ids are replaced by a token id (an int such as "
                             f"tokenizer.mask_token_id, or 'zero'), got {baseline!r}")
        return np.full(shape, baseline, x.dtype)
    if isinstance(baseline, str):
        if baseline == "zero":
            return np.zeros(shape, x.dtype)
        if baseline == "mean":
            m = x.reshape(prep.n, -1).astype(np.float64).mean(1)
            return np.broadcast_to(m.reshape((-1,) + (1,) * (x.ndim - 1)), shape).astype(x.dtype)
        if baseline == "blur":
            if prep.feats.kind != "pixel":
                raise ValueError("baseline 'blur' needs an image input (rows [C, H, W])")
            if not blur_sigma > 0:
                raise ValueError(f"blur_sigma must be positive, got {blur_sigma!r}")
            import scipy.ndimage  # (imported on use: scipy.stats/ndimage cost ~1 s at import)
            sigma = (0, 0, blur_sigma, blur_sigma)
            return scipy.ndimage.gaussian_filter(x.astype(np.float64), sigma).astype(x.dtype)
        raise ValueError(f"unknown baseline {baseline!r}: use 'zero', 'mean', 'blur', a number or "
                         "an array")
    if isinstance(baseline, (int, float, np.integer, np.floating)) and \
            not isinstance(baseline, (bool, np.bool_)):
        return np.full(shape, baseline, x.dtype)
    if hasattr(baseline, "detach"):
        baseline = baseline.detach().cpu().numpy()
    if isinstance(baseline, np.ndarray) or isinstance(baseline, jax.Array):
        b = np.asarray(baseline)
        try:
            return np.broadcast_to(b, shape).astype(x.dtype)
        except ValueError:
            raise ValueError(f"baseline of shape {b.shape} does not broadcast to the input's "
                             f"rows {shape}") from None
    raise ValueError(f"unsupported baseline {baseline!r}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# the compiled forward over blocks of perturbed rows
# ------------------------------------------------------------------------------------------------
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _flip_mask(aux, row, count):
    """Flipping: the features of rank below ``count`` (aux = (ranks [rows, F],))."""
    return aux[0][row] < count


def _subset_mask(aux, row, which):
    """Subsets: evaluation ``which`` = 0 is the unperturbed row, ``which`` = s + 1 replaces
    subset s (aux = (subsets [rows, samples, k], valid [rows, F]))."""
    subsets, valid = aux
    idx = subsets[row, jnp.maximum(which - 1, 0)]
    m = jnp.zeros(valid.shape[1], bool).at[idx].set(True)
    return m & valid[row] & (which > 0)


_MASKS = {"flip": _flip_mask, "subset": _subset_mask}


def _scores_fn(plan, feats: _Features, score: str, kind: str) -> Callable:
    """jit(f(consts, xs, base, targets, aux, rows, params) -> scores [B]). Whole-batch arrays
    (placed once per metric call): ``xs`` one array [n, 1, ...] per program input, ``base``
    [n, *row_shape], ``targets`` [n] int32, ``aux`` the mask data of ``kind``; per chunk:
    ``rows`` [B] and ``params`` [B] (a flip count or a subset number) of each evaluation. The
    masks are built on the device, so a chunk sends 2 B ints."""
    cache = _COMPILED.setdefault(plan, {})
    key = (feats, score, kind)
    if key in cache:
        return cache[key]
    program, explained = plan.program, plan.explained
    mask_fn = _MASKS[kind]

    def one(consts, xs, base, targets, aux, row, param):
        m = feats.to_elements(mask_fn(aux, row, param))
        xs_row = [a[row] for a in xs]
        x = xs_row[feats.index].reshape(feats.row_shape)
        xp = jnp.where(m, base[row], x).astype(x.dtype)
        xs_row[feats.index] = xp.reshape(xs[feats.index].shape[1:])
        out = evaluate(program, consts, xs_row)[explained].reshape(-1)
        out = out.astype(jnp.float32) if out.dtype in (jnp.bfloat16, jnp.float16) else out
        if score == "probability":
            out = jax.nn.sigmoid(out) if out.shape[0] == 1 else jax.nn.softmax(out)
        target = targets[row]
        # target -1: the mean of the outputs (a regression explanation's score)
        return jnp.where(target >= 0, out[jnp.maximum(target, 0)], out.mean())

    def block(consts, xs, base, targets, aux, rows, params):
        return jax.vmap(lambda r, p: one(consts, xs, base, targets, aux, r, p))(rows, params)

    fn = cache[key] = jax.jit(block)
    return fn


def _run(explainer, prep: _Prepared, base: np.ndarray, targets: np.ndarray, kind: str,
         aux: tuple, rows: np.ndarray, params: np.ndarray, score: str,
         batch_size: int) -> np.ndarray:
    """Scores of evaluation j = (row ``rows[j]``, mask ``kind(aux, rows[j], params[j])``), in
    chunks of ``batch_size`` evaluations (the last padded): one compiled call per chunk."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    plan = explainer.plan
    fn = _scores_fn(plan, prep.feats, score, kind)
    total = len(rows)
    # chunks of min(batch_size, the next power of two >= total) evaluations: a handful of
    # compilations serve every step count
    size = int(min(batch_size, 1 << max(0, int(total - 1).bit_length())))
    out = np.empty(total, np.float64)
    placed = (tuple(jnp.asarray(a) for a in prep.arrays), jnp.asarray(base),
              jnp.asarray(targets, jnp.int32), tuple(jnp.asarray(a) for a in aux))
    rows, params = rows.astype(np.int32), params.astype(np.int32)
    for s in range(0, total, size):
        js = np.minimum(np.arange(s, s + size), total - 1)
        res = fn(plan.consts, *placed, jnp.asarray(rows[js]), jnp.asarray(params[js]))
        keep = min(size, total - s)
        out[s:s + keep] = np.asarray(res, np.float64)[:keep]
    return out


def _targets(explainer, prep: _Prepared, relevance, target) -> np.ndarray:
    plan = explainer.plan
    out_var = plan.program.outputs[plan.explained]
    size = int(np.prod(out_var.shape[1:] if out_var.shape[:1] == (1,) else out_var.shape))
    if target is None and isinstance(relevance, Explanation):
        target = relevance.target
    if target is None:  # argmax of the unperturbed output: one forward of the flat output
        fn = _argmax_fn(plan)
        xs = tuple(jnp.asarray(a) for a in prep.arrays)
        return np.asarray(fn(plan.consts, xs)).astype(np.int32)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TargetError(f"target must be an int or one int per row, got {t.dtype}")
    if t.ndim == 0:
        t = np.full((prep.n,), int(t))
    if t.shape != (prep.n,):
        raise TargetError(f"target must be an int or one int per row ({prep.n} rows), got shape "
                          f"{t.shape}")
    if ((t < -1) | (t >= size)).any():
        raise TargetError(f"target outside the explained output: valid indices are 0..{size - 1} "
                          "(or -1, the mean of the outputs)")
    return t.astype(np.int32)


def _argmax_fn(plan) -> Callable:
    cache = _COMPILED.setdefault(plan, {})
    if "argmax" not in cache:
        program, explained = plan.program, plan.explained

        def one(consts, xs):
            return jnp.argmax(evaluate(program, consts, list(xs))[explained].reshape(-1))

        cache["argmax"] = jax.jit(jax.vmap(one, in_axes=(None, 0)))
    return cache["argmax"]


# ------------------------------------------------------------------------------------------------
# flipping curves, AOPC, ABPC, region perturbation
# ------------------------------------------------------------------------------------------------
def _ranks(rel_feat: np.ndarray, valid: np.ndarray, order: str) -> np.ndarray:
    """rank[r, f]: the step (0-based) at which feature f of row r is flipped; invalid features
    get the rank F (never flipped). MoRF: descending relevance, LeRF: ascending; stable."""
    key = -rel_feat if order == "morf" else rel_feat.copy()
    key = np.where(valid, key, np.inf)
    perm = np.argsort(key, axis=1, kind="stable")
    ranks = np.empty_like(perm)
    np.put_along_axis(ranks, perm, np.arange(perm.shape[1])[None].repeat(len(perm), 0), axis=1)
    return np.where(valid, ranks, perm.shape[1])


def _counts(valid: np.ndarray, steps: Optional[int]) -> tuple[np.ndarray, int]:
    """counts[r, k] = floor(k * n_r / steps), k = 0..steps: how many of row r's n_r valid
    features are flipped after step k. steps None: the largest n_r (one feature per step)."""
    n_valid = valid.sum(1)
    if steps is None:
        steps = int(n_valid.max())
    if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    k = np.arange(steps + 1)
    return (k[None] * n_valid[:, None]) // steps, int(steps)


def flipping_curve(explainer, inputs, relevance, *, order: str = "morf",
                   steps: Optional[int] = None, baseline: Any = "mean",
                   input: Optional[str] = None, patch: Optional[int] = None, target: Any = None,
                   score: str = "logit", blur_sigma: float = 2.0,
                   batch_size: int = 1024) -> np.ndarray:
    """Feature / pixel / token flipping (Bach et al. 2015; Samek et al. 2017, "Evaluating the
    visualization of what a deep neural network has learned"): replace the features in order of
    relevance by the baseline, cumulatively, and record the target score after each step.

    ``order="morf"`` (most relevant first) or ``"lerf"`` (least relevant first). Step k (k = 0..
    ``steps``) has the floor(k * n / steps) first features of the order replaced, n the row's
    number of perturbable features (all pixels / elements, or the tokens with attention mask 1);
    ``steps=None``: one feature per step. ``patch=p``: region perturbation (p x p patches of an
    image, relevance summed per patch). Returns float64 scores [rows, steps + 1]; column 0 is the
    unperturbed input. A faithful explanation makes the MoRF curve fall fast (and the LeRF curve
    stay high): summarise with :func:`aopc` and :func:`abpc`.

    Quantus ``PixelFlipping`` (0.6.0) is the same curve without column 0 when its features are
    this function's features (one-channel images or flat inputs), ``features_in_step`` divides
    n (``steps = n / features_in_step``) and the baseline is a constant: its ``"mean"``/
    ``"uniform"`` baselines are recomputed on the already perturbed input at every step, this
    one is the unperturbed row's mean.
    """
    _check_choice("order", order, ORDERS)
    _check_choice("score", score, SCORES)
    prep = _prepare(explainer, inputs, input, patch)
    rel = prep.feats.aggregate(_relevance(relevance, prep.name))
    if rel.shape[0] != prep.n:
        raise InputMismatchError(f"relevance has {rel.shape[0]} rows, the inputs {prep.n}")
    base = _baseline(prep, baseline, blur_sigma)
    targets = _targets(explainer, prep, relevance, target)
    ranks = _ranks(rel, prep.valid, order)
    counts, steps = _counts(prep.valid, steps)
    rows = np.repeat(np.arange(prep.n), steps + 1)
    scores = _run(explainer, prep, base, targets, "flip", (ranks.astype(np.int32),), rows,
                  counts.reshape(-1), score, batch_size)
    return scores.reshape(prep.n, steps + 1)


def region_perturbation(explainer, inputs, relevance, *, patch: int = 4, order: str = "morf",
                        steps: Optional[int] = None, baseline: Any = "mean",
                        input: Optional[str] = None, target: Any = None, score: str = "logit",
                        blur_sigma: float = 2.0, batch_size: int = 1024) -> np.ndarray:
    """Region perturbation (Samek et al. 2017): :func:`flipping_curve` over non-overlapping
    ``patch`` x ``patch`` regions of an image, ordered by the relevance summed per region (the
    paper replaces regions by uniform noise; here by the chosen baseline). Summarise with
    :func:`aopc` (MoRF: higher is better)."""
    return flipping_curve(explainer, inputs, relevance, order=order, steps=steps,
                          baseline=baseline, input=input, patch=patch, target=target, score=score,
                          blur_sigma=blur_sigma, batch_size=batch_size)


def _curve(curve) -> np.ndarray:
    c = np.asarray(curve, np.float64)
    if c.ndim == 1:
        c = c[None]
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"a curve is [rows, steps + 1] scores, got shape {np.shape(curve)}")
    return c


def aopc(curve) -> np.ndarray:
    """Area over the perturbation curve (Samek et al. 2017), per row:
    ``AOPC = 1/(L+1) * sum_{k=0..L} (f(x_0) - f(x_k))`` for a curve ``[rows, L + 1]`` from
    :func:`flipping_curve` (column 0 unperturbed). MoRF: higher is better (the score drops fast);
    LeRF: lower is better."""
    c = _curve(curve)
    return (c[:, :1] - c).mean(1)


def abpc(morf_curve, lerf_curve) -> np.ndarray:
    """Area between the LeRF and MoRF perturbation curves, per row:
    ``ABPC = 1/(L+1) * sum_{k=0..L} (f(x_k^LeRF) - f(x_k^MoRF))`` (= AOPC_MoRF - AOPC_LeRF; the
    curves share column 0). Higher is better."""
    m, l_ = _curve(morf_curve), _curve(lerf_curve)
    if m.shape != l_.shape:
        raise ValueError(f"the MoRF and LeRF curves differ in shape: {m.shape} and {l_.shape}")
    return (l_ - m).mean(1)


# ------------------------------------------------------------------------------------------------
# faithfulness correlation
# ------------------------------------------------------------------------------------------------
def random_subsets(valid: np.ndarray, samples: int, subset_size: int, seed: int) -> np.ndarray:
    """Seeded random feature subsets [rows, samples, subset_size] (sorted indices), each drawn
    uniformly without replacement among the row's valid features (``valid`` [rows, F] bool):
    ``default_rng(seed)``, row by row, the ``subset_size`` smallest of uniform keys."""
    valid = np.asarray(valid, bool)
    rng = np.random.default_rng(seed)
    out = np.empty((valid.shape[0], samples, subset_size), np.int64)
    for r in range(valid.shape[0]):
        keys = rng.random((samples, valid.shape[1]))
        keys[:, ~valid[r]] = 2.0
        idx = np.argpartition(keys, subset_size - 1, axis=1)[:, :subset_size]
        out[r] = np.sort(idx, axis=1)
    return out


def faithfulness_correlation(explainer, inputs, relevance, *, subset_size: Optional[int] = None,
                             samples: int = 100, baseline: Any = "mean", seed: int = 0,
                             subsets: Optional[np.ndarray] = None, input: Optional[str] = None,
                             target: Any = None, score: str = "logit", blur_sigma: float = 2.0,
                             batch_size: int = 1024) -> np.ndarray:
    """Faithfulness correlation (Bhatt et al. 2020, "Evaluating and aggregating feature-based
    model explanations"), per row: the Pearson correlation over ``samples`` random subsets
    S of ``subset_size`` features between ``sum_{i in S} R_i`` and the score drop
    ``f(x) - f(x with S replaced by the baseline)``. Higher is better (in [-1, 1]; NaN when
    either side is constant).

    ``subset_size`` None: a tenth of the fewest perturbable features of a row (at least 1).
    Subsets: :func:`random_subsets` (seeded, padded tokens never drawn), or ``subsets``
    [rows, samples, subset_size] feature indices given explicitly. Features as in
    :func:`flipping_curve`. Quantus ``FaithfulnessCorrelation`` (0.6.0) computes the same number
    on the same subsets for a constant baseline (its normalisation of the relevance by its
    maximum does not change a Pearson correlation; it draws subsets with ``np.random``).
    """
    _check_choice("score", score, SCORES)
    prep = _prepare(explainer, inputs, input, None)
    rel = prep.feats.aggregate(_relevance(relevance, prep.name))
    if rel.shape[0] != prep.n:
        raise InputMismatchError(f"relevance has {rel.shape[0]} rows, the inputs {prep.n}")
    F = prep.feats.size
    if subsets is None:
        if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, (int, np.integer)) \
                or samples < 2:
            raise ValueError(f"samples must be an int >= 2, got {samples!r}")
        smallest = int(prep.valid.sum(1).min())
        if subset_size is None:
            subset_size = max(1, smallest // 10)
        if not isinstance(subset_size, (int, np.integer)) or not 1 <= subset_size <= smallest:
            raise ValueError(f"subset_size must be an int in 1..{smallest} (the fewest perturbable "
                             f"features of a row), got {subset_size!r}")
        subsets = random_subsets(prep.valid, int(samples), int(subset_size), seed)
    else:
        subsets = np.asarray(subsets)
        if subsets.ndim != 3 or subsets.shape[0] != prep.n or subsets.dtype.kind not in "iu" or \
                subsets.size and (subsets.min() < 0 or subsets.max() >= F):
            raise ValueError(f"subsets must be feature indices in 0..{F - 1} of shape [rows="
                             f"{prep.n}, samples, subset_size], got {subsets.shape} "
                             f"{subsets.dtype}")
    samples = subsets.shape[1]
    base = _baseline(prep, baseline, blur_sigma)
    targets = _targets(explainer, prep, relevance, target)
    # evaluation (r, 0) is the unperturbed row, (r, 1 + s) the row with subset s replaced
    rows = np.repeat(np.arange(prep.n), samples + 1)
    which = np.tile(np.arange(samples + 1), prep.n)
    s = _run(explainer, prep, base, targets, "subset", (subsets.astype(np.int32), prep.valid),
             rows, which, score, batch_size).reshape(prep.n, samples + 1)
    drops = s[:, :1] - s[:, 1:]
    sums = np.stack([rel[r][subsets[r]].sum(-1) for r in range(prep.n)])
    return _pearson(sums, drops)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / den


# ------------------------------------------------------------------------------------------------
# max-sensitivity
# ------------------------------------------------------------------------------------------------
def _same_target(explainer, e0: Explanation, target, repeat: int = 1):
    """The target that re-explains rows at ``e0``'s targets: its per-row classes repeated, or,
    for a regression Explainer (whose target selects outputs for every row), ``target`` itself."""
    task = explainer.plan.task
    if task is not None and task.name == "regression":
        return target
    return np.repeat(np.asarray(e0.target), repeat)


def _norm(x: np.ndarray, norm: str) -> np.ndarray:
    x = x.reshape(x.shape[0], -1)
    if norm in ("fro", "l2"):
        return np.sqrt((x * x).sum(1))
    if norm == "l1":
        return np.abs(x).sum(1)
    return np.abs(x).max(1)


def max_sensitivity(explainer, inputs, *, radius: float = 0.2, samples: int = 10, seed: int = 0,
                    norm: str = "fro", input: Optional[str] = None, target: Any = None,
                    perturbations: Optional[np.ndarray] = None,
                    batch_size: int = 256) -> np.ndarray:
    """Max-sensitivity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations",
    SENS_MAX), per row: ``max_j ||R(x + d_j) - R(x)|| / ||R(x)||`` over ``samples`` perturbations
    d_j drawn uniformly from [-radius, radius] per element (``default_rng(seed)``), R the
    Explainer's relevance (any method) of the perturbed input at the original target.
    ``norm``: ``"fro"``/``"l2"`` (of the flattened map), ``"l1"`` or ``"linf"``. Lower is better.
    ``perturbations``: the d_j given explicitly, [rows, samples, *row shape] (then ``radius``,
    ``samples`` and ``seed`` are not used).

    The explanations of x and of all rows x samples perturbed inputs are two calls of the
    Explainer (``Explainer.batch`` in chunks of ``batch_size`` rows, one compilation). The same
    number as Quantus ``MaxSensitivity`` (0.6.0) with its defaults (uniform noise of
    ``lower_bound = radius``, Frobenius norms, ``normalise=False``,
    ``return_nan_when_prediction_changes=False``) on the same noise. Float inputs only.
    """
    _check_choice("norm", norm, ("fro", "l2", "l1", "linf"))
    if not (isinstance(radius, (int, float, np.floating)) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}")
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, (int, np.integer)) \
            or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    prep = _prepare(explainer, inputs, input, None)
    if prep.feats.kind == "token":
        raise MethodError(f"max-sensitivity perturbs inputs continuously; input {prep.name!r} is "
                          "token ids (pick a float input with input=)")
    plan = explainer.plan
    names = list(plan.input_names)
    data = {nm: np.asarray(a).reshape((prep.n,) + np.asarray(a).shape[2:])
            for nm, a in zip(names, prep.arrays)}
    e0 = explainer(data, target=target)
    r0 = _relevance(e0, prep.name).astype(np.float64)
    x = data[prep.name]
    if perturbations is None:
        noise = np.random.default_rng(seed).uniform(-radius, radius,
                                                    (prep.n, samples) + x.shape[1:])
    else:
        noise = np.asarray(perturbations, np.float64)
        if noise.ndim != x.ndim + 1 or noise.shape[0] != prep.n or noise.shape[2:] != x.shape[1:]:
            raise ValueError(f"perturbations must have shape [rows={prep.n}, samples, "
                             f"*{x.shape[1:]}], got {noise.shape}")
        samples = noise.shape[1]
    big = {nm: np.repeat(a, samples, axis=0) for nm, a in data.items()}
    big[prep.name] = (x[:, None].astype(np.float64) + noise).reshape(
        (prep.n * samples,) + x.shape[1:]).astype(x.dtype)
    total = prep.n * samples
    e = explainer.batch(big, target=_same_target(explainer, e0, target, samples),
                        batch_size=min(batch_size, total))
    r = _relevance(e, prep.name).astype(np.float64).reshape((prep.n, samples) + r0.shape[1:])
    diff = _norm((r - r0[:, None]).reshape(total, -1), norm).reshape(prep.n, samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        return diff.max(1) / _norm(r0, norm)


# ------------------------------------------------------------------------------------------------
# model-parameter randomisation
# ------------------------------------------------------------------------------------------------
def parameter_layers(explainer) -> list[tuple[str, list[str]]]:
    """The model's learned layers as (module path, [float parameter names]), in forward order:
    parameters (``program.const_kinds == "parameter"``; buffers such as batch-norm statistics
    are kept) grouped by the module their name belongs to."""
    program = explainer.plan.program
    kinds = program.const_kinds
    first_use: dict[str, int] = {}
    for i, e in enumerate(program.eqns):
        for v in e.inputs:
            first_use.setdefault(v.name, i)
    groups: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    for var in program.constants:
        if kinds.get(var.name) != "parameter" or not var.is_float or var.name not in first_use:
            continue
        module = var.name.rsplit(".", 1)[0] if "." in var.name else ""
        groups.setdefault(module, []).append(var.name)
        order[module] = min(order.get(module, first_use[var.name]), first_use[var.name])
    return [(m, groups[m]) for m in sorted(groups, key=lambda m: order[m])]


def _gaussian_draw(name: str, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = np.asarray(value, np.float64)
    scale = v.std() or np.sqrt((v * v).mean()) or 1.0
    return rng.normal(0.0, scale, v.shape)


class _Swapped:
    """An Explainer-like view of ``explainer`` with other constants: the same jitted pass (the
    constants are its argument, so nothing recompiles), a copy of the plan with the new
    constants and their |W|; the Explainer itself is not touched."""

    def __init__(self, explainer, consts: dict):
        plan = explainer.plan
        mags = precompute_magnitudes(plan.program, plan.analysis, plan.options, consts) \
            if plan.mags else {}
        self.plan = dataclasses.replace(plan, consts=consts, mags=mags)
        runner = copy.copy(explainer.runner)
        runner.plan, runner._call_state, runner._placement = self.plan, None, None
        self.runner = runner

    def __call__(self, inputs, target=None) -> Explanation:
        return explain_rows(self.plan, self.runner, inputs, target)


def _similarity(a, b, kind: str = "spearman") -> np.ndarray:
    """Per-row similarity of two relevance maps [rows, ...]: ``"spearman"`` (Pearson of average
    ranks), ``"pearson"``, ``"cosine"`` on the flattened maps, or ``"ssim"`` (structural
    similarity of 2-D maps, ``skimage.metrics.structural_similarity`` with ``data_range`` the
    pair's value range, as Quantus). 1 for identical maps."""
    _check_choice("similarity", kind, SIMILARITIES)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes {a.shape} and {b.shape}")
    n = a.shape[0]
    if kind == "ssim":
        try:
            from skimage.metrics import structural_similarity
        except ImportError as exc:  # pragma: no cover
            raise MethodError("similarity 'ssim' needs scikit-image") from exc
        maps_a = a.reshape((n,) + a.shape[-2:]) if a.ndim >= 3 and np.prod(a.shape[1:-2]) == 1 \
            else a
        maps_b = b.reshape(maps_a.shape)
        if maps_a.ndim != 3:
            raise ValueError(f"ssim compares 2-D maps [rows, H, W], got {a.shape}")
        out = []
        for x, y in zip(maps_a, maps_b):
            rng_ = max(x.max(), y.max()) - min(x.min(), y.min())
            win = min(7, *x.shape)  # skimage's default 7, or the largest odd side that fits
            out.append(structural_similarity(x, y, data_range=rng_ or 1.0,
                                             win_size=win if win % 2 else win - 1))
        return np.asarray(out)
    a, b = a.reshape(n, -1), b.reshape(n, -1)
    if kind == "spearman":
        import scipy.stats  # (imported on use)
        a, b = scipy.stats.rankdata(a, axis=1), scipy.stats.rankdata(b, axis=1)
    if kind == "cosine":
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return _pearson(a, b)


def randomisation(explainer, inputs, *, cascading: bool = True, similarity: str = "spearman",
                  seed: int = 0, order: str = "top-down", absolute: bool = False,
                  input: Optional[str] = None, target: Any = None,
                  layers: Optional[Sequence[str]] = None,
                  draw: Optional[Callable] = None) -> dict:
    """Model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency
    maps"): re-explain the inputs with the model's learned layers randomised, one layer at a time
    from the output layer down (``order="top-down"``; ``"bottom-up"`` from the input), cumulatively
    (``cascading=True``) or each layer alone (``cascading=False``), and compare each map with the
    original explanation (at the original targets).

    Returns an ordered dict {module path: per-row similarity} in randomisation order. Lower is
    better (the explanation depends on the learned weights); a map independent of the weights
    stays near 1. ``similarity``: see :func:`similarity` (``absolute=True`` compares |R|, as
    Adebayo et al.'s "absolute" Spearman). ``layers``: the module paths to randomise (default
    all of :func:`parameter_layers`). ``draw(name, value, rng) -> array`` makes the random
    tensor (default: Gaussian draws with mean 0 and the standard deviation of the original tensor
    (its RMS when constant, 1 when zero), from ``default_rng(seed)`` in layer order).

    The randomised constants go to a copy of the plan and through the Explainer's own compiled
    pass (the constants are an argument, so nothing recompiles); the Explainer and the torch
    model are unchanged. Quantus ``MPRT`` runs the same cascade but re-initialises each layer with
    torch's ``reset_parameters`` (other random draws, so its numbers differ); Adebayo et al. draw
    from a truncated normal.
    """
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("order", order, ("top-down", "bottom-up"))
    if getattr(explainer, "runner", None) is None:
        _check_explainer(explainer)
        raise MethodError("randomisation needs an Explainer without length buckets")
    prep = _prepare(explainer, inputs, input, None)
    plan = explainer.plan
    groups = parameter_layers(explainer)
    if layers is not None:
        known = {m for m, _ in groups}
        bad = [m for m in layers if m not in known]
        if bad:
            raise ValueError(f"unknown layers {bad}; the learned layers are {sorted(known)}")
        groups = [(m, ps) for m, ps in groups if m in set(layers)]
    if order == "top-down":
        groups = groups[::-1]
    draw = draw or _gaussian_draw
    rng = np.random.default_rng(seed)
    e0 = explainer(inputs, target=target)
    targets = _same_target(explainer, e0, target)
    r0 = _relevance(e0, prep.name).astype(np.float64)
    if absolute:
        r0 = np.abs(r0)
    results = {}
    consts = dict(plan.consts)
    for module, params in groups:
        if not cascading:
            consts = dict(plan.consts)
        for p in params:
            old = plan.consts[p]
            new = np.asarray(draw(p, np.asarray(old), rng))
            if new.shape != tuple(old.shape):
                raise ValueError(f"draw returned shape {new.shape} for {p!r} of shape "
                                 f"{tuple(old.shape)}")
            consts[p] = jnp.asarray(new, dtype=old.dtype)
        e = _Swapped(explainer, consts)(inputs, target=targets)
        r = _relevance(e, prep.name).astype(np.float64)
        results[module] = _similarity(r0, np.abs(r) if absolute else r, similarity)
    return results


randomization = randomisation
similarity = _similarity


# ------------------------------------------------------------------------------------------------
# sparseness, complexity
# ------------------------------------------------------------------------------------------------
def _rows(relevance, input: Optional[str], mask) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(relevance, (Explanation, dict)):
        rel = relevance.relevance if isinstance(relevance, Explanation) else relevance
        if input is None:
            floats = [k for k, v in rel.items() if k != "attention_mask"]
            if len(floats) != 1:
                raise InputMismatchError(f"the relevance has several inputs {list(rel)}; say "
                                         "which with input=")
            input = floats[0]
        r = _relevance(rel, input)
        kept = relevance.inputs if isinstance(relevance, Explanation) else None
        if mask is None and kept and "attention_mask" in kept and input != "attention_mask" \
                and np.size(kept["attention_mask"]) == np.size(r):
            mask = kept["attention_mask"]  # token relevance: the padded tokens do not count
    else:
        r = _relevance(relevance, "")
    r = np.abs(np.asarray(r, np.float64)).reshape(np.shape(r)[0], -1)
    m = np.ones(r.shape, bool) if mask is None else np.asarray(mask).reshape(r.shape) != 0
    return r, m


def sparseness(relevance, *, input: Optional[str] = None, mask=None) -> np.ndarray:
    """Sparseness (Chalasani et al. 2020, "Concise explanations of neural networks using
    adversarial training"): the Gini index of |R| per row, ``sum_k (2k - n - 1) a_(k) / (n *
    sum_k a_(k))`` with a_(1) <= ... <= a_(n) the sorted |R| + 1e-7 (Quantus' form). In [0, 1);
    higher is sparser (better). ``mask`` (e.g. an attention mask): only entries != 0 count;
    default: an Explanation's own ``attention_mask`` input for token relevance."""
    r, m = _rows(relevance, input, mask)
    out = np.empty(len(r))
    for i in range(len(r)):
        a = np.sort(r[i][m[i]] + 1e-7)
        n = len(a)
        k = np.arange(1, n + 1)
        out[i] = ((2 * k - n - 1) * a).sum() / (n * a.sum())
    return out


def complexity(relevance, *, input: Optional[str] = None, mask=None) -> np.ndarray:
    """Complexity (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
    explanations"): the entropy ``-sum_i p_i log p_i`` (natural log) of ``p = |R| / sum |R|`` per
    row. Lower is simpler (better); NaN for an all-zero map. ``mask``: only entries != 0 count
    (default as in :func:`sparseness`)."""
    r, m = _rows(relevance, input, mask)
    r = np.where(m, r, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = r / r.sum(1, keepdims=True)
        return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1) + \
            np.where(np.isnan(p).any(1), np.nan, 0.0)
