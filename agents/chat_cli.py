"""The terminal shells around the chat agent: `diffgraph chat` (a rich REPL) and
`diffgraph quickstart` (the whole offline demo in one command)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from diffgraph.settings import Settings, get_settings

QUIT = ("/quit", "/exit", "quit", "exit", ":q")
DEMO_PROMPT = "a pink circle on a striped white background, warm light"


def image_table(image: dict) -> Table:
    table = Table(title=f"image {image['n']} · seed {image['seed']}", title_justify="left", show_edge=False)
    for column in ("expert", "kind", "coefficient", "weight", "why"):
        table.add_column(column, overflow="fold")
    for e in image["experts"]:
        table.add_row(e.get("name") or e["id"], e["kind"], f"{e['coefficient']:.3f}", f"{e['weight']:.3f}",
                      e.get("reason") or "")
    if not image["experts"]:
        table.add_row("(base model only)", "", "", "", "")
    return table


def print_reply(console: Console, reply) -> None:
    console.print(reply.text, markup=False, highlight=False)
    for image in reply.images:
        console.print(image_table(image))
        console.print(f"[green]image:[/] {image['path']}")


def run_chat(thread: str = "default", console: Console | None = None, settings: Settings | None = None) -> None:
    """Chat until /quit or end of input; the thread (and its images) persists in DIFFGRAPH_HOME."""
    from .chat import ChatAgent

    console = console or Console()
    with ChatAgent(settings) as agent:
        brain = f"LLM at {agent.settings.llm_base_url}" if agent.brain == "llm" else "offline brain (no LLM configured)"
        console.print(f"[bold]DiffGraph chat[/] · thread [cyan]{thread}[/] · {brain} · home {agent.settings.home}")
        if agent.plugin_set and agent.plugin_set.plugins:
            console.print("plugin tools: " + ", ".join(p.name for p in agent.plugin_set.plugins))
        for error in agent.plugin_set.errors if agent.plugin_set else []:
            console.print(f"[yellow]plugin skipped:[/] {error}", markup=True, highlight=False)
        past = agent.history(thread)
        if past:
            console.print(f"[dim]resuming: {len(past)} messages, {len(agent.images(thread))} images so far; the last:[/]")
            for item in past[-2:]:
                console.print(f"[dim]{item['role']}:[/] " + item["content"][:300].replace("[", "\\["))
        console.print("Describe an image, refine the last one ('warmer', 'less of <expert>', 'a cat instead of a dog'), "
                      "or type 'help'. /quit leaves.")
        while True:
            try:
                text = console.input("[bold cyan]you>[/] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                break
            if text.strip().lower() in QUIT:
                break
            if not text.strip():
                continue
            with console.status("working…"):
                reply = agent.send(text, thread)
            print_reply(console, reply)


def run_quickstart(home: Path | None = None, prompt: str = DEMO_PROMPT, console: Console | None = None,
                   read_pages: bool | None = None) -> dict:
    """The offline demo end to end: crawl the mini world into ``home`` (a GCA pass: hub,
    downloads, homepages in Chromium, descriptions, calibration) unless its graph is built,
    answer ``prompt`` with an image, refine it once, and say how to open the UI."""
    from diffgraph.graph_store.store import GraphStore

    from .chat import ChatAgent
    from .gca import run_pass

    console = console or Console()
    settings = get_settings()
    if home is not None:
        settings = replace(settings, home=Path(home).expanduser().absolute())
    settings.home.mkdir(parents=True, exist_ok=True)
    with GraphStore.from_settings(settings) as store:
        active = len(store.catalog.list_experts(status="active"))
    if active == 0:
        if read_pages is None:
            read_pages = bool(shutil.which("chromium") or Path("/usr/bin/chromium").exists())
        console.print(f"[bold]1/3[/] crawling the mini world into {settings.home} (the Graph Construction Agent: hub, "
                      f"downloads, {'homepages in Chromium, ' if read_pages else ''}descriptions, calibration renders)…")
        result = run_pass(["miniworld"], settings=settings, console=console, read_pages=read_pages)
        console.print(f"graph built: {result['counts']}")
    else:
        console.print(f"[bold]1/3[/] the graph in {settings.home} holds {active} active experts (crawl again with "
                      "`diffgraph gca run --source miniworld`)")
    with ChatAgent(settings) as agent:
        console.print(f"[bold]2/3[/] asking the chat agent ({agent.brain} brain): {prompt}")
        first = agent.send(prompt, "quickstart")
        print_reply(console, first)
        follow = "warmer" if "warm" not in prompt else "use only two experts"
        console.print(f"[bold]3/3[/] refining it: {follow}")
        second = agent.send(follow, "quickstart")
        print_reply(console, second)
    env = "" if home is None else f"DIFFGRAPH_HOME={settings.home} "
    console.print("\n[bold]Next:[/]")
    console.print(f"  web UI and HTTP API:  {env}diffgraph serve   then open http://127.0.0.1:7860/")
    console.print(f"  terminal chat:        {env}diffgraph chat --thread quickstart")
    console.print(f"  OpenAI Images API:    curl -s http://127.0.0.1:7860/v1/images/generations -H 'content-type: "
                  "application/json' -d '{\"prompt\": \"a teal diamond on a mint background\"}'", markup=False)
    return {"home": str(settings.home), "images": [im["path"] for im in first.images + second.images]}
