"""The `diffgraph` command line (typer + rich). A thin shell: every command calls one function
of the layers below and prints what it returned. Heavy imports stay inside commands so that
`diffgraph --help` answers at once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import diffgraph
from diffgraph.settings import get_settings
from diffgraph.versions import library_versions

app = typer.Typer(help="DiffGraph: pick, weigh and merge community text-to-image experts for each prompt.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
miniworld_app = typer.Typer(help="The bundled mini world: a small real text-to-image ecosystem for offline use.",
                            no_args_is_help=True)
app.add_typer(miniworld_app, name="miniworld")
graph_app = typer.Typer(help="The universal graph: status, reconcile, export and import.", no_args_is_help=True)
app.add_typer(graph_app, name="graph")
planner_app = typer.Typer(help="The VGAE merging planner.", no_args_is_help=True)
app.add_typer(planner_app, name="planner")
gca_app = typer.Typer(help="The Graph Construction Agent: crawl sources into the universal graph.", no_args_is_help=True)
app.add_typer(gca_app, name="gca")
console = Console()


def _quiet_libraries() -> None:
    """transformers/diffusers print load reports for every adapter; the CLI shows its own."""
    import logging

    for name in ("transformers", "diffusers", "httpx", "chromadb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def _parse_interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"interval like 30m, 1h or 3600, not {text!r}") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"diffgraph {diffgraph.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """DiffGraph command line."""
    _quiet_libraries()


@app.command()
def info() -> None:
    """Show the settings in effect (from DIFFGRAPH_* environment variables) and the versions of
    the libraries that results depend on."""
    s = get_settings()
    for key in ("home", "llm_base_url", "llm_model", "chroma_url", "db_url", "ray_address", "ray_workers", "device",
                "allow_pickle"):
        value = getattr(s, key)
        console.print(f"[bold]{key}[/]: {value if value not in (None, '') else '[dim]unset[/]'}")
    versions = library_versions()
    console.print("[bold]versions[/]: " + ", ".join(f"{name} {v or '[red]not installed[/]'}" for name, v in versions.items()))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Folder for the images (default: DIFFGRAPH_HOME/outputs/demo)."),
    seed: int = typer.Option(7, help="Seed of the first image."),
) -> None:
    """Offline demo: crawl the mini world into a graph, then answer prompts with merged experts."""
    from diffgraph.miniworld.demo import run_demo

    settings = get_settings()
    result = run_demo(settings, out or settings.artifacts_dir / "demo", console=console, seed=seed)
    console.print(f"3. [green]base vs DiffGraph grid:[/] {result['grid']}")
    console.print("   talk to it: [bold]diffgraph chat[/]   or open the UI: [bold]diffgraph serve[/] (http://127.0.0.1:7860)")


@miniworld_app.command("build")
def miniworld_build(
    out: Optional[Path] = typer.Option(None, help="Where to write the artifacts (default: the package's miniworld/artifacts)."),
    quick: bool = typer.Option(False, help="A minutes-long smoke build of poor quality that exercises every step."),
    only_scorers: bool = typer.Option(False, "--only-scorers", help="Retrain only the scorers of an existing build."),
    only_experts: bool = typer.Option(False, "--only-experts", help="Retrain only the experts of an existing build."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: one per core, up to 8); "
                                          "changes only the time, never the artifacts."),
) -> None:
    """Train the whole mini world from seeds (VAE, base, scorers, experts) in worker processes."""
    from diffgraph.miniworld.build import ARTIFACTS, BuildConfig, artifact_bytes, build, rebuild_experts, rebuild_scorers

    target = out or ARTIFACTS
    cfg = BuildConfig.quick() if quick else BuildConfig()
    if only_experts:
        rebuild_experts(target, cfg, console=console, workers=workers)
    if only_scorers:
        rebuild_scorers(target, cfg, console=console)
    if not (only_experts or only_scorers):
        build(target, cfg, console=console, workers=workers)
    console.print(f"artifacts: {artifact_bytes(target) / 1e6:.1f} MB")


@miniworld_app.command("report")
def miniworld_report(
    samples: int = typer.Option(48, help="Prompts per expert."),
    doc: Path = typer.Option(Path("docs/miniworld"), help="Folder for report.json and grid.png."),
) -> None:
    """Measure the built mini world (scorer accuracy, base quality, per-expert skill gains)."""
    from diffgraph.miniworld.report import evaluate, markdown, write_json

    report = evaluate(n=samples, grid_path=doc / "grid.png", console=console)
    write_json(report, doc / "report.json")
    (doc / "tables.md").write_text(markdown(report) + "\n")
    console.print(markdown(report))
    console.print(f"[green]wrote[/] {doc / 'report.json'}, {doc / 'tables.md'} and {doc / 'grid.png'}")


@miniworld_app.command("serve")
def miniworld_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8765, help="Port to listen on."),
) -> None:
    """Serve the mini world's hub: Civitai- and Hugging Face-shaped APIs, homepages and files."""
    from diffgraph.miniworld.hub import serve

    console.print(f"mini-world hub on http://{host}:{port}  (Civitai API at /api/v1, HF API at /api/models)")
    serve(host=host, port=port)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the image should show."),
    seed: int = typer.Option(0, help="Seed of the render."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: DIFFGRAPH_HOME/outputs/images/...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    base_model: str = typer.Option("miniworld-sd", help="Base-model family to generate with."),
) -> None:
    """Prompt in, image out: select experts (ESA), plan coefficients (VGAE), merge and render."""
    import json

    from diffgraph.agents.generate import EmptyPrompt, generate as run

    try:
        result = run(prompt, seed=seed, out=out, base_model=base_model)
    except (EmptyPrompt, ValueError, KeyError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if as_json:
        print(json.dumps(result, indent=1, default=str))
        return
    console.print(f"[bold]{result['prompt']}[/]  (brain: {result['brain']}, planner: {result['planner']})")
    if not result["experts"]:
        console.print("  no expert fits better than the base model")
    for e in result["experts"]:
        console.print(f"  {e['kind']:4} {e['id']:32} coefficient {e['coefficient']:.3f} -> weight {e['weight']:.3f}  {e['reason']}")
    for note in result["notes"]:
        console.print(f"  [yellow]{note}")
    console.print(f"[green]image:[/] {result['image']}")


@app.command()
def render(
    recipe: Path = typer.Option(..., "--recipe", help="A recipe JSON file or a PNG written by DiffGraph."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Replay a recipe (from JSON or from a PNG's metadata) bit for bit on this machine."""
    import json

    from diffgraph.merger.png import read_recipe
    from diffgraph.merger.recipe import MergeRecipe
    from diffgraph.tools.render import render_recipe

    try:
        if recipe.suffix.lower() == ".png":
            parsed = read_recipe(recipe)
        else:
            data = json.loads(recipe.read_text())
            parsed = MergeRecipe.from_dict(data.get("recipe", data))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        _fail(f"cannot read a recipe: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    result = render_recipe(parsed, out)
    console.print(f"[green]image:[/] {result['path']}")


@graph_app.command("status")
def graph_status_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Experts by kind/base/status, reference prompts, calibration edges, last run, failures."""
    import json

    from diffgraph.graph_store.status import graph_status, render_status
    from diffgraph.graph_store.store import GraphStore

    with GraphStore.from_settings() as store:
        status = graph_status(store)
    if as_json:
        print(json.dumps(status, indent=1, default=str))
    else:
        console.print(render_status(status))


@graph_app.command("reconcile")
def graph_reconcile(dry_run: bool = typer.Option(False, "--dry-run", help="Report drift without repairing it.")) -> None:
    """Find (and repair) drift between the catalog and the vector store."""
    from diffgraph.graph_store.reconcile import reconcile
    from diffgraph.graph_store.store import GraphStore

    with GraphStore.from_settings() as store:
        report = reconcile(store, repair=not dry_run)
    console.print(report)


@graph_app.command("export")
def graph_export(directory: Path = typer.Argument(..., help="Folder to write (COO edges, .npz features, manifest).")) -> None:
    """Export the graph in the paper's format (COO edge index + .npz features + JSON manifest)."""
    from diffgraph.graph_store.export import export_graph
    from diffgraph.graph_store.store import GraphStore

    with GraphStore.from_settings() as store:
        manifest = export_graph(store, directory)
    console.print(f"exported {len(manifest.get('experts', []))} experts to {directory}")


@graph_app.command("import")
def graph_import(directory: Path = typer.Argument(..., help="A folder written by `graph export`.")) -> None:
    """Import an exported graph into an empty DIFFGRAPH_HOME."""
    from diffgraph.graph_store.export import import_graph

    s = get_settings()
    console.print(import_graph(directory, s.home, db_url=s.db_url, chroma_url=s.chroma_url))


@planner_app.command("train")
def planner_train(
    steps: int = typer.Option(60, help="REINFORCE steps (4 prompts x 4 coefficient draws each)."),
    prompts: int = typer.Option(48, help="Training prompts (disjoint from the reference prompts)."),
    seed: int = typer.Option(0, help="Seed of the training run."),
    base_model: str = typer.Option("miniworld-sd", help="Base-model family whose experts are planned."),
) -> None:
    """Train the planner with REINFORCE on rendered-and-scored merges; saves a checkpoint."""
    from diffgraph.agents.planner_training import train_planner

    result = train_planner(base_model, steps=steps, prompts=prompts, seed=seed, console=console)
    h = result["history"]
    k = max(1, len(h) // 5)
    console.print(f"mean reward: first {k} steps {sum(h[:k]) / k:.4f} -> last {k} steps {sum(h[-k:]) / k:.4f}")
    console.print(f"[green]checkpoint:[/] {result['checkpoint']}")


@gca_app.command("run")
def gca_run(
    source: list[str] = typer.Option(..., "--source", help="civitai[:URL], hf[:URL], local:DIR or miniworld (repeatable)."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Describe from API fields only (no Chromium)."),
) -> None:
    """One pass: discover, read homepages, describe, register, calibrate; resumes a killed pass.

    Exit code 1 if a source could not be listed (after the others are crawled and stored):
    the graph is stale for that source, and cron, systemd or CI must notice.
    A rejected or failed expert is not an error: it is recorded with its reason and retried later."""
    from rich.markup import escape

    from diffgraph.agents.gca import GCABusy, run_pass

    try:
        result = run_pass(source, console=console, read_pages=not no_browser)
    except GCABusy as exc:
        _fail(str(exc))
    console.print(result["counts"])
    for failure in result["failures"]:
        console.print(f"  [yellow]{failure}")
    for error in result["source_errors"]:
        console.print(f"[red]error:[/] {escape(error)}")
    if result["source_errors"]:
        raise typer.Exit(1)


@gca_app.command("watch")
def gca_watch(
    source: list[str] = typer.Option(..., "--source", help="Source spec(s), as for `gca run`."),
    interval: str = typer.Option("1h", help="Time between passes: 30m, 1h, 1d or seconds."),
    passes: int = typer.Option(0, help="Stop after this many passes (0: run until stopped)."),
) -> None:
    """Keep the graph current in the background: a pass every INTERVAL; failures retried later."""
    from diffgraph.agents.gca import watch

    watch(source, _parse_interval(interval), passes=passes, console=console)


@app.command()
def chat(thread: str = typer.Option("default", "--thread", help="Conversation to start or resume (kept in DIFFGRAPH_HOME).")) -> None:
    """Chat with the agent in the terminal: ask for images, refine them, explain, search, add experts."""
    from diffgraph.agents.chat_cli import run_chat

    run_chat(thread, console)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    max_active: int = typer.Option(1, min=1, help="API image requests in progress at a time. 1: answered in arrival "
                                   "order; 2: the next selects its experts while one renders (more throughput; "
                                   "requests in progress together may finish out of order)."),
) -> None:
    """Web chat UI (Gradio) at / and the HTTP API (/v1/images/generations, OpenAI-compatible) on one server."""
    from diffgraph.agents.server import serve as run

    run(host=host, port=port, console=console, max_active=max_active)


if __name__ == "__main__":  # pragma: no cover
    app()
