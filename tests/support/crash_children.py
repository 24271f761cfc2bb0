"""Processes that tests/test_crash.py kills with SIGKILL: each does real work in a loop (a GCA
pass, graph exports, image generation through the HTTP API's code, chat turns) and logs its
progress to a file the test watches.

They are started from a forkserver that has already imported torch, diffusers, Chroma and
LangGraph, so a child is working within a second instead of after a fresh interpreter's imports.
Each child first makes itself the leader of a new process group (``os.setsid``), so the test
kills exactly it and whatever it started (Chromium, Playwright's driver) with one ``killpg``,
and nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

PRELOAD = [
    "torch", "diffusers", "chromadb", "langgraph.checkpoint.sqlite", "langchain_core.messages",
    "playwright.async_api", "PIL.Image", "diffgraph.agents.gca", "diffgraph.agents.chat", "diffgraph.agents.server",
    "diffgraph.graph_store.export", "diffgraph.merger.engine", "diffgraph.tools.render", "diffgraph.tools.browser",
    "diffgraph.planner.checkpoint",
]


def _start(log: str):
    """New process group; quiet, single-threaded torch; the log file, line-buffered."""
    os.setsid()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(1)
    out = open(log, "a", buffering=1)
    sys.stdout = sys.stderr = out
    return out


def die_inside_write(after: int, cut: float, out) -> None:
    """Make this process SIGKILL its own group in the middle of a file write: the ``after``-th
    write through diffgraph.files (0 = the first) stops after ``cut`` of its bytes, flushed to
    the file, and the process dies there. A kill at an exact, seeded point inside a write."""
    from diffgraph import files

    real_fdopen = os.fdopen
    count = {"n": 0}

    class Cut:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            keep = int(len(data) * cut)
            self.f.write(data[:keep])
            self.f.flush()
            os.fsync(self.f.fileno())
            out.write(f"dying inside a write after {keep} of {len(data)} bytes\n")
            out.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        count["n"] += 1
        return Cut(f) if count["n"] == after + 1 else f

    files.os = _Proxy(os, fdopen=fdopen)


class _Proxy:
    """``os`` with some functions replaced (for one module only)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def _settings(home: str, **kw):
    from diffgraph.settings import Settings

    return Settings(home=Path(home), reference_prompts=3, **kw)


def gca(home: str, specs: list[str], die_before_first_checkpoint: bool, log: str) -> None:
    """One GCA pass (resuming an interrupted one). With ``die_before_first_checkpoint`` the
    process SIGKILLs its own group the moment the pass would start running the graph: after
    the run is recorded, before LangGraph has written anything."""
    out = _start(log)
    from rich.console import Console

    from diffgraph.agents import gca as gca_module

    if die_before_first_checkpoint:
        real_build = gca_module.build_graph

        def build_graph(checkpointer=None):
            graph = real_build(checkpointer)

            class Dying:
                def __getattr__(self, name):
                    return getattr(graph, name)

                def invoke(self, *args, **kwargs):
                    out.write("dying before the first checkpoint\n")
                    out.flush()
                    os.killpg(os.getpgid(0), signal.SIGKILL)

            return Dying()

        gca_module.build_graph = build_graph
    out.write("ready\n")
    result = gca_module.run_pass(specs, settings=_settings(home), console=Console(file=out, width=200))
    out.write(f"pass done {result['counts']}\n")


def export(home: str, directory: str, cut: tuple[int, float] | None, log: str) -> None:
    """Export the graph to ``directory`` again and again (with ``cut`` = (after, fraction): die
    inside that file write, see die_inside_write)."""
    out = _start(log)
    if cut is not None:
        die_inside_write(*cut, out)
    from diffgraph.graph_store.export import export_graph
    from diffgraph.graph_store.store import GraphStore

    with GraphStore.open(Path(home)) as store:
        out.write("ready\n")
        n = 0
        while True:
            export_graph(store, Path(directory))
            n += 1
            out.write(f"export {n}\n")


def images(home: str, log: str, side: int = 1024) -> None:
    """Images through the HTTP API's own code path (ImageAPI.generate: ESA, planner, merge,
    render, PNG, then the resize to the requested size written over it), one after another."""
    out = _start(log)
    from diffgraph.agents.chat import ChatServices
    from diffgraph.agents.server import ImageAPI

    api = ImageAPI(ChatServices(_settings(home)))
    out.write("ready\n")
    seed = int(time.time() * 1000) % 100_000
    while True:
        for image in api.generate("a pink circle on a striped white background", 1, seed, (side, side)):
            out.write(f"image {image['id']}\n")
        seed += 1


def chat(home: str, thread: str, start: int, log: str) -> None:
    """Chat turns of one thread with the offline brain, each asking for a numbered image."""
    out = _start(log)
    from diffgraph.agents.chat import ChatAgent

    with ChatAgent(_settings(home), llm=None, use_plugins=False) as agent:
        out.write("ready\n")
        n = start
        while True:
            reply = agent.send(f"a pink circle on a striped white background, number {n}", thread=thread)
            out.write(f"turn {n} {len(reply.images)} images\n")
            n += 1


def resize_writes(path: str, cut: tuple[int, float] | None, log: str) -> None:
    """The API's resize-in-place of one PNG, over and over, alternating two sizes (with
    ``cut``: die inside that write, see die_inside_write)."""
    out = _start(log)
    if cut is not None:
        die_inside_write(*cut, out)
    from diffgraph.agents.server import resize_in_place

    out.write("ready\n")
    n = 0
    while True:
        resize_in_place(Path(path), (1024, 1024) if n % 2 == 0 else (512, 512))
        n += 1
        out.write(f"write {n}\n")


def tiny_planner(seed: int):
    import torch

    from diffgraph.planner.features import FeatureSchema
    from diffgraph.planner.model import VGAEPlanner

    torch.manual_seed(seed)
    return VGAEPlanner(FeatureSchema(("attr", "quality"), (0.0, 0.0), (1.0, 1.0)), hidden=8, latent=4, heads=2)


def planner_save(directory: str, seed: int, cut: tuple[int, float], log: str) -> None:
    """Save a planner over the one in ``directory``, dying inside one of its two file writes."""
    out = _start(log)
    die_inside_write(*cut, out)
    from diffgraph.planner.checkpoint import save_planner

    out.write("ready\n")
    save_planner(tiny_planner(seed), Path(directory))
    out.write("saved\n")


def merged_recipe():
    """Two mini-world checkpoints and a LoRA: the recipe whose merged model is written to a file."""
    from diffgraph.merger.recipe import ExpertWeight, MergeRecipe
    from diffgraph.miniworld import ARTIFACTS

    experts = ARTIFACTS / "experts"
    return MergeRecipe(base_model="miniworld-sd", prompt="a pink circle", seed=0,
                       checkpoints=[ExpertWeight("neon-nights", 0.3, str(experts / "neon-nights.safetensors")),
                                    ExpertWeight("pastel-dream", 0.7, str(experts / "pastel-dream.safetensors"))],
                       loras=[ExpertWeight("tangerine", 0.5, str(experts / "tangerine.safetensors"))])


def merged_files(out: str, log: str) -> None:
    """The merged model of one recipe written to the same single file, again and again."""
    stream = _start(log)
    from diffgraph.merger.stream import merge_recipe_to_file

    stream.write("ready\n")
    n = 0
    while True:
        merge_recipe_to_file(merged_recipe(), Path(out))
        n += 1
        stream.write(f"merge {n}\n")
