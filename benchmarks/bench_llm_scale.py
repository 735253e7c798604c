"""Memory and time of explaining a LLaMA-shaped decoder as it grows in layers (issue 15): random
weights (``transformers.LlamaConfig``, seeded, nothing downloaded), batch 1, next-token task.

Each size runs in its own subprocess. Reported per size: parameters, weight bytes, the process's
peak resident memory after ``Explainer()`` and after the first call (both as the increase over
the resident memory with the torch model built and run once, the baseline; the peak is VmHWM of
/proc/self/status, reset after the baseline), the overhead ratio (that increase divided by the
model's weight bytes: how many copies of the weights dlbjax adds), and the times of
``Explainer()``, the first call (compilation included), the median repeat call, the median torch
forward (``torch.no_grad``) and repeat / torch. Run by hand:

    python benchmarks/bench_llm_scale.py [--hidden 1024] [--intermediate 2816] [--seq 32]
        [--layers 2 4 8 16 32] [--dtype float32|bfloat16] [--repeats 3]
        [--magnitudes auto|true|false] [--scan] [--export-all]

``--scan`` passes ``scan_layers=True`` (the default ``"auto"`` scans runs of >= 3 layers);
``--export-all`` passes ``export_layers="all"`` (torch.export of every layer, as before
``importers/_repeat.py``). The last line is the issue's depth goal: (Explainer() + first call)
of the deepest size over that of the shallowest (goal <= 2x for 32 vs 2 layers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def point(args, layers: int) -> dict:
    import jax
    import torch
    import transformers as tf

    import dlbjax

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
                         max_position_embeddings=max(512, args.seq),
                         attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(cfg).eval()
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    inp = {"input_ids": torch.randint(5, min(1000, args.vocab), (1, args.seq), generator=g),
           "attention_mask": torch.ones(1, args.seq, dtype=torch.long), "use_cache": False}
    with torch.no_grad():
        model(**inp)
    gc.collect()
    base = _status("VmRSS")
    reset = _reset_peak()
    options = {}
    if args.magnitudes != "auto":
        options["precompute_magnitudes"] = args.magnitudes == "true"
    if args.scan:
        options["scan_layers"] = True
    if args.export_all:
        options["export_layers"] = "all"
    t0 = time.perf_counter()
    ex = dlbjax.Explainer(model, inp, **options)
    t_build = time.perf_counter() - t0
    peak_build = _status("VmHWM")
    t0 = time.perf_counter()
    ex(inp)
    t_first = time.perf_counter() - t0
    peak_first = _status("VmHWM")
    te, tt = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ex(inp)
        te.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(**inp)
        tt.append(time.perf_counter() - t0)
    gib = weight_bytes / 2**30
    return {"layers": layers, "params": params, "weight_gib": gib, "base_gib": base,
            "peak_reset": reset, "build_gib": peak_build - base, "first_gib": peak_first - base,
            "ratio_build": (peak_build - base) / gib, "ratio_first": (peak_first - base) / gib,
            "build_s": t_build, "first_s": t_first, "repeat_s": statistics.median(te),
            "torch_s": statistics.median(tt), "mags": bool(ex.plan.mags),
            "repeated": ex.plan.repeated is not None, "scanned": bool(ex.plan.runs),
            "options": sorted(options), "devices": str(jax.devices()[0])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--magnitudes", choices=("auto", "true", "false"), default="auto")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--export-all", action="store_true")
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point is not None:
        print("RESULT " + json.dumps(point(args, args.point)))
        return
    from common import machine_line
    print(machine_line())
    print(f"LLaMA-shaped, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{max(1, args.hidden // 64)} heads ({max(1, args.hidden // 256)} KV), vocab "
          f"{args.vocab}, seq {args.seq}, batch 1, {args.dtype}, precompute_magnitudes="
          f"{args.magnitudes}{', scan_layers=True' if args.scan else ''}"
          f"{', export_layers=all' if args.export_all else ''}; one subprocess per size; "
          f"memory is peak RSS over the torch-model baseline; times are medians of "
          f"{args.repeats}\n")
    print("| layers | params | weights GiB | +peak GiB after Explainer() | +peak GiB after 1st "
          "call | overhead ratio (1st call) | Explainer() s | 1st call s | repeat ms | "
          "torch fwd ms | repeat / torch | layers exported | scanned | |W| kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    passthrough = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   "--seq", str(args.seq), "--vocab", str(args.vocab), "--dtype", args.dtype,
                   "--repeats", str(args.repeats), "--magnitudes", args.magnitudes] + \
        (["--scan"] if args.scan else []) + (["--export-all"] if args.export_all else [])
    startup = {}
    for layers in args.layers:
        proc = subprocess.run([sys.executable, __file__, "--point", str(layers)] + passthrough,
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"| {layers} | failed: {proc.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(line[0][7:])
        print(f"| {layers} | {r['params'] / 1e6:.0f}M | {r['weight_gib']:.2f} | "
              f"{r['build_gib']:.2f} ({r['ratio_build']:.2f}x) | {r['first_gib']:.2f} | "
              f"**{r['ratio_first']:.2f}x** | {r['build_s']:.1f} | {r['first_s']:.1f} | "
              f"{r['repeat_s'] * 1e3:.0f} | {r['torch_s'] * 1e3:.0f} | "
              f"{r['repeat_s'] / r['torch_s']:.1f}x | {3 if r['repeated'] else layers} | "
              f"{'yes' if r['scanned'] else 'no'} | {'yes' if r['mags'] else 'no'} |"
              + ("" if r["peak_reset"] else " (peak not reset)"), flush=True)
        startup[layers] = r["build_s"] + r["first_s"]
    if len(startup) >= 2:
        lo, hi = min(startup), max(startup)
        print(f"\nExplainer() + first call: {hi} layers / {lo} layers = "
              f"{startup[hi] / startup[lo]:.2f}x (goal <= 2x for 32 vs 2)")


if __name__ == "__main__":
    main()
