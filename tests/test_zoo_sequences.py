"""The model zoo (``tests/zoo.py``), sequence half: vision transformers, encoders, decoders, MoE,
audio and recurrent models; the same assertions as ``test_zoo.py`` plus padded tokens exactly 0."""

from __future__ import annotations

import pytest

import zoo


@pytest.mark.parametrize("name", zoo.SEQUENCE_MODELS)
def test_zoo_sequence_models(name):
    zoo.check(name)
