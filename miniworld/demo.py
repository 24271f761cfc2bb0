"""The offline demo: the whole DiffGraph pipeline on the mini world, with nothing configured.

1. The Graph Construction Agent crawls the bundled hub (Civitai- and HF-shaped APIs, homepages
   read in Chromium) into the universal graph under DIFFGRAPH_HOME (skipped once built).
2. For each demo prompt the Expert Selection Agent picks experts, the planner weighs them and
   the merged model renders; the base model renders the same prompt and seed for comparison.
3. A side-by-side grid and the PNGs (each carrying its recipe) are written, and the command
   that opens the chat UI is printed.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.console import Console

from diffgraph.settings import Settings

DEMO_PROMPTS = (
    "a pink circle on a striped white background",
    "a teal diamond on a mint background, warm light",
    "vintage sepia photo of a red square on a beige background",
    "masterpiece, best quality, an orange cross on a dotted gray background, with a black outline",
)
BASE = "miniworld-sd"


def run_demo(settings: Settings, out: Path, console: Console | None = None, seed: int = 7) -> dict:
    from diffgraph.agents.gca import run_pass
    from diffgraph.agents.generate import generate
    from diffgraph.graph_store.store import GraphStore
    from diffgraph.merger.recipe import MergeRecipe
    from diffgraph.tools.browser import CHROMIUM
    from diffgraph.tools.render import render_recipe

    console = console or Console()
    console.print("[bold]DiffGraph offline demo[/] on the mini world (a 32x32 toy Stable Diffusion, CPU)")
    with GraphStore.from_settings(settings) as store:
        built = bool(store.catalog.list_experts(status="active"))
    if not built:
        console.print(f"1. crawling the mini world into {settings.home} (Graph Construction Agent)")
        chromium = Path(CHROMIUM).exists()
        if not chromium:
            console.print(f"   [yellow]{CHROMIUM} not found (apt-get install chromium): homepages are not read, "
                          "experts are described from their API fields only")
        result = run_pass(["miniworld"], settings=settings, console=console, read_pages=chromium)
        console.print(f"   {result['counts']}")
    else:
        console.print(f"1. universal graph already built in {settings.home}")
    console.print("2. prompts -> experts (ESA) -> coefficients (planner) -> merged model -> image")
    rows, images = [], []
    with GraphStore.from_settings(settings) as store:
        for i, prompt in enumerate(DEMO_PROMPTS):
            res = generate(prompt, seed=seed + i, out=out / f"{i:02d}_diffgraph.png", base_model=BASE,
                           settings=settings, store=store)
            base = render_recipe(MergeRecipe(base_model=BASE, prompt=prompt, seed=seed + i), out / f"{i:02d}_base.png")
            picks = ", ".join(f"{store.catalog.get(e['id']).name.split('/')[-1]} {e['weight']:.2f}"
                              for e in res["experts"]) or "none (the base is best)"
            console.print(f"   {prompt!r}\n      experts: {picks}   [dim]planner: {res['planner']}[/]")
            rows.append((Image.open(base["path"]), Image.open(res["image"])))
            images += [base["path"], res["image"]]
    cell = 128
    grid = Image.new("RGB", (2 * cell + 4, len(rows) * (cell + 4)), "white")
    for r, (a, b) in enumerate(rows):
        grid.paste(a.resize((cell, cell), Image.NEAREST), (0, r * (cell + 4)))
        grid.paste(b.resize((cell, cell), Image.NEAREST), (cell + 4, r * (cell + 4)))
    grid_path = out / "demo_grid.png"
    grid.save(grid_path)
    return {"grid": grid_path, "images": images}
