"""REINFORCE training of the planner (paper Sec. 3.3, Eq. 4).

Rendering is far too deep a graph to backpropagate through, so the planner is trained as a
policy: draw coefficients w ~ Beta(alpha, beta), render, score, and push up log p(w) in
proportion to how much better than expected the reward came out. Two callbacks keep the
planner independent of the agents and the merger:

- ``select(prompt) -> expert ids``: the Expert Selection Agent (called once per prompt: the
  selection does not depend on the planner);
- ``reward(prompt, expert_ids, kinds, w, seed) -> float``: merge, render with render seed
  ``seed``, score.

Render seeds: the objective is the reward expected over render seeds, so each visit of a
prompt draws a fresh seed, shared by that visit's K coefficient draws (common random numbers:
within a visit, rewards differ only by the coefficients, which is what the leave-one-out
baseline compares). A fixed seed lets the policy fit the one image each prompt gives at that
seed, which does not carry over to other seeds. Validation renders with seed 0 throughout, so
its scores compare from one step to the next.

The latent draw h = mu + sigma * eps is part of the policy. eps does not depend on the
parameters, so for the joint draw (eps, w) the score function is exactly
grad log Beta(w | dec(mu + sigma * eps)): the estimator stays unbiased with the VGAE's
noise in it, and no intractable marginal over h is needed.

Variance reduction: Eq. 4 as written multiplies grad log p by the raw reward, whose level
differs from prompt to prompt far more than it differs between good and bad coefficients
for one prompt. Each prompt therefore gets K draws, and draw k's baseline is the mean reward
of the other K - 1 draws of the same prompt (leave-one-out: independent of draw k, so the
estimate stays unbiased, and the prompt's level cancels). With K = 1 the baseline is a
running mean of all rewards instead. Advantages are then divided by a running RMS of past
advantages, so the KL weight and the learning rate mean the same whatever the units of the
reward; it changes the step size, not the direction of the gradient.

Batch size: B = 16 prompts per step by default. Adam moves every parameter by about the
learning rate per step whatever the gradient's noise, so a noisy gradient moves the many
parameters the reward does not pin down as far as the few it does, and the plan drifts at
random. Averaging over more prompts per step makes the update mostly signal; for the same
number of renders, fewer and cleaner steps learn where many noisy ones do not
(benchmarks/RESULTS.md has the runs).

Model selection: the policy that is trained (random draws) is not the one that is used (the
Beta means). Adam's normalised steps keep moving the parameters at a fixed speed even when the
reward's signal is mostly noise, and a measured run drifted past the good region until every
mean sat near 0 (the base model's score). So, given validation prompts (disjoint from the
training and test prompts), the Beta-mean policy is scored on them before training and every
``validate_every`` steps, and the best one is kept: on those prompts the result is never worse
than the starting policy, which is about the equal-weights plan (the decoder starts near a = b = 0).
"""

from __future__ import annotations

import math
import random
import copy
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch_geometric.data import Batch, Data

from .features import FeatureSchema, activated_view, featurise
from .model import VGAEPlanner

if TYPE_CHECKING:
    from ..graph_store.store import GraphStore

Select = Callable[[str], list[str]]
Reward = Callable[[str, list[str], list[str], list[float], int], float]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    prompts_per_step: int = 16  # B in Eq. 4 (module docstring: why 16)
    samples_per_prompt: int = 4  # K draws of w per prompt, for the leave-one-out baseline
    lr: float = 1e-2  # AdamW as in the paper
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    beta_kl: float = 1e-3  # weight of the VGAE's KL term
    running_decay: float = 0.9  # of the running reward mean (K = 1) and advantage RMS
    seed: int = 0
    validate_every: int = 10  # steps between scorings of the Beta-mean policy on the validation prompts
    vary_render_seed: bool = True  # a fresh render seed per prompt visit (module docstring); False: always 0


@dataclass
class Episode:
    """One training prompt with its selection and its featurised subgraph."""

    prompt: str
    expert_ids: list[str]
    kinds: list[str]
    graph: Data


@dataclass
class TrainResult:
    planner: VGAEPlanner
    history: list[float]  # mean reward of each step's draws
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, mean reward of the Beta means)


class Baseline:
    """Leave-one-out mean per prompt (K > 1) or a running mean (K = 1), then advantages scaled
    by a running RMS (see the module docstring)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.mean: float | None = None
        self.square: float | None = None

    def _update(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards: (B, K) -> advantages (B, K)."""
        k = rewards.shape[1]
        if k > 1:
            advantage = rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
        else:  # the mean of earlier steps only (the first step has nothing better than its own)
            advantage = rewards - (rewards.mean() if self.mean is None else self.mean)
        self.mean = self._update(self.mean, rewards.mean().item())
        self.square = self._update(self.square, advantage.pow(2).mean().item())
        return advantage / (math.sqrt(self.square) + 1e-8)


def episodes(store: "GraphStore", prompts: Sequence[str], select: Select,
             schema: FeatureSchema | None) -> tuple[list[Episode], FeatureSchema]:
    """Select and build each prompt's subgraph once (the selection does not depend on the
    planner). Prompts for which nothing is selected carry no gradient and are dropped. Without
    a schema, one is fitted on these subgraphs."""
    embeddings = store.embed(list(prompts))
    selected = [(p, e, ids) for p, e in zip(prompts, embeddings) if (ids := select(p))]
    if not selected:
        raise ValueError("no training prompt selects any expert")
    prompts = [p for p, _, _ in selected]
    views = [activated_view(store, ids, e, schema) for _, e, ids in selected]
    schema = FeatureSchema.fit(views) if schema is None else schema
    return [Episode(p, list(v.expert_ids), list(v.expert_kinds), featurise(v, schema))
            for p, v in zip(prompts, views)], schema


def policy_reward(planner: VGAEPlanner, data: Sequence[Episode], reward: Reward) -> float:
    """Mean reward of the test-time policy (the Beta means) over ``data``."""
    planner.eval()
    values = [reward(ep.prompt, ep.expert_ids, ep.kinds, planner.coefficients(ep.graph).tolist(), 0) for ep in data]
    planner.train()
    return float(sum(values) / len(values))


def seeded_planner(schema: FeatureSchema, seed: int) -> VGAEPlanner:
    """A new planner whose initial weights follow ``seed`` alone. Drawn from the global torch
    RNG instead, they would depend on whatever the process ran before (building or loading a
    pipeline draws from it), and the same training command would give a different planner in a
    different process. The caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGAEPlanner(schema)


class KeepBest:
    """Model selection on validation prompts (module docstring): scores the Beta-mean policy on
    ``held_out`` when asked and, at the end, puts back the best weights seen. With no
    validation prompts it does nothing and the last weights stay. Made when a run starts: it
    puts the planner in train mode and scores the untrained policy as step 0, so a run that
    never beats its start keeps it."""

    def __init__(self, planner: VGAEPlanner, held_out: Sequence[Episode], reward: Reward):
        self.planner, self.held_out, self.reward = planner, held_out, reward
        self.scores: list[tuple[int, float]] = []
        self.best: tuple[float, int, dict] | None = None
        planner.train()
        self.validate(0)

    def validate(self, step: int) -> None:
        if self.held_out:
            self.scores.append((step, policy_reward(self.planner, self.held_out, self.reward)))
            if self.best is None or self.scores[-1][1] > self.best[0]:
                self.best = (self.scores[-1][1], step, copy.deepcopy(self.planner.state_dict()))

    def restore(self) -> None:
        """Eval mode, the best weights, and their record in ``planner.training_info``."""
        self.planner.eval()
        if self.best is not None:
            self.planner.load_state_dict(self.best[2])
            self.planner.training_info.update(validation=self.scores, validation_prompts=len(self.held_out),
                                              kept_step=self.best[1])


def training_bar(label: str, measure: str, console: Console | None, progress: bool) -> Progress:
    """A training run's progress bar: ``label``, steps done of all, and the latest ``measure``,
    which ``update`` receives as ``value``."""
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    TextColumn(f"{measure} {{task.fields[value]}}"), TimeElapsedColumn(), console=console,
                    disable=not progress)


def train(store: "GraphStore", prompts: Sequence[str], select: Select, reward: Reward, *,
          planner: VGAEPlanner | None = None, config: TrainConfig = TrainConfig(),
          validation: Sequence[str] = (), console: Console | None = None, progress: bool = True) -> TrainResult:
    """Train ``planner`` (a new one seeded with ``config.seed`` when None, its feature schema
    fitted on the training subgraphs) on ``prompts``, which should be disjoint from the
    reference prompts (the paper's protocol: otherwise the calibration edges already hold the
    answer). With ``validation``
    prompts, the best Beta-mean policy seen on them is the one returned (module docstring).
    Returns the planner, the mean reward of each step and the validation scores."""
    if not prompts:
        raise ValueError("no training prompts")
    if config.steps < 1 or config.prompts_per_step < 1 or config.samples_per_prompt < 1:
        raise ValueError("steps, prompts_per_step and samples_per_prompt must be positive")
    data, schema = episodes(store, prompts, select, None if planner is None else planner.schema)
    planner = seeded_planner(schema, config.seed) if planner is None else planner
    held_out = episodes(store, validation, select, schema)[0] if validation else []
    generator = torch.Generator().manual_seed(config.seed)
    shuffle = random.Random(config.seed)
    render_seeds = random.Random(f"{config.seed}:render")  # its own stream: the prompt order stays as it was
    optimiser = torch.optim.AdamW(planner.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    baseline = Baseline(config.running_decay)
    b, k = min(config.prompts_per_step, len(data)), config.samples_per_prompt
    history: list[float] = []
    queue: list[Episode] = []
    keeper = KeepBest(planner, held_out, reward)
    with training_bar("planner", "mean reward", console, progress) as bar:
        task = bar.add_task("train", total=config.steps, value="-")
        for _ in range(config.steps):
            batch = []
            while len(batch) < b:  # every prompt once per epoch, in a fresh order each epoch
                queue = queue or shuffle.sample(data, len(data))
                batch.append(queue.pop())
            visit_seeds = [render_seeds.randrange(2**31) if config.vary_render_seed else 0 for _ in batch]
            draws = [ep for ep in batch for _ in range(k)]
            seeds = [s for s in visit_seeds for _ in range(k)]
            out = planner(Batch.from_data_list([ep.graph for ep in draws]), generator)
            w, log_prob = out.sample(generator)
            sizes = [len(ep.expert_ids) for ep in draws]
            rewards = torch.tensor([float(reward(ep.prompt, ep.expert_ids, ep.kinds, w_i.tolist(), s))
                                    for ep, w_i, s in zip(draws, w.split(sizes), seeds)]).reshape(b, k)
            log_p = torch.stack([lp.sum() for lp in log_prob.split(sizes)])  # joint over the experts
            advantage = baseline.advantages(rewards).reshape(-1)
            loss = -(advantage * log_p).mean() + config.beta_kl * out.kl()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append(rewards.mean().item())
            bar.update(task, advance=1, value=f"{history[-1]:.4f}")
            if (len(history) % config.validate_every == 0) or len(history) == config.steps:
                keeper.validate(len(history))
    planner.training_info = {"config": asdict(config), "prompts": len(data), "first_mean_reward": history[0],
                             "last_mean_reward": history[-1]}
    keeper.restore()
    return TrainResult(planner, history, keeper.scores)
