"""Tools from other installed packages: the ``diffgraph.tools`` entry-point group.

A package adds a tool to DiffGraph without touching this repository by declaring, in its own
pyproject.toml::

    [project.entry-points."diffgraph.tools"]
    lucky_seed = "my_package:lucky_seed"

The object an entry point names may be a LangChain tool (``@langchain_core.tools.tool``), a
plain function with type hints and a docstring (wrapped here with StructuredTool), or a list
of either. Every plugin tool is offered to the chat agent. A tool may also declare a stage of
the Expert Selection Agent, either with the :func:`diffgraph_tool` decorator or by hand:

- LangChain tool: ``my_tool.metadata = {"diffgraph": {"esa": "prompt"}}``
- plain function: ``my_function.__diffgraph__ = {"esa": "prompt"}``

Stages: ``"prompt"`` — the tool takes ``prompt: str`` and returns the prompt to use instead,
before the ESA summarises and decomposes it. Add ``"chat": False`` to keep a tool out of the
chat agent. A plugin that fails to import or to wrap is skipped and reported, never fatal.
See docs/plugins.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint

from langchain_core.tools import BaseTool, StructuredTool

from diffgraph.registry import Registry

GROUP = "diffgraph.tools"
ESA_STAGES = ("prompt",)


@dataclass(frozen=True)
class Plugin:
    name: str  # the tool's name as the agent sees it
    entry_point: str  # "name = module:attr"
    distribution: str | None
    tool: BaseTool
    chat: bool = True
    esa: str | None = None  # an ESA stage (see ESA_STAGES) or None


@dataclass
class PluginSet:
    plugins: list[Plugin] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "entry point: why it was skipped"

    def chat_tools(self) -> list[BaseTool]:
        return [p.tool for p in self.plugins if p.chat]

    def esa(self, stage: str) -> list[Plugin]:
        return [p for p in self.plugins if p.esa == stage]


def diffgraph_tool(func=None, *, esa: str | None = None, chat: bool = True):
    """Make ``func`` a plugin tool: a LangChain StructuredTool carrying its DiffGraph declaration.
    Usable bare (``@diffgraph_tool``) or with arguments (``@diffgraph_tool(esa="prompt")``)."""
    if esa is not None and esa not in ESA_STAGES:
        raise ValueError(f"unknown ESA stage {esa!r}; known: {', '.join(ESA_STAGES)}")

    def wrap(f):
        made = f if isinstance(f, BaseTool) else StructuredTool.from_function(f)
        made.metadata = {**(made.metadata or {}), "diffgraph": {"esa": esa, "chat": chat}}
        return made

    return wrap(func) if func is not None else wrap


def _declaration(obj) -> dict:
    if isinstance(obj, BaseTool):
        return dict((obj.metadata or {}).get("diffgraph") or {})
    return dict(getattr(obj, "__diffgraph__", None) or {})


def _as_plugin(obj, ep, dist: str | None) -> Plugin:
    declared = _declaration(obj)
    if isinstance(obj, BaseTool):
        made = obj
    elif callable(obj):
        if not (obj.__doc__ or "").strip():
            raise TypeError("a plain function needs a docstring (the agent reads it to decide when to call it)")
        made = StructuredTool.from_function(obj)
    else:
        raise TypeError(f"{type(obj).__name__} is neither a LangChain tool nor a function")
    esa = declared.get("esa")
    if esa is not None and esa not in ESA_STAGES:
        raise ValueError(f"unknown ESA stage {esa!r}; known: {', '.join(ESA_STAGES)}")
    if esa == "prompt" and "prompt" not in (made.args or {}):
        raise TypeError("an ESA 'prompt' tool must take an argument named prompt")
    return Plugin(name=made.name, entry_point=f"{ep.name} = {ep.value}", distribution=dist, tool=made,
                  chat=bool(declared.get("chat", True)), esa=esa)


def _plugins_of(ep: EntryPoint, loaded) -> list[tuple[str, Plugin]]:
    """The tools one entry point names (one object or a list), each wrapped as a Plugin."""
    dist = getattr(getattr(ep, "dist", None), "name", None)
    plugins = [_as_plugin(obj, ep, dist) for obj in (loaded if isinstance(loaded, (list, tuple)) else [loaded])]
    return [(p.name, p) for p in plugins]


def discover(group: str = GROUP) -> PluginSet:
    """Load every entry point of ``group`` now (installed packages can change between calls);
    a broken one is skipped and reported, never fatal (diffgraph/registry.py)."""
    found: Registry[Plugin] = Registry(group, "tool", unpack=_plugins_of)
    return PluginSet(found.values(), found.errors)


_cache: PluginSet | None = None
_lock = threading.Lock()


def plugins(refresh: bool = False) -> PluginSet:
    """The installed plugins, discovered once per process (``refresh`` looks again)."""
    global _cache
    with _lock:
        if _cache is None or refresh:
            _cache = discover()
        return _cache


def run_prompt_stage(prompt: str, stage_plugins: list[Plugin]) -> tuple[str, list[str]]:
    """Apply the ESA 'prompt' plugins in order: (prompt to use, notes saying what changed). A
    plugin that fails or returns something unusable is skipped with a note."""
    notes = []
    for plugin in stage_plugins:
        try:
            out = plugin.tool.invoke({"prompt": prompt})
            new = out.get("prompt") if isinstance(out, dict) else out
            if not isinstance(new, str) or not new.strip():
                raise ValueError("returned no prompt text")
            new = " ".join(new.split())[:2000]
        except Exception as exc:
            notes.append(f"plugin {plugin.name} failed ({type(exc).__name__}); the prompt was left as it was")
            continue
        if new != prompt:
            notes.append(f"plugin {plugin.name} rewrote the prompt to '{new[:200]}'")
            prompt = new
    return prompt, notes
