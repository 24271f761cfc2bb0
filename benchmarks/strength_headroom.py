"""How much a per-expert strength plan could gain over one constant, in the mini world.

    python -m diffgraph.benchmarks.strength_headroom --home H [--prompts 32] [--train-prompts 64] [--validation-prompts 32]

Uses the graph and the prompt split of a paper_experiments run (same --home and sizes). Each
selected LoRA gets the coefficient of its bake class (hot, plain, cold: the world's ground
truth, which no planner sees; checkpoints get the constant), the best combination of a grid is
picked on the validation prompts at render seed 0, then it and the plain constant are scored on
the test prompts over three seeds. If the per-class plan does not beat the constant on the test
prompts, a planner that learns per-expert strengths has nothing measurable to win here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import typer

from diffgraph.benchmarks import write_result

from . import paper_experiments as pe

HOT, PLAIN, COLD = (0.15, 0.25, 0.4), (0.25, 0.4, 0.55), (0.4, 0.55, 0.7, 1.0)


def bake_classes(bench: pe.Bench) -> dict[str, str]:
    """expert id -> "hot" | "plain" | "cold" | "ckpt"."""
    return {expert_id: "ckpt" if spec.kind == "ckpt" else "hot" if spec.bake > 1 else "cold" if spec.bake < 1 else "plain"
            for expert_id, spec in pe.expert_specs(bench).items()}


def main(home: Path = typer.Option(..., help="The graph home of a paper_experiments run."),
         prompts: int = 32, train_prompts: int = 64, validation_prompts: int = 32, constant: float = 0.4,
         out: Path = typer.Option(Path("benchmarks/results/strength_headroom.json"))) -> None:
    from diffgraph.merger.recipe import RULES

    bench = pe.Bench(home, RULES["strengths"])
    _, valid_set, test_set = pe.prompt_split(prompts, train_prompts, validation_prompts)
    classes = bake_classes(bench)

    def plan(hot, plain, cold):
        coefficient = {"hot": hot, "plain": plain, "cold": cold, "ckpt": constant}
        return lambda p: (bench.select(p), {s["id"]: coefficient[classes[s["id"]]] for s in bench.select(p)})

    grid = {}
    for combo in itertools.product(HOT, PLAIN, COLD):
        fn = plan(*combo)
        grid[combo] = float(np.mean([bench.score(p, *fn(p), seed=0)[-1] for p in valid_set if bench.select(p)]))
        pe.console.print(f"  hot {combo[0]}, plain {combo[1]}, cold {combo[2]}: validation {grid[combo]:.4f}")
    best = max(grid, key=grid.get)
    test = pe.evaluate(bench, {f"per-class coefficients {best}": plan(*best),
                               f"constant {constant}": plan(constant, constant, constant)}, test_set)
    write_result(out, {"validation_grid": {str(k): v for k, v in grid.items()}, "best": best, "test": test})
    pe.console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
