"""The static analysis of a program before its relevance pass is compiled.

:func:`analyze` decides which variables carry relevance (spec §9.1), which activation gates which
affine op (§8.1), which products are attention's ``A V`` (§9.8), whether the model ends in a
softmax or sigmoid head (§8.5), and lists every op that lacks a lowering or a rule, all at once.
It asks the lowering table for operator facts (:class:`dlbjax.lowerings.Kind`) and the rule
registry for the rules of ``options.method``; it keeps no op names of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dlbjax._errors import UnsupportedOp, UnsupportedOperationError
from dlbjax.engine.interpret import missing_lowerings
from dlbjax.ir import Program, Var, iter_vars
from dlbjax.lowerings import Kind, is_kind
from dlbjax.rules import DLB, Options, get_rule

__all__ = ["Analysis", "analyze"]

_PROBS_DEPTH = 16  # how many transparent ops may sit between a softmax and the product


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


def _hint(op: str, method: str = DLB) -> str:
    short = op.split(".")[1] if op.count(".") >= 2 else op
    if method != DLB and get_rule(op, DLB) is not None:
        return (f"method {method!r} has no relevance rule for '{short}' (DLB has one, which "
                "belongs to DLB's semantics, so it is not borrowed): use method='dlb', another "
                "method that covers it, or register a rule for it "
                f"(dlbjax.rules.register(..., method={method!r}))")
    return (f"no relevance rule for '{short}'; it would have to pass relevance with no DLB "
            "semantics, so dlbjax refuses. Replace it with a supported layer, detach it from the "
            "explained path, or register a rule (dlbjax.rules.register).")


def _cut_off(program: Program, out: Var, carries: set, stops) -> UnsupportedOp:
    """Why no relevance can reach the inputs from the explained output ``out``: the first op on
    its way back that takes a relevance-carrying value but passes none on (a normalisation
    statistic such as a vector norm, or a shape query), or the op producing a constant output."""
    producer = {o: e for e in program.eqns for o in e.outputs}
    todo, seen = [out], set()
    while todo:
        v = todo.pop()
        e = producer.get(v)
        if e is None or v in seen:
            continue
        seen.add(v)
        if _has_any(e.op, stops) and any(a in carries for a in e.inputs):
            return UnsupportedOp(
                e.op, e.source.module_path, e.source.module_type,
                "the explained output depends on the inputs only through this op, which carries "
                "no relevance (a normalisation statistic or a shape query, spec §9.1, §9.4), so "
                "nothing could reach the inputs; explain an output computed from the values")
        todo.extend(e.inputs)
    e = producer.get(out)
    return UnsupportedOp(
        e.op if e is not None else "<input>", e.source.module_path if e is not None else "",
        e.source.module_type if e is not None else "",
        "the explained output does not depend on any float input, so no relevance can reach "
        "the inputs; pick another output")


def analyze(program: Program, options: Options, explained: int = 0) -> Analysis:
    """Static facts the relevance pass needs, plus every unsupported op of the model.

    Only ops on a path from a relevance-carrying input to the explained output carry relevance;
    side branches (a mask computed from the input, an auxiliary output) are plain forward code
    and need no rule."""
    an = Analysis()
    an.problems.extend(missing_lowerings(program))
    consumers = program.consumers()
    eqns = program.eqns

    # integer vars that reach an embedding's index operand through exact index maps
    for i in reversed(range(len(eqns))):
        eqn = eqns[i]
        rule = options.rule(i, eqn.op)
        if is_kind(eqn.op, Kind.INDEX_TABLE) and len(eqn.args) > 1 and isinstance(eqn.args[1], Var):
            an.tokens.add(eqn.args[1])
        elif rule is not None and rule.route and any(o in an.tokens for o in eqn.outputs):
            an.tokens.update(v for v in eqn.inputs if not v.is_float)

    an.carries.update(v for v in program.inputs if v.is_float or v in an.tokens)
    an.tokens &= an.carries | {o for e in program.eqns for o in e.outputs}
    stops = Kind.NON_VALUE | Kind.STATISTIC
    stabilizers = _softmax_stabilizers(program)
    for i, eqn in enumerate(eqns):
        if _has_any(eqn.op, stops) or (not options.router_relevance and is_kind(eqn.op, Kind.ROUTER)) \
                or eqn in stabilizers or not any(v in an.carries for v in eqn.inputs):
            continue
        rule = options.rule(i, eqn.op)
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
    # an explained output that no relevance can reach (a model without any relevance-carrying
    # input is reported by the dtype check instead)
    if not live and any(v in an.carries for v in program.inputs):
        an.problems.append(_cut_off(program, program.outputs[explained], an.carries, stops))

    seen = set()
    for i, eqn in enumerate(program.eqns):
        if not any(o in an.carries for o in eqn.outputs):
            continue
        rule = options.rule(i, eqn.op)
        reason = None
        if rule is None:
            reason = _hint(eqn.op, options.method)
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
    position = {id(e): i for i, e in enumerate(eqns)}
    for i, eqn in enumerate(program.eqns):
        rule = options.rule(i, eqn.op)
        if rule is None or not rule.affine or eqn.outputs[0] not in an.carries:
            continue
        if sum(1 for a in eqn.inputs if a in an.carries) != 1:
            continue  # a product of two activations is not an affine unit: nothing gates it
        v = eqn.outputs[0]
        uses = consumers.get(v, [])
        if len(uses) + outputs.count(v) != 1 or not uses:
            continue
        crule = options.rule(position[id(uses[0])], uses[0].op)
        if crule is not None and crule.gate is not None:
            spec = crule.gate(uses[0].args, uses[0].kwargs, options)
            if spec is not None:
                an.gates[i] = spec

    producers = program.producers()
    for i, eqn in enumerate(program.eqns):
        if is_kind(eqn.op, Kind.MATMUL) and \
                all(isinstance(a, Var) and a in an.carries for a in eqn.args[:2]):
            for k in (0, 1):
                if _is_softmax_output(eqn.args[k], producers):
                    an.info[i] = {"attention": k}
                    break
    heads = set()
    for v in program.outputs:
        p = producers.get(v)
        if p is not None and is_kind(p.op, Kind.SOFTMAX):
            heads.add("softmax")
        elif p is not None and is_kind(p.op, Kind.SIGMOID):
            heads.add("sigmoid")
    an.head = heads.pop() if len(heads) == 1 else None
    return an


def _has_any(op: str, kinds: Kind) -> bool:
    return any(is_kind(op, k) for k in kinds)


def _softmax_stabilizers(program: Program) -> set:
    """``m = max(x, dim, keepdim)`` used as ``x - m`` (the shift that softmax is invariant to, as
    in attention with sinks): m is a constant for relevance, x keeps everything."""
    consumers = program.consumers()
    found = set()
    for eqn in program.eqns:
        if not is_kind(eqn.op, Kind.MAX) or not isinstance(eqn.args[0], Var):
            continue
        m, x = eqn.outputs[0], eqn.args[0]
        for c in consumers.get(m, []):
            if is_kind(c.op, Kind.SUBTRACT) and len(c.args) > 1 and c.args[1] is m and c.args[0] is x:
                found.add(eqn)
    return found


def _is_softmax_output(var, producers) -> bool:
    seen = 0
    while seen < _PROBS_DEPTH:
        p = producers.get(var)
        if p is None:
            return False
        if is_kind(p.op, Kind.SOFTMAX):
            return True
        if not is_kind(p.op, Kind.TRANSPARENT) or not p.args or not isinstance(p.args[0], Var):
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
