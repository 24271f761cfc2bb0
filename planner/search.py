"""Coefficients found by rendering: for one prompt's experts, a derivative-free search (CMA-ES,
pycma) against the reward at a fixed render budget.

Two uses: the per-prompt optimum, the ceiling benchmarks/paper_experiments.py measures a
planner against, and the targets distil.py fits a planner to. A candidate scores the mean
reward over ``seeds``, which must never be evaluation seeds: an optimum fits those renders'
noise as well as the prompt. The search starts from one constant for every expert (the best
on validation prompts, ``best_constant``), so the budget goes into how the experts should
differ, not into finding the overall strength.

A selection is ``(prompt, expert_ids, kinds)``, what the reward takes (train.py's ``Reward``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

from .train import Reward

CONSTANTS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # the grid best_constant picks from
SEARCH_SEEDS = (100, 101)  # render seeds of the search: never an evaluation or validation seed
SEARCH_RENDERS = 128  # per prompt, the default budget: CMA-ES evaluations x len(SEARCH_SEEDS)
Selection = tuple[str, list[str], list[str]]


def best_constant(reward: Reward, selections: Sequence[Selection],
                  grid: Sequence[float] = CONSTANTS) -> tuple[float, dict[float, float]]:
    """The coefficient that, given to every selected expert, scores best on ``selections``
    (render seed 0, as a planner's validation), and the grid's mean rewards."""
    if not selections:
        raise ValueError("no selection to tune a constant on")
    scores = {c: float(np.mean([reward(p, ids, kinds, [c] * len(ids), 0) for p, ids, kinds in selections]))
              for c in grid}
    return max(scores, key=scores.get), scores


def search_coefficients(reward: Reward, selection: Selection, start: float, renders: int = SEARCH_RENDERS,
                        seeds: Sequence[int] = SEARCH_SEEDS) -> dict[str, float]:
    """The coefficients in [0, 1] of the selection's experts that score best on ``seeds``:
    CMA-ES from ``start`` for every expert, for ``renders`` renders rounded up to its last
    generation, and the best point it evaluated; one expert is searched on an even grid of
    ``renders / len(seeds)`` points instead (CMA-ES needs two dimensions)."""
    import cma

    prompt, ids, kinds = selection
    if not ids:
        return {}
    evaluations = renders // len(seeds)
    if evaluations < 1:
        raise ValueError(f"{renders} renders cannot score one candidate on {len(seeds)} seeds")

    def mean_reward(x) -> float:
        w = [float(v) for v in x]
        return float(np.mean([reward(prompt, ids, kinds, w, seed) for seed in seeds]))

    if len(ids) == 1:
        grid = np.linspace(0.02, 1.0, evaluations)
        return {ids[0]: float(max(grid, key=lambda c: mean_reward([c])))}
    es = cma.CMAEvolutionStrategy([start] * len(ids), 0.25, {"bounds": [0.0, 1.0], "maxfevals": evaluations,
                                                              "seed": 1, "verbose": -9})
    while not es.stop():
        xs = es.ask()
        es.tell(xs, [-mean_reward(x) for x in xs])
    return dict(zip(ids, (float(v) for v in es.result.xbest)))


def search_targets(reward: Reward, selections: Sequence[Selection], start: float, renders: int = SEARCH_RENDERS,
                   seeds: Sequence[int] = SEARCH_SEEDS, console: Console | None = None,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """``search_coefficients`` for each selection with an expert, keyed by prompt."""
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console,
                  disable=not progress) as bar:
        return {s[0]: search_coefficients(reward, s, start, renders, seeds)
                for s in bar.track([s for s in selections if s[1]],
                                   description=f"coefficient search ({renders} renders each)")}
