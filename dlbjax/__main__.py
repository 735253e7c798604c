"""Command line: ``python -m dlbjax demo`` (or the ``dlbjax demo`` console script).

``demo`` trains a small CNN on scikit-learn's 8x8 digits (bundled with scikit-learn, no download)
with :func:`dlbjax._training.fit`, prints its test accuracy, explains a few test digits with one
:class:`dlbjax.Explainer` and writes a PNG with each digit next to its relevance heatmap.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

__all__ = ["main", "demo", "build_cnn", "load_digits_split"]


def build_cnn(seed: int = 0):
    """A small explainable CNN for 1x8x8 digits: conv/relu/maxpool twice, flatten, linear."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 8 x 4 x 4
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 2 x 2
        nn.Flatten(), nn.Linear(64, 10),
    )


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's digits as float32 ``[N, 1, 8, 8]`` in [0, 1], split by a seeded
    permutation into ``(X_train, y_train, X_test, y_test)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def _figure(images, relevance, pred, labels, path, pairs_per_row: int = 3):
    """Each digit with its relevance heatmap to its right, ``pairs_per_row`` pairs per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = -(-n // pairs_per_row)
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, squeeze=False,
                             figsize=(4.0 * pairs_per_row, 2.3 * rows + 0.5))
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r_, c_ = divmod(i, pairs_per_row)
        ax = axes[r_, 2 * c_]
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"label {labels[i]}, pred {pred[i]}", fontsize=9,
                     color="black" if pred[i] == labels[i] else "red")
        ax = axes[r_, 2 * c_ + 1]
        r = relevance[i]
        lim = float(np.abs(r).max()) or 1.0
        if r.min() >= 0:   # default mode shares are non-negative: a sequential map from 0
            im = ax.imshow(r, cmap="Reds", vmin=0, vmax=lim)
        else:              # signed relevance: diverging map centred on 0 (blue: negative)
            im = ax.imshow(r, cmap="bwr", vmin=-lim, vmax=lim)
        ax.set_title(f"relevance (sum {r.sum():.1f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle("dlbjax: DLBacktrace relevance of the predicted class per pixel "
                 "(seed 100 per digit; the rest is kept by biases)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(out: str = "dlbjax_demo.png", epochs: int = 15, seed: int = 0, n_explain: int = 6,
         stream=None) -> dict:
    """Train, evaluate and explain; returns ``{"accuracy", "out", "explanation"}``."""
    import torch

    import dlbjax
    from dlbjax._training import fit

    stream = stream or sys.stdout

    def say(*a):
        print(*a, file=stream, flush=True)

    t0 = time.perf_counter()
    X_train, y_train, X_test, y_test = load_digits_split(seed)
    say(f"digits: {len(y_train)} train / {len(y_test)} test images of 8x8 pixels")
    model = build_cnn(seed)
    say(f"training a small CNN with optax (adam) through dlbjax's JAX forward, {epochs} epochs ...")
    model = fit(model, X_train, y_train, epochs=epochs, lr=1e-2, batch_size=64, seed=seed)
    model.eval()
    with torch.no_grad():
        pred_test = model(torch.from_numpy(X_test)).argmax(1).numpy()
    accuracy = float((pred_test == y_test).mean())
    say(f"test accuracy: {accuracy:.4f}")

    # the first test image of each of n_explain different labels, so the figure shows variety
    picked, seen = [], set()
    for i, label in enumerate(y_test):
        if label not in seen:
            picked.append(i)
            seen.add(label)
        if len(picked) == n_explain:
            break
    picked = np.asarray(picked)
    images, labels = X_test[picked], y_test[picked]
    x = torch.from_numpy(images)
    explainer = dlbjax.Explainer(model, x)
    e = explainer(x)
    rel = np.asarray(e.relevance[explainer.input_names[0]])[:, 0]   # [rows, 8, 8]
    pred = np.asarray(e.prediction).argmax(1)
    say(f"\nexplained {len(picked)} test digits (default mode, the predicted class is seeded):")
    for i in range(len(picked)):
        mark = "" if pred[i] == labels[i] else "   <- wrong"
        say(f"  row {i} (test image {picked[i]}): predicted {pred[i]}, true {labels[i]}, "
            f"explained class {e.target[i]}, input relevance {rel[i].sum():8.3f}{mark}")
    say("\nconservation (seed = inputs + bias + lost):")
    say(str(e.conservation))

    _figure(images[:, 0], rel, pred, labels, out)
    say(f"\nwrote {os.path.abspath(out)}")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    return {"accuracy": accuracy, "out": out, "explanation": e}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlbjax",
        description="dlbjax: DLBacktrace relevance propagation for PyTorch models, on JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="train a small CNN on 8x8 digits, explain a few test digits "
                                    "and write a PNG of the relevance heatmaps")
    p.add_argument("--out", default="dlbjax_demo.png", help="PNG path (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data split, init and shuffling seed "
                                                       "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        demo(out=args.out, epochs=args.epochs, seed=args.seed)
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
