"""Translate a decomposed ``torch.export.ExportedProgram`` into a :class:`dlbjax.ir.Program`."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from dlbjax._errors import ExportError
from dlbjax.ir import DTYPES, Eqn, Program, Source, Var

from ._names import path_name

__all__ = ["translate", "torch_dtype_name", "tensor_to_numpy"]

# Bookkeeping nodes with no value semantics: dropped during translation.
_SKIP = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
    "aten._assert_async.msg",
}
# Keyword arguments that say where or how a tensor is stored, never what it holds.
_STORAGE_KWARGS = {"device", "layout", "pin_memory", "memory_format", "non_blocking"}


def torch_dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ExportError(f"dtype {dtype} is not supported by dlbjax")
    return name


def tensor_to_numpy(t: torch.Tensor, share: bool = False) -> np.ndarray:
    """A numpy copy of a tensor on any device; bfloat16 goes through ml_dtypes.

    ``share=True``: a zero-copy view when the tensor is a contiguous CPU tensor (the constants of
    an imported model, so that dlbjax does not hold a second copy of the weights; see
    :func:`translate`), a copy otherwise. The view is taken of a ``detach()`` alias, which keeps
    the storage alive even if the parameter's ``.data`` is later replaced, and which shares the
    parameter's version counter (in-place changes stay visible to ``t._version``); it is
    read-only."""
    t = t.detach()
    shared = share and t.device.type == "cpu" and t.is_contiguous()
    t = t.cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        view = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        view = t.numpy()
    if not shared:
        return view.copy()
    view.flags.writeable = False  # dlbjax never writes into the user's model through it
    return view


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.linear.default"
    module = getattr(target, "__module__", "") or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


def _source(node: torch.fx.Node) -> Source:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return Source()
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    path = path.replace("L['self'].", "").replace("L__self__.", "")
    return Source(module_path=path, module_type=kind)


def _var_from_meta(name: str, val: Any, node: torch.fx.Node) -> Var:
    if not isinstance(val, torch.Tensor):
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) or "local_scalar" in str(node.target):
            raise ExportError(
                f"node '{node.name}' ({node.target}, module {_source(node)}) reads a tensor value into "
                f"Python ({val!r}): the graph has data-dependent shapes (.item(), .tolist(), "
                "nonzero(), boolean-mask indexing; e.g. an MoE router that groups tokens by "
                "expert). dlbjax compiles static shapes only and cannot jit or vmap such a graph. "
                "Register a static equivalent of that module with "
                "dlbjax.importers.register_substitution (checked equal at import; JetMoE, DBRX "
                "and Mamba have built-in ones), use a model whose routing is static (Hugging Face "
                "MoE models with set_experts_implementation('batched_mm')), or rewrite that code "
                "with fixed shapes (gathers over top-k indices, torch.where).")
        raise ExportError(f"node '{node.name}' ({node.target}) does not produce a tensor ({val!r})")
    shape = []
    for d in val.shape:
        if not isinstance(d, int):
            try:
                d = int(d)
            except Exception as exc:
                raise ExportError(
                    f"node '{node.name}' ({node.target}) has a data-dependent shape {tuple(val.shape)}: "
                    "dlbjax compiles static shapes only. Avoid .item()/.tolist()/nonzero()/boolean-mask "
                    "indexing in forward.") from exc
        shape.append(d)
    return Var(name, tuple(shape), torch_dtype_name(val.dtype))


def _output_names(ep, n: int) -> list[str]:
    try:
        tree = pytree.tree_unflatten(list(range(n)), ep.call_spec.out_spec)
        leaves = pytree.tree_flatten_with_path(tree)[0]
        names = [path_name(p) or "output" for p, _ in leaves]
        if len(names) == n and len(set(names)) == n:
            return names
    except Exception:
        pass
    return ["output"] if n == 1 else [str(i) for i in range(n)]


def translate(ep, input_names: list[str]) -> Program:
    """Build the IR from an exported (and decomposed) program.

    ``input_names`` names the tensor user inputs in the order torch.export flattened them.

    Constant values (parameters, buffers, lifted constants) are zero-copy numpy views of the
    exported program's tensors where they are contiguous CPU tensors -- the model's own
    parameters (``torch.export`` does not copy them) -- and copies otherwise (GPU tensors,
    non-contiguous ones). Nothing else of ``ep`` is kept: the program holds no reference to the
    ExportedProgram or its graph module, which are freed when the caller drops them.
    """
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    env: dict[torch.fx.Node, Any] = {}
    inputs: list[Var] = []
    constants: list[Var] = []
    const_values: dict[str, np.ndarray] = {}
    const_kinds: dict[str, str] = {}
    eqns: list[Eqn] = []
    user_input_index = 0
    getitem_names: dict[tuple[torch.fx.Node, int], str] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            getitem_names.setdefault((node.args[0], node.args[1]), node.name)

    def convert(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(convert(x) for x in a)
        if isinstance(a, torch.dtype):
            return torch_dtype_name(a)
        if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
            return None
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise ExportError(f"symbolic value {a} in the graph: dlbjax compiles static shapes only")
        if isinstance(a, torch.Tensor):
            raise ExportError("a tensor literal was left in the graph arguments")
        return a

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = spec.target
                if target in ep.state_dict:
                    value = ep.state_dict[target]
                elif target in ep.constants:
                    value = ep.constants[target]
                else:
                    raise ExportError(f"no value for constant '{target}'")
                if not isinstance(value, torch.Tensor):
                    raise ExportError(f"constant '{target}' is a {type(value).__name__}, not a tensor")
                var = Var(target, tuple(value.shape), torch_dtype_name(value.dtype))
                constants.append(var)
                const_values[target] = tensor_to_numpy(value, share=True)
                const_kinds[target] = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
                                       InputKind.CONSTANT_TENSOR: "constant"}[spec.kind]
                env[node] = var
            elif spec.kind == InputKind.USER_INPUT:
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    if user_input_index >= len(input_names):
                        raise ExportError("more tensor inputs in the graph than were passed")
                    var = _var_from_meta(input_names[user_input_index], val, node)
                    user_input_index += 1
                    inputs.append(var)
                    env[node] = var
                else:  # a non-tensor argument (use_cache=False, None, ...) is baked in
                    env[node] = val
            else:
                raise ExportError(f"unsupported graph input kind {spec.kind} for '{node.name}'")
        elif node.op == "call_function":
            if node.target is operator.getitem:
                parent = env[node.args[0]]
                env[node] = parent[node.args[1]]
                continue
            name = _op_name(node.target)
            if name in _SKIP:
                continue
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)):
                outs = tuple(
                    _var_from_meta(getitem_names.get((node, i), f"{node.name}.{i}"), v, node)
                    if isinstance(v, torch.Tensor) else None
                    for i, v in enumerate(val))
                if any(o is None for o in outs):
                    raise ExportError(f"{name} returns non-tensor values; not supported")
            else:
                outs = (_var_from_meta(node.name, val, node),)
            kwargs = {k: convert(v) for k, v in node.kwargs.items() if k not in _STORAGE_KWARGS}
            eqns.append(Eqn(name, tuple(convert(a) for a in node.args), kwargs, outs, _source(node)))
            env[node] = outs if isinstance(val, (tuple, list)) else outs[0]
        elif node.op == "output":
            results = node.args[0]
            out_specs = ep.graph_signature.output_specs
            outputs = []
            for spec, res in zip(out_specs, results):
                if spec.kind != OutputKind.USER_OUTPUT:
                    raise ExportError(
                        f"the forward mutates state ({spec.kind.name} '{spec.target}'); dlbjax explains "
                        "pure forwards only (put the model in eval mode and avoid in-place updates of "
                        "inputs and buffers)")
                outputs.append(res)
            names = _output_names(ep, len(outputs))
            out_vars, out_names = [], []
            for nm, res in zip(names, outputs):
                value = env.get(res) if isinstance(res, torch.fx.Node) else None
                if isinstance(value, Var):
                    out_vars.append(value)
                    out_names.append(nm)
            if not out_vars:
                raise ExportError("the model returns no tensor")
            program = Program(tuple(inputs), tuple(constants), tuple(eqns), tuple(out_vars),
                              tuple(out_names), const_values, const_kinds)
            return program.validate()
        else:
            raise ExportError(f"unexpected graph node kind '{node.op}'")
    raise ExportError("the exported graph has no output node")
