"""The streaming merge (merger/stream.py) on small synthetic files: it is the naive fp32
arithmetic, its single file round-trips with the recipe in its metadata, bad inputs fail in one
line, LoRA names land on LDM names, and a recipe becomes the right A1111 prompt."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffgraph.merger import stream
from diffgraph.merger.a1111 import merger_steps, recipe_to_a1111
from diffgraph.merger.merge import MergeError
from diffgraph.merger.recipe import BASE, ExpertWeight, MergeRecipe
from diffgraph.merger.stream import MergeStats, lora_key_map, merge_recipe_to_file, read_recipe_metadata, stream_merge
from diffgraph.tools.sources.validate import validate_safetensors
from safetensors.torch import load_file, save_file

SHAPES = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 6),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias": (8,),
    "model.diffusion_model.out.2.weight": (4, 8, 3, 3),
    "first_stage_model.decoder.conv_in.weight": (33, 5),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1000, 7),
}
WEIGHTS = [0.2, 0.5, 0.3]
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=2 ** -10, atol=1e-6),
       torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}


def _checkpoint(path, seed, dtype, shapes=SHAPES, extra=None):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    state.update(extra or {})
    save_file(state, str(path))
    return path


def _naive(paths, weights, dtype, fused=True):
    """Load everything, then the obvious fp32 code: w_0 x_0 + w_1 x_1 + ... (``fused``: as
    ``acc.add_(x, alpha=w)``, which the streamed sum reproduces bit for bit)."""
    states = [load_file(str(p)) for p in paths]
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first
            continue
        acc = states[0][key].float() * weights[0]
        for s, w in zip(states[1:], weights[1:]):
            acc = acc.add_(s[key].float(), alpha=w) if fused else acc + w * s[key].float()
        out[key] = acc.to(dtype)
    return out


@pytest.fixture(autouse=True)
def _small_mappings(monkeypatch):
    monkeypatch.setattr(stream, "MMAP_MIN_BYTES", 64)  # exercise the mapped reads on tiny tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("read_mode", ["auto", "auto-on-disk", "mmap", "pread"])
def test_streamed_sum_equals_naive_fp32_arithmetic(tmp_path, dtype, read_mode, monkeypatch):
    paths = [_checkpoint(tmp_path / f"c{i}.safetensors", i, dtype) for i in range(3)]
    if read_mode == "auto-on-disk":  # as if no page were cached: "auto" then reads with pread
        monkeypatch.setattr(stream._MADVISE, "resident", lambda mm: False)
        read_mode = "auto"
    # tiny chunks and a tiny prefetch window: every tensor is split and reads queue behind the sum
    merged = stream_merge(list(zip(paths, WEIGHTS)), read_mode=read_mode, chunk_elems=64, prefetch_bytes=256)
    naive, unfused = _naive(paths, WEIGHTS, dtype), _naive(paths, WEIGHTS, dtype, fused=False)
    assert set(merged) == set(naive)
    for key, want in naive.items():
        assert merged[key].dtype == want.dtype and merged[key].shape == want.shape, key
        assert torch.equal(merged[key], want), key  # bit for bit, whatever the chunking
        torch.testing.assert_close(merged[key].float(), unfused[key].float(), **TOL[dtype], msg=key)
    assert torch.equal(merged["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])


def test_mixed_input_dtypes_accumulate_in_fp32_and_output_dtype_is_selectable(tmp_path):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float16)
    b = _checkpoint(tmp_path / "b.safetensors", 1, torch.bfloat16)
    c = _checkpoint(tmp_path / "c.safetensors", 2, torch.float32)
    merged = stream_merge([(a, 0.2), (b, 0.5), (c, 0.3)], dtype=torch.float32)
    naive = _naive([a, b, c], WEIGHTS, torch.float32)
    for key, want in naive.items():
        if want.is_floating_point():
            assert merged[key].dtype == torch.float32
            torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-6)
    # by default the output takes the first checkpoint's dtype
    assert stream_merge([(a, 0.5), (c, 0.5)])["first_stage_model.decoder.conv_in.weight"].dtype == torch.float16


def _kohya_lora(path, rank, seed, modules, alpha=None, dtype=torch.float16):
    """modules: {kohya module name: (out, in, kernel)}."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out, inp, k) in modules.items():
        tail = (1, 1) if k else ()
        state[f"{name}.lora_down.weight"] = torch.randn(rank, inp, *((k, k) if k else ()), generator=g).to(dtype)
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, *tail, generator=g).to(dtype)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return state


def _delta(state, name, shape):
    up, down = state[f"{name}.lora_up.weight"].float(), state[f"{name}.lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else rank
    return (alpha / rank) * (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)


TO_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
PROJ_IN = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
OUT2 = "model.diffusion_model.out.2.weight"
KEY_MAP = {"lora_unet_q": TO_Q, "lora_unet_proj_in": PROJ_IN, "lora_unet_conv_out": OUT2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_deltas_are_added_as_the_tensors_stream_by(tmp_path, dtype):
    paths = [_checkpoint(tmp_path / f"c{i}.safetensors", i, dtype) for i in range(2)]
    l1 = _kohya_lora(tmp_path / "l1.safetensors", 4, 10, {"lora_unet_q": (8, 6, 0), "lora_unet_proj_in": (8, 8, 1)},
                     alpha=2)
    l2 = _kohya_lora(tmp_path / "l2.safetensors", 3, 11, {"lora_unet_q": (8, 6, 0), "lora_unet_conv_out": (4, 8, 3)})
    stats = MergeStats()
    merged = stream_merge([(paths[0], 0.4), (paths[1], 0.6)], [(tmp_path / "l1.safetensors", 0.7),
                                                               (tmp_path / "l2.safetensors", 0.3)],
                          key_map=KEY_MAP, chunk_elems=16, stats=stats)
    naive = _naive(paths, [0.4, 0.6], torch.float32)
    naive[TO_Q] += 0.7 * _delta(l1, "lora_unet_q", SHAPES[TO_Q]) + 0.3 * _delta(l2, "lora_unet_q", SHAPES[TO_Q])
    naive[PROJ_IN] += 0.7 * _delta(l1, "lora_unet_proj_in", SHAPES[PROJ_IN])
    naive[OUT2] += 0.3 * _delta(l2, "lora_unet_conv_out", SHAPES[OUT2])
    for key, want in naive.items():
        if want.is_floating_point():
            torch.testing.assert_close(merged[key].float(), want.to(dtype).float(), **TOL[dtype], msg=key)
    assert stats.lora_modules == 4 and stats.tensors == len(naive)


def test_bf16_lora_matmul_is_close_to_fp32(tmp_path):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float32)
    lora = _kohya_lora(tmp_path / "l.safetensors", 4, 10, {"lora_unet_q": (8, 6, 0), "lora_unet_conv_out": (4, 8, 3)},
                       alpha=2)
    exact = stream_merge([(a, 1.0)], [(tmp_path / "l.safetensors", 0.5)], key_map=KEY_MAP)
    fast = stream_merge([(a, 1.0)], [(tmp_path / "l.safetensors", 0.5)], key_map=KEY_MAP, lora_matmul="bf16")
    for key, name in ((TO_Q, "lora_unet_q"), (OUT2, "lora_unet_conv_out")):
        delta = 0.5 * _delta(lora, name, SHAPES[key])
        err = (fast[key] - exact[key]).abs().max()
        assert 0 < err <= 2 ** -6 * delta.abs().max(), key
        torch.testing.assert_close(exact[key], load_file(str(a))[key] + delta, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("read_mode", ["mmap", "pread"])
def test_single_file_round_trips_with_the_recipe_in_its_metadata(tmp_path, read_mode):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float16)
    b = _checkpoint(tmp_path / "b.safetensors", 1, torch.float16)
    _kohya_lora(tmp_path / "style.safetensors", 4, 3, {"lora_unet_q": (8, 6, 0)}, alpha=4)
    recipe = MergeRecipe("sd15", "a red fox", checkpoints=[ExpertWeight("civitai:1", 0.3, str(a)),
                                                            ExpertWeight("civitai:2", 0.9, str(b))],
                         loras=[ExpertWeight("civitai:3", 0.5, str(tmp_path / "style.safetensors")),
                                ExpertWeight(BASE, 0.5)], seed=7)
    out = merge_recipe_to_file(recipe, tmp_path / "out" / "merged.safetensors", key_map=KEY_MAP, prefetch_bytes=64,
                               read_mode=read_mode, chunk_elems=32)
    header = validate_safetensors(out)  # offsets tile the data exactly, metadata is str -> str
    assert json.loads(header.metadata["diffgraph_recipe"]) == json.loads(recipe.to_json())
    assert read_recipe_metadata(out).to_dict() == recipe.to_dict()
    assert not list(out.parent.glob("*.tmp"))
    ckpts, loras = stream.recipe_inputs(recipe)
    in_memory = stream_merge(ckpts, loras, key_map=KEY_MAP)
    on_disk = load_file(str(out))
    assert set(on_disk) == set(in_memory)
    for key in on_disk:
        assert torch.equal(on_disk[key], in_memory[key]), key
    assert (8 + int.from_bytes(out.read_bytes()[:8], "little")) % 8 == 0


def test_weights_in_memory_and_a_lone_checkpoint(tmp_path):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float16)
    base = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(a)).items()}  # like base_state
    b = _checkpoint(tmp_path / "b.safetensors", 1, torch.float16)
    merged = stream_merge([(base, 0.25), (b, 0.75)])  # the first input sets the output dtype: fp32
    naive = _naive([a, b], [0.25, 0.75], torch.float32)
    for key, want in naive.items():
        assert torch.equal(merged[key], want), key
    # into existing tensors (a model's parameters), even when they are an input themselves
    params = {k: v.clone() for k, v in base.items()}
    again = stream_merge([(params, 0.25), (b, 0.75)], into=params, chunk_elems=16)
    for key, want in naive.items():
        assert again[key] is params[key] and torch.equal(params[key], want), key
    alone = stream_merge([(a, 1.0)], out=tmp_path / "copy.safetensors")
    assert load_file(str(alone)).keys() == load_file(str(a)).keys()
    assert all(torch.equal(load_file(str(alone))[k], v) for k, v in load_file(str(a)).items())


def test_mismatched_checkpoints_raise_one_line(tmp_path):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float16)
    fewer = {k: v for k, v in SHAPES.items() if k != TO_Q}
    b = _checkpoint(tmp_path / "b.safetensors", 1, torch.float16, shapes=fewer)
    c = _checkpoint(tmp_path / "c.safetensors", 2, torch.float16, shapes={**SHAPES, TO_Q: (8, 7)})
    for other, pattern in ((b, r"b\.safetensors has different tensors .*1 missing"),
                           (c, r"c\.safetensors: tensor .*to_q\.weight has shape \[8, 7\]")):
        with pytest.raises(MergeError, match=pattern) as info:
            stream_merge([(a, 0.5), (other, 0.5)])
        assert "\n" not in str(info.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MergeError, match="not a valid safetensors file") as info:
        stream_merge([(a, 0.5), (bad, 0.5)])
    assert "\n" not in str(info.value)
    with pytest.raises(MergeError, match="no checkpoints"):
        stream_merge([])


def test_lora_for_a_missing_or_misshapen_tensor_raises(tmp_path):
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float16)
    _kohya_lora(tmp_path / "l.safetensors", 4, 0, {"lora_unet_q": (8, 6, 0), "lora_unet_nowhere": (8, 6, 0)})
    with pytest.raises(MergeError, match="lora_unet_nowhere targets a tensor that the checkpoint does not have") as info:
        stream_merge([(a, 1.0)], [(tmp_path / "l.safetensors", 1.0)], key_map=KEY_MAP)
    assert "\n" not in str(info.value)
    _kohya_lora(tmp_path / "w.safetensors", 4, 0, {"lora_unet_q": (8, 5, 0)})
    with pytest.raises(MergeError, match=r"lora_unet_q \(up \[8, 4\], down \[4, 5\]\) does not fit"):
        stream_merge([(a, 1.0)], [(tmp_path / "w.safetensors", 1.0)], key_map=KEY_MAP)
    save_file({"lora_unet_q.hada_w1_a": torch.zeros(8, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(MergeError, match="LoHa module lora_unet_q lacks hada_w1_b") as info:
        stream_merge([(a, 1.0)], [(tmp_path / "loha.safetensors", 1.0)], key_map=KEY_MAP)
    assert "\n" not in str(info.value)
    with pytest.raises(MergeError, match="not a plain LoRA weight"):  # a dict is taken as it is
        stream_merge([(a, 1.0)], [({"lora_unet_q.hada_w1_a": torch.zeros(8, 2)}, 1.0)], key_map=KEY_MAP)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_loha_file_streams_through_the_engines_reader(tmp_path):
    """LoRA files reach the streamed merge through merger.merge.read_lora, the reader the
    engine uses: a LoHa file lands as its exact delta, (w1a w1b) * (w2a w2b) * alpha / rank."""
    a = _checkpoint(tmp_path / "a.safetensors", 0, torch.float32)
    g = torch.Generator().manual_seed(3)
    loha = {f"lora_unet_q.{n}": torch.randn(s, generator=g) for n, s in
            (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 6)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 6)))}
    loha["lora_unet_q.alpha"] = torch.tensor(4.0)
    save_file(loha, str(tmp_path / "loha.safetensors"))
    merged = stream_merge([(a, 1.0)], [(tmp_path / "loha.safetensors", 0.5)], key_map=KEY_MAP)
    q = KEY_MAP["lora_unet_q"]
    delta = (loha["lora_unet_q.hada_w1_a"] @ loha["lora_unet_q.hada_w1_b"]) * \
        (loha["lora_unet_q.hada_w2_a"] @ loha["lora_unet_q.hada_w2_b"]) * (4.0 / 2)
    torch.testing.assert_close(merged[q], load_file(str(a))[q] + 0.5 * delta, rtol=1e-5, atol=1e-5)


def test_kohya_names_land_on_ldm_names_of_a_real_sd15_layout(tmp_path):
    """lora_unet_down_blocks_0_attentions_0_…_to_q -> unet.down_blocks.0… -> model.diffusion_model.input_blocks.1.1…"""
    from diffgraph.merger.ldm_keys import diffusers_to_ldm
    from support.tiny_layouts import sd15_components

    comps = sd15_components()
    state = {f"{c}.{k}": v for c, m in comps.items() for k, v in m.state_dict().items()}
    ldm = {k: v.to(torch.float16).contiguous() for k, v in diffusers_to_ldm(state, "sd15").items()}
    save_file(ldm, str(tmp_path / "ckpt.safetensors"))
    configs = {"unet": dict(comps["unet"].config), "vae": dict(comps["vae"].config),
               "text_encoder": comps["text_encoder"].config.to_dict()}
    src = stream.FileSource(tmp_path / "ckpt.safetensors")
    kmap = lora_key_map(src.infos, "sd15", configs)
    src.close()
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    up = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    assert kmap[q] == "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert kmap[te] == "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert kmap[up] == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert kmap["unet.down_blocks.0.attentions.0.proj_in"] == "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    shapes = {q: (32, 32, 0), te: (32, 32, 0)}
    lora = _kohya_lora(tmp_path / "l.safetensors", 4, 1, shapes, alpha=8)
    merged = stream_merge([(tmp_path / "ckpt.safetensors", 1.0)], [(tmp_path / "l.safetensors", 0.5)],
                          key_map=kmap)  # the default map (family guessed) needs merger/configs; inject it
    for name, key in ((q, kmap[q]), (te, kmap[te])):
        want = (ldm[key].float() + 0.5 * _delta(lora, name, ldm[key].shape)).half()
        torch.testing.assert_close(merged[key].float(), want.float(), **TOL[torch.float16])
    untouched = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    assert torch.equal(merged[untouched], ldm[untouched])


def test_recipe_as_an_a1111_prompt(tmp_path):
    recipe = MergeRecipe(
        "sd15", "a lighthouse at dusk",
        checkpoints=[ExpertWeight(BASE, 0.5), ExpertWeight("civitai:11", 0.2, "/m/dreamy-v2.safetensors"),
                     ExpertWeight("civitai:12", 0.9, "/m/Real:Vision.safetensors")],
        loras=[ExpertWeight("civitai:21", 0.8, "/l/film_grain.safetensors"), ExpertWeight("hf:me/neon", 0.1)],
        seed=42, steps=25, guidance=6.5, scheduler="EulerAncestralDiscreteScheduler", negative_prompt="blurry",
        width=512, height=768)
    export = recipe_to_a1111(recipe)
    lw = {e.name: w for e, w in recipe.lora_weights()}
    assert export.prompt == (f"a lighthouse at dusk <lora:film_grain:{lw['civitai:21']:.4g}> "
                             f"<lora:me_neon:{lw['hf:me/neon']:.4g}>")
    assert export.parameters == ("Steps: 25, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 512x768, "
                                 "Model: diffgraph-merge")
    text = export.text
    lines = text.splitlines()
    assert lines[-2:] == ["Negative prompt: blurry", export.parameters]
    assert all(line.startswith("#") for line in lines[:-3]) and lines[-3] == export.prompt
    # A1111's comment stripping leaves exactly the prompt with its tags
    stripped = re.sub("#[^\n]*(\n|$)", "\n", re.sub("(^|\n)#[^\n]*(\n|$)", "\n", "\n".join(lines[:-2])))
    assert stripped.strip() == export.prompt
    assert "Real_Vision" in text and "sd15" in text
    # chaining the Weighted-sum steps (A*(1-M) + B*M) rebuilds the recipe's checkpoint weights
    steps = merger_steps(recipe)
    assert [s.result for s in steps] == ["diffgraph-merge-step1", "diffgraph-merge"]
    share = {"sd15": 1.0}
    for s in steps:
        share = {k: v * (1 - s.multiplier) for k, v in share.items()}
        share[s.b] = s.multiplier
    want = {("sd15" if e.name == BASE else e.path.split("/")[-1].removesuffix(".safetensors").replace(":", "_")): w
            for e, w in recipe.checkpoint_weights()}
    assert share == pytest.approx(want)
    for i, s in enumerate(steps, 1):
        assert f"{i}. A = {s.a}, B = {s.b}, Multiplier M = {s.multiplier:.4g}" in text
    single = recipe_to_a1111(MergeRecipe("sd15", "x", loras=[ExpertWeight("a", 0.0, "/l/a.safetensors")]))
    assert single.prompt == "x <lora:a:1>" and single.parameters.endswith("Model: sd15")
