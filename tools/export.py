"""Export: what DiffGraph made, in the forms AUTOMATIC1111, Forge and ComfyUI users load.

- :func:`load_recipe` reads a recipe from wherever DiffGraph wrote one: a PNG's ``diffgraph``
  chunk, a recipe JSON file, or a merged ``.safetensors`` (its ``diffgraph_recipe`` metadata).
- :func:`a1111_prompt` gives the A1111 prompt of a recipe (merger/a1111.py), its LoRA tags
  named by the user's own file names (the catalog's published names fill in recipes written
  before they were recorded), and for a PNG the size the image really has.
- :func:`export_checkpoint` writes the merged model (checkpoints and LoRAs, as the engine merges
  them for rendering) as one ``.safetensors``: LDM/SGM names for SD 1.5 and SDXL, the layout
  A1111 and ComfyUI load, and component-prefixed diffusers names for a family without an
  original layout; the recipe goes into its metadata, so the file says how it was made.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from diffgraph.errors import DiffGraphError, reason
from diffgraph.families import family_of
from diffgraph.files import atomic_path, disk_full, free_bytes, size_text
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.a1111 import A1111Prompt, recipe_to_a1111
from diffgraph.merger.ldm_keys import FAMILIES as ORIGINAL_LAYOUTS
from diffgraph.merger.ldm_keys import diffusers_to_ldm
from diffgraph.merger.png import read_recipe
from diffgraph.merger.recipe import BASE, MergeRecipe
from diffgraph.merger.stream import RECIPE_METADATA_KEY, read_recipe_metadata

from . import bases


class ExportError(DiffGraphError, ValueError):
    """A source that holds no recipe, or a recipe that cannot be exported (one line)."""


def load_recipe(source: str | Path) -> MergeRecipe:
    """The recipe a PNG, a recipe JSON or a merged .safetensors carries."""
    source = Path(source)
    try:
        suffix = source.suffix.lower()
        if suffix == ".png":
            return read_recipe(source)
        if suffix == ".safetensors":
            recipe = read_recipe_metadata(source)
            if recipe is None:
                raise ExportError(f"{source.name} carries no DiffGraph recipe (no '{RECIPE_METADATA_KEY}' metadata)")
            return recipe
        return MergeRecipe.from_json(source.read_text())
    except ExportError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ExportError(f"cannot read a recipe from {source.name}: {reason(exc)}") from None


def with_file_names(recipe: MergeRecipe, store: GraphStore | None) -> MergeRecipe:
    """The recipe with each expert's published file name filled in from the catalog where the
    recipe lacks it (an expert gone from the graph keeps the name the recipe has)."""
    if store is None:
        return recipe

    def named(entry):
        if entry.file_name or entry.name == BASE:
            return entry
        row = store.catalog.get(entry.name)
        files = [f for f in (row.files if row else []) if f.name.endswith(".safetensors")]
        match = next((f for f in files if f.sha256 and f.sha256 == entry.sha256), files[0] if files else None)
        return replace(entry, file_name=Path(match.name).name) if match else entry

    return replace(recipe, checkpoints=[named(e) for e in recipe.checkpoints], loras=[named(e) for e in recipe.loras])


def a1111_prompt(source: str | Path, store: GraphStore | None = None) -> A1111Prompt:
    recipe = with_file_names(load_recipe(source), store)
    if Path(source).suffix.lower() == ".png":
        with Image.open(source) as image:
            recipe = replace(recipe, width=image.width, height=image.height)
    return recipe_to_a1111(recipe)


def export_checkpoint(source: str | Path | MergeRecipe, out: str | Path, half: bool = False, engine=None) -> Path:
    """Merge the recipe on ``engine`` (default: its base's) and write the merged model to ``out``."""
    recipe = source if isinstance(source, MergeRecipe) else load_recipe(source)
    weights = (engine or bases.engine_for(recipe.base_model)).weights(recipe)
    family = family_of(recipe.base_model) or recipe.base_model
    tensors = diffusers_to_ldm(weights, family) if family in ORIGINAL_LAYOUTS else weights
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    if needed > (free := free_bytes(Path(out).parent)):
        raise ExportError(f"{Path(out).name}: the merged model needs {size_text(needed)} and its disk has "
                          f"{size_text(free)} free")
    try:
        with atomic_path(out) as tmp:  # a reader finds the old file or the whole new one
            save_file(tensors, str(tmp), metadata={RECIPE_METADATA_KEY: recipe.to_json()})
    except Exception as exc:  # the disk filled up while writing: the temporary file is already gone
        if not disk_full(exc):
            raise
        raise ExportError(f"{Path(out).name}: the disk filled up while writing the merged model "
                          f"({size_text(needed)}); nothing was written") from None
    return Path(out)
