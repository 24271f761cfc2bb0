"""`diffgraph planner train`: training the VGAE planner on a built graph, with REINFORCE
(planner/train.py, the paper's) or by distillation onto each training prompt's searched
coefficients (planner/distil.py; the search starts from the best constant on the validation
prompts, planner/search.py).

The selection callback is the Expert Selection Agent (offline brain or LLM), the reward
callback merges, renders and scores with the base's metric suite; training prompts come from
the base profile and are disjoint from the reference prompts.
"""

from __future__ import annotations

from dataclasses import asdict

from rich.console import Console

from diffgraph.errors import DiffGraphError
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.recipe import STRENGTHS
from diffgraph.planner import search
from diffgraph.planner.checkpoint import save_planner
from diffgraph.planner.distil import DistilConfig, distil
from diffgraph.planner.train import TrainConfig, train
from diffgraph.settings import Settings, get_settings
from diffgraph.tools import bases
from diffgraph.tools.plan import planner_dir
from diffgraph.tools.render import build_recipe

from .esa import select_experts
from .llm import chat_model

MIN_TRAIN, MIN_VALIDATION = 8, 4
TRAINERS = ("reinforce", "distil")


class PlannerTrainingError(DiffGraphError, ValueError):
    """Training cannot start as asked (too few prompts for a training and a validation set)."""


def split_prompts(training_prompts, n: int, seed: int, references: set[str]) -> tuple[list[str], list[str]]:
    """(training prompts, validation prompts): disjoint, and both disjoint from the reference
    prompts. Validation (where the best Beta-mean policy is picked) comes from another seed's
    draw; a base whose pool is finite (a real base's shipped prompts) and used up by the
    training draw has it split off instead, a fifth of it. Too small a pool is one line."""
    train_set = list(dict.fromkeys(p for p in training_prompts(n, seed) if p not in references))
    validation = [p for p in dict.fromkeys(training_prompts(n // 2, seed + 1_000))
                  if p not in references and p not in set(train_set)]
    if len(validation) < MIN_VALIDATION:
        n_val = max(MIN_VALIDATION, len(train_set) // 5)
        if len(train_set) - n_val < MIN_TRAIN:
            raise PlannerTrainingError(
                f"only {len(train_set)} training prompts (disjoint from the reference prompts) for this base: planner "
                f"training needs at least {MIN_TRAIN + MIN_VALIDATION} ({MIN_TRAIN} to train on, {MIN_VALIDATION} to "
                f"validate on); ask for more with --prompts or add prompts to the base's profile")
        train_set, validation = train_set[:-n_val], train_set[-n_val:]
    return train_set, validation


def train_planner(base_model: str | None = None, steps: int = 60, prompts: int = 48, seed: int = 0,
                  prompts_per_step: int = TrainConfig.prompts_per_step, trainer: str = "reinforce",
                  target_renders: int | None = None, settings: Settings | None = None,
                  console: Console | None = None) -> dict:
    """Train and save the base's planner: ``steps`` REINFORCE steps, or with ``trainer`` "distil"
    ``steps`` epochs fitted to the coefficients a search finds for each training prompt in
    ``target_renders`` renders (default planner.search.SEARCH_RENDERS)."""
    if trainer not in TRAINERS:
        raise PlannerTrainingError(f"unknown trainer {trainer!r}: {' or '.join(TRAINERS)}")
    settings = settings or get_settings()
    console = console or Console()
    llm = chat_model(settings)
    with GraphStore.from_settings(settings) as store:
        base_model = bases.choose_base(base_model or settings.base, store.catalog.base_models())
        engine, suite = bases.engine_for(base_model), bases.suite_for(base_model)
        references = {p.text for p in store.catalog.reference_prompts()}
        profile = bases.profile(base_model)
        train_set, validation = split_prompts(profile.training_prompts, prompts, seed, references)
        kinds: dict[str, list[dict]] = {}

        def select(prompt: str) -> list[str]:  # once per prompt: the search and the training both ask
            if prompt not in kinds:
                kinds[prompt] = select_experts(store, prompt, base_model, llm)["selected"]
            return [p["id"] for p in kinds[prompt]]

        def selections(prompts: list[str]) -> list[search.Selection]:
            return [(p, ids, [pick["kind"] for pick in kinds[p]]) for p in prompts if (ids := select(p))]

        def reward(prompt, expert_ids, _kinds, w, render_seed) -> float:
            recipe = build_recipe(store, prompt, base_model, render_seed, [{"id": i} for i in expert_ids],
                                  dict(zip(expert_ids, w)), STRENGTHS)
            return suite.reward(suite.score([engine.render(recipe)], [prompt])[0])

        if trainer == "distil":
            target_renders = target_renders or search.SEARCH_RENDERS
            start, _ = search.best_constant(reward, selections(validation))
            targets = search.search_targets(reward, selections(train_set), start, target_renders, console=console)
            result = distil(store, targets, select, reward, config=DistilConfig(epochs=steps, seed=seed),
                            validation=validation, console=console)
            result.planner.training_info.update(search_start=start, target_renders=target_renders)
        else:
            config = TrainConfig(steps=steps, prompts_per_step=prompts_per_step, seed=seed)
            result = train(store, train_set, select, reward, config=config, validation=validation, console=console)
        # coefficients mean something only under the rule they were trained for
        result.planner.training_info["merge_rule"] = asdict(STRENGTHS)
        path = save_planner(result.planner, planner_dir(settings.home, base_model))
    return {"checkpoint": str(path), "prompts": len(train_set), "history": result.history,
            "validation": result.validation}
