"""PNG files that carry how they were made.

Two text chunks: ``parameters`` in the A1111 layout (so A1111, ComfyUI and Civitai read the
prompt, sampler and LoRA tags) and ``diffgraph`` holding the full MergeRecipe as JSON, which is
what `diffgraph render --recipe` replays.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .recipe import BASE, MergeRecipe

RECIPE_KEY = "diffgraph"


def _tag_name(name: str) -> str:
    return name.split(":", 1)[-1].replace("/", "_")


def a1111_parameters(recipe: MergeRecipe) -> str:
    """The recipe as A1111's "parameters" text, LoRAs as <lora:name:weight> tags."""
    tags = " ".join(f"<lora:{_tag_name(e.name)}:{w:.3g}>" for e, w in recipe.lora_weights() if e.name != BASE)
    fields = [f"Steps: {recipe.steps}", f"Sampler: {recipe.scheduler}", f"CFG scale: {recipe.guidance}",
              f"Seed: {recipe.seed}", f"Size: {recipe.width}x{recipe.height}", f"Model: {recipe.base_model}"]
    if recipe.checkpoints:
        fields.append("Model merge: " + " + ".join(f"{_tag_name(e.name)}*{w:.3g}" for e, w in recipe.checkpoint_weights()))
    negative = f"\nNegative prompt: {recipe.negative_prompt}" if recipe.negative_prompt else ""
    return f"{recipe.prompt} {tags}".strip() + negative + "\n" + ", ".join(fields)


def save_png(image: Image.Image, path: Path, recipe: MergeRecipe, extra: dict | None = None) -> Path:
    """Write the image with its recipe (and optional explanation, e.g. why experts were picked)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(recipe))
    info.add_text(RECIPE_KEY, json.dumps({"recipe": recipe.to_dict(), **(extra or {})}, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_recipe(path: Path) -> MergeRecipe:
    """The recipe embedded by :func:`save_png`, or a one-line error when there is none."""
    with Image.open(path) as im:
        text = im.info.get(RECIPE_KEY)
    if text is None:
        raise ValueError(f"{path} carries no DiffGraph recipe (no '{RECIPE_KEY}' PNG text chunk)")
    return MergeRecipe.from_dict(json.loads(text)["recipe"])
