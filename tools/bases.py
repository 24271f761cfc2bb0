"""Base-model profiles: for each base-model family the graph can hold, how to build its merge
engine, which metric suite scores it, and where reference-prompt candidates come from.

Profiles come from the ``diffgraph.bases`` entry points (how plugins add theirs) and, for the
real families, from the user's own weights (DIFFGRAPH_BASE_SD15 / _SDXL). Experts of a base with
no profile cannot be calibrated and are rejected with that reason, instead of being rendered on
the wrong architecture.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from diffgraph.errors import DiffGraphError, reason
from diffgraph.families import family_of, label
from diffgraph.merger.detect import BaseDetectionError, detect_base
from diffgraph.merger.engine import MergeEngine
from diffgraph.merger.real_pipelines import load_base
from diffgraph.registry import Registry
from diffgraph.settings import get_settings

from .scoring import get_suite


@dataclass(frozen=True)
class BaseProfile:
    name: str
    engine: Callable[[], object]  # -> MergeEngine
    suite: Callable[[], object]  # -> MetricSuite
    reference_candidates: Callable[[int], list[str]]
    training_prompts: Callable[[int, int], list[str]]  # (n, seed) -> prompts disjoint from the references
    default_planner: Callable[[], Path | None] = lambda: None  # a shipped planner checkpoint, if any
    sources: tuple[str, ...] = ()  # source specs that crawl this base's experts when none are named
    demo_prompts: tuple[str, ...] = ()  # what `diffgraph demo` answers on this base
    check: Callable[[], None] = lambda: None  # raises what is not set up (cheaply: nothing is loaded)


# The prompt split every planner is trained, chosen and judged on (benchmarks/paper_experiments.py)
# at its default sizes, and where the demo draws its prompts from.
TEST_PROMPTS, TRAINING_PROMPTS, VALIDATION_PROMPTS = 48, 64, 32
DEMO_SEED = 20261203


def prompt_split(profile: BaseProfile, test: int = TEST_PROMPTS, train: int = TRAINING_PROMPTS,
                 validation: int = VALIDATION_PROMPTS) -> tuple[list[str], list[str], list[str]]:
    """Training, validation and held-out test prompts of a base: disjoint, and the same for every
    call with these sizes. A planner trains on the first, is chosen on the second and is judged
    on the third; nothing is tuned on the third."""
    train_set = profile.training_prompts(train, 1)
    test_set = [p for p in profile.training_prompts(test * 2, 7) if p not in set(train_set)][:test]
    valid_set = [p for p in profile.training_prompts(validation * 2, 3)
                 if p not in set(train_set) | set(test_set)][:validation]
    return train_set, valid_set, test_set


def demo_prompts(profile: BaseProfile, n: int = 4) -> list[str]:
    """What `diffgraph demo` answers: the profile's own demo prompts, else ``n`` held-out test
    prompts drawn by a fixed seed, so the demo shows what the benchmark measures and nobody
    picked them by looking at the results."""
    if profile.demo_prompts:
        return list(profile.demo_prompts)
    return random.Random(DEMO_SEED).sample(prompt_split(profile)[2], n)


def _check_profile(obj: object) -> BaseProfile:
    if not isinstance(obj, BaseProfile):
        raise TypeError(f"a diffgraph.bases entry point must name a BaseProfile, not {type(obj).__name__}")
    return obj


BASES: Registry[BaseProfile] = Registry("diffgraph.bases", "base-model profile", _check_profile)


# Real base models: the user's own weights, named by DIFFGRAPH_BASE_<FAMILY> (a single-file
# .safetensors as Civitai/A1111 ship it, or a diffusers folder). FLUX needs a T5 text encoder
# that never comes in a single file, so it has no profile yet (docs/real-models.md).
REAL_FAMILIES = ("sd15", "sdxl")
REAL_PROMPTS = Path(__file__).parent / "prompts" / "real.txt"


def _real_prompts() -> list[str]:
    return [line.strip() for line in REAL_PROMPTS.read_text().splitlines() if line.strip()]


N_REAL_REFERENCES = 30  # the first 30 shipped prompts are reference candidates, the rest train the planner


def _real_training(n: int, seed: int) -> list[str]:
    """The shipped prompts that are not reference candidates, shuffled by ``seed``."""
    refs = set(_real_prompts()[:N_REAL_REFERENCES])
    rest = [p for p in _real_prompts() if p not in refs]
    random.Random(seed).shuffle(rest)
    return rest[:n]


def _real_engine(family: str, path: Path) -> Callable[[], object]:
    def build():
        import torch

        device = get_settings().torch_device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        return MergeEngine(load_base(path, family, dtype=dtype, device=device), cache_bytes=8 << 30)
    return build


def _real_suite():
    return get_suite("real")  # weights from DIFFGRAPH_METRICS_DIR or the HF cache; says what is missing


def _real_profile(family: str) -> BaseProfile:
    variable = f"DIFFGRAPH_BASE_{family.upper()}"
    value = os.environ.get(variable)
    if not value:
        raise KeyError(f"{label(family)} experts need your {label(family)} base model: set {variable} to its "
                       f"single-file .safetensors or diffusers folder (docs/real-models.md)")
    path = Path(value).expanduser()
    if not path.exists():
        raise KeyError(f"{variable} points at {path}, which does not exist")
    return BaseProfile(family, _real_engine(family, path), _real_suite,
                       lambda n: _real_prompts()[:min(n, N_REAL_REFERENCES)], _real_training,
                       demo_prompts=tuple(_real_training(4, 0)), check=lambda: _real_check(family, variable, path))


def _real_check(family: str, variable: str, path: Path) -> None:
    """The configured base holds weights of its family, and every metric weight is on disk."""
    try:
        found = detect_base(path)
    except BaseDetectionError as exc:
        raise BaseNotReady(f"{variable}: {reason(exc)}") from None
    if found != family:
        raise BaseNotReady(f"{variable} names {path.name}, which holds {label(found)} weights, not {label(family)}")
    try:
        get_suite("real", lazy=True)  # resolves every file, loads nothing
    except FileNotFoundError as exc:  # MissingMetricWeights: its first line says what and where
        raise BaseNotReady(f"{str(exc).split(chr(10), 1)[0]} Set DIFFGRAPH_METRICS_DIR to the folder that "
                           "holds them (docs/real-models.md).") from None


def profile(base_model: str) -> BaseProfile:
    """The profile of a base-model name as the catalog stores it (a registered base, or
    "sd15", "sdxl"; published names such as "SD 1.5" or "SDXL 1.0" map to
    their family)."""
    if base_model in BASES:
        return BASES.get(base_model)

    family = family_of(base_model)
    if family in BASES:
        return BASES.get(family)
    if family in REAL_FAMILIES:
        return _real_profile(family)
    raise KeyError(f"no base-model profile for {base_model!r} (known: {', '.join([*BASES.names(), *REAL_FAMILIES])})")


class AmbiguousBase(DiffGraphError, KeyError):
    """No base was named and there is more than one to choose from."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def choose_base(requested: str | None, held: list[str]) -> str:
    """The base model a command or request works with.

    ``requested`` (``--base-model``, the API's ``model``, else DIFFGRAPH_BASE) wins and must
    have a profile. Without one: the only base the graph holds experts of (``held``); with an
    empty graph, the only registered base (a plugin's, when no real base is configured).
    More than one candidate is an AmbiguousBase error naming them, never a silent pick."""
    if requested:
        return profile(requested).name  # its family ("SD 1.5" -> "sd15"); a base nothing can render is refused in one line
    candidates = sorted(set(held)) or BASES.names()
    if len(candidates) == 1:
        return candidates[0]
    where = "the graph holds experts of" if held else "no experts yet, and the registered bases are"
    raise AmbiguousBase(f"{where} {len(candidates)} base models ({', '.join(candidates) or 'none'}): "
                        "choose one with --base-model, the API's model field or DIFFGRAPH_BASE")


class BaseNotReady(DiffGraphError, RuntimeError):
    """A base whose setup is incomplete (its weights or its metric weights), in one line naming
    the setting to fix."""


def check_ready(base_model: str) -> None:
    """Raise BaseNotReady when ``base_model`` cannot be worked with as configured: no profile,
    a base file of another family, metric weights missing. Cheap: nothing is loaded, so a
    pass says so before it downloads or renders anything."""
    try:
        found = profile(base_model)
    except KeyError as exc:
        raise BaseNotReady(reason(exc)) from None
    found.check()


def known() -> list[str]:
    """Every base a command may name: the registered profiles and the real families."""
    return sorted({*BASES.names(), *REAL_FAMILIES})


def has_profile(base_model: str) -> bool:
    try:
        profile(base_model)
    except KeyError:
        return False
    return True


def engine_for(base_model: str):
    """One merge engine per base per process (it holds the pipeline and the merge caches);
    "SD 1.5" and "sd15" share one."""
    return _engine(profile(base_model).name)


def suite_for(base_model: str):
    return _suite(profile(base_model).name)


@lru_cache(maxsize=4)
def _engine(name: str):
    return profile(name).engine()


@lru_cache(maxsize=4)
def _suite(name: str):
    return profile(name).suite()
