"""No global side effects (issue 7, point 4; the original DLBacktrace forced determinism, one
thread and a default dtype on the whole process, original_dlb.md §1 and §9.1 C5).

A fresh subprocess records torch's, numpy's, Python's and JAX's global settings, imports dlbjax,
records them again, runs ``explain`` (default and contrastive, plus an Explainer call) and records
them a third time; all three must be equal. It runs twice: with the libraries' defaults, and with
non-default settings made beforehand (so that "resetting to a default" is caught as well as
"forcing a value"). A second check compares the environment variables that ``import dlbjax``
changes with those that importing its dependencies (torch, numpy, jax) changes by themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(__file__)

SNAPSHOT = textwrap.dedent("""
    import hashlib, json, logging, os, random, sys, warnings

    def snapshot():
        import numpy as np, torch, jax
        h = lambda b: hashlib.sha256(b).hexdigest()
        s = {
            "torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads(),
            "torch.are_deterministic_algorithms_enabled": torch.are_deterministic_algorithms_enabled(),
            "torch.deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "torch.get_default_dtype": str(torch.get_default_dtype()),
            "torch.get_default_device": str(torch.get_default_device()),
            "torch.is_grad_enabled": torch.is_grad_enabled(),
            "torch.is_inference_mode_enabled": torch.is_inference_mode_enabled(),
            "torch.is_anomaly_enabled": torch.is_anomaly_enabled(),
            "torch.get_float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch.backends.cudnn": [torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                                     torch.backends.cudnn.deterministic,
                                     torch.backends.cudnn.allow_tf32],
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.backends.mkldnn.enabled": torch.backends.mkldnn.enabled,
            "torch.rng_state": h(torch.get_rng_state().numpy().tobytes()),
            "numpy.random.state": h(repr(np.random.get_state()).encode()),
            "python.random.state": h(repr(random.getstate()).encode()),
            "jax.config": {k: repr(v) for k, v in sorted(jax.config.values.items())},
            "os.environ": dict(os.environ),
            "sys.getrecursionlimit": sys.getrecursionlimit(),
            "warnings.filters": repr(warnings.filters),
            "logging.root.level": logging.getLogger().level,
        }
        return s
""")

CHILD = textwrap.dedent("""
    import numpy as np, torch, jax
    if {tweak!r}:  # non-default settings made by the user before using dlbjax
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision("medium")
        torch.set_default_dtype(torch.float64)
        torch.set_default_dtype(torch.float32)
        jax.config.update("jax_default_matmul_precision", "float32")
        jax.config.update("jax_enable_x64", True)
        os.environ["OMP_NUM_THREADS"] = "2"
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=true"
        np.random.seed(7)
        random.seed(7)
        torch.manual_seed(7)
    sys.path.insert(0, {tests!r})
    from conftest import ResidualCNN, randomize_bn
    model = randomize_bn(ResidualCNN()).eval()
    x = torch.zeros(2, 3, 12, 12)
    x.normal_(generator=torch.Generator().manual_seed(0))
    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad):  # (touches nothing; keeps the snapshot order honest)
        pass
    before = snapshot()
    import dlbjax
    imported = snapshot()
    dlbjax.explain(model, x)
    dlbjax.explain(model, x, mode="contrastive", layers=True)
    ex = dlbjax.Explainer(model, x[:1])
    ex(x)
    used = snapshot()
    print(json.dumps({{"before": before, "imported": imported, "used": used}}))
""")

ENV_CHILD = textwrap.dedent("""
    import json, os
    before = dict(os.environ)
    {imports}
    after = dict(os.environ)
    print(json.dumps({{k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
                      if before.get(k) != after.get(k)}}))
""")


def _run(script):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _diff(a, b):
    out = {}
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            sub = {kk: (a[k].get(kk), b[k].get(kk)) for kk in set(a[k]) | set(b[k])
                   if a[k].get(kk) != b[k].get(kk)}
            if sub:
                out[k] = sub
        elif a.get(k) != b.get(k):
            out[k] = (a.get(k), b.get(k))
    return out


@pytest.mark.parametrize("tweak", [False, True], ids=["library defaults", "user settings"])
def test_import_and_explain_change_no_global_setting(tweak):
    snaps = _run(SNAPSHOT + CHILD.format(tweak=tweak, tests=TESTS))
    assert _diff(snaps["before"], snaps["imported"]) == {}, "import dlbjax changed global state"
    assert _diff(snaps["imported"], snaps["used"]) == {}, "explain changed global state"


def test_import_sets_no_environment_variable_of_its_own():
    deps = _run(ENV_CHILD.format(imports="import numpy, torch, jax"))
    ours = _run(ENV_CHILD.format(imports="import dlbjax"))
    assert ours == deps, f"import dlbjax changes the environment beyond its dependencies: {ours}"
