"""Explain the test zoo and save every explanation, or compare two such snapshots bitwise.

    python tools/snapshot_zoo.py save DIR          # DIR/<case>.npz for every zoo model and mode
    python tools/snapshot_zoo.py compare DIR_A DIR_B

Used to prove that a refactor changes no result: save a snapshot with the old code (e.g. an
extracted old commit first on PYTHONPATH) and with the new code, then compare. Only the public
API is used (``dlbjax.Explainer``, ``Explanation.save``), so the script runs on both. Every array
of every explanation (relevance and both streams, prediction, target, conservation, outputs,
per-layer relevance, experts) must be equal in shape, dtype and value; a case that raises is
recorded with its error text, which must be the same too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(os.environ.get("SNAPSHOT_TESTS", Path(__file__).resolve().parents[1] / "tests"))


def _cases():
    """(name, thunk) pairs: each thunk returns one Explanation."""
    sys.path.insert(0, str(TESTS))
    import jax
    import torch

    import dlbjax
    import conftest
    import fuzz_models
    import hf_zoo
    import models
    import test_moe
    import test_recurrent

    out = []

    def add(name, model_fn, x_fn, batch_fn=None, **opts):
        def run():
            model, x = model_fn(), x_fn()
            ex = dlbjax.Explainer(model, x, **opts)
            return ex(x) if batch_fn is None else ex.batch(batch_fn(), batch_size=3)
        out.append((name, run))

    def seeded(shape, seed=1):
        return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    for spec in models.SPECS:
        tag = "-".join(map(str, spec))
        shape = (3,) + models.input_shape(spec)[1:]
        for mode in ("default", "contrastive"):
            add(f"models-{tag}-{mode}", lambda spec=spec: models.build(spec).eval(), seeded(shape),
                mode=mode, layers=True, task="classification")
    add("conftest-mlp", lambda: (torch.manual_seed(0), conftest.MLP())[1].eval(),
        seeded((4, 16)), layers=True)
    add("conftest-mlp-batch", lambda: (torch.manual_seed(0), conftest.MLP())[1].eval(),
        seeded((1, 16)), batch_fn=seeded((7, 16), 3))
    for i, sk in enumerate(fuzz_models.CI_SKELETONS):
        for mode in ("default", "contrastive"):
            add(f"fuzz-{i}-{mode}", lambda sk=sk: fuzz_models.build(sk),
                seeded((3,) + tuple(sk[1])), mode=mode, layers=True, task="classification")
        add(f"fuzz-{i}-dlb-gating", lambda sk=sk: fuzz_models.build(sk),
            seeded((2,) + tuple(sk[1])), product_rule="dlb", experimental_gating=True,
            task="classification")
    for name in hf_zoo.ALL:
        for attn in ("sdpa", "eager"):
            for mode in ("default", "contrastive"):
                add(f"hf-{name}-{attn}-{mode}", lambda n=name, a=attn: hf_zoo.tiny(n, a),
                    lambda n=name: {k: v for k, v in hf_zoo.inputs(n).items() if k != "use_cache"},
                    mode=mode, layers=(attn == "sdpa"))
    for name in test_moe.MODELS:
        add(f"moe-{name}", lambda n=name: test_moe.tiny_moe(n), lambda: test_moe.tokens(),
            task="next-token", layers=True)
    add("moe-qwen3-router", lambda: test_moe.tiny_moe("qwen3_moe"), lambda: test_moe.tokens(),
        task="next-token", router_relevance=True)
    for kind in ("lstm", "gru"):
        for bi in (False, True):
            for mode in ("default", "contrastive"):
                def model(kind=kind, bi=bi):
                    torch.manual_seed(0)
                    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
                    return test_recurrent.AllOutputs(cls(3, 4, num_layers=2, batch_first=True,
                                                         bidirectional=bi)).eval()
                add(f"rnn-{kind}-{bi}-{mode}", model, seeded((2, 5, 3)), mode=mode,
                    task="classification", layers=True)

    def x64_case():
        with jax.enable_x64(True):
            torch.manual_seed(0)
            model = conftest.MLP().double().eval()
            x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).double()
            return dlbjax.Explainer(model, x, layers=True)(x)
    out.append(("x64-mlp", x64_case))
    return out


def save(directory: str) -> int:
    import dlbjax
    import dlbjax.rules
    print(f"dlbjax from {dlbjax.__file__}; rules from {dlbjax.rules.__file__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name, run in _cases():
        t = time.perf_counter()
        try:
            run().save(d / f"{name}.npz")
            status = "ok"
        except Exception as exc:  # noqa: BLE001  (recorded, compared as text)
            (d / f"{name}.error.txt").write_text(f"{type(exc).__name__}: {exc}")
            status = f"raised {type(exc).__name__}"
        print(f"{name}: {status} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def compare(a: str, b: str) -> int:
    A, B = Path(a), Path(b)
    names = sorted({p.name for p in A.iterdir()} | {p.name for p in B.iterdir()})
    diffs, arrays = [], 0
    for n in names:
        pa, pb = A / n, B / n
        if not pa.exists() or not pb.exists():
            diffs.append(f"{n}: only in {'B' if not pa.exists() else 'A'}")
            continue
        if n.endswith(".txt"):
            if pa.read_text() != pb.read_text():
                diffs.append(f"{n}: different errors")
            continue
        with np.load(pa, allow_pickle=False) as za, np.load(pb, allow_pickle=False) as zb:
            keys = sorted(set(za.files) | set(zb.files))
            for k in keys:
                if k == "__dlbjax__":
                    continue
                if k not in za.files or k not in zb.files:
                    diffs.append(f"{n}/{k}: missing on one side")
                    continue
                x, y = za[k], zb[k]
                arrays += 1
                if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(
                        x, y, equal_nan=x.dtype.kind in "fc"):
                    diffs.append(f"{n}/{k}: differs (max |a-b| = "
                                 f"{np.max(np.abs(x.astype(float) - y.astype(float))) if x.shape == y.shape else 'shape'})")
    print(f"{len(names)} files, {arrays} arrays compared, {len(diffs)} differences")
    for line in diffs:
        print("  " + line)
    return 1 if diffs else 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "save" and len(sys.argv) == 3:
        sys.exit(save(sys.argv[2]))
    if cmd == "compare" and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    print(__doc__)
    sys.exit(2)
