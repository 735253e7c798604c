"""dlbjax.generate: decoding equals Hugging Face / exhaustive references, sampling is reproducible,
one compilation for decoding and one for the relevance pass, and each step's token relevance
equals a separate explain() on the same prefix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import dlbjax
from dlbjax import Streams
from dlbjax._generate import _filter

import hf_zoo


@pytest.fixture(scope="module")
def llama():
    return hf_zoo.tiny("llama")


def prompt(batch=2, length=5, seed=3):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def greedy(llama):
    return dlbjax.generate(llama, prompt(), max_new_tokens=6, eos_token_id=[])


def tiny_gpt2():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_greedy_equals_hugging_face_generate(name, llama):
    model = {"llama": lambda: llama, "gpt2": tiny_gpt2}.get(name, lambda: hf_zoo.tiny(name))()
    p = prompt(seed=7)
    ours = dlbjax.generate(model, p, max_new_tokens=7, explain=False)
    hf = model.generate(**p, max_new_tokens=7, do_sample=False).numpy()
    np.testing.assert_array_equal(ours.sequences[:, :hf.shape[1]], hf)
    assert ours.compilations == {"generate": 1}


def test_greedy_with_left_padded_prompts_equals_hugging_face(llama):
    p = prompt(batch=3, length=6, seed=11)
    p["input_ids"][0, :2] = 0
    p["attention_mask"][0, :2] = 0
    p["input_ids"][2, :3] = 0
    p["attention_mask"][2, :3] = 0
    ours = dlbjax.generate(llama, p, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    hf = llama.generate(**p, max_new_tokens=5, do_sample=False, eos_token_id=None,
                        pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours.sequences, hf)
    # masked prompt padding carries no relevance for any step
    assert np.all(ours.token_relevance[0, :, :2] == 0)
    assert np.all(ours.token_relevance[2, :, :3] == 0)


def test_token_relevance_layout_and_compilations(greedy):
    B, N, L = greedy.token_relevance.shape
    T0 = greedy.prompt_length
    assert (B, N, L) == (2, 6, 11) and T0 == 5
    assert greedy.compilations == {"generate": 1, "explain": 1}
    for s in range(N):
        # zero at and after the generated token's own position, non-negative before it
        assert np.all(greedy.token_relevance[:, s, T0 + s:] == 0)
        assert np.all(greedy.token_relevance[:, s, :T0 + s] >= 0)
        assert np.all(greedy.token_relevance[:, s, :T0 + s].sum(-1) > 0)
    np.testing.assert_allclose(greedy.explanation.conservation.lost, 0, atol=1e-3)
    np.testing.assert_array_equal(greedy.new_tokens, greedy.sequences[:, T0:])
    # the per-step predictions are the logits the tokens were chosen from
    np.testing.assert_array_equal(greedy.step_logits.argmax(-1), greedy.new_tokens)


@pytest.mark.parametrize("step", [0, 3, 5])
def test_token_relevance_equals_explain_on_the_prefix(llama, greedy, step):
    T0 = greedy.prompt_length
    prefix = torch.as_tensor(greedy.sequences[:, :T0 + step])
    target = greedy.sequences[:, T0 + step]
    ref = dlbjax.explain(llama, {"input_ids": prefix, "attention_mask": torch.ones_like(prefix),
                                 "use_cache": False}, target=target, task="next-token")
    np.testing.assert_allclose(greedy.token_relevance[:, step, :T0 + step],
                               ref.relevance["input_ids"], rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_from_the_seed(llama):
    kw = dict(max_new_tokens=8, strategy="sample", temperature=1.5, explain=False, eos_token_id=[])
    a = dlbjax.generate(llama, prompt(), seed=5, **kw)
    b = dlbjax.generate(llama, prompt(), seed=5, **kw)
    c = dlbjax.generate(llama, prompt(), seed=6, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)
    # the chosen tokens' log-probabilities are those of the tempered distribution
    lp = torch.log_softmax(torch.tensor(a.step_logits) / 1.5, -1)
    chosen = torch.gather(lp, 2, torch.tensor(a.new_tokens)[..., None])[..., 0]
    np.testing.assert_allclose(a.step_logprobs, chosen.numpy(), atol=1e-5)


def test_top_k_one_and_tiny_top_p_sample_the_argmax(llama, greedy):
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        s = dlbjax.generate(llama, prompt(), max_new_tokens=6, strategy="sample", seed=1,
                            explain=False, eos_token_id=[], **kw)
        np.testing.assert_array_equal(s.sequences, greedy.sequences)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, None), (1.0, None, 0.8),
                                                     (1.3, 10, 0.5), (1.0, 0, 0.95)])
def test_filters_match_hugging_face_warpers(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(_filter(logits.numpy(), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
    keep = ~np.isinf(ours)
    np.testing.assert_allclose(ours[keep], ref.numpy()[keep], rtol=1e-6)


def test_beam_search_with_every_beam_is_exhaustive_search():
    """num_beams = vocabulary size keeps every first token, so two steps of beam search must find
    the best two-token continuation among all V^2, scored by torch."""
    torch.manual_seed(0)
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, vocab_size=24,
                         max_position_embeddings=16)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 9, 3]])
    V = 24
    out = dlbjax.generate(model, ids, max_new_tokens=2, strategy="beam", num_beams=V,
                          eos_token_id=[], explain=False)
    seqs = torch.tensor([[5, 9, 3, a, b] for a, b in itertools.product(range(V), range(V))])
    with torch.no_grad():
        lp = torch.log_softmax(model(seqs, use_cache=False).logits.double(), -1)
    score = lp[:, 2].gather(1, seqs[:, 3:4])[:, 0] + lp[:, 3].gather(1, seqs[:, 4:5])[:, 0]
    best = seqs[int(score.argmax())]
    np.testing.assert_array_equal(out.sequences[0], best.numpy())
    np.testing.assert_allclose(out.step_logprobs.sum(), float(score.max()), atol=1e-4)
    again = dlbjax.generate(model, ids, max_new_tokens=2, strategy="beam", num_beams=V,
                            eos_token_id=[], explain=False)
    np.testing.assert_array_equal(again.sequences, out.sequences)


def test_beam_search_explains_the_returned_sequence(llama):
    out = dlbjax.generate(llama, prompt(batch=1), max_new_tokens=4, strategy="beam", num_beams=3,
                          eos_token_id=[])
    T0 = out.prompt_length
    assert out.token_relevance.shape == (1, 4, T0 + 4)
    np.testing.assert_array_equal(out.explanation.target, out.new_tokens.reshape(-1))
    assert out.compilations == {"generate": 1, "explain": 1}


def test_end_token_stops_a_row_and_its_relevance(llama, greedy):
    T0 = greedy.prompt_length
    eos = int(greedy.sequences[0, T0 + 2])  # row 0 emits it at step 2
    out = dlbjax.generate(llama, prompt(), max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    hf = llama.generate(**prompt(), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                        pad_token_id=0).numpy()
    np.testing.assert_array_equal(out.sequences[:, :hf.shape[1]], hf)
    assert np.all(out.sequences[0, T0 + 3:] == 0)
    np.testing.assert_array_equal(out.steps_valid[0], [True, True, True, False, False, False])
    assert np.all(out.token_relevance[0, 3:] == 0)
    assert np.all(out.token_relevance[0, 2].sum() > 0)


def test_contrastive_generation_gives_streams(llama):
    out = dlbjax.generate(llama, prompt(batch=1), max_new_tokens=3, mode="contrastive",
                          eos_token_id=[])
    assert isinstance(out.token_relevance, Streams)
    assert out.token_relevance.positive.shape == (1, 3, out.prompt_length + 3)
    assert np.all(out.token_relevance.positive >= 0) and np.all(out.token_relevance.negative >= 0)


def test_bad_options_are_reported(llama):
    with pytest.raises(ValueError, match="strategy"):
        dlbjax.generate(llama, prompt(), strategy="nucleus")
    with pytest.raises(ValueError, match="num_beams"):
        dlbjax.generate(llama, prompt(), num_beams=3)
    with pytest.raises(ValueError, match="temperature"):
        dlbjax.generate(llama, prompt(), strategy="sample", temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dlbjax.generate(llama, prompt(), max_new_tokens=0)
    with pytest.raises(dlbjax.InputMismatchError, match="input_ids"):
        dlbjax.generate(llama, {"attention_mask": torch.ones(1, 3)})
    with pytest.raises(dlbjax.InputMismatchError, match="token_type_ids"):
        dlbjax.generate(llama, {**prompt(), "token_type_ids": torch.ones(2, 5, dtype=torch.long)})
    with pytest.raises(dlbjax.InputMismatchError, match="all zeros"):
        dlbjax.generate(llama, {"input_ids": torch.ones(1, 3, dtype=torch.long),
                                "attention_mask": torch.zeros(1, 3)})


def test_a_model_without_sequence_logits_is_refused():
    classifier = hf_zoo.tiny("bert")
    with pytest.raises(dlbjax.InputMismatchError, match="logits"):
        dlbjax.generate(classifier, prompt(), max_new_tokens=2)


def test_causal_lm_explains_without_a_use_cache_flag(llama):
    """Hugging Face decoders return a cache object unless use_cache=False; dlbjax sets it."""
    p = prompt(batch=1)
    e = dlbjax.explain(llama, p)
    assert e.task == "next-token"
    with torch.no_grad():
        ref = llama(**p, use_cache=False).logits.numpy()
    np.testing.assert_allclose(e.prediction, ref, rtol=1e-4, atol=1e-5)


def test_generation_pictures(greedy, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    fig = greedy.plot(row=1, path=tmp_path / "gen.png")
    assert (tmp_path / "gen.png").stat().st_size > 1000
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()),
                                  greedy.token_relevance[1])
    html = greedy.to_html(row=0, step=2)
    T0 = greedy.prompt_length
    assert html.count('class="dlbjax-token"') == T0 + 2  # the tokens before step 2's token
    assert f'<u class="dlbjax-generated">{greedy.sequences[0, T0 + 2]}</u>' in html
    top = int(np.argmax(greedy.token_relevance[0, 2]))
    assert 'rgba(' in html and "1.000)" in html.split('class="dlbjax-token"')[top + 1]
    assert greedy._repr_html_().count("step ") == 1


class TinyCausal(torch.nn.Module):
    """A plain torch causal LM: forward(ids) -> logits, no attention mask argument."""

    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.relu(h + a))


def test_a_plain_torch_causal_model_without_attention_mask():
    torch.manual_seed(0)
    model = TinyCausal().eval()
    ids = torch.tensor([[3, 7, 1, 9]])
    out = dlbjax.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    seq = ids.clone()
    with torch.no_grad():  # greedy by hand in torch
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(out.sequences, seq.numpy())
    for s in range(4):
        assert np.all(out.token_relevance[0, s, 4 + s:] == 0)
        ref = dlbjax.explain(model, seq[:, :4 + s], task="next-token", target=seq[:, 4 + s].numpy())
        np.testing.assert_allclose(out.token_relevance[0, s, :4 + s], ref.relevance["ids"][0],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(dlbjax.InputMismatchError, match="attention_mask"):
        dlbjax.generate(model, {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1]])})


def test_explaining_only_some_steps(llama, greedy):
    part = dlbjax.generate(llama, prompt(), max_new_tokens=6, eos_token_id=[], explain_steps=[1, 4])
    np.testing.assert_array_equal(part.sequences, greedy.sequences)
    np.testing.assert_array_equal(part.steps_explained, [False, True, False, False, True, False])
    assert part.explanation.relevance["input_ids"].shape[0] == 2 * 2
    np.testing.assert_allclose(part.token_relevance[:, [1, 4]], greedy.token_relevance[:, [1, 4]],
                               rtol=1e-5, atol=1e-6)
    assert np.all(part.token_relevance[:, [0, 2, 3, 5]] == 0)
    with pytest.raises(ValueError, match="explain_steps"):
        dlbjax.generate(llama, prompt(), max_new_tokens=2, explain_steps=[2])


def test_generator_compiles_once_for_many_prompts(llama):
    gen = dlbjax.Generator(llama, prompt_length=6, max_new_tokens=4, eos_token_id=[], batch_size=8)
    first = gen(prompt(batch=1, length=6, seed=21))
    short = prompt(batch=1, length=4, seed=22)  # left-padded inside the Generator
    second = gen(short)
    third = gen(prompt(batch=1, length=6, seed=23), strategy="sample", seed=3)
    assert gen.trace_counts == {"generate": 2, "explain": 1}  # greedy and sampling loops
    assert first.compilations == {"generate": 1, "explain": 1}
    assert second.compilations == {"generate": 0, "explain": 0}
    assert third.compilations == {"generate": 1, "explain": 0}
    hf = llama.generate(**short, max_new_tokens=4, do_sample=False, eos_token_id=None,
                        pad_token_id=0).numpy()
    np.testing.assert_array_equal(second.sequences[:, 2:], hf)
    assert np.all(second.token_relevance[:, :, :2] == 0)
    # the same relevance as a one-off generate on the unpadded prompt
    alone = dlbjax.generate(llama, short, max_new_tokens=4, eos_token_id=[])
    np.testing.assert_allclose(second.token_relevance[:, :, 2:], alone.token_relevance,
                               rtol=1e-4, atol=1e-5)
    assert second.explanation.relevance["input_ids"].shape == (4, 10)  # padding rows dropped
    with pytest.raises(dlbjax.InputMismatchError, match="prompt_length=6"):
        gen(prompt(batch=1, length=7))
