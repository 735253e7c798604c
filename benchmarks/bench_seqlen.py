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


def point(model_name: str, layers: int, seq: int, repeats: int) -> dict:
    import statistics

    import jax
    import jax.numpy as jnp

    from common import bert_base, llama_like, token_inputs

    import dlbjax
    from dlbjax.engine.interpret import evaluate

    llama = model_name == "llama"
    model = llama_like(layers) if llama else bert_base(layers)
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
    jax.block_until_ready(fwd(consts, *xs))
    rss_fwd = _rss_gib()
    args = ex.runner.compiled_args(arrays, classes, select)
    t0 = time.perf_counter()
    exp = ex.runner.fn.lower(*args).compile()
    t_compile = time.perf_counter() - t0
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

    def temp(c):
        m = c.memory_analysis()
        return None if m is None else m.temp_size_in_bytes / 2**20

    return {"seq": seq, "import_s": t_import, "compile_s": t_compile,
            "fwd_ms": statistics.median(tf_) * 1e3, "explain_ms": statistics.median(te) * 1e3,
            "fwd_temp_mib": temp(fwd), "explain_temp_mib": temp(exp),
            "rss_model_gib": rss_model, "rss_fwd_gib": rss_fwd, "rss_explain_gib": rss_exp}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("bert", "llama"), default="bert")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seqs", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers, seqs 32 128 512, 2 repeats")
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point is not None:
        print("RESULT " + json.dumps(point(args.model, args.layers, args.point, args.repeats)))
        return
    if args.quick:
        args.layers, args.seqs, args.repeats = 4, [32, 128, 512], 2
    from common import machine_line
    print(machine_line())
    name = "LLaMA-shaped (768, GQA 12/4)" if args.model == "llama" else "BERT-base-shaped (768)"
    print(f"{name}, {args.layers} layers, batch 1, float32; one subprocess per length; times are "
          f"medians of {args.repeats}\n")
    print("| seq | explain compile s | fwd ms | explain ms | explain / fwd | XLA temp fwd MiB | "
          "XLA temp explain MiB | peak RSS GiB: model / +fwd / +explain |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        cmd = [sys.executable, __file__, "--point", str(seq), "--model", args.model, "--layers",
               str(args.layers), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"| {seq} | failed: {proc.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(line[0][7:])
        print(f"| {seq} | {r['compile_s']:.1f} | {r['fwd_ms']:.0f} | {r['explain_ms']:.0f} | "
              f"{r['explain_ms'] / r['fwd_ms']:.2f}x | {r['fwd_temp_mib']:.0f} | "
              f"{r['explain_temp_mib']:.0f} | {r['rss_model_gib']:.2f} / {r['rss_fwd_gib']:.2f} / "
              f"{r['rss_explain_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
