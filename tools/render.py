"""The merge-and-render tool: selected experts and their coefficients in, a PNG out.

The PNG carries the MergeRecipe (A1111 "parameters" text and JSON) plus why each expert was
picked, so `diffgraph render --recipe FILE.png` replays it and a person can read it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.png import save_png
from diffgraph.merger.recipe import STRENGTHS, ExpertWeight, MergeRecipe, MergeRule, with_trigger_words
from diffgraph.settings import get_settings

from . import bases


def build_recipe(store: GraphStore, prompt: str, base_model: str, seed: int, picks: list[dict],
                 coefficients: dict[str, float], rule: MergeRule = STRENGTHS,
                 size: tuple[int, int] | None = None) -> MergeRecipe:
    """A recipe from picks ({id, kind}) and coefficients, with each expert's local file,
    under a merge rule. The default, STRENGTHS (checkpoints: anchored softmax; each LoRA at its
    own strength), is the one under which merging the selected experts gained most in the mini
    world (benchmarks/RESULTS.md); see MergeRule. The recipe's prompt is the one rendered: the
    selected LoRAs' trigger words are added to it (merger.recipe.with_trigger_words)."""
    ckpts, loras, triggers = [], [], []
    for pick in picks:
        row = store.catalog.get(pick["id"])
        weights = row.weights_file
        if weights is None:
            raise ValueError(f"{pick['id']} has no downloaded safetensors file; run the GCA for it")
        entry = ExpertWeight(pick["id"], float(coefficients.get(pick["id"], 0.5)), weights.local_path, weights.sha256,
                             Path(weights.name).name)
        (ckpts if row.kind == "ckpt" else loras).append(entry)
        if row.kind == "lora":
            triggers.append(row.trigger_words)
    sized = {} if size is None else {"width": size[0], "height": size[1]}  # else the base's native size
    return rule.recipe(base_model, with_trigger_words(prompt, triggers), seed, ckpts, loras, **sized)


def render_recipe(recipe: MergeRecipe, out: Path | None = None, explanation: dict | None = None) -> dict:
    """Render on the base's engine and write the PNG (default: DIFFGRAPH_HOME/outputs/images);
    the PNG's recipe holds the size it was rendered at."""
    engine = bases.engine_for(recipe.base_model)
    recipe = engine.sized(recipe)
    image = engine.render(recipe)
    if out is None:
        digest = hashlib.sha256(recipe.to_json().encode()).hexdigest()[:10]
        out = get_settings().artifacts_dir / "images" / f"{time.strftime('%Y%m%d-%H%M%S')}-{digest}.png"
    path = save_png(image, Path(out), recipe, {"explanation": explanation} if explanation else None)
    return {"path": str(path), "recipe": recipe.to_dict()}
