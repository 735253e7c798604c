"""Half compute (``compute_dtype="bfloat16"``/``"float16"``) against the float32 explanation.

For each test model (seeded random weights, no downloads) and mode (default, contrastive): the
relative error of the relevance (L2 over the whole batch, and the largest |difference| relative
to the largest |relevance|), the relative error of the prediction, and, for the text models, the
agreement of the top-k tokens of per-token relevance (|top-k(half) & top-k(f32)| / k, averaged
over rows; k = 5, 10). Prints a markdown table (``benchmarks/RESULTS.md`` section (i)).

    python benchmarks/bench_precision.py [--dtypes bfloat16 float16] [--seq 32] [--rows 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import dlbjax  # noqa: E402
from dlbjax._types import Streams  # noqa: E402


def models(seq: int, rows: int):
    """name -> (model, inputs, is_text). All seeded."""
    import transformers as tf
    from conftest import MLP, ResidualCNN, randomize_bn
    import hf_zoo

    g = torch.Generator().manual_seed(2)
    out = {}
    torch.manual_seed(0)
    out["MLP"] = (MLP().eval(), torch.randn(rows, 16, generator=g), False)
    torch.manual_seed(0)
    out["CNN"] = (randomize_bn(ResidualCNN()).eval(), torch.randn(rows, 3, 16, 16, generator=g),
                  False)
    out["BERT (2 layers)"] = (hf_zoo.tiny("bert"), hf_zoo.inputs("bert", rows, seq), True)
    out["LLaMA (2 layers)"] = (hf_zoo.tiny("llama"), hf_zoo.inputs("llama", rows, seq), True)
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                            n_positions=64)).eval()
    gi = {k: v for k, v in hf_zoo.inputs("llama", rows, seq).items() if k != "use_cache"}
    out["GPT-2 (2 layers)"] = (gpt2, gi, True)
    return out


def _maps(e, text):
    """(positive, negative or None) per-row maps of the first input carrying relevance."""
    key = "input_ids" if text else next(iter(e.relevance))
    r = e.relevance[key]
    if isinstance(r, Streams):
        return np.asarray(r.positive, np.float64), np.asarray(r.negative, np.float64)
    return np.asarray(r, np.float64), None


def _topk(a, b, k):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    k = min(k, a.shape[1])
    agree = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)]
    return float(np.mean(agree))


def compare(ref, half, text):
    """Error measures of ``half`` against ``ref`` (two Explanations of the same rows)."""
    out = {}
    (rp, rn), (hp, hn) = _maps(ref, text), _maps(half, text)
    r = rp if rn is None else np.concatenate([rp, rn])
    h = hp if hn is None else np.concatenate([hp, hn])
    out["l2"] = float(np.linalg.norm(h - r) / max(np.linalg.norm(r), 1e-30))
    out["max"] = float(np.abs(h - r).max() / max(np.abs(r).max(), 1e-30))
    pr, ph = np.asarray(ref.prediction, np.float64), np.asarray(half.prediction, np.float64)
    out["pred"] = float(np.linalg.norm(ph - pr) / max(np.linalg.norm(pr), 1e-30))
    out["target"] = float(np.mean(np.asarray(ref.target) == np.asarray(half.target)))
    if text:
        # per-token relevance: the positive stream (the evidence for the target) in contrastive
        sr, sh = rp, hp
        out["top5"], out["top10"] = _topk(sh, sr, 5), _topk(sh, sr, 10)
    return out


def run(dtypes, seq, rows, modes=("default", "contrastive")):
    results = []
    for name, (model, x, text) in models(seq, rows).items():
        example = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in x.items()} \
            if isinstance(x, dict) else x[:1]
        for mode in modes:
            # explain the float32 model's predicted class in both (the target is fixed)
            ref = dlbjax.Explainer(model, example, mode=mode)(x)
            tgt = np.asarray(ref.target)
            for dt in dtypes:
                t0 = time.perf_counter()
                ex = dlbjax.Explainer(model, example, mode=mode, compute_dtype=dt)
                half = ex(x, target=tgt)
                m = compare(ref, half, text)
                m.update(model=name, mode=mode, dtype=dt, s=time.perf_counter() - t0)
                results.append(m)
                print(f"# {name} {mode} {dt}: {m}", file=sys.stderr, flush=True)
    return results


def table(results) -> str:
    lines = ["| model | mode | compute | rel. L2 err | rel. max err | pred. rel. err | "
             "same target | top-5 agree | top-10 agree |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in results:
        tk = (f"{m['top5']:.2f} | {m['top10']:.2f}" if "top5" in m else "- | -")
        lines.append(f"| {m['model']} | {m['mode']} | {m['dtype']} | {m['l2']:.2e} | "
                     f"{m['max']:.2e} | {m['pred']:.2e} | {m['target']:.2f} | {tk} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4)
    args = ap.parse_args(argv)
    print(table(run(args.dtypes, args.seq, args.rows)))


if __name__ == "__main__":
    main()
