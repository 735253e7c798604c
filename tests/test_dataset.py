"""Dataset explanation to disk: shards + manifest, load_results in row order, iterables of
batches, and resuming after a process is killed midway (no row lost or duplicated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dlbjax
from conftest import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def explainer(mlp):
    return dlbjax.Explainer(mlp, torch.randn(1, 16))


@pytest.fixture(scope="module")
def data():
    return torch.randn(23, 16, generator=torch.Generator().manual_seed(1))


def _same(a, b):
    np.testing.assert_allclose(a.relevance["x"], b.relevance["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.prediction, b.prediction, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.target, b.target)
    for f in ("seed", "inputs", "bias", "lost"):
        np.testing.assert_allclose(getattr(a.conservation, f), getattr(b.conservation, f),
                                   rtol=1e-6, atol=1e-5)


def test_arrays_round_trip(explainer, data, tmp_path):
    manifest = explainer.explain_dataset(data, batch_size=4, out=tmp_path, shard_rows=8,
                                         progress=False)
    assert manifest["complete"] and manifest["rows"] == 23
    assert [s["start"] for s in manifest["shards"]] == [0, 8, 16]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["rows"] == 23 and len(list(tmp_path.glob("shard-*.npz"))) == 3
    r = dlbjax.load_results(tmp_path)
    assert r.relevance["x"].shape == (23, 16) and r.relevance["x"].dtype == np.float32
    assert r.prediction.shape == (23, 10) and r.conservation.seed.shape == (23,)
    _same(r, explainer.batch(data, batch_size=4))
    # a finished run is not redone: same manifest, no new shards
    again = explainer.explain_dataset(data, batch_size=4, out=tmp_path, shard_rows=8,
                                      progress=False)
    assert again["shards"] == manifest["shards"]


def test_iterable_of_batches_with_targets(explainer, data, tmp_path):
    target = np.arange(23) % 10
    sizes = [5, 3, 7, 8]
    starts = np.cumsum([0] + sizes)

    def batches():
        for a, b in zip(starts[:-1], starts[1:]):
            yield {"x": data[a:b].numpy()}

    explainer.explain_dataset(batches(), batch_size=4, out=tmp_path, shard_rows=6,
                              target=target, progress=False)
    r = dlbjax.load_results(tmp_path)
    np.testing.assert_array_equal(r.target, target)
    _same(r, explainer.batch(data, target=target, batch_size=4))


def test_contrastive_streams_round_trip(mlp, data, tmp_path):
    ex = dlbjax.Explainer(mlp, data[:1], mode="contrastive")
    ex.explain_dataset((data[:9],), batch_size=4, out=tmp_path, shard_rows=4, progress=False)
    r = dlbjax.load_results(tmp_path)
    ref = ex.batch(data[:9], batch_size=4)
    assert isinstance(r.relevance["x"], dlbjax.Streams) and r.mode == "contrastive"
    for a, b in zip(r.relevance["x"], ref.relevance["x"]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.conservation.seed.negative, ref.conservation.seed.negative)


def test_resume_refuses_other_configuration(mlp, explainer, data, tmp_path):
    explainer.explain_dataset(data[:8], batch_size=4, out=tmp_path, progress=False)
    other = dlbjax.Explainer(mlp, data[:1], multiplier=1.0)
    with pytest.raises(ValueError, match="different configuration"):
        other.explain_dataset(data[:8], batch_size=4, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="8 rows"):
        explainer.explain_dataset(data, batch_size=4, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different targets"):
        explainer.explain_dataset(data[:8], batch_size=4, out=tmp_path, target=1, progress=False)
    other.explain_dataset(data[:8], batch_size=4, out=tmp_path, progress=False, overwrite=True)
    assert dlbjax.load_results(tmp_path).multiplier == 1.0


_KILLED = """
import os, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
import dlbjax
from conftest import MLP
model = MLP().eval()
model.load_state_dict(torch.load({weights!r}))
data = np.load({data!r})
ex = dlbjax.Explainer(model, torch.from_numpy(data[:1]))

def die(index, rows):
    if index == 1:          # after the second shard is committed
        os._exit(17)

ex.explain_dataset(data, batch_size=4, out={out!r}, shard_rows=8, progress=False, callback=die)
"""


def test_resume_after_kill(mlp, explainer, data, tmp_path):
    """A process killed after two shards; resuming in-process explains only the rest and the
    result equals an uninterrupted run."""
    weights, arr, out = tmp_path / "w.pt", tmp_path / "data.npy", tmp_path / "out"
    torch.save(mlp.state_dict(), weights)
    np.save(arr, data.numpy())
    script = _KILLED.format(tests=os.path.join(ROOT, "tests"), weights=str(weights),
                            data=str(arr), out=str(out))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 16 and not manifest["complete"] and len(manifest["shards"]) == 2
    with pytest.warns(UserWarning, match="not finished"):
        partial = dlbjax.load_results(out)
    assert len(partial.target) == 16

    # a stray, half-written shard left by a crash must not be picked up
    (out / "shard-00002.npz.tmp").write_bytes(b"garbage")
    done = []
    explainer.explain_dataset(np.load(arr), batch_size=4, out=out, shard_rows=8, progress=False,
                              callback=lambda i, rows: done.append((i, rows)))
    assert done == [(2, 23)]  # only the last shard was explained
    resumed = dlbjax.load_results(out)
    explainer.explain_dataset(np.load(arr), batch_size=4, out=tmp_path / "full", shard_rows=8,
                              progress=False)
    full = dlbjax.load_results(tmp_path / "full")
    assert len(resumed.target) == 23
    _same(resumed, full)
