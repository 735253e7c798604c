"""How faithful is each attribution method? One table per model, every method on the same compiled
engine, every metric from ``dlbjax.metrics`` on the same inputs.

Models, trained in the script in seconds (seeded):

* ``digits``: the demo's CNN on scikit-learn's 8x8 digits (conv/relu/maxpool x2, linear), optax
  through ``dlbjax.fit``; explained on the first ``--rows`` test digits;
* ``cancer``: an MLP (30-32-16-2) on scikit-learn's breast-cancer data, standardised features;
* ``text``: a 2-layer BERT (hidden 32) on the notebooks' synthetic sentiment task (one sentiment
  word among neutral ones), torch AdamW; tokens flipped to ``[MASK]``, padding never flipped.

Methods: DLB default, DLB contrastive (positive minus negative stream), LRP-epsilon (0.25),
EpsilonPlusFlat (images and tables) or AttnLRP (text), gradient x input, integrated gradients
(32 steps, zero baseline; text: in embedding space), SmoothGrad (16 samples), and a seeded random
map. Metrics (``dlbjax.metrics``; higher is better unless marked ↓):

* AOPC MoRF, AOPC LeRF ↓, ABPC: pixel / feature / token flipping to the dataset mean (images,
  tables) or ``[MASK]`` (text), logit of the explained class, in ``--steps`` steps;
* FC: faithfulness correlation (Bhatt et al. 2020), random subsets, seeded;
* MaxSens ↓: max-sensitivity (Yeh et al. 2019), uniform noise (float inputs only);
* Rand ↓: model-parameter randomisation (Adebayo et al. 2018), cascading top-down, Spearman
  similarity with the original map averaged over the cascade's steps;
* Gini: sparseness (Chalasani et al. 2020);
* ms/row: explanation time per row, batched (median of interleaved repeats).

Then the metric run against Quantus 0.6.0 on the same work (pixel flipping and faithfulness
correlation on the digits CNN with the same relevance), quoted as a ratio.

    python benchmarks/bench_faithfulness.py [--rows 200] [--steps 16] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_line  # noqa: E402

import dlbjax  # noqa: E402
from dlbjax import metrics  # noqa: E402
from dlbjax.__main__ import build_cnn, load_digits_split  # noqa: E402
from dlbjax._training import fit  # noqa: E402


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def digits_model(rows):
    X_train, y_train, X_test, y_test = load_digits_split(0)
    model = fit(build_cnn(0), X_train, y_train, epochs=15, lr=1e-2, batch_size=64, seed=0).eval()
    x = torch.from_numpy(X_test[:rows])
    with torch.no_grad():
        acc = (model(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean()
    mean = float(X_train.mean())
    return model, x, {"baseline": mean, "accuracy": acc, "fc_subset": 8, "radius": 0.05,
                      "what": f"{rows} test digits 1x8x8, baseline = dataset mean {mean:.3f}",
                      "lrp2": ("EpsilonPlusFlat", dict(method="epsilon-plus-flat"))}


def cancer_model(rows):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:rows], order[rows:]
    mu, sd = X[train].mean(0), X[train].std(0)
    X = (X - mu) / sd
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    model = fit(model, X[train], y[train], epochs=60, lr=3e-3, batch_size=32, seed=0).eval()
    x = torch.from_numpy(X[test])
    with torch.no_grad():
        acc = (model(x).argmax(1).numpy() == y[test]).mean()
    return model, x, {"baseline": 0.0, "accuracy": acc, "fc_subset": 3, "radius": 0.1,
                      "what": f"{len(test)} test rows x 30 standardised features, "
                              "baseline = 0 (the training mean)",
                      "lrp2": ("EpsilonPlusFlat", dict(method="epsilon-plus-flat"))}


def text_model(rows):
    import transformers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    positive = ["good", "great", "excellent", "wonderful", "superb"]
    negative = ["bad", "awful", "terrible", "boring", "dull"]
    neutral = ["the", "a", "movie", "film", "was", "is", "plot", "acting", "story", "really",
               "quite", "very", "and", "this", "it", "ending", "music", "cast", "so", "overall"]
    vocab = special + positive + negative + neutral
    vocab_dir = tempfile.mkdtemp()
    with open(os.path.join(vocab_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast.from_pretrained(vocab_dir)
    rng = np.random.default_rng(0)

    def sentence():
        words = list(rng.choice(neutral, size=rng.integers(3, 8)))
        label = int(rng.integers(2))
        words.insert(int(rng.integers(len(words) + 1)),
                     str(rng.choice(positive if label else negative)))
        return " ".join(words), label

    train = [sentence() for _ in range(512)]
    test = [sentence() for _ in range(rows)]
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for s in range(0, len(train), 32):
            texts, labels = zip(*train[s:s + 32])
            loss = model(**tok(list(texts), return_tensors="pt", padding=True),
                         labels=torch.tensor(labels)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    texts, labels = zip(*test)
    x = dict(tok(list(texts), return_tensors="pt", padding=True))
    with torch.no_grad():
        acc = (model(**x).logits.argmax(1).numpy() == np.array(labels)).mean()
    return model, x, {"baseline": tok.mask_token_id, "accuracy": acc, "fc_subset": 1,
                      "radius": None,
                      "what": f"{rows} synthetic sentences, tokens flipped to [MASK], padding "
                              "never flipped", "lrp2": ("AttnLRP", dict(method="attnlrp"))}


# ------------------------------------------------------------------------------------------------
# methods, metrics
# ------------------------------------------------------------------------------------------------
def methods(info):
    out = {"DLB": dict(method="dlb"), "DLB contrastive": dict(method="dlb", mode="contrastive"),
           "LRP-eps": dict(method="lrp-epsilon", epsilon=0.25)}
    name, opts = info["lrp2"]
    out[name] = opts
    out.update({"grad x input": dict(method="gradient-x-input"),
                "IG": dict(method="integrated-gradients", steps=32),
                "SmoothGrad": dict(method="smoothgrad", samples=16, noise=0.1,
                                   multiply_by_inputs=True)})
    return out


def time_rows(ex, x, repeats):
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    ex(x)  # compiled
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / n


def random_relevance(e, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in e.relevance.items():
        v = np.asarray(v.positive if hasattr(v, "positive") else v)
        r = rng.standard_normal(v.shape)
        if k == "attention_mask":
            r = np.zeros(v.shape)
        out[k] = r
    return out


def evaluate(name, model, x, info, steps, args):
    base_ex = dlbjax.Explainer(model, x)
    is_text = isinstance(x, dict)
    rows = []
    for label, opts in list(methods(info).items()) + [("random", None)]:
        try:
            ex = base_ex.replace(**opts) if opts is not None else base_ex
        except dlbjax.DLBJaxError as exc:  # a method the model's ops have no rules for
            rows.append((label, None, f"{type(exc).__name__}"))
            continue
        e = ex(x)
        rel = random_relevance(e) if opts is None else e
        target = e.target
        kw = dict(target=target, baseline=info["baseline"])
        morf = metrics.flipping_curve(base_ex, x, rel, order="morf", steps=steps, **kw)
        lerf = metrics.flipping_curve(base_ex, x, rel, order="lerf", steps=steps, **kw)
        r = {"AOPC MoRF": metrics.aopc(morf).mean(), "AOPC LeRF": metrics.aopc(lerf).mean(),
             "ABPC": metrics.abpc(morf, lerf).mean()}
        fc = metrics.faithfulness_correlation(base_ex, x, rel, subset_size=info["fc_subset"],
                                              samples=args.fc_samples, seed=0, **kw)
        r["FC"] = np.nanmean(fc)
        if opts is not None and info["radius"] is not None:
            r["MaxSens"] = np.mean(metrics.max_sensitivity(
                ex, x, radius=info["radius"], samples=args.sens_samples, seed=0, target=target))
        else:
            r["MaxSens"] = np.nan
        if opts is not None:
            sim = metrics.randomisation(ex, x, cascading=True, similarity="spearman", seed=0,
                                        target=target)
            r["Rand"] = float(np.mean([np.nanmean(v) for v in sim.values()]))
        else:
            r["Rand"] = np.nan
        r["Gini"] = np.nanmean(metrics.sparseness(rel, input="input_ids" if is_text else None))
        r["ms/row"] = time_rows(ex, x, args.repeats) if opts is not None else np.nan
        rows.append((label, r, ""))
    return rows


COLUMNS = ["AOPC MoRF", "AOPC LeRF", "ABPC", "FC", "MaxSens", "Rand", "Gini", "ms/row"]
HEAD = ["AOPC MoRF", "AOPC LeRF ↓", "ABPC", "FC", "MaxSens ↓", "Rand ↓", "Gini", "ms/row"]


def table(title, rows):
    print(f"\n### {title}\n")
    print("| method | " + " | ".join(HEAD) + " |")
    print("|---|" + "---|" * len(HEAD))
    for label, r, err in rows:
        if r is None:
            print(f"| {label} | " + " | ".join(["n/a"] * len(HEAD)) + f" |  ({err})")
            continue
        cells = ["—" if not np.isfinite(r[c]) else (f"{r[c]:.2f}" if c == "ms/row" else
                                                     f"{r[c]:.3f}") for c in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + " |")
    ranked = sorted((r["ABPC"], label) for label, r, _ in rows if r is not None)[::-1]
    print("\nABPC ranking: " + " > ".join(f"{label} ({v:.3f})" for v, label in ranked))


# ------------------------------------------------------------------------------------------------
# against Quantus
# ------------------------------------------------------------------------------------------------
def against_quantus(model, x, base, rel_map, steps, fc_samples):
    try:
        import quantus
    except ImportError:
        print("\n(quantus not installed: no comparison)")
        return
    ex = dlbjax.Explainer(model, x)
    e = ex(x)
    a = np.asarray(rel_map, np.float64)
    xn, yn = x.numpy(), e.target
    n_feat = int(np.prod(xn.shape[2:]))
    per_step = n_feat // steps

    def ours_pf():
        return metrics.flipping_curve(ex, x, a, order="morf", steps=steps, baseline=base,
                                      target=yn)

    def quantus_pf():
        m = quantus.PixelFlipping(features_in_step=per_step, perturb_baseline=base,
                                  disable_warnings=True, display_progressbar=False)
        return m(model=model, x_batch=xn, y_batch=yn, a_batch=a, device="cpu",
                 channel_first=True)

    def ours_fc():
        return metrics.faithfulness_correlation(ex, x, a, subset_size=8, samples=fc_samples,
                                                baseline=base, seed=0, target=yn)

    def quantus_fc():
        m = quantus.FaithfulnessCorrelation(
            nr_runs=fc_samples, subset_size=8, perturb_baseline=base, abs=False,
            normalise=False, return_aggregate=False, disable_warnings=True,
            display_progressbar=False)
        return m(model=model, x_batch=xn, y_batch=yn, a_batch=a, device="cpu",
                 channel_first=True)

    print(f"\n### The metric run against Quantus {quantus.__version__} (digits CNN, "
          f"{len(xn)} rows, same relevance)\n")
    print("| metric | dlbjax ms | Quantus ms | Quantus / dlbjax |")
    print("|---|---|---|---|")
    for label, ours, theirs in [("pixel flipping (MoRF)", ours_pf, quantus_pf),
                                (f"faithfulness correlation ({fc_samples} subsets)", ours_fc,
                                 quantus_fc)]:
        ours()  # compile
        t_ours, t_q = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs()
            t_q.append(time.perf_counter() - t0)
        a_, b_ = statistics.median(t_ours), statistics.median(t_q)
        print(f"| {label} | {1e3 * a_:.0f} | {1e3 * b_:.0f} | **{b_ / a_:.1f}x** |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--fc-samples", type=int, default=50)
    p.add_argument("--sens-samples", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="32 rows, fewer samples (a smoke run)")
    p.add_argument("--models", default="digits,cancer,text")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Mean of empty slice")  # constant maps: FC is NaN
    if args.quick:
        args.rows, args.fc_samples, args.sens_samples, args.repeats = 32, 10, 2, 1
    print(machine_line())
    print(f"rows {args.rows}, flipping steps {args.steps}, FC subsets {args.fc_samples}, "
          f"max-sensitivity samples {args.sens_samples}")
    builders = {"digits": digits_model, "cancer": cancer_model, "text": text_model}
    digits = None
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, x, info = builders[name](min(args.rows, 100) if name == "text" else args.rows)
        rows = evaluate(name, model, x, info, args.steps, args)
        table(f"{name}: {info['what']} (test accuracy {info['accuracy']:.3f}; "
              f"{time.perf_counter() - t0:.0f} s)", rows)
        if name == "digits":
            digits = (model, x, info)
    if digits is not None:
        model, x, info = digits
        e = dlbjax.explain(model, x, method="gradient-x-input")
        against_quantus(model, x, info["baseline"], e.relevance["input"], args.steps,
                        args.fc_samples)


if __name__ == "__main__":
    main()
