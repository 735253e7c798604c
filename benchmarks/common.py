"""Shared pieces of the benchmarks: the machine line, interleaved timing, the benchmark models."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from bench_transformers import bert_base, llama_like  # noqa: E402,F401


def machine_line() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: nproc {os.cpu_count()}, CPU '{cpu}', load average {load} (1/5/15 min), "
            f"{platform.system()} {platform.machine()}, jax {jax.__version__} "
            f"({', '.join(str(d) for d in jax.devices())}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, timed round-robin (so load spikes hit all alike)."""
    for f in fns.values():
        for _ in range(warmup):
            _block(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            _block(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _block(x):
    if isinstance(x, torch.Tensor):
        return x
    return jax.block_until_ready(x)


def mlp(width: int = 1024, depth: int = 3, inputs: int = 512, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    layers, d = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers).eval()


def resnet18() -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def token_inputs(rows: int, seq: int, llama: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    inp = {"input_ids": torch.randint(5, 1000, (rows, seq), generator=g),
           "attention_mask": torch.ones(rows, seq, dtype=torch.long)}
    if llama:
        inp["use_cache"] = False
    return inp


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 10 else f"{ms:.0f}"


np.set_printoptions(precision=4)
