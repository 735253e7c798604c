"""A drop-in for the original DLBacktrace's user-facing API, computed by dlbjax.

``from dlbjax.compat import DLBacktrace`` gives the constructor and methods people migrating from
the original package (dl-backtrace 0.1.24, PyTorch path) call::

    dlb = DLBacktrace(model, (x,))
    node_io = dlb.predict(x)             # node_io["output"]["output_values"]: the model output
    all_wt = dlb.evaluation(mode="default", multiplier=100.0, task="multi-class classification")
    all_wt["x"]                                    # relevance of the forward argument ``x``
    result = dlb.run_task(task="auto", inputs=x)   # {"task", "node_io", "relevance", "predictions"}

Everything is delegated to :class:`dlbjax.Explainer` (there is no second engine): ``evaluation``
returns the same numbers as ``dlbjax.explain(model, inputs, layers=True, ...)``, arranged as the
original arranges them. Where dlbjax gives a different answer on purpose, the method docstrings say
so; README.md, "Migrating from DLBacktrace", lists every such difference. In short:

* seeds follow the spec's canonical rules (1 x multiplier at the target, never the output value;
  real regression, box and segmentation seeds; contrastive mode is a real second mode);
* ``scaler`` is accepted and ignored (as in 0.1.24); ``start_wt`` is honoured (0.1.24 ignores it);
* ``evaluation`` may be called any number of times per ``predict`` (0.1.24 allows one);
* the per-layer entries of the relevance dict are the relevance **at each node's output
  variable**, keyed by the node's variable name (0.1.24 stores the relevance at a node's inputs);
  weight, bias and buffer placeholders are not reported (0.1.24 reports zeros or meaningless
  copies for them, defect B14);
* no process-wide torch, numpy or environment setting is changed (0.1.24 forces one CPU thread
  and deterministic algorithms for the whole process);
* every generation step's token relevance is kept, on CPU and GPU alike (0.1.24 keeps only the
  last step, and none on CPU).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ._assemble import assemble
from ._dtypes import jnp_dtype
from ._errors import InputMismatchError, TargetError
from ._explain import Explainer
from ._generate import generate as _generate
from ._result import Explanation
from ._tasks import resolve_task
from ._types import Streams
from ._views import plot_graph
from .ir import substitute
from .lowerings import call_lowering

__all__ = ["DLBacktrace", "DLBAutoSampler"]

_TASKS = ("tabular-classification", "image-classification", "text-classification", "generation",
          "binary-segmentation", "bbox-regression")
# keyword arguments of the original's run_task / sampler that have no meaning here (results are
# kept in memory; nothing is cached, compressed or written by dlbjax)
_NO_OP_KEYWORDS = ("relevance_cache_policy", "relevance_cache_dir", "relevance_compress_dtype",
                   "relevance_move_to_cpu", "debug", "save_metadata", "save_compress",
                   "save_format", "save_name", "save_path")


def _to_numpy(x):
    if isinstance(x, Streams):
        return Streams(np.asarray(x.positive), np.asarray(x.negative))
    return np.asarray(x)


class DLBacktrace:
    """The original ``DLBacktrace(model, input_for_graph, ...)`` on top of dlbjax.

    ``input_for_graph``: a tensor, a tuple of tensors in forward-signature order, or a dict of
    keyword tensors (a tokenizer's BatchEncoding), rows along axis 0. The model is captured with
    ``torch.export`` here (as the original does), so export errors surface at construction.

    ``device``: None, ``"cpu"`` or ``"cuda"`` (anything else raises ValueError, as in the
    original). It is accepted for compatibility only: dlbjax copies weights and inputs to the host
    and computes on JAX's default device (a GPU when JAX has one), and the results do not depend on
    it (the original picks a different, numerically different, implementation per device: B2).
    ``verbose``: print the conservation table after each evaluation. ``dynamic_shapes``,
    ``strict_cpu`` and ``collect_node_module_map`` are accepted and ignored (rows of any number are
    supported without dynamic shapes; nothing process-wide is changed; module paths are always
    recorded). ``layerwise_outputs``: keep every intermediate value in ``predict``'s ``node_io``
    (True, as the original) or only the model output (False, less memory). Other keyword
    arguments go to every :class:`dlbjax.Explainer` built (``product_rule``,
    ``experimental_gating``, ``attention_value_fraction``, ``compute_dtype``, ...).

    Attributes: ``model``, ``node_io`` and ``all_wt`` (the last results), ``explanation`` (the
    last :class:`dlbjax.Explanation`), ``input_names``.
    """

    def __init__(self, model: torch.nn.Module, input_for_graph: Any, dynamic_shapes: Any = None,
                 device: Any = None, verbose: bool = False, strict_cpu: bool = True,
                 collect_node_module_map: bool = False, *, layerwise_outputs: bool = True,
                 **explainer_options):
        kind = device.type if isinstance(device, torch.device) else device
        if kind not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.model = model
        self.device = device
        self.verbose = bool(verbose)
        self.layerwise_outputs = bool(layerwise_outputs)
        self._options = dict(explainer_options)
        self._example = self._example_inputs(input_for_graph)
        self._explainers: dict = {}
        self._base = self._explainer("default", "auto", 100.0, 0.5)  # export once, now
        if self._base.task is not None:  # also reachable under its resolved task
            self._explainers[("default", self._base.task, 100.0, 0.5)] = self._base
        self.input_names = self._base.input_names
        self._forward = None
        self._inputs = None
        self.node_io: Optional[dict] = None
        self.all_wt: Optional[dict] = None
        self.explanation: Optional[Explanation] = None
        self._explained_by: Optional[Explainer] = None

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _example_inputs(inputs):
        if isinstance(inputs, torch.Tensor):
            return inputs[None] if inputs.ndim == 1 else inputs
        if isinstance(inputs, list):
            return tuple(inputs)
        return inputs

    def _explainer(self, mode, task, multiplier, thresholding) -> Explainer:
        if self._explainers:  # task strings that resolve alike share one Explainer
            base = next(iter(self._explainers.values()))
            try:
                task = resolve_task(task, tuple(base.program.outputs[base.explained].shape), 0,
                                    type(self.model).__name__).name
            except TargetError:
                pass  # the Explainer raises it with its own message
        if str(mode).lower() == "contrast":
            mode = "contrastive"
        if task != "segmentation":
            thresholding = 0.5  # only segmentation seeds read it
        key = (mode, task, float(multiplier), float(thresholding))
        if key not in self._explainers:
            self._explainers[key] = Explainer(self.model, self._example, mode=mode, task=task,
                                              multiplier=multiplier, thresholding=thresholding,
                                              layers=True, **self._options)
        return self._explainers[key]

    def _as_inputs(self, inputs: Sequence) -> Any:
        """predict's positional inputs -> what the Explainer takes (a 1-D tensor gets a batch axis
        when the example's corresponding input is 2-D, as in the original)."""
        if len(inputs) == 1 and (isinstance(inputs[0], dict) or hasattr(inputs[0], "keys")):
            return dict(inputs[0])
        if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
            inputs = tuple(inputs[0])
        specs = {name: shape for name, shape, _ in self._base.plan.row_specs}
        out = []
        for name, x in zip(self.input_names, inputs):
            if isinstance(x, torch.Tensor):
                x = x.detach()
                if x.ndim == len(specs.get(name, ())) - 1:
                    x = x[None]
            out.append(x)
        out += list(inputs[len(out):])
        return out[0] if len(out) == 1 and isinstance(out[0], torch.Tensor) else tuple(out)

    def _layer_forward(self):
        """The IR forward of one row keeping every intermediate value, vmapped and jitted."""
        if self._forward is None:
            program = self._base.program
            keep = self.layerwise_outputs

            def row(inputs):
                env = dict(zip(program.inputs, inputs))
                for c in program.constants:
                    env[c] = self._base.plan.consts[c.name]
                for eqn in program.eqns:
                    outs = call_lowering(eqn, substitute(eqn.args, env),
                                         substitute(eqn.kwargs, env))
                    env.update(zip(eqn.outputs, outs))
                values = {v.name: env[v] for v in program.outputs}
                if keep:
                    values.update({o.name: env[o] for e in program.eqns for o in e.outputs})
                return values

            self._forward = jax.jit(jax.vmap(row))
        return self._forward

    @staticmethod
    def _rows(a, n):
        a = np.asarray(a)
        return a.reshape((n,) + a.shape[2:]) if a.ndim > 1 and a.shape[1] == 1 else a

    # ---- the original's methods ----------------------------------------------------------------
    def predict(self, *inputs, temperature: float = 1.0, debug: Any = None) -> dict:
        """Run the model and return ``node_io`` (the original's layout, reduced).

        ``node_io["output"]["output_values"]`` is the model's explained output (a torch tensor,
        divided by ``temperature`` as in the original; ``input_values`` holds it unscaled).
        With ``layerwise_outputs`` every other entry is one intermediate variable of the captured
        graph, keyed by its name, with ``output_values`` (numpy, rows along axis 0),
        ``input_sources`` (names of its inputs), ``layer_name`` (module path), ``layer_type``
        (module class) and ``func_name`` (the ATen op). The values are dlbjax's JAX forward of the
        captured graph, which is checked against torch's recorded shapes; unlike the original's
        replay it never swallows an error (defect B12). ``temperature`` never affects relevance.
        """
        given = self._as_inputs(inputs)
        arrays, n = self._base.plan.rows(given)
        program = self._base.program
        arrays = tuple(jnp.asarray(a, jnp_dtype(v.dtype)) for a, v in zip(arrays, program.inputs))
        values = jax.device_get(self._layer_forward()(arrays))
        out_var = program.outputs[self._base.explained]
        pred = torch.from_numpy(np.array(self._rows(values[out_var.name], n)))
        node_io = {"output": {"input_values": pred, "output_values": pred / float(temperature),
                              "input_sources": [out_var.name], "layer_name": "output",
                              "func_name": "output", "layer_type": "Output"}}
        if self.layerwise_outputs:
            for eqn in program.eqns:
                for o in eqn.outputs:
                    node_io[o.name] = {
                        "output_values": self._rows(values[o.name], n),
                        "input_sources": [v.name for v in eqn.inputs],
                        "layer_name": eqn.source.module_path, "layer_type": eqn.source.module_type,
                        "func_name": eqn.op}
            for name, a in zip(self.input_names, arrays):
                node_io.setdefault(name, {"output_values": self._rows(a, n), "input_sources": [],
                                          "layer_name": "input", "func_name": "placeholder",
                                          "layer_type": "Placeholder"})
        self._inputs = given
        self.node_io = node_io
        return node_io

    def evaluation(self, mode: str = "default", start_wt: Any = None, multiplier: float = 100.0,
                   scaler: float = 1.0, thresholding: float = 0.5,
                   task: str = "binary-classification", target_token_ids: Any = None,
                   debug: bool = False) -> dict:
        """Relevance of the inputs given to the last :meth:`predict`, as the original's ``all_wt``.

        Keys: ``"output"`` (the seed, output-shaped), one key per relevance-carrying intermediate
        variable (the relevance at that variable, in reverse execution order; the same values as
        ``dlbjax.explain(..., layers=True).layers``), and one key per forward argument
        (``all_wt["x"]``, ``all_wt["input_ids"]`` [B, T] summed over the embedding axis,
        ``all_wt["attention_mask"]`` zeros). Values are numpy float32 arrays, or
        :class:`dlbjax.Streams` (positive, negative) pairs with ``mode="contrastive"``.

        Differences from the original 0.1.24, on purpose:

        * ``mode="contrastive"`` is the real contrastive mode (0.1.24 treats it as default, B1).
        * ``task``: ``"binary-classification"`` (the default), ``"multi-class classification"``,
          ``"*-classification"``: the argmax (or ``target_token_ids``) is seeded with
          1 x ``multiplier`` per row, as in 0.1.24; a one-logit head is seeded at index 0.
          ``"bbox-regression"``: every coordinate (or those in ``target_token_ids``) gets
          multiplier / K; ``"binary-segmentation"``: every pixel whose probability exceeds
          ``thresholding`` gets multiplier / K (0.1.24 seeds an argmax one-hot for both, B13).
          ``"generation"``: (last non-padded position, ``target_token_ids`` or the argmax).
          Unknown task strings raise :class:`dlbjax.TargetError` (0.1.24 silently seeds the
          argmax).
        * ``target_token_ids``: the explained class/token per row (an int or one per row), for
          every task (0.1.24 reads it for generation only).
        * ``start_wt``: honoured; an explicit seed of the explained output's shape ([rows, ...], or
          one row broadcast to all rows), or a (positive, negative) pair in contrastive mode
          (0.1.24 ignores it). ``multiplier`` and the task are then not used.
        * ``scaler`` is ignored, as in 0.1.24 (the seed value is always 1 x ``multiplier``; the
          GitHub-main rescaling of every map to sum to ``scaler`` is not reproduced). A value other
          than None, 0 or 1 warns.
        * It can be called any number of times after one ``predict`` (0.1.24: once, B19).
        """
        if self._inputs is None:
            raise RuntimeError("call predict(*inputs) before evaluation()")
        if scaler not in (None, 0, 1):
            warnings.warn(f"scaler={scaler!r} is ignored: dlbjax seeds 1 x multiplier (spec §1.3, "
                          "as dl-backtrace 0.1.24); scale the result yourself if needed",
                          stacklevel=2)
        if isinstance(task, str) and task.lower() in ("multi-class classification",):
            task = "classification"
        if target_token_ids is not None and not isinstance(target_token_ids, (int, np.integer)):
            t = np.asarray(target_token_ids.detach().cpu().numpy()
                           if isinstance(target_token_ids, torch.Tensor) else target_token_ids)
            if task not in ("bbox-regression", "regression", "binary-segmentation",
                            "segmentation"):
                # one id is broadcast over the batch, as in the original
                target_token_ids = int(t.reshape(-1)[0]) if t.size == 1 else t.reshape(-1)
        empty = isinstance(start_wt, (list, tuple)) and len(start_wt) == 0
        if start_wt is not None and not empty:
            ex = self._explainer(mode, "auto", multiplier, thresholding)
            e = self._explain_with_seed(ex, start_wt)
        else:
            ex = self._explainer(mode, task, multiplier, thresholding)
            e = ex(self._inputs, target=target_token_ids)
        self.explanation, self._explained_by = e, ex
        self.all_wt = self._all_wt(ex, e)
        if self.verbose:
            print(e.conservation)
        return self.all_wt

    def _explain_with_seed(self, ex: Explainer, start_wt) -> Explanation:
        arrays, n = ex.plan.rows(self._inputs)
        out_shape = tuple(ex.program.outputs[ex.explained].shape)
        contrastive = ex.options.contrastive
        streams = tuple(start_wt) if contrastive else (start_wt,)
        if contrastive and len(streams) != 2:
            raise TargetError("in contrastive mode start_wt is a (positive, negative) pair")
        seeds = []
        for s in streams:
            s = np.asarray(s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else s,
                           np.float32)
            if s.size == int(np.prod(out_shape)):
                s = np.broadcast_to(s.reshape(out_shape), (n,) + out_shape)
            elif s.size == n * int(np.prod(out_shape)):
                s = s.reshape((n,) + out_shape)
            else:
                raise TargetError(f"start_wt has {s.size} values; the explained output has "
                                  f"{n} rows of shape {out_shape[1:] or out_shape}")
            seeds.append(jnp.asarray(s))
        f = ex.relevance_function()
        consts = ex.constants
        prog = ex.program
        arrays = tuple(jnp.asarray(a, jnp_dtype(v.dtype)) for a, v in zip(arrays, prog.inputs))
        raw = jax.jit(jax.vmap(lambda a, s: f(consts, a, s)))(arrays, tuple(seeds))
        raw = raw._replace(target=jnp.full((n,), -1, jnp.int32))
        return assemble(ex.plan, jax.device_get(raw), n)

    def _all_wt(self, ex: Explainer, e: Explanation) -> dict:
        out_name = ex.program.outputs[ex.explained].name
        by_var = {k.rsplit("/", 1)[-1]: _to_numpy(v) for k, v in (e.layers or {}).items()
                  if k not in e.relevance}
        all_wt = {}
        if out_name in by_var:
            all_wt["output"] = by_var[out_name]
        for eqn in reversed(ex.program.eqns):
            for o in eqn.outputs:
                if o.name in by_var:
                    all_wt[o.name] = by_var[o.name]
        for name in self.input_names:
            all_wt[name] = _to_numpy(e.relevance[name])
        return all_wt

    def run_task(self, task: str = "auto", inputs: Any = None, tokenizer: Any = None,
                 mode: str = "default", multiplier: float = 100.0, scaler: float = 1.0,
                 thresholding: float = 0.5, temperature: float = 1.0, return_scores: bool = False,
                 return_relevance: bool = False, return_layerwise_output: bool = False,
                 save_relevance: bool = False, **generation_kwargs) -> dict:
        """One call: predict and explain (classification tasks) or generate and explain every token.

        ``task``: ``"auto"``, ``"tabular-classification"``, ``"image-classification"``,
        ``"text-classification"``, ``"generation"`` (the original's four), plus
        ``"binary-segmentation"`` and ``"bbox-regression"``. ``"auto"`` follows the original: a
        dict with ``input_ids`` or a tuple/list of two or more items is ``"generation"`` when the
        model can generate (``model.can_generate()``, stricter than the original's
        ``hasattr(model, "generate")``) and ``"text-classification"`` otherwise; a 4-D tensor is an
        image, a 2-D tensor tabular, anything else an image. ``inputs`` default to
        ``input_for_graph``.

        Returns, for classification: ``task``, ``node_io`` (:meth:`predict`), ``relevance``
        (:meth:`evaluation` with ``task="multi-class classification"``), ``predictions``
        (``node_io["output"]["output_values"]``), ``explanation`` (the dlbjax Explanation, an
        addition); with ``return_scores`` also ``scores_trace = [predictions]``, with
        ``return_relevance`` ``relevance_trace = [relevance]``, with ``return_layerwise_output``
        ``layerwise_output_trace = [node_io]``.

        For generation (delegated to :class:`DLBAutoSampler`, i.e. :func:`dlbjax.generate`; a
        ``tokenizer`` is optional and only supplies end/padding ids and tokenises a string
        prompt): ``task``, ``generated_ids`` [batch, total_len], ``relevance`` (the last step's
        ``{"input_ids": [batch, prompt_len + step]}``), ``node_io`` (None: no per-step graph
        values are kept), ``generation`` (the :class:`dlbjax.Generation`); ``scores_trace`` (one
        [batch, vocab] logits tensor per step) and ``relevance_trace`` (one
        ``{"input_ids": ...}`` per step, **every** step: the original keeps only the last, and
        none on CPU, defects B18/C6) on request. ``generation_kwargs`` are the sampler's knobs
        (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``num_beams``, ``seed``,
        ``explain_tokens``, ...). ``save_relevance=True`` is not supported (raises); the original's
        cache/compression keywords are accepted and ignored.
        """
        if save_relevance:
            raise NotImplementedError("save_relevance is not supported by dlbjax.compat; save the "
                                      "returned arrays (e.g. np.savez) or use "
                                      "Explainer.explain_dataset for resumable on-disk results")
        for k in _NO_OP_KEYWORDS:
            generation_kwargs.pop(k, None)
        inputs = self._example if inputs is None else inputs
        task = self._auto_task(task, inputs)
        if task == "generation":
            sampler = DLBAutoSampler(self, tokenizer)
            kw = dict(generation_kwargs)
            if temperature not in (None, 1.0) and "temperature" not in kw:
                kw["temperature"] = temperature
            ids, info = sampler.generate(inputs, mode=mode, multiplier=multiplier,
                                         return_info=True, **kw)
            trace = info["relevance_trace"]
            result = {"task": task, "node_io": None, "generated_ids": ids,
                      "relevance": trace[-1] if trace else {}, "generation": info["generation"]}
            if return_scores:
                result["scores_trace"] = info["scores_trace"]
            if return_relevance:
                result["relevance_trace"] = trace
            if return_layerwise_output:
                result["layerwise_output_trace"] = []
            return result
        if generation_kwargs:
            raise TypeError(f"unexpected keyword arguments for task {task!r}: "
                            f"{sorted(generation_kwargs)}")
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        node_io = self.predict(*args, temperature=temperature)
        seed_task = {"binary-segmentation": "binary-segmentation",
                     "bbox-regression": "bbox-regression"}.get(task, "multi-class classification")
        relevance = self.evaluation(mode=mode, multiplier=multiplier, scaler=scaler,
                                    thresholding=thresholding, task=seed_task)
        predictions = node_io["output"]["output_values"]
        result = {"task": task, "node_io": node_io, "relevance": relevance,
                  "predictions": predictions, "explanation": self.explanation}
        if return_scores:
            result["scores_trace"] = [predictions]
        if return_relevance:
            result["relevance_trace"] = [relevance]
        if return_layerwise_output:
            result["layerwise_output_trace"] = [node_io]
        return result

    def _auto_task(self, task: str, inputs) -> str:
        if task != "auto":
            if task not in _TASKS:
                raise TargetError(f"unknown task {task!r}; use 'auto' or one of {list(_TASKS)}")
            return task
        can_generate = hasattr(self.model, "generate") and (
            not hasattr(self.model, "can_generate") or bool(self.model.can_generate()))
        if (isinstance(inputs, dict) or hasattr(inputs, "keys")) and "input_ids" in inputs \
                or isinstance(inputs, (tuple, list)) and len(inputs) >= 2:
            return "generation" if can_generate else "text-classification"
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
            return "tabular-classification"
        return "image-classification"

    def sample_auto(self, tokenizer: Any, input_ids: Any, attention_mask: Any = None, **kw):
        """The original's entry to the sampler: ``DLBAutoSampler(self, tokenizer).generate()``."""
        return DLBAutoSampler(self, tokenizer).generate(input_ids, attention_mask=attention_mask,
                                                        **kw)

    # ---- views ---------------------------------------------------------------------------------
    def _need_explanation(self) -> Explanation:
        if self.explanation is None:
            self.predict(*((self._example,) if not isinstance(self._example, tuple)
                           else self._example))
            self.evaluation()
        return self.explanation

    def visualize(self, save_path: str = "graph.png"):
        """Draw the captured graph with its relevance (``dlbjax.plot_graph``, every node) to
        ``save_path``. Runs ``predict`` + ``evaluation`` on ``input_for_graph`` first if nothing
        was explained yet (the original draws the bare graph)."""
        e = self._need_explanation()
        return plot_graph(e, top_k=None, path=str(save_path), program=self._explained_by)

    def visualize_dlbacktrace(self, output_path: str = "backtrace_graph",
                              top_k: Optional[int] = None, relevance_threshold: Any = None,
                              engine_auto_threshold: int = 1500,
                              graph_mode: str = "top_k", graph_top_k: int = 120,
                              graph_max_nodes: int = 220):
        """The relevance graph of the last evaluation via ``dlbjax.plot_graph``: the ``top_k``
        (default ``graph_top_k``, capped at ``graph_max_nodes``) most relevant nodes, or every
        node with ``graph_mode="entire"``. Written to ``output_path`` (``.png`` appended when it
        has no suffix; the original writes graphviz SVG and shows it through IPython).
        ``relevance_threshold`` and ``engine_auto_threshold`` are accepted and ignored (the first
        is unused in the original too)."""
        path = Path(output_path)
        if not path.suffix:
            path = path.with_suffix(".png")
        k = None if graph_mode == "entire" else min(int(top_k or graph_top_k), int(graph_max_nodes))
        e = self._need_explanation()
        return plot_graph(e, top_k=k, path=str(path), program=self._explained_by)

    # ---- housekeeping --------------------------------------------------------------------------
    def print_all_relevance_info(self) -> None:
        """Print every entry of the last ``all_wt``: name, shape and total."""
        for name, v in (self.all_wt or {}).items():
            if isinstance(v, Streams):
                print(f"{name}: {tuple(v.positive.shape)} positive {float(v.positive.sum()):.6g} "
                      f"negative {float(v.negative.sum()):.6g}")
            else:
                print(f"{name}: {tuple(np.shape(v))} total {float(np.sum(v)):.6g}")

    def clear_intermediates(self, clear_executor_cache: bool = False) -> None:
        """Drop the stored ``node_io``/``all_wt`` (and the compiled explainers if asked)."""
        self.node_io = self.all_wt = self.explanation = None
        if clear_executor_cache:
            self._explainers = {k: v for k, v in self._explainers.items()
                                if v is self._base}
            self._forward = None

    def close(self, unload_model: bool = False) -> None:
        self.clear_intermediates(True)
        if unload_model:
            self.model = None


class DLBAutoSampler:
    """The original's ``DLBAutoSampler(dlb, tokenizer)``: generation with per-token relevance,
    delegating to :func:`dlbjax.generate` (one compiled decoding loop, one batched relevance pass
    over every step)."""

    def __init__(self, dlb: Any, tokenizer: Any = None):
        self.dlb = dlb
        self.model = dlb.model if isinstance(dlb, DLBacktrace) else dlb
        self.tokenizer = tokenizer

    @staticmethod
    def _strategy(strategy, temperature, top_k, top_p, num_beams):
        """The original's rule: beam when num_beams > 1 (sampling knobs forced off); sampling when
        temperature is set and not 1, top_k > 0 or 0 < top_p < 1; greedy otherwise."""
        top_k = top_k if top_k is not None and top_k > 0 else None
        top_p = top_p if top_p is not None and 0 < top_p < 1 else None
        temperature = 1.0 if temperature is None else float(temperature)
        if strategy in ("auto", None):
            if num_beams and num_beams > 1:
                strategy = "beam"
            elif temperature != 1.0 or top_k is not None or top_p is not None:
                strategy = "sample"
            else:
                strategy = "greedy"
        strategy = {"sampling": "sample", "beam_search": "beam"}.get(strategy, strategy)
        if strategy == "beam":
            return strategy, dict(num_beams=int(num_beams) if num_beams and num_beams > 1 else 4)
        if strategy == "sample":
            return strategy, dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return strategy, {}

    def generate(self, prompt: Any = None, attention_mask: Any = None, *, input_ids: Any = None,
                 strategy: str = "auto", max_new_tokens: int = 16,
                 temperature: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, num_beams: int = 1, seed: int = 0,
                 explain_tokens: Any = "all", mode: str = "default", multiplier: float = 100.0,
                 eos_token_id: Any = None, pad_token_id: Optional[int] = None,
                 return_info: bool = False, **unsupported):
        """Generate ``max_new_tokens`` tokens after ``prompt`` and explain each one.

        ``prompt``: a string (needs the tokenizer), ``input_ids`` [batch, T] / [T], or a dict
        with ``input_ids`` and ``attention_mask`` (left-padded batches work; the original forces
        batch 1). ``strategy``: ``"auto"`` picks as the original (see :meth:`_strategy`), or
        ``"greedy"``, ``"sample"``, ``"beam"``. Sampling is reproducible from ``seed`` (JAX PRNG;
        the original draws with ``torch.multinomial``). The seed of every step is
        1 x ``multiplier`` at (the step's position, the token actually chosen), as the original.
        ``explain_tokens``: ``"all"``, ``"none"``, an int N (the first N steps) or a list of step
        indices: which steps appear in ``relevance_trace`` (all steps are computed in one batched
        pass anyway unless ``"none"``). The original's Hugging Face logits processors
        (repetition penalty, bad words, ...) are not applied: passing one raises TypeError.

        Returns ``generated`` (torch int64 [batch, prompt_len + new]) or, with ``return_info``,
        ``(generated, info)``: ``scores_trace`` (per step [batch, vocab] logits tensors),
        ``relevance_trace`` (per explained step ``{"input_ids": [batch, prompt_len + step]}``,
        numpy), ``relevance_cache_policy`` ``"full"``, ``generation`` (the
        :class:`dlbjax.Generation`).
        """
        for k in _NO_OP_KEYWORDS:
            unsupported.pop(k, None)
        ignored = {k: v for k, v in unsupported.items() if v is not None}
        if ignored:
            raise TypeError(f"dlbjax's sampler does not support {sorted(ignored)} (Hugging Face "
                            "logits processors and stopping rules are not reproduced)")
        inputs = self._prompt(prompt if input_ids is None else input_ids, attention_mask)
        strategy, knobs = self._strategy(strategy, temperature, top_k, top_p, num_beams)
        tok = self.tokenizer
        if eos_token_id is None and getattr(tok, "eos_token_id", None) is not None:
            eos_token_id = tok.eos_token_id
        if pad_token_id is None and getattr(tok, "pad_token_id", None) is not None:
            pad_token_id = tok.pad_token_id
        opts = dict(getattr(self.dlb, "_options", {}))
        wanted = self._steps(explain_tokens, int(max_new_tokens))  # only these are computed
        g = _generate(self.model, inputs, max_new_tokens=int(max_new_tokens), strategy=strategy,
                      seed=seed, explain=bool(wanted), mode=mode,
                      multiplier=multiplier, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      explain_steps=wanted or None, **knobs, **opts)
        generated = torch.from_numpy(np.asarray(g.sequences, np.int64))
        if not return_info:
            return generated
        T0 = g.prompt_length
        N = g.sequences.shape[1] - T0
        steps = self._steps(explain_tokens, N)
        trace = []
        if g.token_relevance is not None:
            rel = g.token_relevance
            for s in steps:
                cut = T0 + s
                if isinstance(rel, Streams):
                    step = Streams(rel.positive[:, s, :cut], rel.negative[:, s, :cut])
                else:
                    step = rel[:, s, :cut]
                trace.append({"input_ids": step})
        info = {"scores_trace": [torch.from_numpy(np.array(g.step_logits[:, s])) for s in range(N)],
                "relevance_trace": trace, "relevance_cache_policy": "full",
                "explained_steps": steps, "generation": g}
        return generated, info

    def _prompt(self, prompt, attention_mask):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputMismatchError("a string prompt needs a tokenizer: "
                                         "DLBAutoSampler(dlb, tokenizer)")
            enc = self.tokenizer(prompt, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask")}
        if isinstance(prompt, dict) or hasattr(prompt, "keys"):
            d = {k: v for k, v in dict(prompt).items() if k in ("input_ids", "attention_mask")}
            if attention_mask is not None:
                d["attention_mask"] = attention_mask
            return d
        if isinstance(prompt, (tuple, list)) and len(prompt) == 2 and \
                all(isinstance(p, torch.Tensor) for p in prompt):
            return {"input_ids": prompt[0], "attention_mask": prompt[1]}
        if prompt is None:
            raise InputMismatchError("generate needs a prompt (text, input_ids or a dict)")
        ids = torch.as_tensor(prompt)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": torch.as_tensor(mask).reshape(ids.shape)}

    @staticmethod
    def _steps(explain_tokens, n: int) -> list:
        if explain_tokens == "all":
            return list(range(n))
        if explain_tokens == "none" or explain_tokens is None:
            return []
        if isinstance(explain_tokens, (int, np.integer)):
            return list(range(min(int(explain_tokens), n)))
        steps = sorted({int(s) for s in explain_tokens})
        bad = [s for s in steps if not 0 <= s < n]
        if bad:
            raise ValueError(f"explain_tokens {bad} outside the {n} generated steps")
        return steps
