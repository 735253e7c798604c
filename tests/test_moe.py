"""Mixture-of-experts models: tiny random-weight Qwen3-MoE, OLMoE and GPT-OSS. Forward equals
torch, routing is a constant for relevance by default, the k selected experts share each token's
relevance in proportion to |routing weight x expert output|, and explanation.experts reports it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers as tf

import dlbjax
from dlbjax import Streams
from dlbjax.engine.interpret import constants_to_jax, evaluate

MODELS = ["qwen3_moe", "olmoe", "gpt_oss"]
K = 2


def tiny_moe(name: str):
    torch.manual_seed(0)
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    if name == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(head_dim=8, moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=K, norm_topk_prob=True, decoder_sparse_step=1,
                                **base)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    if name == "olmoe":
        cfg = tf.OlmoeConfig(num_experts=4, num_experts_per_tok=K, eos_token_id=2, pad_token_id=1,
                             **base)
        return tf.OlmoeForCausalLM(cfg).eval()
    if name == "gpt_oss":
        cfg = tf.GptOssConfig(head_dim=8, num_local_experts=4, num_experts_per_tok=K,
                              sliding_window=8, **base)
        return tf.GptOssForCausalLM(cfg).eval()
    raise ValueError(name)


def tokens(batch=2, length=6, seed=1):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    model = tiny_moe(request.param)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = getattr(model.config, "_experts_implementation", None)
    x = tokens()
    explainer = dlbjax.Explainer(model, x, task="next-token", layers=True)
    return request.param, model, x, explainer, explainer(x), before, impl


def test_forward_matches_torch_and_relevance_is_conserved(case):
    name, model, x, explainer, e, _, _ = case
    with torch.no_grad():
        ref = model(**x).logits.numpy()
    err = np.abs(np.asarray(e.prediction) - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, (name, err)
    np.testing.assert_allclose(e.conservation.inputs + e.conservation.bias, 100.0, atol=1e-2)
    assert np.all(e.relevance["input_ids"] >= 0)
    assert len(explainer.moe_layers) == 2


def test_the_users_model_is_untouched(case):
    name, model, _, _, _, before, impl = case
    assert getattr(model.config, "_experts_implementation", None) == impl
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_expert_report_shapes_and_consistency(case):
    name, _, x, explainer, e, _, _ = case
    assert len(e.experts) == 2
    for layer in e.experts:
        assert layer["per_expert"].shape == (2, 4)
        assert layer["per_token"].shape == (2, 6, 4)
        np.testing.assert_allclose(layer["per_token"].sum(1), layer["per_expert"], rtol=1e-6)
        assert np.all(layer["per_token"] >= 0)
        # at most the k selected experts of a token get relevance
        assert np.all((layer["per_token"] > 0).sum(-1) <= K)
        assert np.all(layer["per_expert"].sum(-1) > 0)


def test_vmap_equals_a_loop_over_rows(case):
    name, model, x, explainer, e, _, _ = case
    for r in range(2):
        row = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
        one = explainer(row)
        np.testing.assert_allclose(one.relevance["input_ids"][0], e.relevance["input_ids"][r],
                                   rtol=1e-4, atol=1e-5)
        for a, b in zip(one.experts, e.experts):
            np.testing.assert_allclose(a["per_token"][0], b["per_token"][r], rtol=1e-4, atol=1e-5)


def _values(explainer, x, vars_):
    """Forward values of some IR variables for row 0 (the program with those as its outputs)."""
    program = dataclasses.replace(explainer.program, outputs=tuple(vars_),
                                  output_names=tuple(v.name for v in vars_))
    row = [np.asarray(x[v.name][:1]).astype(np.int32) for v in program.inputs]
    return [np.asarray(a) for a in evaluate(program, constants_to_jax(program), row)]


def _layer(e, var):
    hits = [v for k, v in e.layers.items() if k.endswith("/" + var.name)]
    assert len(hits) == 1
    return np.asarray(hits[0])[0]


def test_selected_experts_share_in_proportion_to_weighted_output(case):
    """Spec §4.2/§4.4 for the sum over the k selected experts: R[t, j, h] = R_sum[t, h] x
    |w_j e_j[t, h]| / sum_i |w_i e_i[t, h]| (default mode, no bias at that sum)."""
    name, _, x, explainer, e, _, _ = case
    consumers = explainer.program.consumers()
    for layer in explainer.moe_layers:
        (total_eqn,) = [c for c in consumers[layer.weighted] if c.op == "aten.sum.dim_IntList"]
        total = total_eqn.outputs[0]
        weighted_val, = _values(explainer, x, [layer.weighted])
        R_w, R_sum = _layer(e, layer.weighted), _layer(e, total)
        mag = np.abs(weighted_val.reshape(R_w.shape))
        share = mag / np.maximum(mag.sum(1, keepdims=True), 1e-30)
        np.testing.assert_allclose(R_w, R_sum.reshape(R_w.shape[0], 1, -1) * share,
                                   rtol=1e-4, atol=1e-6)


def test_router_gets_no_relevance_unless_asked(case):
    name, model, x, explainer, e, _, _ = case
    topk = [eq for eq in explainer.program.eqns if eq.op == "aten.topk.default"]
    router_inputs = [eq.args[0] for eq in topk]
    keys = {k for k in e.layers for v in router_inputs if k.endswith("/" + v.name)}
    assert all(np.all(np.asarray(e.layers[k]) == 0) for k in keys)
    routed = dlbjax.Explainer(model, x, task="next-token", layers=True, router_relevance=True)(x)
    np.testing.assert_allclose(routed.conservation.inputs + routed.conservation.bias, 100.0,
                               atol=1e-2)
    gets = [np.abs(np.asarray(v)).sum() for k, v in routed.layers.items()
            if any(k.endswith("/" + r.name) for r in router_inputs)]
    # softmax routers: the router logits now receive relevance
    assert gets and max(gets) > 0


def test_contrastive_expert_report_has_two_streams():
    model = tiny_moe("qwen3_moe")
    e = dlbjax.explain(model, tokens(batch=1), task="next-token", mode="contrastive")
    assert isinstance(e.experts[0]["per_expert"], Streams)
    assert e.experts[0]["per_token"].positive.shape == (1, 6, 4)


def test_jit_compiles_once_for_repeated_calls():
    model = tiny_moe("olmoe")
    x = tokens()
    explainer = dlbjax.Explainer(model, x, task="next-token")
    a = explainer(x)
    b = explainer(tokens(seed=9))
    assert explainer.trace_count == 1
    assert not np.array_equal(a.relevance["input_ids"], b.relevance["input_ids"])


@pytest.mark.skipif(not hasattr(tf, "JetMoeForCausalLM"), reason="transformers has no JetMoe")
def test_jetmoe_explains_through_its_substitution():
    """JetMoE's routers use .tolist()/sort/index_add; the built-in export-friendly substitution
    (importers/_substitute.py, tested in tests/test_substitutions.py) makes them dense."""
    torch.manual_seed(0)
    cfg = tf.JetMoeConfig(hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                          kv_channels=8, intermediate_size=32, num_local_experts=4,
                          num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64)
    model = tf.JetMoeForCausalLM(cfg).eval()
    x = tokens(batch=1)
    e = dlbjax.explain(model, x, task="next-token")
    with torch.no_grad():
        ref = model(**x).logits.numpy()
    assert np.abs(np.asarray(e.prediction) - ref).max() / np.abs(ref).max() <= 1e-5
    assert len(e.experts) == 2  # the mixture of attention experts and of MLP experts
    assert type(model.model.layers[0].mlp).__name__ == "JetMoeMoE"


def test_generation_with_an_moe_model():
    model = tiny_moe("qwen3_moe")
    out = dlbjax.generate(model, tokens(batch=1, length=4), max_new_tokens=3, eos_token_id=[])
    hf = model.generate(tokens(batch=1, length=4)["input_ids"], max_new_tokens=3, do_sample=False,
                        eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(out.sequences, hf)
    assert out.token_relevance.shape == (1, 3, 7)
