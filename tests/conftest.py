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
