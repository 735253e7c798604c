"""dlbjax against peers on the same models, batch 1, float32, side by side in one run.

* dlbjax: ``explainer(x)`` end to end (DLB default mode, compiled once beforehand);
* torch gradient x input (autograd; for BERT the gradient at the word embeddings times them);
* Zennit's LRP composite ``EpsilonPlusFlat`` (with ``ResNetCanonizer`` for resnet18) on the MLP
  and the CNN;
* Captum's integrated gradients, 50 steps in one internal batch, on the CNN and on BERT (layer
  integrated gradients at the word embeddings, all-[PAD] baseline).

Prints medians (ms) and each method's time relative to dlbjax. Run by hand:

    python benchmarks/bench_peers.py [--image 224] [--layers 12] [--seq 128] [--repeats 5]
                                     [--ig-repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bert_base, interleaved, machine_line, mlp, resnet18, token_inputs  # noqa: E402

import dlbjax  # noqa: E402

try:
    import zennit  # noqa: F401
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer
except ImportError:  # pragma: no cover
    zennit = None
try:
    import captum  # noqa: F401
    from captum.attr import IntegratedGradients, LayerIntegratedGradients
except ImportError:  # pragma: no cover
    captum = None


def grad_x_input(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out[0, target].backward()
    return (x.grad * x).detach()


def zennit_lrp(model, x, target, canonizers=()):
    composite = EpsilonPlusFlat(canonizers=list(canonizers))
    one_hot = torch.zeros(1, 1000 if x.ndim == 4 else 10)
    one_hot[0, target] = 1.0
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x, one_hot)
    return rel


def bert_grad_x_input(model, inp, target):
    emb = model.bert.embeddings.word_embeddings(inp["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=inp["attention_mask"]).logits
    out[0, target].backward()
    return (emb.grad * emb).sum(-1).detach()


def timed(fn, repeats):
    """Median of ``repeats`` calls (no warm-up: integrated gradients compiles nothing)."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def row(name, results, base="dlbjax"):
    cells = []
    for k in ("dlbjax", "grad x input", "zennit EpsilonPlusFlat", "captum IG (50 steps)"):
        v = results.get(k)
        if v is None:
            cells.append("-")
        else:
            cells.append(f"{v * 1e3:.3g} ({v / results[base]:.2f}x)")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ig-repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="64x64 images, 4 layers, seq 64, 3 repeats, 1 IG repeat")
    args = ap.parse_args()
    if args.quick:
        args.image, args.layers, args.seq, args.repeats, args.ig_repeats = 64, 4, 64, 3, 1
    print(machine_line())
    print(f"zennit {getattr(zennit, '__version__', 'installed') if zennit else 'NOT INSTALLED'}, "
          f"captum {captum.__version__ if captum else 'NOT INSTALLED'}")
    print(f"batch 1, float32; medians in ms ({args.repeats} interleaved repeats; integrated "
          f"gradients {args.ig_repeats}); in brackets: time relative to dlbjax\n")
    print("| model | dlbjax | torch grad x input | zennit EpsilonPlusFlat | captum IG (50 steps) |")
    print("|---|---|---|---|---|")

    # MLP
    model, x = mlp(), torch.randn(1, 512)
    ex = dlbjax.Explainer(model, x)
    target = int(ex(x).target[0])
    fns = {"dlbjax": lambda: ex(x).relevance,
           "grad x input": lambda: grad_x_input(model, x, target)}
    if zennit:
        fns["zennit EpsilonPlusFlat"] = lambda: zennit_lrp(model, x, target)
    row("MLP 512-1024x3-10", interleaved(fns, args.repeats))

    # resnet18
    model, x = resnet18(), torch.randn(1, 3, args.image, args.image)
    ex = dlbjax.Explainer(model, x)
    target = int(ex(x).target[0])
    fns = {"dlbjax": lambda: ex(x).relevance,
           "grad x input": lambda: grad_x_input(model, x, target)}
    if zennit:
        fns["zennit EpsilonPlusFlat"] = lambda: zennit_lrp(model, x, target, [ResNetCanonizer()])
    res = interleaved(fns, args.repeats)
    if captum:
        ig = IntegratedGradients(model)
        res["captum IG (50 steps)"] = timed(
            lambda: ig.attribute(x, target=target, n_steps=50), args.ig_repeats)
    row(f"resnet18 3x{args.image}x{args.image}", res)

    # BERT
    model = bert_base(args.layers)
    inp = token_inputs(1, args.seq)
    ex = dlbjax.Explainer(model, inp)
    target = int(ex(inp).target[0])
    fns = {"dlbjax": lambda: ex(inp).relevance,
           "grad x input": lambda: bert_grad_x_input(model, inp, target)}
    res = interleaved(fns, args.repeats)
    if captum:
        def fwd(ids, mask):
            return model(input_ids=ids, attention_mask=mask).logits

        lig = LayerIntegratedGradients(fwd, model.bert.embeddings.word_embeddings)
        base = torch.zeros_like(inp["input_ids"])
        res["captum IG (50 steps)"] = timed(
            lambda: lig.attribute(inp["input_ids"], baselines=base, target=target, n_steps=50,
                                  additional_forward_args=(inp["attention_mask"],)),
            args.ig_repeats)
    row(f"BERT-base-shaped ({args.layers}L, seq {args.seq})", res)


if __name__ == "__main__":
    main()
