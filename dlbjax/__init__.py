"""dlbjax: DLBacktrace relevance propagation for PyTorch and Hugging Face models, compiled with JAX.

>>> import dlbjax
>>> e = dlbjax.explain(model, x)              # relevance at every input, prediction, conservation
>>> explainer = dlbjax.Explainer(model, x)    # import and compile once
>>> explainer.batch(dataset)                  # a whole dataset with jax.vmap
>>> e.plot(); e.to_html(); e.save("e.npz"); dlbjax.Explanation.load("e.npz")

The algorithm is the DLBacktrace rule set (arXiv 2411.12643) in default and contrastive mode as
restated in the project's specification; see README.md for the supported models and operators
and ARCHITECTURE.md for where each stage lives.
"""

from ._errors import (DLBJaxError, DtypeError, DuplicateRegistrationError, ExportError,
                      InputMismatchError, InvalidProgramError, MethodError, ModelTooLargeError,
                      NoExpertsError, NoLayersError, NonFiniteError, TargetError, UnsupportedOp,
                      UnsupportedOperationError, WeightsChangedError)
from ._types import Streams
from ._result import Conservation, Explanation, load_explanation
from ._explain import Explainer, explain
from ._cache import enable_compilation_cache
from ._dataset import load_results
from ._generate import Generation, Generator, generate
from ._version import __version__
from . import metrics  # dlbjax.metrics: faithfulness metrics of explanations
# function forms of Explanation's methods (e.plot(), e.plot_graph(), e.plot_experts(),
# e.to_html(), Explanation.load): kept importable, not part of __all__
from ._views import plot, plot_experts, plot_graph, plot_methods, to_html
from .composites import Composite

__all__ = [
    "explain", "Explainer", "Explanation", "Conservation", "Streams", "Composite", "plot_methods",
    "generate", "Generator", "Generation", "load_results", "enable_compilation_cache",
    "DLBJaxError", "UnsupportedOperationError", "UnsupportedOp", "InputMismatchError",
    "ExportError", "InvalidProgramError", "TargetError", "NonFiniteError", "DtypeError",
    "NoLayersError", "NoExpertsError", "MethodError", "DuplicateRegistrationError",
    "ModelTooLargeError", "WeightsChangedError", "__version__",
]
