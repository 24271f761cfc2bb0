"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """The committed mini-world artifacts (trained base, scorers, experts and their manifest).

    They are built once by ``diffgraph miniworld build`` and committed, so tests never train.
    DIFFGRAPH_TEST_ARTIFACTS points the tests at another build (e.g. a `--quick` one).
    """
    from diffgraph.miniworld.artifacts_io import ARTIFACTS

    root = Path(os.environ.get("DIFFGRAPH_TEST_ARTIFACTS", ARTIFACTS))
    if not (root / "manifest.json").exists():
        pytest.fail(f"mini-world artifacts are missing ({root / 'manifest.json'}); run `diffgraph miniworld build`")
    return root
