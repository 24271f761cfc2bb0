"""PNG files that carry how they were made.

Two text chunks: ``parameters`` in the A1111 layout (so A1111, ComfyUI and Civitai read the
prompt, sampler and LoRA tags) and ``diffgraph`` holding the full MergeRecipe as JSON, which is
what `diffgraph render --recipe` replays.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from diffgraph.files import atomic_path

from .a1111 import recipe_to_a1111
from .recipe import MergeRecipe

RECIPE_KEY = "diffgraph"


def a1111_parameters(recipe: MergeRecipe) -> str:
    """The recipe as A1111's "parameters" text (merger/a1111.py), LoRAs as <lora:file:weight> tags."""
    return recipe_to_a1111(recipe).infotext


def save_png(image: Image.Image, path: Path, recipe: MergeRecipe, extra: dict | None = None) -> Path:
    """Write the image with its recipe (and optional explanation, e.g. why experts were picked)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(recipe))
    info.add_text(RECIPE_KEY, json.dumps({"recipe": recipe.to_dict(), **(extra or {})}, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_recipe(path: Path) -> MergeRecipe:
    """The recipe embedded by :func:`save_png`, or a one-line error when there is none."""
    with Image.open(path) as im:
        text = im.info.get(RECIPE_KEY)
    if text is None:
        raise ValueError(f"{Path(path).name} carries no DiffGraph recipe (no '{RECIPE_KEY}' PNG text chunk)")
    return MergeRecipe.from_json(text)
