"""Explain time vs jitted forward time for a BERT-base-shaped and a LLaMA-shaped model.

Random weights, sequence length 128, batch 1, float32, measured side by side in one run:
the jitted JAX forward of the imported program, the full compiled relevance pass (forward + seed +
VJP) and torch's own eager forward. Prints medians and the ratio explain / forward (the floor of a
backward-like pass is about 2x). Run by hand:

    python benchmarks/bench_transformers.py [--layers 12] [--seq 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers as tf

import dlbjax
from dlbjax.engine.interpret import evaluate


def bert_base(layers):
    cfg = tf.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=3072, vocab_size=30522, max_position_embeddings=512,
                        num_labels=2, attn_implementation="sdpa")
    return tf.BertForSequenceClassification(cfg).eval()


def llama_like(layers):
    cfg = tf.LlamaConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                         num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                         max_position_embeddings=512, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name, model, seq, repeats):
    torch.manual_seed(0)
    inp = {"input_ids": torch.randint(5, 1000, (1, seq)),
           "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    if "Llama" in type(model).__name__:
        inp["use_cache"] = False
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, inp)
    t_import = time.perf_counter() - t0
    program, consts = ex.program, ex.constants
    arrays = [jnp.asarray(inp[v.name].numpy(), jnp.int32) for v in program.inputs]
    fwd = jax.jit(lambda c, *xs: evaluate(program, c, list(xs))[0])
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(consts, *arrays))
    t_fwd_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex(inp)
    t_explain_compile = time.perf_counter() - t0
    t_fwd = median_time(lambda: fwd(consts, *arrays), repeats)
    t_explain = median_time(lambda: ex.runner.call(*_prepared(ex, inp)), repeats)
    with torch.no_grad():
        t_torch = median_time(lambda: model(**inp).logits, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"| {name} | {seq} | {t_import:.1f} | {t_fwd_compile:.1f} | {t_explain_compile:.1f} | "
          f"{t_torch * 1e3:.0f} | {t_fwd * 1e3:.0f} | {t_explain * 1e3:.0f} | "
          f"**{t_explain / t_fwd:.2f}x** | {peak:.1f} |")


def _prepared(ex, inp):
    arrays, n = ex.plan.rows(inp)
    classes, select = ex.plan.task.check(None, n, ex.plan.out_size)
    return arrays, classes, select


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, torch {torch.__version__}, devices {jax.devices()}")
    print("| model | seq | import s | fwd compile s | explain compile s | torch fwd ms | "
          "jax fwd ms | explain ms | explain / fwd | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    bench(f"BERT-base ({args.layers}L, 768)", bert_base(args.layers), args.seq, args.repeats)
    bench(f"LLaMA-like ({args.layers}L, 768, GQA 12/4)", llama_like(args.layers), args.seq,
          args.repeats)
    np.random.seed(0)


if __name__ == "__main__":
    main()
