"""The chat agent's tools: module-level LangChain tools the chat's LLM may call.

What a tool acts on arrives in its ``ToolRuntime``: the conversation's state and config, and as
the run's context a :class:`ChatActions` (the chat agent in agents/chat.py implements it), so
the tools stay below the agents layer. ``CHAT_TOOLS`` is the one list the chat offers; installed
plugins extend it (tools/plugins.py) and may not replace a name in it. A tool answers a user's
mistake with one line starting "error:", which the LLM reads and relays; tool results are data
for the LLM, never instructions.
"""

from __future__ import annotations

import json
from typing import Optional, Protocol, runtime_checkable

from langchain_core.messages import ToolMessage
from langchain_core.tools import tool
from langgraph.prebuilt import ToolRuntime
from langgraph.types import Command

from diffgraph.errors import DiffGraphError, reason


@runtime_checkable
class ChatActions(Protocol):
    """What the chat tools ask of the agent that runs them (state and config are the turn's)."""

    def generate_image(self, state: dict, config: dict, prompt: str, seed: int | None) -> dict: ...
    def refine_image(self, state: dict, config: dict, instruction: str, new_prompt: str | None,
                     seed: int | None, image: int | None) -> dict: ...
    def explain_image(self, state: dict, image: int | None) -> dict: ...
    def search(self, query: str, k: int) -> list[dict]: ...
    def status(self) -> dict: ...
    def add_expert(self, location: str) -> dict: ...
    def start_gca(self, sources: list[str] | None, interval: str) -> dict: ...
    def stop_gca(self) -> dict: ...


def compact(image: dict) -> str:
    """What the LLM sees of an image record: small JSON."""
    return json.dumps({"image": image["n"], "path": image["path"], "prompt": image["prompt"], "seed": image["seed"],
                       "experts": [{"name": e.get("name") or e["id"], "id": e["id"], "kind": e["kind"],
                                    "weight": round(e["weight"], 3), "coefficient": round(e["coefficient"], 3)}
                                   for e in image["experts"]],
                       "change": image.get("change"), "notes": image.get("notes", [])})


Runtime = ToolRuntime[ChatActions]  # typed, so the tool's input schema knows its context (no pydantic warning)


def _image(runtime: Runtime, name: str, make) -> Command | str:
    """An image the tool made, added to the thread's images and answered to the LLM."""
    try:
        image = make()
    except DiffGraphError as exc:
        return f"error: {reason(exc)}"
    return Command(update={"images": [image],
                           "messages": [ToolMessage(compact(image), tool_call_id=runtime.tool_call_id, name=name)]})


GRAPH_TOOLS = ("add_expert", "start_graph_updates", "stop_graph_updates")  # change the graph: admin only


def role(config: dict) -> str:
    """The role of the turn's user (agents/auth.py): "admin" for the local CLI and admin
    sessions; anything unset counts as the lesser "generate"."""
    return (config.get("configurable") or {}).get("role") or "generate"


def _admin_only(runtime: Runtime, name: str) -> str | None:
    if role(runtime.config) != "admin":
        return f"error: {name} changes the graph, which only an admin session may do (log in with an admin key)"
    return None


def _json(make) -> str:
    try:
        return json.dumps(make(), default=str)
    except DiffGraphError as exc:
        return f"error: {reason(exc)}"


@tool
def generate_image(prompt: str, runtime: Runtime, seed: Optional[int] = None):
    """Make a new image for an English prompt: the Expert Selection Agent picks experts, the
    planner weighs them, the merged model renders. Returns the image number, PNG path and experts."""
    return _image(runtime, "generate_image",
                  lambda: runtime.context.generate_image(runtime.state, runtime.config, prompt, seed))


@tool
def refine_image(runtime: Runtime, instruction: str = "", new_prompt: Optional[str] = None,
                 seed: Optional[int] = None, image: Optional[int] = None):
    """Change an image of this conversation (default: the last) and render it again with the
    same seed. `instruction` in the refinement language: 'a cat instead of a dog', 'warmer',
    'cooler', 'darker', 'add PHRASE', 'without PHRASE', 'less of EXPERT', 'more of EXPERT',
    'without EXPERT', 'use only N experts', 'another seed', 'seed N'. Or give `new_prompt`."""
    return _image(runtime, "refine_image", lambda: runtime.context.refine_image(
        runtime.state, runtime.config, instruction, new_prompt, seed, image))


@tool
def explain_image(runtime: Runtime, image: Optional[int] = None) -> str:
    """Explain an image of this conversation (default: the last): the experts picked, their
    coefficients and effective weights, their calibration scores, and why each was picked."""
    return _json(lambda: runtime.context.explain_image(runtime.state, image))


@tool
def search_experts(query: str, runtime: Runtime, k: int = 5) -> str:
    """Search the universal graph for experts whose skills match the query (Chroma similarity)."""
    return _json(lambda: runtime.context.search(query, k))


@tool
def graph_status(runtime: Runtime) -> str:
    """What the universal graph holds: experts by status, reference prompts, calibration edges,
    the last GCA run, failures, the background GCA run and the installed plugin tools."""
    return _json(runtime.context.status)


@tool
def add_expert(location: str, runtime: Runtime) -> str:
    """Add one expert to the graph from a Civitai model page URL, a Hugging Face repo URL, or a
    local weights file or folder: downloads, checks, describes, registers and calibrates it."""
    return _admin_only(runtime, "add_expert") or _json(lambda: runtime.context.add_expert(location))


@tool
def start_graph_updates(runtime: Runtime, sources: Optional[list[str]] = None, interval: str = "1h") -> str:
    """Start a background Graph Construction Agent run: a pass over the sources now, then one
    every interval ('30m', '1h', '1d'). Sources: 'civitai[:URL]', 'hf[:URL]', 'local:DIR' or a kind a
    plugin adds; none given: the sources of the base in use."""
    return _admin_only(runtime, "start_graph_updates") or _json(lambda: runtime.context.start_gca(sources, interval))


@tool
def stop_graph_updates(runtime: Runtime) -> str:
    """Stop the background Graph Construction Agent run (after the pass in progress)."""
    return _admin_only(runtime, "stop_graph_updates") or _json(runtime.context.stop_gca)


CHAT_TOOLS = [generate_image, refine_image, explain_image, search_experts, graph_status, add_expert,
              start_graph_updates, stop_graph_updates]
