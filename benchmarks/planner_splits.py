"""How far a trained planner's gain over the best constant carries from the prompts it was fitted
or chosen on to the held-out ones: its reward minus the constant's on the training, validation
and test prompts of the paper_experiments split, each over the evaluation seeds.

A planner whose gain is large on training prompts and gone on validation memorises; one whose
gain is large on validation (where its kept step was chosen, on render seed 0) and gone on test
was chosen for validation's noise. ``--targets`` also scores distil's training targets (the
per-prompt optima searched on seeds 100-101) on the training prompts: what fitting them
perfectly would gain on the evaluation seeds. Trains nothing.

    python -m diffgraph.benchmarks.planner_splits --home H --planner P [--planner P2 ...] --constant 0.25 [--targets T]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from diffgraph.benchmarks import write_result

from . import paper_experiments as pe

console = Console()


def gain(bench: pe.Bench, plan, constant: float, prompts: list[str]) -> dict:
    """``plan(prompt, expert ids) -> coefficients``: its reward minus the constant's, per seed
    and per prompt, paired on the same render seeds."""
    diffs = np.zeros((len(pe.SEEDS), len(prompts)))
    for s, seed in enumerate(pe.SEEDS):
        for j, prompt in enumerate(prompts):
            picks = bench.select(prompt)
            if not picks:
                continue
            ids = [p["id"] for p in picks]
            planned = plan(prompt, ids)
            diffs[s, j] = (bench.score(prompt, picks, planned, seed)[-1]
                           - bench.score(prompt, picks, {i: constant for i in ids}, seed)[-1])
    by_prompt = diffs.mean(axis=0)
    return {"mean": float(diffs.mean()), "std_over_seeds": float(diffs.mean(axis=1).std()),
            "se_over_prompts": float(by_prompt.std(ddof=1) / np.sqrt(len(prompts))),
            "seed_0": float(diffs[0].mean()), "won_tied_lost": [int((by_prompt > 1e-9).sum()),
                                                                 int((np.abs(by_prompt) <= 1e-9).sum()),
                                                                 int((by_prompt < -1e-9).sum())]}


def main(home: Path = typer.Option(..., help="Graph home of a paper_experiments run."),
         planner: list[Path] = typer.Option([], help="A saved planner folder (repeatable)."),
         constant: float = typer.Option(..., help="The best constant of the run (its validation tuning)."),
         prompts: int = typer.Option(48, help="Test prompts of the split."),
         train_prompts: int = typer.Option(64, help="Training prompts."),
         validation_prompts: int = typer.Option(32, help="Validation prompts."),
         targets: Path = typer.Option(None, help="distil's training optima (a paper_experiments --targets "
                                      "file: all.json)."),
         out: Path = typer.Option(Path("benchmarks/results/planner_splits.json"))) -> None:
    from diffgraph.merger.recipe import RULES
    from diffgraph.planner.checkpoint import load_planner

    started = time.time()
    bench = pe.Bench(home, RULES["strengths"])
    splits = dict(zip(("training", "validation", "test"), pe.prompt_split(prompts, train_prompts, validation_prompts)))
    report = {"constant": constant, "seeds": list(pe.SEEDS), "planners": {}}

    def show(who: str, split: str, g: dict) -> None:
        console.print(f"{who:24} {split:10} minus constant {g['mean']:+.4f} (sd {g['std_over_seeds']:.4f} over "
                      f"seeds; s.e. {g['se_over_prompts']:.4f} over prompts; seed 0 {g['seed_0']:+.4f}; "
                      f"won/tied/lost {'/'.join(map(str, g['won_tied_lost']))})")

    if targets is not None:
        optima = json.loads(targets.read_text())["optima"]
        if set(optima) - set(splits["training"]):
            raise typer.BadParameter(f"{targets} holds optima of prompts outside the training split",
                                     param_hint="--targets")
        report["training_targets"] = g = gain(bench, lambda p, ids: optima[p], constant, splits["training"])
        show(targets.name, "training", g)
    for folder in planner:
        model = load_planner(folder, bench.suite.names)
        report["planners"][str(folder)] = row = {}
        for name, split in splits.items():
            row[name] = g = gain(bench, lambda p, ids: model.plan(bench.store, ids, p), constant, split)
            show(folder.name, name, g)
    report["seconds"] = time.time() - started
    write_result(out, report)
    console.print(f"wrote {out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    typer.run(main)
