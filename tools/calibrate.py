"""Node calibration (paper Sec. 3.1): reference prompts and expert scoring.

Reference prompts follow the paper's recipe: from a candidate pool, keep the prompts that
together cover the most linguistic variety (nouns, adjectives, prepositions) and conceptual
variety (spread in embedding space). Each expert then renders every reference prompt with
fixed seeds, and the metric suite's score vectors become the expert's edge features.

The unit of work is one (expert, reference prompt) pair: render the prompt with each seed and
score the images together (:func:`score_prompt`). :func:`calibrate_experts` runs a batch of
them in this process, or, when a Ray address is given (DIFFGRAPH_RAY_ADDRESS), fans the pairs
out to Ray actors that each hold a merge engine (``tools/ray_calibrate.py``); both paths call
:func:`score_prompt`, so for the same seeds they give the same numbers.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffgraph.merger.merge import MergeError
from diffgraph.merger.recipe import ExpertWeight, MergeRecipe, with_trigger_words

PREPOSITIONS = frozenset("on in at against with under over behind beside near above below inside around of".split())
FUNCTION_WORDS = frozenset("a an the and or to for from by is are it its this that".split())


def _features(prompt: str) -> set[str]:
    """Content words (nouns/adjectives, approximated by not being function words) and the
    prepositions that relate them, tagged so they count separately."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return {f"prep:{w}" if w in PREPOSITIONS else f"word:{w}" for w in words if w not in FUNCTION_WORDS and len(w) > 1}


def select_reference_prompts(candidates: list[str], n: int, embed: Callable[[list[str]], np.ndarray],
                             diversity_weight: float = 2.0) -> list[str]:
    """Greedy pick: each step takes the candidate adding the most unseen words/prepositions,
    plus ``diversity_weight`` times its cosine distance to the nearest prompt already kept."""
    candidates = list(dict.fromkeys(c.strip() for c in candidates if c.strip()))
    if n >= len(candidates):
        return candidates
    feats = [_features(c) for c in candidates]
    emb = embed(candidates)
    covered: set[str] = set()
    nearest = np.full(len(candidates), 2.0)  # distance to the closest selected prompt
    chosen: list[int] = []
    for _ in range(n):
        novelty = np.array([len(f - covered) for f in feats], dtype=float)
        gain = novelty + diversity_weight * np.minimum(nearest, 1.0)
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        covered |= feats[best]
        nearest = np.minimum(nearest, 1.0 - emb @ emb[best])
    return [candidates[i] for i in chosen]


def expert_recipe(base_model: str, kind: str, name: str, path: Path, sha256: str | None, prompt: str,
                  seed: int) -> MergeRecipe:
    """The expert alone: a LoRA at full strength on the base, or the checkpoint's own weights."""
    entry = [ExpertWeight(name, 0.0, str(path), sha256)]
    return MergeRecipe(base_model=base_model, prompt=prompt, seed=seed,
                       loras=entry if kind == "lora" else [], checkpoints=entry if kind == "ckpt" else [])


@dataclass(frozen=True)
class CalibrationJob:
    """One expert to calibrate: everything a worker needs to render it alone (picklable)."""

    base_model: str
    kind: str  # "lora" | "ckpt"
    name: str
    path: str
    sha256: str | None = None
    trigger_words: tuple[str, ...] = ()  # put into every prompt it renders (merger.recipe.with_trigger_words)

    def recipe(self, prompt: str, seed: int) -> MergeRecipe:
        return expert_recipe(self.base_model, self.kind, self.name, Path(self.path), self.sha256,
                             with_trigger_words(prompt, [self.trigger_words]), seed)


def score_prompt(engine, suite, job: CalibrationJob, prompt: str, seeds: Sequence[int]) -> list[float]:
    """One (expert, reference prompt) pair: render with each seed (the prompt with the expert's
    trigger words), score against the reference prompt itself, mean over the seeds.
    Raises MergeError (the expert is rejected) if its weights or its scores are not finite."""
    require_finite_weights(engine, job)
    images = [engine.render(job.recipe(prompt, s)) for s in seeds]
    scores = np.array(suite.score(images, [prompt] * len(images)), dtype=np.float64)
    if not np.isfinite(scores).all():
        raise MergeError(f"{job.name}: non-finite calibration scores on {prompt[:60]!r}; refusing the expert")
    return scores.mean(axis=0).tolist()


_FINITE_CHECKED: "weakref.WeakKeyDictionary[object, set]" = weakref.WeakKeyDictionary()


def require_finite_weights(engine, job: CalibrationJob) -> None:
    """The expert's contribution as the engine merges it (a LoRA's delta B·A·alpha/r, a
    checkpoint's weights) must be finite: the download check refuses NaN/Inf stored in a file,
    this catches finite factors whose product overflows. Checked once per engine and file."""
    key = (job.kind, job.sha256 or job.path)
    try:
        done = _FINITE_CHECKED.setdefault(engine, set())
    except TypeError:  # an engine that cannot be weakly referenced: check every time
        done = set()
    if key in done:
        return
    if job.kind == "lora":
        weights = engine.lora_delta(Path(job.path), job.sha256)
    else:
        weights = engine.merged_base(job.recipe("", 0))
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise MergeError(f"{job.name}: merged weights are not finite ({name} holds NaN/Inf); refusing the expert")
    done.add(key)


def calibrate(engine, suite, base_model: str, kind: str, name: str, path: Path, sha256: str | None,
              prompts: list[str], seeds: tuple[int, ...] = (0,)) -> list[list[float]]:
    """Score vectors of one expert on each reference prompt (mean over ``seeds``)."""
    job = CalibrationJob(base_model, kind, name, str(path), sha256)
    return [score_prompt(engine, suite, job, prompt, seeds) for prompt in prompts]


def calibrate_experts(jobs: Sequence[CalibrationJob], prompts: list[str], seeds: tuple[int, ...] = (0,), *,
                      ray_address: str | None = None, workers: int | None = None,
                      gpus_per_worker: float = 0.0) -> list[list[list[float]]]:
    """Score vectors of each expert on each reference prompt: ``result[j][p]`` for ``jobs[j]``
    and ``prompts[p]``. In this process with the base's one engine, or over Ray when
    ``ray_address`` is set (``workers`` actors; default: as many as the cluster's CPUs allow;
    ``gpus_per_worker`` > 0 gives each actor its share of a GPU, which it then renders on)."""
    if ray_address:
        from .ray_calibrate import calibrate_on_ray

        return calibrate_on_ray(jobs, prompts, seeds, address=ray_address, workers=workers,
                                gpus_per_worker=gpus_per_worker)
    from . import bases

    return [calibrate(bases.engine_for(j.base_model), bases.suite_for(j.base_model), j.base_model, j.kind, j.name,
                      Path(j.path), j.sha256, prompts, seeds) for j in jobs]
