"""A prompt in, an image out: the Expert Selection Agent, the planner and merge-and-render.

This is what `diffgraph generate` and the chat agent's generate tool call.
"""

from __future__ import annotations

from pathlib import Path

from diffgraph.errors import DiffGraphError
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings, get_settings
from diffgraph.tools import bases
from diffgraph.tools.plugins import plugins

from . import esa
from .llm import chat_model

class EmptyPrompt(DiffGraphError, ValueError):
    pass


def generate(prompt: str, seed: int = 0, out: Path | None = None, base_model: str | None = None,
             settings: Settings | None = None, store: GraphStore | None = None) -> dict:
    """Select experts, plan coefficients, merge and render; returns what was done and why.
    ``base_model`` None: DIFFGRAPH_BASE, else the graph's only base (tools.bases.choose_base)."""
    from diffgraph.tools.plan import Planner
    from diffgraph.tools.render import build_recipe, render_recipe

    prompt = " ".join((prompt or "").split())
    if not prompt:
        raise EmptyPrompt("the prompt is empty: say what the image should show")
    settings = settings or get_settings()
    own_store = store is None
    store = store or GraphStore.from_settings(settings)
    try:
        base_model = bases.choose_base(base_model or settings.base, store.catalog.base_models())
        planner = Planner.for_home(settings.home, store, base_model)

        def renderer(p, base, s, picks, coefficients):
            recipe = build_recipe(store, p, base, s, picks, coefficients)
            explanation = {"experts": [{**pick, "coefficient": coefficients.get(pick["id"])} for pick in picks],
                           "planner": planner.name}
            return render_recipe(recipe, out, explanation)

        llm = chat_model(settings)
        ctx = esa.ESAContext(store=store, llm=llm, planner=planner.plan, renderer=renderer,
                             prompt_plugins=plugins().esa("prompt"))
        state = esa.run(ctx, prompt, base_model, seed)
    finally:
        if own_store:
            store.close()
    recipe = state["result"]["recipe"]
    weights = {**recipe["effective"]["checkpoints"], **recipe["effective"]["loras"]}
    experts = [{"id": p["id"], "kind": p["kind"], "coefficient": state["coefficients"].get(p["id"]),
                "weight": weights.get(p["id"]), "similarity": p["similarity"], "reason": p["reason"]}
               for p in state["selected"]]
    return {"prompt": state["prompt"], "base_model": base_model, "seed": seed, "image": state["result"]["path"], "summary": state["summary"],
            "components": state["components"], "experts": experts, "planner": planner.name,
            "brain": "llm" if llm else "offline", "notes": state.get("notes", []), "recipe": recipe}
