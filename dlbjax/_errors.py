"""Typed exceptions raised by dlbjax.

Every failure that would otherwise turn into a silently wrong explanation is one of these, with a
message that says what was wrong and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass


class DLBJaxError(Exception):
    """Base class of every error dlbjax raises on purpose."""


@dataclass(frozen=True)
class UnsupportedOp:
    """One operation of a model that dlbjax cannot explain (or cannot run)."""

    op: str
    module_path: str
    module_type: str
    hint: str

    def __str__(self) -> str:
        where = self.module_path or "<top-level forward>"
        kind = f" ({self.module_type})" if self.module_type else ""
        return f"{self.op} in module '{where}'{kind}: {self.hint}"


class UnsupportedOperationError(DLBJaxError, NotImplementedError):
    """The model contains operations without a forward lowering or a relevance rule.

    ``ops`` lists every such operation (each op once per module it occurs in), so a user sees the
    whole list at import time rather than one failure at a time.
    """

    def __init__(self, ops: list[UnsupportedOp]):
        self.ops = list(ops)
        lines = "\n".join(f"  - {o}" for o in self.ops)
        super().__init__(
            f"dlbjax cannot explain this model: {len(self.ops)} unsupported operation(s):\n{lines}\n"
            "Each relevance-carrying op needs a rule in dlbjax.rules (see the supported-ops table in "
            "README.md); rewrite the listed code with supported layers, or register a rule with "
            "dlbjax.rules.register."
        )


class InputMismatchError(DLBJaxError, ValueError):
    """Inputs whose number, names, shapes or dtypes differ from the example inputs."""


class ExportError(DLBJaxError, RuntimeError):
    """torch.export could not capture the model's forward as a static graph."""


class InvalidProgramError(DLBJaxError, ValueError):
    """An IR program that is malformed (undefined variables, shape/dtype inconsistencies, ...)."""


class TargetError(DLBJaxError, ValueError):
    """A target outside the model output, or a seed that cannot be built for the task."""


class NonFiniteError(DLBJaxError, ValueError):
    """NaN or infinite values in the inputs or the model's parameters."""


class DtypeError(DLBJaxError, TypeError):
    """A model dlbjax cannot explain faithfully at its dtype: float64 while JAX's 64-bit mode is
    off (it would silently run in float32), or only integer inputs and no embedding lookup (no
    input could carry relevance)."""


class NoLayersError(DLBJaxError, ValueError):
    """The explanation holds no per-layer relevance (it was not made with ``layers=True``)."""


class NoExpertsError(DLBJaxError, ValueError):
    """The explanation holds no mixture-of-experts relevance (``explanation.experts`` is None)."""


class MethodError(DLBJaxError, ValueError):
    """An attribution method dlbjax does not know, an option the chosen method does not take
    (``steps=`` with ``method="dlb"``), or a method that is not defined for the model's inputs,
    mode or options (gradients in contrastive mode, an embedding bag's tokens)."""


class DuplicateRegistrationError(DLBJaxError, ValueError):
    """A second lowering for an operator, or a second rule for an (operator, method) pair: each
    has exactly one, so a registration never silently replaces another."""


class ModelTooLargeError(DLBJaxError, MemoryError):
    """The model will not fit in the memory of the device it is explained on: raised while the
    Explainer is built, before anything large is allocated, with the estimate (``needed``,
    ``available`` in bytes, ``parts``: bytes by what they hold) and the options that would make
    it fit (``options``)."""

    def __init__(self, message: str, needed: int = 0, available: int = 0,
                 parts: dict | None = None, options: tuple = ()):
        super().__init__(message)
        self.needed, self.available = int(needed), int(available)
        self.parts, self.options = dict(parts or {}), tuple(options)


class WeightsChangedError(DLBJaxError, RuntimeError):
    """A torch model's weights were changed in place after the Explainer was built. The Explainer
    shares the weight memory of CPU models (no second copy), so its checks and precomputed |W|
    would no longer describe them: build a new Explainer after training or loading weights."""
