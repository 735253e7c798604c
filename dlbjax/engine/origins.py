"""Where relevance at constants goes: the learned tensors (and other constants) that index maps
copy into the relevance-carrying stream, named for the conservation report.

A learned tensor concatenated or written into the stream (ViT's class token, register tokens, a
learned query, a constant padding value) receives relevance through the exact index map that
places it (``cat``, ``where``, ``slice_scatter``, ``expand``, ...). That relevance is not lost:
:func:`constant_slots` finds, statically, every float operand of a relevance-carrying index map
that carries no relevance itself, and names it by the constant it was copied from (walking back
through index maps: ``expand(cls_token)`` is ``cls_token``), or by its producing module and
variable when it is computed. Positions an index map fills with a Python number (``pad``,
``masked_fill``, ``where`` with a scalar) are booked under :data:`FILL`.

Affine biases and constant addends keep what the spec calls the bias share (§2.5); they stay in
``conservation.bias``.
"""

from __future__ import annotations

from dlbjax.engine.analysis import Analysis
from dlbjax.ir import Program, Var
from dlbjax.rules import get_rule
from dlbjax.rules.shape import route

__all__ = ["FILL", "FILL_OPS", "constant_slots"]

FILL = "(constant fill values)"
# index maps that can write Python numbers into their output
FILL_OPS = frozenset({"aten.constant_pad_nd.default", "aten.masked_fill.Scalar",
                      "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar"})


def _is_route(op: str, method: str) -> bool:
    rule = get_rule(op, method)
    return rule is not None and rule.default is route


def constant_slots(program: Program, an: Analysis, method: str):
    """(names, slots): ``names`` the report's keys in first-use order (FILL last when used);
    ``slots`` maps ``(equation index, argument path)`` to a key index, the path being ``(p,)`` or
    ``(p, j)`` for element j of a list argument p."""
    producer = {o: e for e in program.eqns for o in e.outputs}
    constants = set(program.constants)
    origin_cache: dict = {}

    def origin(v: Var) -> str:
        if v in origin_cache:
            return origin_cache[v]
        if v in constants:
            name = v.name
        else:
            e = producer.get(v)
            floats = [a for a in (e.inputs if e is not None else ()) if a.is_float]
            if e is not None and _is_route(e.op, method) and len(floats) == 1:
                name = origin(floats[0])
            else:
                path = e.source.module_path if e is not None else ""
                name = f"{path}/{v.name}" if path else v.name
        origin_cache[v] = name
        return name

    names: list = []
    slots: dict = {}

    def key(name):
        if name not in names:
            names.append(name)
        return names.index(name)

    fills = False
    for i, eqn in enumerate(program.eqns):
        if not any(o in an.carries for o in eqn.outputs) or not _is_route(eqn.op, method):
            continue
        for p, a in enumerate(eqn.args):
            items = [((p, j), x) for j, x in enumerate(a)] if isinstance(a, (list, tuple)) \
                else [((p,), a)]
            for path, x in items:
                if isinstance(x, Var) and x.is_float and x not in an.carries:
                    slots[(i, path)] = key(origin(x))
        fills = fills or eqn.op in FILL_OPS
    if fills:
        names.append(FILL)
    return tuple(names), slots
