"""Export to the tools people already run: `diffgraph export a1111` prints the A1111 prompt of a
DiffGraph PNG with LoRA tags named by the experts' own file names and the image's real size,
and `diffgraph export checkpoint` writes the merged model as one single file that loads and
renders the very image the PNG holds; on a real SD 1.5 layout it is in the LDM names A1111 and
ComfyUI read."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from diffgraph.agents.cli import app
from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.png import read_recipe
from diffgraph.merger.recipe import BASE
from diffgraph.merger.stream import read_recipe_metadata
from diffgraph.settings import Settings

PROMPT = "a pink circle on a striped white background"


def _run(monkeypatch, home, *args):
    monkeypatch.setenv("DIFFGRAPH_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal's width; a one-line error must stay one line
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(graph_home, tmp_path_factory):
    from diffgraph.agents.generate import generate

    out = tmp_path_factory.mktemp("export") / "pink.png"
    result = generate(PROMPT, seed=3, out=out, settings=Settings(home=graph_home))
    assert any(e.kind == "lora" for e in result.experts), "the prompt needs LoRAs for this test to mean anything"
    return result


def test_a1111_prompt_names_the_users_files_and_the_real_size(monkeypatch, graph_home, made):
    result = _run(monkeypatch, graph_home, "export", "a1111", made.image)
    assert result.exit_code == 0, result.output
    text = result.output
    recipe = read_recipe(made.image)
    with GraphStore.open(graph_home) as store:
        for entry, weight in recipe.lora_weights():
            if entry.name == BASE:
                continue
            row = store.catalog.get(entry.name)
            published = next(f for f in row.files if f.local_path == entry.path).name
            stem = published.rsplit("/", 1)[-1].removesuffix(".safetensors")
            assert f"<lora:{stem}:{weight:.4g}>" in text, (stem, text)
            assert entry.sha256[:12] not in text and entry.name not in re.findall(r"<lora:([^:>]+):", text)
    with Image.open(made.image) as image:
        assert f"Size: {image.width}x{image.height}" in text
    assert text.splitlines()[-1].startswith("Steps: ") and PROMPT in text


def test_a_recipe_made_before_file_names_were_recorded_gets_them_from_the_catalog(monkeypatch, graph_home, made,
                                                                                  tmp_path):
    data = json.loads(Image.open(made.image).info["diffgraph"])
    for entry in data["recipe"]["loras"] + data["recipe"]["checkpoints"]:
        entry.pop("file_name", None)
    old = tmp_path / "old-recipe.json"
    old.write_text(json.dumps(data))
    fresh = _run(monkeypatch, graph_home, "export", "a1111", made.image).output
    again = _run(monkeypatch, graph_home, "export", "a1111", old).output
    tags = lambda text: re.findall(r"<lora:[^>]+>", text)  # noqa: E731
    assert tags(again) == tags(fresh) and tags(fresh)


def test_the_merged_checkpoint_loads_and_renders_the_same_image(monkeypatch, graph_home, made, artifacts_dir,
                                                                tmp_path):
    from diffgraph.merger.real_pipelines import load_single_file
    from diffgraph.merger.render import render

    out = tmp_path / "merged.safetensors"
    result = _run(monkeypatch, graph_home, "export", "checkpoint", made.image, "--out", out)
    assert result.exit_code == 0, result.output
    recipe = read_recipe(made.image)
    assert read_recipe_metadata(out) == recipe
    pipe = load_single_file(out, configs=artifacts_dir / "base")
    image = render(pipe, [recipe.prompt], [recipe.seed], steps=recipe.steps, guidance=recipe.guidance,
                   negative_prompt=recipe.negative_prompt)[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(made.image)))

    replay = tmp_path / "replay.png"  # the merged file carries its recipe: render replays it
    result = _run(monkeypatch, graph_home, "render", "--recipe", out, "--out", replay)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(replay)), np.asarray(Image.open(made.image)))

    half = tmp_path / "half.safetensors"
    assert _run(monkeypatch, graph_home, "export", "checkpoint", made.image, "--out", half, "--half").exit_code == 0
    with safe_open(str(half), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert half.stat().st_size < 0.6 * out.stat().st_size


@pytest.mark.parametrize("source", ["plain.png", "notes.json", "weights.safetensors", "missing.png"])
def test_sources_without_a_recipe_are_one_line_errors(monkeypatch, graph_home, tmp_path, source):
    path = tmp_path / source
    if source == "plain.png":
        Image.new("RGB", (8, 8)).save(path)
    elif source == "notes.json":
        path.write_text("{not json")
    elif source == "weights.safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    for command in (["export", "a1111", path], ["export", "checkpoint", path, "--out", tmp_path / "x.safetensors"]):
        result = _run(monkeypatch, graph_home, *command)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) <= 2 and lines[0].startswith("error:"), result.output
        assert path.name in result.output
    assert not (tmp_path / "x.safetensors").exists()
