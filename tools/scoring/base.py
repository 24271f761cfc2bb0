"""The metric-suite interface and the registry of suites."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image


class MetricSuite(Protocol):
    names: tuple[str, ...]

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[list[float]]:
        """One score vector per (image, prompt), in ``names`` order."""

    def reward(self, vector: list[float]) -> float:
        """The scalar the planner maximises."""


class MiniWorldSuite:
    """The mini world's three scorers behind the suite interface."""

    def __init__(self, root: Path | None = None):
        from diffgraph.miniworld import artifacts_io
        from diffgraph.miniworld.scorers import METRICS

        self._suite = artifacts_io.load_scorers(root or artifacts_io.ARTIFACTS)
        self.names = METRICS

    def score(self, images, prompts):
        return [[s[n] for n in self.names] for s in self._suite.score(images, prompts)]

    def reward(self, vector):
        from diffgraph.miniworld.scorers import combined_reward

        return combined_reward(dict(zip(self.names, vector)))


def get_suite(name: str = "miniworld", **kw) -> MetricSuite:
    if name == "miniworld":
        return MiniWorldSuite(**kw)
    if name == "real":
        from .real import RealSuite

        return RealSuite(**kw)
    raise ValueError(f"unknown metric suite {name!r}: use 'miniworld' or 'real'")
