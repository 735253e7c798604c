"""The selective scan of state-space models as one operator, and Mamba mixers that call it.

``torch.ops.dlbjax.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`` is the
selective scan of Mamba (Gu & Dao 2023) in the argument convention of ``mamba_ssm``'s
``selective_scan_fn``: u, delta, z [batch, channels, L], A [channels, state], B, C
[batch, state, L], D and delta_bias [channels] (each of D, z, delta_bias optional). Per channel d
and state n, with dt = softplus(delta + delta_bias) (softplus only if ``delta_softplus``)::

    h_t = exp(A dt_t) h_{t-1} + dt_t B_t u_t          (h_{-1} = 0)
    y_t = sum_n C_t[n] h_t[n] + D u_t
    out_t = y_t * silu(z_t)

It is computed in float32 and returned in u's dtype, as Hugging Face's reference path does.
Exported as one ATen-level node (``dlbjax.selective_scan.default``), so the relevance pass gets
the whole scan with its roles (content u, transitions exp(A dt), selections dt, B, C, output gate
z) instead of an unrolled loop of products it could not tell apart (``rules/recurrent.py``).

:func:`static_mamba_mixer` turns a Hugging Face ``MambaMixer`` / ``FalconMambaMixer`` / ``Mamba2Mixer`` into one
whose forward (without a cache) calls this operator: the export-friendly substitution registered
here for these classes (:mod:`importers._substitute`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._substitute import register_substitution

__all__ = ["selective_scan", "static_mamba_mixer", "MAMBA_MIXERS"]


@torch.library.custom_op("dlbjax::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: Optional[torch.Tensor] = None,
                   z: Optional[torch.Tensor] = None, delta_bias: Optional[torch.Tensor] = None,
                   delta_softplus: bool = False) -> torch.Tensor:
    """Reference implementation: the sequential recurrence in float32 (module docstring)."""
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(A.float()[None, :, None, :] * dt[..., None])              # [b, d, L, n]
    dBu = dt[..., None] * B.float().transpose(1, 2)[:, None] * u.float()[..., None]
    Ct = C.float().transpose(1, 2)                                            # [b, L, n]
    h = torch.zeros_like(dA[:, :, 0])
    ys = []
    for t in range(u.shape[-1]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Ct[:, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


@selective_scan.register_fake
def _(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return torch.empty_like(u)


def _scan(*args):
    return torch.ops.dlbjax.selective_scan(*args)


def _mask(x, attention_mask):
    return x if attention_mask is None else (x * attention_mask[:, :, None]).to(x.dtype)


def _static_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Mamba mixer forward without a cache, its selective scan as one operator; with a cache
    (generation) the model's own forward runs."""
    if cache is not None or kwargs.get("cache_params") is not None:
        return type(self).__mro__[1].forward(self, hidden_states, cache, attention_mask, **kwargs)
    dtype = hidden_states.dtype
    L = hidden_states.shape[1]
    x, gate = self.in_proj(_mask(hidden_states, attention_mask)).transpose(1, 2).chunk(2, dim=1)
    x = self.act(self.conv1d(x)[..., :L])                                     # causal conv
    x = _mask(x.transpose(1, 2), attention_mask)                              # [b, L, d]
    ssm = self.x_proj(x)
    time_step, B, C = torch.split(ssm, [self.time_step_rank, self.ssm_state_size,
                                        self.ssm_state_size], dim=-1)
    if hasattr(self, "dt_layernorm"):  # FalconMamba normalises dt, B and C
        time_step, B, C = self.dt_layernorm(time_step), self.b_layernorm(B), self.c_layernorm(C)
    delta = self.dt_proj.weight @ time_step.transpose(1, 2)                  # [b, d, L]
    A = -torch.exp(self.A_log.float())
    bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None
    y = _scan(x.transpose(1, 2), delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
              gate, bias, True)
    return self.out_proj(y.transpose(1, 2).to(dtype))


def _static_mamba2_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    """Mamba2 mixer forward without a cache: the SSD scan (scalar A per head, B and C per group)
    as one ``dlbjax::selective_scan`` per group, A, dt, D and dt_bias repeated over each head's
    channels; the gated RMS norm and projections as in the model. Falls back to the model's
    forward with a cache or a non-default ``time_step_limit``."""
    limit = tuple(float(v) for v in self.time_step_limit)
    if cache is not None or kwargs.get("cache_params") is not None or limit != (0.0, float("inf")):
        return type(self).__mro__[1].forward(self, hidden_states, cache, attention_mask, **kwargs)
    dtype = hidden_states.dtype
    L = hidden_states.shape[1]
    proj = self.in_proj(_mask(hidden_states, attention_mask))
    gate, xBC, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xBC = _mask(self.act(self.conv1d(xBC.transpose(1, 2))[..., :L]).transpose(1, 2), attention_mask)
    G, n, P = self.n_groups, self.ssm_state_size, self.head_dim
    x, B, C = torch.split(xBC, [self.intermediate_size, G * n, G * n], dim=-1)
    A = -torch.exp(self.A_log.float())                                         # [heads]
    per = self.num_heads // G
    outs = []
    for g in range(G):
        heads = slice(g * per, (g + 1) * per)
        rep = lambda v: v[..., heads].repeat_interleave(P, dim=-1)  # noqa: E731  heads -> channels
        outs.append(_scan(x[..., g * per * P:(g + 1) * per * P].transpose(1, 2),
                          rep(dt).transpose(1, 2), rep(A)[:, None].expand(-1, n).contiguous(),
                          B[..., g * n:(g + 1) * n].transpose(1, 2),
                          C[..., g * n:(g + 1) * n].transpose(1, 2), rep(self.D.float()), None,
                          rep(self.dt_bias.float()), True))
    y = torch.cat(outs, dim=1).transpose(1, 2)
    return self.out_proj(self.norm(y, gate).to(dtype))


_FORWARDS = {"Mamba2Mixer": _static_mamba2_forward}
MAMBA_MIXERS = ("transformers.models.mamba.modeling_mamba.MambaMixer",
                "transformers.models.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer",
                "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer")
_STATIC = {}


def static_mamba_mixer(mixer):
    """The same mixer object's data under a subclass whose forward calls
    ``dlbjax::selective_scan`` (parameters shared, not copied). Apply to a copy of the model."""
    base = type(mixer)
    cls = _STATIC.get(base)
    if cls is None:
        forward = _FORWARDS.get(base.__name__, _static_forward)
        cls = _STATIC[base] = type(f"Static{base.__name__}", (base,), {"forward": forward})
    new = base.__new__(cls)
    new.__dict__ = dict(mixer.__dict__)
    return new


for _name in MAMBA_MIXERS:
    register_substitution(_name, static_mamba_mixer, name=_name.rsplit(".", 1)[1].lower(),
                          description="selective scan as one dlbjax::selective_scan operator")
