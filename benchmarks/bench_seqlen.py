"""Time and peak memory of explaining a BERT-base-shaped (or LLaMA-shaped) model as the sequence
length grows from 32 to 512 (batch 1, float32).

Each length runs in its own subprocess, so that peak memory is that point's alone. Reported per
point: compile time, median forward and explain times and their ratio, XLA's buffer assignment
for the compiled functions (``compiled.memory_analysis()``: temporary buffers, i.e. activations
and relevance intermediates, excluding the weights passed as arguments), and the process's peak
resident memory (``getrusage`` maxrss) after the model is imported, after the forward and after
the explanation (compilation included). Run by hand:

    python benchmarks/bench_seqlen.py [--model bert|llama] [--layers 12] [--seqs 32 64 128 256 512]
                                      [--repeats 3] [--quick]

Long sequences (issue 15, RESULTS.md section (j)): ``--model llama-small`` (LLaMA-shaped, hidden
256, 4 heads / 2 key-value heads, 2 layers unless ``--layers``) with ``--compare-blocks`` runs
every length twice, with attention over blocks of 512 queries (today's default,
``dlbjax.lowerings.attention.QUERY_BLOCK``) and unchunked (``QUERY_BLOCK = None``, as before);
``--run-up-to N`` only compiles (temp bytes, no times) the unchunked points above N tokens:

    python benchmarks/bench_seqlen.py --model llama-small --seqs 512 1024 2048 4096 8192 \
        --compare-blocks --repeats 1 --run-up-to 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def llama_small(layers: int, max_len: int):
    """LLaMA-shaped: hidden 256, 4 heads / 2 key-value heads (head 64), MLP 512."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
                         max_position_embeddings=max(max_len, 512), attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).eval()


def point(model_name: str, layers: int, seq: int, repeats: int, block="auto",
          run: bool = True) -> dict:
    import statistics

    import jax
    import jax.numpy as jnp

    from common import bert_base, llama_like, token_inputs

    import dlbjax
    import dlbjax.lowerings.attention as lattn
    from dlbjax.engine.interpret import evaluate

    if block != "auto":
        lattn.QUERY_BLOCK = block
    llama = model_name.startswith("llama")
    model = (llama_small(layers, seq) if model_name == "llama-small"
             else llama_like(layers) if llama else bert_base(layers))
    inp = token_inputs(1, seq, llama=llama)
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, inp)
    t_import = time.perf_counter() - t0
    rss_model = _rss_gib()
    program, consts = ex.program, ex.constants
    arrays, n = ex.plan.rows(inp)
    classes, select = ex.plan.task.check(None, n, ex.plan.out_size)
    xs = [jnp.asarray(a[0], jnp.int32) for a in arrays]
    fwd = jax.jit(lambda c, *a: evaluate(program, c, list(a))[0]).lower(consts, *xs).compile()
    if run:
        jax.block_until_ready(fwd(consts, *xs))
    rss_fwd = _rss_gib()
    args = ex.runner.compiled_args(arrays, classes, select)
    t0 = time.perf_counter()
    exp = ex.runner.fn.lower(*args).compile()
    t_compile = time.perf_counter() - t0

    def temp(c):
        m = c.memory_analysis()
        return None if m is None else m.temp_size_in_bytes / 2**20

    if not run:
        return {"seq": seq, "import_s": t_import, "compile_s": t_compile, "fwd_ms": None,
                "explain_ms": None, "fwd_temp_mib": temp(fwd), "explain_temp_mib": temp(exp),
                "rss_model_gib": rss_model, "rss_fwd_gib": None, "rss_explain_gib": None}
    jax.block_until_ready(exp(*args))
    rss_exp = _rss_gib()
    tf_, te = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fwd(consts, *xs))
        tf_.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(exp(*args))
        te.append(time.perf_counter() - t)

    return {"seq": seq, "import_s": t_import, "compile_s": t_compile,
            "fwd_ms": statistics.median(tf_) * 1e3, "explain_ms": statistics.median(te) * 1e3,
            "fwd_temp_mib": temp(fwd), "explain_temp_mib": temp(exp),
            "rss_model_gib": rss_model, "rss_fwd_gib": rss_fwd, "rss_explain_gib": rss_exp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("bert", "llama", "llama-small"), default="bert")
    ap.add_argument("--layers", type=int, default=None, help="12 (bert, llama), 2 (llama-small)")
    ap.add_argument("--compare-blocks", action="store_true",
                    help="each length with attention over 512-query blocks and unchunked")
    ap.add_argument("--run-up-to", type=int, default=None,
                    help="unchunked points above this length are compiled only (temp bytes)")
    ap.add_argument("--block", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers, seqs 32 128 512, 2 repeats")
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layers is None:
        args.layers = 2 if args.model == "llama-small" else 12
    if args.point is not None:
        block = ({"auto": "auto", "none": None}[args.block] if args.block in ("auto", "none")
                 else int(args.block))
        print("RESULT " + json.dumps(point(args.model, args.layers, args.point, args.repeats,
                                           block, not args.compile_only)))
        return
    if args.quick:
        args.layers, args.seqs, args.repeats = 4, [32, 128, 512], 2
    from common import machine_line
    print(machine_line())
    name = {"llama": "LLaMA-shaped (768, GQA 12/4)", "bert": "BERT-base-shaped (768)",
            "llama-small": "LLaMA-shaped (256, GQA 4/2)"}[args.model]
    print(f"{name}, {args.layers} layers, batch 1, float32; one subprocess per length; times are "
          f"medians of {args.repeats}\n")
    print("| seq | attention | explain compile s | fwd ms | explain ms | explain / fwd | "
          "XLA temp fwd MiB | XLA temp explain MiB | peak RSS GiB: model / +fwd / +explain |")
    print("|---|---|---|---|---|---|---|---|---|")
    variants = [("auto", "blocks of 512")] + ([("none", "unchunked")] if args.compare_blocks
                                              else [])
    for seq in args.seqs:
        for block, label in variants:
            compile_only = (block == "none" and args.run_up_to is not None
                            and seq > args.run_up_to)
            cmd = [sys.executable, __file__, "--point", str(seq), "--model", args.model,
                   "--layers", str(args.layers), "--repeats", str(args.repeats), "--block", block]
            proc = subprocess.run(cmd + (["--compile-only"] if compile_only else []),
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"| {seq} | {label} | failed: {proc.stderr.strip().splitlines()[-1:]} |",
                      flush=True)
                continue
            r = json.loads(line[0][7:])
            if r["fwd_ms"] is None:
                print(f"| {seq} | {label} | {r['compile_s']:.1f} | (compiled only) | | | "
                      f"{r['fwd_temp_mib']:.0f} | {r['explain_temp_mib']:.0f} | "
                      f"{r['rss_model_gib']:.2f} |", flush=True)
                continue
            print(f"| {seq} | {label} | {r['compile_s']:.1f} | {r['fwd_ms']:.0f} | "
                  f"{r['explain_ms']:.0f} | {r['explain_ms'] / r['fwd_ms']:.2f}x | "
                  f"{r['fwd_temp_mib']:.0f} | {r['explain_temp_mib']:.0f} | "
                  f"{r['rss_model_gib']:.2f} / {r['rss_fwd_gib']:.2f} / "
                  f"{r['rss_explain_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
