"""A prompt in, an image out, end to end on a real mini-world graph: `diffgraph generate`
explains its picks, its PNG replays bit for bit through `diffgraph render --recipe`, bad input
gets a one-line error, and the offline demo answers its prompts."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from diffgraph.agents.cli import app
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.png import read_recipe
from diffgraph.merger.recipe import BASE, with_trigger_words


def _run(monkeypatch, home, *args):
    monkeypatch.setenv("DIFFGRAPH_HOME", str(home))
    return CliRunner().invoke(app, list(args))


def test_generate_explains_and_replays(monkeypatch, graph_home, tmp_path):
    out = tmp_path / "pink.png"
    result = _run(monkeypatch, graph_home, "generate", "a pink circle on a striped white background", "--seed", "3",
                  "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["experts"], "experts were picked"
    for e in data["experts"]:
        assert 0 < e["coefficient"] < 1 and 0 < e["weight"] <= 1 and e["reason"]
    assert data["brain"] == "offline"
    recipe = read_recipe(out)
    merged = {e.name for e in [*recipe.loras, *recipe.checkpoints]} - {BASE}  # BASE: the anchor of the merge rule
    assert merged == {e["id"] for e in data["experts"]}
    params = Image.open(out).info["parameters"]
    assert "<lora:" in params and "Seed: 3" in params

    replay = tmp_path / "replay.png"
    result = _run(monkeypatch, graph_home, "render", "--recipe", str(out), "--out", str(replay))
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(replay)))


def test_empty_prompt_is_a_clear_error(monkeypatch, graph_home):
    result = _run(monkeypatch, graph_home, "generate", "   ")
    assert result.exit_code == 1
    assert "prompt is empty" in " ".join(result.output.split())


def test_render_refuses_a_png_without_recipe(monkeypatch, graph_home, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = _run(monkeypatch, graph_home, "render", "--recipe", str(plain), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and "carries no DiffGraph recipe" in " ".join(result.output.split())


def test_offline_demo_answers_its_prompts(graph_home, tmp_path):
    from diffgraph.agents.demo import run_demo
    from diffgraph.miniworld.plugin import DEMO_PROMPTS
    from diffgraph.settings import Settings

    result = run_demo(Settings(home=graph_home), tmp_path)
    assert result["base_model"] == "miniworld-sd"
    assert result["grid"].exists() and len(result["images"]) == 2 * len(DEMO_PROMPTS)
    with GraphStore.open(graph_home) as store:
        words = {r.id: r.trigger_words for r in store.catalog.list_experts()}
    for path in result["images"]:  # each demo prompt, with the trigger words of the LoRAs it was rendered with
        recipe = read_recipe(path)
        asked = next(p for p in DEMO_PROMPTS if recipe.prompt.startswith(p))
        assert recipe.prompt == with_trigger_words(asked, [words[e.name] for e in recipe.loras if e.name != BASE])
