"""Control flow in the JAX importer (``importers/_jax_loops.py``): ``lax.scan`` is unrolled over its
static length, a ``while`` with a static trip count (``fori_loop``) likewise, ``cond`` with a
constant predicate takes its branch, and ``cond`` / ``while`` decided by the inputs raise
:class:`dlbjax.UnsupportedOperationError` naming the primitive.

The LSTM: a cell written as ``(x_t W_ih + b_ih) + (h W_hh + b_hh)``, ``jnp.split`` into the gates
i, f, g, o (torch's order, spec §10 R2), σ/tanh, ``c = f c + i g``, ``h = o tanh c``, run with
``lax.scan`` from zero states; a linear head reads h_T. The JAX import of that function is
compared with the torch import of ``nn.LSTM`` (kept whole as ``aten.lstm.input`` with the §10
rule) and of the same LSTM written out by hand in torch (two ``nn.Linear`` and a Python loop),
with the weights copied across. §10 R1 makes the whole-op rule exactly the composition of the
generic rules over this decomposition (the two biases each in their own dense rule, the zero
initial state a constant, R3), so all three give the same relevance, in both modes. flax's
``nnx.RNN(nnx.OptimizedLSTMCell)`` imports and runs (forward equal to torch), and its relevance equals
torch's at every step (the first step's constant recurrent term stays an addition of its own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import dlbjax
from dlbjax.importers import import_jax
from twins import close as _close

F, H, T, C = 3, 5, 4, 3




# ---- the LSTM ----------------------------------------------------------------------------------
def _lstm_params(seed=0):
    rng = np.random.default_rng(seed)

    def r(*s, scale=0.5):
        return rng.normal(0, scale, s).astype(np.float32)

    return {"lstm": {"w_ih": r(F, 4 * H), "w_hh": r(H, 4 * H),  # [in, 4H], gates i, f, g, o
                     "b_ih": r(4 * H, scale=0.2), "b_hh": r(4 * H, scale=0.2)},
            "head": {"kernel": r(H, C), "bias": r(C, scale=0.1)}}


def _cell(p):
    def cell(carry, xt):
        h, c = carry
        a = (xt @ p["w_ih"] + p["b_ih"]) + (h @ p["w_hh"] + p["b_hh"])
        i, f, g, o = jnp.split(a, 4, axis=-1)
        i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
        c = f * c + i * jnp.tanh(g)
        h = o * jnp.tanh(c)
        return (h, c), h
    return cell


def lstm(params, x):  # x: [N, T, F] -> logits [N, C]
    zeros = jnp.zeros((x.shape[0], H), x.dtype)
    (h, _), _ = jax.lax.scan(_cell(params["lstm"]), (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def lstm_python_loop(params, x):  # the same, unrolled in Python
    zeros = jnp.zeros((x.shape[0], H), x.dtype)
    carry, cell = (zeros, zeros), _cell(params["lstm"])
    for t in range(x.shape[1]):
        carry, _ = cell(carry, x[:, t])
    return carry[0] @ params["head"]["kernel"] + params["head"]["bias"]


class TorchLSTM(nn.Module):
    def __init__(self, params):
        super().__init__()
        p = params["lstm"]
        self.lstm = nn.LSTM(F, H, batch_first=True)
        self.head = nn.Linear(H, C)
        with torch.no_grad():
            self.lstm.weight_ih_l0.copy_(torch.from_numpy(p["w_ih"].T.copy()))
            self.lstm.weight_hh_l0.copy_(torch.from_numpy(p["w_hh"].T.copy()))
            self.lstm.bias_ih_l0.copy_(torch.from_numpy(p["b_ih"]))
            self.lstm.bias_hh_l0.copy_(torch.from_numpy(p["b_hh"]))
            self.head.weight.copy_(torch.from_numpy(params["head"]["kernel"].T.copy()))
            self.head.bias.copy_(torch.from_numpy(params["head"]["bias"]))

    def forward(self, x):
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[0])


class TorchLSTMByHand(nn.Module):
    """The LSTM written out: two nn.Linear, chunk, sigmoid/tanh, products and adds per step."""

    def __init__(self, params):
        super().__init__()
        p = params["lstm"]
        self.ih, self.hh, self.head = nn.Linear(F, 4 * H), nn.Linear(H, 4 * H), nn.Linear(H, C)
        with torch.no_grad():
            for lin, w, b in ((self.ih, p["w_ih"], p["b_ih"]), (self.hh, p["w_hh"], p["b_hh"]),
                              (self.head, params["head"]["kernel"], params["head"]["bias"])):
                lin.weight.copy_(torch.from_numpy(w.T.copy()))
                lin.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            i, f, g, o = (self.ih(x[:, t]) + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h)


@pytest.fixture(scope="module")
def lstm_case():
    params = _lstm_params()
    x = np.random.default_rng(1).normal(size=(3, T, F)).astype(np.float32)
    return params, x


def test_scan_is_unrolled(lstm_case):
    params, x = lstm_case
    program = import_jax(lstm, params, x[:1])
    ops = [e.op for e in program.eqns]
    assert "aten.lstm.input" not in ops
    assert ops.count("aten.select.int") == T
    assert ops.count("aten.linear.default") == T + (T - 1) + 1  # input part, recurrent, head
    names = {v.name for v in program.constants}
    assert {"lstm.w_ih", "lstm.w_hh", "lstm.b_ih", "head.kernel"} <= names


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("torch_model", [TorchLSTM, TorchLSTMByHand])
def test_lstm_scan_equals_torch(lstm_case, mode, torch_model):
    params, x = lstm_case
    tmodel = torch_model(params).eval()
    ej = dlbjax.explain(lstm, x, params=params, mode=mode)
    et = dlbjax.explain(tmodel, torch.from_numpy(x), mode=mode)
    with torch.no_grad():
        _close(lstm(params, x), tmodel(torch.from_numpy(x)).numpy())
    _close(ej.prediction, lstm(params, x))
    _close(ej.prediction, et.prediction)
    _close(ej.relevance["x"], et.relevance["x"])
    if mode == "contrastive":
        assert np.asarray(ej.relevance["x"]).shape == (2,) + x.shape


def test_torch_lstm_is_kept_whole(lstm_case):
    params, x = lstm_case
    ops = [e.op for e in dlbjax.Explainer(TorchLSTM(params).eval(), torch.from_numpy(x)).program.eqns]
    assert "aten.lstm.input" in ops  # the comparison above is with the whole-op §10 rule


def _flax_lstm(seed=2):
    """flax.nnx.RNN over nnx.OptimizedLSTMCell (dense_i without bias + dense_h with bias, gates
    i, f, g, o: torch's order) and a nnx.Linear head, as ``fn(params, x)`` over its Params; the
    same weights as a torch nn.LSTM with ``bias_ih = 0``."""
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self):
            self.rnn = nnx.RNN(nnx.OptimizedLSTMCell(F, H, rngs=nnx.Rngs(0)), return_carry=True,
                               rngs=False)
            self.head = nnx.Linear(H, C, rngs=nnx.Rngs(1))

        def __call__(self, x):
            zeros = jnp.zeros((x.shape[0], H), x.dtype)
            (_, h), _ = self.rnn(x, initial_carry=(zeros, zeros))
            return self.head(h)

    model = Model()
    rng = np.random.default_rng(seed)
    cell = model.rnn.cell
    cell.dense_h.bias.value = jnp.asarray(rng.normal(0, 0.2, 4 * H), jnp.float32)
    model.head.bias.value = jnp.asarray(rng.normal(0, 0.1, C), jnp.float32)
    graph, state = nnx.split(model)
    params = {"lstm": {"w_ih": np.array(cell.dense_i.kernel.value),
                       "w_hh": np.array(cell.dense_h.kernel.value),
                       "b_ih": np.zeros(4 * H, np.float32),
                       "b_hh": np.array(cell.dense_h.bias.value)},
              "head": {"kernel": np.array(model.head.kernel.value),
                       "bias": np.array(model.head.bias.value)}}
    return (lambda state, x: nnx.merge(graph, state)(x)), state, params


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_flax_nnx_rnn_lstm_equals_torch(lstm_case, mode):
    _, x = lstm_case
    fn, state, params = _flax_lstm()
    tmodel = TorchLSTM(params).eval()
    with torch.no_grad():
        _close(fn(state, x), tmodel(torch.from_numpy(x)).numpy())
    _close(fn(state, x), lstm(params, x))
    ej = dlbjax.explain(fn, x, params=state, mode=mode)
    et = dlbjax.explain(tmodel, torch.from_numpy(x), mode=mode)
    _close(ej.prediction, et.prediction)
    _close(np.asarray(ej.relevance["x"])[..., 1:, :], np.asarray(et.relevance["x"])[..., 1:, :])
    # t = 0 too: the first step's constant recurrent term (W_hh h_0 + b_hh, h_0 = 0) is not
    # folded into the input projection as its bias (importers/_jax.py fold_bias, §10 R1)
    _close(ej.relevance["x"], et.relevance["x"])


def test_scan_equals_python_loop(lstm_case):
    params, x = lstm_case
    _close(dlbjax.explain(lstm, x, params=params).relevance["x"],
           dlbjax.explain(lstm_python_loop, x, params=params).relevance["x"])


def test_lstm_batch_equals_rows_jit_and_vmap(lstm_case):
    params, x = lstm_case
    ex = dlbjax.Explainer(lstm, x[:1], params=params)
    whole = ex(x)
    for i in range(len(x)):
        _close(whole.relevance["x"][i], ex(x[i:i + 1]).relevance["x"][0])
    _close(ex.batch(x, batch_size=2).relevance["x"], whole.relevance["x"])
    f = ex.relevance_function()
    seeds = jnp.asarray(np.random.default_rng(2).random((len(x),) + ex.program.outputs[0].shape),
                        jnp.float32)
    rows = jnp.asarray(x)[:, None]
    batched = jax.jit(jax.vmap(lambda r, s: f(ex.constants, (r,), (s,)).relevance["x"][0]))(
        rows, seeds)
    for i in range(len(x)):
        _close(batched[i], f(ex.constants, (rows[i],), (seeds[i],)).relevance["x"][0])


# ---- scans with outputs, reverse, fori_loop, while ---------------------------------------------
def _rnn_params(seed=3):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, 0.5, (F, H)).astype(np.float32),
            "u": rng.normal(0, 0.5, (H, H)).astype(np.float32),
            "b": rng.normal(0, 0.2, H).astype(np.float32),
            "head": rng.normal(0, 0.5, (T * H, C)).astype(np.float32)}


def _rnn(reverse, loop):
    def fn(params, x):  # an Elman RNN whose whole output sequence feeds the head
        xs = jnp.swapaxes(x, 0, 1)
        h = jnp.zeros((x.shape[0], H), x.dtype)

        def step(h, xt):
            h = jnp.tanh(xt @ params["w"] + params["b"] + h @ params["u"])
            return h, h

        if loop:
            hs = [None] * T
            for t in (range(T - 1, -1, -1) if reverse else range(T)):
                h, hs[t] = step(h, xs[t])
            ys = jnp.stack(hs)
        else:
            _, ys = jax.lax.scan(step, h, xs, reverse=reverse)
        return jnp.swapaxes(ys, 0, 1).reshape(x.shape[0], -1) @ params["head"]
    return fn


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_outputs_and_reverse(reverse):
    params = _rnn_params()
    x = np.random.default_rng(4).normal(size=(2, T, F)).astype(np.float32)
    scanned, looped = _rnn(reverse, False), _rnn(reverse, True)
    program = import_jax(scanned, params, x[:1])
    assert "aten.stack.default" in [e.op for e in program.eqns]
    _close(scanned(params, x), looped(params, x))
    for mode in ("default", "contrastive"):
        es = dlbjax.explain(scanned, x, params=params, mode=mode)
        el = dlbjax.explain(looped, x, params=params, mode=mode)
        _close(es.prediction, scanned(params, x))
        _close(es.relevance["x"], el.relevance["x"])
    if reverse:  # the reverse scan is not the forward one
        fwd = dlbjax.explain(_rnn(False, False), x, params=params)
        assert not np.allclose(fwd.relevance["x"], es.relevance["x"])


def _mlp_params(seed=5):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, 0.5, (6, 6)).astype(np.float32),
            "b": rng.normal(0, 0.1, 6).astype(np.float32),
            "n": np.int32(3)}


def _block(params, x):
    return jax.nn.relu(x @ params["w"] + params["b"])


def _unrolled(params, x):
    for _ in range(3):
        x = _block(params, x)
    return x


def _fori_static(params, x):  # Python-int bounds: lowers to a scan
    return jax.lax.fori_loop(0, 3, lambda i, x: _block(params, x), x)


def _fori_param_bound(params, x):  # a bound from the parameters: lowers to a while
    return jax.lax.fori_loop(0, params["n"], lambda i, x: _block(params, x), x)


def _while_static(params, x):
    return jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, _block(params, s[1])),
                              (0, x))[1]


@pytest.mark.parametrize("fn,prim", [(_fori_static, "scan"), (_fori_param_bound, "while"),
                                     (_while_static, "while")])
def test_static_loops_unroll(fn, prim):
    params = _mlp_params()
    x = np.random.default_rng(6).normal(size=(3, 6)).astype(np.float32)
    assert prim in str(jax.make_jaxpr(fn)(params, x))
    program = import_jax(fn, params, x[:1])
    assert [e.op for e in program.eqns].count("aten.linear.default") == 3
    _close(fn(params, x), _unrolled(params, x))
    for mode in ("default", "contrastive"):
        el = dlbjax.explain(fn, x, params=params, mode=mode)
        eu = dlbjax.explain(_unrolled, x, params=params, mode=mode)
        _close(el.prediction, fn(params, x))
        _close(el.relevance["x"], eu.relevance["x"])


# ---- cond ----------------------------------------------------------------------------------------
def test_cond_with_a_constant_predicate_takes_its_branch():
    params = _mlp_params()
    x = np.random.default_rng(7).normal(size=(2, 6)).astype(np.float32)

    def branchy(params, x):
        return jax.lax.cond(params["n"] > 2, lambda x: _block(params, x), lambda x: -x, x)

    def switchy(params, x):
        return jax.lax.switch(params["n"] - 3, [lambda x: _block(params, x), jnp.tanh], x)

    for fn in (branchy, switchy):
        assert "cond" in str(jax.make_jaxpr(fn)(params, x))
        e = dlbjax.explain(fn, x, params=params)
        _close(e.prediction, _block(params, x))
        _close(e.relevance["x"], dlbjax.explain(_block, x, params=params).relevance["x"])


def test_data_dependent_cond_and_while_raise():
    params = _mlp_params()
    x = np.random.default_rng(8).normal(size=(2, 6)).astype(np.float32)

    def cond_on_input(params, x):
        with jax.named_scope("gate"):
            return jax.lax.cond(jnp.sum(x) > 0, lambda x: _block(params, x), lambda x: -x, x)

    def while_on_input(params, x):
        return jax.lax.while_loop(lambda s: jnp.sum(s) < 10.0, lambda s: _block(params, s) + 1.0,
                                  x)

    with pytest.raises(dlbjax.UnsupportedOperationError, match="primitive 'cond'") as info:
        dlbjax.Explainer(cond_on_input, x, params=params)
    assert "data-dependent control flow" in str(info.value) and "gate" in str(info.value)
    with pytest.raises(dlbjax.UnsupportedOperationError, match="primitive 'while'") as info:
        dlbjax.Explainer(while_on_input, x, params=params)
    msg = str(info.value)
    assert "data-dependent control flow" in msg
    assert "'lt'" not in msg  # the condition's own equations are not reported
