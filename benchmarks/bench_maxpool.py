"""Max pooling's lowering: the first maximum of each window (``take_along_axis`` at the
``argmax``; what the gradient family and the LRP family need, since it routes the gradient like
torch at ties) against a plain ``jnp.max`` over the window, side by side in one run.

Times (interleaved medians) the forward alone and ``jax.grad`` of the forward for resnet18's
max pool ([1, 64, 112, 112], 3x3, stride 2, padding 1), and the whole DLB explanation and the
gradient x input of resnet18 at 3x224x224 (compiled beforehand), each with both lowerings.

    python benchmarks/bench_maxpool.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_ms, interleaved, machine_line, resnet18  # noqa: E402

import dlbjax  # noqa: E402
from dlbjax.lowerings import LOWERINGS  # noqa: E402
from dlbjax.lowerings import pooling  # noqa: E402

FIRST = pooling._first_max


def plain_max(win):
    return jnp.max(win, axis=-1)


def with_lowering(fn, make):
    """``make()`` built while max pooling lowers with ``fn`` (the lowering reads the module
    global at trace time, so the compiled function keeps the variant it was traced with)."""
    pooling._first_max = fn
    try:
        return make()
    finally:
        pooling._first_max = FIRST


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    print(machine_line())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 112, 112)), jnp.float32)
    pool = LOWERINGS["aten.max_pool2d.default"]

    def fwd():
        return jax.jit(lambda a: pool(a, [3, 3], [2, 2], [1, 1]))

    def grad():
        return jax.jit(jax.grad(lambda a: jnp.sum(pool(a, [3, 3], [2, 2], [1, 1]) ** 2)))

    fns = {}
    for label, fn in (("first max", FIRST), ("jnp.max", plain_max)):
        f, g = with_lowering(fn, fwd), with_lowering(fn, grad)
        f(x).block_until_ready(), g(x).block_until_ready()
        fns[f"pool fwd, {label}"] = lambda f=f: f(x).block_until_ready()
        fns[f"pool grad, {label}"] = lambda g=g: g(x).block_until_ready()
    model = resnet18().eval()
    xi = torch.randn(1, 3, 224, 224)
    for label, fn in (("first max", FIRST), ("jnp.max", plain_max)):
        for method in ("dlb", "gradient-x-input"):
            ex = with_lowering(fn, lambda: dlbjax.Explainer(model, xi, method=method))
            with_lowering(fn, lambda: ex(xi))  # traced and compiled with this lowering
            fns[f"resnet18 {method}, {label}"] = lambda ex=ex: ex(xi)
    times = interleaved(fns, args.repeats)
    print(f"\n{args.repeats} interleaved repeats, medians\n")
    print("| what | first max | jnp.max | first max / jnp.max |")
    print("|---|---|---|---|")
    for what in ("pool fwd", "pool grad", "resnet18 dlb", "resnet18 gradient-x-input"):
        a, b = times[f"{what}, first max"], times[f"{what}, jnp.max"]
        print(f"| {what} | {fmt_ms(a)} | {fmt_ms(b)} | **{a / b:.2f}x** |")


if __name__ == "__main__":
    main()
