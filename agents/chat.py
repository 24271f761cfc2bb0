"""The chat agent: a LangGraph tool-calling agent over DiffGraph's tools.

    START -> agent (LLM with tools) <-> tools (ToolNode) -> END       when an LLM is configured
    START -> offline (the offline brain: commands and refinements)   -> END   when none is

Both paths share one state (messages and the thread's images) kept per thread by a SQLite
checkpointer at DIFFGRAPH_HOME/chat.sqlite, so a conversation survives a restart and may switch
between the LLM and the offline brain. The tools: generate an image, refine the last one (the
refinement language of agents/refine.py: prompt edits re-select experts, recipe edits only
re-render), explain a result, search experts, graph status, add an expert by URL or path (a GCA
pass), start/stop a background GCA run, and every plugin tool installed (tools/plugins.py).

Bad input never ends a conversation: an empty message, an over-long one, another script, an
unknown refinement, a dead or garbage-answering LLM each get a clear answer (the offline brain
answers when the LLM cannot, and says so). `diffgraph chat`, the web UI and the HTTP API are
thin shells around :class:`ChatAgent` and :class:`ChatServices`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime

from diffgraph.errors import DiffGraphError, describe, reason
from diffgraph.families import label
from diffgraph.graph_store.records import UsePolicy, is_nsfw, licence_grants
from diffgraph.graph_store.status import graph_status
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.recipe import BASE, MergeRecipe, with_trigger_words
from diffgraph.settings import Settings, get_settings
from diffgraph.tools import bases
from diffgraph.tools.chat_tools import CHAT_TOOLS, GRAPH_TOOLS, role
from diffgraph.tools.plugins import plugins
from diffgraph.tools.render import render_recipe
from diffgraph.tools.select import admitted_ids
from diffgraph.tools.sources import SourceError
from diffgraph.tools.sources.destinations import host_of
from diffgraph.tools.sources.single import REAL_HOSTS
from diffgraph.tools.sources.spec import kinds

from . import prompts, refine
from .background import BACKGROUND, parse_interval
from .gca import GCABusy, run_pass
from .generate import EmptyPrompt, expert_rows, generate
from .llm import chat_model

MAX_MESSAGE_CHARS = 2000  # longer messages are cut (and the reply says so)
MAX_PROMPT_CHARS = 400  # the text encoder reads 77 tokens; longer prompts are cut at a word
MAX_TOOL_ROUNDS = 6  # LLM tool-call rounds per user message
MAX_IMAGES = 50  # images remembered per thread
HISTORY_MESSAGES = 40  # messages the LLM sees
CHECKPOINTS = "chat.sqlite"


OFFLINE_HELP = """I am the offline brain (no LLM is configured: set DIFFGRAPH_LLM_BASE_URL for one).
Describe an image to make one, e.g. 'a pink circle on a striped white background, warm light'.
Commands:
  help                                   this text
  explain [N]                            experts, coefficients, calibration scores and reasons of image N (default: last)
  search <words>                         experts whose skills match the words
  status                                 what the universal graph holds; background GCA run
  add expert <URL or path>               crawl one expert (Civitai/HF model page, or a file/folder) into the graph
  start gca [<source> ...] [every 1h]    keep the graph current in the background (default: the base's own sources)
  stop gca                               stop the background run after its current pass
  /base [NAME]                           the base this conversation renders with; switch it (e.g. /base SD 1.5)
  tools | tool <name> <text>             list plugin tools | call one with a text argument
""" + refine.HELP

_VERB_LEAD = re.compile(r"^(?:please\s+)?(?:(?:can|could) you\s+)?(?:draw|generate|make|create|render|paint|show)"
                        r"(?:\s+me)?\s+(?:(?:an?\s+)?(?:image|picture|photo|render)\s+of\s+)?", re.IGNORECASE)


class ChatError(DiffGraphError, ValueError):
    """Something the user can fix; the message says what."""


def _keep_images(old: list[dict] | None, new: list[dict] | None) -> list[dict]:
    return ((old or []) + (new or []))[-MAX_IMAGES:]


class ChatState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    images: Annotated[list[dict], _keep_images]
    base_model: str  # the conversation's base, set with "/base NAME" (else the service's)


@dataclass
class Reply:
    """One answer: its text, the images made in this turn, which brain answered, tools used."""

    text: str
    thread: str
    brain: str  # "llm" | "offline"
    images: list[dict] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "thread": self.thread, "brain": self.brain, "images": self.images, "tools": self.tools}


def thread_slug(thread: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", thread).strip("-.")[:40] or "thread"
    return slug if slug == thread else f"{slug}-{hashlib.sha256(thread.encode()).hexdigest()[:6]}"


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    return (head.rsplit(" ", 1)[0] if " " in head[limit // 2:] else head).rstrip(" ,")


def latin_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


# ---------------------------------------------------------------------------- services


class ChatServices:
    """What the chat tools do, independent of who asks (LLM, offline brain, web UI, HTTP API)."""

    def __init__(self, settings: Settings | None = None, base_model: str | None = None):
        self.settings = settings or get_settings()
        self.requested_base = base_model or self.settings.base
        self.gca = BACKGROUND
        self._store = None
        self._lock = threading.Lock()

    @property
    def store(self):
        """One GraphStore for the process's lifetime (the catalog and Chroma are thread-safe)."""

        with self._lock:
            if self._store is None:
                self._store = GraphStore.from_settings(self.settings)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- images ---------------------------------------------------------------------------

    def image_path(self, folder: str, n: int | str, key: str) -> Path:
        digest = hashlib.sha256(f"{folder}\0{n}\0{key}\0{time.time_ns()}".encode()).hexdigest()[:8]
        name = f"{n:03d}-{digest}.png" if isinstance(n, int) else f"{n}-{digest}.png"
        return self.settings.artifacts_dir / folder / name

    def check_prompt(self, prompt: str) -> tuple[str, list[str]]:
        """The prompt to render and notes about what was done to it; ChatError if empty."""
        prompt = " ".join((prompt or "").split())
        if not prompt:
            raise ChatError("the prompt is empty: say what the image should show, e.g. 'a pink circle on a striped "
                            "white background'")
        notes = []
        if len(prompt) > MAX_PROMPT_CHARS:
            notes.append(f"the prompt had {len(prompt):,} characters; I used the first {MAX_PROMPT_CHARS} (the text "
                         "encoder reads about 77 tokens)")
            prompt = cut(prompt, MAX_PROMPT_CHARS)
        if latin_share(prompt) < 0.5:
            notes.append("the prompt is mostly in a non-Latin script; the experts are described in English, so "
                         "no expert may match: an English prompt works better")
        return prompt, notes

    def _names(self, ids: list[str]) -> dict[str, str]:
        rows = {i: self.store.catalog.get(i) for i in ids}
        return {i: (r.name if r else i) for i, r in rows.items()}

    @property
    def base_model(self) -> str:
        """The base asked for (``--base-model``, DIFFGRAPH_BASE), else the graph's only one,
        looked up on each use: a crawl may add another base while the server runs."""
        return bases.choose_base(self.requested_base, self.store.catalog.base_models())

    def generate(self, prompt: str, seed: int = 0, folder: str = "chat/default", n: int | str = 1,
                 offline: bool = False, parent: int | None = None, change: str | None = None,
                 base_model: str | None = None, size: tuple[int, int] | None = None) -> dict:
        """ESA + planner + merge-and-render; the chat image record (see :meth:`_record`).
        ``base_model`` (one request's choice, e.g. the API's ``model``) overrides the service's;
        ``size`` (width, height) is rendered within the base's range (default: its native size)."""
        prompt, notes = self.check_prompt(prompt)
        settings = replace(self.settings, llm_base_url=None) if offline else self.settings
        try:
            base_model = base_model or self.base_model
        except KeyError as exc:  # no such base, or several and none named
            raise ChatError(reason(exc)) from None
        try:
            result = generate(prompt, seed=int(seed), out=self.image_path(folder, n, prompt),
                              base_model=base_model, settings=settings, store=self.store, size=size)
        except EmptyPrompt as exc:
            raise ChatError(str(exc)) from None
        names = self._names([e.id for e in result.experts])
        experts = [{**e, "name": names.get(e["id"])} for e in result.to_dict()["experts"]]
        return self._record(n, result.image, result.prompt, int(seed), result.recipe, experts,
                            summary=result.summary, components=result.components, planner=result.planner,
                            brain=result.brain, notes=notes + result.notes, parent=parent, change=change)

    @staticmethod
    def _record(n, path, prompt, seed, recipe, experts, *, summary="", components=(), planner="", brain="offline",
                notes=(), parent=None, change=None) -> dict:
        return {"n": n, "id": Path(path).stem, "path": str(path), "prompt": prompt, "seed": seed, "experts": experts,
                "recipe": recipe, "summary": summary, "components": list(components), "planner": planner,
                "brain": brain, "notes": list(notes), "parent": parent, "change": change,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}

    def refine(self, image: dict, edit: refine.Edit, folder: str, n: int, offline: bool = False) -> dict:
        """Apply ``edit`` to ``image``: a new prompt re-runs selection and planning; recipe edits
        only re-render (merges come from the engine's caches). The seed is kept."""

        seed = image["seed"] if edit.seed is None else edit.seed
        if edit.prompt is not None and " ".join(edit.prompt.split()) != image["prompt"]:
            new = self.generate(edit.prompt, seed=seed, folder=folder, n=n, offline=offline, parent=image["n"],
                                change=edit.description, base_model=image["recipe"]["base_model"])
            if not (edit.less or edit.more or edit.remove or edit.keep_only is not None):
                return new
            image = new
        recipe = MergeRecipe.from_dict(image["recipe"])
        before = {e["id"]: e for e in image["experts"]}
        names = {i: e.get("name") or i for i, e in before.items()}
        try:
            edited = refine.apply(recipe, edit, names)
        except refine.RefinementError as exc:
            raise ChatError(str(exc)) from None
        if edited.to_json() == recipe.to_json():
            raise ChatError("that refinement changes nothing in the recipe")
        # the prompt rendered: the image's own, with the trigger words of the LoRAs it still has
        triggers = [row.trigger_words for e in edited.loras if e.name != BASE and (row := self.store.catalog.get(e.name))]
        edited = replace(edited, prompt=with_trigger_words(image["prompt"], triggers))
        experts = []
        for kind, pairs in (("ckpt", edited.checkpoint_weights()), ("lora", edited.lora_weights())):
            for entry, weight in pairs:
                if entry.name != BASE:
                    prior = before.get(entry.name, {})
                    experts.append({"id": entry.name, "name": names.get(entry.name), "kind": kind,
                                    "coefficient": entry.coefficient, "weight": weight,
                                    "similarity": prior.get("similarity"), "reason": prior.get("reason", "")})
        explanation = {"experts": experts, "refined_from": image["id"], "change": edit.description}
        path = self.image_path(folder, n, edited.to_json())
        result = render_recipe(edited, path, explanation)
        return self._record(n, result["path"], image["prompt"], edited.seed, result["recipe"], experts,
                            summary=image.get("summary", ""), components=image.get("components", []),
                            planner=image.get("planner", "") + " (then edited by hand)", brain=image.get("brain", ""),
                            notes=[], parent=image["n"], change=edit.description)

    def explain(self, image: dict) -> dict:
        """Experts with coefficients, effective weights, mean calibration scores and reasons."""
        ids = [e["id"] for e in image["experts"]]
        scores: dict[str, dict] = {}
        for edge in self.store.catalog.calibration(ids):
            acc = scores.setdefault(edge.expert_id, {"n": 0, "sums": {}})
            acc["n"] += 1
            for name, value in zip(edge.metric_names, edge.scores):
                acc["sums"][name] = acc["sums"].get(name, 0.0) + value
        experts = []
        for e in image["experts"]:
            acc = scores.get(e["id"])
            calibration = {k: round(v / acc["n"], 4) for k, v in acc["sums"].items()} if acc else {}
            row = self.store.catalog.get(e["id"])
            experts.append({**e, "calibration": calibration, "calibrated_prompts": acc["n"] if acc else 0,
                            "trigger_words": list(row.trigger_words) if row else [],
                            "preferred_weight": row.preferred_weight if row else None})
        effective = image["recipe"].get("effective", {})
        return {"image": image["n"], "path": image["path"], "prompt": image["prompt"], "seed": image["seed"],
                "rendered_prompt": image["recipe"].get("prompt", image["prompt"]),
                "summary": image.get("summary"), "components": image.get("components"), "planner": image.get("planner"),
                "brain": image.get("brain"), "experts": experts, "change": image.get("change"),
                "refined_from": image.get("parent"), "notes": image.get("notes", []),
                "base_share": {k: round(v.get("base", 0.0), 4) for k, v in effective.items() if "base" in v},
                "recipe": {k: image["recipe"].get(k) for k in ("base_model", "seed", "steps", "guidance", "scheduler",
                                                               "width", "height")}}

    def search(self, query: str, k: int = 5) -> list[dict]:
        query = " ".join((query or "").split())
        if not query:
            raise ChatError("say what skill to search for, e.g. 'search striped backgrounds'")
        k = max(1, min(int(k), 20))
        vector = self.store.embed([cut(query, MAX_PROMPT_CHARS)])[0]
        policy = UsePolicy.from_settings(self.settings)  # what generation may use (DIFFGRAPH_NSFW, DIFFGRAPH_LICENCE)
        hits = []
        for kind in ("ckpt", "lora"):
            hits += [(expert_id, sim) for expert_id, sim, _ in self.store.vectors.query(
                vector, kind=kind, base_model=self.base_model, k=k,
                admit=lambda ids: admitted_ids(self.store, ids, policy))]
        out = []
        for expert_id, sim in sorted(hits, key=lambda h: -h[1])[:k]:
            row = self.store.catalog.get(expert_id)
            if row is not None:
                out.append({"id": row.id, "name": row.name, "kind": row.kind, "similarity": round(sim, 3),
                            "status": row.status, "trigger_words": row.trigger_words[:5],
                            "description": (row.description_text or "")[:200], "nsfw": is_nsfw(row.nsfw_level),
                            "commercial_use": licence_grants(row.license, "commercial")})
        return out

    def status(self) -> dict:
        status = graph_status(self.store)
        found = plugins()
        return {"experts": status["experts"]["by_status"], "total_experts": status["experts"]["total"],
                "reference_prompts": status["reference_prompts"], "calibration": status["calibration"],
                "vectors": status["vectors"], "last_run": status["last_run"],
                "failures": status["failures"][:10], "background_gca": self.gca.status(),
                "plugins": [p.name for p in found.plugins], "plugin_errors": found.errors, "home": status["home"]}

    def add_expert(self, location: str) -> dict:
        """Crawl one expert (a Civitai/Hugging Face model page URL, or a local file or folder)
        into the graph: download, check, read its page, describe, register and calibrate. A URL
        must be on Civitai, the Hub or a host DIFFGRAPH_ALLOWED_HOSTS lists: a chat message
        never makes the server fetch from anywhere else."""
        from rich.console import Console

        location = (location or "").strip().strip("'\"<>")
        if re.match(r"https?://", location, re.IGNORECASE):
            known = sorted({h for hosts in REAL_HOSTS.values() for h in hosts} | set(self.settings.allowed_hosts))
            if host_of(location) not in known:
                raise ChatError(f"{host_of(location)[:100] or 'that URL'} is not a host this server fetches experts from "
                                f"({', '.join(known)}); DIFFGRAPH_ALLOWED_HOSTS can list it")
            spec, read_pages = f"url:{location}", True
        elif location and Path(location).expanduser().exists():
            spec, read_pages = f"file:{Path(location).expanduser().resolve()}", False
        else:
            raise ChatError(f"'{location[:200]}' is neither an http(s) URL of a model page nor an existing file or folder")
        before = {r.id: (r.version, r.status, r.updated_at) for r in self.store.catalog.list_experts()}
        try:
            result = run_pass([spec], settings=self.settings, console=Console(quiet=True), read_pages=read_pages)
        except GCABusy as exc:
            raise ChatError(f"{exc}; try again when it is done (or stop the background run)") from None
        except (ValueError, OSError, SourceError) as exc:
            raise ChatError(f"cannot add {location[:200]}: {reason(exc)}") from None
        changed = [r for r in self.store.catalog.list_experts() if before.get(r.id) != (r.version, r.status, r.updated_at)]
        return {"source": spec, "counts": result["counts"], "failures": result["failures"],
                "experts": [{"id": r.id, "name": r.name, "kind": r.kind, "base_model": r.base_model,
                             "status": r.status, "reason": r.status_reason} for r in changed]}

    def start_gca(self, sources: list[str] | None = None, interval: str = "1h") -> dict:
        try:
            return self.gca.start(list(sources or self._default_sources()), parse_interval(interval),
                                  settings=self.settings)
        except ValueError as exc:
            raise ChatError(str(exc)) from None

    def _default_sources(self) -> list[str]:
        """The sources the base in use declares (a plugin's own hub, say); a real base has none,
        so the user names them."""
        sources = list(bases.profile(self.base_model).sources)
        if not sources:
            raise ChatError(f"name the sources to crawl for {self.base_model} ({', '.join(kinds())}), "
                            "e.g. 'start gca local:~/models/Lora'")
        return sources

    def stop_gca(self) -> dict:
        return self.gca.stop(wait_s=1.0)


# ---------------------------------------------------------------------------- formatting


def describe_image(image: dict) -> str:
    lines = [f"Image {image['n']}: {image['path']}",
             f"  prompt: {image['prompt'][:200]}  (seed {image['seed']})"]
    if image.get("change"):
        lines.append(f"  changed from image {image['parent']}: {image['change']}")
    if image["experts"]:
        lines.append("  experts: " + "; ".join(f"{name} ({kind}, weight {weight}, coefficient {coefficient})"
                                               for name, kind, coefficient, weight, _ in expert_rows(image["experts"], 2)))
    else:
        lines.append("  experts: none (the base model alone fits this prompt best)")
    base = image["recipe"].get("effective", {})
    shares = [f"{k} {v['base']:.2f}" for k, v in base.items() if "base" in v]
    if shares:
        lines.append("  base model's share: " + ", ".join(shares))
    lines += [f"  note: {n}" for n in image.get("notes", [])]
    return "\n".join(lines)


def describe_explanation(info: dict) -> str:
    lines = [f"Image {info['image']} ({info['path']})", f"  prompt: {info['prompt'][:200]}  (seed {info['seed']})",
             *([f"  rendered as: {info['rendered_prompt'][:300]}"] if info.get("rendered_prompt", info["prompt"])
               != info["prompt"] else []),
             f"  summary: {info.get('summary') or '-'}; planner: {info.get('planner')}; brain: {info.get('brain')}"]
    if info.get("change"):
        lines.append(f"  refined from image {info['refined_from']}: {info['change']}")
    if not info["experts"]:
        lines.append("  no experts: no expert's skills matched this prompt closely enough")
    for e in info["experts"]:
        cal = ", ".join(f"{k} {v:.3f}" for k, v in e["calibration"].items()) or "not calibrated"
        usage = "".join([f"; trigger words: {', '.join(e['trigger_words'])}" if e.get("trigger_words") else "",
                         f"; recommended weight {e['preferred_weight']:g}" if e.get("preferred_weight") else ""])
        lines.append(f"  - {e.get('name') or e['id']} [{e['id']}] {e['kind']}: coefficient {e['coefficient']:.3f} -> "
                     f"weight {e['weight']:.3f}{usage}; why: {e.get('reason') or '-'}; calibration over "
                     f"{e['calibrated_prompts']} reference prompts: {cal}")
    for k, v in (info.get("base_share") or {}).items():
        lines.append(f"  base model's share of the {k}: {v:.3f}")
    return "\n".join(lines)


def describe_status(status: dict) -> str:
    by = ", ".join(f"{k} {v}" for k, v in status["experts"].items() if v)
    run = status.get("last_run")
    gca = status["background_gca"]
    lines = [f"Graph at {status['home']}: {status['total_experts']} experts ({by or 'none'}); "
             f"{status['reference_prompts']} reference prompts; {status['calibration']['edges']} calibration edges; "
             f"{status['vectors']} vectors.",
             "Last GCA run: " + (f"#{run['id']} {run['source_spec']} {run['status']} {run['started_at']}" if run else "none"),
             "Background GCA: " + (f"running on {' '.join(gca['sources'])} every {gca['interval_s']:.0f}s, "
                                   f"{gca['passes']} passes done" if gca.get("running") else "not running")]
    if status["failures"]:
        lines.append("Failures: " + "; ".join(f"{f['name']} ({f['status']}: {f['reason']})" for f in status["failures"]))
    if status["plugins"]:
        lines.append("Plugin tools: " + ", ".join(status["plugins"]))
    lines += [f"Plugin skipped: {e}" for e in status["plugin_errors"]]
    return "\n".join(lines)


def _text(message) -> str:
    content = message.content
    if isinstance(content, list):
        return " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content or "")


def _turn(messages: list) -> list:
    """The messages of the current turn: from the last human message on."""
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            return messages[i:]
    return list(messages)


def llm_view(messages: list) -> list:
    """The recent history in a form every OpenAI-compatible server accepts: it starts at a human
    message, every tool call has its answer (a turn cut short by a crash leaves none), and tool
    results of earlier turns are cut short."""
    recent = messages[-HISTORY_MESSAGES:]
    while recent and not isinstance(recent[0], HumanMessage):
        recent = recent[1:]
    answered = {m.tool_call_id for m in recent if isinstance(m, ToolMessage)}
    current = {id(m) for m in _turn(recent)}
    out, open_calls = [], set()
    for m in recent:
        if isinstance(m, AIMessage) and m.tool_calls:
            if not all(c["id"] in answered for c in m.tool_calls):
                continue
            open_calls |= {c["id"] for c in m.tool_calls}
            out.append(m)
        elif isinstance(m, ToolMessage):
            limit = 6000 if id(m) in current else 1500  # this turn's results whole, older ones cut
            if m.tool_call_id in open_calls:
                out.append(m if len(_text(m)) <= limit else ToolMessage(_text(m)[:limit] + " …",
                                                                        tool_call_id=m.tool_call_id, name=m.name))
        else:
            out.append(m)
    return out


# ---------------------------------------------------------------------------- the agent


class ChatAgent:
    """A conversation per thread with the LLM (or the offline brain) over DiffGraph's tools."""

    def __init__(self, settings: Settings | None = None, *, llm="auto", checkpointer=None,
                 services: ChatServices | None = None, use_plugins: bool = True, base_model: str | None = None):
        self.settings = settings or get_settings()
        self.services = services or ChatServices(self.settings, base_model)
        self.llm = chat_model(self.settings) if llm == "auto" else llm
        self.brain = "llm" if self.llm is not None else "offline"
        self.plugin_set = plugins() if use_plugins else None
        self.plugin_tools = self.plugin_set.chat_tools() if self.plugin_set else []
        self._conn = None
        if checkpointer is None:
            from langgraph.checkpoint.sqlite import SqliteSaver

            self.settings.home.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.settings.home / CHECKPOINTS, check_same_thread=False)
            checkpointer = SqliteSaver(self._conn)
        self.checkpointer = checkpointer
        own = list(CHAT_TOOLS)
        taken = {t.name for t in own}
        for clash in [t for t in self.plugin_tools if t.name in taken]:  # a plugin may not replace a built-in
            message = f"{clash.name}: a built-in tool has this name; the plugin's is not used"
            if message not in self.plugin_set.errors:
                self.plugin_set.errors.append(message)
        self.plugin_tools = [t for t in self.plugin_tools if t.name not in taken]
        self.tools = own + self.plugin_tools
        self.graph = self._build()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ChatAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------

    def send(self, message: str, thread: str = "default", role: str = "admin") -> Reply:
        """Answer one message of ``thread``; never raises for bad input. ``role`` is the user's
        (agents/auth.py): the local CLI's is "admin"; a "generate" session is not offered, and
        may not use, the tools that change the graph (tools/chat_tools.GRAPH_TOOLS)."""
        text = (message or "").strip()
        if not text:
            return Reply("Your message is empty: describe the image you want (e.g. 'a pink circle on a striped "
                         "white background'), or type 'help'.", thread, self.brain)
        if re.fullmatch(r"/base(\s.*)?", text):
            return self._switch_base(text[len("/base"):].strip(), thread)
        prefix = ""
        if len(text) > MAX_MESSAGE_CHARS:
            prefix = (f"(Your message had {len(text):,} characters; I read only the first {MAX_MESSAGE_CHARS:,}.)\n")
            text = cut(text, MAX_MESSAGE_CHARS)
        config = self._config(thread)
        config["configurable"]["role"] = role
        with self._lock_for(thread):
            before = max((im["n"] for im in self.images(thread)), default=0)
            n_messages = len(self.graph.get_state(config).values.get("messages", []))
            try:
                final = self.graph.invoke({"messages": [HumanMessage(text)]}, config, durability="sync", context=self)
            except Exception as exc:  # not the user's fault: say what broke; the thread stays usable
                return Reply(f"{prefix}Something went wrong inside DiffGraph ({describe(exc)}). Your conversation is kept; "
                             "try again or rephrase.", thread, self.brain)
        turn = final["messages"][n_messages:]
        answer = next((m for m in reversed(turn) if isinstance(m, AIMessage) and not m.tool_calls), None)
        tools = [m.name for m in turn if isinstance(m, ToolMessage)]
        brain = answer.additional_kwargs.get("diffgraph_brain", self.brain) if answer is not None else self.brain
        images = [im for im in final.get("images", []) if im["n"] > before]
        return Reply(prefix + (_text(answer) if answer is not None else ""), thread, brain, images, tools)

    def _switch_base(self, name: str, thread: str) -> Reply:
        """"/base": which base this conversation renders with; "/base NAME" switches it (any
        spelling of a family: "/base SD 1.5"). Kept with the thread, so it survives a restart."""
        config = self._config(thread)
        current = self.graph.get_state(config).values.get("base_model")
        held = self.services.store.catalog.base_models()
        if not name:
            try:
                shown = current or self.services.base_model
            except KeyError as exc:
                shown = f"none chosen ({reason(exc)})"
            return Reply(f"This conversation renders with {shown}. The graph holds experts of: "
                         f"{', '.join(held) or 'none yet'}. Switch with '/base NAME'.", thread, self.brain)
        try:
            chosen = bases.choose_base(name, held)
        except KeyError as exc:
            return Reply(f"Sorry: {reason(exc)}", thread, self.brain)
        with self._lock_for(thread):
            self.graph.update_state(config, {"base_model": chosen}, as_node="offline")
        return Reply(f"This conversation now renders with {label(chosen)} ({chosen}).", thread, self.brain)

    def images(self, thread: str) -> list[dict]:
        return list(self.graph.get_state(self._config(thread)).values.get("images", []))

    def history(self, thread: str) -> list[dict]:
        """The conversation as role/content pairs (tool traffic left out), for resuming a UI."""
        out = []
        for m in self.graph.get_state(self._config(thread)).values.get("messages", []):
            if isinstance(m, HumanMessage):
                out.append({"role": "user", "content": _text(m)})
            elif isinstance(m, AIMessage) and not m.tool_calls and _text(m).strip():
                out.append({"role": "assistant", "content": _text(m)})
        return out

    # -- internals ------------------------------------------------------------------------

    def _config(self, thread: str) -> dict:
        return {"configurable": {"thread_id": thread}, "recursion_limit": 4 * MAX_TOOL_ROUNDS + 10}

    def _lock_for(self, thread: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(thread, threading.Lock())

    @staticmethod
    def _folder(config: RunnableConfig) -> str:
        return "chat/" + thread_slug(str((config.get("configurable") or {}).get("thread_id", "default")))

    @staticmethod
    def _next_n(state: dict) -> int:
        return max((im["n"] for im in state.get("images", [])), default=0) + 1

    @staticmethod
    def _pick(state: dict, n: int | None) -> dict:
        images = state.get("images", [])
        if not images:
            raise ChatError("there is no image in this conversation yet: describe one first")
        if n is None:
            return images[-1]
        found = next((im for im in images if im["n"] == int(n)), None)
        if found is None:
            raise ChatError(f"this conversation has no image {n} (it has {', '.join(str(im['n']) for im in images)})")
        return found

    # ------------------------------------------------------------------ ChatActions (tools/chat_tools.py)

    def generate_image(self, state: dict, config: RunnableConfig, prompt: str, seed: int | None) -> dict:
        n = self._next_n(state)
        return self.services.generate(prompt, seed=n - 1 if seed is None else seed, folder=self._folder(config), n=n,
                                      base_model=state.get("base_model"))

    def refine_image(self, state: dict, config: RunnableConfig, instruction: str, new_prompt: str | None,
                     seed: int | None, image: int | None) -> dict:
        target = self._pick(state, image)
        if new_prompt:
            edit = refine.Edit(prompt=new_prompt, seed=seed, description="new prompt")
        elif instruction.strip():
            edit = refine.parse(instruction, target)
            if seed is not None:
                edit.seed = seed
        elif seed is not None:
            edit = refine.Edit(seed=seed, description=f"seed {seed}")
        else:
            raise ChatError("say how to change the image (instruction or new_prompt)")
        return self.services.refine(target, edit, self._folder(config), self._next_n(state))

    def explain_image(self, state: dict, image: int | None) -> dict:
        return self.services.explain(self._pick(state, image))

    def search(self, query: str, k: int) -> list[dict]:
        return self.services.search(query, k)

    def status(self) -> dict:
        return self.services.status()

    def add_expert(self, location: str) -> dict:
        return self.services.add_expert(location)

    def start_gca(self, sources: list[str] | None, interval: str) -> dict:
        return self.services.start_gca(sources, interval)

    def stop_gca(self) -> dict:
        return self.services.stop_gca()

    def _build(self):
        from langgraph.graph import END, START, StateGraph
        from langgraph.prebuilt import ToolNode, tools_condition

        g = StateGraph(ChatState, context_schema=ChatAgent)
        g.add_node("offline", offline_node)
        if self.llm is not None:
            self.bound = {"admin": self.llm.bind_tools(self.tools),
                          "generate": self.llm.bind_tools([t for t in self.tools if t.name not in GRAPH_TOOLS])}
            g.add_node("agent", agent_node)
            g.add_node("tools", ToolNode(self.tools, handle_tool_errors=lambda e: f"error: {type(e).__name__}: {e}"))
            g.add_edge(START, "agent")
            g.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
            g.add_edge("tools", "agent")
        else:
            g.add_edge(START, "offline")
        g.add_edge("offline", END)
        return g.compile(checkpointer=self.checkpointer)


# ---------------------------------------------------------------------------- nodes (the agent is the run's context)


def agent_node(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatAgent]) -> dict:
    """The LLM's step: an answer or tool calls; the offline brain answers when it fails."""
    agent = runtime.context
    turn = _turn(state["messages"])
    rounds = sum(1 for m in turn if isinstance(m, AIMessage) and m.tool_calls)
    if rounds >= MAX_TOOL_ROUNDS:
        return {"messages": [AIMessage(f"I stopped after {rounds} tool calls for one message. " + _tool_summary(turn))]}
    try:
        bound = agent.bound["admin" if role(config) == "admin" else "generate"]
        response = bound.invoke([SystemMessage(prompts.CHAT_SYSTEM), *llm_view(state["messages"])])
    except Exception as exc:
        return _fallback(agent, state, config, f"the LLM at {agent.settings.llm_base_url} failed ({describe(exc, 160)})")
    problem = None
    if getattr(response, "invalid_tool_calls", None):
        bad = response.invalid_tool_calls[0]
        problem = f"it called {bad.get('name') or 'a tool'} with arguments that are not valid JSON"
    elif not response.tool_calls and not _text(response).strip():
        problem = "it answered nothing"
    if problem:
        return _fallback(agent, state, config, f"the LLM's answer was unusable: {problem}")
    response.additional_kwargs["diffgraph_brain"] = "llm"
    return {"messages": [response]}


def offline_node(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatAgent]) -> dict:
    """The offline brain's step, when no LLM is configured."""
    turn = _turn(state["messages"])
    out = offline_answer(runtime.context, _text(turn[0]) if turn else "", state, config)
    message = out["messages"][0]
    out["messages"] = [AIMessage(_text(message) + "\n(offline brain)", additional_kwargs={"diffgraph_brain": "offline"})]
    return out


def _tool_summary(turn: list) -> str:
    results = [f"{m.name}: {_text(m)[:400]}" for m in turn if isinstance(m, ToolMessage)]
    return ("What the tools did:\n" + "\n".join(results)) if results else "No tool ran."


def _fallback(agent: ChatAgent, state: ChatState, config: RunnableConfig, reason: str) -> dict:
    """The turn's answer when the LLM failed: what the tools did, or the offline brain's answer."""
    turn = _turn(state["messages"])
    if any(isinstance(m, ToolMessage) for m in turn):
        return {"messages": [AIMessage(f"({reason}.) " + _tool_summary(turn), additional_kwargs={"diffgraph_brain": "offline"})]}
    out = offline_answer(agent, _text(turn[0]) if turn else "", state, config, offline_esa=True)
    message = out["messages"][0]
    out["messages"] = [AIMessage(f"({reason[0].upper() + reason[1:]}; the offline brain answered.)\n{_text(message)}",
                                 additional_kwargs={"diffgraph_brain": "offline"})]
    return out


def offline_answer(agent: ChatAgent, text: str, state: dict, config: RunnableConfig, offline_esa: bool = False) -> dict:
    """The offline brain's chat: a command, a refinement of the last image, or an image request."""
    try:
        return _offline_dispatch(agent, text, state, config, offline_esa)
    except (ChatError, refine.RefinementError) as exc:
        return {"messages": [AIMessage(f"Sorry: {exc}")]}


def _offline_dispatch(agent: ChatAgent, text: str, state: dict, config: RunnableConfig, offline_esa: bool) -> dict:
    s = agent.services
    raw = " ".join(text.split())
    t = raw.lower().rstrip(".!?")

    def say(message: str, image: dict | None = None) -> dict:
        out = {"messages": [AIMessage(message)]}
        if image is not None:
            out["images"] = [image]
        return out

    if t in ("help", "?", "/help", "commands", "what can you do"):
        return say(OFFLINE_HELP)
    changes_graph = re.fullmatch(r"(?:add (?:an? |this |the )?(?:expert|lora|checkpoint|model)|(?:start|run|stop) (?:the )?"
                                 r"(?:background )?(?:gca|graph updates|crawler))\b.*", t)
    if changes_graph and role(config) != "admin":
        raise ChatError("adding experts and starting or stopping graph updates change the graph, which only an "
                        "admin session may do (log in with an admin key)")
    if t in ("status", "graph status", "/status", "gca status"):
        return say(describe_status(s.status()))
    if m := re.fullmatch(r"(?:explain|why)(?: (?:image )?#?(\d+)| (?:it|this|that|the last one|the last image))?", t):
        return say(describe_explanation(s.explain(ChatAgent._pick(state, int(m.group(1)) if m.group(1) else None))))
    if m := re.fullmatch(r"(?:search|find|look for)(?: (?:for )?experts?(?: for| about| with)?)? (.+)", raw, re.IGNORECASE):
        hits = s.search(m.group(1))
        if not hits:
            return say(f"No active expert matches '{m.group(1)}'.")
        return say(f"Experts for '{m.group(1)}':\n" + "\n".join(
            f"  {h['name']} [{h['id']}] {h['kind']}, similarity {h['similarity']:.2f}, commercial use "
            f"{ {True: 'yes', False: 'no', None: 'unknown'}[h['commercial_use']]}{', NSFW' if h['nsfw'] else ''}: "
            f"{h['description'][:120]}" for h in hits))
    if m := re.fullmatch(r"add (?:an? |this |the )?(?:expert|lora|checkpoint|model)(?: from| at)?:? (.+)", raw, re.IGNORECASE):
        result = s.add_expert(m.group(1))
        lines = [f"Crawled {result['source']}: {result['counts']}"]
        lines += [f"  {e['name']} [{e['id']}] {e['kind']} for {e['base_model']}: {e['status']}"
                  + (f" ({e['reason']})" if e["reason"] else "") for e in result["experts"]]
        lines += [f"  failure: {f}" for f in result["failures"]]
        return say("\n".join(lines))
    if m := re.fullmatch(r"(?:start|run) (?:the )?(?:background )?(?:gca|graph updates|crawler)(?: (?:on|for|from|over))?"
                         r"((?: [^ ]+?)*?)(?: every (\S+))?", raw.rstrip(".!?"), re.IGNORECASE):
        status = s.start_gca(m.group(1).split() or None, m.group(2) or "1h")
        return say(f"Background GCA started on {' '.join(status['sources'])}, a pass now and then every "
                   f"{status['interval_s']:.0f} s. Say 'stop gca' to stop it, 'status' to watch it.")
    if re.fullmatch(r"stop (?:the )?(?:background )?(?:gca|graph updates|crawler)", t):
        return say("Background GCA: " + s.stop_gca().get("message", "stopping"))
    if t in ("tools", "plugins", "list tools"):
        names = [f"  {tl.name}: {(tl.description or '').splitlines()[0][:100]}" for tl in agent.plugin_tools]
        return say("Plugin tools:\n" + "\n".join(names) if names else "No plugin tools are installed.")
    if m := re.fullmatch(r"(?:tool|run|use) (\w+)(?: (.*))?", raw, re.IGNORECASE):
        plugin = next((tl for tl in agent.plugin_tools if tl.name == m.group(1)), None)
        if plugin is not None:
            return say(f"{plugin.name}: {_call_plugin(plugin, m.group(2) or '')}")
    images = state.get("images", [])
    if refine.looks_like_refinement(raw):
        if not images:
            raise ChatError("there is no image to refine yet: describe one first, e.g. 'a pink circle'")
        target = images[-1]
        edit = refine.parse(raw, target)
        image = s.refine(target, edit, ChatAgent._folder(config), ChatAgent._next_n(state), offline=offline_esa)
        return say(describe_image(image), image)
    prompt = _VERB_LEAD.sub("", raw).strip() or raw
    n = ChatAgent._next_n(state)
    image = s.generate(prompt, seed=n - 1, folder=ChatAgent._folder(config), n=n, offline=offline_esa,
                       base_model=state.get("base_model"))
    return say(describe_image(image), image)


def _call_plugin(plugin, argument: str) -> str:
    args = plugin.args or {}
    try:
        if argument.strip().startswith("{"):
            result = plugin.invoke(json.loads(argument))
        elif len(args) == 1:
            result = plugin.invoke({next(iter(args)): argument})
        elif not args:
            result = plugin.invoke({})
        else:
            return f"it takes {', '.join(args)}: give them as JSON"
    except Exception as exc:
        return f"failed ({describe(exc, 200)})"
    return result if isinstance(result, str) else json.dumps(result, default=str)
