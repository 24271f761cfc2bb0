"""What one training configuration learns in the mini world, on validation prompts only.

    python -m diffgraph.benchmarks.planner_batch --home H --prompts-per-step 16 --steps 40 [--lr 0.01]
    python -m diffgraph.benchmarks.planner_batch --home H --trainer distil --steps 300 --targets T.json

--trainer reinforce (the default) is planner/train.py; --trainer distil is planner/distil.py,
fitted to each training prompt's per-prompt optimum (paper_experiments.training_optima from the
best constant on validation, --search-renders renders each, search seeds only), which is
computed once and kept in --targets; --steps is then its number of epochs.

With --steps 60 --validate-every 10 it trains, step for step, the planner of a paper_experiments
run on the same --home (the same split, seed and configuration), so --save-planner-to can
rebuild a shipped planner without re-running the table.

Uses the graph and the prompt split of a paper_experiments run (same --home and sizes) and
never touches its test prompts. Trains one planner and prints its validation curve (the
Beta-mean policy at render seed 0, every --validate-every steps), the sampled reward per tenth
of the run, and the spread of the kept planner's coefficients on the validation prompts with
the plan of the first ones by expert name. A configuration is worth a full paper_experiments
run only if its plan moves away from one global strength here. Compare configurations at the
same number of renders (steps x prompts per step x 4).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from diffgraph.benchmarks import write_result
from diffgraph.planner import search

from . import paper_experiments as pe

console = Console()


def main(home: Path = typer.Option(..., help="Graph home of a paper_experiments run."),
         prompts_per_step: int = typer.Option(16, help="B: prompts per step (4 coefficient draws each)."),
         steps: int = typer.Option(40, help="REINFORCE steps."),
         lr: float = typer.Option(1e-2, help="AdamW learning rate."),
         validate_every: int = typer.Option(5, help="Steps between validations."),
         prompts: int = typer.Option(48, help="Test prompts of the split (not used; they fix the split)."),
         train_prompts: int = typer.Option(64, help="Training prompts."),
         validation_prompts: int = typer.Option(32, help="Validation prompts."),
         seed: int = typer.Option(0, help="Seed of the training run."),
         trainer: str = typer.Option("reinforce", help="reinforce (planner/train.py) or distil (planner/distil.py)."),
         targets: Path = typer.Option(None, help="distil: the training prompts' optima (read if present, "
                                      "else searched and written)."),
         search_renders: int = typer.Option(search.SEARCH_RENDERS, help="distil: renders per training optimum."),
         save_planner_to: Path = typer.Option(None, help="Also save the kept planner here."),
         out: Path = typer.Option(None, help="JSON to write (default: "
                                "results/planner_batch_<trainer>_B<b>_S<steps>.json).")) -> None:
    from diffgraph.merger.recipe import RULES

    if trainer not in ("reinforce", "distil"):
        raise typer.BadParameter(f"unknown trainer {trainer!r}: reinforce or distil", param_hint="--trainer")
    bench = pe.Bench(home, RULES["strengths"])
    train_set, valid_set, _ = pe.prompt_split(prompts, train_prompts, validation_prompts)
    started = time.time()
    if trainer == "reinforce":
        from diffgraph.planner.train import TrainConfig, train

        config = TrainConfig(steps=steps, prompts_per_step=prompts_per_step, lr=lr, seed=seed,
                             validate_every=validate_every)
        result = train(bench.store, train_set, pe.selector(bench), bench.reward, config=config,
                       validation=valid_set, console=console)
        renders, history_name = steps * prompts_per_step * config.samples_per_prompt, "sampled_reward"
    else:
        from diffgraph.planner.distil import DistilConfig, distil

        goal = pe.training_optima(bench, train_set, pe.best_constant(bench, valid_set)[0], search_renders, targets)
        config = DistilConfig(epochs=steps, lr=lr, seed=seed, validate_every=validate_every)
        result = distil(bench.store, goal, pe.selector(bench), bench.reward, config=config, validation=valid_set,
                        console=console)
        renders, history_name = search_renders * len(goal), "loss"
    if save_planner_to is not None:
        from diffgraph.planner.checkpoint import save_planner

        save_planner(result.planner, save_planner_to)
    spread = pe.coefficient_spread(bench, result.planner, valid_set)
    specs = pe.expert_specs(bench)
    plans = {p: {specs[i].slug: round(c, 3) for i, c in plan.items()} for p, plan in spread.pop("plans").items()}
    tenths = [float(np.mean(chunk)) for chunk in np.array_split(result.history, min(10, len(result.history)))]
    report = {"config": {"trainer": trainer, "prompts_per_step": prompts_per_step, "steps": steps, "lr": lr,
                         "seed": seed, "renders": renders},
              "seconds": time.time() - started, "validation": result.validation,
              "kept_step": result.planner.training_info.get("kept_step"), f"{history_name}_by_tenth": tenths,
              "coefficients": spread, "plans": plans}
    out = out or Path(f"benchmarks/results/planner_batch_{trainer}_B{prompts_per_step}_S{steps}.json")
    write_result(out, report)
    console.print("validation (step, reward): " + ", ".join(f"{s}: {v:.4f}" for s, v in result.validation))
    console.print(f"kept step {report['kept_step']}; {history_name.replace('_', ' ')} by tenth: "
                  + " ".join(f"{v:.4f}" for v in tenths))
    console.print(f"coefficients on validation: mean {spread['mean']:.3f}, range [{spread['min']:.3f}, "
                  f"{spread['max']:.3f}], std within a prompt {spread['mean_std_within_prompt']:.3f}")
    for prompt, plan in list(plans.items())[:12]:
        console.print(f"  {prompt[:50]:50} {plan}")
    console.print(f"wrote {out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    typer.run(main)
