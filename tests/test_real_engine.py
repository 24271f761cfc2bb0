"""The merge engine on real layouts: an SD1.5 base and a checkpoint expert as single files in
the original LDM layout (as Civitai ships them), plus a kohya LoRA, merged and rendered.

Tiny widths, real names (tests/support/tiny_layouts.py): the result must equal the naive
arithmetic on the diffusers-named weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffgraph.merger.engine import MergeEngine
from diffgraph.merger.ldm_keys import diffusers_to_ldm
from diffgraph.merger.merge import MergeError
from diffgraph.merger.real_pipelines import load_single_file
from diffgraph.merger.recipe import BASE, ExpertWeight, MergeRecipe

from support import lora_writers as W
from support import tiny_layouts as tiny


def _flat(components: dict) -> dict:
    return {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}


def _configs(components: dict) -> dict:
    return {c: (m.config.to_dict() if c.startswith("text_encoder") else dict(m.config)) for c, m in components.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_engine")
    base, expert = tiny.sd15_components(seed=1), tiny.sd15_components(seed=2)
    base_file, expert_file = root / "base.safetensors", root / "expert.safetensors"
    save_file(diffusers_to_ldm(_flat(base), "sd15"), str(base_file))
    save_file(diffusers_to_ldm(_flat(expert), "sd15"), str(expert_file))
    factors, _ = W.lora_factors(base["unet"], ["to_q", "to_v"], rank=4, alpha=2.0, seed=3)
    lora = W.kohya({"unet": (base["unet"], factors)}, alpha=2.0, rank=4)
    lora_file = lora.save(root / "lora.safetensors")
    pipe = load_single_file(base_file, "sd15", configs=_configs(base))
    return dict(engine=MergeEngine(pipe), base=_flat(base), expert=_flat(expert), expert_file=expert_file,
                lora=lora, lora_file=lora_file, root=root)


def _recipe(world, checkpoint: float | None, lora: float | None) -> MergeRecipe:
    ckpts = [] if checkpoint is None else [ExpertWeight(BASE, 0.2), ExpertWeight("expert", checkpoint, str(world["expert_file"]))]
    loras = [] if lora is None else [ExpertWeight("lora", lora, str(world["lora_file"]))]
    return MergeRecipe("sd15", "a cat", ckpts, loras, seed=0, steps=2, guidance=1.0)


def test_an_ldm_checkpoint_expert_merges_like_naive_arithmetic(world):
    recipe = _recipe(world, 0.9, None)
    (_, w_base), (_, w_expert) = recipe.checkpoint_weights()
    merged = world["engine"].merged_base(recipe)
    assert set(merged) == set(world["base"])
    for key, value in world["base"].items():
        expected = w_base * value.float() + w_expert * world["expert"][key].float()
        torch.testing.assert_close(merged[key].float(), expected, rtol=1e-5, atol=1e-6, msg=key)


def test_a_kohya_lora_adds_its_delta_on_top_of_the_merged_base(world):
    recipe = _recipe(world, 0.9, 0.7)
    merged = world["engine"].merged_base(recipe)
    weights = world["engine"].weights(recipe)
    (_, c), = recipe.lora_weights()
    changed = {k for k in weights if not torch.equal(weights[k], merged[k])}
    assert changed == set(world["lora"].expected)
    for key, delta in world["lora"].expected.items():
        torch.testing.assert_close(weights[key] - merged[key], c * delta, rtol=1e-4, atol=1e-5, msg=key)


def test_the_merged_model_renders_and_a_mismatched_checkpoint_is_refused(world):
    image = world["engine"].render(_recipe(world, 0.9, 0.7))
    assert np.asarray(image).std() > 0
    other = tiny.sdxl_components(seed=4)
    bad = world["root"] / "sdxl.safetensors"
    save_file(diffusers_to_ldm(_flat(other), "sdxl"), str(bad))
    recipe = MergeRecipe("sd15", "a cat", [ExpertWeight(BASE, 0.2), ExpertWeight("xl", 0.9, str(bad))], seed=0, steps=2)
    with pytest.raises((MergeError, ValueError)) as exc:
        world["engine"].merged_base(recipe)
    assert "\n" not in str(exc.value)


def test_a_real_base_profile_comes_from_the_users_folder(world, tmp_path, monkeypatch):
    """DIFFGRAPH_BASE_SD15 names the user's base; published names map to the family; without
    it, SD1.5 experts are refused with a line that says what to set."""
    from diffgraph.tools import bases

    monkeypatch.delenv("DIFFGRAPH_BASE_SD15", raising=False)
    with pytest.raises(KeyError, match="DIFFGRAPH_BASE_SD15"):
        bases.profile("SD 1.5")
    assert not bases.has_profile("SD 1.5") and not bases.has_profile("SD 2.1")
    folder = tmp_path / "my-sd15"
    world["engine"].pipe.save_pretrained(str(folder))
    monkeypatch.setenv("DIFFGRAPH_BASE_SD15", str(folder))
    bases._engine.cache_clear()
    try:
        profile = bases.profile("SD 1.5")
        assert profile.name == "sd15" and bases.has_profile("sd15")
        refs, train = profile.reference_candidates(30), profile.training_prompts(20, 0)
        assert len(refs) == 30 and len(train) == 20 and not set(refs) & set(train)
        engine = bases.engine_for("SD 1.5")
        assert engine is bases.engine_for("sd15")
        image = engine.render(_recipe(world, None, 0.7))
        assert np.asarray(image).std() > 0
    finally:
        bases._engine.cache_clear()


def test_an_exported_checkpoint_is_in_ldm_names_and_loads_as_the_merged_weights(world, tmp_path):
    """`diffgraph export checkpoint` on a real SD 1.5 layout: the file A1111 and ComfyUI load
    (LDM names, nothing else) holds exactly the weights the engine renders with."""
    from diffgraph.merger.stream import read_recipe_metadata
    from diffgraph.tools.export import export_checkpoint

    recipe = _recipe(world, 0.9, 0.7)
    out = export_checkpoint(recipe, tmp_path / "merged.safetensors", engine=world["engine"])
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(diffusers_to_ldm(world["base"], "sd15"))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert read_recipe_metadata(out) == recipe
    loaded = load_single_file(out, "sd15", configs=_configs(tiny.sd15_components(seed=1)))
    weights = world["engine"].weights(recipe)
    for comp in ("unet", "vae", "text_encoder"):
        for key, value in getattr(loaded, comp).state_dict().items():
            torch.testing.assert_close(value, weights[f"{comp}.{key}"].float(), rtol=0, atol=0, msg=key)
