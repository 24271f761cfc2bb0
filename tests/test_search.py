"""planner/search.py: the coefficient search behind the per-prompt optimum and the distil
trainer's targets. The reward here is an analytic bowl with a seed-dependent offset, the one
thing a search needs of a reward; the renders it stands for are tested in test_planner.py and
test_paper_experiments.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgraph.planner.search import CONSTANTS, SEARCH_SEEDS, best_constant, search_coefficients, search_targets

unit = st.floats(0.0, 1.0, allow_nan=False)


def bowl(peak: dict[str, list[float]], seeds_seen: list[int] | None = None):
    """A reward that is best at ``peak[prompt]``, plus an offset per render seed (noise the
    search must average, not a place it can move to)."""
    def reward(prompt, ids, kinds, w, seed):
        assert len(w) == len(ids) == len(kinds) and all(0.0 <= v <= 1.0 for v in w), "coefficients stay in [0, 1]"
        if seeds_seen is not None:
            seeds_seen.append(seed)
        return -sum((a - b) ** 2 for a, b in zip(w, peak[prompt])) + 0.01 * math.sin(7.3 * seed)
    return reward


@settings(max_examples=25, deadline=None)
@given(peak=st.lists(unit, min_size=1, max_size=3), start=st.sampled_from(CONSTANTS))
def test_the_search_finds_where_the_reward_peaks_within_its_budget(peak, start):
    ids = [f"expert-{i}" for i in range(len(peak))]
    seeds: list[int] = []
    found = search_coefficients(bowl({"p": peak}, seeds), ("p", ids, ["lora"] * len(ids)), start, renders=128)
    assert list(found) == ids and all(0.0 <= c <= 1.0 for c in found.values())
    assert set(seeds) <= set(SEARCH_SEEDS), "the search renders on search seeds only"
    popsize = 4 + int(3 * math.log(len(ids)))
    assert len(seeds) <= 128 + popsize * len(SEARCH_SEEDS), "the budget, rounded up to CMA-ES's last generation"
    if len(ids) == 1:  # an even grid of 64 points in [0.02, 1]
        assert abs(found[ids[0]] - peak[0]) <= 0.02 + 1e-9
    else:
        def miss(w):
            return sum((a - b) ** 2 for a, b in zip(w, peak))
        if miss([start] * len(ids)) > 0.01:
            assert miss(list(found.values())) < 0.25 * miss([start] * len(ids))


def test_best_constant_and_targets_cover_what_was_selected():
    peak = {"two": [0.3, 0.5], "one": [0.9], "none": []}
    reward = bowl(peak)
    selections = [("two", ["a", "b"], ["lora", "lora"]), ("one", ["c"], ["ckpt"]), ("none", [], [])]
    constant, scores = best_constant(reward, selections[:2])
    assert set(scores) == set(CONSTANTS) and scores[constant] == max(scores.values())
    assert constant == 0.55  # the mean squared miss of one constant for 0.3, 0.5, 0.9 is least at 0.55
    targets = search_targets(reward, selections, constant, renders=64, progress=False)
    assert set(targets) == {"two", "one"}, "a prompt that selects nothing has no target"
    assert set(targets["two"]) == {"a", "b"} and set(targets["one"]) == {"c"}
    with pytest.raises(ValueError, match="no selection"):
        best_constant(reward, [])
    with pytest.raises(ValueError, match="cannot score one candidate"):
        search_coefficients(reward, selections[1], 0.5, renders=1)
