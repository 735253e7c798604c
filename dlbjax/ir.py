"""A small jaxpr-style intermediate representation of a model's forward.

A :class:`Program` is a straight-line list of :class:`Eqn` over typed :class:`Var` s: model inputs,
constants (parameters, buffers and lifted tensors, with their values) and equation outputs. Each
equation names an ATen operator overload (``"aten.linear.default"``) and keeps the positional and
keyword arguments of the original call, with graph values replaced by ``Var`` s and everything else
(ints, floats, lists, dtype names) kept as literals. It also remembers the module it came from
(``nn_module_stack``), so errors and per-layer relevance can point at ``layer1.0.conv1``.

``print(program)`` gives a readable listing; :meth:`Program.validate` catches malformed programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ._errors import InvalidProgramError

__all__ = ["Var", "Source", "Eqn", "Program", "DTYPES", "iter_vars", "substitute"]

# Canonical dtype names (numpy spelling, plus bfloat16) and their short forms for printing.
DTYPES = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "bool",
    "complex64": "c64",
    "complex128": "c128",
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


@dataclass(frozen=True, eq=False)
class Var:
    """A typed value of the program: a name, a static shape and a dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def type_str(self) -> str:
        return f"{DTYPES.get(self.dtype, self.dtype)}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"{self.name}:{self.type_str()}"


@dataclass(frozen=True)
class Source:
    """Where an equation came from: the dotted module path and the module's class."""

    module_path: str = ""
    module_type: str = ""

    def __str__(self) -> str:
        if not self.module_path and not self.module_type:
            return "<top-level forward>"
        kind = self.module_type.rsplit(".", 1)[-1]
        return f"{self.module_path or '<root>'} ({kind})" if kind else self.module_path


def iter_vars(obj: Any) -> Iterator[Var]:
    """Yield every Var in a (possibly nested) argument structure, in order, with repeats."""
    if isinstance(obj, Var):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_vars(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from iter_vars(item)


def substitute(obj: Any, env: Mapping[Var, Any]) -> Any:
    """Replace every Var inside a nested argument structure by its value in ``env``."""
    if isinstance(obj, Var):
        return env[obj]
    if isinstance(obj, list):
        return [substitute(o, env) for o in obj]
    if isinstance(obj, tuple):
        return tuple(substitute(o, env) for o in obj)
    if isinstance(obj, Mapping):
        return {k: substitute(v, env) for k, v in obj.items()}
    return obj


def _fmt_literal(value: Any) -> str:
    if isinstance(value, Var):
        return value.name
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, float):
        return repr(value)
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True, eq=False)
class Eqn:
    """One operator application: ``outputs = op(*args, **kwargs)``."""

    op: str
    args: tuple
    kwargs: Mapping[str, Any]
    outputs: tuple[Var, ...]
    source: Source = field(default_factory=Source)

    @property
    def inputs(self) -> tuple[Var, ...]:
        """The Vars this equation reads (positional then keyword, repeats kept)."""
        return tuple(iter_vars(self.args)) + tuple(iter_vars(self.kwargs))

    @property
    def params(self) -> dict[str, Any]:
        """The non-Var arguments: positional literals keyed ``"arg<i>"``, then the keywords."""
        out = {f"arg{i}": a for i, a in enumerate(self.args) if not any(True for _ in iter_vars(a))}
        out.update({k: v for k, v in self.kwargs.items() if not any(True for _ in iter_vars(v))})
        return out

    @property
    def short_op(self) -> str:
        """``aten.linear.default`` -> ``linear``."""
        parts = self.op.split(".")
        return parts[1] if len(parts) >= 3 else parts[-1]

    def __str__(self) -> str:
        lhs = " ".join(repr(v) for v in self.outputs)
        call = ", ".join([_fmt_literal(a) for a in self.args] +
                         [f"{k}={_fmt_literal(v)}" for k, v in self.kwargs.items()])
        text = f"{lhs} = {self.op}({call})"
        if self.source.module_path or self.source.module_type:
            text += f"    # {self.source}"
        return text


@dataclass(eq=False)
class Program:
    """A model's forward as inputs, constants, equations and outputs."""

    inputs: tuple[Var, ...]
    constants: tuple[Var, ...]
    eqns: tuple[Eqn, ...]
    outputs: tuple[Var, ...]
    output_names: tuple[str, ...]
    const_values: dict[str, np.ndarray]
    const_kinds: dict[str, str] = field(default_factory=dict)

    # ---- lookups -------------------------------------------------------------------------------
    def input_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.inputs)

    def producers(self) -> dict[Var, Eqn]:
        return {v: e for e in self.eqns for v in e.outputs}

    def consumers(self) -> dict[Var, list[Eqn]]:
        """For every Var, the equations that read it (an equation reading it twice appears twice)."""
        out: dict[Var, list[Eqn]] = {}
        for e in self.eqns:
            for v in e.inputs:
                out.setdefault(v, []).append(e)
        return out

    # ---- printing ------------------------------------------------------------------------------
    def __str__(self) -> str:
        consts = " ".join(repr(c) for c in self.constants)
        ins = " ".join(repr(v) for v in self.inputs)
        lines = [f"{{ lambda {consts} ; {ins} .", "  let"]
        lines += [f"    {e}" for e in self.eqns]
        outs = ", ".join(f"{n}={v.name}" if n != v.name else v.name
                         for n, v in zip(self.output_names, self.outputs))
        lines.append(f"  in ({outs}) }}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line per op with its count, most frequent first."""
        counts: dict[str, int] = {}
        for e in self.eqns:
            counts[e.op] = counts.get(e.op, 0) + 1
        return "\n".join(f"{n:5d}  {op}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "Program":
        """Check that the program is well formed; raise InvalidProgramError otherwise."""
        defined: dict[str, Var] = {}

        def define(v: Any, what: str) -> None:
            if not isinstance(v, Var):
                raise InvalidProgramError(f"{what} is {v!r}, not a Var")
            if not isinstance(v.name, str) or not v.name:
                raise InvalidProgramError(f"{what} has an empty or non-string name")
            if v.name in defined:
                raise InvalidProgramError(f"variable '{v.name}' is defined twice ({what})")
            if not isinstance(v.shape, tuple) or not all(
                    isinstance(d, (int, np.integer)) and d >= 0 for d in v.shape):
                raise InvalidProgramError(f"{what} '{v.name}' has an invalid shape {v.shape!r}")
            if v.dtype not in DTYPES:
                raise InvalidProgramError(f"{what} '{v.name}' has an unknown dtype {v.dtype!r}")
            defined[v.name] = v

        def use(v: Var, where: str) -> None:
            known = defined.get(v.name)
            if known is None:
                raise InvalidProgramError(f"{where} reads '{v.name}', which is not defined before it")
            if known is not v and (known.shape != v.shape or known.dtype != v.dtype):
                raise InvalidProgramError(
                    f"{where} reads '{v.name}' as {v.type_str()} but it is defined as {known.type_str()}")

        for v in self.inputs:
            define(v, "input")
        for v in self.constants:
            define(v, "constant")
            value = self.const_values.get(v.name)
            if value is None:
                raise InvalidProgramError(f"constant '{v.name}' has no value")
            if tuple(value.shape) != tuple(v.shape):
                raise InvalidProgramError(
                    f"constant '{v.name}' is declared {v.shape} but its value has shape {value.shape}")
        for i, e in enumerate(self.eqns):
            if not isinstance(e, Eqn):
                raise InvalidProgramError(f"equation {i} is {type(e).__name__}, not an Eqn")
            where = f"equation {i} ({e.op})"
            if not isinstance(e.op, str) or not e.op:
                raise InvalidProgramError(f"equation {i} has no op name")
            if not e.outputs:
                raise InvalidProgramError(f"{where} has no outputs")
            for v in e.inputs:
                use(v, where)
            for v in e.outputs:
                define(v, f"output of {where}")
        if len(self.outputs) != len(self.output_names):
            raise InvalidProgramError("outputs and output_names differ in length")
        if not self.outputs:
            raise InvalidProgramError("the program has no outputs")
        for v in self.outputs:
            use(v, "program output")
        return self
