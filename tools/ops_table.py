"""Print the README's "Supported operators" table, generated from the rule registry.

    python tools/ops_table.py            # print the markdown table
    python tools/ops_table.py --write    # replace the table in README.md between the markers

Every row is one rule of the default method (``dlbjax.rules.RULES``) with all the ATen op names
registered to it by one ``register`` call (same functions and facts; in registration order).
Columns: ``ops``; ``family`` (``dlbjax/lowerings/<family>.py`` and ``rules/<family>.py``);
``spec section`` (``Rule.section``); ``kind``
(``affine`` for Linear/Conv units gated by their activation, ``route`` for exact index maps,
``activation`` for ops that supply a gate to their producer, ``other`` for the rest);
``contrastive`` (``own rule`` where the rule has a dedicated contrastive function, ``per stream``
where the default rule is applied to each stream); ``LRP family`` and ``AttnLRP`` (the rule
``lrp-epsilon`` / ``attnlrp`` runs for the op: its own, DLB's shared one, or none). A second table lists the
lax primitives the JAX importer maps onto these ops. ``tests/test_readme.py`` fails when README.md
differs from this output.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

START = "<!-- ops-table:start -->"
END = "<!-- ops-table:end -->"
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _kind(rule) -> str:
    if rule.affine:
        return "affine"
    if rule.route:
        return "route"
    if rule.gate is not None:
        return "activation"
    return "other"


def _contrastive(rule) -> str:
    from dlbjax.rules import PER_STREAM

    per_stream = isinstance(rule.contrastive, str) and rule.contrastive == PER_STREAM
    return "per stream" if per_stream else "own rule"


def ops_table() -> str:
    """The markdown table (no trailing newline): one row per registration in ``RULES``."""
    from dlbjax.rules import RULES

    groups: list[tuple[object, list[str]]] = []
    index: dict[tuple, int] = {}
    for op, rule in RULES.items():
        key = (id(rule.default), id(rule.contrastive), id(rule.gate), id(rule.check), rule.outputs,
               rule.affine, rule.route, rule.section, rule.family)
        if key not in index:
            index[key] = len(groups)
            groups.append((rule, []))
        groups[index[key]][1].append(op)
    lines = ["| ops | family | spec section | kind | contrastive | LRP family | AttnLRP |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rule, ops in groups:
        names = ", ".join(f"`{op}`" for op in ops)
        section = (rule.section or "-").replace("|", "\\|")
        lines.append(f"| {names} | {rule.family} | {section} | {_kind(rule)} | "
                     f"{_contrastive(rule)} | {_method(ops, 'lrp-epsilon')} | "
                     f"{_method(ops, 'attnlrp')} |")
    return "\n".join(lines) + "\n\n" + lax_table()


def lax_table() -> str:
    """The JAX importer's table: each lax primitive (or recognised pattern) and the IR op it
    becomes (``importers/_jax.py`` ``PRIMITIVE_MAP``), so the rules above apply to it."""
    from dlbjax.importers._jax import PRIMITIVE_MAP

    lines = ["JAX models (`importers/_jax.py`): each lax primitive becomes the IR op(s) above.",
             "",
             "| lax primitive | IR op |", "| --- | --- |"]
    for prim, op in PRIMITIVE_MAP.items():
        lines.append(f"| `{prim}` | {op.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def _method(ops, method: str) -> str:
    """How a method treats these ops: its own rule (its section), DLB's shared rule, or none."""
    from dlbjax.rules import DLB, get_rule
    from dlbjax.rules._lrp import LRP_METHODS

    seen = []
    for op in ops:
        rule = get_rule(op, method)
        if rule is None:
            text = "no rule"
        elif rule.method == DLB:
            text = "DLB's (shared)"
        elif rule.method in LRP_METHODS:
            text = "own, one per LRP rule"
        else:
            text = (rule.section or rule.method).replace("|", "\\|")
        if text not in seen:
            seen.append(text)
    return " / ".join(seen)


def readme_table(text: str) -> str:
    """The text between the ops-table markers of a README (stripped); ValueError if absent."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain exactly one {START} ... {END} block")
    return text[text.index(START) + len(START):text.index(END)].strip()


def write_readme(path: pathlib.Path = README) -> bool:
    """Replace the table in ``path``; returns whether the file changed."""
    text = path.read_text(encoding="utf-8")
    readme_table(text)  # validates the markers
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{ops_table()}\n{END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help=f"update the table in {README.name} instead of printing it")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_readme()
        print(f"{README}: {'updated' if changed else 'already up to date'}")
    else:
        print(ops_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
