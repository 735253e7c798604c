"""Export-friendly substitutions (importers/_substitute.py): JetMoE's data-dependent routers are
replaced, on a copy that shares the model's tensors, by dense top-k dispatch with the same output;
the copy is checked against the model at import; users can register their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

import dlbjax
from dlbjax import Streams
from dlbjax.importers import (register_substitution, substituted_copy, substitutions,
                              unregister_substitution)
from dlbjax.importers._substitute import StaticJetMoeMoA, StaticJetMoeMoE

pytestmark = pytest.mark.skipif(not hasattr(tf, "JetMoeForCausalLM"),
                                reason="transformers has no JetMoe")
K, E, LAYERS = 2, 4, 2


def tiny_jetmoe():
    torch.manual_seed(0)
    cfg = tf.JetMoeConfig(hidden_size=32, num_hidden_layers=LAYERS, num_key_value_heads=2,
                          kv_channels=8, intermediate_size=32, num_local_experts=E,
                          num_experts_per_tok=K, vocab_size=128, max_position_embeddings=64)
    model = tf.JetMoeForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero expert biases, so the bias path is exercised
        for m in model.modules():
            if type(m).__name__ in ("JetMoeMoE", "JetMoeMoA"):
                m.bias.normal_(0, 0.1)
    return model


def tokens(batch=2, length=6, seed=1):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def jetmoe():
    model = tiny_jetmoe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    return model, before, ptrs, classes


def test_builtin_substitutions_are_listed():
    names = [s.name for s in substitutions()]
    assert {"jetmoe-moe", "jetmoe-moa", "dbrx-experts"} <= set(names)


def test_static_moe_equals_jetmoe_per_module(jetmoe):
    model = jetmoe[0]
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(3))
    for layer in model.model.layers:
        static = StaticJetMoeMoE(layer.mlp)
        assert static.input_linear.weight is layer.mlp.input_linear.weight  # shared, not copied
        with torch.no_grad():
            ref, out = layer.mlp(x), static(x)
        assert (out - ref).abs().max() <= 1e-6


def test_static_moa_equals_jetmoe_map_reduce_and_attention(jetmoe):
    model = jetmoe[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 32, generator=g)
    for layer in model.model.layers:
        moa = layer.self_attention.experts
        static = StaticJetMoeMoA(moa)
        with torch.no_grad():
            q_ref, logits_ref, topo_ref = moa.map(x)
            q, logits, topo = static.map(x)
            assert (q - q_ref).abs().max() <= 1e-6
            assert torch.equal(logits, logits_ref)
            a = torch.randn(3, 7, K, moa.hidden_size, generator=g)
            assert (static.reduce(a, topo) - moa.reduce(a, topo_ref)).abs().max() <= 1e-6
    # the whole attention module (it calls map and reduce) and the decoder layer, substituted
    pos = torch.arange(7)[None].expand(3, 7)
    cos_sin = model.model.rotary_emb(x, pos)
    layer = model.model.layers[0]
    static_layer = substituted_copy(layer)
    assert type(static_layer.mlp) is StaticJetMoeMoE
    assert type(static_layer.self_attention.experts) is StaticJetMoeMoA
    assert type(layer.mlp).__name__ == "JetMoeMoE"
    with torch.no_grad():
        ref = layer.self_attention(x, position_embeddings=cos_sin)
        out = static_layer.self_attention(x, position_embeddings=cos_sin)
    assert (out[0] - ref[0]).abs().max() <= 1e-6 and torch.equal(out[2], ref[2])


@pytest.fixture(scope="module", params=["default", "contrastive"])
def explained(request, jetmoe):
    model = jetmoe[0]
    x = tokens()
    explainer = dlbjax.Explainer(model, x, task="next-token", mode=request.param)
    return request.param, model, x, explainer, explainer(x)


def test_jetmoe_explains_forward_equals_torch(explained):
    mode, model, x, _, e = explained
    with torch.no_grad():
        ref = model(**x, use_cache=False).logits.numpy()
    assert _rel(e.prediction, ref) <= 1e-5


def test_jetmoe_relevance_is_finite_and_conserved(explained):
    mode, _, _, _, e = explained
    rel = e.relevance["input_ids"]
    streams = (rel.positive, rel.negative) if mode == "contrastive" else (rel,)
    assert all(np.all(np.isfinite(r)) for r in streams)
    c = e.conservation
    seeds = (c.seed.positive, c.seed.negative) if mode == "contrastive" else (c.seed,)
    losts = (c.lost.positive, c.lost.negative) if mode == "contrastive" else (c.lost,)
    for s, lost in zip(seeds, losts):
        assert np.abs(lost).max() <= 1e-4 * np.abs(s).max()


def test_jetmoe_expert_report(explained):
    mode, _, x, explainer, e = explained
    # per layer: the mixture of attention experts, then the mixture of MLP experts
    names = [layer["layer"] for layer in e.experts]
    assert names == [f"model.layers.{i}.{part}" for i in range(LAYERS)
                     for part in ("self_attention", "mlp")]
    assert all(m.num_experts == E for m in explainer.moe_layers)
    for layer in e.experts:
        per_expert, per_token = layer["per_expert"], layer["per_token"]
        if mode == "contrastive":
            assert isinstance(per_expert, Streams)
            per_expert, per_token = per_expert.positive, per_token.positive
        assert per_expert.shape == (2, E) and per_token.shape == (2, 6, E)
        assert np.all(np.isfinite(per_token))
        assert np.all((per_token != 0).sum(-1) <= K)  # only the k selected experts get relevance
        if mode == "default":
            np.testing.assert_allclose(per_token.sum(1), per_expert, rtol=1e-5, atol=1e-6)
            assert np.all(per_expert.sum(-1) > 0)


def test_the_users_jetmoe_is_untouched(explained, jetmoe):
    model, before, ptrs, classes = jetmoe
    assert [type(m) for m in model.modules()] == classes
    assert type(model.model.layers[0].mlp).__name__ == "JetMoeMoE"
    assert type(model.model.layers[0].self_attention.experts).__name__ == "JetMoeMoA"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].data_ptr() == ptrs[k] for k in before)


# --- user-registered substitutions -------------------------------------------------------------

class DataDependentGate(nn.Module):
    """ReLU written with a data-dependent branch: ``.item()`` cannot be exported."""

    def forward(self, y):
        if y.max().item() > 0:
            return torch.relu(y)
        return torch.zeros_like(y)


class StaticGate(nn.Module):
    def forward(self, y):
        return torch.relu(y)


class WrongGate(nn.Module):
    def forward(self, y):
        return torch.relu(y) * 2.0


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), DataDependentGate(), nn.Linear(8, 3)).eval()


@pytest.fixture
def cleanup():
    yield
    for s in substitutions():
        if s.name.startswith("test-"):
            unregister_substitution(s.name)


def test_a_toy_with_item_fails_without_a_substitution():
    with pytest.raises(dlbjax.ExportError, match="data-dependent"):
        dlbjax.explain(toy(), torch.randn(2, 5))


def test_a_user_registered_substitution_is_used(cleanup):
    made = []

    def factory(module):
        made.append(module)
        return StaticGate()

    entry = register_substitution(DataDependentGate, factory, name="test-gate")
    assert entry in substitutions()
    model, x = toy(), torch.randn(4, 5, generator=torch.Generator().manual_seed(5))
    e = dlbjax.explain(model, x)
    assert made and all(type(m) is DataDependentGate for m in made)
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel(e.prediction, ref) <= 1e-6
    c = e.conservation
    assert np.abs(c.lost).max() <= 1e-4 * np.abs(c.seed).max()
    assert type(model[1]) is DataDependentGate


def test_a_wrong_substitution_raises_at_import_naming_it(cleanup):
    register_substitution(DataDependentGate, lambda m: WrongGate(), name="test-wrong-gate")
    with pytest.raises(dlbjax.ExportError, match="test-wrong-gate"):
        dlbjax.explain(toy(), torch.randn(2, 5))


def test_registering_a_key_twice_raises_unless_replace(cleanup):
    register_substitution(DataDependentGate, lambda m: WrongGate(), name="test-gate")
    with pytest.raises(dlbjax.DuplicateRegistrationError):
        register_substitution(DataDependentGate, lambda m: StaticGate(), name="test-other")
    with pytest.raises(dlbjax.DuplicateRegistrationError):  # the same name, another key
        register_substitution(lambda m: False, lambda m: StaticGate(), name="test-gate")
    with pytest.raises(dlbjax.DuplicateRegistrationError):  # a class is its qualified name
        register_substitution(tf.models.jetmoe.modeling_jetmoe.JetMoeMoE, StaticJetMoeMoE)
    register_substitution(DataDependentGate, lambda m: StaticGate(), name="test-gate",
                          replace=True)
    assert [s.name for s in substitutions()].count("test-gate") == 1
    e = dlbjax.explain(toy(), torch.randn(2, 5))  # the replacement is the one used
    assert all(np.all(np.isfinite(r)) for r in e.relevance.values())


def test_a_predicate_key(cleanup):
    register_substitution(lambda m: isinstance(m, DataDependentGate), lambda m: StaticGate(),
                          name="test-predicate")
    model = toy()
    static = substituted_copy(model, (torch.randn(2, 5),))
    assert type(static[1]) is StaticGate and type(model[1]) is DataDependentGate
    assert static[0].weight is model[0].weight  # the copy shares the model's tensors


# --- DBRX: its experts loop over nonzero() with index_add_ -------------------------------------

@pytest.mark.skipif(not hasattr(tf, "DbrxForCausalLM"), reason="transformers has no DBRX")
def test_dbrx_experts_substitution_explains():
    from dlbjax.importers._substitute import StaticDbrxExperts
    torch.manual_seed(0)
    cfg = tf.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": E, "moe_top_k": K})
    model = tf.DbrxForCausalLM(cfg).eval()
    ffn = model.transformer.blocks[0].ffn
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        weights, index = ffn.route_tokens_to_experts(ffn.router(h))
        ref = ffn.experts(h, index, weights)
        out = StaticDbrxExperts(ffn.experts)(h, index, weights)
    assert (out - ref).abs().max() <= 1e-6
    x = tokens(batch=1)
    e = dlbjax.explain(model, x, task="next-token")
    with torch.no_grad():
        logits = model(**x).logits.numpy()
    assert _rel(e.prediction, logits) <= 1e-5
    assert np.abs(e.conservation.lost).max() <= 1e-4 * np.abs(e.conservation.seed).max()
    assert len(e.experts) == 2 and e.experts[0]["per_expert"].shape == (1, E)
    assert type(model.transformer.blocks[0].ffn.experts).__name__ == "DbrxExperts"
