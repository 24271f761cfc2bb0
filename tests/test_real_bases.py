"""Real bases offline: LDM/SGM/BFL single-file names, base-model detection, loading.

Real weights cannot be downloaded here, so tiny random models with the exact module names of
SD1.5, SDXL and FLUX.1 (tests/support/tiny_layouts.py) are written as real single files; the
shipped real configs are checked on the meta device (parameter counts of the published
models), with no weights allocated.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffgraph.merger.detect import (
    BaseDetectionError, BaseMismatchError, detect_base, explain_base, family_of, reconcile_base,
)
from diffgraph.merger.ldm_keys import bfl_to_flux, diffusers_to_ldm, ldm_to_diffusers
from diffgraph.merger.real_pipelines import (
    BaseLoadError, load_base, load_components, load_single_file, resolve_configs, shipped_configs,
)
from support import tiny_layouts as tiny

BUILDERS = {"sd15": tiny.sd15_components, "sdxl": tiny.sdxl_components, "flux": tiny.flux_components}


def _configs(components: dict) -> dict:
    return {c: (m.config.to_dict() if c.startswith("text_encoder") else dict(m.config)) for c, m in components.items()}


def _flat(components: dict) -> dict:
    return {f"{c}.{k}": v for c, m in components.items() for k, v in m.state_dict().items()}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


# what published single files carry beside the weights (buffers, training leftovers)
EXTRAS = {
    "sd15": {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6), "denoiser.sigmas": torch.rand(1000)},
    "flux": {},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (components, configs, LDM/BFL single file (with the extras published files
    carry), diffusers-named single file)."""
    root = tmp_path_factory.mktemp("real_bases")
    out = {}
    for family, build in BUILDERS.items():
        comps = build(seed=1)
        flat = _flat(comps)
        original, named = root / f"{family}-original.safetensors", root / f"{family}-diffusers.safetensors"
        save_file({**diffusers_to_ldm(flat, family), **EXTRAS[family]}, str(original))
        save_file({k: v.contiguous() for k, v in flat.items()}, str(named))
        out[family] = (comps, _configs(comps), original, named)
    return out


# -- key conversion ------------------------------------------------------------------------

REAL_NAMES = {  # names as they appear in the published single files
    "sd15": ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
             "model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
             "model.diffusion_model.output_blocks.2.1.conv.weight", "model.diffusion_model.output_blocks.5.2.conv.weight",
             "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
             "model.diffusion_model.input_blocks.4.0.skip_connection.weight", "model.diffusion_model.out.2.weight",
             "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
             "first_stage_model.encoder.down.0.downsample.conv.weight", "first_stage_model.quant_conv.weight",
             "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
    "sdxl": ["model.diffusion_model.label_emb.0.0.weight",
             "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
             "model.diffusion_model.output_blocks.2.2.conv.weight", "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
             "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.bias",
             "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
             "conditioner.embedders.1.model.ln_final.weight"],
    "flux": ["double_blocks.18.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
             "single_blocks.37.linear1.weight", "single_blocks.0.modulation.lin.bias", "guidance_in.out_layer.weight",
             "final_layer.adaLN_modulation.1.weight", "vae.encoder.mid.attn_1.proj_out.weight"],
}
DIFFUSERS_TYPE = {"sd15": "v1", "sdxl": "xl_base", "flux": "flux-dev"}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_diffusers_to_ldm_and_back_is_exact_for_every_tensor(made, family):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    comps, configs, _, _ = made[family]
    ldm = diffusers_to_ldm(_flat(comps), family)
    assert set(REAL_NAMES[family]) <= set(ldm), sorted(set(REAL_NAMES[family]) - set(ldm))
    assert infer_diffusers_model_type(ldm) == DIFFUSERS_TYPE[family]  # diffusers recognises the layout
    attn = ldm.get("first_stage_model.encoder.mid.attn_1.q.weight", ldm.get("vae.encoder.mid.attn_1.q.weight"))
    assert attn.ndim == 4 and attn.shape[2:] == (1, 1)  # LDM's VAE attention is a 1x1 conv
    back = ldm_to_diffusers({**ldm, **EXTRAS[family]}, family, configs)
    assert set(back) == set(comps)
    for comp, model in comps.items():
        original = model.state_dict()
        assert set(back[comp]) == set(original), comp
        for key, tensor in original.items():
            assert back[comp][key].shape == tensor.shape and torch.equal(back[comp][key], tensor), (comp, key)


def test_sdxl_openclip_text_encoder_is_fused_and_transposed(made):
    comps = made["sdxl"][0]
    te2 = comps["text_encoder_2"].state_dict()
    ldm = diffusers_to_ldm({"text_encoder_2": te2}, "sdxl")
    layer = "text_model.encoder.layers.3.self_attn."
    fused = ldm["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([te2[layer + p + "_proj.weight"] for p in "qkv"]))
    assert torch.equal(ldm["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)


def test_bfl_conversion_agrees_with_diffusers_own_converter(made, monkeypatch):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes FLUX.1's width
    (3072); with that width scaled to the tiny model it must give exactly our conversion."""
    from diffusers.loaders import single_file_utils as sfu

    comps = made["flux"][0]
    bfl = diffusers_to_ldm({"transformer": comps["transformer"].state_dict()}, "flux")
    inner = bfl["img_in.weight"].shape[0]

    class ScaledTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(t, sizes, dim=0):
            if list(sizes) == [3072, 3072, 3072, 4 * 3072]:
                sizes = [inner, inner, inner, t.shape[dim] - 3 * inner]
            return torch.split(t, sizes, dim)

    monkeypatch.setattr(sfu, "torch", ScaledTorch("torch"))
    theirs = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    monkeypatch.undo()
    ours = bfl_to_flux(bfl)
    assert set(theirs) == set(ours) == set(comps["transformer"].state_dict())
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_a_tensor_no_rule_accounts_for_is_refused_not_dropped(made):
    comps, configs, _, _ = made["sd15"]
    ldm = diffusers_to_ldm(_flat(comps), "sd15")
    ldm["model.diffusion_model.input_blocks.1.7.stray.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="no diffusers counterpart.*input_blocks.1.7.stray"):
        ldm_to_diffusers(ldm, "sd15", configs)


def test_shipped_configs_are_the_published_models():
    """Parameter counts of SD1.5, SDXL base and FLUX.1-dev built from the shipped configs on
    the meta device; their LDM names have the published files' tensor counts."""
    from diffgraph.merger.real_pipelines import _empty_model

    counts = {("sd15", "unet"): 859_520_964, ("sd15", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480,
              ("sdxl", "unet"): 2_567_463_684, ("sdxl", "text_encoder_2"): 694_659_840,
              ("flux", "transformer"): 11_901_408_320}
    tensors = {"sd15": 1130, "sdxl": 2513, "flux": 780}  # + position_ids / logit_scale in the published files
    for family in ("sd15", "sdxl", "flux"):
        configs = shipped_configs(family)
        flat = {}
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2", "transformer"):
            if comp in configs:
                model = _empty_model(comp, configs[comp])
                if (family, comp) in counts:
                    assert sum(p.numel() for p in model.parameters()) == counts[family, comp], (family, comp)
                flat.update({f"{comp}.{k}": v for k, v in model.state_dict().items()})
        ldm = diffusers_to_ldm(flat, family)
        assert len(ldm) == tensors[family]
        shapes = {k: tuple(v.shape) for k, v in ldm.items()}
        assert detect_base(shapes) == family
        assert {c: set(sd) for c, sd in ldm_to_diffusers(ldm, family).items()} == {
            c: {k[len(c) + 1:] for k in flat if k.startswith(c + ".")} for c in configs if c in
            ("unet", "vae", "text_encoder", "text_encoder_2", "transformer")}


# -- detection -----------------------------------------------------------------------------

def test_full_checkpoints_are_detected_in_every_layout(made):
    for family, (comps, _, original, named) in made.items():
        assert detect_base(original) == family
        assert detect_base(named) == family
        core = comps.get("unet") or comps["transformer"]
        assert detect_base(core.state_dict()) == family  # a bare diffusers component


def test_the_mini_worlds_own_files_are_detected(artifacts_dir):
    from diffgraph.tools.sources.validate import validate_safetensors

    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    assert manifest["base_model"] == "miniworld-sd"
    for entry in manifest["experts"]:
        path = artifacts_dir / entry["file"]
        assert detect_base(path) == "miniworld-sd", entry["slug"]
        assert detect_base(validate_safetensors(path)) == "miniworld-sd"
    assert detect_base(artifacts_dir / manifest["base"]) == "miniworld-sd"  # the diffusers folder


def _attention_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0", "add_q_proj", "proj_mlp", "proj_out")
            and ("attn" in n or "single_transformer_blocks" in n)]


def _te_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "self_attn" in n]


def _lora(names, fmt: str, component: str = "unet") -> dict:
    kohya = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te",
             "text_encoder_1": "lora_te1", "text_encoder_2": "lora_te2"}
    out = {}
    for n in names:
        if fmt == "kohya":
            out[f"{kohya[component]}_{n.replace('.', '_')}.lora_down.weight"] = (4, 32)
            out[f"{kohya[component]}_{n.replace('.', '_')}.alpha"] = ()
        elif fmt == "diffusers":
            comp = "text_encoder" if component == "text_encoder_1" else component
            out[f"{comp}.{n}.lora_A.weight"] = (4, 32)
        else:  # PEFT-native
            out[f"base_model.model.{n}.lora_A.weight"] = (4, 32)
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_loras_are_detected_in_the_common_namings(made, fmt):
    sd15, sdxl, flux = (made[f][0] for f in ("sd15", "sdxl", "flux"))
    unet15 = _lora(_attention_modules(sd15["unet"]), fmt)
    unetxl = _lora(_attention_modules(sdxl["unet"]), fmt)
    assert detect_base(unet15) == "sd15"
    assert detect_base(unetxl) == "sdxl"
    assert detect_base(_lora(_attention_modules(flux["transformer"]), fmt, "transformer")) == "flux"
    if fmt != "peft":  # PEFT-native files hold one model; kohya/diffusers ones add text encoders
        assert detect_base({**unet15, **_lora(_te_modules(sd15["text_encoder"]), fmt, "text_encoder")}) == "sd15"
        te = {**_lora(_te_modules(sdxl["text_encoder"]), fmt, "text_encoder_1"),
              **_lora(_te_modules(sdxl["text_encoder_2"]), fmt, "text_encoder_2")}
        assert detect_base({**unetxl, **te}) == "sdxl"
        assert detect_base(te) == "sdxl"  # a text-encoder-only SDXL LoRA: two encoders


def test_loras_in_original_names_are_detected(made):
    """kohya LoRAs of LDM-named SDXL/SD1.5 UNets, and FLUX LoRAs on BFL names (kohya, ComfyUI)."""
    for family in ("sd15", "sdxl"):
        ldm = diffusers_to_ldm({"unet": made[family][0]["unet"].state_dict()}, family)
        mods = {k.removeprefix("model.diffusion_model.").removesuffix(".weight") for k in ldm
                if k.endswith(("attn1.to_q.weight", "attn2.to_k.weight"))}
        assert detect_base(_lora(mods, "kohya")) == family
    bfl = {k.removesuffix(".weight") for k in diffusers_to_ldm({"transformer": made["flux"][0]["transformer"].state_dict()}, "flux")
           if k.endswith(("qkv.weight", "linear1.weight"))}
    assert detect_base(_lora(bfl, "kohya")) == "flux"
    assert detect_base({f"diffusion_model.{m}.lora_A.weight": (4, 32) for m in bfl}) == "flux"


def test_undecidable_loras_use_the_metadata_or_say_why():
    mid = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 32)}
    with pytest.raises(BaseDetectionError, match="cannot tell") as exc:
        detect_base(mid)
    _one_line(exc)
    assert detect_base({**mid, "__metadata__": {"ss_base_model_version": "sdxl_base_v1-0"}}) == "sdxl"
    assert detect_base({**mid, "__metadata__": {"modelspec.architecture": "stable-diffusion-v1/lora"}}) == "sd15"
    real_width = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (8, 2048)}
    assert explain_base(real_width).family == "sdxl"  # SDXL's real cross-attention width


@pytest.mark.parametrize(("header", "message"), [
    ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3, 1)}, "Stable Diffusion 2"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (3, 1)}, "Stable Diffusion 3"),
    ({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (3, 1)}, "refiner"),
    ({"double_blocks.0.img_attn.qkv.weight": (3, 1),
      "conditioner.embedders.1.model.ln_final.weight": (1,)}, "contradictory"),
    ({"a": (1,), "b": (2, 2)}, "no tensor names of a known"),
    ({}, "holds no tensors"),
])
def test_unknown_or_unsupported_layouts_are_refused_in_one_line(header, message):
    with pytest.raises(BaseDetectionError, match=message) as exc:
        detect_base(header)
    _one_line(exc)


def test_damaged_files_are_refused_in_one_line(made, tmp_path):
    data = made["sd15"][2].read_bytes()
    truncated, garbage = tmp_path / "cut.safetensors", tmp_path / "junk.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"\x89PNG not weights at all" * 10)
    for path in (truncated, garbage):
        for fn in (detect_base, load_single_file):
            with pytest.raises(BaseDetectionError, match=f"{path.name}: not a readable safetensors file") as exc:
                fn(path)
            _one_line(exc)


# -- loading -------------------------------------------------------------------------------

def _unet_inputs(family: str):
    g = torch.Generator().manual_seed(0)
    kw = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor(500),
              encoder_hidden_states=torch.randn(1, 5, 32 if family == "sd15" else 64, generator=g))
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return kw


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_single_files_load_every_tensor_exactly_and_run_the_same(made, family, layout):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps, configs, original, named = made[family]
    pipe = load_single_file(original if layout == "original" else named, configs=configs)
    assert isinstance(pipe, StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)
    for comp, model in comps.items():
        loaded = getattr(pipe, comp).state_dict()
        assert set(loaded) == set(model.state_dict())
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), comp
    with torch.no_grad():
        kw = _unet_inputs(family)
        assert torch.equal(pipe.unet(**kw).sample, comps["unet"](**kw).sample)
    assert pipe.tokenizer("a red cube").input_ids[0] == 49406  # CLIP's BPE, built offline
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_flux_transformers_load_exactly_and_run_the_same(made, layout):
    comps, configs, original, named = made["flux"]
    model = load_single_file(original if layout == "original" else named, configs=configs)
    want, got = comps["transformer"].state_dict(), model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        assert torch.equal(model(**kw).sample, comps["transformer"](**kw).sample)
    vae = load_components(original, configs=configs, components=("vae",))["vae"].state_dict()
    assert all(torch.equal(vae[k], v) for k, v in comps["vae"].state_dict().items())  # the all-in-one file's VAE


def test_loaded_weights_are_aligned_copies_that_hold_no_mapping_of_the_file(made):
    """safetensors hands out views of a mapping of the file at its own byte offsets; on AVX-512
    CPUs torch's kernels give other last bits for weights that are not 16-byte aligned (the
    test above then fails), and a mapping of the user's file crashes the process when the file
    is rewritten in place. Every loaded tensor is a copy, aligned as torch allocates it."""
    for family, (_, configs, original, named) in made.items():
        for path in (original, named):
            models = load_components(path, configs=configs)
            for comp, model in models.items():
                misaligned = [k for k, t in model.state_dict().items() if t.data_ptr() % 64]
                assert not misaligned, (family, path.name, comp, misaligned[:3])
            maps = Path("/proc/self/maps").read_text()
            assert str(path) not in maps, f"{path.name} is still mapped while its {family} models are alive"
            del models


def test_dtype_is_applied_while_loading(made):
    comps, configs, original, _ = made["sd15"]
    unet = load_components(original, configs=configs, dtype=torch.float16, components=("unet",))["unet"]
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert torch.equal(unet.state_dict()["conv_in.weight"], comps["unet"].state_dict()["conv_in.weight"].half())


def test_a_file_of_another_family_is_refused(made):
    for family, wrong in (("sdxl", "sd15"), ("sd15", "sdxl"), ("flux", "sdxl")):
        _, configs, original, _ = made[family]
        with pytest.raises(BaseMismatchError, match=f"refusing to load it as {wrong}") as exc:
            load_single_file(original, wrong, configs=configs)
        _one_line(exc)


def test_weights_that_do_not_fit_the_config_are_refused_in_one_line(made):
    """A tiny file against the shipped (real-size) SD1.5 config: named mismatch, nothing loaded."""
    with pytest.raises(BaseLoadError, match=r"does not fit the config: .*shape mismatch") as exc:
        load_components(made["sd15"][2], "sd15", components=("vae",))
    _one_line(exc)


def test_the_mini_worlds_single_files_load_with_its_own_configs(artifacts_dir):
    from diffgraph.miniworld import artifacts_io

    path = artifacts_io.expert_file("pastel-dream", artifacts_dir)
    pipe = load_single_file(path, configs=artifacts_dir / "base")
    for comp, state in artifacts_io.split_single_file(path).items():
        loaded = getattr(pipe, comp).state_dict()
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(BaseLoadError, match="pass configs="):
        load_single_file(path)
    base = load_base(artifacts_dir / "base")  # a diffusers folder, local files only
    unet = load_file(str(artifacts_dir / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(base.unet.state_dict()[k], v) for k, v in unet.items())
    with pytest.raises(BaseMismatchError, match="not SDXL"):
        load_base(artifacts_dir / "base", "sdxl")
    assert resolve_configs("sd15", {"unet": {"x": 1}})["unet"] == {"x": 1}  # an override replaces a component


# -- the catalog's base model ----------------------------------------------------------------

@pytest.mark.parametrize(("declared", "family"), [
    ("SD 1.5", "sd15"), ("SD 1.4", "sd15"), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"), ("sd_v1", "sd15"),
    ("SDXL 1.0", "sdxl"), ("Pony", "sdxl"), ("Illustrious", "sdxl"), ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("Flux.1 D", "flux"), ("black-forest-labs/FLUX.1-schnell", "flux"), ("miniworld-sd", "miniworld-sd"),
    ("SD 2.1", "sd2"), ("SD 3.5 Large", "sd3"), ("unknown", None), ("Hunyuan 1", None),
])
def test_declared_base_model_names_map_to_families(declared, family):
    assert family_of(declared) == family


def test_the_detected_base_confirms_fills_in_or_refuses_the_declared_one(made, artifacts_dir):
    sdxl = made["sdxl"][2]
    assert reconcile_base("SDXL 1.0", [sdxl]) == "SDXL 1.0"  # agrees: the declared name is kept
    assert reconcile_base("unknown", [sdxl]) == "sdxl"  # unknown: filled in
    with pytest.raises(BaseMismatchError, match="declared base model 'SD 1.5' but sdxl-original.safetensors holds SDXL") as exc:
        reconcile_base("SD 1.5", [sdxl])
    _one_line(exc)
    lora = artifacts_dir / "experts" / "stripes-pro.safetensors"
    assert reconcile_base("miniworld-sd", [lora]) == "miniworld-sd"
    undecidable = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 32)}
    assert reconcile_base("SD 1.5", [undecidable]) == "SD 1.5"  # cannot tell: nothing to contradict
    assert reconcile_base("Some new base", [sdxl]) == "Some new base"  # a name we do not know is left alone


def test_a_local_folder_without_metadata_gets_the_detected_base(made, tmp_path):
    import shutil

    from diffgraph.tools.sources.local import LocalFolderSource

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(made["sdxl"][2], tmp_path / "models" / "Stable-diffusion" / "anime-xl.safetensors")
    (record,) = LocalFolderSource(tmp_path).iter_models()
    assert (record.kind, record.base_model) == ("ckpt", "sdxl")


def test_the_gca_refuses_a_contradicting_file_and_fills_in_an_unknown_base(made, artifacts_dir, tmp_path):
    """A GCA pass over a local folder: a tiny SD1.5 checkpoint published as a mini-world one is
    rejected after download with the reason; a mini-world LoRA published with base "unknown"
    is catalogued (and calibrated) as miniworld-sd."""
    import shutil

    from diffgraph.agents.gca import run_pass
    from diffgraph.graph_store.store import GraphStore
    from rich.console import Console

    from diffgraph.settings import Settings

    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(made["sd15"][2], lib / "impostor.safetensors")
    (lib / "impostor.json").write_text(json.dumps({"kind": "ckpt", "base_model": "miniworld-sd"}))
    shutil.copy(artifacts_dir / "experts" / "stripes-pro.safetensors", lib / "mystery.safetensors")
    (lib / "mystery.json").write_text(json.dumps({"kind": "lora", "base_model": "unknown"}))
    settings = Settings(home=tmp_path / "home", reference_prompts=2)
    run_pass([f"local:{lib}"], settings=settings, console=Console(quiet=True), read_pages=False)
    with GraphStore.open(settings.home) as store:
        rows = {r.id: r for r in store.catalog.list_experts()}
    impostor, mystery = rows["local:impostor.safetensors"], rows["local:mystery.safetensors"]
    assert impostor.status == "rejected"
    assert impostor.status_reason == ("declared base model 'miniworld-sd' but impostor.safetensors holds "
                                      "SD 1.5 weights")
    assert (mystery.status, mystery.base_model) == ("active", "miniworld-sd")
