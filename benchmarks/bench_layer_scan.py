"""Explainer() + first call of a LLaMA-shaped random model, scanned vs unrolled layers.

Prints one row per depth: the build (import, passes, analysis) and the first call (trace,
compile, run) with ``scan_layers=True`` and ``scan_layers=False``, plus the jaxpr equation count
of the compiled pass. Times are printed, never asserted.

    python benchmarks/bench_layer_scan.py --hidden 256 --layers 2 4 8 16
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
import transformers as tf

import dlbjax


def llama(layers: int, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128), intermediate_size=4 * hidden,
        vocab_size=512, max_position_embeddings=128)).eval()


def measure(model, x, scan):
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, x, scan_layers=scan)
    t1 = time.perf_counter()
    e = ex(x)
    np.asarray(e.prediction)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ex


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--length", type=int, default=16)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(3, 512, (1, args.length), generator=g),
         "attention_mask": torch.ones(1, args.length, dtype=torch.long), "use_cache": False}
    print(f"device {jax.devices()[0].platform}, hidden {args.hidden}, length {args.length}")
    print(f"{'layers':>6} | {'scan build':>10} {'scan call1':>10} {'scan total':>10} | "
          f"{'unrl build':>10} {'unrl call1':>10} {'unrl total':>10} | max rel diff")
    for n in args.layers:
        model = llama(n, args.hidden)
        sb, sc, es = measure(model, x, True)
        ub, uc, eu = measure(model, x, False)
        a, b = es(x), eu(x)
        diff = max(float(np.max(np.abs(np.asarray(a.relevance[k]) - np.asarray(b.relevance[k])))
                         / max(np.max(np.abs(np.asarray(b.relevance[k]))), 1e-30))
                   for k in b.relevance)
        print(f"{n:>6} | {sb:10.2f} {sc:10.2f} {sb + sc:10.2f} | {ub:10.2f} {uc:10.2f} "
              f"{ub + uc:10.2f} | {diff:.2g}  (runs {es.plan.runs})", flush=True)


if __name__ == "__main__":
    main()
