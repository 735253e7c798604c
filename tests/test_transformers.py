"""Hugging Face transformers built from tiny random configs: BERT, RoBERTa, DistilBERT, ALBERT,
ELECTRA (sequence classification), ViT (image classification), LLaMA and Qwen3 (causal LM), each
with sdpa and eager attention. The JAX forward matches torch, explanations run under jit and
vmap, padded tokens get exactly 0, all maps are non-negative, conservation is reported, and where
the seed sits matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dlbjax
from hf_zoo import ALL, DECODERS, ENCODERS, inputs, tiny


def _padded(name):
    inp = inputs(name, batch=3, length=8)
    if name == "vit":
        return inp
    mask = inp["attention_mask"].clone()
    mask[0, 5:] = 0  # right padding
    if name in DECODERS:
        mask[1, :3] = 0  # left padding (the last position stays real)
    inp["attention_mask"] = mask
    return inp


def _torch_logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits.numpy()


_CACHE = {}


def _explained(name, attn):
    """(model, padded inputs, explanation) computed once per model variant."""
    if (name, attn) not in _CACHE:
        model = tiny(name, attn)
        inp = _padded(name)
        ex = dlbjax.Explainer(model, inp)
        _CACHE[(name, attn)] = (model, inp, ex, ex(inp))
    return _CACHE[(name, attn)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_forward_and_explanation(name, attn):
    model, inp, ex, e = _explained(name, attn)
    ref = _torch_logits(model, inp)
    err = np.abs(e.prediction - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, err
    key = "pixel_values" if name == "vit" else "input_ids"
    rel = e.relevance[key]
    assert rel.shape == tuple(inp[key].shape)
    assert np.all(np.isfinite(rel)) and rel.min() >= 0
    expected_task = "next-token" if name in DECODERS else "classification"
    assert e.task == expected_task
    if name != "vit":
        # the attention mask carries no relevance by construction: reported as zeros
        np.testing.assert_array_equal(e.relevance["attention_mask"], 0)
        assert e.relevance["attention_mask"].shape == tuple(inp["attention_mask"].shape)
        mask = inp["attention_mask"].numpy()
        # padded tokens get exactly 0 (right padding, and left padding for decoders)
        assert np.all(rel[mask == 0] == 0)
    c = e.conservation
    np.testing.assert_allclose(c.seed, 100.0)
    np.testing.assert_allclose(c.inputs + c.bias + c.params + c.lost, c.seed, rtol=1e-5)
    # what the rules could not pass on: nothing (ViT's class token is booked under params)
    np.testing.assert_allclose(c.lost, 0.0, atol=1e-3)
    assert np.all(c.inputs > 0)
    if name in DECODERS:
        # no biases and no constant addends in LLaMA/Qwen3: everything reaches the tokens
        np.testing.assert_allclose(c.inputs, 100.0, rtol=1e-4)
    assert ex.trace_count == 1


@pytest.mark.parametrize("name", ["bert", "distilbert", "llama"])
def test_sdpa_and_eager_attention_give_the_same_relevance(name):
    """§9.8: SDPA kept whole and written-out attention are one rule."""
    _, _, _, a = _explained(name, "sdpa")
    _, _, _, b = _explained(name, "eager")
    np.testing.assert_allclose(a.relevance["input_ids"], b.relevance["input_ids"], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["bert", "qwen3"])
def test_vmap_equals_loop_and_contrastive(name):
    model, inp, ex, e = _explained(name, "sdpa")
    for i in range(3):
        row = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        r = ex(row)
        np.testing.assert_allclose(r.relevance["input_ids"][0], e.relevance["input_ids"][i],
                                   rtol=1e-4, atol=1e-5)
    ec = dlbjax.explain(model, inp, mode="contrastive")
    pos, neg = ec.relevance["input_ids"].positive, ec.relevance["input_ids"].negative
    assert pos.min() >= 0 and neg.min() >= 0
    mask = inp["attention_mask"].numpy()
    assert np.all(pos[mask == 0] == 0) and np.all(neg[mask == 0] == 0)
    total = ec.conservation.seed.positive + ec.conservation.seed.negative
    np.testing.assert_allclose(total, 100.0, rtol=1e-5)


def test_placement_matters_for_next_token():
    """Seeding another position (shorter mask) changes which tokens are relevant."""
    model, inp, ex, e = _explained("llama", "sdpa")
    short = dict(inp)
    short["attention_mask"] = torch.ones_like(inp["attention_mask"])
    short["attention_mask"][:, 4:] = 0
    e2 = ex(short)
    assert np.all(e2.relevance["input_ids"][:, 4:] == 0)
    assert not np.allclose(e2.relevance["input_ids"][2], e.relevance["input_ids"][2])


def test_next_token_target_and_seed_position():
    model, inp, ex, e = _explained("qwen3", "sdpa")
    logits = _torch_logits(model, inp)
    last = [4, 7, 7]  # last real position per row
    np.testing.assert_array_equal(e.target, [logits[i, last[i]].argmax() for i in range(3)])
    e2 = ex(inp, target=5)
    assert e2.target.tolist() == [5, 5, 5]
    with pytest.raises(dlbjax.TargetError):
        ex(inp, target=128)


def test_batch_encoding_from_a_tokenizer(tmp_path):
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    enc = tok(["w1 w2 w3", "w4 w5 w6 w7 w8 w9"], padding=True, return_tensors="pt")
    model = tiny("bert")
    e = dlbjax.explain(model, enc)
    assert set(e.relevance) == {"input_ids", "token_type_ids", "attention_mask"}
    assert e.relevance["input_ids"].shape == tuple(enc["input_ids"].shape)
    assert np.all(e.relevance["input_ids"][enc["attention_mask"].numpy() == 0] == 0)
    # token_type_ids passed as an input make their embedding lookup relevance-carrying (§9.2)
    assert e.relevance["token_type_ids"].sum() > 0


def test_length_buckets_compile_once_per_bucket():
    model = tiny("bert")
    ex = dlbjax.Explainer(model, inputs("bert", batch=1, length=5), buckets=(8, 16))
    assert ex.buckets == (8, 16)
    results = {}
    for length in (3, 5, 8, 11, 16, 6):
        inp = inputs("bert", batch=2, length=length, seed=length)
        e = ex(inp)
        assert e.relevance["input_ids"].shape == (2, length)
        results[length] = (inp, e)
    assert ex.trace_count == 2  # one compilation per bucket, not per length
    inp, e = results[11]
    ref = dlbjax.explain(model, inp)
    np.testing.assert_allclose(e.relevance["input_ids"], ref.relevance["input_ids"], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(e.prediction, ref.prediction, rtol=1e-5, atol=1e-6)
    with pytest.raises(dlbjax.InputMismatchError, match="largest bucket"):
        ex(inputs("bert", batch=1, length=20))


def test_layers_keep_the_embedding_map():
    model = tiny("bert")
    inp = inputs("bert", batch=1, length=6)
    e = dlbjax.explain(model, inp, layers=True)
    word = [k for k in e.layers if k.startswith("bert.embeddings.word_embeddings/")]
    assert word, list(e.layers)[:10]
    hidden_map = e.layers[word[0]]
    assert hidden_map.shape == (1, 6, 32)
    np.testing.assert_allclose(hidden_map.sum(-1), e.relevance["input_ids"], rtol=1e-5, atol=1e-6)


def test_outputs_whose_batch_axis_is_not_first_are_joined_along_it():
    """XLNet returns ``mems`` as [T, B, d]: the per-row results join along B (not into a
    reshape that cannot work), and equal torch's."""
    import zoo

    model, x = zoo._xlnet()
    e = dlbjax.explain(model, x)
    with torch.no_grad():
        mems = model(**x).mems
    assert mems and all(m.shape[1] == 2 for m in mems)
    for m in mems:
        m = m.numpy()
        matches = [o for o in e.outputs.values() if np.shape(o) == m.shape and
                   np.allclose(o, m, rtol=1e-5, atol=1e-6)]
        assert matches, "no output equals torch's mems"
