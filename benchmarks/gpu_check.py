"""GPU check: LLaMA-shaped random-weight models explained on one CUDA device (issue 15 item 5).

    python benchmarks/gpu_check.py               # on a CUDA machine (exits 0 with "no GPU" elsewhere)
    python benchmarks/gpu_check.py --cpu --tiny  # smoke test of the script on the CPU

Install on a fresh CUDA machine: README's install line (``pip install torch==... && pip install
-e ".[test]"``) plus the CUDA jax wheel (``pip install -U "jax[cuda12]"``). No downloads: every
model is built from a ``transformers.LlamaConfig`` with seeded random weights.

Sizes (``--sizes``, run in this order, each skipped when its estimated device memory or the
time left in ``--budget-s`` does not allow it):

* ``small-4``, ``small-12``: hidden 2048, intermediate 5632, 32 heads (4 key/value heads), vocab
  32000, 4 and 12 layers, a float32 model explained with ``compute_dtype="float32"`` and
  ``"bfloat16"``;
* ``1b``, ``3b``, ``7b``: the Llama-3.2-1B, Llama-3.2-3B and Llama-2-7B shapes, bf16 models
  explained with ``compute_dtype="bfloat16"``.

Prints a markdown table: layers, parameters, weight bytes on the device, peak device memory
(``device.memory_stats()["peak_bytes_in_use"]``; a process-wide peak, so sizes run in increasing
order), ``Explainer()`` time (import, analysis, |W|), first call (compile + run), repeat call
(median of 3), torch forward (CUDA when torch sees it, else CPU, small sizes only); then
tokens/s of ``dlbjax.generate(..., explain=True)`` (``dlbjax.Generator``, second call) on
``small-4``.

Check (exit status 1 on failure): ``small-4`` (``tiny`` with ``--tiny``) is also explained in
float32 on the CPU in the same process; the device's float32 explanation must agree with it
within ``F32_BOUND`` relative L2 error of per-token relevance, and its bfloat16 explanation
within ``BF16_BOUND`` with top-5 token agreement of at least ``TOPK_BOUND`` (bounds from
``benchmarks/RESULTS.md`` section (i), with margin for the deeper, wider model).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

# allocate on demand, so that torch's CUDA forward finds room beside JAX (the cap stays 75%)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import dlbjax  # noqa: E402

F32_BOUND = 1e-2     # device float32 vs CPU float32 (different GEMM orders)
BF16_BOUND = 0.15    # device bfloat16 vs CPU float32 (tiny models: <= 4e-2)
TOPK_BOUND = 0.6     # mean top-5 agreement, bfloat16 vs float32 (tiny models: >= 0.9)

SMALL = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, num_hidden_layers=2), 16, "float32"),
    "small-4": (dict(SMALL, num_hidden_layers=4), 32, "float32"),
    "small-12": (dict(SMALL, num_hidden_layers=12), 32, "float32"),
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, num_hidden_layers=16,
                tie_word_embeddings=True), 32, "bfloat16"),
    "3b": (dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                num_key_value_heads=8, vocab_size=128256, num_hidden_layers=28,
                tie_word_embeddings=True), 32, "bfloat16"),
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32), 32, "bfloat16"),
}


def n_params(cfg: dict) -> int:
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], \
        cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * layer + v * h * (1 if cfg.get("tie_word_embeddings") else 2) + h


def estimate_bytes(cfg: dict, compute: str) -> int:
    """Device memory of one explanation: weights and their precomputed |W| in the compute dtype,
    float32 copies of the largest matrix (the rules upcast half operands), activations, slack."""
    width = 2 if compute == "bfloat16" else 4
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    largest = max(v * h, h * i)
    return 2 * width * n_params(cfg) + 3 * 4 * largest + (1 << 30)


def build(cfg: dict, dtype: str, seed: int = 0):
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialise in place: no float32 copy of a 7B
    try:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(max_position_embeddings=256,
                                                   attn_implementation="sdpa", **cfg))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def inputs(cfg: dict, seq: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, cfg["vocab_size"], (1, seq), generator=g),
            "attention_mask": torch.ones(1, seq, dtype=torch.long), "use_cache": False}


def tokens_of(e) -> np.ndarray:
    return np.asarray(e.relevance["input_ids"], np.float64).reshape(-1)


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def topk(a, b, k=5) -> float:
    k = min(k, a.size)
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def torch_forward(model, x, device_ok: bool):
    dev = "cuda" if torch.cuda.is_available() and device_ok else "cpu"
    m = model.to(dev)
    xx = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in x.items()}
    with torch.no_grad():
        m(**xx)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m(**xx)
        if dev == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t
    model.to("cpu")
    if dev == "cuda":
        torch.cuda.empty_cache()
    return s, dev


def peak(dev) -> str:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return "-"
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB"


def limit(dev):
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    return stats.get("bytes_limit") if stats else None


def explain_size(name, model, x, compute, dev, rows):
    """Time one size on ``dev``; returns the explanation."""
    cfg = model.config
    ex, t_init = timed(lambda: dlbjax.Explainer(model, x, compute_dtype=compute, devices=[dev]))
    wbytes = sum(np.asarray(v).nbytes for v in ex.constants.values())
    e, t_first = timed(lambda: ex(x))
    reps = [timed(lambda: ex(x))[1] for _ in range(3)]
    rows.append(dict(size=name, compute=compute, layers=cfg.num_hidden_layers,
                     params=sum(p.numel() for p in model.parameters()), wbytes=wbytes,
                     peak=peak(dev), init=t_init, first=t_first, repeat=statistics.median(reps)))
    del ex
    gc.collect()
    return e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny size instead of small-4")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help=f"sizes to time, of {list(SHAPES)} (default: all but tiny; with --cpu: "
                         "the checked size only)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip a size whose estimated time would pass this many seconds in all")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cpu = jax.devices("cpu")[0]
    if args.cpu:
        dev = cpu
    else:
        try:
            dev = jax.devices("gpu")[0]
        except RuntimeError:
            print("no GPU: jax sees no CUDA device (install the CUDA jax wheel); nothing checked")
            return 0
    check = "tiny" if args.tiny else "small-4"
    sizes = args.sizes or ([check] if args.cpu else [s for s in SHAPES if s != "tiny"])
    if check not in sizes:
        sizes = [check] + sizes
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}, dlbjax "
          f"{dlbjax.__version__}, torch {torch.__version__}", flush=True)

    # ---- the check: CPU float32 reference, device float32 and bfloat16 ------------------------
    cfg, seq, _ = SHAPES[check]
    model = build(cfg, "float32")
    x = inputs(cfg, seq)
    ref = tokens_of(dlbjax.Explainer(model, x, devices=[cpu])(x))
    rows, failures = [], []
    t0 = time.perf_counter()
    got = {c: tokens_of(explain_size(check, model, x, c, dev, rows))
           for c in ("float32", "bfloat16")}
    # time model of one (size, compute): the last one's time scaled by the mean of the layer
    # ratio (compiling grows with depth) and the parameter ratio (export, copies, |W|, running)
    last = ((time.perf_counter() - t0) / 2, cfg["num_hidden_layers"], n_params(cfg))
    t_torch, where = torch_forward(model, x, True)
    for r in rows:
        r["torch"] = f"{t_torch * 1e3:.1f} ms ({where})"
    err32, err16, agree = rel_l2(got["float32"], ref), rel_l2(got["bfloat16"], ref), \
        topk(got["bfloat16"], ref)
    print(f"check on {check}: device float32 vs CPU float32 rel. L2 {err32:.2e} (bound "
          f"{F32_BOUND:g}); device bfloat16 vs CPU float32 rel. L2 {err16:.2e} (bound "
          f"{BF16_BOUND:g}), top-5 agreement {agree:.2f} (bound {TOPK_BOUND:g})", flush=True)
    if not err32 <= F32_BOUND:
        failures.append(f"float32 relevance differs from the CPU by {err32:.2e}")
    if not (err16 <= BF16_BOUND and agree >= TOPK_BOUND):
        failures.append(f"bfloat16 relevance differs from the CPU float32 one by {err16:.2e} "
                        f"(top-5 agreement {agree:.2f})")

    # ---- generation with explanations ---------------------------------------------------------
    gen_line = "-"
    prompt = {"input_ids": x["input_ids"][:, :max(4, seq // 2)].repeat(2, 1)}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    for compute in ("bfloat16", "float32"):
        if time.perf_counter() - start < args.budget_s / 3:
            gen = dlbjax.Generator(model, prompt["input_ids"].shape[1], args.new_tokens,
                                   eos_token_id=[], batch_size=2 * args.new_tokens,
                                   compute_dtype=compute, devices=[dev])
            _, t1 = timed(lambda: gen(prompt))
            out, t2 = timed(lambda: gen(prompt))
            n = out.sequences.shape[0] * args.new_tokens
            gen_line = (gen_line if gen_line != "-" else "") + \
                f"{compute}: {n / t2:.1f} tokens/s explained (first call {t1:.1f} s); "
            del gen
            gc.collect()
    del model
    gc.collect()

    # ---- the other sizes ----------------------------------------------------------------------
    cap = limit(dev)
    for name in sizes:
        if name == check:
            continue
        cfg, seq, dtype = SHAPES[name]
        computes = ("float32", "bfloat16") if dtype == "float32" else ("bfloat16",)
        for compute in computes:
            need = estimate_bytes(cfg, compute)
            left = args.budget_s - (time.perf_counter() - start)
            eta = last[0] * (cfg["num_hidden_layers"] / last[1] + n_params(cfg) / last[2]) / 2 \
                + 10 * n_params(cfg) / 1e9  # + building the random torch model
            if cap is not None and need > cap:
                print(f"skip {name} {compute}: needs ~{need / 2**30:.1f} GiB, device has "
                      f"{cap / 2**30:.1f} GiB", flush=True)
                continue
            if eta > left:
                print(f"skip {name} {compute}: ~{eta:.0f} s expected, {left:.0f} s left", flush=True)
                continue
            model = build(cfg, dtype)
            xs = inputs(cfg, seq)
            t0 = time.perf_counter()
            explain_size(name, model, xs, compute, dev, rows)
            last = (time.perf_counter() - t0, cfg["num_hidden_layers"], n_params(cfg))
            print(f"{name} {compute}: {last[0]:.0f} s (estimated {eta:.0f} s)", flush=True)
            if n_params(cfg) < 2e9 or torch.cuda.is_available():
                t_torch, where = torch_forward(model, xs, True)
                rows[-1]["torch"] = f"{t_torch * 1e3:.1f} ms ({where})"
            else:
                rows[-1]["torch"] = "-"
            del model
            gc.collect()
            jax.clear_caches()

    print("\n| size | compute | layers | params | weight bytes | peak device memory | "
          "Explainer() | first call | repeat call | torch forward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['compute']} | {r['layers']} | {r['params'] / 1e6:.0f}M | "
              f"{r['wbytes'] / 2**30:.2f} GiB | {r['peak']} | {r['init']:.1f} s | "
              f"{r['first']:.1f} s | {r['repeat'] * 1e3:.1f} ms | {r.get('torch', '-')} |")
    print(f"\ngenerate(explain=True) on {check}, 2 prompts x {args.new_tokens} new tokens: "
          f"{gen_line}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
