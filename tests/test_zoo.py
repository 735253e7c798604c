"""The model zoo (``tests/zoo.py``), image half: every family explains in both modes with the
forward equal to torch (1e-5 relative), finite relevance, and nothing lost (``lost`` <= 1e-3 of the
seed; relevance at learned tensors is ``params``, not lost). The sequence half is in
``test_zoo_sequences.py`` (a second file, so the two halves run on different workers). README's
"Models tested" table is generated from the same measurement by ``tools/zoo_table.py``."""

from __future__ import annotations

import pytest

import zoo


@pytest.mark.parametrize("name", zoo.IMAGE_MODELS)
def test_zoo_image_models(name):
    zoo.check(name)
