"""Small value types shared by every stage: the contrastive ``Streams`` pair and the option
literals."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

__all__ = ["Streams", "Mode", "ProductRule", "TaskName"]

Mode = Literal["default", "contrastive"]
ProductRule = Literal["half", "dlb", "signal_take_all"]
TaskName = Literal["classification", "binary", "regression", "segmentation", "next-token"]


class Streams(NamedTuple):
    """The two non-negative relevance maps of contrastive mode (spec §3.1)."""

    positive: Any
    negative: Any
