"""Base-model profiles: for each base-model family the graph can hold, how to build its merge
engine, which metric suite scores it, and where reference-prompt candidates come from.

Experts of a base with no profile here cannot be calibrated and are rejected with that
reason, instead of being rendered on the wrong architecture.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class BaseProfile:
    name: str
    engine: Callable[[], object]  # -> MergeEngine
    suite: Callable[[], object]  # -> MetricSuite
    reference_candidates: Callable[[int], list[str]]
    training_prompts: Callable[[int, int], list[str]]  # (n, seed) -> prompts disjoint from the references
    default_planner: Callable[[], Path | None] = lambda: None  # a shipped planner checkpoint, if any


def _miniworld_engine():
    from diffgraph.merger.engine import MergeEngine
    from diffgraph.miniworld import artifacts_io
    from diffgraph.settings import get_settings

    return MergeEngine(artifacts_io.load_pipeline(device=get_settings().torch_device))  # CUDA when present


def _miniworld_suite():
    from .scoring import get_suite

    return get_suite("miniworld")


def _miniworld_prompts(n: int, seed: int, rare_rate: float = 0.1) -> list[str]:
    from diffgraph.miniworld import domain

    rng = random.Random(seed)
    return [domain.caption(domain.sample_attrs(rng, rare_rate=rare_rate), rng) for _ in range(n)]


REFERENCE_SEED = 20231


def _miniworld_training(n: int, seed: int) -> list[str]:
    """Training prompts from another seed range, minus any that are reference candidates."""
    refs = set(_miniworld_prompts(400, REFERENCE_SEED))
    return [p for p in _miniworld_prompts(n * 2, 100_000 + seed) if p not in refs][:n]


def _miniworld_planner() -> Path | None:
    from diffgraph.miniworld import ARTIFACTS

    return ARTIFACTS / "planner" if (ARTIFACTS / "planner" / "planner.json").exists() else None


PROFILES: dict[str, BaseProfile] = {
    "miniworld-sd": BaseProfile(
        "miniworld-sd", _miniworld_engine, _miniworld_suite,
        lambda n: _miniworld_prompts(n, REFERENCE_SEED), _miniworld_training, _miniworld_planner),
}


def profile(base_model: str) -> BaseProfile:
    try:
        return PROFILES[base_model]
    except KeyError:
        raise KeyError(f"no base-model profile for {base_model!r} (known: {', '.join(PROFILES)})") from None


@lru_cache(maxsize=4)
def engine_for(base_model: str):
    """One merge engine per base per process (it holds the pipeline and the merge caches)."""
    return profile(base_model).engine()


@lru_cache(maxsize=4)
def suite_for(base_model: str):
    return profile(base_model).suite()
