"""Runs of structurally identical layers, so that a deep model compiles as one ``lax.scan``.

A transformer's forward, once imported, is its layers written out one after another: the same
equations with the same shapes, parameters and analysis facts, each layer reading the previous
layer's outputs and its own weights. Unrolled, every layer adds its equations to the traced and
compiled program (build + first call grew ~0.9 s per layer). :func:`find_runs` finds, statically,
each run of ``count >= min_count`` consecutive blocks of ``period`` equations such that

* equation ``j`` of every block has the same op, literals, variable types, analysis facts (which
  values carry relevance, which are token ids, gates, attention info), rule choice (method and
  parameters, composites included) and |W| availability: only the constant weights differ;
* block ``k+1`` reads block ``k``'s outputs only through fixed *carry slots* (equation ``j``,
  output ``o``), block 0 reads one variable defined before the run in each slot, and everything
  else a block reads is either its own constant (stacked along the scan) or the same variable
  defined before the run for every block (the attention mask, rotary cos/sin, a shared weight);
* nothing computed inside the run is read after it except the last block's carry slots.

A period of several layers (alternating sliding/full attention) is found as a longer period.
The engine lowers each :class:`Run` as one ``jax.lax.scan`` over its weights, stacked
(:func:`stack_weights`, when the copy is small) or read in place (:func:`scan_weights`), in the
forward (``engine/interpret.py``) and in the relevance pass
(``engine/relevance.py``, where scan's own transpose carries relevance back through the
custom_vjp-wrapped rules of the body). ``barriers`` are equation indices that must stay unrolled
(equations whose rules book relevance at named constants, ``engine/origins.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp

from dlbjax.ir import Eqn, Program, Var

__all__ = ["Run", "find_runs", "stack_weights", "weight_key", "scan_weights", "MIN_COUNT"]

MIN_COUNT = 3  # scan_layers="auto": fewer identical blocks are not worth a scan
_CHECKS = 2000  # most dataflow checks of candidate runs per program (each is linear in it)


@dataclass(frozen=True, eq=False)
class Run:
    """``count`` blocks of ``period`` equations from equation ``start``.

    The scan body is block 1 (``template``: the equation indices ``start + period ...``); per
    carry slot: ``init`` the variable block 0 reads, ``body_in`` the variable block 1 reads
    (block 0's output), ``body_out`` block 1's output, ``final`` the last block's output.
    ``weights``: per stacked constant, block 1's variable and the variables of all blocks in
    order."""

    start: int
    period: int
    count: int
    init: tuple
    body_in: tuple
    body_out: tuple
    final: tuple
    weights: tuple  # ((template Var, (Var of block 0, ..., Var of block count-1)), ...)

    @property
    def stop(self) -> int:
        return self.start + self.period * self.count

    @property
    def template(self) -> range:
        return range(self.start + self.period, self.start + 2 * self.period)

    def __repr__(self) -> str:
        return f"Run(start={self.start}, period={self.period}, count={self.count})"


def weight_key(run: Run, var: Var) -> str:
    """The key of a stacked weight in the constants passed to the compiled pass."""
    return f"<scan@{run.start}>{var.name}"


def stack_weights(runs, consts: dict, mags: Optional[dict] = None):
    """(consts, mags) for a scanned pass: each run's per-block weights stacked along a new axis 0
    under :func:`weight_key` (|W| stacked alike where every block has one), the per-block
    entries dropped (a stacked weight is read by its run only, :func:`find_runs` checks)."""
    consts, mags = dict(consts), dict(mags or {})
    for run in runs:
        for tv, blocks in run.weights:
            key = weight_key(run, tv)
            consts[key] = jnp.stack([consts.pop(v.name) for v in blocks])
            if all(v.name in mags for v in blocks):
                mags[key] = jnp.stack([mags.pop(v.name) for v in blocks])
    return consts, mags


def scan_weights(run: Run, consts, mags: Optional[dict] = None):
    """How a scan over ``run`` reads its weights: ``(xs, pick, in_place)``, or None when the
    constants hold neither form. ``pick(x)`` gives the body's (weights, |W| or None) per stacked
    constant of ``run.weights``, from the scanned slice ``x``.

    * Stacked (:func:`stack_weights` was applied): ``xs`` are the stacked arrays, sliced by scan.
    * In place (the per-block constants, as imported): ``xs`` is the block index and ``pick``
      selects block i's arrays with ``lax.switch``, so no stacked copy of the weights exists,
      neither held nor inside the call. The caller wraps the body in ``jax.checkpoint`` then:
      otherwise the VJP would save the picked weights of every step as residuals (a stacked copy
      again); with it the backward pass recomputes the block's forward
      (``benchmarks/bench_scan_weights.py``, RESULTS (l))."""
    mags = mags or {}
    keys = [weight_key(run, tv) for tv, _ in run.weights]
    if all(k in consts for k in keys):
        return ([consts[k] for k in keys], [mags.get(k) for k in keys]), (lambda x: x), False
    blocks = [vs for _, vs in run.weights]
    if not all(v.name in consts for vs in blocks for v in vs):
        return None
    with_m = [j for j, vs in enumerate(blocks) if all(v.name in mags for v in vs)]

    def branch(k):
        return (tuple(consts[vs[k].name] for vs in blocks),
                tuple(mags[blocks[j][k].name] for j in with_m))

    branches = [lambda k=k: branch(k) for k in range(run.count)]

    def pick(i):
        ws, ms = jax.lax.switch(i, branches)
        full = [None] * len(blocks)
        for j, m in zip(with_m, ms):
            full[j] = m
        return list(ws), full

    return jnp.arange(run.count), pick, True


# ------------------------------------------------------------------------------------------------
# Signatures
# ------------------------------------------------------------------------------------------------
def _lit(x: Any):
    """A hashable, exact key of a literal (float by repr, so 0.0 != -0.0 and nan == nan)."""
    if isinstance(x, bool) or x is None:
        return ("b", x)
    if isinstance(x, float):
        return ("f", repr(x))
    if isinstance(x, (int, str)):
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_lit(v) for v in x))
    if isinstance(x, dict):
        return ("d", tuple((k, _lit(v)) for k, v in x.items()))
    if hasattr(x, "eqns") and hasattr(x, "inputs") and hasattr(x, "output"):
        return _body_sig(x)
    try:
        hash(x)
        return ("h", type(x).__name__, x)
    except TypeError:
        return ("id", id(x))


def _body_sig(body) -> tuple:
    """A fused module's body up to renaming: its inputs by position, its own values by
    (equation, output)."""
    names = {v: ("in", k, v.shape, v.dtype) for k, v in enumerate(body.inputs)}
    out = []
    for j, e in enumerate(body.eqns):
        def ref(a, names=names):
            if isinstance(a, Var):
                return names.get(a, ("free", a.name))
            if isinstance(a, (list, tuple)):
                return (type(a).__name__, tuple(ref(v) for v in a))
            if isinstance(a, dict):
                return ("d", tuple((k, ref(v)) for k, v in a.items()))
            return _lit(a)
        out.append((e.op, ref(e.args), ref(e.kwargs),
                    tuple((v.shape, v.dtype) for v in e.outputs)))
        for o, v in enumerate(e.outputs):
            names[v] = ("loc", j, o, v.shape, v.dtype)
    return ("body", body.module_type, body.kind, body.gate, tuple(out), names[body.output])


def _structure(a, ref):
    if isinstance(a, Var):
        return ref(a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_structure(v, ref) for v in a))
    if isinstance(a, dict):
        return ("d", tuple((k, _structure(v, ref)) for k, v in a.items()))
    return _lit(a)


class _Facts:
    """Everything per equation that must agree between blocks, besides the dataflow."""

    def __init__(self, program: Program, an, options, mags, barriers):
        self.program, self.an, self.options = program, an, options
        self.mags = set(mags or ())
        self.barriers = set(barriers or ())
        self.consts = set(program.constants)

    def var_facts(self, v: Var) -> tuple:
        an = self.an
        return (v.shape, v.dtype, v in an.carries, v in an.tokens, v in self.consts,
                v.name in self.mags)

    def eqn_facts(self, i: int) -> tuple:
        if i in self.barriers:
            return ("barrier", i)
        e = self.program.eqns[i]
        an = self.an
        method, params = self.options.choice(i)
        return (e.op, _lit(method), _lit(tuple(params)), _lit(an.gates.get(i)),
                _lit(an.info.get(i)), tuple(self.var_facts(v) for v in e.outputs))

    def loose(self, i: int) -> tuple:
        """The equation's key without variable identities (candidate blocks)."""
        e = self.program.eqns[i]
        ref = self.var_facts
        return (self.eqn_facts(i), _structure(e.args, ref), _structure(e.kwargs, ref))


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------
def find_runs(program: Program, an, options, *, min_count: int = MIN_COUNT,
              mags: Optional[dict] = None, barriers=(), max_period: Optional[int] = None) -> list:
    """The runs of identical blocks (module docstring), non-overlapping, in program order; each
    with ``count >= max(2, min_count)``. Longest coverage first, then the shortest period."""
    min_count = max(2, int(min_count))
    eqns = program.eqns
    n = len(eqns)
    if n < 2 * min_count:
        return []
    facts = _Facts(program, an, options, mags, barriers)
    keys = [facts.loose(i) for i in range(n)]
    ids: dict = {}
    code = [ids.setdefault(k, len(ids)) for k in keys]
    producer = {v: i for i, e in enumerate(eqns) for v in e.outputs}
    consumers: dict = {}
    for i, e in enumerate(eqns):
        for v in e.inputs:
            consumers.setdefault(v, set()).add(i)
    outputs = set(program.outputs)
    max_period = min(n // min_count, max_period or n)

    candidates = []
    for L in range(1, max_period + 1):
        i = 0
        while i + L < n:
            if code[i] != code[i + L]:
                i += 1
                continue
            a = i
            while i + L < n and code[i] == code[i + L]:
                i += 1
            # eqns a .. i-1 equal the ones L later: blocks cover [a, i + L)
            if (i + L - a) // L >= min_count:
                candidates.append((a, i + L, L))
    # longest coverage first, then shortest period
    candidates.sort(key=lambda c: (-((c[1] - c[0]) // c[2]) * c[2], c[2], c[0]))
    taken: list = []
    runs = []
    budget = [_CHECKS]
    for a, b, L in candidates:
        if any(a < t1 and t0 < b for t0, t1 in taken):
            # the stretch overlaps a chosen run: keep the part before it, if any
            b = min([t0 for t0, t1 in taken if t0 >= a] + [b])
            if any(a < t1 and t0 < b for t0, t1 in taken) or (b - a) // L < min_count:
                continue
        run = None
        for s in range(a, min(a + L, b - min_count * L + 1)):
            if budget[0] <= 0:
                break  # a pathological program: stop looking, what is found stays
            run = _verify(program, facts, producer, consumers, outputs, s, L,
                          (b - s) // L, min_count, budget)
            if run is not None:
                break
        if run is not None:
            taken.append((run.start, run.stop))
            runs.append(run)
    return sorted(runs, key=lambda r: r.start)


def _verify(program, facts, producer, consumers, outputs, start, L, count, min_count, budget):
    """The longest valid run of up to ``count`` blocks of ``L`` equations from ``start``."""
    while count >= min_count and budget[0] > 0:
        budget[0] -= 1
        run = _check(program, facts, producer, consumers, outputs, start, L, count)
        if run is not None:
            return run
        count -= 1
    return None


def _check(program, facts, producer, consumers, outputs, start, L, count) -> Optional[Run]:
    eqns = program.eqns
    stop = start + L * count

    def sig(k):
        """Block k's per-equation references; weights by position, everything else by role."""
        base = start + k * L
        refs, weights = [], []

        def ref(v):
            p = producer.get(v)
            if p is not None and base <= p < base + L:
                return ("L", p - base, eqns[p].outputs.index(v))
            if p is not None and k > 0 and base - L <= p < base:
                return ("C", p - base + L, eqns[p].outputs.index(v))
            if p is not None and p >= start:
                return _OLD  # an older block's value
            if v in facts.consts:
                weights.append(v)
                return ("W", len(weights) - 1, v.shape, v.dtype)
            return ("X", v)  # defined before the run: shared, or block 0's carry input

        for j in range(L):
            e = eqns[base + j]
            refs.append(_structure(e.args, ref))
            refs.append(_structure(e.kwargs, ref))
        if any(r is _OLD for r in _flat(refs)):
            return None, None
        return refs, weights

    sigs = [sig(k) for k in range(count)]
    if any(s[0] is None for s in sigs):
        return None
    ref1, w1 = sigs[1]
    for k in range(2, count):
        if sigs[k][0] != ref1:
            return None
    # block 0: C slots of block 1 are block-0 externals (one var per slot), the rest equal
    init: dict = {}
    flat0, flat1 = _flat(sigs[0][0]), _flat(ref1)
    if len(flat0) != len(flat1):
        return None
    for r0, r1 in zip(flat0, flat1):
        if isinstance(r1, tuple) and r1 and r1[0] == "C":
            if not (isinstance(r0, tuple) and r0[0] == "X"):
                return None
            slot = (r1[1], r1[2])
            v0 = r0[1]
            if init.setdefault(slot, v0) is not v0:
                return None
            out = eqns[start + slot[0]].outputs[slot[1]]
            if facts.var_facts(v0)[:4] != facts.var_facts(out)[:4]:
                return None
        elif r0 != r1:
            return None
    if _strip(sigs[0][0]) != _strip(ref1):
        return None
    # per-position weights: a weight shared by every block is an invariant, not stacked
    nw = len(w1)
    if any(len(s[1]) != nw for s in sigs):
        return None
    weights = []
    for p in range(nw):
        blocks = tuple(s[1][p] for s in sigs)
        if len({v.name for v in blocks}) == 1:
            continue
        if len(set(blocks)) != count:
            return None  # one constant at two positions of a block, or repeated across blocks
        weights.append((w1[p], blocks))
    # stacked weights must not be read outside their position in the run
    stacked = {v for _, blocks in weights for v in blocks}
    for v in stacked:
        if any(not (start <= c < stop) for c in consumers.get(v, ())) or v in outputs:
            return None
    # dataflow out of each block: only the next block (through slots) or, for the last, after
    slots = sorted(init)
    for k in range(count):
        base = start + k * L
        for j in range(L):
            for o, v in enumerate(eqns[base + j].outputs):
                uses = consumers.get(v, set())
                inside = all(base <= c < base + 2 * L for c in uses)
                if k < count - 1:
                    if v in outputs or not inside:
                        return None
                    if any(c >= base + L for c in uses) and (j, o) not in init:
                        return None
                elif (v in outputs or any(c >= stop for c in uses)) and (j, o) not in init:
                    return None
    return Run(start=start, period=L, count=count,
               init=tuple(init[s] for s in slots),
               body_in=tuple(eqns[start + s[0]].outputs[s[1]] for s in slots),
               body_out=tuple(eqns[start + L + s[0]].outputs[s[1]] for s in slots),
               final=tuple(eqns[stop - L + s[0]].outputs[s[1]] for s in slots),
               weights=tuple(weights))


_OLD = ("old",)  # a reference to a value of a block before the previous one


def _flat(x) -> list:
    out = []

    def walk(a):
        if a is _OLD:
            out.append(a)
        elif isinstance(a, tuple) and a and a[0] in ("L", "C", "W", "X"):
            out.append(a)
        elif isinstance(a, tuple):
            for b in a:
                walk(b)
        elif isinstance(a, list):
            for b in a:
                walk(b)
        else:
            out.append(a)

    walk(x)
    return out


def _strip(x):
    """The references with block-0 carry inputs and block-1 carries made equal ('C'/'X' of a
    slot compared above), to compare the literal structure."""
    if isinstance(x, tuple) and x and x[0] in ("C", "X"):
        return ("ref",)
    if isinstance(x, (tuple, list)):
        return tuple(_strip(v) for v in x)
    return x
