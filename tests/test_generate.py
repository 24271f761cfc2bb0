"""A prompt in, an image out, end to end on a real mini-world graph: `diffgraph generate`
explains its picks, its PNG replays bit for bit through `diffgraph render --recipe`, bad input
gets a one-line error, and the offline demo answers its prompts."""

from __future__ import annotations

import json
import textwrap

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
    from diffgraph.settings import Settings
    from diffgraph.tools import bases

    prompts = bases.demo_prompts(bases.profile("miniworld-sd"))
    _, _, held_out = bases.prompt_split(bases.profile("miniworld-sd"))
    assert len(prompts) == 4 and set(prompts) <= set(held_out)  # drawn from the held-out prompts
    result = run_demo(Settings(home=graph_home), tmp_path)
    assert result["base_model"] == "miniworld-sd"
    assert result["grid"].exists() and len(result["images"]) == 2 * len(prompts)
    with GraphStore.open(graph_home) as store:
        words = {r.id: r.trigger_words for r in store.catalog.list_experts()}
    for path in result["images"]:  # each demo prompt, with the trigger words of the LoRAs it was rendered with
        recipe = read_recipe(path)
        asked = next(p for p in prompts if recipe.prompt.startswith(p))
        assert recipe.prompt == with_trigger_words(asked, [words[e.name] for e in recipe.loras if e.name != BASE])


def test_a_grid_writes_each_caption_under_its_image(tmp_path):
    from diffgraph.grid import LINE_PX, labelled_grid

    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    rows = [("a red thing", [red, blue]), ("a blue thing", [blue, red])]
    plain = Image.open(labelled_grid(rows, tmp_path / "plain.png", cell=64, columns=["base", "DiffGraph"]))
    assert plain.height == LINE_PX + 8 + 2 * 66
    captions = [["the base alone", "Pink Pop 0.41, Stripes Pro 0.38, Warm Light 0.55"], ["", "none"]]
    grid = Image.open(labelled_grid(rows, tmp_path / "grid.png", cell=64, columns=["base", "DiffGraph"],
                                    captions=captions)).convert("L")
    head, label_width = LINE_PX + 8, 200
    strip = max(len(textwrap.wrap(c, 64 // 6)) for c in captions[0]) * LINE_PX + 4
    assert grid.height == head + 66 + strip + 66 + LINE_PX + 4
    for c, text in enumerate(captions[0]):  # ink under each image of the first row, in its own column
        x = label_width + c * 66
        box = grid.crop((x, head + 66, x + 64, head + 66 + strip))
        assert box.getextrema()[0] < 128, f"no caption under image {c}"
