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


def test_a_third_party_package_registers_a_base_a_suite_and_a_source(tmp_path):
    site = tmp_path / "site"
    info = site / "tinyplug-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "tinyplug.py").write_text(textwrap.dedent(PLUGIN))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
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
