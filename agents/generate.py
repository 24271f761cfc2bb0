"""A prompt in, an image out: the Expert Selection Agent, the planner and merge-and-render.

This is what `diffgraph generate`, the demo, the chat agent and the server call; they all get a
:class:`Generation` and show its experts through :func:`expert_rows`, so an image is described
the same way everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from diffgraph.errors import DiffGraphError
from diffgraph.graph_store.records import UsePolicy
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings, get_settings
from diffgraph.tools import bases
from diffgraph.tools.plan import Planner
from diffgraph.tools.plugins import plugins
from diffgraph.tools.render import build_recipe, render_recipe

from . import esa
from .llm import chat_model


class EmptyPrompt(DiffGraphError, ValueError):
    pass


@dataclass(frozen=True)
class ExpertUse:
    """One merged expert: the planner's coefficient, the weight the merge rule made of it, and
    why the ESA picked it."""

    id: str
    kind: str
    coefficient: float | None
    weight: float | None
    similarity: float
    reason: str


@dataclass(frozen=True)
class Generation:
    prompt: str  # as used (plugins may rewrite it)
    base_model: str
    seed: int
    image: Path
    summary: str
    components: list[dict]
    experts: list[ExpertUse]
    planner: str
    brain: str  # "llm" | "offline"
    notes: list[str]
    recipe: dict

    def to_dict(self) -> dict:
        return {**asdict(self), "image": str(self.image)}


ROW_HEADERS = ("expert", "kind", "coefficient", "weight", "why")


def expert_rows(experts: list[dict], digits: int = 3) -> list[tuple[str, str, str, str, str]]:
    """How an image's experts are shown (CLI, terminal chat, chat replies, web UI): name (or id),
    kind, coefficient, effective weight, reason; a coefficient or weight the rule left out reads "-"."""
    def number(value) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [(e.get("name") or e["id"], e["kind"], number(e.get("coefficient")), number(e.get("weight")),
             e.get("reason") or "") for e in experts]


def generate(prompt: str, seed: int = 0, out: Path | None = None, base_model: str | None = None,
             settings: Settings | None = None, store: GraphStore | None = None,
             size: tuple[int, int] | None = None) -> Generation:
    """Select experts, plan coefficients, merge and render; returns what was done and why.
    ``base_model`` None: DIFFGRAPH_BASE, else the graph's only base (tools.bases.choose_base);
    ``size`` (width, height) None: the base's native size (MergeEngine.fit_size)."""

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
            recipe = build_recipe(store, p, base, s, picks, coefficients, size=size)
            explanation = {"experts": [{**pick, "coefficient": coefficients.get(pick["id"])} for pick in picks],
                           "planner": planner.name}
            return render_recipe(recipe, out, explanation)

        llm = chat_model(settings)
        ctx = esa.ESAContext(store=store, llm=llm, planner=planner.plan, renderer=renderer,
                             prompt_plugins=plugins().esa("prompt"), policy=UsePolicy.from_settings(settings))
        state = esa.run(ctx, prompt, base_model, seed)
    finally:
        if own_store:
            store.close()
    recipe = state["result"]["recipe"]
    weights = {**recipe["effective"]["checkpoints"], **recipe["effective"]["loras"]}
    experts = [ExpertUse(p["id"], p["kind"], state["coefficients"].get(p["id"]), weights.get(p["id"]), p["similarity"],
                         p["reason"]) for p in state["selected"]]
    return Generation(state["prompt"], base_model, seed, Path(state["result"]["path"]), state["summary"],
                      state["components"], experts, planner.name, "llm" if llm else "offline",
                      list(state.get("notes", [])), recipe)
