"""Example budgets for generated tests: a fixed one in the default run, a bigger one under the
slow marker (`pytest -m slow`), so the default suite stays fast and a long run digs deeper."""

from __future__ import annotations

import pytest


def budget(default: int, slow: int):
    """Parametrize a test with its example budget: ``default`` in the default run, ``slow``
    under the slow marker."""
    return pytest.mark.parametrize("examples", [pytest.param(default, id="default"),
                                                pytest.param(slow, id="slow", marks=pytest.mark.slow)])
