"""Training the planner by regression onto searched coefficients (beyond the paper's Eq. 4).

REINFORCE (train.py) learns an expert's coefficient from how the reward responds to random
draws of all the prompt's coefficients at once. A derivative-free search per training prompt
(CMA-ES at a fixed render budget, search.py) spends renders on finding what the reward wants
for that one prompt. Fitting the planner's Beta means to those targets turns a noisy policy
gradient into a supervised fit of the same objective; what carries over to prompts never
searched is what the targets share, such as one expert's natural strength or another's being
a poor match for what was asked.

Targets must come from training prompts (search.search_targets, on search seeds disjoint from
evaluation seeds); model selection is on validation prompts as in train.py (``KeepBest``). The
loss is the squared error of the Beta means plus the VGAE's KL term; the latent noise stays on
in training, so the fit is of the encoder's distribution, not of one point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from rich.console import Console
from torch_geometric.data import Batch

from .model import VGAEPlanner
from .train import KeepBest, Reward, Select, TrainResult, episodes, seeded_planner, training_bar

if TYPE_CHECKING:
    from ..graph_store.store import GraphStore

Targets = Mapping[str, Mapping[str, float]]  # prompt -> {expert id: coefficient}


@dataclass(frozen=True)
class DistilConfig:
    epochs: int = 60  # full passes over the training prompts (one Adam step each)
    lr: float = 1e-2
    weight_decay: float = 0.01
    beta_kl: float = 1e-3  # weight of the VGAE's KL term, as in TrainConfig
    seed: int = 0
    validate_every: int = 5  # epochs between scorings of the Beta-mean policy on the validation prompts: the
    # fit passes its best within tens of epochs, then memorises the training prompts (RESULTS.md)


def distil(store: "GraphStore", targets: Targets, select: Select, reward: Reward, *,
           planner: VGAEPlanner | None = None, config: DistilConfig = DistilConfig(),
           validation: Sequence[str] = (), console: Console | None = None, progress: bool = True) -> TrainResult:
    """Fit ``planner`` (a new one seeded with ``config.seed`` when None) so that its Beta means
    on each prompt of ``targets`` approach that prompt's target coefficients. Every expert
    ``select`` gives a prompt must have a target in [0, 1]: a missing or out-of-range one is a
    ValueError naming it, not a silent zero or a NaN loss. With ``validation`` prompts, the
    best Beta-mean policy seen on them (scored with ``reward``) is the one returned. The
    history is the training loss per epoch."""
    if config.epochs < 1:
        raise ValueError("epochs must be positive")
    data, schema = episodes(store, list(targets), select, None if planner is None else planner.schema)
    for ep in data:
        for expert_id in ep.expert_ids:
            if expert_id not in targets[ep.prompt]:
                raise ValueError(f"no target coefficient for {expert_id} on prompt {ep.prompt!r}")
            if not 0.0 <= (value := targets[ep.prompt][expert_id]) <= 1.0:  # also False for NaN
                raise ValueError(f"target coefficient {value!r} for {expert_id} on prompt {ep.prompt!r} "
                                 "is not in [0, 1]")
    planner = seeded_planner(schema, config.seed) if planner is None else planner
    held_out = episodes(store, validation, select, schema)[0] if validation else []
    graph = Batch.from_data_list([ep.graph for ep in data])
    goal = torch.tensor([float(targets[ep.prompt][e]) for ep in data for e in ep.expert_ids])
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(planner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[float] = []
    keeper = KeepBest(planner, held_out, reward)
    with training_bar("planner (distil)", "loss", console, progress) as bar:
        task = bar.add_task("distil", total=config.epochs, value="-")
        for epoch in range(1, config.epochs + 1):
            out = planner(graph, generator)
            loss = torch.mean((out.coefficients() - goal) ** 2) + config.beta_kl * out.kl()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append(loss.item())
            bar.update(task, advance=1, value=f"{history[-1]:.4f}")
            if epoch % config.validate_every == 0 or epoch == config.epochs:
                keeper.validate(epoch)
    planner.training_info = {"config": {"trainer": "distil", **asdict(config)}, "prompts": len(data),
                             "first_loss": history[0], "last_loss": history[-1]}
    keeper.restore()
    return TrainResult(planner, history, keeper.scores)
