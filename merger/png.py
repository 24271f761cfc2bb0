"""PNG files that carry how they were made.

Two text chunks: ``parameters`` in the A1111 layout (so A1111, ComfyUI and Civitai read the
prompt, sampler and LoRA tags) and ``diffgraph`` holding the full recipe as JSON, which is what
`diffgraph render --recipe` replays.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

RECIPE_KEY = "diffgraph"


def a1111_parameters(recipe: dict) -> str:
    """The recipe as A1111's "parameters" text, LoRAs as <lora:name:weight> tags."""
    tags = " ".join(f"<lora:{e['name']}:{e['weight']:.3g}>" for e in recipe.get("loras", []))
    prompt = f"{recipe['prompt']} {tags}".strip()
    fields = [f"Steps: {recipe['steps']}", f"Sampler: {recipe.get('scheduler', 'DPM++ 2M')}",
              f"CFG scale: {recipe['guidance']}", f"Seed: {recipe['seed']}",
              f"Size: {recipe.get('width', 32)}x{recipe.get('height', 32)}", f"Model: {recipe['base']}"]
    ckpts = recipe.get("checkpoints", [])
    if ckpts:
        fields.append("Model merge: " + " + ".join(f"{e['name']}*{e['weight']:.3g}" for e in ckpts))
    negative = recipe.get("negative_prompt")
    return prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + ", ".join(fields)


def save_png(image: Image.Image, path: Path, recipe: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(recipe))
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_recipe(path: Path) -> dict:
    """The JSON recipe embedded by :func:`save_png`; a clear error when there is none."""
    with Image.open(path) as im:
        text = im.info.get(RECIPE_KEY)
    if text is None:
        raise ValueError(f"{path} carries no DiffGraph recipe (no '{RECIPE_KEY}' PNG text chunk)")
    return json.loads(text)
