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

app = typer.Typer(help="DiffGraph: pick, weigh and merge community text-to-image experts for each prompt.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
miniworld_app = typer.Typer(help="The bundled mini world: a small real text-to-image ecosystem for offline use.",
                            no_args_is_help=True)
app.add_typer(miniworld_app, name="miniworld")
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"diffgraph {diffgraph.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """DiffGraph command line."""


@app.command()
def info() -> None:
    """Show the settings in effect (from DIFFGRAPH_* environment variables)."""
    s = get_settings()
    for key in ("home", "llm_base_url", "llm_model", "chroma_url", "db_url", "ray_address", "device", "allow_pickle"):
        value = getattr(s, key)
        console.print(f"[bold]{key}[/]: {value if value not in (None, '') else '[dim]unset[/]'}")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Folder for the images (default: DIFFGRAPH_HOME/outputs/demo)."),
    seed: int = typer.Option(7, help="Seed of the first image."),
) -> None:
    """Offline demo on the mini world: render prompts with the base model and with experts."""
    from diffgraph.miniworld.demo import run_demo

    folder = out or get_settings().artifacts_dir / "demo"
    result = run_demo(folder, seed=seed, console=console)
    console.print(f"[green]grid:[/] {result['grid']}")
    for path in result["images"]:
        console.print(f"  {path}")


@miniworld_app.command("build")
def miniworld_build(
    out: Optional[Path] = typer.Option(None, help="Where to write the artifacts (default: the package's miniworld/artifacts)."),
    quick: bool = typer.Option(False, help="A minutes-long smoke build of poor quality that exercises every step."),
) -> None:
    """Train the whole mini world from seeds (base, experts, scorers): about 50 minutes on 2 CPU cores."""
    from diffgraph.miniworld.build import ARTIFACTS, BuildConfig, artifact_bytes, build

    target = out or ARTIFACTS
    build(target, BuildConfig.quick() if quick else BuildConfig(), console=console)
    console.print(f"artifacts: {artifact_bytes(target) / 1e6:.1f} MB")


@miniworld_app.command("report")
def miniworld_report(
    samples: int = typer.Option(48, help="Prompts per expert."),
    doc: Path = typer.Option(Path("docs/miniworld"), help="Folder for report.json and grid.png."),
) -> None:
    """Measure the built mini world (scorer accuracy, base quality, per-expert skill gains)."""
    from diffgraph.miniworld.report import evaluate, write_json

    report = evaluate(n=samples, grid_path=doc / "grid.png", console=console)
    write_json(report, doc / "report.json")
    console.print(f"[green]wrote[/] {doc / 'report.json'} and {doc / 'grid.png'}")


@miniworld_app.command("serve")
def miniworld_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8765, help="Port to listen on."),
) -> None:
    """Serve the mini world's hub: Civitai- and Hugging Face-shaped APIs, homepages and files."""
    from diffgraph.miniworld.hub import serve

    console.print(f"mini-world hub on http://{host}:{port}  (Civitai API at /api/v1, HF API at /api/models)")
    serve(host=host, port=port)


if __name__ == "__main__":  # pragma: no cover
    app()
