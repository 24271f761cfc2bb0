"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """The committed mini-world artifacts (trained base, scorers, experts and their manifest).

    They are built once by ``diffgraph miniworld build`` and committed, so tests never train.
    While they are still being built, tests that need them are skipped with this reason.
    """
    from diffgraph.miniworld.build import ARTIFACTS

    if not (ARTIFACTS / "manifest.json").exists():
        pytest.skip(f"mini-world artifacts are not built yet ({ARTIFACTS / 'manifest.json'} is missing); "
                    "run `diffgraph miniworld build`")
    return ARTIFACTS
