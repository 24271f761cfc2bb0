"""LoRA formats of the wild on the real SD 1.5, SDXL and FLUX.1 layouts (tiny width, real depth).

Every format is named; every supported one loads with full coverage and gives each module the
delta its format's arithmetic says ((alpha/rank) B A, LoHa's Hadamard product, LoKr's Kronecker
product, LoCon's Tucker composition) within 1e-5; a file for another base, a file part of
whose keys land nowhere, and the variants DiffGraph does not merge are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgraph.merger.lora_coverage import coverage_report
from diffgraph.merger.lora_formats import identify_lora_format, lora_family, normalize_lora, prepare_lora
from diffgraph.merger.merge import MergeError, lora_deltas
from support import lora_writers as W
from support.tiny_layouts import clip_text, flux_components, sd15_components, sdxl_components

RANK, ALPHA = 4, 8.0
# LoRA targets: a spread of modules through every level (deep transformer blocks included), kept
# small because PEFT's injection, not DiffGraph, dominates the load time
SD15_UNET = r".*(down_blocks\.[02]|mid_block|up_blocks\.[13])\.attentions\.[01]\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
SDXL_UNET = (r".*(down_blocks\.1\.attentions\.1\.transformer_blocks\.1|down_blocks\.2\.attentions\.0\.transformer_blocks\.(0|9)"
             r"|mid_block\.attentions\.0\.transformer_blocks\.5|up_blocks\.0\.attentions\.2\.transformer_blocks\.[37]"
             r"|up_blocks\.1\.attentions\.0\.transformer_blocks\.1)\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
CLIP = r".*layers\.(0|5|11)\.self_attn\.(q_proj|v_proj|out_proj)|.*layers\.3\.mlp\.fc[12]"
CLIP_G = r".*layers\.(1|20|31)\.self_attn\.(k_proj|out_proj)|.*layers\.30\.mlp\.fc1"
SD15_CONV = (r".*(down_blocks\.0\.resnets\.1|down_blocks\.3\.resnets\.0|mid_block\.resnets\.1|up_blocks\.0\.resnets\.2"
             r"|up_blocks\.3\.resnets\.0)\.(conv1|conv2|conv_shortcut|time_emb_proj)|.*(downsamplers|upsamplers)\.0\.conv")
SDXL_CONV = (r".*(down_blocks\.1\.resnets\.0|mid_block\.resnets\.0|up_blocks\.0\.resnets\.1|up_blocks\.2\.resnets\.2)"
             r"\.(conv1|conv2|conv_shortcut|time_emb_proj)|.*(downsamplers|upsamplers)\.0\.conv")
FLUX = (r".*(transformer_blocks\.(0|11|18)\.(attn\.(to_q|to_k|add_v_proj|to_add_out)|ff\.net\.2|norm1\.linear)"
        r"|single_transformer_blocks\.(0|20|37)\.(attn\.to_v|proj_out|proj_mlp))")


def _tokenizer(tmp_path_factory):
    from diffgraph.miniworld.models import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("clip_bpe"))


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def sd15(clip_tokenizer):
    from diffusers import StableDiffusionPipeline

    c = sd15_components()
    return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=clip_tokenizer, unet=c["unet"],
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def sdxl(clip_tokenizer):
    from diffusers import StableDiffusionXLPipeline

    c = sdxl_components()
    return StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                     tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer, unet=c["unet"],
                                     scheduler=_scheduler())


@pytest.fixture(scope="module")
def flux(clip_tokenizer):
    """FluxPipeline: tiny CLIP-L (pooled) + tiny T5 with a T5 tokenizer built offline from a word list."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    c = flux_components()
    words = ["a", "an", "the", "cat", "dog", "red", "blue", "photo", "of"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -float(i)) for i, w in enumerate(words)]
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=c["vae"], text_encoder=clip_text(32, 12),
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=T5TokenizerFast(vocab=vocab, extra_ids=0),
                        transformer=c["transformer"])


def _factors(model, targets, seed, alpha=ALPHA):
    factors, config = W.lora_factors(model, targets, RANK, alpha, seed)
    assert factors, targets
    return model, factors, config


@pytest.fixture(scope="module")
def sd15_lora(sd15):
    return {"unet": _factors(sd15.unet, SD15_UNET, 1), "text_encoder": _factors(sd15.text_encoder, CLIP, 2),
            "conv": _factors(sd15.unet, SD15_CONV, 3, alpha=2.0)}


@pytest.fixture(scope="module")
def sdxl_lora(sdxl):
    return {"unet": _factors(sdxl.unet, SDXL_UNET, 4), "text_encoder": _factors(sdxl.text_encoder, CLIP, 5),
            "text_encoder_2": _factors(sdxl.text_encoder_2, CLIP_G, 6), "conv": _factors(sdxl.unet, SDXL_CONV, 7, alpha=2.0)}


@pytest.fixture(scope="module")
def flux_lora(flux):
    return {"transformer": _factors(flux.transformer, FLUX, 8), "text_encoder": _factors(flux.text_encoder, CLIP, 9)}


def _parts(lora, *components):
    """{component: (model, factors)} for the writers ("conv" is the UNet's LoCon set)."""
    return {("unet" if c == "conv" else c): lora[c][:2] for c in components}


def _modules(lora, component, n, offset=0):
    model, factors, _ = lora[component]
    names = list(factors)[offset:offset + n]
    found = dict(model.named_modules())
    return {f"{'unet' if component == 'conv' else component}.{name}": found[name] for name in names}


def assert_exact(pipe, written: W.Written, path: Path, fmt: str, **kw):
    path = written.save(path)
    if path.is_file():
        assert identify_lora_format(load_file(str(path))) == fmt
    deltas = lora_deltas(pipe, path, **kw)
    assert set(deltas) == set(written.expected), sorted(set(deltas) ^ set(written.expected))[:4]
    for key, want in written.expected.items():
        assert torch.allclose(deltas[key], want, atol=1e-5, rtol=0), (key, (deltas[key] - want).abs().max().item())
    assert not any(".lora_" in n for c in ("unet", "text_encoder", "text_encoder_2", "transformer")
                   if getattr(pipe, c, None) is not None for n, _ in getattr(pipe, c).named_parameters()), \
        "the adapter is unloaded again"
    return deltas


# ---------------------------------------------------------------------------------------------- naming


def test_every_format_is_named(sd15, sd15_lora, sdxl_lora, flux, flux_lora):
    sd = W.kohya(_parts(sd15_lora, "unet", "text_encoder"), ALPHA, RANK).state
    assert identify_lora_format(sd) == "kohya" and lora_family(sd) == "sd"
    xl = W.ldm_kohya(_parts(sdxl_lora, "unet", "text_encoder", "text_encoder_2"), ALPHA, RANK, "sdxl").state
    assert identify_lora_format(xl) == "ldm-kohya" and lora_family(xl) == "sdxl"
    assert any(k.startswith("lora_unet_input_blocks_7_1_transformer_blocks_9_") for k in xl)
    assert identify_lora_format(W.kohya(_parts(sd15_lora, "conv"), 2.0, RANK).state) == "lycoris-locon"
    assert identify_lora_format(W.loha(_modules(sd15_lora, "unet", 2), 2, ALPHA, 0).state) == "lycoris-loha"
    assert identify_lora_format(W.lokr(_modules(sd15_lora, "unet", 2), 2, ALPHA, 0).state) == "lycoris-lokr"
    assert identify_lora_format(W.unprefixed(_parts(sd15_lora, "unet"), RANK, ALPHA).state) == "diffusers"
    assert identify_lora_format([f"unet.{m}.lora_A.weight" for m in sd15_lora["unet"][1]]) == "diffusers"
    assert identify_lora_format([f"base_model.model.{m}.lora_A.weight" for m in sd15_lora["unet"][1]]) == "peft-native"
    fk = W.flux_kohya(flux.transformer, RANK, ALPHA, 0).state
    assert identify_lora_format(fk) == "flux-kohya" and lora_family(fk) == "flux"
    assert identify_lora_format(W.flux_comfy(flux.transformer, RANK, ALPHA, 0).state) == "flux-comfy"
    assert identify_lora_format([f"transformer.{m}.lora_B.weight" for m in flux_lora["transformer"][1]]) == "diffusers"
    assert lora_family([f"transformer.{m}.lora_B.weight" for m in flux_lora["transformer"][1]]) == "flux"
    # formats diffusers converts itself, by their key shapes
    assert identify_lora_format(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "flux-xlabs"
    assert identify_lora_format(["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"]) == "flux-kohya-diffusers"
    assert identify_lora_format(["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"]) == "flux-fal-kontext"
    assert identify_lora_format(["img_in.lora_A.weight", "double_blocks.0.img_attn.norm.query_norm.scale"]) == "flux-control"
    assert identify_lora_format(["model.diffusion_model.input_blocks.0.0.weight"]) == "unknown"
    # what diffusers converts itself is left to its converters
    assert normalize_lora(sd, "sd15", unet_config=sd15.unet.config) is sd


# ---------------------------------------------------------------------------------------------- SD 1.5


def test_sd15_kohya_diffusers_peft_and_ldm(sd15, sd15_lora, tmp_path):
    from diffusers import StableDiffusionPipeline

    both = _parts(sd15_lora, "unet", "text_encoder")
    assert_exact(sd15, W.kohya(both, ALPHA, RANK), tmp_path / "kohya.safetensors", "kohya")
    configs = {c: sd15_lora[c][2] for c in both}
    assert_exact(sd15, W.diffusers_file(StableDiffusionPipeline, tmp_path / "diffusers", both, configs, RANK, ALPHA),
                 tmp_path / "unused", "diffusers")
    # PEFT state dicts saved as they are: no component prefix, which diffusers would silently drop
    assert_exact(sd15, W.unprefixed(_parts(sd15_lora, "unet"), RANK, ALPHA), tmp_path / "bare.safetensors", "diffusers")
    unet, factors, config = sd15_lora["unet"]
    peft = W.peft_native(tmp_path / "peft", "unet", unet, factors, config)
    assert identify_lora_format(load_file(str(peft.path))) == "peft-native"
    assert_exact(sd15, peft, tmp_path / "unused", "peft-native")
    assert_exact(sd15, W.ldm_kohya(both, ALPHA, RANK, "sd15"), tmp_path / "ldm.safetensors", "ldm-kohya")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_text_encoder_modules_without_out_proj(family, sd15, sdxl, sd15_lora, sdxl_lora, tmp_path):
    """Trainers that adapt only q/k/v of the text encoder write files diffusers cannot load as
    they are ("Could not automatically infer state dict type": it tells its old text-encoder
    naming by a to_out_lora key); they load through diffusers' converters, exactly."""
    pipe, lora = (sd15, sd15_lora) if family == "sd15" else (sdxl, sdxl_lora)
    tes = ("text_encoder",) if family == "sd15" else ("text_encoder", "text_encoder_2")
    parts = _parts(lora, "unet", *tes)
    for te in tes:
        model, factors = parts[te]
        parts[te] = (model, {m: f for m, f in factors.items() if "out_proj" not in m and "mlp" not in m})
        assert parts[te][1]
    assert_exact(pipe, W.kohya(parts, ALPHA, RANK, family), tmp_path / "qv.safetensors", "kohya")


def test_sd15_lycoris_locon_loha_lokr(sd15, sd15_lora, tmp_path):
    # LoCon: conv/resnet layers too, conv_alpha (2) != alpha (8) and the attention modules in the
    # minority (diffusers 0.42 alone gives those the conv alpha), one 3x3 conv with a Tucker core
    few_attn = {"unet": (sd15.unet, dict(list(sd15_lora["unet"][1].items())[:6]))}
    attn, conv = W.kohya(few_attn, ALPHA, RANK), W.kohya(_parts(sd15_lora, "conv"), 2.0, RANK)
    locon = W.Written({**attn.state, **conv.state}, {**attn.expected, **conv.expected})
    locon = W.with_tucker_mid(locon, sd15.unet, "down_blocks.1.resnets.0.conv2", RANK, 3.0, seed=11)
    assert_exact(sd15, locon, tmp_path / "locon.safetensors", "lycoris-locon")
    modules = {**_modules(sd15_lora, "unet", 5), **_modules(sd15_lora, "conv", 5), **_modules(sd15_lora, "text_encoder", 3)}
    assert any(m.weight.ndim == 4 and m.weight.shape[-1] == 3 for m in modules.values()), "a 3x3 conv is among them"
    assert_exact(sd15, W.loha(modules, 3, 5.0, seed=12), tmp_path / "loha.safetensors", "lycoris-loha")
    assert_exact(sd15, W.lokr(modules, 3, 5.0, seed=13), tmp_path / "lokr.safetensors", "lycoris-lokr")


# ---------------------------------------------------------------------------------------------- SDXL


def test_sdxl_formats(sdxl, sdxl_lora, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    three = _parts(sdxl_lora, "unet", "text_encoder", "text_encoder_2")
    assert_exact(sdxl, W.kohya(three, ALPHA, RANK, "sdxl"), tmp_path / "kohya.safetensors", "kohya")
    # sd-scripts trains SDXL on the LDM UNet: its files name input_blocks/middle_block/output_blocks
    assert_exact(sdxl, W.ldm_kohya(three, ALPHA, RANK, "sdxl"), tmp_path / "ldm.safetensors", "ldm-kohya")
    conv = W.ldm_kohya(_parts(sdxl_lora, "conv"), 2.0, RANK, "sdxl")
    assert any("_output_blocks_2_2_conv." in k for k in conv.state) and any("_input_blocks_3_0_op." in k for k in conv.state)
    assert_exact(sdxl, conv, tmp_path / "ldm_locon.safetensors", "lycoris-locon")
    configs = {c: sdxl_lora[c][2] for c in three}
    assert_exact(sdxl, W.diffusers_file(StableDiffusionXLPipeline, tmp_path / "diffusers", three, configs, RANK, ALPHA),
                 tmp_path / "unused", "diffusers")
    unet, factors, config = sdxl_lora["unet"]
    assert_exact(sdxl, W.peft_native(tmp_path / "peft", "unet", unet, factors, config), tmp_path / "unused", "peft-native")
    # a PEFT save of text_encoder_2 names CLIP modules both encoders have (same width here): placed by the whole file
    te2, factors2, config2 = sdxl_lora["text_encoder_2"]
    assert_exact(sdxl, W.peft_native(tmp_path / "peft2", "text_encoder_2", te2, factors2, config2), tmp_path / "unused",
                 "peft-native")
    modules = {**_modules(sdxl_lora, "unet", 4), **_modules(sdxl_lora, "conv", 4), **_modules(sdxl_lora, "text_encoder_2", 3)}

    def ldm_stem(component, module, family):
        if component == "unet":
            return "lora_unet_" + W.ldm_name(module, sdxl.unet).replace(".", "_")
        return W.kohya_stem(component, module, "sdxl")

    assert_exact(sdxl, W.loha(modules, 3, 5.0, seed=14, stem=ldm_stem), tmp_path / "loha.safetensors", "lycoris-loha")
    assert_exact(sdxl, W.lokr(modules, 3, 5.0, seed=15, stem=ldm_stem), tmp_path / "lokr.safetensors", "lycoris-lokr")


# ---------------------------------------------------------------------------------------------- FLUX


def test_flux_formats(flux, flux_lora, tmp_path):
    from diffusers import FluxPipeline

    # sd-scripts: fused qkv split by diffusers' converter (the coverage proof follows the rows),
    # img_in, which diffusers 0.42's converter emits without its "transformer." prefix
    kohya = W.flux_kohya(flux.transformer, RANK, ALPHA, seed=16, text_encoder=flux_lora["text_encoder"][:2])
    deltas = assert_exact(flux, kohya, tmp_path / "kohya.safetensors", "flux-kohya")
    assert "transformer.x_embedder.weight" in deltas and "transformer.transformer_blocks.7.attn.add_k_proj.weight" in deltas
    assert_exact(flux, W.flux_comfy(flux.transformer, RANK, ALPHA, seed=17), tmp_path / "comfy.safetensors", "flux-comfy")
    parts = _parts(flux_lora, "transformer")
    assert_exact(flux, W.diffusers_file(FluxPipeline, tmp_path / "diffusers", parts, {"transformer": flux_lora["transformer"][2]},
                                        RANK, ALPHA), tmp_path / "unused", "diffusers")
    model, factors, config = flux_lora["transformer"]
    assert_exact(flux, W.peft_native(tmp_path / "peft", "transformer", model, factors, config), tmp_path / "unused",
                 "peft-native")
    names = [n for n in factors if n.endswith(("to_add_out", "ff.net.2", "norm1.linear", "proj_out"))]
    modules = {f"transformer.{n}": dict(model.named_modules())[n] for n in names}
    assert_exact(flux, W.loha(modules, 3, 5.0, seed=18, stem=W.flux_kohya_stem), tmp_path / "loha.safetensors", "lycoris-loha")
    assert_exact(flux, W.lokr(modules, 3, 5.0, seed=19, stem=W.flux_kohya_stem), tmp_path / "lokr.safetensors", "lycoris-lokr")


# ---------------------------------------------------------------------------------------------- refusals


def _refused(pipe, state, tmp_path, match, name="x.safetensors", **kw):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(MergeError, match=match) as err:
        lora_deltas(pipe, path, **kw)
    assert "\n" not in str(err.value), "one line"
    for c in ("unet", "text_encoder", "text_encoder_2", "transformer"):
        model = getattr(pipe, c, None)
        assert model is None or not any(".lora_" in n for n, _ in model.named_parameters()), "nothing stays loaded"
    return str(err.value)


def test_lora_for_another_base_is_refused(sd15, sdxl, flux, sd15_lora, sdxl_lora, tmp_path):
    xl = W.kohya(_parts(sdxl_lora, "unet", "text_encoder", "text_encoder_2"), ALPHA, RANK, "sdxl").state
    _refused(sd15, xl, tmp_path, r"this LoRA is for SDXL .*; the base model is SD 1\.5")
    _refused(sd15, W.ldm_kohya(_parts(sdxl_lora, "unet"), ALPHA, RANK, "sdxl").state, tmp_path, "for SDXL")
    sd = W.kohya(_parts(sd15_lora, "unet", "text_encoder"), ALPHA, RANK).state
    _refused(flux, sd, tmp_path, r"this LoRA is for Stable Diffusion .*; the base model is FLUX\.1")
    _refused(sdxl, W.flux_kohya(flux.transformer, RANK, ALPHA, 0).state, tmp_path, r"for FLUX\.1 .*; the base model is SDXL")
    # an SDXL UNet LoRA in diffusers naming says nothing of its base: its shapes and modules do
    _refused(sd15, W.diffusers_tensors(_parts(sdxl_lora, "unet")), tmp_path, r"does not fit this base model: size mismatch")
    # a LoRA that makes diffusers widen FLUX's input layer (Control-style) is refused and the widening undone
    before = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    wide = {"transformer.x_embedder.lora_A.weight": torch.randn(RANK, 128), "transformer.x_embedder.lora_B.weight": torch.randn(32, RANK)}
    _refused(flux, wide, tmp_path, r"changed the shape of transformer\.x_embedder\.weight")
    after = flux.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_keys_that_land_nowhere_are_refused_by_the_coverage_proof(sd15, sd15_lora, tmp_path):
    written = W.kohya(_parts(sd15_lora, "unet", "text_encoder"), ALPHA, RANK)
    stems = sorted({k.split(".")[0] for k in written.state if k.startswith("lora_unet_")})[:5]
    garbage = {}
    for key, value in written.state.items():
        stem, _, rest = key.partition(".")
        garbage[(stem.replace("lora_unet_", "lora_unet_garbage_") if stem in stems else stem) + "." + rest] = value
    path = tmp_path / "garbage.safetensors"
    save_file(garbage, str(path))
    # diffusers itself loads this without a word, rendering without the renamed modules
    pipe_file = load_file(str(path))
    sd15.load_lora_weights(str(path), adapter_name="plain")
    report = coverage_report(sd15, "plain", pipe_file)
    sd15.unload_lora_weights()
    total = sum(1 for k in garbage if ".lora_" in k)
    assert report.total == total and report.landed == total - 2 * len(stems)
    message = _refused(sd15, garbage, tmp_path, r"only \d+ of \d+ LoRA matrices landed", name="garbage.safetensors")
    assert f"only {total - 2 * len(stems)} of {total}" in message and "lora_unet_garbage_" in message
    # the threshold is configurable: at 0.9 the modules that landed merge, exactly
    deltas = lora_deltas(sd15, path, min_coverage=0.9)
    assert len(deltas) == len(written.expected) - len(stems)
    for key, value in deltas.items():
        assert torch.allclose(value, written.expected[key], atol=1e-5), key
    # in diffusers naming too
    bare = {k.replace("unet.down_blocks.0.", "unet.down_blocks.0.nowhere.") if "down_blocks.0." in k else k: v
            for k, v in W.diffusers_tensors(_parts(sd15_lora, "unet")).items()}
    assert any("nowhere" in k for k in bare)
    _refused(sd15, bare, tmp_path, r"only \d+ of \d+ LoRA matrices landed .*nowhere", name="bare.safetensors")


def test_flux_keys_diffusers_cannot_convert_are_refused(flux, tmp_path):
    state = W.flux_kohya(flux.transformer, RANK, ALPHA, 0).state
    state["lora_unet_double_blocks_3_img_attn_garbage.lora_down.weight"] = torch.randn(RANK, 32)
    state["lora_unet_double_blocks_3_img_attn_garbage.lora_up.weight"] = torch.randn(32, RANK)
    _refused(flux, state, tmp_path, r"diffusers cannot convert this FLUX LoRA|LoRA matrices landed")


def test_unsupported_variants_are_refused_in_one_line(sd15, sd15_lora, flux, tmp_path):
    modules = _modules(sd15_lora, "conv", 3)
    loha = W.loha(modules, 2, ALPHA, 0).state
    stem = next(iter(loha)).rsplit(".", 1)[0]
    _refused(sd15, {**loha, f"{stem}.hada_t1": torch.randn(2, 2, 3, 3)}, tmp_path, "Tucker decomposition")
    lora = W.kohya(_parts(sd15_lora, "unet"), ALPHA, RANK).state
    s = next(iter(lora)).rsplit(".", 2)[0]
    _refused(sd15, {**lora, f"{s}.dora_scale": torch.ones(1, 32)}, tmp_path, "DoRA")
    _refused(sd15, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, tmp_path, "unrecognised LoRA format")
    _refused(flux, {"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
                    "transformer.transformer_blocks.0.attn.norm_q.query_norm.scale": torch.ones(16)}, tmp_path, "Control LoRA")
    peft = {f"base_model.model.{m}.lora_{n}.weight": t for m, (a, b) in sd15_lora["unet"][1].items() for n, t in (("A", a), ("B", b))}
    _refused(sd15, peft, tmp_path, "adapter_config.json")
    with pytest.raises(MergeError, match="Tucker"):
        prepare_lora({**loha, f"{stem}.hada_t1": torch.randn(2, 2, 3, 3)}, "sd15", unet_config=sd15.unet.config)


def test_peft_native_alpha_comes_from_its_adapter_config(sd15, sd15_lora, tmp_path):
    unet, factors, config = sd15_lora["unet"]
    written = W.peft_native(tmp_path / "peft", "unet", unet, factors, config)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == ALPHA and cfg["r"] == RANK
    deltas = lora_deltas(sd15, tmp_path / "peft")  # the folder save_pretrained wrote works as well
    for key, want in written.expected.items():
        assert torch.allclose(deltas[key], want, atol=1e-5), key
