"""A user's own model folder (A1111 / Forge / ComfyUI layouts with their sidecars), one base
vocabulary for every spelling of a family, and trigger words put into rendered prompts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffgraph.families import FAMILIES, base_family, display, variant
from diffgraph.graph_store.records import ExpertRecord
from diffgraph.graph_store.store import GraphStore
from diffgraph.graph_store.vectors import partition_name
from diffgraph.merger.recipe import MAX_TRIGGER_WORDS, with_trigger_words
from diffgraph.tools.sources import ContentStore, UnsafeFileError
from diffgraph.tools.sources.local import LocalFolderSource

SD15_SPELLINGS = ("SD 1.5", "SD1.5", "sd15", "SD 1.4", "SD1", "sd-v1-5", "Stable Diffusion 1.5", "sd_v1.5")
SDXL_SPELLINGS = ("SDXL 1.0", "SDXL", "sdxl_base_1.0", "Pony", "Illustrious", "NoobAI", "SDXL 0.9")


@pytest.mark.parametrize("declared", SD15_SPELLINGS)
def test_every_spelling_of_sd15_is_one_family(declared):
    assert base_family(declared) == "sd15"
    record = ExpertRecord("local", "a.safetensors", "v", "a", "lora", declared)
    assert (record.base_model, record.declared_base) == ("sd15", declared)
    assert partition_name(declared, "lora") == partition_name("sd15", "lora")


@pytest.mark.parametrize("declared", SDXL_SPELLINGS)
def test_pony_and_illustrious_are_sdxl_with_a_sub_label(declared):
    assert base_family(declared) == "sdxl"
    sub = variant(declared)
    assert display("sdxl", declared) == (f"SDXL ({sub})" if sub else "SDXL")


def test_the_spellings_help_texts_show_are_their_familys():
    shown = [(family.name, example) for family in FAMILIES.values() for example in family.examples]
    assert len(shown) >= 12
    assert all(base_family(example) == name for name, example in shown), shown


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_base_family_is_total_and_idempotent(declared):
    family = base_family(declared)
    assert family == base_family(family)
    assert family.strip() == family and (family != "" or declared.strip() == "")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.lists(st.lists(st.text(max_size=70), max_size=9), max_size=3))
def test_trigger_words_are_added_once_and_kept_once(prompt, words):
    out = with_trigger_words(prompt, words)
    assert out.startswith(" ".join(prompt.split()))
    assert with_trigger_words(out, words) == out  # adding them again changes nothing
    for expert in words:
        for word in [" ".join(w.split()).strip(" ,") for w in expert][:MAX_TRIGGER_WORDS]:
            if word and len(word) <= 60:
                assert word.lower() in out.lower()


def test_trigger_words_the_user_wrote_are_not_repeated():
    assert with_trigger_words("a cat, PixelArt style", [["pixelart", "pxl"]]) == "a cat, PixelArt style, pxl"
    assert with_trigger_words("", [["tok"]]) == "tok"


def _lora(path: Path, seed: int, metadata: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{stem}.lora_up.weight": torch.randn(32, 4, generator=g), f"{stem}.alpha": torch.tensor(4.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def library(tmp_path, monkeypatch):
    """An A1111-style folder: LoRAs with Civitai Helper, A1111 and Lora-Manager sidecars, a
    byte-identical copy, a VAE, an embedding and the user's base checkpoint."""
    root = tmp_path / "webui" / "models"
    pixel = _lora(root / "Lora" / "styles" / "pixel_art_v2.safetensors", 1)
    (pixel.with_suffix(".civitai.info")).write_text(json.dumps(
        {"modelId": 123, "baseModel": "SD 1.5", "trainedWords": ["pixelart", "8bit"], "model": {"name": "Pixel Art", "type": "LORA"}}))
    pixel.with_suffix(".json").write_text(json.dumps({"sd version": "SD1", "activation text": "pxlart, retro",
                                                      "preferred weight": 0.7}))
    shutil.copy(pixel, pixel.with_name("pixel_art_v2 (1).safetensors"))
    ink = _lora(root / "Lora" / "ink.safetensors", 2, {"ss_base_model_version": "sd_v1"})
    ink.with_suffix(".metadata.json").write_text(json.dumps({"model_name": "Ink Wash", "base_model": "SD 1.5",
                                                             "civitai": {"trainedWords": ["inkwash"]},
                                                             "usage_tips": json.dumps({"strength": 0.6})}))
    _lora(root / "LyCORIS" / "pony_thing.safetensors", 3).with_suffix(".civitai.info").write_text(
        json.dumps({"baseModel": "Pony", "model": {"type": "LoCon"}}))
    (root / "VAE").mkdir()
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)},
              str(root / "VAE" / "vae-ft-mse.safetensors"))
    (root.parent / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 768)}, str(root.parent / "embeddings" / "badhands.safetensors"))
    base = root / "Stable-diffusion" / "v1-5-pruned.safetensors"
    base.parent.mkdir(parents=True)
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}, str(base))
    monkeypatch.setenv("DIFFGRAPH_BASE_SD15", str(base))
    return root.parent, tmp_path / "hashes.sqlite"


def test_a_user_library_lists_each_expert_once_with_its_users_own_metadata(library):
    root, cache = library
    source = LocalFolderSource(root, hash_cache=cache)
    records = {r.source_id: r for r in source.iter_models()}
    assert sorted(records) == ["models/Lora/ink.safetensors", "models/Lora/styles/pixel_art_v2.safetensors",
                               "models/LyCORIS/pony_thing.safetensors"]
    pixel = records["models/Lora/styles/pixel_art_v2.safetensors"]  # the copy with the user's sidecars names it
    assert [f.name for f in pixel.files] == ["pixel_art_v2.safetensors", "pixel_art_v2 (1).safetensors"]
    assert [f.primary for f in pixel.files] == [True, False] and len({f.sha256 for f in pixel.files}) == 1
    # the user's A1111 fields win over Civitai's; every spelling is its family
    assert pixel.trigger_words == ["pxlart", "retro"] and pixel.name == "Pixel Art" and pixel.preferred_weight == 0.7
    assert (pixel.base_model, pixel.declared_base) == ("sd15", "SD1")
    ink = records["models/Lora/ink.safetensors"]
    assert (ink.name, ink.trigger_words, ink.base_model, ink.preferred_weight) == ("Ink Wash", ["inkwash"], "sd15", 0.6)
    assert records["models/LyCORIS/pony_thing.safetensors"].base_model == "sdxl"
    notes = "\n".join(source.notes)
    for what in ("vae-ft-mse.safetensors: a VAE", "badhands.safetensors: a textual-inversion embedding",
                 "v1-5-pruned.safetensors: the configured base model", "the same bytes as"):
        assert what in notes, notes
    assert source.hashed == 4  # every expert file once (the copy too: it is hashed to be found)


def test_an_unchanged_second_pass_rehashes_nothing_and_an_edit_is_seen(library):
    root, cache = library
    first = {r.source_id: r.version for r in LocalFolderSource(root, hash_cache=cache).iter_models()}
    again = LocalFolderSource(root, hash_cache=cache)
    assert {r.source_id: r.version for r in again.iter_models()} == first and again.hashed == 0
    ink = root / "models" / "Lora" / "ink.safetensors"
    _lora(ink, 9)
    os.utime(ink, ns=(ink.stat().st_atime_ns, ink.stat().st_mtime_ns + 10**9))
    edited = LocalFolderSource(root, hash_cache=cache)
    versions = {r.source_id: r.version for r in edited.iter_models()}
    assert edited.hashed == 1 and versions["models/Lora/ink.safetensors"] != first["models/Lora/ink.safetensors"]


def test_files_are_used_in_place_and_a_changed_file_is_refused(library, tmp_path):
    from diffgraph.tools.sources import IntegrityError

    root, cache = library
    source = LocalFolderSource(root, hash_cache=cache)
    record = next(r for r in source.iter_models() if r.source_id.endswith("ink.safetensors"))
    store = ContentStore(tmp_path / "home")
    path = source.download(record.files[0], store)
    assert path == root / "models" / "Lora" / "ink.safetensors"  # no copy into DIFFGRAPH_HOME
    assert not (tmp_path / "home" / "blobs").exists() or not any((tmp_path / "home" / "blobs").rglob("*"))
    _lora(path, 11)
    with pytest.raises(IntegrityError, match="changed since it was listed") as info:
        source.download(record.files[0], store)
    assert "\n" not in str(info.value)


def test_a_graph_of_the_old_schema_is_migrated_to_family_names(tmp_path):
    home = tmp_path / "home"
    with GraphStore.open(home) as store:
        for i, declared in enumerate(("SD 1.5", "sd15", "SDXL 1.0")):
            store.upsert_expert(ExpertRecord("civitai", str(i), "v1", f"e{i}", "lora", declared))
            store.register(f"civitai:{i}", {"summary": f"expert {i}"}, f"expert number {i} draws things", None)
            store.catalog.set_status(f"civitai:{i}", "active")
    db = sqlite3.connect(home / "catalog.sqlite")  # what schema 1 held: the published name as the base
    with db:
        db.execute("UPDATE experts SET base_model = declared_base")
        db.execute("ALTER TABLE experts DROP COLUMN declared_base")
        db.execute("ALTER TABLE experts DROP COLUMN preferred_weight")
        db.execute("ALTER TABLE experts DROP COLUMN nsfw_level")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()
    with GraphStore.open(home) as store:
        rows = {r.id: r for r in store.catalog.list_experts()}
        assert {i: (r.base_model, r.declared_base) for i, r in rows.items()} == {
            "civitai:0": ("sd15", "SD 1.5"), "civitai:1": ("sd15", "sd15"), "civitai:2": ("sdxl", "SDXL 1.0")}
        query = store.embed(["expert number 0 draws things"])[0]
        found = {h[0] for h in store.vectors.query(np.asarray(query), "lora", "SD 1.5", k=5)}
        assert found == {"civitai:0", "civitai:1"}  # one partition for the family, however it was spelled
        assert {h[0] for h in store.vectors.query(np.asarray(query), "lora", "sdxl", k=5)} == {"civitai:2"}


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=80), st.integers(min_value=1, max_value=100), st.integers(0, 3))
def test_planner_training_and_validation_prompts_are_disjoint_or_refused(pool_size, n, seed):
    """A finite prompt pool (a real base's shipped prompts) that the training draw uses up gets
    a validation set split off; too small a pool is refused in one line."""
    import random

    from diffgraph.agents.planner_training import MIN_TRAIN, MIN_VALIDATION, PlannerTrainingError, split_prompts

    pool = [f"prompt {i}" for i in range(pool_size)]
    references = set(pool[:3])

    def draw(k, s):
        shuffled = pool[:]
        random.Random(s).shuffle(shuffled)
        return shuffled[:k]

    drawn = [p for p in draw(n, seed) if p not in references]
    other = [p for p in draw(n // 2, seed + 1_000) if p not in references and p not in drawn]
    try:
        train, validation = split_prompts(draw, n, seed, references)
    except PlannerTrainingError as exc:
        assert "\n" not in str(exc) and f"only {len(drawn)} training prompts" in str(exc)
        assert len(other) < MIN_VALIDATION and len(drawn) - max(MIN_VALIDATION, len(drawn) // 5) < MIN_TRAIN
        return
    assert not set(train) & set(validation) and not (set(train) | set(validation)) & references
    assert len(validation) >= MIN_VALIDATION and train and set(train) <= set(drawn)
    if len(other) < MIN_VALIDATION:  # the pool ran out: a fifth split off, the rest trains
        assert len(train) >= MIN_TRAIN and sorted(train + validation) == sorted(drawn)


def test_an_fp16_copy_of_an_fp32_file_is_one_expert_merged_from_the_fp32_file(tmp_path):
    g = torch.Generator().manual_seed(4)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    full = {f"{stem}.lora_down.weight": torch.randn(4, 32, generator=g), f"{stem}.lora_up.weight": torch.randn(32, 4, generator=g)}
    root = tmp_path / "models" / "Lora"
    root.mkdir(parents=True)
    save_file(full, str(root / "glow-fp32.safetensors"))
    save_file({k: v.half() for k, v in full.items()}, str(root / "glow-fp16.safetensors"))
    nudged = {k: v.half() for k, v in full.items()}
    nudged[f"{stem}.lora_up.weight"][0, 0] += 1  # same layout, other values: another model
    save_file(nudged, str(root / "other-fp16.safetensors"))
    source = LocalFolderSource(tmp_path)
    records = {r.source_id: r for r in source.iter_models()}
    assert sorted(records) == ["models/Lora/glow-fp32.safetensors", "models/Lora/other-fp16.safetensors"]
    assert [(f.name, f.primary) for f in records["models/Lora/glow-fp32.safetensors"].files] == [
        ("glow-fp32.safetensors", True), ("glow-fp16.safetensors", False)]
    assert any("glow-fp16.safetensors: the fp16 copy of models/Lora/glow-fp32.safetensors" in n for n in source.notes)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_KEYS = ["name", "kind", "base_model", "trigger_words", "tags", "license", "homepage_url", "description",
         "preferred_weight", "sd version", "activation text", "preferred weight", "baseModel", "trainedWords",
         "model", "modelId", "model_name", "civitai", "usage_tips", "modelDescription"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8) | _JSON, min_size=3, max_size=3))
def test_any_sidecar_content_gives_a_clean_record_or_is_ignored(tmp_path_factory, sidecars):
    """Whatever the three sidecars hold (any JSON, wrong types, NaN, nesting), listing never
    fails and the record's fields have their types: the user's folder is not ours to trust."""
    root = tmp_path_factory.mktemp("sidecars")
    path = _lora(root / "Lora" / "x.safetensors", 1)
    for suffix, content in zip((".civitai.info", ".json", ".metadata.json"), sidecars):
        path.with_suffix(suffix).write_text(json.dumps(content))
    (record,) = LocalFolderSource(root).iter_models()
    assert isinstance(record.name, str) and record.kind in ("lora", "ckpt") and isinstance(record.base_model, str)
    assert all(isinstance(w, str) and w == w.strip() and w for w in record.trigger_words)
    assert all(isinstance(t, str) for t in record.tags) and isinstance(record.license, dict)
    assert record.preferred_weight is None or 0 < record.preferred_weight <= 5
    assert record.homepage_url is None or isinstance(record.homepage_url, str)


def test_a_comfyui_folder_lists_the_a1111_folders_its_extra_model_paths_names(tmp_path):
    """ComfyUI users share an A1111 install through extra_model_paths.yaml: its checkpoint and
    LoRA folders are listed too (VAEs and embeddings it names are not experts); a broken config
    is ignored, not fatal."""
    webui = tmp_path / "stable-diffusion-webui"
    _lora(webui / "models" / "Lora" / "shared.safetensors", 5)
    _lora(webui / "models" / "LyCORIS" / "lyco.safetensors", 6)
    _lora(webui / "models" / "VAE-approx" / "skip.safetensors", 7)
    comfy = tmp_path / "ComfyUI"
    _lora(comfy / "models" / "loras" / "own.safetensors", 8)
    (comfy / "extra_model_paths.yaml").write_text(
        "a111:\n"
        f"    base_path: {webui}\n"
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "    vae: models/VAE-approx\n"
        "comfyui:\n"
        "    base_path: .\n"
        "    loras: models/loras\n")
    source = LocalFolderSource(comfy)
    ids = sorted(r.source_id for r in source.iter_models())
    assert ids == sorted(["models/loras/own.safetensors", str(webui / "models/Lora/shared.safetensors"),
                          str(webui / "models/LyCORIS/lyco.safetensors")]), ids
    shared = next(r for r in source.iter_models() if r.source_id.endswith("shared.safetensors"))
    assert source.download(shared.files[0], ContentStore(tmp_path / "store")) == webui / "models/Lora/shared.safetensors"
    with pytest.raises(UnsafeFileError):  # a file outside every listed folder is still refused
        source.download(replace(shared.files[0], url=(webui / "models/VAE-approx/skip.safetensors").as_uri()),
                        ContentStore(tmp_path / "store"))
    (comfy / "extra_model_paths.yaml").write_text("a111: [unclosed")
    assert [r.source_id for r in LocalFolderSource(comfy).iter_models()] == ["models/loras/own.safetensors"]
