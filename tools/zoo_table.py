"""Print (or write into README.md) the "Models tested" table, measured on the zoo of tests/zoo.py.

    python tools/zoo_table.py            # measure every zoo model and print the markdown table
    python tools/zoo_table.py --write    # ... and replace the table in README.md between markers

Each row explains one tiny seeded model in both modes (what ``tests/test_zoo*.py`` assert) and
reports: the forward's max relative error against torch eager, the mean share of the seed that
reaches the inputs, the biases (§2.5) and the learned tensors copied into the stream (``params``)
in default mode, the share at the inputs in contrastive mode (both streams), and the worst row's
``lost`` share over both modes. ``tests/test_readme.py`` checks that the table lists exactly the
zoo's models; the numbers come from this script, not from hand.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- zoo-table:start -->"
END = "<!-- zoo-table:end -->"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def zoo_table() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo

    lines = ["| model | family | forward error | inputs | bias | params | inputs (contrastive) "
             "| lost (worst) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in zoo.ZOO:
        r = zoo.measure(name)
        d, c = r["default"], r["contrastive"]
        lines.append(f"| {name} | {r['family']} | {max(d['forward'], c['forward']):.1e} | "
                     f"{_pct(d['inputs'])} | {_pct(d['bias'])} | {_pct(d['params'])} | "
                     f"{_pct(c['inputs'])} | {max(d['lost'], c['lost']):.0e} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def readme_names(text: str) -> list:
    """The model names in README's table (its first column)."""
    body = text.split(START, 1)[1].split(END, 1)[0].strip().splitlines()[2:]
    return [row.strip("|").split(" | ")[0].strip() for row in body]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    table = zoo_table()
    if not parser.parse_args().write:
        print(table)
        return
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    print(f"{README}: updated")


if __name__ == "__main__":
    main()
