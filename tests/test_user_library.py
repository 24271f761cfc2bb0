"""End to end on a real user's setup, CPU-sized: an A1111-style model folder (support/tiny_world.py)
over tiny SD 1.5 and SDXL bases with the real module names, scored by tiny stand-ins of the
five real metric models (support/tiny_metrics.py). The real commands run on it: a GCA pass over
``local:``, generate, the HTTP API and the A1111 export.

What must hold: every SD 1.5 LoRA is one active sd15 expert however its base was spelled, the
copy is a second file of its expert, the VAE, the embedding and the base folder are skipped
with a note, the file declared "Pony" that holds SD 1.5 weights is refused with that reason,
the SDXL LoRA waits for an SDXL base and becomes active once one is set; images of either
base pick that base's experts, render at the base's size (or the one asked for), carry each
chosen LoRA's trigger words in the prompt rendered, and export with the user's file names; an
unchanged second pass hashes nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil

import httpx
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from diffgraph.agents.cli import app
from diffgraph.agents.gca import run_pass
from diffgraph.graph_store.store import GraphStore
from diffgraph.settings import get_settings
from support import tiny_world as T
from support.serving import serving
from support.tiny_metrics import build_metric_weights

pytestmark = pytest.mark.browser  # GCA passes (Chromium reads a homepage in one of them)

SD15_IDS = {f"local:models/{rel}" for rel, (family, _) in T.LIBRARY.items() if family == "sd15"}
SDXL_ID = "local:models/Lora/xl/pony_glow.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_library")
    sd15 = T.base_folder("sd15", root / "webui" / "models" / "diffusers" / "tiny-sd15")  # inside the library, as ComfyUI keeps it
    sdxl = T.base_folder("sdxl", root / "bases" / "tiny-sdxl")
    T.a1111_library(root / "webui", sd15, sdxl)
    metrics = build_metric_weights(root / "metrics")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFGRAPH_HOME", str(root / "home"))
        mp.setenv("DIFFGRAPH_BASE_SD15", str(root / "webui" / "models" / "diffusers" / "tiny-sd15"))
        mp.delenv("DIFFGRAPH_BASE_SDXL", raising=False)
        mp.delenv("DIFFGRAPH_BASE", raising=False)
        mp.setenv("DIFFGRAPH_METRICS_DIR", str(metrics["wd"]))
        mp.setenv("HF_HOME", str(metrics["hf_home"]))
        mp.setenv("DIFFGRAPH_REFERENCE_PROMPTS", "2")
        yield root, mp


def _pass(root) -> str:
    out = io.StringIO()
    run_pass([f"local:{root / 'webui'}"], settings=get_settings(), console=Console(file=out, width=300), read_pages=False)
    return out.getvalue()


def _rows(home=None) -> dict:
    with GraphStore.open(home or get_settings().home) as store:
        return {r.id: r for r in store.catalog.list_experts()}


@pytest.fixture(scope="module")
def graph(world):
    root, mp = world
    run = CliRunner().invoke(app, ["gca", "run", "--source", f"local:{root / 'webui'}", "--no-browser"],
                             env={"COLUMNS": "300"})  # the first pass through the command a user types
    first = run.output
    assert run.exit_code == 0, first[-3000:]
    rows_before_sdxl = _rows()
    second = _pass(root)  # nothing changed: nothing is hashed again, nothing is redone
    mp.setenv("DIFFGRAPH_BASE_SDXL", str(root / "bases" / "tiny-sdxl"))
    third = _pass(root)  # the SDXL base is configured now: its waiting expert is taken up
    return root, rows_before_sdxl, _rows(), (first, second, third)


def test_the_library_becomes_one_expert_per_model_of_its_family(graph):
    root, before, after, (first, second, third) = graph
    assert set(before) == SD15_IDS | {SDXL_ID, "local:models/Lora/xl/not_really_pony.safetensors"}, first
    for expert_id in SD15_IDS:
        row = before[expert_id]
        assert (row.status, row.base_model) == ("active", "sd15"), (expert_id, row.status, row.status_reason)
    spellings = {i.rsplit("/", 1)[-1]: before[i].declared_base for i in SD15_IDS}
    assert spellings == {"pixel_art.safetensors": "SD1",  # A1111's own words beat Civitai Helper's "SD 1.5"
                         "ink_wash.safetensors": "SD1", "watercolor.safetensors": "SD 1.4",  # Lora-Manager's
                         "sketch.safetensors": "sd_v1"}, spellings  # kohya's ss_base_model_version
    pixel = before["local:models/Lora/styles/pixel_art.safetensors"]
    assert [f.name for f in pixel.files] == ["pixel_art.safetensors", "pixel_art (1).safetensors"]
    assert pixel.trigger_words == ["pxlart"] and pixel.name == "Pixel Art"
    assert all(f.local_path and str(root / "webui") in f.local_path for f in pixel.files)  # used in place
    for skipped, what in [*T.SKIPPED.items(), ("diffusers/tiny-sd15/unet/diffusion_pytorch_model.safetensors",
                                              "the configured base model")]:
        name = skipped.rsplit("/", 1)[-1]
        assert re.search(rf"note.*{re.escape(name)}: {what}, not an expert; skipped", first), (name, first[-3000:])
    assert re.search(r"note.*pixel_art \(1\)\.safetensors: the same bytes as models/Lora/styles/pixel_art\.safetensors",
                     first)
    liar = before["local:models/Lora/xl/not_really_pony.safetensors"]
    assert (liar.status, liar.status_reason) == (
        "rejected", "declared base model 'Pony' but not_really_pony.safetensors holds SD 1.5 weights")
    waiting = before[SDXL_ID]
    assert (waiting.status, waiting.base_model, waiting.declared_base) == ("rejected", "sdxl", "Pony")
    assert "no base-model profile for 'Pony'" in waiting.status_reason and "DIFFGRAPH_BASE_SDXL" in waiting.status_reason
    assert "0 of them read to hash them" in second and "GCA: 6 experts listed, 0 to process" in second, second[-2000:]
    assert after[SDXL_ID].status == "active", (after[SDXL_ID].status_reason, third[-3000:])
    info = CliRunner().invoke(app, ["info"], env={"COLUMNS": "400"})
    assert info.exit_code == 0, info.output
    for line in ("sd15 (SD 1.5): ready; DIFFGRAPH_BASE_SD15=", "sdxl (SDXL): ready; DIFFGRAPH_BASE_SDXL=",
                 "also written SDXL 1.0, SDXL, Pony"):
        assert line in info.output, info.output
    assert {i: r for i, r in after.items() if i != SDXL_ID} == {i: r for i, r in before.items() if i != SDXL_ID}


def test_generate_and_the_api_pick_the_bases_experts_with_their_trigger_words(graph):
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.generate import generate
    from diffgraph.agents.server import create_app
    from diffgraph.tools.export import a1111_prompt

    root, _, rows, _ = graph
    result = generate("pixel art of a castle, blocky sprites", seed=3, base_model="SD 1.5", out=root / "castle.png")
    assert result.base_model == "sd15" and result.experts
    chosen = [rows[e.id] for e in result.experts]
    assert {r.base_model for r in chosen} == {"sd15"}
    assert any(r.id.endswith("pixel_art.safetensors") for r in chosen), [r.id for r in chosen]
    for row in chosen:
        for word in row.trigger_words:
            assert result.recipe["prompt"].count(word) == 1, (word, result.recipe["prompt"])
    pixel = next(e for e in result.experts if e.id.endswith("pixel_art.safetensors"))
    assert pixel.weight == pytest.approx(0.8)  # no trained planner: the user's A1111 "preferred weight"
    with Image.open(root / "castle.png") as image:
        assert image.size == (64, 64)  # the tiny SD 1.5's native size (a real one: 512)
    exported = a1111_prompt(root / "castle.png")
    assert "Size: 64x64" in exported.parameters and "<lora:pixel_art:" in exported.prompt, exported

    settings = get_settings()
    with ChatAgent(settings, llm=None) as agent:  # the chat: two bases held, so the conversation picks one
        assert "choose one with --base-model" in agent.send("a castle", thread="lib").text
        assert agent.send("/base flux-schnell", thread="lib").text.startswith("Sorry: no base-model profile")
        assert agent.send("/base SD 1.5", thread="lib").text == "This conversation now renders with SD 1.5 (sd15)."
        assert agent.send("/base", thread="lib").text.startswith("This conversation renders with sd15.")
        reply = agent.send("pixel art of a castle, blocky sprites", thread="lib")
        (image,) = reply.images
        assert any(e["id"].endswith("pixel_art.safetensors") for e in image["experts"]), reply.text
        assert "pxlart" in image["recipe"]["prompt"] and "pxlart" not in image["prompt"]
        explained = agent.send("explain", thread="lib").text
        assert "rendered as: pixel art of a castle, blocky sprites" in explained and \
            "trigger words: pxlart; recommended weight 0.8" in explained, explained
        without = agent.send("without Pixel Art", thread="lib").images[0]  # a recipe edit: its trigger word goes too
        assert without["prompt"] == image["prompt"] and "pxlart" not in without["recipe"]["prompt"], without
    with ChatAgent(settings, llm=None) as agent, serving(create_app(settings, agent=agent)) as url:
        cards = {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        assert {k: v["diffgraph"]["active_experts"] for k, v in cards.items()} == {"sd15": 4, "sdxl": 1}
        answer = httpx.post(url + "/v1/images/generations", timeout=300, json={
            "prompt": "a portrait with neon glow outlines", "model": "SDXL 1.0", "size": "96x96", "seed": 1, "response_format": "b64_json"})
        assert answer.status_code == 200, answer.text
        (item,) = answer.json()["data"]
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
            recipe = json.loads(image.info["diffgraph"])["recipe"]
            assert image.size == (96, 96) and (recipe["width"], recipe["height"]) == (96, 96)  # rendered at that size
        assert recipe["base_model"] == "sdxl" and [e["id"] for e in item["diffgraph"]["experts"]] == [SDXL_ID]
        assert "glowpony" in item["revised_prompt"] and item["revised_prompt"] == recipe["prompt"]
        wrong = httpx.post(url + "/v1/images/generations", timeout=60, json={"prompt": "a cat", "model": "flux-schnell"})
        assert wrong.status_code == 400 and "\n" not in wrong.json()["error"]["message"]


def test_planner_training_and_generate_through_the_commands(graph, tmp_path):
    """`planner train` on the SD 1.5 base (training prompts of the real base, a validation set
    split off them) writes the base's planner, which `generate` then uses."""
    import json as json_module

    command = ["planner", "train", "--base-model", "SD 1.5", "--steps", "1", "--prompts-per-step", "4", "--prompts", "30"]
    trained = CliRunner().invoke(app, command, env={"COLUMNS": "300"})
    assert trained.exit_code == 0, trained.output[-3000:]
    meta = json_module.loads((get_settings().home / "planner" / "sd15" / "planner.json").read_text())
    assert meta["training"]["config"]["prompts_per_step"] == 4
    made = CliRunner().invoke(app, ["generate", "a heron by a river, ink wash painting", "--base-model", "sd15", "--json",
                                    "--out", str(tmp_path / "heron.png")])
    assert made.exit_code == 0, made.output[-3000:]
    result = json_module.loads(made.output)
    assert result["planner"].startswith("VGAE") and result["base_model"] == "sd15"
    assert all(e["id"] in SD15_IDS for e in result["experts"]) and result["experts"], {k: result[k] for k in ("summary", "components", "notes")}


def test_planner_training_by_distillation_through_the_command(graph):
    """`planner train --trainer distil` on the SD 1.5 base: the search starts from a constant
    tuned on the validation prompts, and the checkpoint records the trainer, the start and the
    budget; an unknown trainer is one line and leaves the saved planner as it was."""
    import json as json_module

    from diffgraph.planner.search import CONSTANTS

    saved = get_settings().home / "planner" / "sd15" / "planner.json"
    command = ["planner", "train", "--base-model", "SD 1.5", "--trainer", "distil", "--steps", "3",
               "--target-renders", "4", "--prompts", "30"]
    trained = CliRunner().invoke(app, command, env={"COLUMNS": "300"})
    assert trained.exit_code == 0, trained.output[-3000:]
    assert "loss: first" in trained.output and "validation reward:" in trained.output
    meta = json_module.loads(saved.read_text())
    assert meta["training"]["config"]["trainer"] == "distil" and meta["training"]["config"]["epochs"] == 3
    assert meta["training"]["search_start"] in CONSTANTS and meta["training"]["target_renders"] == 4
    before = saved.read_bytes()
    refused = CliRunner().invoke(app, ["planner", "train", "--base-model", "SD 1.5", "--trainer", "cma"])
    assert refused.exit_code != 0 and "unknown trainer 'cma': reinforce or distil" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and saved.read_bytes() == before


def test_the_pass_survives_the_library_changing_under_it(graph):
    """A file edited after its expert was built is a new version at the next pass (hashed again,
    alone); a folder the user deleted leaves its experts "removed", the rest untouched."""
    root, _, rows, _ = graph
    ink = root / "webui" / "models" / "Lora" / "ink_wash.safetensors"
    saved = ink.read_bytes()
    T.kohya_lora(T.pipeline("sd15"), "sd15", 77, ink)
    try:
        log = _pass(root)
        after = _rows()
        ink_row = after["local:models/Lora/ink_wash.safetensors"]
        assert ink_row.version != rows["local:models/Lora/ink_wash.safetensors"].version and ink_row.status == "active", log
        assert "1 of them read to hash them" in log
    finally:
        ink.write_bytes(saved)
    lycoris = root / "webui" / "models" / "LyCORIS"
    shutil.move(lycoris, root / "LyCORIS-away")
    try:
        log = _pass(root)
    finally:
        shutil.move(root / "LyCORIS-away", lycoris)
    after = _rows()
    assert after["local:models/LyCORIS/watercolor.safetensors"].status == "removed", log  # swept, not deleted
    assert all(r.status == "active" for i, r in after.items() if i in SD15_IDS and "LyCORIS" not in i)


def test_a_setup_mistake_is_one_line_before_any_work_and_the_experts_wait(world, tmp_path, monkeypatch):
    """Metric weights missing, or the base setting naming another family's weights: the pass
    says so in one line naming the setting, leaves the experts pending with no attempt counted
    (so the next pass is not resumed into a crash), and works once the setting is fixed."""
    root, _ = world
    monkeypatch.setenv("DIFFGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIFFGRAPH_BASE_SDXL", raising=False)
    good_metrics, good_hf = os.environ["DIFFGRAPH_METRICS_DIR"], os.environ["HF_HOME"]
    monkeypatch.setenv("DIFFGRAPH_METRICS_DIR", str(tmp_path / "no-metrics"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf"))
    # the first pass still refuses the SDXL LoRA (no SDXL base) and the mis-declared file; the second has nothing else
    for setting, expected, others in ((None, r"4 SD 1\.5 experts wait: The real metric suite is missing weights for 5 metric", 2),
                                      ("sdxl", r"4 SD 1\.5 experts wait: DIFFGRAPH_BASE_SD15 names tiny-sdxl, which holds SDXL", 0)):
        if setting:
            monkeypatch.setenv("DIFFGRAPH_BASE_SD15", str(root / "bases" / "tiny-sdxl"))
        log = _pass(root)
        assert re.search(expected, log), log[-2000:]
        assert f"GCA: 6 experts listed, {others} to process" in log, log[-2000:]
        rows = _rows()
        assert all((rows[i].status, rows[i].attempts) == ("pending", 0) for i in SD15_IDS), rows
    monkeypatch.setenv("DIFFGRAPH_BASE_SD15", str(root / "webui" / "models" / "diffusers" / "tiny-sd15"))
    monkeypatch.setenv("DIFFGRAPH_METRICS_DIR", good_metrics)
    monkeypatch.setenv("HF_HOME", good_hf)
    log = _pass(root)
    rows = _rows()
    assert all(rows[i].status == "active" for i in SD15_IDS), log[-3000:]


def test_a_single_file_base_of_other_sizes_is_refused_in_one_line(tmp_path):
    """A single file carries no configs: it is loaded with the released model's, so a file of
    other widths (the tiny base here, a pruned or distilled model in the wild) is refused with
    the first mismatch and what to use instead, before anything is rendered."""
    from diffgraph.merger.ldm_keys import diffusers_to_ldm
    from diffgraph.merger.real_pipelines import BaseLoadError, load_base
    from safetensors.torch import save_file

    pipe = T.pipeline("sd15")
    state = {f"{c}.{k}": v for c in ("unet", "vae", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    single = tmp_path / "tiny-sd15.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(state, "sd15").items()}, str(single))
    with pytest.raises(BaseLoadError) as refused:
        load_base(single, "sd15")
    message = str(refused.value)
    assert "\n" not in message and "shape mismatch" in message and "use its diffusers folder" in message, message


def test_a_sidecars_homepage_is_read_only_from_a_host_the_user_allows(tmp_path, monkeypatch, artifacts_dir):
    """A local LoRA whose A1111 JSON names a homepage: read (by Chromium) when DIFFGRAPH_PAGE_HOSTS
    lists its host, else a note and the sidecar's own description; the expert is active either way."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    page = ("<html><body><h1>Tangerine Glow</h1><p>This LoRA paints warm tangerine orange light over any scene."
            "</p></body></html>")
    app = Starlette(routes=[Route("/models/7", lambda request: HTMLResponse(page))])
    lib = tmp_path / "lib" / "models" / "Lora"
    lib.mkdir(parents=True)
    shutil.copy(artifacts_dir / "experts" / "tangerine.safetensors", lib / "tangerine.safetensors")
    with serving(app) as url:
        (lib / "tangerine.json").write_text(json.dumps({"description": "orange tones", "homepage_url": f"{url}/models/7",
                                                         "sd version": "miniworld-sd"}))
        for allowed, home in ((False, tmp_path / "home-a"), (True, tmp_path / "home-b")):
            monkeypatch.setenv("DIFFGRAPH_HOME", str(home))
            monkeypatch.setenv("DIFFGRAPH_REFERENCE_PROMPTS", "2")
            monkeypatch.setenv("DIFFGRAPH_PAGE_HOSTS", url.removeprefix("http://") if allowed else "")
            out = io.StringIO()
            run_pass([f"local:{tmp_path / 'lib'}"], settings=get_settings(), console=Console(file=out, width=300))
            (row,) = _rows(home).values()
            assert row.status == "active", (row.status_reason, out.getvalue()[-2000:])
            if allowed:
                assert row.page_sha256 and "tangerine" in row.description_text.lower(), row.description_text
            else:
                assert row.page_sha256 is None and "homepage unreadable" in out.getvalue() and "not allowed" in out.getvalue()
