"""Export a deep model's repeated layers once: build time flat in depth (issue 15 item 3).

``torch.export`` and its decomposition re-trace every layer of a decoder, ~1.5 s per layer for a
LLaMA layer on this machine, so a 32-layer model spent ~50 s in export alone. Most deep models
are a ``nn.ModuleList`` of structurally identical layers, and their graph is then the same
equations over and over with only the weights changed. So:

1. :func:`find_layer_stack` finds the outermost ``nn.ModuleList`` of at least
   :data:`MIN_LAYERS` layers that are *identical in structure*: same class, same submodules and
   classes, same parameter and buffer names, shapes, dtypes and devices, same plain attributes
   (ints, floats, strings, ... compared by value; other objects such as a shared config by
   identity; ``layer_idx`` ignored: every layer has its own), no hooks, no plain tensor
   attributes;
2. :func:`truncated_copy` makes a copy of the model whose list holds its first :data:`KEEP`
   layers (the copy shares every module and tensor; the user's model is untouched), and that
   copy is exported;
3. :func:`repeat_layers` checks, on the exported program, that layer 2's equations are layer 1's
   with layer 2's weights (same ops, literals, types and module paths; inputs from layer 1 where
   layer 1's come from layer 0, the same outside values otherwise) and that nothing after the
   layers reads layers 0 or 1, then writes layers 3..N-1 as copies of layer 2, each reading its
   predecessor and its own parameters (zero-copy views of the model's tensors).

Anything that does not fit (layers that differ, a gap between layers, a skip connection over a
layer, per-layer outputs read at the end such as ``output_hidden_states``) returns None and the
whole model is exported as before. The caller (``dlbjax/_plan.py``) also checks the repeated
program's output against the torch model's own on the example and exports everything when they
differ: the structural checks see layers 0-2, the numeric check the whole depth.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from dlbjax.ir import Eqn, Program, Source, Var, iter_vars

from ._translate import tensor_to_numpy

__all__ = ["find_layer_stack", "truncated_copy", "repeat_layers", "KEEP", "MIN_LAYERS"]

KEEP = 3  # layers exported: layer 0 (reads the embeddings), 1 and 2 (the template)
# fewer layers are exported whole: the check of the repeated program (a compiled forward) costs
# about what exporting 5 more layers does, so below ~8 layers repeating saves nothing
# (benchmarks/RESULTS.md (k): 3.7 s vs 3.8 s at 8 LLaMA layers of hidden 1024)
MIN_LAYERS = 8
_IGNORED_ATTRS = frozenset({"training", "layer_idx"})
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _value_signature(value: Any):
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [_value_signature(v) for v in value]
        if isinstance(value, (frozenset, set)):
            items = sorted(items, key=repr)
        return (type(value).__name__, tuple(items))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((repr(k), _value_signature(v)) for k, v in value.items()))))
    if isinstance(value, torch.Tensor):
        raise _NotRepeatable  # a plain tensor attribute is lifted as a constant: values may differ
    return ("object", id(value))  # a shared config, an activation function, ...


class _NotRepeatable(Exception):
    pass


def _signature(layer: torch.nn.Module):
    """Everything about a layer that its graph could depend on, except its tensors' values."""
    mods = []
    for name, m in layer.named_modules(remove_duplicate=False):
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                getattr(m, "_backward_pre_hooks", None) or getattr(m, "_state_dict_hooks", None):
            raise _NotRepeatable
        attrs = tuple(sorted((k, _value_signature(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in _IGNORED_ATTRS))
        mods.append((name, type(m), m.training, attrs))

    def tensors(items):
        return tuple((n, tuple(t.shape), t.dtype, t.device.type) for n, t in items)

    return (tuple(mods), tensors(layer.named_parameters(remove_duplicate=False)),
            tensors(layer.named_buffers(remove_duplicate=False)))


def find_layer_stack(model: torch.nn.Module) -> Optional[tuple[str, int]]:
    """``(path, count)`` of the outermost ``nn.ModuleList`` of >= MIN_LAYERS identical layers,
    or None."""
    found = []
    for path, mod in model.named_modules():
        if type(mod) is not torch.nn.ModuleList or len(mod) < MIN_LAYERS or not path:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue  # a list inside a layer (MoE experts): the layers are the stack
        try:
            first = _signature(mod[0])
            if all(_signature(layer) == first for layer in list(mod)[1:]):
                found.append((path, len(mod)))
        except _NotRepeatable:
            continue
    return max(found, key=lambda pc: pc[1]) if found else None


def truncated_copy(model: torch.nn.Module, path: str, keep: int = KEEP) -> torch.nn.Module:
    """A shallow copy of ``model`` whose ModuleList at ``path`` holds its first ``keep`` layers;
    every other module and every tensor is the model's own (shared, not copied)."""
    parts = path.split(".")

    def clone(mod, rest):
        out = copy.copy(mod)
        out._modules = dict(mod._modules)
        if not rest:  # the list itself
            out._modules = {str(i): mod._modules[str(i)] for i in range(keep)}
            return out
        out._modules[rest[0]] = clone(mod._modules[rest[0]], rest[1:])
        return out

    return clone(model, parts)


def _layer(eqn: Eqn, prefix: str) -> Optional[int]:
    p = eqn.source.module_path
    if not p.startswith(prefix):
        return None
    head = p[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _skeleton(obj: Any) -> Any:
    """An argument structure with its Vars replaced by their types (literals kept)."""
    if isinstance(obj, Var):
        return ("var", obj.shape, obj.dtype)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_skeleton(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _skeleton(v)) for k, v in obj.items()))
    return ("lit", repr(obj))


def _rename(obj: Any, mapping: dict) -> Any:
    """``obj`` with Vars replaced through ``mapping``; containers keep their own types (the
    exported literals are torch.fx immutable lists, compared by type in ``find_runs``)."""
    if isinstance(obj, Var):
        return mapping.get(obj, obj)
    if isinstance(obj, (list, tuple)) and any(True for _ in iter_vars(obj)):
        return type(obj)(_rename(o, mapping) for o in obj)
    if isinstance(obj, dict):
        return {k: _rename(v, mapping) for k, v in obj.items()}
    return obj


def repeat_layers(program: Program, model: torch.nn.Module, path: str,
                  count: int) -> Optional[Program]:
    """The program of the full ``count``-layer model from the program of its KEEP-layer copy
    (module docstring), or None when the exported layers do not repeat cleanly."""
    prefix = path + "."
    eqns = program.eqns
    layer_of = [_layer(e, prefix) for e in eqns]
    bounds = []
    for k in range(KEEP):
        idx = [i for i, lk in enumerate(layer_of) if lk == k]
        if not idx or idx[-1] - idx[0] + 1 != len(idx):
            return None  # a layer without equations, or not contiguous
        bounds.append((idx[0], idx[-1] + 1))
    if any(lk is not None and lk >= KEEP for lk in layer_of):
        return None
    if any(bounds[k][1] != bounds[k + 1][0] for k in range(KEEP - 1)):
        return None  # equations of the parent between layers
    period = bounds[1][1] - bounds[1][0]
    if bounds[2][1] - bounds[2][0] != period:
        return None
    (s0, e0), (s1, e1), (s2, e2) = bounds
    where = {}  # Var -> (layer, position in the layer, output slot)
    for k, (s, e) in enumerate(bounds):
        for j in range(s, e):
            for o, v in enumerate(eqns[j].outputs):
                where[v] = (k, j - s, o)
    p1, p2 = f"{path}.1", f"{path}.2"
    const_names = {c.name for c in program.constants}

    def layer_const(v: Var, k: int) -> Optional[str]:
        name = f"{path}.{k}."
        return v.name[len(name):] if v.name in const_names and v.name.startswith(name) else None

    for j in range(period):
        a, b = eqns[s1 + j], eqns[s2 + j]
        if a.op != b.op or _skeleton((a.args, a.kwargs)) != _skeleton((b.args, b.kwargs)) or \
                [(v.shape, v.dtype) for v in a.outputs] != [(v.shape, v.dtype) for v in b.outputs]:
            return None
        if a.source.module_type != b.source.module_type or \
                a.source.module_path.replace(p1, p2, 1) != b.source.module_path:
            return None
        for va, vb in zip(a.inputs, b.inputs):
            wb, wa = where.get(vb), where.get(va)
            if wb is not None:
                k, jj, o = wb
                if k == 0 or wa is None or (wa[0], wa[1], wa[2]) != (k - 1, jj, o):
                    return None
            elif layer_const(vb, 2) is not None:
                if layer_const(va, 1) != layer_const(vb, 2):
                    return None
            elif va is not vb:
                return None
    for e in eqns[e2:]:
        for v in e.inputs:
            if where.get(v, (2,))[0] != 2:
                return None  # the end reads layer 0 or 1 (per-layer outputs)
    if any(where.get(v, (2,))[0] != 2 for v in program.outputs):
        return None

    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    template = eqns[s2:e2]
    new_eqns = list(eqns[:e2])
    constants = list(program.constants)
    values = dict(program.const_values)
    kinds = dict(program.const_kinds)
    prev = {v: v for e in template for v in e.outputs}  # layer 2's outputs, as the last written
    for i in range(KEEP, count):
        mapping: dict = {}
        for e in template:  # inputs from layer 1 -> layer i-1's; weights -> layer i's
            for v in e.inputs:
                if v in mapping:
                    continue
                loc = where.get(v)
                if loc is not None and loc[0] == 1:
                    mapping[v] = prev[eqns[s2 + loc[1]].outputs[loc[2]]]
                    continue
                rest = layer_const(v, 2)
                if rest is not None:
                    name = f"{path}.{i}.{rest}"
                    tensor = tensors.get(name)
                    if tensor is None or tuple(tensor.shape) != v.shape:
                        return None
                    var = Var(name, v.shape, v.dtype)
                    constants.append(var)
                    values[name] = tensor_to_numpy(tensor, share=True)
                    kinds[name] = program.const_kinds.get(v.name, "parameter")
                    mapping[v] = var
        for e in template:
            outs = tuple(Var(f"{v.name}@{i}", v.shape, v.dtype) for v in e.outputs)
            mapping.update(zip(e.outputs, outs))
            src = Source(e.source.module_path.replace(p2, f"{path}.{i}", 1), e.source.module_type)
            new_eqns.append(Eqn(e.op, _rename(e.args, mapping), _rename(e.kwargs, mapping),
                                outs, src))
        prev = {v: mapping[v] for e in template for v in e.outputs}
    last = prev
    for e in eqns[e2:]:
        new_eqns.append(Eqn(e.op, _rename(e.args, last), _rename(e.kwargs, last), e.outputs,
                            e.source))
    outputs = tuple(last.get(v, v) for v in program.outputs)
    return Program(program.inputs, tuple(constants), tuple(new_eqns), outputs,
                   program.output_names, values, kinds).validate()
