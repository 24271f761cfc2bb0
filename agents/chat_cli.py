"""`diffgraph chat`: the chat agent in the terminal (a rich REPL; images saved under
DIFFGRAPH_HOME with their paths shown; `--thread NAME` resumes a conversation)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from diffgraph.settings import Settings

from .chat import ChatAgent
from .generate import ROW_HEADERS, expert_rows

QUIT = ("/quit", "/exit", "quit", "exit", ":q")


def experts_table(title: str, experts: list[dict]) -> Table:
    """An image's experts as a rich table (``diffgraph generate`` and the terminal chat)."""
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in ROW_HEADERS:
        table.add_column(column, overflow="fold")
    for row in expert_rows(experts):
        table.add_row(*row)
    if not experts:
        table.add_row("(base model only)", "", "", "", "")
    return table


def print_reply(console: Console, reply) -> None:
    console.print(reply.text, markup=False, highlight=False)
    for image in reply.images:
        console.print(experts_table(f"image {image['n']} · seed {image['seed']}", image["experts"]))
        console.print(f"[green]image:[/] {image['path']}")


def run_chat(thread: str = "default", console: Console | None = None, settings: Settings | None = None,
             base_model: str | None = None) -> None:
    """Chat until /quit or end of input; the thread (and its images) persists in DIFFGRAPH_HOME."""

    console = console or Console()
    with ChatAgent(settings, base_model=base_model) as agent:
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
