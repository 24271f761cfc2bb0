"""Pluggable image-quality metric suites (the calibration edge features and the planner's reward).

A suite has ``names`` and ``score(images, prompts) -> list[list[float]]`` (one vector per image,
in ``names`` order). ``get_suite`` builds one by name: "real" (CLIP Score, ImageReward,
Aesthetic, PickScore, HPSv2.1 from local weights) or one a package registers in the
``diffgraph.suites`` entry-point group (the mini world's "miniworld").
"""

from __future__ import annotations

from .base import MetricSuite, get_suite

__all__ = ["MetricSuite", "get_suite"]
