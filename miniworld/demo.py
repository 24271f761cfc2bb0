"""The offline demo on the mini world: the same prompts rendered by the base model and with
experts applied, saved as PNGs that carry their recipe, plus a side-by-side grid.

The experts are picked by hand here; the Expert Selection Agent and the planner pick and
weigh them automatically once the universal graph is built.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.console import Console

from diffgraph.merger.png import save_png
from diffgraph.merger.render import DEFAULT_GUIDANCE, DEFAULT_STEPS, render

from . import artifacts_io
from .experts import BASE_MODEL, by_slug

DEMO = (
    ("a pink circle on a striped white background", {"pink-pop": 0.6, "stripes-pro": 0.6}),
    ("a teal diamond on a mint background, warm light", {"teal-tone": 0.6, "diamond-cut": 0.6, "golden-hour": 0.5}),
    ("vintage sepia photo of a red square on a beige background", {"vintage-sepia": 1.0}),
    ("an orange cross on a dotted gray background, with a black outline", {"tangerine": 0.6, "plus-cross": 0.6,
                                                                           "polka-dots": 0.6, "ink-outline": 0.5}),
)


def _recipe(prompt: str, seed: int, experts: dict[str, float]) -> dict:
    loras = [{"name": s, "weight": w} for s, w in experts.items() if by_slug(s).kind == "lora"]
    ckpts = [{"name": s, "weight": w} for s, w in experts.items() if by_slug(s).kind == "ckpt"]
    return {"prompt": prompt, "seed": seed, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE,
            "scheduler": "DPM++ 2M", "base": BASE_MODEL, "width": 32, "height": 32, "loras": loras, "checkpoints": ckpts}


def _with_experts(pipe, root: Path, prompt: str, seed: int, experts: dict[str, float]) -> Image.Image:
    """Render with LoRAs as weighted diffusers adapters, or with one checkpoint's weights."""
    ckpts = [s for s in experts if by_slug(s).kind == "ckpt"]
    if ckpts:
        saved = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in ("unet", "vae", "text_encoder")}
        artifacts_io.load_checkpoint_into(pipe, artifacts_io.expert_file(ckpts[0], root))
        try:
            return render(pipe, [prompt], [seed])[0]
        finally:
            for name, sd in saved.items():
                getattr(pipe, name).load_state_dict(sd)
    names = [s.replace("-", "_") for s in experts]
    for slug, name in zip(experts, names):
        pipe.load_lora_weights(str(artifacts_io.expert_file(slug, root)), adapter_name=name)
    pipe.set_adapters(names, list(experts.values()))
    try:
        return render(pipe, [prompt], [seed])[0]
    finally:
        pipe.unload_lora_weights()


def run_demo(folder: Path, seed: int = 7, root: Path = artifacts_io.ARTIFACTS, console: Console | None = None) -> dict:
    console = console or Console()
    console.print("[bold]DiffGraph offline demo[/] on the mini world (32x32 toy Stable Diffusion, CPU)")
    pipe = artifacts_io.load_pipeline(root)
    paths, pairs = [], []
    for i, (prompt, experts) in enumerate(DEMO):
        s = seed + i
        base_img = render(pipe, [prompt], [s])[0]
        exp_img = _with_experts(pipe, root, prompt, s, experts)
        paths.append(save_png(base_img, folder / f"{i:02d}_base.png", _recipe(prompt, s, {})))
        paths.append(save_png(exp_img, folder / f"{i:02d}_experts.png", _recipe(prompt, s, experts)))
        pairs.append((base_img, exp_img))
        console.print(f"  {prompt!r}: base vs " + ", ".join(f"{k}x{v}" for k, v in experts.items()))
    cell = 128
    grid = Image.new("RGB", (2 * cell + 4, len(pairs) * (cell + 4)), "white")
    for r, (a, b) in enumerate(pairs):
        grid.paste(a.resize((cell, cell), Image.NEAREST), (0, r * (cell + 4)))
        grid.paste(b.resize((cell, cell), Image.NEAREST), (cell + 4, r * (cell + 4)))
    grid_path = folder / "demo_grid.png"
    grid.save(grid_path)
    return {"grid": grid_path, "images": paths}
