"""Transformers written in plain JAX and in torch with identical weights (issue 12): a small
encoder (token embedding, learned positions, multi-head attention with a padding mask, LayerNorm
written out as flax writes it, GELU MLP, residuals, first-token pooling, a classifier) and a
small causal decoder (RMSNorm as flax writes it, rotary embeddings, SwiGLU, grouped-query
attention, a causal mask, an LM head; the last token's top logit explained). The JAX import gives
the JAX function's forward and torch's forward and relevance in both modes; padded tokens get
exactly 0. Unit tests for each primitive mapping of issue 12 follow."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dlbjax
from dlbjax.importers import import_jax
from twins import close as _close

V, T, D, H = 20, 6, 16, 2




def _rng_params(shapes, seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, 0.3, s).astype(np.float32) if not k.endswith("scale")
                else (1 + rng.normal(0, 0.1, s)).astype(np.float32)) for k, s in shapes.items()}


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _set_linear(lin, kernel, bias=None):
    with torch.no_grad():
        lin.weight.copy_(_t(kernel.T))  # [in, out] -> [out, in]
        if bias is not None:
            lin.bias.copy_(_t(bias))


# ---- the encoder -------------------------------------------------------------------------------
def _enc_params(seed=0):
    shapes = {"tok": (V, D), "pos": (T, D), "ln1.scale": (D,), "ln1.bias": (D,),
              "ln2.scale": (D,), "ln2.bias": (D,), "f1.kernel": (D, 2 * D), "f1.bias": (2 * D,),
              "f2.kernel": (2 * D, D), "f2.bias": (D,), "head.kernel": (D, 3), "head.bias": (3,)}
    for n in "qkvo":
        shapes[f"{n}.kernel"], shapes[f"{n}.bias"] = (D, D), (D,)
    return _rng_params(shapes, seed)


def flax_layer_norm(x, scale, bias, eps=1e-6):
    """flax.nnx.LayerNorm's jaxpr form: var = max(0, mean(x^2) - mean(x)^2)."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean))
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


def encoder(p, input_ids, attention_mask):
    B, n = input_ids.shape
    dh = D // H
    x = p["tok"][input_ids] + p["pos"][:n]
    h = flax_layer_norm(x, p["ln1.scale"], p["ln1.bias"])

    def heads(name):
        y = h @ p[f"{name}.kernel"] + p[f"{name}.bias"]
        return y.reshape(B, n, H, dh).transpose(0, 2, 1, 3)

    q, k, v = heads("q"), heads("k"), heads("v")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    scores = jnp.where(attention_mask[:, None, None, :] == 0, -1e9, scores)
    a = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, n, D)
    x = x + (a @ p["o.kernel"] + p["o.bias"])
    h = flax_layer_norm(x, p["ln2.scale"], p["ln2.bias"])
    h = jax.nn.gelu(h @ p["f1.kernel"] + p["f1.bias"], approximate=False)
    x = x + (h @ p["f2.kernel"] + p["f2.bias"])
    return x[:, 0] @ p["head.kernel"] + p["head.bias"]


class TorchEncoder(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Parameter(_t(p["pos"]))
        for n in "qkvo":
            setattr(self, n, nn.Linear(D, D))
            _set_linear(getattr(self, n), p[f"{n}.kernel"], p[f"{n}.bias"])
        self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
        self.f1, self.f2, self.head = nn.Linear(D, 2 * D), nn.Linear(2 * D, D), nn.Linear(D, 3)
        for n in ("f1", "f2", "head"):
            _set_linear(getattr(self, n), p[f"{n}.kernel"], p[f"{n}.bias"])
        with torch.no_grad():
            self.tok.weight.copy_(_t(p["tok"]))
            for n in ("ln1", "ln2"):
                getattr(self, n).weight.copy_(_t(p[f"{n}.scale"]))
                getattr(self, n).bias.copy_(_t(p[f"{n}.bias"]))

    def forward(self, input_ids, attention_mask):
        B, n = input_ids.shape
        dh = D // H
        x = self.tok(input_ids) + self.pos[:n]
        h = self.ln1(x)
        q, k, v = (getattr(self, m)(h).view(B, n, H, dh).transpose(1, 2) for m in "qkv")
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, -1e9)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, n, D)
        x = x + self.o(a)
        x = x + self.f2(F.gelu(self.f1(self.ln2(x))))
        return self.head(x[:, 0])


@pytest.fixture(scope="module")
def enc_case():
    p = _enc_params()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[0, 4:] = 0
    mask[2, 3:] = 0
    return p, ids, mask, TorchEncoder(p).eval()


def test_encoder_program_keeps_layers_whole(enc_case):
    p, ids, mask, _ = enc_case
    ops = [e.op for e in import_jax(encoder, p, {"input_ids": ids[:1],
                                                 "attention_mask": mask[:1]}).eqns]
    assert ops.count("aten.layer_norm.default") == 2
    assert ops.count("aten.embedding.default") == 1
    assert ops.count("aten.softmax.int") == 1 and ops.count("aten.gelu.default") == 1
    assert ops.count("aten.matmul.default") == 2 and "aten.where.self" in ops
    assert "aten.rsqrt.default" not in ops


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_encoder_relevance_equals_torch(enc_case, mode):
    p, ids, mask, tmodel = enc_case
    inputs = {"input_ids": ids, "attention_mask": mask}
    ej = dlbjax.explain(encoder, inputs, params=p, mode=mode)
    et = dlbjax.explain(tmodel, (torch.from_numpy(ids.astype(np.int64)),
                                 torch.from_numpy(mask.astype(np.int64))), mode=mode)
    _close(ej.prediction, encoder(p, ids, mask))
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["input_ids"], et.relevance["input_ids"])
    rj, rt = np.asarray(ej.relevance["input_ids"]), np.asarray(et.relevance["input_ids"])
    pad = np.broadcast_to(mask == 0, rj.shape)
    assert np.all(rt[pad] == 0) and np.all(rj[pad] == 0)  # padded tokens: exactly 0


def test_encoder_batch_equals_rows_jit_and_vmap(enc_case):
    p, ids, mask, _ = enc_case
    inputs = {"input_ids": ids, "attention_mask": mask}
    ex = dlbjax.Explainer(encoder, {k: v[:1] for k, v in inputs.items()}, params=p)
    whole = ex(inputs)
    for i in range(len(ids)):
        one = ex({k: v[i:i + 1] for k, v in inputs.items()})
        _close(whole.relevance["input_ids"][i], one.relevance["input_ids"][0])
    f = ex.relevance_function()
    seeds = jnp.asarray(np.random.default_rng(4).random((len(ids), 1, 3)), jnp.float32)
    rows = (jnp.asarray(ids)[:, None], jnp.asarray(mask)[:, None])
    batched = jax.jit(jax.vmap(lambda a, m, s: f(ex.constants, (a, m), (s,)).relevance[
        "input_ids"][0]))(rows[0], rows[1], seeds)
    for i in range(len(ids)):
        one = f(ex.constants, (rows[0][i], rows[1][i]), (seeds[i],)).relevance["input_ids"][0]
        _close(batched[i], one)


# ---- the causal decoder ------------------------------------------------------------------------
DV, DD, DH, KV, DHD, FF = 24, 16, 4, 2, 4, 24  # vocab, width, heads, kv heads, head dim, mlp


def _dec_params(seed=2):
    shapes = {"emb": (DV, DD), "n1.scale": (DD,), "n2.scale": (DD,), "nf.scale": (DD,),
              "q": (DD, DH * DHD), "k": (DD, KV * DHD), "v": (DD, KV * DHD), "o": (DH * DHD, DD),
              "gate": (DD, FF), "up": (DD, FF), "down": (FF, DD), "lm": (DD, DV)}
    return _rng_params(shapes, seed)


def _rotary(n):
    inv = 1.0 / (10000 ** (np.arange(0, DHD, 2) / DHD))
    ang = np.outer(np.arange(n), inv)
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def flax_rms_norm(x, scale, eps=1e-6):
    """flax.nnx.RMSNorm's jaxpr form."""
    ms = jnp.mean(jnp.square(x), -1, keepdims=True)
    return x * (jax.lax.rsqrt(ms + eps) * scale)


def decoder(p, input_ids):
    B, n = input_ids.shape
    cos, sin = _rotary(n)
    x = p["emb"][input_ids]
    h = flax_rms_norm(x, p["n1.scale"])

    def rot(t):
        half = DHD // 2
        return t * cos + jnp.concatenate([-t[..., half:], t[..., :half]], -1) * sin

    q = rot((h @ p["q"]).reshape(B, n, DH, DHD).transpose(0, 2, 1, 3))
    k = rot((h @ p["k"]).reshape(B, n, KV, DHD).transpose(0, 2, 1, 3))
    v = (h @ p["v"]).reshape(B, n, KV, DHD).transpose(0, 2, 1, 3)
    rep = DH // KV
    k = jnp.broadcast_to(k[:, :, None], (B, KV, rep, n, DHD)).reshape(B, DH, n, DHD)
    v = jnp.broadcast_to(v[:, :, None], (B, KV, rep, n, DHD)).reshape(B, DH, n, DHD)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(DHD)
    causal = jnp.tril(jnp.ones((n, n), bool))
    scores = jnp.where(causal, scores, -1e9)
    a = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, n, DH * DHD)
    x = x + a @ p["o"]
    h = flax_rms_norm(x, p["n2.scale"])
    x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
    logits = flax_rms_norm(x, p["nf.scale"]) @ p["lm"]
    return logits[:, -1]


class TorchDecoder(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.emb = nn.Embedding(DV, DD)
        self.n1, self.n2, self.nf = (nn.RMSNorm(DD, eps=1e-6) for _ in range(3))
        dims = {"q": (DD, DH * DHD), "k": (DD, KV * DHD), "v": (DD, KV * DHD),
                "o": (DH * DHD, DD), "gate": (DD, FF), "up": (DD, FF), "down": (FF, DD),
                "lm": (DD, DV)}
        for name, (i, o) in dims.items():
            setattr(self, name, nn.Linear(i, o, bias=False))
            _set_linear(getattr(self, name), p[name])
        with torch.no_grad():
            self.emb.weight.copy_(_t(p["emb"]))
            for n in ("n1", "n2", "nf"):
                getattr(self, n).weight.copy_(_t(p[f"{n}.scale"]))
        cos, sin = _rotary(T)
        self.register_buffer("cos", _t(cos))
        self.register_buffer("sin", _t(sin))
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)))

    def rot(self, t):
        half = DHD // 2
        return t * self.cos + torch.cat([-t[..., half:], t[..., :half]], -1) * self.sin

    def forward(self, input_ids):
        B, n = input_ids.shape
        x = self.emb(input_ids)
        h = self.n1(x)
        q = self.rot(self.q(h).view(B, n, DH, DHD).transpose(1, 2))
        k = self.rot(self.k(h).view(B, n, KV, DHD).transpose(1, 2))
        v = self.v(h).view(B, n, KV, DHD).transpose(1, 2)
        rep = DH // KV
        k = k[:, :, None].expand(B, KV, rep, n, DHD).reshape(B, DH, n, DHD)
        v = v[:, :, None].expand(B, KV, rep, n, DHD).reshape(B, DH, n, DHD)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DHD)
        scores = torch.where(self.causal, scores, -1e9)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, n, DH * DHD)
        x = x + self.o(a)
        h = self.n2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.lm(self.nf(x))[:, -1]


@pytest.fixture(scope="module")
def dec_case():
    p = _dec_params()
    ids = np.random.default_rng(3).integers(0, DV, (2, T)).astype(np.int32)
    return p, ids, TorchDecoder(p).eval()


def test_decoder_program_keeps_layers_whole(dec_case):
    p, ids, _ = dec_case
    ops = [e.op for e in import_jax(decoder, p, ids[:1]).eqns]
    assert ops.count("aten.rms_norm.default") == 3 and ops.count("aten.embedding.default") == 1
    assert ops.count("aten.cat.default") == 2 and "aten.slice.Tensor" in ops
    assert ops.count("aten.silu.default") == 1 and ops.count("aten.matmul.default") == 2


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_decoder_relevance_equals_torch(dec_case, mode):
    p, ids, tmodel = dec_case
    ej = dlbjax.explain(decoder, ids, params=p, mode=mode)
    et = dlbjax.explain(tmodel, torch.from_numpy(ids.astype(np.int64)), mode=mode)
    _close(ej.prediction, decoder(p, ids))
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["x"], et.relevance["input_ids"])


def test_decoder_batch_equals_rows(dec_case):
    p, ids, _ = dec_case
    ex = dlbjax.Explainer(jax.jit(decoder), ids[:1], params=p)
    whole = ex(ids)
    for i in range(len(ids)):
        _close(whole.relevance["x"][i], ex(ids[i:i + 1]).relevance["x"][0])


# ---- one test per primitive mapping -----------------------------------------------------------
_W = {"w": np.random.default_rng(9).normal(size=(4, 4)).astype(np.float32)}


def _lin(p, x):
    return x @ p["w"]


def _dyn_update(p, x):
    y = _lin(p, x)
    return jax.lax.dynamic_update_slice(y, y[:, :2] * 2.0, (0, 1))


_CASES = {
    "slice": (lambda p, x: _lin(p, x)[:, 1:3], "aten.slice.Tensor"),
    "strided slice": (lambda p, x: _lin(p, x)[:, ::2], "aten.slice.Tensor"),
    "dynamic_slice": (lambda p, x: jax.lax.dynamic_slice(_lin(p, x), (0, 1), (x.shape[0], 2)),
                      "aten.slice.Tensor"),
    "dynamic_update_slice": (_dyn_update, "aten.slice_scatter.default"),
    "take": (lambda p, x: jnp.take(_lin(p, x), jnp.array([3, 0, 0]), axis=1),
             "aten.index_select.default"),
    "index": (lambda p, x: _lin(p, x)[:, np.array([2, 1])], "aten.index_select.default"),
    "concatenate": (lambda p, x: jnp.concatenate([_lin(p, x), x], -1), "aten.cat.default"),
    "split": (lambda p, x: jnp.split(_lin(p, x), 2, axis=-1)[1], "aten.slice.Tensor"),
    "rev": (lambda p, x: jnp.flip(_lin(p, x), -1), "aten.flip.default"),
    "pad": (lambda p, x: jnp.pad(_lin(p, x), ((0, 0), (1, 2))), "aten.constant_pad_nd.default"),
    "select_n": (lambda p, x: jnp.where(x > 0, _lin(p, x), x), "aten.where.self"),
    "eq": (lambda p, x: jnp.where(x == 0.5, 0.0, _lin(p, x)), "aten.eq.Scalar"),
    "ne": (lambda p, x: jnp.where(x != _lin(p, x), 1.0, _lin(p, x)), "aten.ne.Tensor"),
    "le": (lambda p, x: jnp.where(x <= 0.1, 0.0, _lin(p, x)), "aten.le.Scalar"),
    "ge": (lambda p, x: jnp.where(0.1 >= x, 0.0, _lin(p, x)), "aten.le.Scalar"),
    "lt and": (lambda p, x: jnp.where((x < 1.0) & (x > -1.0), _lin(p, x), 0.0),
               "aten.logical_and.Tensor"),
    "iota": (lambda p, x: _lin(p, x) * jnp.arange(4.0), "aten.mul.Tensor"),
    "batched dot_general": (lambda p, x: jnp.einsum("bi,bj->bij", _lin(p, x), x),
                            "aten.matmul.default"),
    "einsum kernel": (lambda p, x: jnp.einsum("bi,ihk->bhk", x, p["w"].reshape(4, 2, 2)),
                      "aten.linear.default"),
    "einsum kernel, inner dim": (lambda p, x: jnp.einsum("bti,ij->btj", _lin(p, x).reshape(
        -1, 2, 2).transpose(0, 2, 1), p["w"][:2]), "aten.linear.default"),
    "einsum kernel in": (lambda p, x: jnp.einsum("bhk,hkj->bj", _lin(p, x).reshape(-1, 2, 2),
                                                 p["w"].reshape(2, 2, 4)), "aten.linear.default"),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_primitive_mapping(name):
    fn, op = _CASES[name]
    x = np.random.default_rng(10).normal(size=(3, 4)).astype(np.float32)
    program = import_jax(fn, _W, x[:1])
    assert op in [e.op for e in program.eqns]
    ex = dlbjax.Explainer(fn, x, params=_W, task="regression")
    _close(ex(x).prediction, fn(_W, x))


def test_gather_of_a_table_is_an_embedding_and_of_an_activation_by_inputs_unsupported():
    table = {"t": np.random.default_rng(11).normal(size=(7, 3)).astype(np.float32)}
    ids = np.array([[1, 6, 0]], np.int32)
    program = import_jax(lambda p, i: p["t"][i], table, ids)
    (emb,) = [e for e in program.eqns if e.op == "aten.embedding.default"]
    assert emb.args[1] is program.inputs[0]  # the ids themselves, as torch's nn.Embedding

    def by_inputs(p, x, i):
        return jnp.take(x @ _W["w"], i, axis=1)

    with pytest.raises(dlbjax.UnsupportedOperationError, match="gather"):
        import_jax(by_inputs, _W, (np.ones((1, 4), np.float32), np.array([1], np.int32)))


@pytest.mark.parametrize("which", ["LayerNorm", "RMSNorm"])
def test_flax_nnx_norms_are_one_op_and_equal_torch(which):
    from flax import nnx

    module = getattr(nnx, which)(8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(12)
    lin = rng.normal(size=(8, 8)).astype(np.float32)
    scale = (1 + rng.normal(0, 0.1, 8)).astype(np.float32)
    state["scale"].value = jnp.asarray(scale)
    if which == "LayerNorm":
        bias = rng.normal(0, 0.1, 8).astype(np.float32)
        state["bias"].value = jnp.asarray(bias)
    params = {"lin": lin, "norm": state}

    def fn(p, x):
        return nnx.merge(graphdef, p["norm"])(x @ p["lin"])

    x = rng.normal(size=(3, 8)).astype(np.float32)
    op = "aten.layer_norm.default" if which == "LayerNorm" else "aten.rms_norm.default"
    ops = [e.op for e in import_jax(fn, params, x[:1]).eqns]
    assert ops == ["aten.linear.default", op]
    tnorm = nn.LayerNorm(8, eps=1e-6) if which == "LayerNorm" else nn.RMSNorm(8, eps=1e-6)
    tlin = nn.Linear(8, 8, bias=False)
    _set_linear(tlin, lin)
    with torch.no_grad():
        tnorm.weight.copy_(_t(scale))
        if which == "LayerNorm":
            tnorm.bias.copy_(_t(bias))
    tmodel = nn.Sequential(tlin, tnorm).eval()
    for mode in ("default", "contrastive"):
        ej = dlbjax.explain(fn, x, params=params, mode=mode)
        et = dlbjax.explain(tmodel, torch.from_numpy(x), mode=mode)
        _close(ej.prediction, fn(params, x))
        _close(ej.prediction, et.prediction)
        _close(ej.relevance["x"], et.relevance["input"])


def test_a_norm_whose_intermediate_is_read_elsewhere_is_not_fused():
    def fn(p, x):
        y = x @ p["w"]
        ms = jnp.mean(jnp.square(y), -1, keepdims=True)
        return y * jax.lax.rsqrt(ms + 1e-6) + ms

    x = np.random.default_rng(13).normal(size=(2, 4)).astype(np.float32)
    ops = [e.op for e in import_jax(fn, _W, x[:1]).eqns]
    assert "aten.rms_norm.default" not in ops and "aten.rsqrt.default" in ops


def test_transposed_conv_and_asymmetric_pools_equal_torch():
    rng = np.random.default_rng(14)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO

    def fn(p, x):  # NHWC
        y = jax.lax.conv_transpose(x, p["k"], (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y)
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                  ((0, 0), (0, 1), (1, 0), (0, 0)))
        return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1),
                                     ((0, 0), (0, 1), (0, 1), (0, 0)))

    x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
    program = import_jax(fn, {"k": k}, x[:1])
    (conv,) = [e for e in program.eqns if e.op == "aten.convolution.default"]
    assert conv.args[6] is True  # transposed
    assert [e.op for e in program.eqns].count("aten.constant_pad_nd.default") == 2
    ex = dlbjax.Explainer(fn, x, params={"k": k}, task="regression")
    _close(ex(x).prediction, fn({"k": k}, x))


def test_an_unmapped_primitive_is_named():
    def bad(p, x):
        with jax.named_scope("tail"):
            return jnp.sort(_lin(p, x), axis=-1)

    with pytest.raises(dlbjax.UnsupportedOperationError, match="sort") as info:
        import_jax(bad, _W, np.ones((1, 4), np.float32))
    assert "tail" in str(info.value)


class _TorchSDPA(nn.Module):
    def __init__(self, w, o, causal):
        super().__init__()
        self.causal = causal
        self.l, self.o = nn.Linear(8, 24, bias=False), nn.Linear(8, 3, bias=False)
        _set_linear(self.l, w)
        _set_linear(self.o, o)

    def forward(self, x, m):
        B = x.shape[0]
        q, k, v = (t.reshape(B, 6, 2, 4).transpose(1, 2) for t in self.l(x).chunk(3, -1))
        if self.causal:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :] > 0)
        return self.o(a.transpose(1, 2).reshape(B, 6, 8)[:, 0 if not self.causal else -1])


@pytest.mark.parametrize("causal", [False, True])
def test_dot_product_attention_equals_torch_sdpa(causal):
    """``jax.nn.dot_product_attention`` is written out in its jaxpr (batched dot_generals, a
    where on the mask, a softmax) and is imported as such, not as one
    ``aten.scaled_dot_product_attention``: its relevance equals torch's whole SDPA all the same."""
    rng = np.random.default_rng(15)
    p = {"w": rng.normal(size=(8, 24)).astype(np.float32),
         "o": rng.normal(size=(8, 3)).astype(np.float32)}

    def fn(p, x, m):
        q, k, v = (t.reshape(x.shape[0], 6, 2, 4) for t in jnp.split(x @ p["w"], 3, -1))
        if causal:
            a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            a = jax.nn.dot_product_attention(q, k, v, mask=m[:, None, None, :] > 0)
        return a.reshape(x.shape[0], 6, 8)[:, -1 if causal else 0] @ p["o"]

    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    m = np.ones((2, 6), np.int32)
    m[0, 4:] = 0
    tmodel = _TorchSDPA(p["w"], p["o"], causal).eval()
    for mode in ("default", "contrastive"):
        ej = dlbjax.explain(fn, (x, m), params=p, mode=mode)
        et = dlbjax.explain(tmodel, (torch.from_numpy(x), torch.from_numpy(m.astype(np.int64))),
                            mode=mode)
        _close(ej.prediction, fn(p, x, m))
        _close(ej.prediction, et.prediction)
        _close(ej.relevance["input0"], et.relevance["x"])


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_transposed_conv_relevance_equals_torch(mode):
    rng = np.random.default_rng(16)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO
    dense = rng.normal(size=(9 * 9 * 4, 3)).astype(np.float32)

    def fn(p, x):  # NHWC
        y = jax.lax.conv_transpose(x, p["k"], (2, 2), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y).reshape(x.shape[0], -1) @ p["d"]

    class Torch(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, bias=False)
            self.d = nn.Linear(9 * 9 * 4, 3, bias=False)
            with torch.no_grad():  # flipped, [in, out, kh, kw]
                self.up.weight.copy_(_t(np.flip(k.transpose(2, 3, 0, 1), (2, 3))))
            _set_linear(self.d, dense)

        def forward(self, x):
            return self.d(torch.relu(self.up(x)).permute(0, 2, 3, 1).flatten(1))

    p = {"k": k, "d": dense}
    x = rng.normal(size=(2, 5, 5, 2)).astype(np.float32)
    ej = dlbjax.explain(fn, x, params=p, mode=mode)
    et = dlbjax.explain(Torch().eval(), torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                        mode=mode)
    _close(ej.prediction, fn(p, x))
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["x"], np.moveaxis(np.asarray(et.relevance["x"]), -3, -1))
