"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """The committed mini-world artifacts (trained base, scorers, experts and their manifest).

    They are built once by ``diffgraph miniworld build`` and committed, so tests never train.
    DIFFGRAPH_MINIWORLD_DIR points them at another build (e.g. a `--quick` one).
    """
    from diffgraph.miniworld import ARTIFACTS as root

    if not (root / "manifest.json").exists():
        pytest.fail(f"mini-world artifacts are missing ({root / 'manifest.json'}); run `diffgraph miniworld build`")
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def graph_home(artifacts_dir, tmp_path_factory) -> Path:
    """A universal graph of the whole mini world, built once per test session by a real GCA
    pass (hub, downloads, Chromium, offline brain, calibration renders) with N_r = 4."""
    from rich.console import Console

    from diffgraph.agents.gca import run_pass
    from diffgraph.settings import Settings

    home = tmp_path_factory.mktemp("graph_home")
    settings = Settings(home=home, reference_prompts=4, hub_port=free_port())
    result = run_pass(["miniworld"], settings=settings, console=Console(quiet=True))
    assert result["counts"].get("active") == 22, result
    return home
