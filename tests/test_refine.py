"""Recipe edits ("less of X", "more of X") under both kinds of LoRA weighting: a shared softmax,
where an expert's weight moves against the others, and per-LoRA strengths, where it moves alone."""

from __future__ import annotations

import pytest

from diffgraph.agents.refine import Edit, RefinementError, apply
from diffgraph.merger.recipe import BASE, ExpertWeight, MergeRecipe


def _recipe(lora_strength):
    loras = [ExpertWeight("stripes", 0.8), ExpertWeight("pink", 0.4)]
    if lora_strength is None:
        loras.insert(0, ExpertWeight(BASE, 0.5))
    return MergeRecipe("miniworld-sd", "a pink circle on a striped background", loras=loras, temperature=0.2,
                       lora_strength=lora_strength)


def _weights(recipe):
    return {e.name: w for e, w in recipe.lora_weights()}


def test_less_of_a_lora_with_its_own_strength_halves_only_that_strength():
    before = _recipe(1.5)
    after = apply(before, Edit(less=["stripes"]))
    assert _weights(after) == pytest.approx({"stripes": 0.6, "pink": 0.6})
    assert _weights(before) == pytest.approx({"stripes": 1.2, "pink": 0.6})  # the original is not edited


def test_more_of_a_lora_with_its_own_strength_doubles_it_up_to_full_strength():
    after = apply(_recipe(1.5), Edit(more=["pink", "stripes"]))
    assert _weights(after) == pytest.approx({"stripes": 1.5, "pink": 1.2})
    with pytest.raises(RefinementError, match="full strength"):
        apply(after, Edit(more=["stripes"]))


def test_under_a_shared_softmax_less_of_one_lora_gives_weight_to_the_others():
    before, after = _weights(_recipe(None)), _weights(apply(_recipe(None), Edit(less=["stripes"])))
    assert after["stripes"] < before["stripes"] and after["pink"] > before["pink"]
    assert sum(after.values()) == pytest.approx(1.0)
