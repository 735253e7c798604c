"""Model -> dlbjax IR. Two importers build the same :class:`dlbjax.ir.Program`:

- PyTorch (``_torch``, ``_export``, ``_translate``, ``_bind``, ``_substitute``, ``_mamba``):
  ``torch.export`` capture, ATen decomposition that keeps layers whole, translation;
- JAX (``_jax``): ``jax.make_jaxpr`` of a pure function, lax primitives mapped onto the same ops.

>>> from dlbjax.importers import import_model
>>> program, bound = import_model(model, example_inputs)
>>> print(program)

The torch half is loaded on first use of one of its names (``import_model``, ``bind_inputs``,
...), so importing dlbjax and explaining a JAX model never imports torch.
"""

from __future__ import annotations

from ._jax import _Translator, bind_jax_inputs, import_jax
from ._jax_loops import attach as _attach_loops
from ._names import path_name

_attach_loops(_Translator)  # scan, while, cond (importers/_jax_loops.py builds on _jax)

# names of the torch importer, loaded from ._torch on first access (PEP 562)
TORCH_NAMES = ("import_model", "import_bound", "bind_inputs", "BoundInputs", "export_model",
               "translate", "decomposition_table", "KEEP_WHOLE", "eval_copy", "tensor_to_numpy",
               "torch_dtype_name", "static_experts_copy", "register_substitution",
               "unregister_substitution", "substitutions", "substituted_copy", "Substitution",
               "import_repeated", "reference_outputs", "REPEAT_KEEP")

__all__ = list(TORCH_NAMES) + ["import_jax", "bind_jax_inputs", "path_name"]


def __getattr__(name: str):
    if name in TORCH_NAMES:
        from . import _torch  # the torch importer: imports torch (deferred for JAX models)
        value = getattr(_torch, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
