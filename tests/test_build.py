"""`diffgraph miniworld build` end to end (a --quick build): worker processes, one manifest, and
bits that depend on the seed only, so rerunning a stage alone, with another worker count,
reproduces what the full build made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from diffgraph.miniworld.build import BuildConfig, rebuild_experts, rebuild_scorers, sha256_file
from diffgraph.miniworld.experts import EXPERTS

# The quick build alone takes 2.5-4 min of both cores. Everything else runs on the committed
# artifacts, so the build is a developer's command: run `pytest -m slow tests/test_build.py`
# after changing miniworld/ (its training, experts or build).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "artifacts"
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "diffgraph.agents.cli", "miniworld", "build", "--quick",
                          "--workers", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


def test_build_writes_every_artifact_with_its_hash(quick_build):
    manifest = json.loads((quick_build / "manifest.json").read_text())
    assert [e["slug"] for e in manifest["experts"]] == [s.slug for s in EXPERTS]
    for entry in manifest["experts"]:
        assert sha256_file(quick_build / entry["file"]) == entry["sha256"]
    assert manifest["build"]["workers"] == 2
    assert set(manifest["build"]["timings"]) >= {"vae_done_s", "base_done_s", "scorers_done_s", "total_s"}
    assert (quick_build / "base" / "model_index.json").exists()
    assert not (quick_build / "_vae").exists()  # the VAE stage's hand-over folder is cleaned up


def test_stage_reruns_reproduce_the_full_build_bit_for_bit(quick_build, tmp_path):
    """One worker instead of two, stages alone instead of the whole build: same bytes."""
    copy = tmp_path / "artifacts"
    shutil.copytree(quick_build, copy)
    before = json.loads((quick_build / "manifest.json").read_text())
    scorer_files = sorted(p.name for p in (quick_build / "scorers").iterdir())
    rebuild_experts(copy, BuildConfig.quick(), workers=1)
    rebuild_scorers(copy, BuildConfig.quick())
    after = json.loads((copy / "manifest.json").read_text())
    assert [e["sha256"] for e in after["experts"]] == [e["sha256"] for e in before["experts"]]
    for name in scorer_files:
        assert sha256_file(copy / "scorers" / name) == sha256_file(quick_build / "scorers" / name), name


def test_hot_loras_are_published_with_a_scaled_up_projection(quick_build):
    """ExpertSpec.bake multiplies lora_B (kohya lora_up) only: a hot file's up/down norm ratio is
    bake times a neutral one's, trained alike (same rank, steps and data share)."""
    def up_over_down(slug):
        with safe_open(str(quick_build / "experts" / f"{slug}.safetensors"), "pt") as f:
            up = [f.get_tensor(k).float().norm() for k in f.keys() if "lora_B" in k or "lora_up" in k]
            down = [f.get_tensor(k).float().norm() for k in f.keys() if "lora_A" in k or "lora_down" in k]
        return float(sum(up) / sum(down))

    hot = next(s for s in EXPERTS if s.bake > 1 and s.rank == 4 and s.steps == 300)
    cold = next(s for s in EXPERTS if s.bake < 1 and s.rank == 4 and s.steps == 300)
    neutral = next(s for s in EXPERTS if s.bake == 1 and s.rank == 4 and s.steps == 300 and s.skill)
    assert up_over_down(hot.slug) > 2 * up_over_down(neutral.slug)
    assert up_over_down(cold.slug) < 0.75 * up_over_down(neutral.slug)
