"""Calibration fanned out over a local Ray cluster (2 CPUs, loopback only) gives the same scores
as calibration in this process: directly (three mini-world experts, two seeds, two workers),
through a failing expert (the worker's MergeError reaches the caller), and through a GCA pass
that `diffgraph gca run` makes in another process connected by DIFFGRAPH_RAY_ADDRESS, which
calibrates its experts two at a time (one per worker).

Ray probes outside addresses when it starts (cloud metadata, a DNS server to find its own IP),
so these tests run only inside a loopback-only network namespace, as .ci/run runs pytest
(`unshare -n bash -c 'ip link set lo up && python -m pytest'`); elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from diffgraph.miniworld import ARTIFACTS
from diffgraph.miniworld.scorers import METRICS
from diffgraph.tools.calibrate import CalibrationJob, calibrate_experts

ray = pytest.importorskip("ray")

EXPERTS = ("stripes-pro", "pink-pop", "vintage-sepia")  # a kohya LoRA, a diffusers LoRA, a single-file checkpoint
PROMPTS = ["a pink circle on a striped white background", "vintage sepia photo of a teal diamond at night",
           "a green square on a checkered gray background"]


def _loopback_only() -> bool:
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


def _job(slug: str) -> CalibrationJob:
    from diffgraph.miniworld import artifacts_io

    entry = artifacts_io.expert_entry(slug)
    return CalibrationJob("miniworld-sd", entry["kind"], slug, str(ARTIFACTS / entry["file"]), entry["sha256"])


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A 2-CPU Ray cluster on 127.0.0.1 for this module; this process is its driver."""
    if not _loopback_only():
        pytest.skip("Ray probes outside addresses at start-up: run inside a loopback-only network namespace "
                    "(unshare -n, with lo up), as .ci/run does")
    import torch

    from diffgraph.tools import ray_calibrate

    home = tmp_path_factory.mktemp("ray_home")
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    temp_dir = tempfile.mkdtemp(prefix="dgray-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    threads = torch.get_num_threads()
    # one torch thread here and in each worker, so two 1-CPU workers fit the cluster; the pool
    # gives its workers the driver's thread count, which is what keeps the numbers identical
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray_calibrate.shutdown_pools()
            ray.shutdown()
            torch.set_num_threads(threads)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_calibration_equals_local(ray_address):
    from diffgraph.tools import ray_calibrate

    jobs = [_job(slug) for slug in EXPERTS]
    local = calibrate_experts(jobs, PROMPTS, (0, 1))
    remote = calibrate_experts(jobs, PROMPTS, (0, 1), ray_address=ray_address, workers=2)
    assert remote == local  # exactly: same function, same seeds, same torch thread count
    assert len(local) == 3 and all(len(v) == 3 and len(v[0]) == len(METRICS) for v in local)
    assert len({tuple(v[0]) for v in local}) == 3, "each expert scores differently"

    stats = ray_calibrate.get_pool(2).last
    assert len(stats.workers) == 2 and os.getpid() not in stats.workers, "two worker processes shared the pairs"
    assert all(w.units > 0 for w in stats.workers.values())
    assert sum(w.units for w in stats.workers.values()) == 9


def test_a_worker_failure_reaches_the_caller(ray_address, tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffgraph.merger.merge import MergeError

    bogus = tmp_path / "bogus.safetensors"
    save_file({"unet.not_a_layer.weight": torch.zeros(2, 2)}, str(bogus))
    job = CalibrationJob("miniworld-sd", "ckpt", "bogus", str(bogus), None)
    with pytest.raises(MergeError, match="architecture"):
        calibrate_experts([_job("pink-pop"), job], PROMPTS[:1], (0,), ray_address=ray_address, workers=2)
    # the pool survives a failed expert
    assert calibrate_experts([_job("pink-pop")], PROMPTS[:1], (0,), ray_address=ray_address, workers=2) == \
        calibrate_experts([_job("pink-pop")], PROMPTS[:1], (0,))


def _experts_folder(root: Path) -> Path:
    from diffgraph.miniworld import artifacts_io

    root.mkdir()
    for slug in EXPERTS:
        entry = artifacts_io.expert_entry(slug)
        shutil.copy(ARTIFACTS / entry["file"], root / f"{slug}.safetensors")
        (root / f"{slug}.json").write_text(json.dumps({"kind": entry["kind"], "base_model": "miniworld-sd",
                                                       "name": slug}))
    return root


def _edges(home: Path) -> list[tuple[str, str, list[float]]]:
    from diffgraph.graph_store.catalog import Catalog

    catalog = Catalog.open(home / "catalog.sqlite")
    try:
        texts = {p.id: p.text for p in catalog.reference_prompts()}
        return [(e.expert_id, texts[e.prompt_id], e.scores) for e in catalog.calibration()]
    finally:
        catalog.close()


@pytest.mark.slow  # 40-60 s; the default run keeps Ray calibration equal to local (test_ray_calibration_equals_local)
def test_gca_pass_over_ray_matches_a_local_pass(ray_address, tmp_path):
    from rich.console import Console

    from diffgraph.agents.gca import run_pass
    from diffgraph.settings import Settings
    from diffgraph.tools import ray_calibrate

    ray_calibrate.shutdown_pools()  # free the cluster's CPUs for the other driver's workers
    folder = _experts_folder(tmp_path / "experts")
    local_home, ray_home = tmp_path / "local", tmp_path / "ray"
    result = run_pass([f"local:{folder}"], settings=Settings(home=local_home, reference_prompts=3),
                      console=Console(quiet=True), read_pages=False)
    assert result["counts"].get("active") == 3, result

    env = {**os.environ, "DIFFGRAPH_HOME": str(ray_home), "DIFFGRAPH_RAY_ADDRESS": ray_address,
           "DIFFGRAPH_RAY_WORKERS": "2", "DIFFGRAPH_REFERENCE_PROMPTS": "3", "OMP_NUM_THREADS": "1"}
    env.pop("DIFFGRAPH_DB_URL", None)
    env.pop("DIFFGRAPH_CHROMA_URL", None)
    run = subprocess.run([sys.executable, "-m", "diffgraph.agents.cli", "gca", "run", "--source", f"local:{folder}",
                          "--no-browser"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "'active': 3" in run.stdout, run.stdout[-3000:]
    assert "calibrating 2 experts together on" in run.stdout, run.stdout[-3000:]  # one per worker, at once

    local, remote = _edges(local_home), _edges(ray_home)
    assert len(local) == 9 and remote == local


def test_workers_get_the_drivers_settings_but_no_credentials():
    from diffgraph.tools.ray_calibrate import forwarded_env

    environ = {"DIFFGRAPH_BASE_SD15": "/models/v1-5.safetensors", "DIFFGRAPH_MINIWORLD_DIR": "/tmp/mw",
               "DIFFGRAPH_DEVICE": "cuda", "OMP_WAIT_POLICY": "PASSIVE", "DIFFGRAPH_LLM_API_KEY": "sk-1",
               "DIFFGRAPH_CIVITAI_TOKEN": "t", "DIFFGRAPH_DB_URL": "postgresql://u:p@h/db", "HOME": "/root",
               "DIFFGRAPH_EMPTY": ""}
    assert forwarded_env(environ) == {"DIFFGRAPH_BASE_SD15": "/models/v1-5.safetensors", "DIFFGRAPH_MINIWORLD_DIR": "/tmp/mw",
                                      "DIFFGRAPH_DEVICE": "cuda", "OMP_WAIT_POLICY": "PASSIVE"}
