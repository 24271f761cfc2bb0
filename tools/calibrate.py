"""Node calibration (paper Sec. 3.1): reference prompts and expert scoring.

Reference prompts follow the paper's recipe: from a candidate pool, keep the prompts that
together cover the most linguistic variety (nouns, adjectives, prepositions) and conceptual
variety (spread in embedding space). Each expert then renders every reference prompt with
fixed seeds, and the metric suite's score vectors become the expert's edge features.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffgraph.merger.recipe import ExpertWeight, MergeRecipe

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


def calibrate(engine, suite, base_model: str, kind: str, name: str, path: Path, sha256: str | None,
              prompts: list[str], seeds: tuple[int, ...] = (0,)) -> list[list[float]]:
    """Score vectors of one expert on each reference prompt (mean over ``seeds``)."""
    vectors = []
    for prompt in prompts:
        images = [engine.render(expert_recipe(base_model, kind, name, path, sha256, prompt, s)) for s in seeds]
        scores = np.array(suite.score(images, [prompt] * len(images)), dtype=np.float64)
        vectors.append(scores.mean(axis=0).tolist())
    return vectors
