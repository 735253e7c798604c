"""From the runner's raw row results to an :class:`~dlbjax.Explanation`.

:func:`explain_rows` is the one path every caller takes (``Explainer.__call__``/``batch``, dataset
shards, generation, the compatibility layer): validate the inputs against the plan, check the
targets with the task, run the rows, and :func:`assemble` the result (per-input relevance in the
inputs' layout, conservation totals, per-layer relevance, expert relevance).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._errors import NonFiniteError
from ._plan import Plan
from ._result import Conservation, Explanation
from ._runner import Runner
from ._types import Streams
from ._views import layer_flow
from .engine.relevance import RowResult

__all__ = ["explain_rows", "assemble"]


def explain_rows(plan: Plan, runner: Runner, inputs: Any, target: Any = None, *,
                 dataset: bool = False, size: Optional[int] = None, fixed: bool = False,
                 progress: bool = False, keep_inputs: bool = True) -> Explanation:
    """Explain ``inputs`` (the caller's form). ``size``: rows per compiled call (None: all rows
    at once; capped at the row count unless ``fixed``, which pads every chunk to ``size`` so that
    any row count shares one compilation); ``keep_inputs``: keep the inputs in the result."""
    task = plan.check_task()
    arrays, n = plan.rows(inputs, dataset=dataset)
    classes, select = task.check(target, n, plan.out_size)
    if size is not None:
        size = max(1, int(size) if fixed else min(int(size), n))
    raw = runner.run_rows(arrays, classes, select, size=size, progress=progress)
    return assemble(plan, raw, n, dataset=dataset, arrays=arrays if keep_inputs else None)


def assemble(plan: Plan, raw: RowResult, n: int, dataset: bool = False,
             arrays: Optional[tuple] = None) -> Explanation:
    """The :class:`Explanation` of ``n`` rows from the runner's host result ``raw``.

    ``dataset``: the rows were given as a dataset (``batch``); ``arrays``: the explained inputs
    as the runner got them (kept in ``Explanation.inputs`` for the pictures), or None."""
    _check_finite_relevance(raw)
    contrastive = plan.options.contrastive

    def finish(streams, input_shape: bool):
        # rows are vmapped: [n, *row_shape]; a row's own batch axis of 1 merges into the rows
        arrs = [np.asarray(s) for s in streams]
        if plan.config.batch_axis == 0 and (input_shape or (arrs[0].ndim > 1 and arrs[0].shape[1] == 1)):
            arrs = [a.reshape((n,) + a.shape[2:]) for a in arrs]
        elif input_shape and not dataset:
            arrs = [a[0] for a in arrs]
        return Streams(*arrs) if contrastive else arrs[0]

    relevance = {name: finish(raw.relevance[name], True) for name, _, _ in plan.row_specs}
    pred = np.asarray(raw.prediction)
    pred = pred.reshape((n,) + pred.shape[2:]) if plan.config.batch_axis == 0 else (
        pred if dataset else pred[0])
    outputs = {}
    for name, o in zip(plan.program.output_names, raw.outputs):
        o = np.asarray(o)
        outputs[name] = _join_rows(o, n) if plan.config.batch_axis == 0 else (
            o if dataset else o[0])

    def per_stream(a):
        a = np.asarray(a)
        return Streams(a[:, 0], a[:, 1]) if contrastive else a[:, 0]

    seed = per_stream(raw.seed)
    inputs_total = per_stream(raw.input_total)
    bias = per_stream(raw.absorbed)
    names = plan.constant_names
    cmat = np.asarray(raw.constants) if raw.constants is not None else np.zeros((n, 1, 0))
    constants = {name: (Streams(cmat[:, 0, k], cmat[:, 1, k]) if contrastive else cmat[:, 0, k])
                 for k, name in enumerate(names)}
    params = per_stream(cmat.sum(axis=-1))
    if contrastive:
        lost = Streams(*(s - i - b - p for s, i, b, p in zip(seed, inputs_total, bias, params)))
    else:
        lost = seed - inputs_total - bias - params
    experts = [_expert_relevance(m, raw, contrastive) for m in plan.moe_layers] or None
    layers = None
    if plan.config.layers:
        layers = {name: finish(raw.relevance[name], True) for name, _, _ in plan.row_specs}
        labels = {o.name: (e.source.module_path, o.name) for e in plan.program.eqns
                  for o in e.outputs}
        for var_name, streams in raw.layers.items():
            path, v = labels[var_name]
            key = f"{path}/{v}" if path else v
            layers[key] = finish(streams, False)
    target = np.asarray(raw.target).reshape(-1)
    kept = None
    if arrays is not None:  # the explained inputs, in the layout of their relevance
        kept = {}
        for (name, _, _), a in zip(plan.row_specs, arrays):
            ref = relevance[name].positive if contrastive else relevance[name]
            a = np.asarray(a)
            kept[name] = a.reshape(ref.shape) if a.size == ref.size else a
    flow = None
    if layers:
        flow = layer_flow(plan.program, layers)
    return Explanation(relevance=relevance, prediction=pred, target=target,
                       conservation=Conservation(seed, inputs_total, bias, lost, params),
                       mode=plan.config.mode, task=plan.task.name if plan.task else None,
                       multiplier=plan.config.multiplier if plan.config.gradient_params is None else 1.0,
                       outputs=outputs, layers=layers, experts=experts, inputs=kept,
                       flow=flow, constants=constants, method=plan.config.method_name)


def _join_rows(o: np.ndarray, n: int) -> np.ndarray:
    """Per-row outputs [n, *row] back into one batch: along the row's leading axis of 1, or, for
    an output whose batch axis is not first (XLNet's ``mems`` [T, B, d]), along its only axis of
    size 1; an output with no such axis stays stacked [n, *row]."""
    if o.ndim >= 2 and o.shape[1] == 1:
        return o.reshape((n,) + o.shape[2:])
    ones = [i for i, d in enumerate(o.shape[1:]) if d == 1]
    if len(ones) != 1:
        return o
    ax = ones[0]
    return np.moveaxis(o, 0, ax + 1).reshape(o.shape[1:ax + 1] + (n,) + o.shape[ax + 2:])


def _expert_relevance(layer, raw: RowResult, contrastive: bool) -> dict:
    """Per-expert relevance of one MoE layer from the weighted expert outputs' relevance."""
    idx = np.asarray(raw.probes[layer.indices.name]).astype(np.int64)  # [n, tokens, k]
    onehot = np.eye(layer.num_experts)[idx]  # [n, tokens, k, E]

    def one(stream):
        r = np.asarray(stream).sum(-1)  # [n, tokens, k]
        per_token = np.einsum("ntk,ntke->nte", r, onehot)
        return per_token.sum(1), per_token

    streams = raw.layers[layer.weighted.name]
    if contrastive:
        (pe_p, pt_p), (pe_n, pt_n) = one(streams[0]), one(streams[1])
        return {"layer": layer.name, "per_expert": Streams(pe_p, pe_n),
                "per_token": Streams(pt_p, pt_n)}
    pe, pt = one(streams[0])
    return {"layer": layer.name, "per_expert": pe, "per_token": pt}


def _check_finite_relevance(raw: RowResult) -> None:
    """Finite inputs and weights can still overflow inside the forward (float32 tops out at 3e38);
    relevance of non-finite values is undefined, so refuse rather than return NaN."""
    named = [(f"input '{k}'", s) for k, streams in raw.relevance.items() for s in streams]
    for what, arr in named + [("the bias totals", raw.absorbed)]:
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            row = int(np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0][0])
            raise NonFiniteError(
                f"the relevance of {what} is NaN or inf (first at row {row}): the forward pass "
                "produced non-finite values (an overflow: float32 ends at 3.4e38) although inputs "
                "and weights are finite. Scale the inputs down, or explain in float64 "
                "(jax_enable_x64 and model.double())")
