"""The relevance pass: the model's forward with every relevance-carrying op wrapped in a
``jax.custom_vjp`` whose backward is the op's DLB rule, so that relevance is one VJP of the forward.

* :func:`analyze` decides statically which variables carry relevance (spec §9.1), which activation
  gates which affine op (§8.1) and which ops lack a rule (listed all at once).
* :func:`relevance_row` runs one example: forward, seed, VJP. Fan-out relevance is summed by the
  VJP itself (§1.1, §4.12). In contrastive mode every relevance-carrying value travels as two
  identical copies (one per stream) so each stream gets its own cotangent; XLA computes the forward
  once. Integer token ids that feed an embedding carry relevance through a float "shadow" of the
  same shape. A zero "sink" input collects the relevance absorbed by biases and constant addends,
  and optional zero "taps" read the relevance at every intermediate variable (``layers=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InvalidProgramError, UnsupportedOp, UnsupportedOperationError
from ._interpret import call_lowering, missing_lowerings, substitute
from ._dtypes import relevance_dtype
from ._lowering import jnp_dtype
from ._moe import ROUTING_OPS
from .ir import Eqn, Program, Var, iter_vars
from .rules import PER_STREAM, GateSpec, Options, RuleContext, Streams, get_rule

__all__ = ["Analysis", "analyze", "relevance_row", "NON_VALUE_OPS"]

# Ops whose output depends on their input's shape or dtype only, never on its values (§9.1).
NON_VALUE_OPS = frozenset({
    "aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default",
    "aten.empty_like.default", "aten.new_zeros.default", "aten.new_ones.default",
    "aten.new_full.default", "aten.new_empty.default", "aten.empty_permuted.default",
    "aten.sym_size.int", "aten.scalar_tensor.default",
})
# Ops whose argument 1 is an index into a constant table: integer ids there carry token relevance.
EMBEDDING_OPS = frozenset({"aten.embedding.default", "aten._embedding_bag.default",
                           "aten._embedding_bag_forward_only.default"})
# Normalisation statistics (§9.4): a written-out norm x * rsqrt(mean(x^2) + eps) is identity for x;
# the statistics branch carries no relevance.
STATISTIC_OPS = frozenset({"aten.rsqrt.default"})
# Ops through which a softmax output is still "the attention probabilities" (§9.8).
_PROBS_PASS = frozenset({
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.expand.default",
    "aten.clone.default", "aten._to_copy.default", "aten.alias.default", "aten.contiguous.default",
    "aten.dropout.default", "aten.to.dtype", "aten.type_as.default"})
_SOFTMAX = frozenset({"aten.softmax.int", "aten._softmax.default"})
_PRODUCTS = frozenset({"aten.matmul.default", "aten.bmm.default", "aten.mm.default"})


@dataclass
class Analysis:
    carries: set = field(default_factory=set)          # Vars that carry relevance
    tokens: set = field(default_factory=set)           # integer Vars carrying token relevance
    gates: dict = field(default_factory=dict)          # eqn index -> GateSpec
    info: dict = field(default_factory=dict)           # eqn index -> static facts for the rule
    problems: list = field(default_factory=list)       # UnsupportedOp entries
    head: Optional[str] = None                         # "softmax"/"sigmoid" when an output is one

    def raise_if_unsupported(self) -> None:
        if self.problems:
            raise UnsupportedOperationError(self.problems)


def _hint(op: str) -> str:
    short = op.split(".")[1] if op.count(".") >= 2 else op
    return (f"no relevance rule for '{short}'; it would have to pass relevance with no DLB "
            "semantics, so dlbjax refuses. Replace it with a supported layer, detach it from the "
            "explained path, or register a rule (dlbjax.rules.register).")


def analyze(program: Program, options: Options, explained: int = 0) -> Analysis:
    """Static facts the relevance pass needs, plus every unsupported op of the model.

    Only ops on a path from a relevance-carrying input to the explained output carry relevance;
    side branches (a mask computed from the input, an auxiliary output) are plain forward code
    and need no rule."""
    an = Analysis()
    an.problems.extend(missing_lowerings(program))
    consumers = program.consumers()

    # integer vars that reach an embedding's index operand through exact index maps
    for eqn in reversed(program.eqns):
        rule = get_rule(eqn.op)
        if eqn.op in EMBEDDING_OPS and len(eqn.args) > 1 and isinstance(eqn.args[1], Var):
            an.tokens.add(eqn.args[1])
        elif rule is not None and rule.route and any(o in an.tokens for o in eqn.outputs):
            an.tokens.update(v for v in eqn.inputs if not v.is_float)

    an.carries.update(v for v in program.inputs if v.is_float or v in an.tokens)
    an.tokens &= an.carries | {o for e in program.eqns for o in e.outputs}
    routing_stops = set() if options.router_relevance else ROUTING_OPS
    stabilizers = _softmax_stabilizers(program)
    for eqn in program.eqns:
        if eqn.op in NON_VALUE_OPS or eqn.op in STATISTIC_OPS or eqn.op in routing_stops or \
                eqn in stabilizers or not any(v in an.carries for v in eqn.inputs):
            continue
        rule = get_rule(eqn.op)
        idx = rule.outputs if rule is not None and rule.outputs is not None else range(len(eqn.outputs))
        for i in idx:
            v = eqn.outputs[i]
            if v.is_float or (v in an.tokens and rule is not None and rule.route):
                an.carries.add(v)
    # keep only what relevance can reach walking back from the explained output
    live = {program.outputs[explained]} & an.carries
    for eqn in reversed(program.eqns):
        if any(o in live for o in eqn.outputs):
            live.update(v for v in eqn.inputs if v in an.carries)
    an.carries &= live | set(program.inputs)
    an.tokens = {v for v in an.tokens if v in an.carries}

    seen = set()
    for i, eqn in enumerate(program.eqns):
        if not any(o in an.carries for o in eqn.outputs):
            continue
        rule = get_rule(eqn.op)
        reason = None
        if rule is None:
            reason = _hint(eqn.op)
        elif any(v in an.carries for v in iter_vars(eqn.kwargs)):
            reason = "a relevance-carrying tensor is passed as a keyword argument; not supported"
        elif rule.check is not None:
            reason = rule.check(_carry_mask(eqn.args, an.carries))
        if reason and (eqn.op, eqn.source.module_path, reason) not in seen:
            seen.add((eqn.op, eqn.source.module_path, reason))
            an.problems.append(UnsupportedOp(eqn.op, eqn.source.module_path, eqn.source.module_type,
                                             reason))

    # activation gating: the activation that directly and solely consumes an affine output (§8.1)
    outputs = list(program.outputs)
    for i, eqn in enumerate(program.eqns):
        rule = get_rule(eqn.op)
        if rule is None or not rule.affine or eqn.outputs[0] not in an.carries:
            continue
        if sum(1 for a in eqn.inputs if a in an.carries) != 1:
            continue  # a product of two activations is not an affine unit: nothing gates it
        v = eqn.outputs[0]
        uses = consumers.get(v, [])
        if len(uses) + outputs.count(v) != 1 or not uses:
            continue
        crule = get_rule(uses[0].op)
        if crule is not None and crule.gate is not None:
            spec = crule.gate(uses[0].args, uses[0].kwargs, options)
            if spec is not None:
                an.gates[i] = spec

    producers = program.producers()
    for i, eqn in enumerate(program.eqns):
        if eqn.op in _PRODUCTS and all(isinstance(a, Var) and a in an.carries for a in eqn.args[:2]):
            for k in (0, 1):
                if _is_softmax_output(eqn.args[k], producers):
                    an.info[i] = {"attention": k}
                    break
    heads = set()
    for v in program.outputs:
        p = producers.get(v)
        if p is not None and p.op in ("aten.softmax.int", "aten._softmax.default"):
            heads.add("softmax")
        elif p is not None and p.op == "aten.sigmoid.default":
            heads.add("sigmoid")
    an.head = heads.pop() if len(heads) == 1 else None
    return an


_MAX_OPS = frozenset({"aten.max.dim", "aten.amax.default"})


def _softmax_stabilizers(program: Program) -> set:
    """``m = max(x, dim, keepdim)`` used as ``x - m`` (the shift that softmax is invariant to, as
    in attention with sinks): m is a constant for relevance, x keeps everything."""
    consumers = program.consumers()
    found = set()
    for eqn in program.eqns:
        if eqn.op not in _MAX_OPS or not isinstance(eqn.args[0], Var):
            continue
        m, x = eqn.outputs[0], eqn.args[0]
        for c in consumers.get(m, []):
            if c.op in ("aten.sub.Tensor",) and len(c.args) > 1 and c.args[1] is m and c.args[0] is x:
                found.add(eqn)
    return found


def _is_softmax_output(var, producers) -> bool:
    seen = 0
    while seen < 16:
        p = producers.get(var)
        if p is None:
            return False
        if p.op in _SOFTMAX:
            return True
        if p.op not in _PROBS_PASS or not p.args or not isinstance(p.args[0], Var):
            return False
        var, seen = p.args[0], seen + 1
    return False


def _carry_mask(args, carries):
    out = []
    for a in args:
        if isinstance(a, Var):
            out.append(a in carries)
        elif isinstance(a, (list, tuple)):
            out.append([isinstance(x, Var) and x in carries for x in a])
        else:
            out.append(False)
    return tuple(out)


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


def _call_rule(rule, options: Options, ctx_args: dict, R, args, kwargs):
    """Run the default or contrastive rule; returns (per-arg results, absorbed per stream)."""
    if not options.contrastive:
        ctx = RuleContext(options=options, **ctx_args)
        return rule.default(ctx, R, *args, **kwargs), [_total(ctx.absorbed)]
    if rule.contrastive is PER_STREAM:
        results, absorbed = [], []
        for s in range(2):
            Rs = tuple(None if r is None else r[s] for r in R) if isinstance(R, tuple) and not \
                isinstance(R, Streams) else R[s]
            ctx = RuleContext(options=options, **ctx_args)
            results.append(rule.default(ctx, Rs, *args, **kwargs))
            absorbed.append(_total(ctx.absorbed))
        return _zip_streams(results[0], results[1]), absorbed
    ctx = RuleContext(options=options, **ctx_args)
    res = rule.contrastive(ctx, R, *args, **kwargs)
    tot = [0.0, 0.0]
    for a in ctx.absorbed:
        tot = [tot[0] + jnp.sum(a.positive), tot[1] + jnp.sum(a.negative)]
    return res, tot


def _total(amounts):
    return sum((jnp.sum(a) for a in amounts), jnp.zeros((), relevance_dtype()))


def _zip_streams(a, b):
    if a is None and b is None:
        return None
    if isinstance(a, (list, tuple)) and not isinstance(a, Streams):
        return type(a)(_zip_streams(x, y) for x, y in zip(a, b))
    return Streams(a, b)


def _relevance_call(eqn: Eqn, index: int, env: dict, an: Analysis, options: Options, sink,
                    n_streams: int, magnitudes: Optional[dict] = None) -> tuple:
    """Apply one relevance-carrying equation through a custom_vjp wrapping its rule."""
    rule = get_rule(eqn.op)
    gate: Optional[GateSpec] = an.gates.get(index)
    info = an.info.get(index, {})
    flat = _Flat()
    args_val = substitute(eqn.args, env)
    kwargs_val = substitute(eqn.kwargs, env)
    spec_args = [flat.encode(a) for a in args_val]
    spec_kwargs = flat.encode(kwargs_val)
    sink_idx = flat.push(sink)
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
        ctx_args = dict(carries=carries, outputs=tuple(outs), gate=gate, op=eqn.op, where=where,
                        info=info, magnitudes={p: leaves[j] for p, j in mag_idx.items()})
        results, absorbed = _call_rule(rule, options, ctx_args, R, args, kwargs)
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
# One example
# ------------------------------------------------------------------------------------------------
def relevance_row(program: Program, an: Analysis, options: Options, consts: dict, inputs: tuple,
                  seed_fn: Callable, *, explained: int = 0, layers: bool = False,
                  taps: tuple = (), probes: tuple = (), magnitudes: Optional[dict] = None) -> dict:
    """Forward + seed + VJP for one example. ``inputs`` has one array per program input.

    ``seed_fn(prediction, inputs_by_name) -> (seeds, target)`` builds the seed (a tuple with one array per stream)
    from the explained output's value. Returns a dict of JAX arrays: ``outputs`` (all model
    outputs), ``relevance`` (name -> tuple of per-stream maps, zeros for inputs that carry none),
    ``absorbed`` ([streams]), ``seed`` ([streams] totals), ``target`` and, with ``layers``, the
    relevance at every relevance-carrying intermediate variable.
    """
    S = 2 if options.contrastive else 1
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

    def fwd(float_in, token_in, sink, taps):
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
            env[c] = consts[c.name]
        for i, eqn in enumerate(program.eqns):
            if any(o in an.carries for o in eqn.outputs):
                outs = _relevance_call(eqn, i, env, an, options, sink, S, magnitudes)
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
        probe_values = {v.name: _primal(env[v]) for v in env if v.name in probe_set}
        return tuple(env[v].streams if isinstance(env[v], _Carried) else env[v]
                     for v in program.outputs), probe_values

    probe_set = set(probes)
    outs, vjp, probe_values = jax.vjp(fwd, float_in, token_in, sink, taps, has_aux=True)
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
    g_float, g_token, g_sink, g_taps = vjp(tuple(cts))

    relevance = {}
    for v, x in zip(program.inputs, inputs):
        if v.name in g_float:
            relevance[v.name] = tuple(g_float[v.name])
        elif v.name in g_token:
            relevance[v.name] = tuple(g_token[v.name])
        else:
            relevance[v.name] = tuple(jnp.zeros(v.shape, relevance_dtype()) for _ in range(S))
    seed_total = jnp.stack([jnp.sum(s) for s in seeds])
    result = {
        "outputs": tuple(o[0] if v in an.carries else o for v, o in zip(program.outputs, outs)),
        "prediction": prediction,
        "target": target,
        "relevance": relevance,
        "absorbed": g_sink,
        "seed": seed_total,
        "input_total": jnp.stack([sum(jnp.sum(r[s]) for r in relevance.values()) for s in range(S)]),
    }
    if layers or taps:
        result["layers"] = {k: tuple(v) for k, v in g_taps.items()}
    if probes:
        result["probes"] = probe_values
    return result
