"""The mini world's commands, added to `diffgraph` through the ``diffgraph.commands`` entry
points (pyproject.toml): ``diffgraph miniworld build | report | serve``.
Heavy imports stay inside the commands so that `diffgraph --help` answers at once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


app = typer.Typer(help="The bundled mini world: a small real text-to-image ecosystem for offline use.",
                  no_args_is_help=True)
console = Console()


@app.command("build")
def miniworld_build(
    out: Optional[Path] = typer.Option(None, help="Where to write the artifacts (default: the package's miniworld/artifacts)."),
    quick: bool = typer.Option(False, help="A minutes-long smoke build of poor quality that exercises every step."),
    only_scorers: bool = typer.Option(False, "--only-scorers", help="Retrain only the scorers of an existing build."),
    only_experts: bool = typer.Option(False, "--only-experts", help="Retrain only the experts of an existing build."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: one per core, up to 8); "
                                          "changes only the time, never the artifacts."),
) -> None:
    """Train the whole mini world from seeds (VAE, base, scorers, experts) in worker processes."""
    from .build import ARTIFACTS, BuildConfig, artifact_bytes, build, rebuild_experts, rebuild_scorers

    target = out or ARTIFACTS
    cfg = BuildConfig.quick() if quick else BuildConfig()
    if only_experts:
        rebuild_experts(target, cfg, console=console, workers=workers)
    if only_scorers:
        rebuild_scorers(target, cfg, console=console)
    if not (only_experts or only_scorers):
        build(target, cfg, console=console, workers=workers)
    console.print(f"artifacts: {artifact_bytes(target) / 1e6:.1f} MB")


@app.command("report")
def miniworld_report(
    samples: int = typer.Option(48, help="Prompts per expert."),
    doc: Path = typer.Option(Path("docs/miniworld"), help="Folder for report.json and grid.png."),
) -> None:
    """Measure the built mini world (scorer accuracy, base quality, per-expert skill gains)."""
    from .report import evaluate, markdown, write_json

    report = evaluate(n=samples, grid_path=doc / "grid.png", console=console)
    write_json(report, doc / "report.json")
    (doc / "tables.md").write_text(markdown(report) + "\n")
    console.print(markdown(report))
    console.print(f"[green]wrote[/] {doc / 'report.json'}, {doc / 'tables.md'} and {doc / 'grid.png'}")


@app.command("serve")
def miniworld_serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8765, help="Port to listen on."),
) -> None:
    """Serve the mini world's hub: Civitai- and Hugging Face-shaped APIs, homepages and files."""
    from .hub import serve

    console.print(f"mini-world hub on http://{host}:{port}  (Civitai API at /api/v1, HF API at /api/models)")
    serve(host=host, port=port)
