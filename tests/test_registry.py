"""Bases, metric suites and source kinds come from entry points: a throw-away package made in
the test run registers one of each (plus a broken entry and a name already taken), and a fresh
process finds them exactly as it finds the mini world's, with the broken ones reported, not
fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PLUGIN = '''
from contextlib import contextmanager

from diffgraph.tools.bases import BaseProfile
from diffgraph.tools.sources import LocalFolderSource


class TinySuite:
    names = ("brightness",)

    def __init__(self, scale=1.0):
        self.scale = scale

    def score(self, images, prompts):
        return [[self.scale * sum(im.convert("L").getdata()) / (255 * im.width * im.height)] for im in images]

    def reward(self, vector):
        return vector[0]


BASE = BaseProfile("tiny-base", engine=lambda: "tiny engine", suite=lambda: TinySuite(),
                   reference_candidates=lambda n: [f"tiny prompt {i}" for i in range(n)],
                   training_prompts=lambda n, seed: [f"tiny training prompt {seed}.{i}" for i in range(n)])
NOT_A_PROFILE = "just a string"


@contextmanager
def open_tiny(location, *, retry=None, hub_port=0):
    yield [LocalFolderSource(location)]
'''

ENTRY_POINTS = '''
[diffgraph.bases]
tiny-base = tinyplug:BASE
not-a-profile = tinyplug:NOT_A_PROFILE
missing = tinyplug:NO_SUCH_NAME

[diffgraph.suites]
tiny = tinyplug:TinySuite
real = tinyplug:TinySuite

[diffgraph.sources]
tiny = tinyplug:open_tiny
'''

CHECK = '''
import json, sys
from PIL import Image
from diffgraph.tools import bases
from diffgraph.tools.scoring import get_suite
from diffgraph.tools.scoring.base import SUITES
from diffgraph.tools.sources import open_sources, parse_source_spec

profile = bases.profile("tiny-base")
suite = get_suite("tiny", scale=2.0)
white = Image.new("RGB", (4, 4), "white")
with open_sources(parse_source_spec("tiny:" + sys.argv[1])) as sources:
    listed = sorted(r.name for s in sources for r in s.iter_models())
print(json.dumps({
    "bases": bases.BASES.names(), "base_errors": bases.BASES.errors,
    "references": profile.reference_candidates(2), "engine": bases.engine_for("tiny-base"),
    "suites": SUITES.names(), "suite_errors": SUITES.errors,
    "score": suite.score([white], ["p"]), "reward": suite.reward([0.25]),
    "real_from": SUITES.get("real").__module__,
    "listed": listed,
}))
'''


def _vendor_package(tmp_path, name: str, code: str, entry_points: str):
    """An installed-looking package (module + dist-info with entry points) on a folder of its own."""
    site = tmp_path / "site"
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (site / f"{name}.py").write_text(textwrap.dedent(code))
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def test_a_third_party_package_registers_a_base_a_suite_and_a_source(tmp_path):
    site = _vendor_package(tmp_path, "tinyplug", PLUGIN, ENTRY_POINTS)
    folder = tmp_path / "models"
    folder.mkdir()
    from safetensors.torch import save_file
    import torch

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(folder / "glow.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHECK, str(folder)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])

    assert {"tiny-base", "miniworld-sd"} <= set(got["bases"]) and "not-a-profile" not in got["bases"]
    assert got["references"] == ["tiny prompt 0", "tiny prompt 1"] and got["engine"] == "tiny engine"
    errors = "\n".join(got["base_errors"])
    assert "not-a-profile (tinyplug:NOT_A_PROFILE): TypeError" in errors and "missing (tinyplug:NO_SUCH_NAME)" in errors
    assert all("\n" not in e for e in got["base_errors"] + got["suite_errors"])

    assert {"tiny", "miniworld", "real"} <= set(got["suites"])
    assert got["real_from"] == "diffgraph.tools.scoring.base"  # the plugin's "real" was refused, not swapped in
    assert any("a metric suite named 'real' is already registered" in e for e in got["suite_errors"])
    assert got["score"] == [[2.0]] and got["reward"] == 0.25

    assert got["listed"] == ["glow"]


def test_an_unknown_source_kind_names_the_registered_ones():
    import pytest

    from diffgraph.tools.sources import parse_source_spec

    with pytest.raises(ValueError, match=r"unknown source 'nope:x'; expected civitai.*miniworld\[:LOCATION\]"):
        parse_source_spec("nope:x")


E2E_PLUGIN = '''
from contextlib import contextmanager

from diffgraph.merger.engine import MergeEngine
from diffgraph.miniworld import artifacts_io
from diffgraph.tools.bases import BaseProfile
from diffgraph.tools.sources import LocalFolderSource

COLOURS = ("pink", "teal", "orange", "red", "navy", "mint", "gray", "beige")


class Brightness:
    """A one-metric suite: the mean brightness of the image."""

    names = ("brightness",)

    def score(self, images, prompts):
        return [[sum(im.convert("L").getdata()) / (255 * im.width * im.height)] for im in images]

    def reward(self, vector):
        return vector[0]


# Another vendor's base: the mini world's pipeline under a name of its own, scored by its own suite.
BASE = BaseProfile("tiny-base", engine=lambda: MergeEngine(artifacts_io.load_pipeline()), suite=Brightness,
                   reference_candidates=lambda n: [f"a {c} circle on a plain background" for c in COLOURS][:n],
                   training_prompts=lambda n, seed: [f"a {c} square" for c in COLOURS][:n])


@contextmanager
def open_tiny(location, *, retry=None, hub_port=0):
    yield [LocalFolderSource(location)]
'''

E2E_ENTRY_POINTS = '''
[diffgraph.bases]
tiny-base = tinyvendor:BASE

[diffgraph.suites]
brightness = tinyvendor:Brightness

[diffgraph.sources]
tiny = tinyvendor:open_tiny
'''

E2E_CHECK = '''
import json, sys
from pathlib import Path

import httpx
from rich.console import Console

from diffgraph.agents.chat import ChatAgent
from diffgraph.agents.gca import run_pass
from diffgraph.agents.generate import generate
from diffgraph.agents.server import create_app
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import Settings
from support.serving import serving

folder, home = sys.argv[1], Path(sys.argv[2])
settings = Settings(home=home, reference_prompts=2)
crawl = run_pass(["tiny:" + folder], settings=settings, console=Console(quiet=True), read_pages=False)
made = generate("a pink circle on a white background", seed=1, settings=settings)
with ChatAgent(settings, llm=None) as agent:
    reply = agent.send("a pink circle on a white background", "vendor")
    with serving(create_app(settings, agent=agent, ui=False)) as url:
        models = httpx.get(url + "/v1/models", timeout=60).json()
        answer = httpx.post(url + "/v1/images/generations", timeout=600,
                            json={"prompt": "a pink circle", "model": "tiny-base", "response_format": "url"})
with GraphStore.open(home) as store:
    rows = store.catalog.list_experts()
    edges = store.catalog.calibration([r.id for r in rows])
print(json.dumps({
    "counts": crawl["counts"], "bases": sorted({r.base_model for r in rows}), "ids": [r.id for r in rows],
    "metrics": sorted({n for e in edges for n in e.metric_names}),
    "generate": {"base": made.base_model, "image": str(made.image), "experts": [e.id for e in made.experts],
                 "recipe_base": made.recipe["base_model"]},
    "chat": {"images": [im["recipe"]["base_model"] for im in reply.images], "text": reply.text},
    "api": {"status": answer.status_code, "models": [m["id"] for m in models["data"]],
            "body": answer.json()},
}))
'''


def test_a_third_party_base_suite_and_source_serve_generate_chat_and_the_http_api(tmp_path, artifacts_dir):
    """The acceptance test of the registries: a vendor's package (made here) adds a base, its
    metric suite and a source kind; a GCA pass through that source calibrates with that suite,
    and generate, the chat and the HTTP API all render on that base, with nothing in DiffGraph
    naming it."""
    import shutil
    from pathlib import Path

    site = _vendor_package(tmp_path, "tinyvendor", E2E_PLUGIN, E2E_ENTRY_POINTS)
    folder = tmp_path / "Lora"
    folder.mkdir()
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    for slug, words in (("pink-pop", "Hot pink and magenta objects."), ("stripes-lite", "Striped white backgrounds.")):
        entry = next(e for e in manifest["experts"] if e["slug"] == slug)
        shutil.copy(artifacts_dir / entry["file"], folder / f"{slug}.safetensors")
        (folder / f"{slug}.json").write_text(json.dumps({"name": slug, "kind": "lora", "base_model": "tiny-base",
                                                         "description": words}))
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(tests), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", E2E_CHECK, str(folder), str(tmp_path / "home")], capture_output=True,
                         text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])

    assert got["counts"].get("active") == 2 and got["bases"] == ["tiny-base"]
    assert got["metrics"] == ["brightness"]  # calibrated with the vendor's suite, not the mini world's
    assert got["generate"]["base"] == got["generate"]["recipe_base"] == "tiny-base"
    assert got["generate"]["experts"] and set(got["generate"]["experts"]) <= set(got["ids"])  # the vendor's LoRAs
    assert Path(got["generate"]["image"]).is_file()
    assert got["chat"]["images"] == ["tiny-base"], got["chat"]["text"]
    assert got["api"]["status"] == 200, got["api"]["body"]
    assert "tiny-base" in got["api"]["models"]
    assert got["api"]["body"]["data"][0]["diffgraph"]["recipe_url"]
