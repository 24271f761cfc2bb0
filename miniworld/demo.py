"""The offline demo on the mini world: the same prompts rendered by the base model and by a
merge of hand-picked experts, saved as PNGs that carry their recipe, plus a side-by-side grid.

The experts are picked by hand here; the Expert Selection Agent and the planner pick and weigh
them automatically once the universal graph is built.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.console import Console

from diffgraph.merger.engine import MergeEngine
from diffgraph.merger.png import save_png
from diffgraph.merger.recipe import ExpertWeight, MergeRecipe

from . import artifacts_io
from .experts import BASE_MODEL, by_slug

DEMO = (
    ("a pink circle on a striped white background", ["pink-pop", "stripes-pro"]),
    ("a teal diamond on a mint background, warm light", ["teal-tone", "diamond-cut", "mint-backdrop"]),
    ("vintage sepia photo of a red square on a beige background", ["vintage-sepia"]),
    ("an orange cross on a dotted gray background, with a black outline", ["tangerine", "plus-cross", "polka-dots"]),
)


def recipe_for(prompt: str, seed: int, slugs: list[str], root: Path = artifacts_io.ARTIFACTS) -> MergeRecipe:
    """Equal coefficients: the merge weights are softmax(0, ..., 0), i.e. an even split."""
    entries = {s: artifacts_io.expert_entry(s, root) for s in slugs}
    weights = {s: ExpertWeight(s, 0.0, str(root / e["file"]), e["sha256"]) for s, e in entries.items()}
    return MergeRecipe(base_model=BASE_MODEL, prompt=prompt, seed=seed,
                       checkpoints=[w for s, w in weights.items() if by_slug(s).kind == "ckpt"],
                       loras=[w for s, w in weights.items() if by_slug(s).kind == "lora"])


def run_demo(folder: Path, seed: int = 7, root: Path = artifacts_io.ARTIFACTS, console: Console | None = None) -> dict:
    console = console or Console()
    console.print("[bold]DiffGraph offline demo[/] on the mini world (32x32 toy Stable Diffusion, CPU)")
    engine = MergeEngine(artifacts_io.load_pipeline(root))
    paths, pairs = [], []
    for i, (prompt, slugs) in enumerate(DEMO):
        base_recipe = recipe_for(prompt, seed + i, [], root)
        merged_recipe = recipe_for(prompt, seed + i, slugs, root)
        base_img, merged_img = engine.render(base_recipe), engine.render(merged_recipe)
        paths.append(save_png(base_img, folder / f"{i:02d}_base.png", base_recipe))
        paths.append(save_png(merged_img, folder / f"{i:02d}_merged.png", merged_recipe))
        pairs.append((base_img, merged_img))
        console.print(f"  {prompt!r}: base vs merge of {', '.join(slugs)}")
    cell = 128
    grid = Image.new("RGB", (2 * cell + 4, len(pairs) * (cell + 4)), "white")
    for r, (a, b) in enumerate(pairs):
        grid.paste(a.resize((cell, cell), Image.NEAREST), (0, r * (cell + 4)))
        grid.paste(b.resize((cell, cell), Image.NEAREST), (cell + 4, r * (cell + 4)))
    grid_path = folder / "demo_grid.png"
    grid.save(grid_path)
    return {"grid": grid_path, "images": paths}
