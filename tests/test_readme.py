"""README.md stays true: the supported-operators table equals what tools/ops_table.py generates
from the rule registry now, and the two fresh-machine commands are there verbatim."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

DEMO_COMMAND = ("pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && "
                "python -m dlbjax demo")
TEST_COMMAND = ('pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]" && '
                "python -m pytest")


def _ops_table_module():
    path = ROOT / "tools" / "ops_table.py"
    spec = importlib.util.spec_from_file_location("_dlbjax_ops_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_table_is_current():
    tool = _ops_table_module()
    in_readme = tool.readme_table(README.read_text(encoding="utf-8"))
    generated = tool.ops_table().strip()
    assert in_readme == generated, (
        "the Supported operators table in README.md is stale; regenerate it with "
        "`python tools/ops_table.py --write`")


def test_ops_table_covers_every_registered_op():
    import re

    from dlbjax.rules import RULES

    table = _ops_table_module().ops_table()
    body = table.split("\n\n", 1)[0].splitlines()[2:]  # the ATen table (the lax one follows)
    seen = []
    for row in body:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 7
        ops = re.findall(r"`([^`]+)`", cells[0])
        assert ops and all(op in RULES for op in ops)
        seen += ops
        # one row per registration: the same rule functions and facts for every op in it
        assert len({(RULES[op].default, RULES[op].contrastive, RULES[op].family) for op in ops}) == 1
        assert cells[1] == RULES[ops[0]].family
        assert cells[3] in {"affine", "route", "activation", "other"}
        assert cells[4] in {"own rule", "per stream"}
        # which rule the LRP family and AttnLRP run: what get_rule says for the first op
        from dlbjax.rules import DLB, get_rule
        for cell, method in ((cells[5], "lrp-epsilon"), (cells[6], "attnlrp")):
            rule = get_rule(ops[0], method)
            first = cell.split(" / ")[0]
            if rule is None:
                assert first == "no rule", (ops[0], method, cell)
            elif rule.method == DLB:
                assert first == "DLB's (shared)", (ops[0], method, cell)
            else:
                assert first not in ("no rule", "DLB's (shared)"), (ops[0], method, cell)
    assert sorted(seen) == sorted(RULES)  # every op of the default method, each exactly once


def test_readme_has_the_fresh_machine_commands():
    text = README.read_text(encoding="utf-8")
    assert f"Demo: `{DEMO_COMMAND}`" in text
    assert f"Tests: `{TEST_COMMAND}`" in text


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci.splitlines()  # the command itself, on a line of its own


def test_models_tested_table_lists_the_zoo():
    """README's "Models tested" table has one row per zoo model, in the zoo's order (the numbers
    come from `python tools/zoo_table.py --write`; the zoo tests assert them)."""
    import zoo

    path = ROOT / "tools" / "zoo_table.py"
    spec = importlib.util.spec_from_file_location("_dlbjax_zoo_table", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    names = tool.readme_names(README.read_text(encoding="utf-8"))
    assert names == list(zoo.ZOO), (
        "README's Models tested table is stale; regenerate it with `python tools/zoo_table.py "
        "--write`")
