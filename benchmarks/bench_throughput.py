"""Examples per second at batch 1, 8, 32, 128: ``Explainer`` (one compiled call, rows vmapped)
against a Python loop of single-row calls of the same Explainer, side by side in one run.

Models: an MLP, torchvision resnet18 on 3x64x64 images, a small BERT (4 layers, hidden 256,
seq 64). Every configuration is compiled before timing. Run by hand:

    python benchmarks/bench_throughput.py [--repeats 3] [--batches 1 8 32 128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_line, mlp, resnet18, token_inputs  # noqa: E402

import dlbjax  # noqa: E402


def small_bert():
    cfg = tf.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, vocab_size=30522, max_position_embeddings=512,
                        num_labels=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg).eval()


def rows_of(data, a, b):
    if isinstance(data, dict):
        return {k: v[a:b] for k, v in data.items()}
    return data[a:b]


def bench(name, model, make, batches, repeats):
    data = make(max(batches))
    ex = dlbjax.Explainer(model, rows_of(data, 0, 1))
    one = [rows_of(data, i, i + 1) for i in range(max(batches))]
    ex(one[0])  # compile the single-row call
    for b in batches:
        ex(rows_of(data, 0, b))  # compile each batch size
        tv, tl = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            ex(rows_of(data, 0, b))
            tv.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(b):
                ex(one[i])
            tl.append(time.perf_counter() - t)
        v, l_ = statistics.median(tv), statistics.median(tl)
        print(f"| {name} | {b} | {b / v:.1f} | {b / l_:.1f} | **{l_ / v:.2f}x** |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--quick", action="store_true", help="batches 1 8 32, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.repeats = [1, 8, 32], 2
    print(machine_line())
    print(f"float32, medians of {args.repeats} repeats; examples/s = rows / wall time of "
          "explaining them (end to end, results on the host)\n")
    print("| model | batch | Explainer (vmap) ex/s | loop of 1-row calls ex/s | speed-up |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    bench("MLP 512-1024x3-10", mlp(), lambda n: torch.randn(n, 512, generator=g), args.batches,
          args.repeats)
    bench("resnet18 3x64x64", resnet18(), lambda n: torch.randn(n, 3, 64, 64, generator=g),
          args.batches, args.repeats)
    bench("BERT 4L h256 seq 64", small_bert(),
          lambda n: {k: v for k, v in token_inputs(n, 64).items()}, args.batches, args.repeats)


if __name__ == "__main__":
    main()
