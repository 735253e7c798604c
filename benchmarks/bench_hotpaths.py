"""Hot paths of the relevance pass on a BERT-base-shaped model (or resnet18): XLA cost analysis
and ablations.

Prints, side by side in one run (interleaved repeats, medians):

* XLA's cost analysis (FLOPs, bytes accessed) of the jitted forward and of the relevance pass;
* wall-clock time of the forward and of the relevance pass with and without the precomputed |W|
  (``precompute_magnitudes``), and the ratios;
* with ``--profile``, the most expensive XLA ops of one explanation (jax.profiler trace), grouped
  as dots, |W| passes and other (element-wise) fusions.

    python benchmarks/bench_hotpaths.py [--model bert|resnet18] [--layers 12] [--seq 128]
                                        [--image 224] [--rows 1] [--repeats 7] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bert_base, machine_line, resnet18, token_inputs  # noqa: E402

import dlbjax  # noqa: E402
from dlbjax.engine.interpret import evaluate  # noqa: E402
from dlbjax._dtypes import jnp_dtype  # noqa: E402


VARIANTS = {
    "before": "|W| recomputed per call, conv weights transposed per call (before issue 6)",
    "mags": "+ |W| precomputed once per Explainer",
    "after": "+ conv weights passed in the CPU filter layout (the default now)",
}


def compiled_explain(ex, inp, variant):
    arrays, n = ex.plan.rows(inp)
    classes, select = ex.plan.task.check(None, n, ex.plan.out_size)
    args = ex.runner.compiled_args(arrays, classes, select)
    if variant == "before":
        args = (ex.plan.consts,) + args[1:4] + ({}, None)
    elif variant == "mags":
        args = (ex.plan.consts,) + args[1:4] + (ex.plan.mags, None)
    c = ex.runner.fn.lower(*args).compile()
    return c, (lambda: c(*args))


def cost(c):
    d = c.cost_analysis()
    d = d[0] if isinstance(d, list) else d
    return d.get("flops", 0.0), d.get("bytes accessed", 0.0)


def profile(c, call, repeats=3):
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(repeats):
            jax.block_until_ready(call())
    path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    dur = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            dur[e["name"]] += e.get("dur", 0) / repeats / 1e3
    info = {}
    for line in c.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            info[m.group(1)] = m.group(2)
    groups = collections.Counter()
    for name, ms in dur.items():
        if name not in info:
            continue
        kind = ("dot / conv" if name.startswith(("ynn", "dot", "convolution", "onednn"))
                else "|W| (abs of a weight)" if name.startswith("wrapped_abs")
                else "other fusions")
        groups[kind] += ms
    total = sum(groups.values())
    print("\nXLA op time of one explanation (profiler, ms; thread time, so it can exceed wall time):")
    for k, v in groups.most_common():
        print(f"  {k:24s} {v:8.1f} ms  {100 * v / total:5.1f}%")
    top = sorted(((ms, n) for n, ms in dur.items() if n in info), reverse=True)[:8]
    for ms, n in top:
        print(f"    {ms:7.2f} ms  {n:30s} {info[n]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("bert", "resnet18"), default="bert")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="4 layers, 5 repeats")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.repeats = 4, 5
    print(machine_line())
    if args.model == "bert":
        model, inp = bert_base(args.layers), token_inputs(args.rows, args.seq)
        title = f"BERT-base-shaped, {args.layers} layers, seq {args.seq}, {args.rows} row(s)"
    else:
        torch.manual_seed(0)
        model, inp = resnet18(), torch.randn(args.rows, 3, args.image, args.image)
        title = f"resnet18, 3x{args.image}x{args.image}, {args.rows} row(s)"
    ex = dlbjax.Explainer(model, inp)
    comp = {k: compiled_explain(ex, inp, k) for k in VARIANTS}
    program, consts = ex.program, ex.constants
    arrays, _ = ex.plan.rows(inp)
    xs = [jnp.asarray(a[0], jnp_dtype(v.dtype)) for a, v in zip(arrays, program.inputs)]
    fwd = jax.jit(lambda c, *a: evaluate(program, c, list(a))[0]).lower(consts, *xs).compile()
    ff, fb = cost(fwd)
    print(f"\n{title}; XLA cost analysis")
    print("| pass | GFLOP | GB accessed | FLOPs / fwd | bytes / fwd |")
    print("|---|---|---|---|---|")
    print(f"| forward (1 row) | {ff / 1e9:.2f} | {fb / 1e9:.3f} | 1.00 | 1.00 |")
    for k, label in VARIANTS.items():
        f_, b_ = cost(comp[k][0])
        print(f"| explain: {label} | {f_ / 1e9:.2f} | {b_ / 1e9:.3f} | {f_ / ff:.2f} | "
              f"{b_ / fb:.2f} |".replace("|W|", "\\|W\\|"))
    fns = {"fwd": (lambda: fwd(consts, *xs))}
    fns.update({k: comp[k][1] for k in VARIANTS})
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nwall clock, {args.repeats} interleaved repeats, medians (explain of {args.rows} "
          "row(s), forward of 1 row)")
    print("| variant | ms | explain / fwd | vs before |")
    print("|---|---|---|---|")
    print(f"| forward | {med['fwd'] * 1e3:.0f} | 1.00x | |")
    for k, label in VARIANTS.items():
        print(f"| {label} | {med[k] * 1e3:.0f} | {med[k] / med['fwd']:.2f}x | "
              f"**{med[k] / med['before']:.2f}** |".replace("|W|", "\\|W\\|"))
    if args.profile:
        for k in ("before", "after"):
            print(f"\n-- {VARIANTS[k]} --")
            profile(*comp[k])

if __name__ == "__main__":
    main()
