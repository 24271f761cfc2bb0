"""Merging and rendering: the streamed checkpoint merge is exact arithmetic, the LoRA merge is
diffusers' fuse_lora, a LoRA for another base is refused, caches stay bounded, and a PNG's
embedded recipe replays to the same pixels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffgraph.merger.engine import ByteLRU, MergeEngine, pipeline_state
from diffgraph.merger.merge import MergeError
from diffgraph.merger.png import a1111_parameters, read_recipe, save_png
from diffgraph.merger.recipe import BASE, ExpertWeight, MergeRecipe
from diffgraph.miniworld import artifacts_io
from diffgraph.miniworld.experts import BASE_MODEL


@pytest.fixture(scope="module")
def engine(artifacts_dir):
    return MergeEngine(artifacts_io.load_pipeline(artifacts_dir))


def _entry(root, slug, coefficient=0.0):
    e = artifacts_io.expert_entry(slug, root)
    return ExpertWeight(slug, coefficient, str(root / e["file"]), e["sha256"])


def test_streamed_checkpoint_merge_equals_naive_arithmetic(engine, artifacts_dir):
    """The engine's merged base (the streaming engine, fp16 files in, fp32 out) is the naive
    state-dict sum, in fresh tensors: neither the base nor the cached entry can be changed
    through another recipe's result."""
    recipe = MergeRecipe(BASE_MODEL, "x", checkpoints=[_entry(artifacts_dir, "pastel-dream", 0.3),
                                                       _entry(artifacts_dir, "neon-nights", 0.7)])
    (_, wa), (_, wb) = recipe.checkpoint_weights()
    merged = engine.merged_base(recipe)
    sa = load_file(str(artifacts_io.expert_file("pastel-dream", artifacts_dir)))
    sb = load_file(str(artifacts_io.expert_file("neon-nights", artifacts_dir)))
    assert set(merged) == set(sa) == set(engine.base_state)
    for key in sa:
        assert merged[key].dtype == torch.float32, key
        naive = wa * sa[key].float() + wb * sb[key].float()
        assert torch.allclose(merged[key], naive, atol=1e-6), key
    assert engine.merged_base(recipe) is merged, "cached by the checkpoint part of the recipe"
    anchored = MergeRecipe(BASE_MODEL, "x", checkpoints=[ExpertWeight(BASE, 0.5), recipe.checkpoints[0]])
    shared = {t.data_ptr() for t in [*merged.values(), *engine.base_state.values()]}
    assert not shared & {t.data_ptr() for t in engine.merged_base(anchored).values()}


def test_checkpoint_merge_with_base_uses_softmax(engine, artifacts_dir):
    recipe = MergeRecipe(BASE_MODEL, "x", checkpoints=[ExpertWeight(BASE, 1.0), _entry(artifacts_dir, "mono-classic", 0.0)])
    w_base, w_mono = [w for _, w in recipe.checkpoint_weights()]
    assert w_base == pytest.approx(np.e / (np.e + 1))
    merged = engine.merged_base(recipe)
    mono = load_file(str(artifacts_io.expert_file("mono-classic", artifacts_dir)))
    key = "unet.conv_in.weight"
    assert torch.allclose(merged[key], w_base * engine.base_state[key] + w_mono * mono[key].float(), atol=1e-6)


@pytest.mark.parametrize("lora_strength", [None, 1.5], ids=["softmax", "own-strengths"])
def test_lora_merge_equals_diffusers_fuse_lora(engine, artifacts_dir, lora_strength):
    slugs = ["stripes-pro", "pink-pop"]  # one kohya file, one diffusers file
    recipe = MergeRecipe(BASE_MODEL, "x", loras=[_entry(artifacts_dir, slugs[0], 0.8), _entry(artifacts_dir, slugs[1], 0.1)],
                         lora_strength=lora_strength)
    ours = engine.weights(recipe)
    weights = [w for _, w in recipe.lora_weights()]
    if lora_strength is None:
        assert sum(weights) == pytest.approx(1.0)
    else:  # A1111-style: each at coefficient x strength, not normalised
        assert weights == pytest.approx([1.2, 0.15])
    pipe = copy.deepcopy(engine.pipe)
    for slug in slugs:
        pipe.load_lora_weights(str(artifacts_io.expert_file(slug, artifacts_dir)), adapter_name=slug.replace("-", "_"))
    names = [s.replace("-", "_") for s in slugs]
    pipe.set_adapters(names, weights)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()
    theirs = pipeline_state(pipe)
    changed = 0
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=1e-5), key
        changed += not torch.equal(value, engine.base_state[key])
    assert changed > 50, "the LoRAs changed the weights"


def test_lora_for_another_base_is_refused(engine, tmp_path, artifacts_dir):
    state = load_file(str(artifacts_io.expert_file("pink-pop", artifacts_dir)))
    wrong = {k: (torch.randn(v.shape[0], v.shape[1] + 8, *v.shape[2:]) if ".lora_A." in k else v) for k, v in state.items()}
    from safetensors.torch import save_file

    path = tmp_path / "other-base.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(path))
    recipe = MergeRecipe(BASE_MODEL, "x", loras=[ExpertWeight("other", 0.0, str(path), None)])
    before = {k: v.clone() for k, v in pipeline_state(engine.pipe).items()}
    with pytest.raises(MergeError, match="does not fit this base model"):
        engine.weights(recipe)
    after = pipeline_state(engine.pipe)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused LoRA leaves the pipeline untouched"


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(engine, tmp_path, artifacts_dir):
    """The base's names but one tensor widened: refused before any tensor is summed, naming the
    file and the tensor, with or without the base among the inputs."""
    from safetensors.torch import save_file

    state = load_file(str(artifacts_io.expert_file("pastel-dream", artifacts_dir)))
    state["unet.conv_in.weight"] = torch.zeros(state["unet.conv_in.weight"].shape[0] + 1, *state["unet.conv_in.weight"].shape[1:])
    path = tmp_path / "wider.safetensors"
    save_file(state, str(path))
    wider = ExpertWeight("wider", 0.5, str(path))
    for checkpoints in ([wider], [wider, _entry(artifacts_dir, "neon-nights", 0.5)], [ExpertWeight(BASE, 0.5), wider]):
        with pytest.raises(MergeError, match="wider.safetensors") as info:
            engine.merged_base(MergeRecipe(BASE_MODEL, "x", checkpoints=checkpoints))
        assert "unet.conv_in.weight" in str(info.value) and "\n" not in str(info.value)


def test_byte_lru_stays_bounded():
    lru = ByteLRU(max_bytes=3 * 400)
    for i in range(10):
        lru.put(str(i), {"t": torch.zeros(100)})  # 400 bytes each
    assert len(lru) == 3 and lru.total_bytes <= 1200 and lru.evictions == 7
    assert lru.get("0") is None and lru.get("9") is not None


def test_png_recipe_replays_bit_for_bit(engine, artifacts_dir, tmp_path):
    recipe = MergeRecipe(BASE_MODEL, "a purple triangle on a checkered beige background", seed=42,
                         loras=[_entry(artifacts_dir, "royal-purple", 0.4), _entry(artifacts_dir, "checkerboard", -0.2)])
    image = engine.render(recipe)
    path = save_png(image, tmp_path / "out.png", recipe)
    replayed = read_recipe(path)
    assert replayed == recipe
    engine.render(MergeRecipe(BASE_MODEL, "something else", seed=1))  # disturb the loaded weights
    again = engine.render(replayed)
    assert np.array_equal(np.asarray(again), np.asarray(image))
    params = a1111_parameters(recipe)
    assert "<lora:royal-purple:" in params and "Seed: 42" in params
