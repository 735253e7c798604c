"""Text generation with token-level relevance: :func:`generate`.

How it works (one compilation for the whole generation, one for the whole explanation):

1. The causal LM is imported once at a fixed length ``L = prompt_length + max_new_tokens``: a
   token buffer holding the prompt, then the generated tokens, then padding, with an attention
   mask that is 1 on the prompt's own tokens and on tokens generated so far, and ``position_ids``
   = cumsum(mask) - 1 (1 on masked slots) when the forward takes them, as Hugging Face
   ``generate`` builds them; left-padded batched prompts therefore get the same positions as in
   ``generate``.
2. Decoding runs in one jitted ``lax.fori_loop`` over the steps: each step evaluates the IR
   forward on the whole buffer (causal attention: the padding after the current position cannot
   change its logits) and picks the next token at position ``prompt_length + s - 1``:

   * ``"greedy"``: the argmax (ties to the lowest id, as ``torch.argmax``);
   * ``"sample"``: logits / temperature, then top-k, then top-p (nucleus: the smallest set of
     most probable tokens whose probability reaches ``top_p``, the most probable always kept), the
     order of Hugging Face's warpers; the draw is ``jax.random.categorical`` with the key
     ``fold_in(PRNGKey(seed), step)``, so a seed reproduces the sequence;
   * ``"beam"``: ``num_beams`` beams per prompt ranked by summed log-probability (the first step
     starts from one live beam, so beams never duplicate); a finished beam (end-of-sequence
     emitted) is frozen and extended with padding at log-probability 0; the returned sequence is
     the beam with the best length-normalised score (score / generated length **
     ``length_penalty``). Deterministic, but not guaranteed to equal Hugging Face's beam search,
     which keeps a separate pool of finished hypotheses.

   After a row emits ``eos_token_id`` it is continued with ``pad_token_id`` (Hugging Face's
   convention); ``steps_valid`` marks the steps generated up to and including the end token.
3. Explanation: every (row, step) pair becomes one row of a single batched
   :class:`~dlbjax.Explainer` call (``task="next-token"``): the buffer with the mask cut after the
   position that predicted the step's token, seeded at that position and at the token actually
   chosen (sampled tokens are explained, not the argmax). The relevance over the buffer is the
   step's row of ``token_relevance``: prompt and earlier generated tokens carry it; the token's
   own position and everything after it are exactly 0 (masked); masked prompt padding is 0 too.
   This equals a separate :func:`dlbjax.explain` on the prefix (tested).
"""

from __future__ import annotations

import functools
import html
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._assemble import explain_rows
from ._dtypes import jnp_dtype
from ._errors import InputMismatchError
from ._explain import Explainer
from ._result import Explanation
from ._torch import is_tensor
from ._types import Streams
from ._views import _css
from .engine.interpret import evaluate

__all__ = ["generate", "Generator", "Generation", "STRATEGIES"]

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class Generation:
    """The result of :func:`generate`.

    ``sequences`` [batch, prompt_length + new_tokens]: prompt ids then generated ids (padding after
    an end token). ``new_tokens`` [batch, new_tokens]. ``token_relevance`` [batch, new_tokens,
    total_len]: for step s, the relevance of every buffer position for the token generated at step
    s (zero at and after that token's position); :class:`~dlbjax.Streams` in contrastive mode;
    ``None`` with ``explain=False``. ``step_logits`` [batch, new_tokens, vocab]: the model's logits
    that each step chose from (before temperature and filtering). ``step_logprobs`` [batch,
    new_tokens]: log-probability of the chosen token under the distribution it was drawn from.
    ``steps_valid`` [batch, new_tokens]: False for the padding steps after an end token.
    ``steps_explained`` [new_tokens]: which steps have token relevance (``explain_steps``).
    ``explanation``: the underlying :class:`~dlbjax.Explanation` (rows ordered batch-major, one per
    (row, step)), with its conservation report. ``compilations``: how many times the decoding loop
    and the relevance pass were traced (each is 1 per call).
    """

    sequences: np.ndarray
    prompt_length: int
    new_tokens: np.ndarray
    step_logits: np.ndarray
    step_logprobs: np.ndarray
    steps_valid: np.ndarray
    strategy: str
    token_relevance: Any = None
    explanation: Optional[Explanation] = None
    compilations: dict = field(default_factory=dict)
    steps_explained: Optional[np.ndarray] = None

    @property
    def predictions(self) -> np.ndarray:
        """Alias of ``step_logits``: the per-step predictions."""
        return self.step_logits

    # ---- pictures ------------------------------------------------------------------------------
    def _net_relevance(self, row: int) -> np.ndarray:
        if self.token_relevance is None:
            raise ValueError("this generation was made with explain=False: no token relevance")
        r = self.token_relevance
        r = r.positive - r.negative if isinstance(r, Streams) else r
        return np.asarray(r[row])  # [new_tokens, total_len]

    def _labels(self, row: int, tokenizer) -> list:
        ids = [int(i) for i in self.sequences[row]]
        if tokenizer is None:
            return [str(i) for i in ids]
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
        return [str(tokenizer.decode([i])) for i in ids]

    def plot(self, row: int = 0, *, tokenizer: Any = None, ax: Any = None, path: Any = None):
        """Heatmap of one row's ``token_relevance``: one line per generated token (labelled with
        it), one column per buffer position (prompt then generated tokens); red positive, blue
        negative (contrastive: positive minus negative). Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt
        r = self._net_relevance(row)
        labels = self._labels(row, tokenizer)
        T0, N = self.prompt_length, r.shape[0]
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels)), max(2.5, 0.4 * N + 1)))
        else:
            fig = ax.figure
        m = float(np.max(np.abs(r))) or 1.0
        im = ax.imshow(r, cmap="bwr", vmin=-m, vmax=m, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(N), [f"{s}: {labels[T0 + s]}" for s in range(N)], fontsize=8)
        ax.axvline(T0 - 0.5, color="k", lw=0.8)
        ax.set_xlabel("position (prompt | generated)")
        ax.set_ylabel("generated token")
        ax.set_title(f"token relevance, row {row} ({self.strategy})")
        fig.colorbar(im, ax=ax, fraction=0.03)
        if path is not None:
            fig.savefig(path, bbox_inches="tight")
        return fig

    def to_html(self, row: int = 0, step: Optional[int] = None, *, tokenizer: Any = None) -> str:
        """HTML: for each generated token (or only ``step``), the text up to it with every earlier
        token coloured by the relevance it gave that token (red positive, blue negative, opacity
        |r| / max|r| of the step; the token itself is underlined; values on hover)."""
        r = self._net_relevance(row)
        labels = self._labels(row, tokenizer)
        T0, N = self.prompt_length, r.shape[0]
        steps = range(N) if step is None else [range(N)[step]]
        out = ['<div class="dlbjax-generation" style="font-family: sans-serif; line-height: 2.0;">']
        for s in steps:
            if not self.steps_valid[row, s]:
                continue
            vals = r[s, :T0 + s]
            m = float(np.max(np.abs(vals))) if vals.size else 0.0
            spans = [f'<span class="dlbjax-token" style="background-color: {_css(float(v), m)}; '
                     f'padding: 1px 3px; margin: 0 1px; border-radius: 3px;" '
                     f'title="{float(v):.6g}">{html.escape(t)}</span>'
                     for t, v in zip(labels[:T0 + s], vals)]
            spans.append(f'<u class="dlbjax-generated">{html.escape(labels[T0 + s])}</u>')
            out.append(f'<div><span style="color: #555; font-size: 85%;">step {s}</span> '
                       + " ".join(spans) + "</div>")
        out.append("</div>")
        return "\n".join(out)

    def _repr_html_(self) -> str:
        if self.token_relevance is None:
            return f"<pre>{html.escape(repr(self))}</pre>"
        return self.to_html(step=-1)

    def __repr__(self) -> str:
        rel = None if self.token_relevance is None else (
            tuple(self.token_relevance.positive.shape) if isinstance(self.token_relevance, Streams)
            else tuple(self.token_relevance.shape))
        return (f"Generation(strategy={self.strategy!r}, sequences={tuple(self.sequences.shape)}, "
                f"prompt_length={self.prompt_length}, token_relevance={rel})")


# ------------------------------------------------------------------------------------------------
# options and inputs
# ------------------------------------------------------------------------------------------------
def _check(strategy, max_new_tokens, temperature, top_k, top_p, num_beams):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, not {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, not {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"top_k must be None or a non-negative int (0 = off), not {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], not {top_p!r}")
    if num_beams is None:
        num_beams = 4 if strategy == "beam" else 1
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, not {num_beams!r}")
    if strategy == "beam" and num_beams < 2:
        raise ValueError("strategy='beam' needs num_beams >= 2")
    if strategy != "beam" and num_beams != 1:
        raise ValueError(f"num_beams={num_beams} needs strategy='beam'")
    return int(num_beams)


def _prompt(inputs) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [B, T0] int64, attention_mask [B, T0] int64) from a tensor or a dict/BatchEncoding."""
    if isinstance(inputs, np.ndarray) or is_tensor(inputs):
        ids, mask = inputs, None
    elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
        d = dict(inputs)
        if "input_ids" not in d:
            raise InputMismatchError(f"generate needs 'input_ids'; got keys {sorted(d)}")
        extra = sorted(k for k in d if k not in ("input_ids", "attention_mask", "token_type_ids")
                       and (isinstance(d[k], np.ndarray) or is_tensor(d[k])))  # flags are ignored
        if extra:
            raise InputMismatchError(f"generate takes input_ids and attention_mask; cannot extend "
                                     f"{extra} token by token")
        types = d.get("token_type_ids")
        if types is not None and np.any(np.asarray(types) != 0):
            raise InputMismatchError("generate cannot extend non-zero token_type_ids token by "
                                     "token; pass input_ids and attention_mask only")
        ids, mask = d["input_ids"], d.get("attention_mask")
    else:
        raise InputMismatchError(f"inputs must be input_ids or a dict/BatchEncoding with input_ids, "
                                 f"not {type(inputs).__name__}")

    def host(x):
        return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)

    ids = host(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise InputMismatchError(f"input_ids must be integer [batch, length], got {ids.dtype} "
                                 f"{ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputMismatchError(f"input_ids is empty ({ids.shape})")
    mask = np.ones_like(ids) if mask is None else host(mask).reshape(ids.shape)
    if not np.all(mask.any(axis=1)):
        raise InputMismatchError("a prompt's attention_mask is all zeros: nothing to generate from")
    return ids.astype(np.int64), (mask != 0).astype(np.int64)


def _positions(mask):
    """position_ids as Hugging Face generate builds them: cumsum(mask) - 1, 1 where masked."""
    xp = jnp if isinstance(mask, jax.Array) else np
    pos = xp.cumsum(mask, axis=-1) - 1
    return xp.where(mask == 0, 1, pos)


def _special(model, eos_token_id, pad_token_id):
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(cfg, "eos_token_id", None)
    eos = [] if eos_token_id is None else (
        list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)])
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
def _filter(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as Hugging Face's warpers (filtered entries -inf)."""
    logits = logits / temperature
    V = logits.shape[-1]
    if top_k:
        k = min(int(top_k), V)
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
        keep_sorted = (before < top_p).at[..., 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def _decoder(program, explained, consts, names, *, T0, N, strategy, temperature, top_k, top_p,
             num_beams, eos, pad, length_penalty, counter):
    """A jitted function (ids, mask, key) -> (sequences, step_logits, step_logprobs, valid)."""
    out_var = program.outputs[explained]
    specs = {v.name: (tuple(v.shape), jnp_dtype(v.dtype)) for v in program.inputs}
    eos_arr = jnp.asarray(eos if eos else [-1], jnp.int32)

    def logits_at(ids, mask, p):
        def row(i, m):
            given = {"input_ids": i, "attention_mask": m, "position_ids": _positions(m)}
            outs = evaluate(program, consts, [given[n].reshape(specs[n][0]).astype(specs[n][1])
                                              for n in names])
            y = outs[explained].reshape(out_var.shape[-2:])
            return jax.lax.dynamic_index_in_dim(y, p, axis=0, keepdims=False)
        return jax.vmap(row)(ids, mask).astype(jnp.float32)

    def run(ids, mask, key):
        counter["generate"] += 1
        B, L = ids.shape
        V = out_var.shape[-1]
        K = num_beams
        ids = jnp.repeat(ids, K, axis=0)
        mask = jnp.repeat(mask, K, axis=0)
        state = dict(ids=ids, mask=mask, done=jnp.zeros((B * K,), bool),
                     logits=jnp.zeros((B * K, N, V), jnp.float32),
                     logp=jnp.zeros((B * K, N), jnp.float32),
                     valid=jnp.zeros((B * K, N), bool),
                     score=jnp.tile(jnp.asarray([0.0] + [-jnp.inf] * (K - 1), jnp.float32), B),
                     length=jnp.zeros((B * K,), jnp.int32))

        def step(s, st):
            p = T0 + s - 1
            raw = logits_at(st["ids"], st["mask"], p)  # [B*K, V]
            done = st["done"]
            if strategy == "beam":
                lp = jax.nn.log_softmax(raw, axis=-1)
                frozen = jnp.full((V,), -jnp.inf).at[pad].set(0.0)
                lp = jnp.where(done[:, None], frozen[None, :], lp)
                cand = (st["score"][:, None] + lp).reshape(B, K * V)
                best, flat = jax.lax.top_k(cand, K)  # ties: lowest index first
                origin = (jnp.arange(B)[:, None] * K + flat // V).reshape(-1)
                tok = (flat % V).reshape(-1).astype(jnp.int32)
                st = {k: v[origin] for k, v in st.items()}
                chosen_lp = lp[origin, tok]
                score = best.reshape(-1)
                raw = raw[origin]
                done = st["done"]
            else:
                if strategy == "greedy":
                    lp = jax.nn.log_softmax(raw, axis=-1)
                    tok = jnp.argmax(raw, axis=-1).astype(jnp.int32)
                else:
                    filt = _filter(raw, temperature, top_k, top_p)
                    lp = jax.nn.log_softmax(filt, axis=-1)
                    tok = jax.random.categorical(jax.random.fold_in(key, s), filt).astype(jnp.int32)
                tok = jnp.where(done, pad, tok)
                chosen_lp = jnp.where(done, 0.0, jnp.take_along_axis(lp, tok[:, None], 1)[:, 0])
                score = st["score"]
            valid = ~done
            new_done = done | jnp.any(tok[:, None] == eos_arr[None, :], axis=1)
            pos = T0 + s
            return dict(ids=st["ids"].at[:, pos].set(tok.astype(st["ids"].dtype)),
                        mask=st["mask"].at[:, pos].set(1),
                        done=new_done,
                        logits=st["logits"].at[:, s].set(raw),
                        logp=st["logp"].at[:, s].set(chosen_lp),
                        valid=st["valid"].at[:, s].set(valid),
                        score=score,
                        length=st["length"] + valid.astype(jnp.int32))

        st = jax.lax.fori_loop(0, N, step, state)
        if strategy == "beam":
            norm = st["score"] / jnp.maximum(st["length"], 1).astype(jnp.float32) ** length_penalty
            pick = jnp.arange(B) * K + jnp.argmax(norm.reshape(B, K), axis=1)
            st = {k: v[pick] for k, v in st.items()}
        return st["ids"], st["logits"], st["logp"], st["valid"]

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _token_ids_only_class():
    """The wrapper class, built on first use so that importing dlbjax never imports torch."""
    import torch

    class _TokenIdsOnly(torch.nn.Module):
        """A causal LM whose forward takes only the token ids (``forward(ids)``, returning logits
        or an object with ``.logits``), given the ``attention_mask`` argument that generation
        drives. The model never reads the mask: being causal, later positions cannot change
        earlier logits. The mask only tells the next-token seed which position to explain (the
        last unmasked one). The user's module is held, not changed."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids)
            return getattr(out, "logits", out)

    return _TokenIdsOnly


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
class Generator:
    """Import and compile a causal LM once for generation with token relevance; call it on many
    prompts.

    ``prompt_length``: the prompt length the buffer is built for; shorter prompts are padded on the
    left with their attention mask (models whose forward takes ``position_ids``, as Hugging Face
    decoders do; others need prompts of exactly this length). ``max_new_tokens``: steps per call.
    The decoding loop compiles once per strategy setting and batch size; the relevance pass once
    for all calls (every call explains chunks of exactly ``batch_size`` rows, padded). Other
    options as for :func:`generate`; ``trace_counts`` says how many compilations happened.
    """

    def __init__(self, model: torch.nn.Module, prompt_length: int, max_new_tokens: int = 16, *,
                 mode: str = "default", multiplier: float = 100.0, eos_token_id: Any = None,
                 pad_token_id: Optional[int] = None, batch_size: int = 32,
                 _pad_rows: bool = True, **explainer_options):
        _check("greedy", max_new_tokens, 1.0, None, None, None)
        if not isinstance(prompt_length, (int, np.integer)) or prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive int, not {prompt_length!r}")
        self.prompt_length, self.max_new_tokens = int(prompt_length), int(max_new_tokens)
        self.batch_size, self._pad_rows = max(1, int(batch_size)), _pad_rows
        L = self.prompt_length + self.max_new_tokens
        self.eos, self.pad = _special(model, eos_token_id, pad_token_id)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.ids_only = bool(params) and "attention_mask" not in params and not takes_kwargs
        if self.ids_only:
            model = _token_ids_only_class()(model)
            params = inspect.signature(model.forward).parameters
        self.left_pads = "position_ids" in params
        import torch
        example = {"input_ids": torch.full((1, L), self.pad, dtype=torch.long),
                   "attention_mask": torch.ones((1, L), dtype=torch.long)}
        if "position_ids" in params:
            example["position_ids"] = torch.arange(L)[None]
        if "use_cache" in params:
            example["use_cache"] = False
        self.explainer = Explainer(model, example, task="next-token", mode=mode,
                                   multiplier=multiplier, **explainer_options)
        program = self.explainer.program
        self._names = [v.name for v in program.inputs]
        unknown = [n for n in self._names
                   if n not in ("input_ids", "attention_mask", "position_ids")]
        if unknown:
            raise InputMismatchError(f"generate can drive a forward taking input_ids, attention_mask "
                                     f"and position_ids; this one also needs {unknown}")
        out_var = program.outputs[self.explainer.explained]
        if len(out_var.shape) != 3 or out_var.shape[1] != L:
            raise InputMismatchError(f"generate needs logits [batch, length, vocab] from the model; "
                                     f"its output has shape {out_var.shape}")
        V = out_var.shape[-1]
        bad = [t for t in self.eos + [self.pad] if not 0 <= t < V]
        if bad:
            raise InputMismatchError(f"end/padding token ids {bad} are outside the vocabulary "
                                     f"(size {V})")
        self._decoders: dict = {}
        self._counter = {"generate": 0}

    @property
    def trace_counts(self) -> dict:
        """Compilations so far: the decoding loops and the relevance pass."""
        return {"generate": self._counter["generate"], "explain": self.explainer.trace_count}

    def _buffer(self, inputs):
        ids, mask = _prompt(inputs)
        B, T = ids.shape
        T0 = self.prompt_length
        if self.ids_only and not np.all(mask == 1):
            raise InputMismatchError(
                "the model's forward takes no attention_mask, so prompts cannot be padded: pass "
                "prompts of one length (or one prompt at a time)")
        if T > T0 or (T < T0 and not self.left_pads):
            how = "" if T > T0 else (" (this model takes no position_ids, so shorter prompts "
                                     "cannot be padded without moving their positions)")
            raise InputMismatchError(f"the prompts have length {T}; this Generator was built for "
                                     f"prompt_length={T0}{how}")
        L = T0 + self.max_new_tokens
        buf_ids = np.full((B, L), self.pad, np.int64)
        buf_mask = np.zeros((B, L), np.int64)
        buf_ids[:, T0 - T:T0] = ids
        buf_mask[:, T0 - T:T0] = mask
        return buf_ids, buf_mask

    def __call__(self, inputs: Any, *, strategy: str = "greedy", temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 num_beams: Optional[int] = None, seed: int = 0, explain: bool = True,
                 explain_steps: Any = None, length_penalty: float = 1.0,
                 progress: bool = False) -> Generation:
        """Generate from ``inputs`` and (with ``explain``) explain the generated tokens; see
        :func:`generate`."""
        num_beams = _check(strategy, self.max_new_tokens, temperature, top_k, top_p, num_beams)
        buf_ids, buf_mask = self._buffer(inputs)
        T0, N = self.prompt_length, self.max_new_tokens
        key = (strategy, float(temperature), top_k, top_p, num_beams, float(length_penalty))
        if key not in self._decoders:
            self._decoders[key] = _decoder(
                self.explainer.program, self.explainer.explained, self.explainer.constants,
                self._names, T0=T0, N=N, strategy=strategy, temperature=float(temperature),
                top_k=top_k, top_p=top_p, num_beams=num_beams, eos=self.eos, pad=self.pad,
                length_penalty=float(length_penalty), counter=self._counter)
        before = self._counter["generate"]
        dt = jnp_dtype("int64")
        seqs, logits, logp, valid = jax.device_get(self._decoders[key](
            jnp.asarray(buf_ids, dt), jnp.asarray(buf_mask, dt), jax.random.PRNGKey(int(seed))))
        seqs = np.asarray(seqs).astype(np.int64)
        result = Generation(sequences=seqs, prompt_length=T0, new_tokens=seqs[:, T0:],
                            step_logits=np.asarray(logits), step_logprobs=np.asarray(logp),
                            steps_valid=np.asarray(valid), strategy=strategy,
                            compilations={"generate": self._counter["generate"] - before})
        if explain:
            steps = None
            if explain_steps is not None:
                steps = sorted({int(i) for i in np.asarray(explain_steps, np.int64).reshape(-1)})
                if not steps or steps[0] < 0 or steps[-1] >= N:
                    raise ValueError(f"explain_steps must be step indices in 0..{N - 1}, got "
                                     f"{explain_steps!r}")
            _explain_steps(result, self.explainer, buf_mask[:, :T0], self.batch_size, progress,
                           self._names, self.pad, steps, self._pad_rows)
        return result


def generate(model: torch.nn.Module, inputs: Any, *, max_new_tokens: int = 16,
             strategy: str = "greedy", temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, num_beams: Optional[int] = None, seed: int = 0,
             explain: bool = True, mode: str = "default", multiplier: float = 100.0,
             eos_token_id: Any = None, pad_token_id: Optional[int] = None,
             length_penalty: float = 1.0, batch_size: int = 32, progress: bool = False,
             explain_steps: Any = None, **explainer_options) -> Generation:
    """Generate text with a Hugging Face (or any) causal LM and explain every generated token.

    ``inputs``: ``input_ids`` [batch, prompt_length] (a tensor or array) or a dict/BatchEncoding
    with ``input_ids`` and ``attention_mask`` (batched prompts of different lengths: pad on the
    left, as for Hugging Face ``generate``). ``strategy``: ``"greedy"``, ``"sample"``
    (``temperature``, ``top_k``, ``top_p``; reproducible from ``seed``) or ``"beam"``
    (``num_beams``, default 4). ``explain``: compute ``token_relevance`` (one batched relevance
    pass over all steps; ``batch_size`` rows per compiled call). ``mode``/``multiplier`` and other
    keyword options go to the :class:`~dlbjax.Explainer`. ``explain_steps``: the step indices to
    explain (default all; the others' rows of ``token_relevance`` are 0, see ``steps_explained``).
    The model is not modified; its forward must return logits [batch, length, vocab] (as
    ``*ForCausalLM`` models do). The end token and the padding token default to the model's
    generation config. See the module docstring for how each strategy is computed. Each call
    imports and compiles the model afresh; to generate from many prompts use :class:`Generator`.
    Returns a :class:`Generation`.
    """
    _check(strategy, max_new_tokens, temperature, top_k, top_p, num_beams)
    ids, _ = _prompt(inputs)
    gen = Generator(model, ids.shape[1], max_new_tokens, mode=mode, multiplier=multiplier,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, batch_size=batch_size,
                    _pad_rows=False, **explainer_options)
    return gen(inputs, strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
               num_beams=num_beams, seed=seed, explain=explain, explain_steps=explain_steps,
               length_penalty=length_penalty, progress=progress)


def _explain_steps(result: Generation, explainer: Explainer, prompt_mask, batch_size, progress,
                   names, pad, steps=None, pad_rows=False) -> None:
    """One batched relevance pass over every (row, explained step): rows ordered batch-major."""
    seqs, T0 = result.sequences, result.prompt_length
    B, L = seqs.shape
    N = L - T0
    chosen = np.arange(N) if steps is None else np.asarray(steps, np.int64)
    S = len(chosen)
    result.steps_explained = np.isin(np.arange(N), chosen)
    rows_ids = np.repeat(seqs, S, axis=0)  # [B*S, L]
    step = np.tile(chosen, B)
    cut = T0 + step - 1  # the position whose logits chose the step's token
    keep = np.arange(L)[None, :] <= cut[:, None]
    full_mask = np.concatenate([prompt_mask, np.ones((B, N), np.int64)], axis=1)
    rows_mask = np.repeat(full_mask, S, axis=0) * keep
    rows_ids = np.where(keep, rows_ids, pad)  # never seen: masked and after the position
    targets = seqs[np.repeat(np.arange(B), S), T0 + step]
    data = {"input_ids": rows_ids, "attention_mask": rows_mask}
    if "position_ids" in names:
        data["position_ids"] = _positions(rows_mask)
    before = explainer.trace_count
    # pad_rows: chunks of exactly batch_size rows, so every call shares one compilation
    exp = explain_rows(explainer.plan, explainer.runner, data, targets.astype(np.int64),
                       dataset=True, size=batch_size, fixed=pad_rows, progress=progress)
    result.compilations["explain"] = explainer.trace_count - before
    rel = exp.relevance["input_ids"]
    valid = result.steps_valid[:, chosen].reshape(-1)[:, None]

    def shape(a):
        full = np.zeros((B, N, L), np.asarray(a).dtype)
        full[:, chosen] = (np.asarray(a) * valid).reshape(B, S, L)
        return full

    result.token_relevance = Streams(shape(rel.positive), shape(rel.negative)) \
        if isinstance(rel, Streams) else shape(rel)
    result.explanation = exp

