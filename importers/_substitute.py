"""Export-friendly substitutions: modules whose forward has data-dependent shapes, swapped for
static modules that compute the same output, on a copy of the model, before ``torch.export``.

Some layers cannot be captured as a static graph although what they compute is static: JetMoE's
top-k gating counts the tokens per expert with ``.tolist()``, sorts the tokens by expert and
scatters the results back with ``index_add``. A *substitution* replaces such a module by one with
the same parameters (the same tensor objects, never copied) whose forward has static shapes and
gives the same output. The role is that of Zennit's canonizers, but the goal is exportability
rather than a rule-friendly form.

* :func:`register_substitution` adds one, keyed by a module class (matched exactly, not its
  subclasses), a class's qualified name (``"package.module.Class"``, which matches without
  importing the package), or a predicate ``module -> bool``. The factory gets the matched module
  and returns its replacement. Registering a key (or a name) twice raises
  :class:`~dlbjax._errors.DuplicateRegistrationError` unless ``replace=True``.
* :func:`substitutions` lists them in the order they are tried (the first match wins).
* :func:`substituted_copy` is what the exporter calls: the model itself when nothing matches,
  else a copy of the module tree that shares every parameter and buffer with the model (the
  model is never changed), with each outermost matching module replaced. The copy's forward is
  checked against the model's on the example inputs (max |difference| / max |output| per output
  tensor, ``1e-5`` in float32); a difference raises :class:`~dlbjax._errors.ExportError` naming
  the substitution responsible.

Built in: JetMoE's mixture of MLP experts (``JetMoeMoE``) and mixture of attention experts
(``JetMoeMoA``), and DBRX's experts (``DbrxExperts``, whose router already uses ``torch.topk``). Both become dense dispatch: ``torch.topk`` over the router logits, a softmax over
the k selected logits (as JetMoE does), every expert applied to every token with one linear layer
over the experts' stacked weights, the k chosen experts' outputs gathered per token
(``[tokens, k, hidden]``), weighted by their gates and summed over k, plus the bias. That
``[tokens, k, hidden]`` tensor summed over k after ``aten.topk`` is what
``dlbjax.passes.moe.find_moe_layers`` looks for, so both kinds of layer appear in
``Explanation.experts``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from dlbjax._errors import DuplicateRegistrationError, ExportError

__all__ = ["Substitution", "register_substitution", "unregister_substitution", "substitutions",
           "substituted_copy", "check_same_outputs"]

Key = Union[type, str, Callable[[nn.Module], bool]]


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Substitution:
    """One registered substitution: ``key`` selects modules, ``factory(module)`` replaces one."""

    name: str
    key: Key
    factory: Callable[[nn.Module], nn.Module]
    description: str = ""

    def matches(self, module: nn.Module) -> bool:
        if isinstance(self.key, type):
            return type(module) is self.key
        if isinstance(self.key, str):
            return _qualified_name(type(module)) == self.key
        return bool(self.key(module))

    @property
    def key_id(self):
        """What two registrations must not share: a class and its qualified name are one key."""
        if isinstance(self.key, type):
            return _qualified_name(self.key)
        return self.key


_REGISTRY: list[Substitution] = []


def register_substitution(key: Key, factory: Callable[[nn.Module], nn.Module], *,
                          name: str | None = None, description: str = "",
                          replace: bool = False) -> Substitution:
    """Register ``factory`` as the export-friendly replacement of the modules ``key`` selects.

    ``key``: a module class (exact type), the qualified name of one (``"pkg.mod.Class"``), or a
    predicate ``module -> bool``. ``factory(module) -> nn.Module`` must reuse the module's
    parameters (not copies) and compute the same output with static shapes; the exporter checks
    the latter on the example inputs. ``name`` (default: the class's qualified name or the
    predicate's name) appears in error messages and in :func:`substitutions`. A key or name that
    is already registered raises DuplicateRegistrationError unless ``replace=True``, which
    replaces that entry in place (keeping its position).
    """
    if not (isinstance(key, (type, str)) or callable(key)):
        raise TypeError(f"a substitution key is a module class, a qualified class name or a "
                        f"predicate, got {type(key).__name__}")
    if not callable(factory):
        raise TypeError(f"a substitution factory must be callable, got {type(factory).__name__}")
    if name is None:
        name = (_qualified_name(key) if isinstance(key, type) else key if isinstance(key, str)
                else getattr(key, "__qualname__", repr(key)))
    entry = Substitution(name, key, factory, description)
    clashes = [i for i, s in enumerate(_REGISTRY) if s.key_id == entry.key_id or s.name == name]
    if clashes and not replace:
        other = _REGISTRY[clashes[0]]
        raise DuplicateRegistrationError(
            f"a substitution for {other.key_id!r} named {other.name!r} is already registered; pass "
            "replace=True to replace it")
    for i in reversed(clashes[1:]):
        del _REGISTRY[i]
    if clashes:
        _REGISTRY[clashes[0]] = entry
    else:
        _REGISTRY.append(entry)
    return entry


def unregister_substitution(name: str) -> Substitution:
    """Remove the substitution registered under ``name`` and return it (KeyError if none)."""
    for i, s in enumerate(_REGISTRY):
        if s.name == name:
            return _REGISTRY.pop(i)
    raise KeyError(f"no substitution named {name!r}; registered: {[s.name for s in _REGISTRY]}")


def substitutions() -> tuple[Substitution, ...]:
    """The registered substitutions, in the order they are tried."""
    return tuple(_REGISTRY)


def _first_match(module: nn.Module, entries) -> Substitution | None:
    for s in entries:
        if s.matches(module):
            return s
    return None


def _targets(model: nn.Module, entries) -> list[tuple[str, Substitution]]:
    """(module path, substitution) of each outermost matching module; nothing inside a matched
    module is looked at (its replacement owns it)."""
    out, stack = [], [("", model)]
    while stack:
        path, module = stack.pop()
        s = _first_match(module, entries)
        if s is not None:
            out.append((path, s))
            continue
        children = list(module.named_children())
        stack.extend((f"{path}.{n}" if path else n, c) for n, c in reversed(children))
    return out


def _tree_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the model's own tensors:
    replacing modules in it never touches the model, and no weight is duplicated."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _apply(model: nn.Module, targets) -> nn.Module:
    root = model
    for path, s in targets:
        parent_path, _, child = path.rpartition(".")
        old = root.get_submodule(path) if path else root
        try:
            new = s.factory(old)
        except Exception as exc:
            raise ExportError(f"substitution {s.name!r} failed on module '{path or '<root>'}' "
                              f"({type(old).__name__}): {type(exc).__name__}: {exc}") from exc
        if not isinstance(new, nn.Module):
            raise ExportError(f"substitution {s.name!r} returned {type(new).__name__} for module "
                              f"'{path or '<root>'}', not an nn.Module")
        new.train(old.training)
        if path:
            parent = root.get_submodule(parent_path) if parent_path else root
            parent._modules[child] = new
        else:
            root = new
    return root


def substituted_copy(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                     check: bool = True) -> nn.Module:
    """``model`` with every registered substitution applied, on a copy that shares its tensors.

    Returns ``model`` itself when no module matches. With ``check`` (and example inputs), the
    copy's forward must equal ``model``'s (:func:`check_same_outputs`); otherwise ExportError
    names the substitution whose replacement computes something else.
    """
    kwargs = dict(kwargs or {})
    entries = substitutions()
    targets = _targets(model, entries)
    if not targets:
        return model
    clone = _apply(_tree_copy(model), targets)
    if check and (args or kwargs):
        with torch.no_grad():
            expected = model(*args, **kwargs)
            problem = check_same_outputs(expected, clone(*args, **kwargs))
            if problem is not None:
                names = list(dict.fromkeys(s.name for _, s in targets))
                culprits = names if len(names) == 1 else [
                    n for n in names if check_same_outputs(expected, _apply(
                        _tree_copy(model), [t for t in targets if t[1].name == n])(*args, **kwargs))
                    is not None] or names
                paths = [p or "<root>" for p, s in targets if s.name in culprits]
                raise ExportError(
                    f"the export-friendly substitution(s) {culprits} change the output of "
                    f"{type(model).__name__} on the example inputs ({problem}); substituted "
                    f"modules: {paths}. The replacement must compute the same output as the "
                    "module it replaces: fix its factory, or unregister it with "
                    "dlbjax.importers.unregister_substitution(name).")
    return clone


# relative tolerance of the forward check, by output dtype (half types round more)
_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _tensors(out, prefix="output"):
    if isinstance(out, torch.Tensor):
        yield prefix, out
    elif isinstance(out, dict):  # Hugging Face ModelOutput is an OrderedDict
        for k, v in out.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            yield from _tensors(v, f"{prefix}[{i}]")


def check_same_outputs(expected, actual) -> str | None:
    """None when two forward outputs agree (same structure of tensors, integer ones equal, float
    ones within the relative tolerance of their dtype), else what differs."""
    a, b = dict(_tensors(expected)), dict(_tensors(actual))
    if list(a) != list(b):
        return f"outputs {sorted(a)} became {sorted(b)}"
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name} is {tuple(y.shape)} {y.dtype}, expected {tuple(x.shape)} {x.dtype}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"{name} differs"
            continue
        x64, y64 = x.detach().double(), y.detach().double()
        if not torch.equal(torch.isfinite(x64), torch.isfinite(y64)):
            return f"{name} has non-finite values in other places"
        finite = torch.isfinite(x64)
        if not finite.any():
            continue
        scale = x64[finite].abs().max().item()
        err = (x64[finite] - y64[finite]).abs().max().item() / (scale if scale > 0 else 1.0)
        if err > _TOLERANCE.get(x.dtype, 1e-5):
            return f"{name} differs by {err:.3g} relative to its scale {scale:.3g}"
    return None


# --- JetMoE ------------------------------------------------------------------------------------

def _route(router: nn.Module, tokens: torch.Tensor):
    """JetMoE's routing decision with static shapes: (router logits [T, E] in float32, top-k
    expert ids [T, k], top-k gates [T, k] softmax over the selected logits)."""
    logits = router.layer(tokens).float()
    top_logits, top_ids = torch.topk(logits, router.top_k, dim=1)
    gates = torch.softmax(top_logits, dim=1).type_as(tokens)
    return logits, top_ids, gates


def _all_experts(x: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """Every expert of a ``JetMoeParallelExperts`` on every row: x [..., in] -> [..., E, out],
    one linear layer over the experts' stacked [E, out, in] weights (a view, not a copy)."""
    w = experts.weight
    return nn.functional.linear(x, w.reshape(-1, w.shape[-1])).unflatten(-1, w.shape[:2])


def _pick(per_expert: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, E, H] per-expert values and [T, k] ids -> [T, k, H], each token's chosen experts."""
    return torch.gather(per_expert, 1, ids[..., None].expand(*ids.shape, per_expert.shape[-1]))


class StaticJetMoeMoE(nn.Module):
    """``JetMoeMoE`` with dense dispatch: the same parameters, the same output, static shapes."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.input_size, self.hidden_size = moe.input_size, moe.hidden_size
        self.activation = moe.activation
        self.bias = moe.bias
        self.input_linear, self.output_linear, self.router = (moe.input_linear, moe.output_linear,
                                                              moe.router)

    def forward(self, layer_input):
        bsz, length, emb = layer_input.shape
        x = layer_input.reshape(-1, emb)
        _, ids, gates = _route(self.router, x)
        h = _all_experts(x, self.input_linear)                     # [T, E, 2I]
        a, b = h.chunk(2, dim=-1)
        h = self.activation(a) * b                                 # [T, E, I]
        w = self.output_linear.weight                              # [E, out, I]
        out = torch.matmul(h.transpose(0, 1), w.transpose(1, 2))   # [E, T, out]
        weighted = _pick(out.transpose(0, 1), ids) * gates[..., None]   # [T, k, out]
        return (weighted.sum(dim=1) + self.bias).view(bsz, length, self.input_size)


class StaticJetMoeMoA(nn.Module):
    """``JetMoeMoA`` (mixture of attention experts) with dense dispatch. ``JetMoeAttention``
    calls ``map`` and ``reduce`` and passes ``topo_info`` between them without looking inside,
    so the attention module stays as it is; here ``topo_info`` is (expert ids, gates)."""

    def __init__(self, moa: nn.Module):
        super().__init__()
        self.num_experts, self.input_size = moa.num_experts, moa.input_size
        self.hidden_size, self.top_k = moa.hidden_size, moa.top_k
        self.bias = moa.bias
        self.input_linear, self.output_linear, self.router = (moa.input_linear, moa.output_linear,
                                                              moa.router)

    def map(self, layer_input):
        bsz, length, emb = layer_input.shape
        x = layer_input.reshape(-1, emb)
        logits, ids, gates = _route(self.router, x)
        queries = _pick(_all_experts(x, self.input_linear), ids)   # [T, k, hidden]
        return queries.view(bsz, length, self.top_k, -1), logits, (ids, gates)

    def reduce(self, layer_input, topo_info):
        bsz, length, k, hidden = layer_input.shape
        ids, gates = topo_info
        x = layer_input.reshape(-1, k, hidden)                     # [T, k, hidden]
        out = _all_experts(x, self.output_linear)                  # [T, k, E, emb]
        chosen = torch.gather(out, 2, ids[:, :, None, None].expand(*ids.shape, 1, out.shape[-1]))
        weighted = chosen.squeeze(2) * gates[..., None]            # [T, k, emb]
        return (weighted.sum(dim=1) + self.bias).view(bsz, length, self.input_size)

    def forward(self, layer_input):
        raise NotImplementedError("JetMoeMoA is called through map() and reduce()")


class StaticDbrxExperts(nn.Module):
    """``DbrxExperts`` (a loop over the hit experts with ``nonzero`` and ``index_add_``) with dense
    dispatch; ``DbrxFFN`` routes with ``torch.topk`` and passes the ids and weights in."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.mlp = experts.mlp
        self.hidden_size, self.ffn_hidden_size = experts.hidden_size, experts.ffn_hidden_size
        self.num_experts = experts.num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        batch = hidden_states.shape[0]
        x = hidden_states.reshape(-1, self.hidden_size)
        shape = (self.num_experts, self.ffn_hidden_size)
        gate = nn.functional.linear(x, self.mlp.w1).unflatten(-1, shape)    # [T, E, F]
        up = nn.functional.linear(x, self.mlp.v1).unflatten(-1, shape)
        inter = self.mlp.activation_fn(gate) * up
        w2 = self.mlp.w2.view(*shape, self.hidden_size)                     # [E, F, H]
        out = torch.matmul(inter.transpose(0, 1), w2)                       # [E, T, H]
        weighted = _pick(out.transpose(0, 1), top_k_index) * top_k_weights[..., None]
        return weighted.sum(dim=1).view(batch, -1, self.hidden_size)


_JETMOE = "transformers.models.jetmoe.modeling_jetmoe."
register_substitution(_JETMOE + "JetMoeMoE", StaticJetMoeMoE, name="jetmoe-moe",
                      description="JetMoE mixture of MLP experts: dense top-k dispatch")
register_substitution(_JETMOE + "JetMoeMoA", StaticJetMoeMoA, name="jetmoe-moa",
                      description="JetMoE mixture of attention experts: dense top-k dispatch")
register_substitution("transformers.models.dbrx.modeling_dbrx.DbrxExperts", StaticDbrxExperts,
                      name="dbrx-experts", description="DBRX experts: dense top-k dispatch")
