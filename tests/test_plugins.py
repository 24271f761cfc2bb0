"""Plugins: tools that other installed packages declare in the `diffgraph.tools` entry-point
group. The example plugin (examples/diffgraph-example-plugin, pip-installed into the test
environment) gives the chat agent a tool and the Expert Selection Agent a prompt stage; broken
plugins are reported and skipped; single-expert source URLs are parsed strictly."""

from __future__ import annotations

import os
import textwrap

import pytest

from diffgraph.settings import Settings
from diffgraph.tools.plugins import diffgraph_tool, discover, run_prompt_stage

EXAMPLE = "examples/diffgraph-example-plugin"


@pytest.fixture(scope="module")
def example():
    try:
        import diffgraph_example_plugin
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"the example plugin is not installed: pip install -e {EXAMPLE}")
        pytest.skip(f"pip install -e {EXAMPLE}")
    return diffgraph_example_plugin


def test_example_plugin_is_discovered(example):
    found = discover()
    by_name = {p.name: p for p in found.plugins}
    assert {"lucky_seed", "expand_shorthand"} <= set(by_name)
    assert by_name["lucky_seed"].chat and by_name["lucky_seed"].esa is None
    assert by_name["expand_shorthand"].esa == "prompt"
    assert by_name["lucky_seed"].distribution == "diffgraph-example-plugin"
    assert [p.name for p in found.esa("prompt")] == ["expand_shorthand"]


def test_esa_runs_the_declared_prompt_stage(example, graph_home, tmp_path):
    from diffgraph.agents.generate import generate

    result = generate("a pink circle #stripes", out=tmp_path / "x.png", settings=Settings(home=graph_home))
    assert result.prompt == "a pink circle, striped background"
    assert any("expand_shorthand rewrote the prompt" in n for n in result.notes)
    assert any("striped background" in e.reason for e in result.experts)


def test_offline_chat_lists_and_calls_plugin_tools(example, graph_home, tmp_path):
    import shutil

    from diffgraph.agents.chat import ChatAgent

    home = tmp_path / "home"
    shutil.copytree(graph_home, home)
    with ChatAgent(Settings(home=home), llm=None) as agent:
        listed = agent.send("tools", "plugins")
        called = agent.send("tool lucky_seed Ada", "plugins")
    assert "lucky_seed" in listed.text and "expand_shorthand" in listed.text
    assert f"lucky_seed: {example.lucky_seed.invoke({'text': 'Ada'})}" in called.text


def test_broken_plugins_are_reported_not_fatal(tmp_path, monkeypatch):
    dist = tmp_path / "someone_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: someone-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [diffgraph.tools]
        shout = someone_plugins:shout
        missing = someone_plugins_gone:thing
        undocumented = someone_plugins:undocumented
        bad_stage = someone_plugins:bad_stage
        not_callable = someone_plugins:NUMBER
        """))
    (tmp_path / "someone_plugins.py").write_text(textwrap.dedent('''\
        def shout(text: str) -> str:
            """Upper-case the text."""
            return text.upper()

        def undocumented(text: str) -> str:
            return text

        def bad_stage(text: str) -> str:
            """Declares a stage that does not exist."""
            return text
        bad_stage.__diffgraph__ = {"esa": "postprocess"}

        NUMBER = 3
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover()
    shout = next(p for p in found.plugins if p.name == "shout")
    assert shout.tool.invoke({"text": "hi"}) == "HI" and shout.chat and shout.esa is None
    errors = "\n".join(found.errors)
    for name in ("missing", "undocumented", "bad_stage", "not_callable"):
        assert f"{name} (someone_plugins" in errors
    assert "ModuleNotFoundError" in errors and "docstring" in errors and "postprocess" in errors


def test_decorator_and_prompt_stage_failures():
    @diffgraph_tool(esa="prompt")
    def shorten(prompt: str) -> str:
        """Keep the first three words."""
        return " ".join(prompt.split()[:3])

    @diffgraph_tool(esa="prompt", chat=False)
    def explode(prompt: str) -> str:
        """Always fails."""
        raise RuntimeError("boom")

    assert shorten.metadata["diffgraph"] == {"esa": "prompt", "chat": True}
    from diffgraph.tools.plugins import Plugin

    plugins = [Plugin("explode", "x", None, explode, chat=False, esa="prompt"),
               Plugin("shorten", "y", None, shorten, esa="prompt")]
    prompt, notes = run_prompt_stage("a red square on a white background", plugins)
    assert prompt == "a red square"
    assert notes[0].startswith("plugin explode failed") and "shorten rewrote" in notes[1]
    with pytest.raises(ValueError):
        diffgraph_tool(lambda prompt: prompt, esa="nowhere")


@pytest.mark.parametrize("url, expected", [
    ("https://civitai.com/models/4201/realistic-vision", ("civitai", "https://civitai.com", "4201")),
    ("http://127.0.0.1:8765/models/12", ("civitai", "http://127.0.0.1:8765", "12")),
    ("https://huggingface.co/owner/some-lora", ("hf", "https://huggingface.co", "owner/some-lora")),
    ("https://huggingface.co/owner/some-lora/tree/main", ("hf", "https://huggingface.co", "owner/some-lora")),
])
def test_model_page_urls(url, expected):
    from diffgraph.tools.sources.single import parse_model_url

    assert parse_model_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://civitai.com/models/1", "https://civitai.com/images/5", "https://example.com/",
                                 "https://huggingface.co/api/models", "not a url"])
def test_model_page_urls_refused(url):
    from diffgraph.tools.sources.single import parse_model_url

    with pytest.raises(ValueError):
        parse_model_url(url)
