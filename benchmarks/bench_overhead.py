"""Explain time / jitted forward time for an MLP, torchvision resnet18, a BERT-base-shaped and a
LLaMA-shaped model (random weights, batch 1, float32), measured side by side in one run.

Columns: the jitted JAX forward of the imported program, the compiled relevance pass alone
(``explainer.runner.call``: forward + seed + VJP, inputs already converted), ``explainer(x)`` end to end
(input checks, host transfers, result assembly), torch's eager forward, XLA's FLOPs ratio of the
two compiled functions, and the wall-clock ratio explain / forward. Run by hand:

    python benchmarks/bench_overhead.py [--repeats 7] [--image 224] [--layers 12] [--seq 128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bert_base, interleaved, llama_like, machine_line, mlp, resnet18, token_inputs  # noqa: E402

import dlbjax  # noqa: E402
from dlbjax.engine.interpret import evaluate  # noqa: E402
from dlbjax._dtypes import jnp_dtype  # noqa: E402


def flops(compiled) -> float:
    d = compiled.cost_analysis()
    d = d[0] if isinstance(d, list) else d
    return float(d.get("flops", 0.0))


def bench(name, model, inp, repeats):
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, inp)
    t_import = time.perf_counter() - t0
    program, consts = ex.program, ex.constants
    arrays, n = ex.plan.rows(inp)
    classes, select = ex.plan.task.check(None, n, ex.plan.out_size)
    xs = [jnp.asarray(a[0], jnp_dtype(v.dtype)) for a, v in zip(arrays, program.inputs)]
    fwd = jax.jit(lambda c, *a: evaluate(program, c, list(a))[0])
    t0 = time.perf_counter()
    fwd_c = fwd.lower(consts, *xs).compile()
    t_fc = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex(inp)
    t_ec = time.perf_counter() - t0
    exp_c = ex.runner.fn.lower(*ex.runner.compiled_args(arrays, classes, select)).compile()
    kwargs = {k: v for k, v in inp.items()} if isinstance(inp, dict) else None

    def torch_fwd():
        with torch.no_grad():
            return model(**kwargs) if kwargs is not None else model(inp)

    med = interleaved({
        "fwd": lambda: fwd_c(consts, *xs),
        "run": lambda: ex.runner.call(arrays, classes, select),
        "call": lambda: ex(inp).relevance,
        "torch": lambda: torch_fwd(),
    }, repeats)
    fr = flops(exp_c) / max(flops(fwd_c), 1.0)
    print(f"| {name} | {t_import:.1f} | {t_fc:.1f} | {t_ec:.1f} | {med['torch'] * 1e3:.3g} | "
          f"{med['fwd'] * 1e3:.3g} | {med['run'] * 1e3:.3g} | {med['call'] * 1e3:.3g} | {fr:.2f}x | "
          f"**{med['run'] / med['fwd']:.2f}x** |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="64x64 images, 4 layers, 3 repeats")
    args = ap.parse_args()
    if args.quick:
        args.image, args.layers, args.repeats = 64, 4, 3
    print(machine_line())
    print(f"batch 1, float32, {args.repeats} interleaved repeats, medians in ms\n")
    print("| model | import s | fwd compile s | explain compile s | torch fwd | jax fwd | "
          "explain (compiled pass) | explainer(x) end to end | FLOPs ratio | explain / fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    bench("MLP 512-1024x3-10", mlp(), torch.randn(1, 512), args.repeats)
    bench(f"resnet18 3x{args.image}x{args.image}", resnet18(),
          torch.randn(1, 3, args.image, args.image), args.repeats)
    bench(f"BERT-base-shaped ({args.layers}L, 768, seq {args.seq})", bert_base(args.layers),
          token_inputs(1, args.seq), args.repeats)
    bench(f"LLaMA-shaped ({args.layers}L, 768, GQA 12/4, seq {args.seq})", llama_like(args.layers),
          token_inputs(1, args.seq, llama=True), args.repeats)


if __name__ == "__main__":
    main()
