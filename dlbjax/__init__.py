"""dlbjax: DLBacktrace relevance propagation for PyTorch and Hugging Face models, compiled with JAX.

>>> import dlbjax
>>> e = dlbjax.explain(model, x)              # relevance at every input, prediction, conservation
>>> explainer = dlbjax.Explainer(model, x)    # import and compile once
>>> explainer.batch(dataset)                  # a whole dataset with jax.vmap

The algorithm is the DLBacktrace rule set (arXiv 2411.12643) in default and contrastive mode as
restated in the project's specification; see README.md for the supported models and operators.
"""

from ._errors import (DLBJaxError, DtypeError, ExportError, InputMismatchError, InvalidProgramError,
                      NonFiniteError, TargetError, UnsupportedOp, UnsupportedOperationError)
from ._explain import Conservation, Explainer, Explanation, explain
from ._cache import enable_compilation_cache
from ._dataset import load_results
from ._generate import Generation, Generator, generate
from ._save import load_explanation
from ._views import NoLayersError, plot, plot_experts, plot_graph, to_html
from .rules import Streams

__version__ = "0.1.0"

__all__ = ["explain", "Explainer", "Explanation", "Conservation", "Streams", "DLBJaxError",
           "UnsupportedOperationError", "UnsupportedOp", "InputMismatchError", "ExportError",
           "InvalidProgramError", "TargetError", "NonFiniteError", "DtypeError", "load_results",
           "enable_compilation_cache", "generate", "Generator", "Generation", "__version__",
           "plot", "plot_graph", "plot_experts", "to_html", "load_explanation", "NoLayersError"]
