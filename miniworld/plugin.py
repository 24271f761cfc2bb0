"""The mini world as a DiffGraph plugin: its base profile, metric suite and hub source,
registered through the entry points in pyproject.toml exactly as a third-party package would
(docs/plugins.md). Nothing outside miniworld/ imports this package; the registries find it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffgraph.families import Family
from diffgraph.merger.engine import MergeEngine
from diffgraph.settings import get_settings
from diffgraph.tools.bases import BaseProfile
from diffgraph.tools.sources import CivitaiSource, HFSource
from diffgraph.tools.sources.http import RetryPolicy

from . import ARTIFACTS, artifacts_io, domain
from .hub import running_hub
from .scorers import METRICS, combined_reward

NAME = "miniworld-sd"
REFERENCE_SEED = 20231


def _engine() -> MergeEngine:
    return MergeEngine(artifacts_io.load_pipeline(device=get_settings().torch_device))  # CUDA when present


def _prompts(n: int, seed: int, rare_rate: float = 0.1) -> list[str]:
    rng = random.Random(seed)
    return [domain.caption(domain.sample_attrs(rng, rare_rate=rare_rate), rng) for _ in range(n)]


def _training(n: int, seed: int) -> list[str]:
    """Training prompts from another seed range, minus any that are reference candidates."""
    refs = set(_prompts(400, REFERENCE_SEED))
    return [p for p in _prompts(n * 2, 100_000 + seed) if p not in refs][:n]


def _planner() -> Path | None:
    return ARTIFACTS / "planner" if (ARTIFACTS / "planner" / "planner.json").exists() else None


class MiniWorldSuite:
    """The mini world's four scores (METRICS) behind the MetricSuite interface."""

    def __init__(self, root: Path | None = None):
        self._suite = artifacts_io.load_scorers(root or artifacts_io.ARTIFACTS)
        self.names = METRICS

    def score(self, images, prompts):
        return [[s[n] for n in self.names] for s in self._suite.score(images, prompts)]

    def reward(self, vector):
        return combined_reward(dict(zip(self.names, vector)))


# The mini world's tiny SD: one text encoder like SD 1.5, attention in its first down and up
# blocks (neither SD 1.5 nor SDXL has both), no shipped configs (its base folder has them).
FAMILY = Family(NAME, "mini-world SD", ("unet", "vae", "text_encoder"), spellings=("miniworld",),
                attention_in_first_down_block=True, attention_in_first_up_block=True)
BASE = BaseProfile(NAME, _engine, MiniWorldSuite, lambda n: _prompts(n, REFERENCE_SEED), _training, _planner,
                   sources=("miniworld",))  # the demo draws from the held-out prompts (tools/bases.demo_prompts)


@contextmanager
def open_hub(location: str | None, *, retry: RetryPolicy | None = None, hub_port: int = 0) -> Iterator[list]:
    """``miniworld[:ARTIFACTS_DIR]``: the bundled hub on a loopback port, crawled through both
    the Civitai and the Hugging Face client (the code that runs against the real sites)."""
    with running_hub(Path(location) if location else None, port=hub_port) as hub:
        yield [CivitaiSource(hub.civitai_url, token="", retry=retry), HFSource(hub.hf_url, token="", retry=retry)]
