"""The `diffgraph` command line (typer + rich). A thin shell: every command calls one function
of the layers below and prints what it returned. Heavy imports stay inside commands so that
`diffgraph --help` answers at once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import diffgraph
from diffgraph.errors import reason
from diffgraph.registry import Registry
from diffgraph.settings import get_settings
from diffgraph.versions import library_versions

app = typer.Typer(help="DiffGraph: pick, weigh and merge community text-to-image experts for each prompt.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
graph_app = typer.Typer(help="The universal graph: status, reconcile, export and import.", no_args_is_help=True)
app.add_typer(graph_app, name="graph")
planner_app = typer.Typer(help="The VGAE merging planner.", no_args_is_help=True)
app.add_typer(planner_app, name="planner")
gca_app = typer.Typer(help="The Graph Construction Agent: crawl sources into the universal graph.", no_args_is_help=True)
app.add_typer(gca_app, name="gca")
export_app = typer.Typer(help="What DiffGraph made, for AUTOMATIC1111 / Forge / ComfyUI.", no_args_is_help=True)
app.add_typer(export_app, name="export")
console = Console()
BASE_HELP = ("Base model to work with (default: DIFFGRAPH_BASE, else the only base the graph holds experts of, "
             "else the only one installed).")


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
def demo(
    out: Optional[Path] = typer.Option(None, help="Folder for the images (default: DIFFGRAPH_HOME/outputs/demo)."),
    seed: int = typer.Option(7, help="Seed of the first image."),
    base_model: Optional[str] = typer.Option(None, help=BASE_HELP),
) -> None:
    """The demo: crawl the base's own sources into a graph if it is empty (the mini world's hub when
    nothing else is configured), then answer its demo prompts with merged experts, beside the base."""
    from diffgraph.agents.demo import run_demo

    settings = get_settings()
    try:
        result = run_demo(settings, out or settings.artifacts_dir / "demo", console=console, seed=seed,
                          base_model=base_model)
    except (ValueError, KeyError, RuntimeError) as exc:
        _fail(reason(exc))
    console.print(f"3. [green]base vs DiffGraph grid:[/] {result['grid']}")
    console.print("   talk to it: [bold]diffgraph chat[/]   or open the UI: [bold]diffgraph serve[/] (http://127.0.0.1:7860)")


@app.command()
def info() -> None:
    """Show the settings in effect (from DIFFGRAPH_* environment variables) and the versions of
    the libraries that results depend on."""
    import os

    from diffgraph.families import lookup
    from diffgraph.tools import bases

    s = get_settings()
    for key in ("home", "base", "llm_base_url", "llm_model", "llm_timeout", "llm_retries", "chroma_url", "db_url",
                "ray_address", "ray_workers", "device", "allow_pickle", "page_hosts"):
        value = getattr(s, key)
        console.print(f"[bold]{key}[/]: {value if value not in (None, '') else '[dim]unset[/]'}")
    console.print(f"[bold]metrics_dir[/] (DIFFGRAPH_METRICS_DIR, the real metric suite's weights): "
                  f"{os.environ.get('DIFFGRAPH_METRICS_DIR') or '[dim]unset[/]'}")
    console.print("[bold]bases[/] (--base-model, the API's model, DIFFGRAPH_BASE):")
    for name in bases.known():
        family = lookup(name)
        setting = f"DIFFGRAPH_BASE_{name.upper()}" if name in bases.REAL_FAMILIES else None
        try:
            bases.check_ready(name)
            state = "[green]ready[/]"
        except bases.BaseNotReady as exc:
            state = f"[yellow]not ready[/]: {escape(str(exc))}"
        written = f"; also written {', '.join(family.examples)}" if family and family.examples else ""
        where = f"; {setting}={os.environ.get(setting) or 'unset'}" if setting else ""
        console.print(f"  {name} ({family.label if family else name}): {state}{where}{written}")
    versions = library_versions()
    console.print("[bold]versions[/]: " + ", ".join(f"{name} {v or '[red]not installed[/]'}" for name, v in versions.items()))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the image should show."),
    seed: int = typer.Option(0, help="Seed of the render."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: DIFFGRAPH_HOME/outputs/images/...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    base_model: Optional[str] = typer.Option(None, help=BASE_HELP),
) -> None:
    """Prompt in, image out: select experts (ESA), plan coefficients (VGAE), merge and render."""
    import json

    from diffgraph.agents.chat_cli import experts_table
    from diffgraph.agents.generate import EmptyPrompt, generate as run

    try:
        result = run(prompt, seed=seed, out=out, base_model=base_model)
    except (EmptyPrompt, ValueError, KeyError) as exc:
        _fail(reason(exc))
    if as_json:
        print(json.dumps(result.to_dict(), indent=1, default=str))
        return
    console.print(f"[bold]{result.prompt}[/]  (base: {result.base_model}, brain: {result.brain}, planner: {result.planner})")
    console.print(experts_table(f"seed {result.seed}", result.to_dict()["experts"]))
    for note in result.notes:
        console.print(f"  [yellow]{note}")
    console.print(f"[green]image:[/] {result.image}")


@app.command()
def render(
    recipe: Path = typer.Option(..., "--recipe", help="A PNG, a recipe JSON or a merged .safetensors written by DiffGraph."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
) -> None:
    """Replay a recipe (from a PNG's metadata, JSON or a merged file) bit for bit on this machine."""
    from diffgraph.tools.export import ExportError, load_recipe
    from diffgraph.tools.render import render_recipe

    try:
        parsed = load_recipe(recipe)
    except ExportError as exc:
        _fail(str(exc))
    result = render_recipe(parsed, out)
    console.print(f"[green]image:[/] {result['path']}")


@export_app.command("a1111")
def export_a1111(
    image: Path = typer.Argument(..., help="A PNG (or recipe JSON, or merged .safetensors) written by DiffGraph."),
) -> None:
    """Print the A1111 prompt: <lora:FILE:weight> tags named by your files, the parameters line,
    and '#' comments on rebuilding the checkpoint merge (paste into A1111, press the arrow)."""
    from diffgraph.graph_store.store import GraphStore
    from diffgraph.tools.export import ExportError, a1111_prompt

    try:
        with GraphStore.from_settings(get_settings()) as store:
            print(a1111_prompt(image, store).text)
    except ExportError as exc:
        _fail(str(exc))


@export_app.command("checkpoint")
def export_checkpoint_cmd(
    source: Path = typer.Argument(..., help="A PNG, recipe JSON or merged .safetensors written by DiffGraph."),
    out: Path = typer.Option(..., "--out", help="The .safetensors to write."),
    half: bool = typer.Option(False, "--half", help="Store fp16 weights (half the size; what most shared checkpoints use)."),
) -> None:
    """Write the merged model (checkpoints and LoRAs) as one single file A1111 and ComfyUI load."""
    from diffgraph.merger.merge import MergeError
    from diffgraph.tools.export import ExportError, export_checkpoint

    try:
        path = export_checkpoint(source, out, half=half)
    except (ExportError, MergeError, KeyError, OSError) as exc:
        _fail(reason(exc))
    console.print(f"[green]checkpoint:[/] {path} ({path.stat().st_size / 1e6:.1f} MB)")


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
    """Find (and repair) drift between the catalog and the vector store. A local vector store that
    cannot be read back is first set aside and then rebuilt from the catalog (graph_store/vector_recovery.py)."""
    from diffgraph.graph_store.reconcile import reconcile
    from diffgraph.graph_store.store import GraphStore, vectors_path
    from diffgraph.graph_store.vector_recovery import recover

    settings = get_settings()
    recovery = {"unreadable": None, "set_aside": None}
    if not settings.chroma_url:
        with console.status("reading the vector store back"):
            recovery = recover(vectors_path(settings.home), repair=not dry_run)
    if recovery["unreadable"] and dry_run:
        console.print(f"the vector store cannot be read: {escape(recovery['unreadable'])}; reconcile (without --dry-run) "
                      "sets it aside and rebuilds it from the catalog")
        raise typer.Exit(1)
    if recovery["set_aside"]:
        console.print(f"the vector store could not be read ({escape(recovery['unreadable'])}); set aside as "
                      f"{escape(recovery['set_aside'])}, rebuilding it from the catalog")
    with GraphStore.from_settings(settings) as store, console.status("reconciling the catalog and the vectors"):
        report = reconcile(store, repair=not dry_run)
    console.print({**report, **({"rebuilt_from_catalog": recovery["set_aside"]} if recovery["set_aside"] else {})})


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
    steps: int = typer.Option(60, help="REINFORCE steps (--prompts-per-step prompts x 4 coefficient draws each), "
                              "or distil epochs."),
    prompts_per_step: int = typer.Option(16, help="Prompts per step; each costs 4 renders. Fewer prompts per step "
                                         "are cheaper but noisier steps."),
    prompts: int = typer.Option(48, help="Training prompts (disjoint from the reference prompts)."),
    seed: int = typer.Option(0, help="Seed of the training run."),
    trainer: str = typer.Option("reinforce", help="reinforce (the paper's policy gradient) or distil (fit to the "
                                "coefficients a search finds for each training prompt; benchmarks/RESULTS.md "
                                "compares the two)."),
    target_renders: Optional[int] = typer.Option(None, min=2, help="distil: renders the search spends per training "
                                                 "prompt (default: planner.search.SEARCH_RENDERS, 128)."),
    base_model: Optional[str] = typer.Option(None, help=BASE_HELP),
) -> None:
    """Train the planner on rendered-and-scored merges; saves a checkpoint."""
    from diffgraph.agents.planner_training import train_planner

    try:
        result = train_planner(base_model, steps=steps, prompts=prompts, seed=seed, prompts_per_step=prompts_per_step,
                               trainer=trainer, target_renders=target_renders, console=console)
    except (KeyError, ValueError) as exc:  # no such base, several and none named, too few prompts
        _fail(reason(exc))
    h = result["history"]
    k = max(1, len(h) // 5)
    what, unit = ("mean reward", "steps") if trainer == "reinforce" else ("loss", "epochs")
    console.print(f"{what}: first {k} {unit} {sum(h[:k]) / k:.4f} -> last {k} {unit} {sum(h[-k:]) / k:.4f}")
    if result["validation"]:
        best = max(result["validation"], key=lambda v: v[1])
        console.print(f"validation reward: {result['validation'][0][1]:.4f} untrained, {best[1]:.4f} kept "
                      f"({unit[:-1]} {best[0]})")
    console.print(f"[green]checkpoint:[/] {result['checkpoint']}")


@gca_app.command("run")
def gca_run(
    source: list[str] = typer.Option(..., "--source", help="civitai[:URL][?SCOPE], hf[:URL][?SCOPE], local:DIR, url:PAGE, file:PATH or a kind a plugin adds (repeatable); SCOPE in the site's query words, e.g. civitai?types=LORA&baseModels=SD 1.5&sort=Most Downloaded&limit=500."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Describe from API fields only (no Chromium)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many experts from each Civitai / Hugging Face source."),
    types: Optional[str] = typer.Option(None, help="Civitai model types, comma-separated (LORA,LoCon,Checkpoint)."),
    base_models: Optional[str] = typer.Option(None, help="Civitai base models, comma-separated, as Civitai spells them (SD 1.5,SDXL 1.0,Pony)."),
    sort: Optional[str] = typer.Option(None, help="Listing order: Civitai's (Newest, Most Downloaded, Highest Rated) or the Hub's (downloads, likes, lastModified)."),
    nsfw: bool = typer.Option(False, "--nsfw", help="Also list models their site marks NSFW (default: SFW only)."),
    since: Optional[str] = typer.Option(None, help="Only versions published or updated at or after this ISO date (2024-06-01)."),
    licence: Optional[str] = typer.Option(None, help="Only experts whose licence grants these, comma-separated: commercial, derivatives, no-credit, relicense."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List only: print how many experts, files and bytes the pass would fetch."),
) -> None:
    """One pass: discover, read homepages, describe, register, calibrate; resumes a killed pass.

    Exit code 1 if a source could not be listed (after the others are crawled and stored):
    the graph is stale for that source, and cron, systemd or CI must notice.
    A rejected or failed expert is not an error: it is recorded with its reason and retried later."""
    from diffgraph.agents.gca import GCABusy, preview_pass, run_pass
    from diffgraph.tools.sources.spec import parse_source_spec, with_scope

    try:
        specs = [str(with_scope(parse_source_spec(s), limit=str(limit) if limit else None, types=types,
                                baseModels=base_models, sort=sort, nsfw="true" if nsfw else None, since=since,
                                licence=licence)) for s in source]
        if dry_run:
            for line in preview_pass(specs):
                console.print(line)
            return
        result = run_pass(specs, console=console, read_pages=not no_browser)
    except (GCABusy, ValueError) as exc:
        _fail(reason(exc))
    console.print(result["counts"])
    for failure in result["failures"]:
        console.print(f"  [yellow]{failure}")
    for error in result["source_errors"]:
        console.print(f"[red]error:[/] {escape(error)}")
    if result["source_errors"]:
        raise typer.Exit(1)


@gca_app.command("retry")
def gca_retry(
    expert_ids: Optional[list[str]] = typer.Argument(None, help="Expert ids (as `graph status` lists them)."),
    every: bool = typer.Option(False, "--all", help="Every failed or rejected expert, quarantined ones included."),
) -> None:
    """Send failed (quarantined ones too) and rejected experts back to pending: the next pass works on them again."""
    from diffgraph.graph_store.store import GraphStore

    if not expert_ids and not every:
        _fail("name the experts to retry, or --all")
    try:
        with GraphStore.from_settings() as store:
            done = store.retry(None if every else expert_ids)
    except KeyError as exc:
        _fail(reason(exc))
    console.print(f"{len(done)} experts back to pending" + (f": {', '.join(done)}" if done else "")
                  + "; the next `gca run` works on them")


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
def chat(thread: str = typer.Option("default", "--thread", help="Conversation to start or resume (kept in DIFFGRAPH_HOME)."),
         base_model: Optional[str] = typer.Option(None, help=BASE_HELP)) -> None:
    """Chat with the agent in the terminal: ask for images, refine them, explain, search, add experts."""
    from diffgraph.agents.chat_cli import run_chat

    run_chat(thread, console, base_model=base_model)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    max_active: int = typer.Option(1, min=1, help="API image requests in progress at a time. 1: answered in arrival "
                                   "order; 2: the next selects its experts while one renders (more throughput; "
                                   "requests in progress together may finish out of order)."),
    base_model: Optional[str] = typer.Option(None, help=BASE_HELP + " A request's model field overrides it."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve a non-loopback address without "
                                          "DIFFGRAPH_API_KEYS (anyone who reaches the port may render; nobody may "
                                          "change the graph)."),
) -> None:
    """Web chat UI (Gradio) at / and the HTTP API (/v1/images/generations, OpenAI-compatible) on one server.

    With DIFFGRAPH_API_KEYS ("KEY" to render, "KEY:admin" to also change the graph), the API takes
    'Authorization: Bearer KEY' and the UI a login (user generate or admin, the key as password)."""
    from diffgraph.agents.auth import AuthConfigError
    from diffgraph.agents.server import ServeRefused
    from diffgraph.agents.server import serve as run

    try:
        run(host=host, port=port, console=console, max_active=max_active, base_model=base_model,
            insecure_no_auth=insecure_no_auth)
    except (ServeRefused, AuthConfigError) as exc:
        _fail(reason(exc))


def _check_command(obj: object):
    if not (isinstance(obj, typer.Typer) or callable(obj)):
        raise TypeError(f"a diffgraph.commands entry point must name a typer.Typer or a function, not {type(obj).__name__}")
    return obj


COMMANDS = Registry("diffgraph.commands", "command", _check_command)
for _name in COMMANDS.names():  # commands other packages add (the mini world's `miniworld ...`)
    _command = COMMANDS.get(_name)
    if isinstance(_command, typer.Typer):
        app.add_typer(_command, name=_name)
    else:
        app.command(_name)(_command)


if __name__ == "__main__":  # pragma: no cover
    app()
