"""The Expert Selection Agent (paper Sec. 3.2) as a LangGraph StateGraph.

    [plugins] -> decompose -> retrieve -> review -> plan -> render

decompose and review are LLM steps (structured output, validated in code) with the offline
brain (agents/brain.py) as the deterministic stand-in; retrieve and the review's rules are the
select step (tools/select.py), which only asks the chosen base model's partitions; plan and
render call the planner and merge-and-render through the run's context. The nodes are
module-level functions; what a run depends on (the graph store, the LLM, the planner, the
renderer, plugin stages) comes in LangGraph's runtime context, so one compiled graph serves
every run.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Literal, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from pydantic import BaseModel

from diffgraph.graph_store.records import UsePolicy
from diffgraph.graph_store.store import GraphStore
from diffgraph.tools import select
from diffgraph.tools.plugins import Plugin, run_prompt_stage
from diffgraph.tools.select import Pick

from . import brain, prompts


class ESAState(TypedDict, total=False):
    prompt: str
    base_model: str
    seed: int
    summary: str
    components: list[dict]
    candidates: list[Pick]
    selected: list[Pick]
    coefficients: dict[str, float]
    result: dict
    notes: Annotated[list[str], operator.add]  # what fell back or changed, in order


@dataclass
class ESAContext:
    store: GraphStore
    llm: object | None = None
    planner: Callable[[str, list[Pick]], dict[str, float]] | None = None  # (prompt, picks) -> {id: coefficient}
    renderer: Callable[..., dict] | None = None  # (prompt, base_model, seed, picks, coefficients) -> result
    prompt_plugins: list[Plugin] = field(default_factory=list)  # plugin tools of the ESA stage "prompt"
    policy: UsePolicy = field(default_factory=UsePolicy)  # which experts may be used (NSFW, licence terms)


def _structured(llm, schema, prompt: str) -> tuple[BaseModel | None, list[str]]:
    """The LLM's ``schema`` answer, or None and a note when it fails or answers garbage."""
    try:
        out = llm.with_structured_output(schema, method="function_calling").invoke(prompt)
        if isinstance(out, schema):
            return out, []
        reason = f"no {schema.__name__} tool call"
    except Exception as exc:  # dead endpoint, invalid JSON, schema mismatch: fall back, say so
        reason = type(exc).__name__
    return None, [f"LLM step {schema.__name__} failed ({reason}); the offline brain answered instead"]


def start(state: ESAState, runtime: Runtime[ESAContext]) -> Literal["plugins", "decompose"]:
    """Installed plugins may rewrite the prompt first (tools/plugins.py)."""
    return "plugins" if runtime.context.prompt_plugins else "decompose"


def plugins(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    prompt, notes = run_prompt_stage(state["prompt"], runtime.context.prompt_plugins)
    return {"prompt": prompt, "notes": notes}


def decompose(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    """The summary s and the components with their visual attributes."""
    prompt, llm = state["prompt"], runtime.context.llm
    notes: list[str] = []
    if llm is not None:
        out, notes = _structured(llm, prompts.Decomposition, prompts.DECOMPOSE.format(prompt=prompt))
        comps = select.valid_components(out.components) if out else []
        if out and out.summary.strip() and comps:
            return {"summary": out.summary.strip()[:300], "components": comps, "notes": notes}
    return {"summary": brain.summarise(prompt), "components": brain.decompose(prompt), "notes": notes}


def retrieve(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    attributes = [a for c in state["components"] for a in c["attributes"]]
    ctx = runtime.context
    return {"candidates": select.retrieve(ctx.store, state["summary"], attributes, state["base_model"], ctx.policy)}


def review(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    """The LLM's choice among the candidates (only ids it was shown count), else the offline review."""
    store, llm, candidates = runtime.context.store, runtime.context.llm, state["candidates"]
    notes: list[str] = []
    if llm is not None and candidates:
        listing = "\n".join(f"- id={c['id']} kind={c['kind']}: {select.description(store, c['id'])}" for c in candidates)
        out, notes = _structured(llm, prompts.Review, prompts.REVIEW.format(prompt=state["prompt"], candidates=listing))
        if out is not None:
            by_id = {c["id"]: c for c in candidates}
            kept = [Pick(**{**by_id[k["id"]], "reason": str(k.get("reason", ""))[:120] or by_id[k["id"]]["reason"]})
                    for k in out.keep if isinstance(k, dict) and k.get("id") in by_id]
            if kept or not out.keep:
                return {"selected": select.dedupe(kept)}
            notes = ["the LLM review named no known candidate; the offline review was used"]
    return {"selected": brain.review(store, candidates, state["base_model"]), "notes": notes}


def plan(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    if not state["selected"] or runtime.context.planner is None:
        return {"coefficients": {}}
    return {"coefficients": runtime.context.planner(state["prompt"], state["selected"])}


def render(state: ESAState, runtime: Runtime[ESAContext]) -> dict:
    if runtime.context.renderer is None:
        return {}
    return {"result": runtime.context.renderer(state["prompt"], state["base_model"], state.get("seed", 0),
                                               state["selected"], state["coefficients"])}


@lru_cache(maxsize=1)
def graph():
    """The compiled ESA; run it with ``graph().invoke(inputs, context=ESAContext(...))``."""
    g = StateGraph(ESAState, context_schema=ESAContext)
    for node in (plugins, decompose, retrieve, review, plan, render):
        g.add_node(node.__name__, node)
    g.add_conditional_edges(START, start)
    g.add_edge("plugins", "decompose")
    for a, b in (("decompose", "retrieve"), ("retrieve", "review"), ("review", "plan"), ("plan", "render")):
        g.add_edge(a, b)
    g.add_edge("render", END)
    return g.compile()


def run(ctx: ESAContext, prompt: str, base_model: str, seed: int = 0) -> ESAState:
    return graph().invoke({"prompt": prompt, "base_model": base_model, "seed": seed, "notes": []},
                          {"recursion_limit": 50}, context=ctx)


def select_experts(store: GraphStore, prompt: str, base_model: str, llm=None,
                   policy: UsePolicy | None = None) -> dict:
    """ESA without planning or rendering (used by training, benchmarks and `generate`)."""
    state = run(ESAContext(store=store, llm=llm, policy=policy or UsePolicy()), prompt, base_model)
    return {"summary": state["summary"], "components": state["components"], "candidates": state["candidates"],
            "selected": state["selected"], "brain": "llm" if llm else "offline", "notes": state.get("notes", [])}
