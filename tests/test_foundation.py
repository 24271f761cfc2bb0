"""The package's foundation: settings from the environment, the CLI's help on every command,
and the mini world's language (captions parse back to the attributes they describe)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffgraph.agents.cli import app
from diffgraph.miniworld import domain
from diffgraph.settings import get_settings


def test_settings_come_from_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIFFGRAPH_LLM_MODEL", "some-model")
    monkeypatch.delenv("DIFFGRAPH_LLM_BASE_URL", raising=False)
    s = get_settings()
    assert s.home == tmp_path / "home"
    assert s.llm_model == "some-model" and s.llm_base_url is None
    monkeypatch.delenv("DIFFGRAPH_HOME")
    assert get_settings().home.name == ".diffgraph"


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    stack = [(prefix, group)]
    while stack:
        path, cmd = stack.pop()
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append((path + (name,), sub))


@pytest.mark.parametrize("path", list(_commands(app)), ids=lambda p: " ".join(p) or "diffgraph")
def test_every_command_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "diffgraph.agents.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "diffgraph" in out.stdout


def test_no_top_level_tools_or_agents_package(tmp_path):
    """Run from an unrelated folder, so only what is installed can be found."""
    names = ("tools", "agents", "merger", "planner", "graph_store", "miniworld")
    code = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", f"top-level packages leaked into site-packages: {out.stdout}"
    out = subprocess.run([sys.executable, "-c", "import diffgraph.tools, diffgraph.agents"], cwd=tmp_path)
    assert out.returncode == 0


def test_captions_parse_back_to_their_attributes():
    rng = random.Random(0)
    for _ in range(2000):
        attrs = domain.sample_attrs(rng, rare_rate=0.3)
        text = domain.caption(attrs, rng)
        assert domain.target_attrs(text) == attrs, text


def test_captions_vary_in_phrasing():
    rng = random.Random(1)
    attrs = domain.sample_attrs(rng, rare_rate=0.0, force={"texture": "stripes"})
    assert len({domain.caption(attrs, rng) for _ in range(50)}) > 10
