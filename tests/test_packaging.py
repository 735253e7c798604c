"""Packaging and the command-line demo.

``test_wheel_installs_and_explains`` (slow) builds a regular (non-editable) wheel, installs it into
a bare target directory and runs dlbjax from there in a subprocess whose working directory is
elsewhere. That catches package-dir mappings (``importers/`` -> ``dlbjax.importers``, ``rules/`` ->
``dlbjax.rules``) or modules that an editable install or the source tree would hide.
``test_demo_runs`` runs ``python -m dlbjax demo`` in-process with a short training.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What the sdist-less wheel build needs from the tree; build outputs, environments and VCS data
# stay behind so that the build neither sees nor writes anything in the working tree.
_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".hypothesis", "*.png", "*.npz",
                                 ".ipynb_checkpoints", "out")

_MISSING_BACKEND = re.compile(r"No module named '?(setuptools|wheel)|"
                              r"(setuptools|wheel)\S* (is|are) (not installed|required)|"
                              r"Cannot import 'setuptools\.build_meta'|invalid command 'bdist_wheel'",
                              re.IGNORECASE)


def _backend_missing_reason() -> str | None:
    """Why ``--no-build-isolation`` cannot build here (None if it can): the build runs in this
    interpreter, so setuptools (>= 70.1, which ships bdist_wheel, or older with ``wheel``) must
    already be installed. Nothing is installed to fix it."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed in this environment"
    import setuptools

    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} needs the 'wheel' package, which is missing"
    return None


@pytest.mark.slow
def test_wheel_installs_and_explains(tmp_path):
    reason = _backend_missing_reason()
    if reason:
        pytest.skip(f"cannot build the wheel with --no-build-isolation: {reason} "
                    "(this test installs nothing)")
    src, wheels, target, cwd = (tmp_path / d for d in ("src", "wheels", "target", "cwd"))
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    cwd.mkdir()

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(wheels)],
        cwd=src, capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        log = build.stdout + build.stderr
        if _MISSING_BACKEND.search(log):
            pytest.skip("cannot build the wheel with --no-build-isolation: the build backend "
                        "(setuptools/wheel) is missing (this test installs nothing):\n" + log[-2000:])
        pytest.fail(f"pip wheel failed (exit {build.returncode}):\n{log[-4000:]}")
    built = sorted(wheels.glob("dlbjax-*.whl"))
    assert len(built) == 1, f"expected one dlbjax wheel, got {[p.name for p in wheels.iterdir()]}"

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(built[0])],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        import torch
        import dlbjax
        target = os.path.realpath({str(target)!r})
        def under(path):
            return os.path.realpath(path).startswith(target + os.sep)
        assert under(dlbjax.__file__), dlbjax.__file__
        import dlbjax.importers, dlbjax.rules
        assert under(dlbjax.importers.__file__), dlbjax.importers.__file__
        assert under(dlbjax.rules.__file__), dlbjax.rules.__file__
        assert "aten.linear.default" in dlbjax.rules.RULES
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        x = torch.randn(4, 5)
        e = dlbjax.explain(model, x)
        (name,) = e.relevance
        assert e.relevance[name].shape == (4, 5), e.relevance[name].shape
        assert np.allclose(e.conservation.seed, 100.0), e.conservation.seed
        print("wheel ok", dlbjax.__version__, dlbjax.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wheel ok" in run.stdout


def test_demo_runs(tmp_path, capsys):
    from dlbjax.__main__ import main

    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    match = re.search(r"test accuracy: (\S+)", printed)
    assert match, printed
    accuracy = float(match.group(1))
    assert 0.0 <= accuracy <= 1.0
    assert str(out) in printed                      # says where the PNG went
    assert "seed" in printed and "inputs" in printed  # the conservation table
