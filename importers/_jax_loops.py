"""Control flow of the JAX importer (``importers/_jax.py``): ``scan``, ``while``, ``cond``, and
the index maps a recurrent model reads: ``slice`` / ``split`` (a cell's gate split) and
``stack`` / ``concatenate`` (``aten.slice.Tensor``, ``aten.stack.default``, ``aten.cat.default``).

- ``scan`` has a static length: it is unrolled, its body jaxpr run ``length`` times with the carry
  threaded through. An activation ``xs`` is sliced per step with ``aten.select.int`` along axis 0
  (a constant ``xs`` on the host); the per-step ``ys`` are stacked with ``aten.stack.default``
  (both index maps with a lowering and a relevance rule). ``reverse=True`` runs the steps from the
  last to the first and puts each step's ``ys`` back at its own position. The scan's consts (the
  parameters) stay folded, so a dense kernel read in the body still becomes ``aten.linear``.
- ``while`` is unrolled when its trip count is static: the condition is evaluated on the host at
  each step (a counter carried from a literal, a bound from constants or parameters, as
  ``fori_loop`` with non-literal bounds lowers). A condition computed from the inputs is
  data-dependent control flow and is reported as unsupported.
- ``cond`` (``lax.cond`` / ``lax.switch``) with a folded predicate or index takes that branch;
  one computed from the inputs is reported as unsupported.

The unsupported cases are reported through ``_Translator.unsupported``, so
:class:`dlbjax.UnsupportedOperationError` names the primitive (``while``, ``cond``) with its name
stack and a hint saying why; no :mod:`dlbjax._errors` subclass is more fitting (the model is
traceable; it is the explanation of an input-dependent branch that does not exist).
"""

from __future__ import annotations

import numpy as np

from dlbjax.ir import Var

from . import _jax as _J

__all__ = ["p_scan", "p_while", "p_cond", "p_slice", "p_split", "p_stack", "p_concatenate",
           "attach"]

MAX_TRIPS = 100_000  # a while loop unrolled further than this is reported, not unrolled

_COND_HINT = ("data-dependent control flow: cond on a value computed from the inputs cannot be "
              "explained; the branch taken would differ between inputs and relevance cannot "
              "flow through a branch choice. Compute both branches and combine them "
              "arithmetically (e.g. m * a + (1 - m) * b with a constant m), or make the predicate "
              "a constant (a parameter or a Python value)")
_WHILE_HINT = ("data-dependent control flow: a while loop whose bound is computed from the inputs "
               "cannot be explained (its trip count would differ between inputs); use a static "
               "trip count (lax.scan with length=, or fori_loop with bounds that are Python ints "
               "or parameters)")


def _snapshot(t):
    return (len(t.eqns), len(t.constants), dict(t.const_values), dict(t.const_kinds),
            dict(t.const_cache), dict(t.relaid_cache), len(t.problems), t.counter, t.pending)


def _restore(t, snap):
    n_eq, n_c, values, kinds, cache, relaid, n_p, counter, pending = snap
    del t.eqns[n_eq:]
    del t.constants[n_c:]
    t.const_values.clear()
    t.const_values.update(values)
    t.const_kinds.clear()
    t.const_kinds.update(kinds)
    t.const_cache.clear()
    t.const_cache.update(cache)
    t.relaid_cache.clear()
    t.relaid_cache.update(relaid)
    del t.problems[n_p:]
    t.counter = counter
    t.pending = pending


def _closed(c):
    return getattr(c, "jaxpr", c), getattr(c, "consts", ())


def _step_slice(t, x, i, where):
    if isinstance(x, _J._Folded):
        return _J._Folded(x.value[i], x.origin)
    return t.emit("aten.select.int", (x, 0, int(i)), {}, x.shape[1:], x.dtype, where)


def _stack(t, pieces, aval, where):
    if all(isinstance(p, _J._Folded) for p in pieces):
        return _J._Folded(np.stack([p.value for p in pieces]))
    vs = [t.as_var(p) for p in pieces]
    return t.emit("aten.stack.default", (vs, 0), {}, aval.shape, aval.dtype, where)


def p_scan(self, e, ins, params, out, where, counts):
    """``lax.scan``: unrolled over its static ``length`` (module docstring)."""
    jaxpr, consts = _closed(params["jaxpr"])
    n_consts, n_carry = int(params["num_consts"]), int(params["num_carry"])
    length, reverse = int(params["length"]), bool(params["reverse"])
    body_consts, carry, xs = ins[:n_consts], list(ins[n_consts:n_consts + n_carry]), \
        ins[n_consts + n_carry:]
    n_ys = len(e.outvars) - n_carry
    ys: list = [[None] * length for _ in range(n_ys)]
    # the body's own closed-over consts come first in its constvars, then its invars
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for i in steps:
        xi = [_step_slice(self, x, i, where) for x in xs]
        outs = self.run(jaxpr, consts, list(body_consts) + carry + xi, where)
        carry = list(outs[:n_carry])
        for k, y in enumerate(outs[n_carry:]):
            ys[k][i] = y
    stacked = [_stack(self, ys[k], e.outvars[n_carry + k].aval, where) for k in range(n_ys)]
    return carry + stacked


def _host_bool(v):
    return bool(np.asarray(v.value).reshape(-1)[0])


def p_while(self, e, ins, params, out, where, counts):
    """``lax.while_loop`` with a static trip count: unrolled (module docstring)."""
    cj, cconsts = _closed(params["cond_jaxpr"])
    bj, bconsts = _closed(params["body_jaxpr"])
    nc, nb = int(params["cond_nconsts"]), int(params["body_nconsts"])
    c_args, b_args, carry = ins[:nc], ins[nc:nc + nb], list(ins[nc + nb:])
    trips = 0
    while True:
        snap = _snapshot(self)
        (pred,) = self.run(cj, cconsts, list(c_args) + carry, where)
        _restore(self, snap)
        if not isinstance(pred, _J._Folded):
            return self.unsupported(e, where, _WHILE_HINT)
        if not _host_bool(pred):
            return carry
        trips += 1
        if trips > MAX_TRIPS:
            return self.unsupported(e, where, f"a while loop of more than {MAX_TRIPS} steps")
        carry = list(self.run(bj, bconsts, list(b_args) + carry, where))


def p_cond(self, e, ins, params, out, where, counts):
    """``lax.cond`` / ``lax.switch`` with a folded index: that branch, inlined."""
    index, operands = ins[0], ins[1:]
    if not isinstance(index, _J._Folded):
        return self.unsupported(e, where, _COND_HINT)
    branches = params["branches"]
    k = int(np.clip(int(np.asarray(index.value).reshape(-1)[0]), 0, len(branches) - 1))
    jaxpr, consts = _closed(branches[k])
    return self.run(jaxpr, consts, list(operands), where)


def p_slice(self, e, ins, params, out, where, counts):
    """``lax.slice`` (static start/limit/strides): one ``aten.slice.Tensor`` per sliced axis."""
    x = self.as_var(ins[0])
    starts, limits = params["start_indices"], params["limit_indices"]
    strides = params.get("strides") or (1,) * len(starts)
    shape = list(x.shape)
    for d, (s, lim, st) in enumerate(zip(starts, limits, strides)):
        if (int(s), int(lim), int(st)) == (0, shape[d], 1):
            continue
        shape[d] = len(range(int(s), int(lim), int(st)))
        x = self.emit("aten.slice.Tensor", (x, d, int(s), int(lim), int(st)), {}, shape,
                      x.dtype, where)
    return [x]


def p_split(self, e, ins, params, out, where, counts):
    """``lax.split`` (``jnp.split``): one ``aten.slice.Tensor`` per piece."""
    x = self.as_var(ins[0])
    axis = int(params["axis"]) % len(x.shape)
    outs, start = [], 0
    for v, size in zip(e.outvars, params["sizes"]):
        size = int(size)
        shape = list(x.shape)
        shape[axis] = size
        outs.append(self.emit("aten.slice.Tensor", (x, axis, start, start + size, 1), {}, shape,
                              x.dtype, where))
        start += size
    return outs


def p_stack(self, e, ins, params, out, where, counts):
    """``jnp.stack``: ``aten.stack.default``."""
    vs = [self.as_var(x) for x in ins]
    return [self.emit("aten.stack.default", (vs, int(params["axis"])), {}, out.shape, out.dtype,
                      where)]


def p_concatenate(self, e, ins, params, out, where, counts):
    """``jnp.concatenate``: ``aten.cat.default``."""
    vs = [self.as_var(x) for x in ins]
    return [self.emit("aten.cat.default", (vs, int(params["dimension"])), {}, out.shape,
                      out.dtype, where)]


def _keep_alive(constant):
    """``_Translator.constant`` caches a constant by ``id(folded)`` without holding ``folded``:
    once a temporary value (a folded bias, a step's constant slice) is freed, a later value can
    reuse its id and be handed the wrong constant. Unrolled loops make many such temporaries;
    this keeps every value given a constant alive for the translator's lifetime."""
    if getattr(constant, "_keeps_alive", False):
        return constant

    def wrapped(self, folded, name=None):
        self.__dict__.setdefault("_alive", []).append(folded)
        return constant(self, folded, name)

    wrapped._keeps_alive = True
    wrapped.__doc__ = constant.__doc__
    return wrapped


def attach(cls):
    """Give ``cls`` (``_Translator``) these handlers; one it already has is kept."""
    cls.constant = _keep_alive(cls.constant)
    for name in ("p_scan", "p_while", "p_cond", "p_slice", "p_split", "p_stack",
                 "p_concatenate"):
        if not hasattr(cls, name):
            setattr(cls, name, globals()[name])
