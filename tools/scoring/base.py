"""The metric-suite interface and the registry of suites (entry-point group
``diffgraph.suites``: a name -> a callable that builds the suite; "real" is built in)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from PIL import Image

from diffgraph.registry import Registry


class MetricSuite(Protocol):
    names: tuple[str, ...]

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[list[float]]:
        """One score vector per (image, prompt), in ``names`` order."""

    def reward(self, vector: list[float]) -> float:
        """The scalar the planner maximises."""


SUITES: Registry[Callable[..., MetricSuite]] = Registry("diffgraph.suites", "metric suite")


def _real_suite(**kw) -> MetricSuite:
    from .real import RealSuite  # torch, transformers, open_clip: only when the real metrics are asked for

    return RealSuite(**kw)


SUITES.register("real", _real_suite)


def get_suite(name: str, **kw) -> MetricSuite:
    """The suite registered as ``name`` ("real", or one a package registers, such as the mini
    world's "miniworld"), built with ``kw``."""
    return SUITES.get(name)(**kw)
