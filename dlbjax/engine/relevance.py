"""The relevance pass: the model's forward with every relevance-carrying op wrapped in a
``jax.custom_vjp`` whose backward is the op's DLB rule, so that relevance is one VJP of the forward.

The static facts come from :func:`dlbjax.engine.analysis.analyze`.

* :func:`relevance_row` runs one example: forward, seed, VJP. Fan-out relevance is summed by the
  VJP itself (§1.1, §4.12). In contrastive mode every relevance-carrying value travels as two
  identical copies (one per stream) so each stream gets its own cotangent; XLA computes the forward
  once. Integer token ids that feed an embedding carry relevance through a float "shadow" of the
  same shape. A zero "sink" input collects the relevance absorbed by biases and constant addends,
  and optional zero "taps" read the relevance at every intermediate variable (``layers=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dlbjax._dtypes import jnp_dtype, relevance_dtype
from dlbjax._errors import InvalidProgramError
from dlbjax._types import Streams
from dlbjax.engine.analysis import Analysis
from dlbjax.engine.origins import FILL, FILL_OPS, constant_slots
from dlbjax.ir import Eqn, Program, Var, substitute
from dlbjax.lowerings import call_lowering
from dlbjax.passes.layers import scan_weights
from dlbjax.rules import PER_STREAM, GateSpec, Options, RuleContext, RuleResult, get_rule

__all__ = ["RowResult", "relevance_row"]


class RowResult(NamedTuple):
    """The relevance pass of one row (a pytree; vmapped, every leaf gains a leading row axis).

    ``outputs``: every model output; ``prediction``: the explained output; ``target``: the seeded
    class (-1 where none); ``relevance``: input name -> tuple of per-stream maps (zeros for inputs
    that carry none); ``absorbed``: [streams] relevance kept by biases and constants; ``seed``:
    [streams] seeded totals; ``input_total``: [streams] totals at the inputs; ``layers``: variable
    name -> per-stream relevance (with ``layers=True`` or taps); ``probes``: forward values of
    requested variables (MoE router indices); ``constants``: [streams, K] relevance at the
    learned tensors and constants that index maps copy into the stream, in the order of
    ``dlbjax.engine.origins.constant_slots`` (K may be 0)."""

    outputs: tuple
    prediction: Any
    target: Any
    relevance: dict
    absorbed: Any
    seed: Any
    input_total: Any
    layers: Optional[dict] = None
    probes: Optional[dict] = None
    constants: Any = None

# ------------------------------------------------------------------------------------------------
# Values in the environment
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Carried:
    """A relevance-carrying value: its primal value plus one array per stream.

    For float vars the stream arrays are the value itself (identical copies); for token ids they
    are float shadows of the same shape."""

    value: Any
    streams: tuple


def _primal(x):
    return x.value if isinstance(x, _Carried) else x


class _Flat:
    """Flattens an equation's arguments into custom_vjp leaves and rebuilds them."""

    def __init__(self):
        self.leaves: list = []

    def push(self, x) -> int:
        self.leaves.append(x)
        return len(self.leaves) - 1

    def encode(self, a):
        if isinstance(a, _Carried):
            if a.value is a.streams[0]:
                return ("F", [self.push(s) for s in a.streams])
            return ("T", self.push(a.value), [self.push(s) for s in a.streams])
        if isinstance(a, (jax.Array, np.ndarray)) or hasattr(a, "shape") and hasattr(a, "dtype"):
            return ("C", self.push(a))
        if isinstance(a, list):
            return ("list", [self.encode(x) for x in a])
        if isinstance(a, tuple):
            return ("tuple", [self.encode(x) for x in a])
        if isinstance(a, dict):
            return ("dict", {k: self.encode(v) for k, v in a.items()})
        return ("L", a)


def _decode(spec, flat):
    kind = spec[0]
    if kind == "F":
        return flat[spec[1][0]]
    if kind == "T":
        return flat[spec[1]]
    if kind == "C":
        return flat[spec[1]]
    if kind == "list":
        return [_decode(s, flat) for s in spec[1]]
    if kind == "tuple":
        return tuple(_decode(s, flat) for s in spec[1])
    if kind == "dict":
        return {k: _decode(s, flat) for k, s in spec[1].items()}
    return spec[1]


def _carry_of(spec):
    kind = spec[0]
    if kind in ("F", "T"):
        return True
    if kind in ("list", "tuple"):
        return [_carry_of(s) for s in spec[1]]
    return False


def _stream(r, s: int, n: int):
    """Stream s of a rule result (Streams in contrastive mode, a plain array in default mode)."""
    if r is None:
        return None
    if n == 1:
        return r
    if not isinstance(r, Streams):
        raise InvalidProgramError("a contrastive rule returned a single map instead of two streams")
    return r[s]


def _split_result(res):
    """(per-argument relevance, absorbed or None) of a rule's return value."""
    if isinstance(res, RuleResult):
        return res.relevance, res.absorbed
    return res, None


def _call_rule(rule, options: Options, ctx: RuleContext, R, args, kwargs):
    """Run the default or contrastive rule; returns (per-arg results, absorbed per stream)."""
    if not options.contrastive:
        res, kept = _split_result(rule.default(ctx, R, *args, **kwargs))
        return res, [_total(kept)]
    if rule.contrastive is PER_STREAM:
        results, absorbed = [], []
        for s in range(2):
            Rs = tuple(None if r is None else r[s] for r in R) if isinstance(R, tuple) and not \
                isinstance(R, Streams) else R[s]
            res, kept = _split_result(rule.default(ctx, Rs, *args, **kwargs))
            results.append(res)
            absorbed.append(_total(kept))
        return _zip_streams(results[0], results[1]), absorbed
    res, kept = _split_result(rule.contrastive(ctx, R, *args, **kwargs))
    if kept is None:
        return res, [0.0, 0.0]
    return res, [0.0 + jnp.sum(kept.positive), 0.0 + jnp.sum(kept.negative)]


def _total(kept):
    """The absorbed total of one stream, in the relevance dtype (0 when nothing was kept)."""
    zero = jnp.zeros((), relevance_dtype())
    return zero if kept is None else zero + jnp.sum(kept)


def _constant_totals(psink, results, slots, fill, R_out, n_streams):
    """[streams, constants]: each stream's relevance at the constant operands (and fills)."""
    out = jnp.zeros(psink.shape, psink.dtype)
    for path, col in slots.items():
        r = results[path[0]] if path[0] < len(results) else None
        if r is not None and len(path) == 2:
            r = r[path[1]]
        for s in range(n_streams):
            g = _stream(r, s, n_streams)
            if g is not None:
                out = out.at[s, col].add(jnp.sum(g).astype(psink.dtype))
    if fill is not None:
        # the output's relevance that reached no operand sat on the written numbers
        for s in range(n_streams):
            total = sum(jnp.sum(_stream(r, s, n_streams)).astype(psink.dtype)
                        for r in R_out if r is not None)
            passed = sum(jnp.sum(_stream(r, s, n_streams)).astype(psink.dtype)
                         for r in _leaves(results) if r is not None)
            out = out.at[s, fill].add(total - passed)
    return out


def _leaves(results):
    """The relevance arrays (or Streams) of a rule's per-argument results, lists flattened."""
    out = []
    for r in results:
        if isinstance(r, (list, tuple)) and not isinstance(r, Streams):
            out.extend(_leaves(r))
        else:
            out.append(r)
    return out


def _zip_streams(a, b):
    if a is None and b is None:
        return None
    if isinstance(a, (list, tuple)) and not isinstance(a, Streams):
        return type(a)(_zip_streams(x, y) for x, y in zip(a, b))
    return Streams(a, b)


def _relevance_call(eqn: Eqn, index: int, env: dict, an: Analysis, options: Options, sink,
                    n_streams: int, magnitudes: Optional[dict] = None, psink=None,
                    slots: Optional[dict] = None, fill: Optional[int] = None) -> tuple:
    """Apply one relevance-carrying equation through a custom_vjp wrapping its rule.

    ``psink`` [streams, constants] collects the relevance the rule gives to the float constants
    at ``slots`` (argument path -> column) and, for an index map that writes Python numbers,
    the rest of its output's relevance in column ``fill`` (``dlbjax.engine.origins``)."""
    method, params = options.choice(index)
    rule = get_rule(eqn.op, method)
    gate: Optional[GateSpec] = an.gates.get(index)
    info = an.info.get(index, {})
    flat = _Flat()
    args_val = substitute(eqn.args, env)
    kwargs_val = substitute(eqn.kwargs, env)
    spec_args = [flat.encode(a) for a in args_val]
    spec_kwargs = flat.encode(kwargs_val)
    sink_idx = flat.push(sink)
    slots = slots or {}
    psink_idx = flat.push(psink) if psink is not None and (slots or fill is not None) else None
    # precomputed |constant| operands (dlbjax._magnitudes), handed to the rule as ctx.magnitudes
    mag_idx = {p: flat.push(magnitudes[a.name]) for p, a in enumerate(eqn.args)
               if magnitudes and isinstance(a, Var) and a.name in magnitudes}
    out_carry = [v in an.carries for v in eqn.outputs]
    out_token = [v in an.tokens for v in eqn.outputs]
    carries = tuple(_carry_of(s) for s in spec_args)
    where = f"{eqn.op} in {eqn.source}"

    def forward(leaves):
        args = [_decode(s, leaves) for s in spec_args]
        kwargs = _decode(spec_kwargs, leaves)
        return call_lowering(eqn, args, kwargs), args, kwargs

    def expand(outs):
        flat_out = []
        for o, c, t in zip(outs, out_carry, out_token):
            if not c:
                flat_out.append(o)
            elif t:
                flat_out.append(o)
                flat_out.extend(jnp.zeros(o.shape, relevance_dtype()) for _ in range(n_streams))
            else:
                flat_out.extend([o] * n_streams)
        return tuple(flat_out)

    @jax.custom_vjp
    def op(*leaves):
        return expand(forward(leaves)[0])

    def op_fwd(*leaves):
        outs, _, _ = forward(leaves)
        return expand(outs), (leaves, outs)

    def op_bwd(res, cts):
        leaves, outs = res
        R_out, k = [], 0
        for o, c, t in zip(outs, out_carry, out_token):
            if not c:
                R_out.append(None)
                k += 1
                continue
            if t:
                k += 1
            streams = [jnp.asarray(cts[k + s], relevance_dtype()) if t else cts[k + s]
                       for s in range(n_streams)]
            k += n_streams
            R_out.append(streams[0] if n_streams == 1 else Streams(*streams))
        R = R_out[0] if len(outs) == 1 else tuple(R_out)
        args = [_decode(s, leaves) for s in spec_args]
        kwargs = _decode(spec_kwargs, leaves)
        ctx = RuleContext(carries=carries, outputs=tuple(outs), gate=gate, options=options,
                          op=eqn.op, where=where, info=info,
                          magnitudes={p: leaves[j] for p, j in mag_idx.items()},
                          params={k: getattr(v, "value", v) for k, v in params})
        results, absorbed = _call_rule(rule, options, ctx, R, args, kwargs)
        results = tuple(results) if results is not None else ()
        grads = [None] * len(leaves)

        def assign(spec, r):
            if r is None or spec[0] in ("C", "L"):
                return
            if spec[0] in ("list", "tuple"):
                for s_, r_ in zip(spec[1], r):
                    assign(s_, r_)
                return
            idxs = spec[1] if spec[0] == "F" else spec[2]
            for s, idx in enumerate(idxs):
                g = _stream(r, s, n_streams)
                if g is None:
                    continue
                target = leaves[idx]
                if tuple(g.shape) != tuple(target.shape):
                    raise InvalidProgramError(
                        f"rule for {where} returned relevance of shape {tuple(g.shape)} for an "
                        f"operand of shape {tuple(target.shape)}")
                grads[idx] = g.astype(target.dtype)

        for spec, r in zip(spec_args, results):
            assign(spec, r)
        grads[sink_idx] = jnp.stack([jnp.asarray(a, leaves[sink_idx].dtype) for a in absorbed])
        if psink_idx is not None:
            grads[psink_idx] = _constant_totals(leaves[psink_idx], results, slots, fill, R_out,
                                                n_streams)
        return tuple(grads)

    op.defvjp(op_fwd, op_bwd)
    flat_out = op(*flat.leaves)
    values, k = [], 0
    for o, c, t in zip(eqn.outputs, out_carry, out_token):
        if not c:
            values.append(flat_out[k])
            k += 1
        elif t:
            values.append(_Carried(flat_out[k], tuple(flat_out[k + 1:k + 1 + n_streams])))
            k += 1 + n_streams
        else:
            streams = tuple(flat_out[k:k + n_streams])
            values.append(_Carried(streams[0], streams))
            k += n_streams
    return tuple(values)


# ------------------------------------------------------------------------------------------------
# A run of identical layers as one lax.scan
# ------------------------------------------------------------------------------------------------
def _pack(x):
    """(static kind, pytree) of an environment value for a scan carry."""
    if isinstance(x, _Carried):
        if x.value is x.streams[0]:
            return "F", tuple(x.streams)
        return "T", (x.value, tuple(x.streams))
    return "A", x


def _unpack(kind, tree):
    if kind == "F":
        return _Carried(tree[0], tuple(tree))
    if kind == "T":
        return _Carried(tree[0], tuple(tree[1]))
    return tree


def _scan_run(run, program: Program, env: dict, consts, magnitudes, step) -> bool:
    """Compute ``run`` (``dlbjax.passes.layers.Run``) as one ``jax.lax.scan`` whose body is
    block 1's equations through ``step(i, eqn, env, magnitudes)``; writes the last block's carry
    outputs into ``env``. Returns False (nothing done: the caller unrolls) when the carried
    values' kinds differ between the run's input and a block's output, known only now."""
    how = scan_weights(run, consts, magnitudes)
    if how is None:
        return False
    xs, pick, in_place = how
    packed = [_pack(env[v]) for v in run.init]
    kinds = tuple(k for k, _ in packed)
    template = [(i, program.eqns[i]) for i in run.template]
    outer = dict(env)

    def body(carry, x):
        ws, ms = pick(x)
        benv = dict(outer)
        for v, kind, tree in zip(run.body_in, kinds, carry):
            benv[v] = _unpack(kind, tree)
        for (tv, _), w in zip(run.weights, ws):
            benv[tv] = w
        mags = dict(magnitudes or {})
        for (tv, _), m in zip(run.weights, ms):
            if m is not None:
                mags[tv.name] = m
        for i, eqn in template:
            step(i, eqn, benv, mags)
        out = [_pack(benv[v]) for v in run.body_out]
        if tuple(k for k, _ in out) != kinds:
            raise _KindMismatch  # e.g. the run's input carries no relevance, its layers' do
        return tuple(t for _, t in out), None

    try:
        # weights read in place: the VJP recomputes each block rather than saving the weights
        # it picked at every step (scan_weights)
        final, _ = jax.lax.scan(jax.checkpoint(body) if in_place else body,
                                tuple(t for _, t in packed), xs, length=run.count)
    except _KindMismatch:
        return False
    for v, kind, tree in zip(run.final, kinds, final):
        env[v] = _unpack(kind, tree)
    return True


class _KindMismatch(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# One example
# ------------------------------------------------------------------------------------------------
def relevance_row(program: Program, an: Analysis, options: Options, consts: dict, inputs: tuple,
                  seed_fn: Callable, *, explained: int = 0, layers: bool = False,
                  taps: tuple = (), probes: tuple = (),
                  magnitudes: Optional[dict] = None, runs: tuple = ()) -> RowResult:
    """Forward + seed + VJP for one example. ``inputs`` has one array per program input.

    ``seed_fn(prediction, inputs_by_name) -> (seeds, target)`` builds the seed (a tuple with one
    array per stream) from the explained output's value. Returns a :class:`RowResult`; with
    ``layers`` its ``layers`` hold the relevance at every relevance-carrying intermediate
    variable. ``runs``: runs of identical layers (``dlbjax.passes.layers``) computed as one
    ``lax.scan`` each, their weights stacked in ``consts`` (``stack_weights``) or read in
    place (``scan_weights``); not combined with ``layers``/``taps``/``probes`` inside a run (the caller leaves ``runs`` empty then).
    """
    S = 2 if options.contrastive else 1
    if layers or taps or probes:
        runs = ()  # taps and probes read values inside the layers: unrolled
    float_in, token_in = {}, {}
    for v, x in zip(program.inputs, inputs):
        if v in an.carries:
            if v.is_float:
                float_in[v.name] = tuple(x for _ in range(S))
            else:
                token_in[v.name] = tuple(jnp.zeros(v.shape, relevance_dtype()) for _ in range(S))
    extra = set(taps)
    tap_vars = [o for e in program.eqns for o in e.outputs if o in an.carries and o.is_float
                and (layers or o.name in extra)]
    taps = {v.name: tuple(jnp.zeros(v.shape, jnp_dtype(v.dtype)) for _ in range(S)) for v in tap_vars}
    sink = jnp.zeros((S,), relevance_dtype())
    tap_set = {v.name for v in tap_vars}
    const_names, slots = constant_slots(program, an, options.method)
    eqn_slots: dict = {}
    for (i, path), col in slots.items():
        eqn_slots.setdefault(i, {})[path] = col
    fill_col = const_names.index(FILL) if FILL in const_names else None
    psink = jnp.zeros((S, len(const_names)), relevance_dtype())

    def fwd(float_in, token_in, sink, taps, psink):
        env: dict[Var, Any] = {}
        for v, x in zip(program.inputs, inputs):
            if v.name in float_in:
                streams = float_in[v.name]
                env[v] = _Carried(streams[0], streams)
            elif v.name in token_in:
                env[v] = _Carried(x, token_in[v.name])
            else:
                env[v] = x
        for c in program.constants:
            if c.name in consts:  # a scanned run's weights come stacked (passes/layers.py)
                env[c] = consts[c.name]

        def step(i, eqn, env, mags):
            if any(o in an.carries for o in eqn.outputs):
                outs = _relevance_call(eqn, i, env, an, options, sink, S, mags, psink,
                                       eqn_slots.get(i),
                                       fill_col if eqn.op in FILL_OPS else None)
            else:
                args = substitute(eqn.args, {k: _primal(v) for k, v in env.items()}) \
                    if any(isinstance(env.get(v), _Carried) for v in eqn.inputs) \
                    else substitute(eqn.args, env)
                kwargs = substitute(eqn.kwargs, {k: _primal(v) for k, v in env.items()})
                outs = call_lowering(eqn, args, kwargs)
            for var, value in zip(eqn.outputs, outs):
                if isinstance(value, _Carried) and var.name in tap_set:
                    streams = tuple(s + t for s, t in zip(value.streams, taps[var.name]))
                    value = _Carried(streams[0], streams)
                env[var] = value

        scan_at = {r.start: r for r in runs}
        i = 0
        while i < len(program.eqns):
            run = scan_at.get(i)
            if run is not None and _scan_run(run, program, env, consts, magnitudes, step):
                i = run.stop
                continue
            step(i, program.eqns[i], env, magnitudes)
            i += 1
        probe_values = {v.name: _primal(env[v]) for v in env if v.name in probe_set}
        return tuple(env[v].streams if isinstance(env[v], _Carried) else env[v]
                     for v in program.outputs), probe_values

    probe_set = set(probes)
    outs, vjp, probe_values = jax.vjp(fwd, float_in, token_in, sink, taps, psink, has_aux=True)
    explained_var = program.outputs[explained]
    y = outs[explained]
    carried = explained_var in an.carries
    prediction = y[0] if carried else y
    seeds, target = seed_fn(prediction, {v.name: x for v, x in zip(program.inputs, inputs)})
    cts = []
    for i, (v, o) in enumerate(zip(program.outputs, outs)):
        if v in an.carries:
            if i == explained:
                cts.append(tuple(jnp.asarray(s, o[k].dtype) for k, s in enumerate(seeds)))
            else:
                cts.append(tuple(jnp.zeros_like(x) for x in o))
        elif jnp.issubdtype(o.dtype, jnp.inexact):
            cts.append(jnp.zeros_like(o))
        else:
            cts.append(np.zeros(o.shape, dtype=jax.dtypes.float0))
    g_float, g_token, g_sink, g_taps, g_psink = vjp(tuple(cts))

    relevance = {}
    for v, x in zip(program.inputs, inputs):
        if v.name in g_float:
            relevance[v.name] = tuple(g_float[v.name])
        elif v.name in g_token:
            relevance[v.name] = tuple(g_token[v.name])
        else:
            relevance[v.name] = tuple(jnp.zeros(v.shape, relevance_dtype()) for _ in range(S))
    seed_total = jnp.stack([jnp.sum(s) for s in seeds])
    return RowResult(
        outputs=tuple(o[0] if v in an.carries else o for v, o in zip(program.outputs, outs)),
        prediction=prediction, target=target, relevance=relevance, absorbed=g_sink,
        seed=seed_total, constants=g_psink,
        input_total=jnp.stack([sum(jnp.sum(r[s]) for r in relevance.values()) for s in range(S)]),
        layers={k: tuple(v) for k, v in g_taps.items()} if layers or taps else None,
        probes=probe_values if probes else None)
