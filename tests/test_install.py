"""What a fresh install gets: requirements.lock agrees with pyproject.toml, scripts/lock.py
tells an environment that matches it from one that does not, the versions in effect are
reported, and a new user sees no torchvision notice."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from diffgraph.versions import LIBRARIES, library_versions

ROOT = Path(__file__).resolve().parents[1]
LOCK_SCRIPT = ROOT / "scripts" / "lock.py"


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_every_declared_dependency_inside_its_range():
    pins = _locked()
    assert pins["torch"] == "2.13.0"  # the CPU build README installs first
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, pyproject says {req}"


def test_the_lock_pins_what_the_default_test_run_uses():
    """This environment was installed through the lock (README, .ci/run): the libraries the
    results depend on are the locked versions."""
    pins = _locked()
    for name in ("diffusers", "transformers", "peft", "safetensors", "chromadb", "langgraph", "gradio"):
        assert metadata.version(name) == pins[name], name


def _check(lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCK_SCRIPT), "check", "--lock", str(lock)], capture_output=True, text=True)


def test_lock_check_accepts_the_running_environment_and_names_each_difference(tmp_path):
    lock = tmp_path / "requirements.lock"
    subprocess.run([sys.executable, str(LOCK_SCRIPT), "write", "--lock", str(lock), "--tested", "1 passed in 1.00s"],
                   check=True)
    text = lock.read_text()
    assert "1 passed in 1.00s" in text.splitlines()[2] and "\ntorch==2.13.0\n" in text  # no +cpu label
    ok = _check(lock)
    assert ok.returncode == 0, ok.stdout

    peft = f"peft=={metadata.version('peft')}"
    lock.write_text(text.replace(peft, "peft==0.0.1") + "not-a-real-package==1.0\n")
    bad = _check(lock)
    assert bad.returncode == 1
    assert set(bad.stdout.splitlines()) == {"locked but not installed: peft==0.0.1",
                                            "locked but not installed: not-a-real-package==1.0",
                                            f"installed but not locked: {peft}"}


def test_info_prints_the_versions_in_effect(tmp_path):
    out = subprocess.run([sys.executable, "-m", "diffgraph.agents.cli", "info"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "400"}, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("versions:"))
    for name in LIBRARIES:
        assert f"{name} {metadata.version(name)}" in line, name
    assert library_versions()["torch"] == metadata.version("torch")


def test_a_benchmark_result_records_the_versions_it_ran_on(tmp_path):
    from diffgraph.benchmarks import write_result

    path = write_result(tmp_path / "deep" / "bench.json", {"figure": 1.5})
    saved = json.loads(path.read_text())
    assert saved["figure"] == 1.5
    assert saved["versions"] == library_versions() and saved["versions"]["diffusers"] == metadata.version("diffusers")


def test_no_torchvision_notice_on_start():
    """transformers warns that torchvision is missing whenever a pipeline module is imported;
    DiffGraph keeps torchvision out on purpose, so a new user must not be told to install it.
    Both ways in (a diffusers pipeline, transformers' image processors), in one fresh process."""
    code = ("from diffusers import StableDiffusionPipeline; "
            "import transformers; transformers.CLIPImageProcessor; transformers.SiglipImageProcessor")
    run = subprocess.run([sys.executable, "-c", f"import diffgraph; {code}; print('ok')"], capture_output=True, text=True)
    assert run.stdout.strip() == "ok", run.stderr
    assert "torchvision" not in run.stderr, run.stderr
