"""`diffgraph demo`: the whole pipeline on one base, with nothing else configured.

1. If the graph holds no active expert of the base, the Graph Construction Agent crawls the
   sources the base's profile names (the mini world's bundled hub: Civitai- and HF-shaped
   APIs, homepages read in Chromium) into DIFFGRAPH_HOME; a base without sources needs a graph
   built first.
2. For each demo prompt (the profile's own, else held-out test prompts drawn by a fixed seed:
   tools/bases.demo_prompts) the Expert Selection Agent picks experts, the planner weighs them
   and the merged model renders; the base model renders the same prompt and seed.
3. A labelled grid (prompt; base model; DiffGraph, with the experts and their weights under
   it) and the PNGs, each carrying its recipe.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.console import Console

from diffgraph.errors import DiffGraphError
from diffgraph.graph_store.store import GraphStore
from diffgraph.grid import labelled_grid
from diffgraph.merger.recipe import MergeRecipe
from diffgraph.settings import Settings
from diffgraph.tools import bases
from diffgraph.tools.browser import CHROMIUM
from diffgraph.tools.render import render_recipe

from .gca import run_pass
from .generate import generate


class DemoError(DiffGraphError, RuntimeError):
    """The demo cannot run on this base as configured (one line saying what to do)."""


def run_demo(settings: Settings, out: Path, console: Console | None = None, seed: int = 7,
             base_model: str | None = None) -> dict:
    """Crawl if needed, answer the base's demo prompts; {"grid", "images", "base_model"}."""
    console = console or Console()
    with GraphStore.from_settings(settings) as store:
        base = bases.choose_base(base_model or settings.base, store.catalog.base_models())
        built = any(r.base_model == base for r in store.catalog.list_experts(status="active"))
    profile = bases.profile(base)
    prompts = bases.demo_prompts(profile)
    if not prompts:
        raise DemoError(f"the {base} base has no demo prompts; try `diffgraph generate PROMPT --base-model {base}`")
    console.print(f"[bold]DiffGraph demo[/] on {base}")
    if built:
        console.print(f"1. universal graph already built in {settings.home}")
    elif not profile.sources:
        raise DemoError(f"the graph holds no {base} experts: crawl some first, e.g. "
                        f"`diffgraph gca run --source local:DIR`")
    else:
        console.print(f"1. crawling {', '.join(profile.sources)} into {settings.home} (Graph Construction Agent)")
        chromium = Path(CHROMIUM).exists()
        if not chromium:
            console.print(f"   [yellow]{CHROMIUM} not found (apt-get install chromium): homepages are not read, "
                          "experts are described from their API fields only")
        result = run_pass(list(profile.sources), settings=settings, console=console, read_pages=chromium)
        console.print(f"   {result['counts']}")
    console.print("2. prompts -> experts (ESA) -> coefficients (planner) -> merged model -> image")
    rows, captions, images = [], [], []
    with GraphStore.from_settings(settings) as store:
        for i, prompt in enumerate(prompts):
            res = generate(prompt, seed=seed + i, out=out / f"{i:02d}_diffgraph.png", base_model=base,
                           settings=settings, store=store)
            alone = render_recipe(MergeRecipe(base_model=base, prompt=prompt, seed=seed + i), out / f"{i:02d}_base.png")
            picks = ", ".join(f"{store.catalog.get(e.id).name.split('/')[-1]} {e.weight:.2f}"
                              for e in res.experts) or "none (the base is best)"
            console.print(f"   {prompt!r}\n      experts: {picks}   [dim]planner: {res.planner}[/]")
            rows.append((prompt, [Image.open(alone["path"]), Image.open(res.image)]))
            captions.append(["the base alone", picks])
            images += [alone["path"], res.image]
    grid = labelled_grid(rows, out / "demo_grid.png", columns=["base model", "DiffGraph"], captions=captions,
                         cell=160)
    return {"grid": grid, "images": images, "base_model": base}
