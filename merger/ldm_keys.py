"""Tensor names of real single-file checkpoints <-> diffusers' names.

Community checkpoints (Civitai, A1111, ComfyUI) are single ``.safetensors`` files in the
original LDM/SGM layout; diffusers models are named differently:

============== ======================================== ==========================================
component      single file (LDM / SGM / BFL)            diffusers
============== ======================================== ==========================================
UNet           model.diffusion_model.input_blocks.1.1.* unet.down_blocks.0.attentions.0.*
VAE            first_stage_model.encoder.down.0.block.0 vae.encoder.down_blocks.0.resnets.0
               (attention q/k/v/proj_out: 1x1 convs)    (to_q/to_k/to_v/to_out.0: linear)
CLIP-L (SD1)   cond_stage_model.transformer.text_model. text_encoder.
CLIP-L (SDXL)  conditioner.embedders.0.transformer.     text_encoder.
               text_model.
OpenCLIP bigG  conditioner.embedders.1.model.           text_encoder_2.text_model. (q/k/v apart,
(SDXL)         (OpenCLIP: resblocks, fused in_proj,     text_projection as a Linear)
               text_projection as a matrix)
FLUX.1         double_blocks.* / single_blocks.* (BFL,  transformer.transformer_blocks.* /
               fused qkv and qkv+mlp)                   transformer.single_transformer_blocks.*
============== ======================================== ==========================================

LDM -> diffusers uses diffusers' own converters (``diffusers.loaders.single_file_utils``), so
a file loads the way ``from_single_file`` would load it. diffusers -> LDM is written here as
the exact inverse of those converters: a diffusers state round-trips to itself tensor for
tensor. FLUX is converted here in both directions, because diffusers' converter hard-codes
FLUX.1's width (3072) and cannot read a model of another width; the tests check that, with its
width scaled, diffusers' converter agrees with ours.

Diffusers-side states are flat dicts with a component prefix ("unet.", "vae.", "text_encoder.",
"text_encoder_2.", "transformer.") or ``{component: state}`` dicts; the CLIP text-encoder keys
are whatever the installed transformers' classes use (transformers 5 flattened CLIPTextModel:
no "text_model." level, CLIPTextModelWithProjection keeps it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from types import SimpleNamespace

import torch

from diffgraph.errors import DiffGraphError
from diffgraph.families import FLUX, SD15, SDXL

COMPONENTS = {f.name: f.components for f in (SD15, SDXL, FLUX)}
FAMILIES = tuple(COMPONENTS)  # the families with an original single-file layout
# Where each component lives in a single file (the first is what diffusers_to_ldm writes;
# ldm_to_diffusers also reads the others).
LDM_PREFIXES = {
    "sd15": {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
             "text_encoder": ("cond_stage_model.transformer.",)},
    "sdxl": {"unet": ("model.diffusion_model.",), "vae": ("first_stage_model.",),
             "text_encoder": ("conditioner.embedders.0.transformer.",),
             "text_encoder_2": ("conditioner.embedders.1.model.",)},
    # BFL's release (flux1-dev.safetensors) has bare names; ComfyUI's all-in-one files prefix
    # them with model.diffusion_model. and keep the VAE under vae.
    "flux": {"transformer": ("", "model.diffusion_model."), "vae": ("vae.", "first_stage_model.")},
}
# Tensors a single file may carry that are not weights of any diffusers component.
_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.",
             "guidance_in.", "final_layer.")


class LDMConversionError(DiffGraphError, ValueError):
    """A state that cannot be converted (unknown component, tensors that no rule accounts for)."""


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise LDMConversionError(f"no single-file layout for family {family!r} (known: {', '.join(FAMILIES)})")


def split_components(state: Mapping, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers state (flat with component prefixes, or {component: state}) as {component: state}."""
    _check_family(family)
    if state and all(isinstance(v, Mapping) for v in state.values()):
        parts = {k: dict(v) for k, v in state.items()}
    else:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        # longest prefix first: "text_encoder_2." before "text_encoder."
        prefixes = sorted(COMPONENTS[family], key=len, reverse=True)
        for key, value in state.items():
            comp = next((c for c in prefixes if key.startswith(c + ".")), None)
            if comp is None:
                if family == "flux":  # a bare transformer state
                    comp, key = "transformer", "transformer." + key
                else:
                    raise LDMConversionError(f"{key!r} names no {family} component "
                                             f"(expected a prefix among {', '.join(COMPONENTS[family])})")
            parts.setdefault(comp, {})[key[len(comp) + 1:]] = value
    unknown = set(parts) - set(COMPONENTS[family])
    if unknown:
        raise LDMConversionError(f"{family} has no component(s) {sorted(unknown)}")
    return parts


# ---------------------------------------------------------------------------------------------
# diffusers -> LDM names, one key at a time (the inverse of diffusers' converters)
# ---------------------------------------------------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
}
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def _resnet_rest(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new):
            return old + rest[len(new):]
    raise KeyError(rest)


def _unet_layout(keys) -> tuple[int, set[int]]:
    """(layers_per_block, up blocks with attentions) read off a diffusers UNet's keys."""
    per_block = 1 + max((int(m.group(4)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == "down"
                         and m.group(3) == "resnets"), default=1)
    up_attn = {int(m.group(2)) for k in keys if (m := _BLOCK.match(k)) and m.group(1) == "up"
               and m.group(3) == "attentions"}
    return per_block, up_attn


def unet_key_to_ldm(key: str, layers_per_block: int, up_attention_blocks: set[int]) -> str:
    """One diffusers UNet key -> its name under model.diffusion_model. (without the prefix)."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new):
            return old + key[len(new):]
    stride = layers_per_block + 1
    if m := _BLOCK.fullmatch(key):
        side, b, kind, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            n = 1 + b * stride + i
            if kind == "resnets":
                return f"input_blocks.{n}.0.{_resnet_rest(rest)}"
            if kind == "attentions":
                return f"input_blocks.{n}.1.{rest}"
            if kind == "downsamplers" and rest.startswith("conv."):
                return f"input_blocks.{1 + b * stride + layers_per_block}.0.op.{rest[5:]}"
        else:
            n = b * stride + i
            if kind == "resnets":
                return f"output_blocks.{n}.0.{_resnet_rest(rest)}"
            if kind == "attentions":
                return f"output_blocks.{n}.1.{rest}"
            if kind == "upsamplers" and rest.startswith("conv."):
                slot = 2 if b in up_attention_blocks else 1
                return f"output_blocks.{b * stride + layers_per_block}.{slot}.{rest}"
    if m := _MID.fullmatch(key):
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * i}.{_resnet_rest(rest)}"
        return f"middle_block.1.{rest}"
    raise LDMConversionError(f"unet: no LDM name for {key!r}")


_VAE_TOP = {"conv_norm_out.": "norm_out."}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (without the first_stage_model. prefix)."""
    if m := _VAE_BLOCK.fullmatch(key):
        coder, side, b, kind, i, rest = m.groups()
        b = int(b)
        if side == "down":
            if kind == "resnets":
                return f"{coder}.down.{b}.block.{i}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
            return f"{coder}.down.{b}.downsample.{rest}"
        ldm_b = num_up_blocks - 1 - b
        if kind == "resnets":
            return f"{coder}.up.{ldm_b}.block.{i}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        return f"{coder}.up.{ldm_b}.upsample.{rest}"
    if m := _VAE_MID.fullmatch(key):
        coder, kind, i, rest = m.groups()
        if kind == "resnets":
            return f"{coder}.mid.block_{int(i) + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        for new, old in _VAE_ATTN.items():
            if rest.startswith(new):
                return f"{coder}.mid.attn_1.{old}{rest[len(new):]}"
    coder, _, rest = key.partition(".")
    if coder in ("encoder", "decoder") and rest.split(".")[0] in ("conv_in", "conv_out", "conv_norm_out"):
        for new, old in _VAE_TOP.items():
            rest = old + rest[len(new):] if rest.startswith(new) else rest
        return f"{coder}.{rest}"
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    raise LDMConversionError(f"vae: no LDM name for {key!r}")


def _is_vae_attention_matrix(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def clip_key_to_ldm(key: str) -> str:
    """A CLIPTextModel key (flattened or not) -> its name under ...transformer. in a single file."""
    return key if key.startswith("text_model.") else "text_model." + key


_OPENCLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)")
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_OPENCLIP_INNER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def open_clip_key_to_ldm(key: str) -> str:
    """A CLIPTextModelWithProjection key -> its OpenCLIP name (q/k/v all map to the fused in_proj)."""
    key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key]
    if m := _OPENCLIP_LAYER.fullmatch(key):
        layer, rest = m.groups()
        if q := re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
            return f"transformer.resblocks.{layer}.attn.in_proj_{q.group(1)}"
        for new, old in _OPENCLIP_INNER:
            if rest.startswith(new):
                return f"transformer.resblocks.{layer}.{old}{rest[len(new):]}"
    raise LDMConversionError(f"text_encoder_2: no OpenCLIP name for {key!r}")


def _unet_to_ldm(sd: dict, prefix: str) -> dict:
    per_block, up_attn = _unet_layout(sd)
    return {prefix + unet_key_to_ldm(k, per_block, up_attn): v for k, v in sd.items()}


def _num_up_blocks(sd) -> int:
    return 1 + max((int(m.group(3)) for k in sd if (m := _VAE_BLOCK.fullmatch(k)) and m.group(1) == "decoder"),
                   default=0)


def _vae_to_ldm(sd: dict, prefix: str) -> dict:
    n_up = _num_up_blocks(sd)
    out = {}
    for k, v in sd.items():
        name = vae_key_to_ldm(k, n_up)
        out[prefix + name] = v.reshape(*v.shape, 1, 1) if _is_vae_attention_matrix(name) and v.ndim == 2 else v
    return out


def _clip_to_ldm(sd: dict, prefix: str) -> dict:
    return {prefix + clip_key_to_ldm(k): v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}


def _open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    out, fused = {}, {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        name = open_clip_key_to_ldm(k)
        if ".attn.in_proj_" in name:
            fused.setdefault(name, {})[re.search(r"\.([qkv])_proj\.", k).group(1)] = v
        elif name == "text_projection":
            out[prefix + name] = v.T.contiguous()  # Linear weight [proj, hidden] -> matrix [hidden, proj]
        else:
            out[prefix + name] = v
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise LDMConversionError(f"text_encoder_2: {name} needs q, k and v projections (found {sorted(parts)})")
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# FLUX.1: diffusers <-> BFL
# ---------------------------------------------------------------------------------------------

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
    "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
    "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "context_embedder.": "txt_in.", "x_embedder.": "img_in.", "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
_FLUX_DOUBLE = {
    "norm1.linear.": "img_mod.lin.", "norm1_context.linear.": "txt_mod.lin.",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj.": "img_mlp.0.", "ff.net.2.": "img_mlp.2.", "ff_context.net.0.proj.": "txt_mlp.0.",
    "ff_context.net.2.": "txt_mlp.2.", "attn.to_out.0.": "img_attn.proj.", "attn.to_add_out.": "txt_attn.proj.",
}
_FLUX_SINGLE = {
    "norm.linear.": "modulation.lin.", "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale", "proj_out.": "linear2.",
}
# fused BFL tensors and the diffusers tensors they hold, in order
_DOUBLE_FUSED = {"img_attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
                 "txt_attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")}
_SINGLE_FUSED = {"linear1.": ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")}
_FLUX_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)")
_BFL_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.*)")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """AdaLayerNormContinuous: diffusers holds (scale, shift), BFL (shift, scale); its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_key_to_bfl(key: str) -> tuple[str, int | None]:
    """A diffusers FluxTransformer2DModel key -> (BFL name, position in a fused tensor or None)."""
    for new, old in _FLUX_TOP.items():
        if key.startswith(new):
            return old + key[len(new):], None
    if m := _FLUX_BLOCK.fullmatch(key):
        kind, i, rest = m.groups()
        bfl, plain, fused = (("double_blocks", _FLUX_DOUBLE, _DOUBLE_FUSED) if kind == "transformer_blocks"
                             else ("single_blocks", _FLUX_SINGLE, _SINGLE_FUSED))
        for new, old in plain.items():
            if rest.startswith(new):
                return f"{bfl}.{i}.{old}{rest[len(new):]}", None
        for target, members in fused.items():
            for pos, member in enumerate(members):
                if rest.startswith(member):
                    return f"{bfl}.{i}.{target}{rest[len(member):]}", pos
    raise LDMConversionError(f"transformer: no BFL name for {key!r}")


def _flux_to_bfl(sd: dict, prefix: str = "") -> dict:
    out, fused = {}, {}
    for k, v in sd.items():
        name, pos = flux_key_to_bfl(k)
        if pos is None:
            out[prefix + name] = _swap_halves(v) if name.startswith("final_layer.adaLN_modulation.") else v
        else:
            fused.setdefault(name, {})[pos] = v
    for name, parts in fused.items():
        block = name.split(".")[0]
        need = len(_SINGLE_FUSED["linear1."]) if block == "single_blocks" else 3
        if sorted(parts) != list(range(need)):
            raise LDMConversionError(f"transformer: {name} needs {need} parts, found {len(parts)}")
        out[prefix + name] = torch.cat([parts[p] for p in range(need)], dim=0)
    return out


def bfl_to_flux(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-named FLUX.1 transformer state (bare or under model.diffusion_model.) -> diffusers
    names. Widths come from the tensors (img_in gives the model width), so any width works."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    if "img_in.weight" not in sd:
        raise LDMConversionError("not a BFL FLUX transformer: img_in.weight is missing")
    inner = sd["img_in.weight"].shape[0]
    top = {old: new for new, old in _FLUX_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if m := _BFL_BLOCK.fullmatch(key):
            kind, i, rest = m.groups()
            dkind, plain, fused = (("transformer_blocks", _FLUX_DOUBLE, _DOUBLE_FUSED) if kind == "double_blocks"
                                   else ("single_transformer_blocks", _FLUX_SINGLE, _SINGLE_FUSED))
            done = False
            for new, old in plain.items():
                if rest.startswith(old):
                    out[f"{dkind}.{i}.{new}{rest[len(old):]}"] = value
                    done = True
                    break
            for target, members in ({} if done else fused).items():
                if rest.startswith(target):
                    tail = rest[len(target):]
                    sizes = [inner] * 3 + ([value.shape[0] - 3 * inner] if len(members) == 4 else [])
                    if sum(sizes) != value.shape[0] or min(sizes) <= 0:
                        raise LDMConversionError(f"{key}: {value.shape[0]} rows do not split as {sizes}")
                    for member, part in zip(members, torch.split(value, sizes, dim=0)):
                        out[f"{dkind}.{i}.{member}{tail}"] = part.clone()
                    done = True
                    break
            if not done:
                raise LDMConversionError(f"transformer: no diffusers name for BFL {key!r}")
            continue
        for old, new in top.items():
            if key.startswith(old):
                out[new + key[len(old):]] = _swap_halves(value) if old.startswith("final_layer.adaLN") else value
                break
        else:
            raise LDMConversionError(f"transformer: no diffusers name for BFL {key!r}")
    return out


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def diffusers_to_ldm(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A diffusers state (flat "unet."/"vae."/"text_encoder."/"text_encoder_2."/"transformer."
    prefixes, or {component: state}) -> one single file's tensors in the original layout of
    ``family`` ("sd15", "sdxl" or "flux"). Tensors are shared, not copied, except where the
    layouts differ (fused in_proj/qkv, transposed text projection, swapped AdaLN halves)."""
    parts = split_components(state, family)
    pre = {c: p[0] for c, p in LDM_PREFIXES[family].items()}
    out: dict[str, torch.Tensor] = {}
    for comp, sd in parts.items():
        if comp == "unet":
            out.update(_unet_to_ldm(sd, pre["unet"]))
        elif comp == "vae":
            out.update(_vae_to_ldm(sd, pre["vae"]))
        elif comp == "text_encoder":
            out.update(_clip_to_ldm(sd, pre["text_encoder"]))
        elif comp == "text_encoder_2":
            out.update(_open_clip_to_ldm(sd, pre["text_encoder_2"]))
        elif comp == "transformer":
            out.update(_flux_to_bfl(sd, pre["transformer"]))
    return out


@lru_cache(maxsize=1)
def _clip_text_model_is_flat() -> bool:
    """Whether the installed transformers' CLIPTextModel has no "text_model." level (>= 5.6)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=4,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    return not any(k.startswith("text_model.") for k in model.state_dict())


def _component_keys(state: Mapping, family: str) -> dict[str, list[str]]:
    """Single-file keys by the component whose prefix they carry (others are not weights we load)."""
    found: dict[str, list[str]] = {}
    for key in state:
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        for comp, prefixes in LDM_PREFIXES[family].items():
            if comp == "transformer":
                if key.removeprefix("model.diffusion_model.").startswith(_BFL_ROOTS):
                    found.setdefault(comp, []).append(key)
                    break
            elif any(key.startswith(p) for p in prefixes):
                found.setdefault(comp, []).append(key)
                break
    return found


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], family: str,
                     configs: Mapping[str, Mapping] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's tensors (original LDM/SGM/BFL names) -> {component: diffusers state}.

    ``configs`` maps component names to diffusers/transformers config dicts (the UNet's
    layers_per_block and addition_embed_type, the VAE's block types, the text encoders' sizes);
    the default is the real model's config shipped in merger/configs. Every tensor of a
    component in the file must be accounted for by the conversion: a tensor that would be
    dropped silently raises LDMConversionError instead."""
    _check_family(family)
    from diffusers.loaders import single_file_utils as sfu

    if configs is None:
        from .real_pipelines import shipped_configs

        configs = shipped_configs(family)
    state = dict(state)
    present = _component_keys(state, family)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if "unet" in present:
        out["unet"] = sfu.convert_ldm_unet_checkpoint(state, dict(configs["unet"]))
    if "vae" in present:
        vae_state = {k: state[k] for k in present["vae"]}
        out["vae"] = sfu.convert_ldm_vae_checkpoint(vae_state, dict(configs["vae"]))
    if "text_encoder" in present:
        te = sfu.convert_ldm_clip_checkpoint({k: state[k] for k in present["text_encoder"]})  # no position_ids
        if _clip_text_model_is_flat():
            te = {k.removeprefix("text_model."): v for k, v in te.items()}
        out["text_encoder"] = te
    if "text_encoder_2" in present:
        prefix = LDM_PREFIXES[family]["text_encoder_2"][0]
        hidden = (configs.get("text_encoder_2") or {}).get("hidden_size")
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
        out["text_encoder_2"] = sfu.convert_open_clip_checkpoint(
            stub, {k: state[k] for k in present["text_encoder_2"]}, prefix=prefix)
    if "transformer" in present:
        out["transformer"] = bfl_to_flux({k: state[k] for k in present["transformer"]})
    if not out:
        raise LDMConversionError(f"no {family} component found in the file "
                                 f"(expected names under {_describe_prefixes(family)})")
    _check_accounted(present, out, family)
    return out


def _describe_prefixes(family: str) -> str:
    return ", ".join(p or "<bare BFL names>" for ps in LDM_PREFIXES[family].values() for p in ps)


def _check_accounted(present: dict[str, list[str]], out: dict[str, dict], family: str) -> None:
    """Every single-file tensor of a converted component is the source of some diffusers tensor."""
    produced: set[str] = set()
    for comp, sd in out.items():
        if comp == "transformer":
            names = {flux_key_to_bfl(k)[0] for k in sd}
            produced |= names | {"model.diffusion_model." + n for n in names}
            continue
        prefixes = LDM_PREFIXES[family][comp]
        if comp == "unet":
            per_block, up_attn = _unet_layout(sd)
            names = {unet_key_to_ldm(k, per_block, up_attn) for k in sd}
        elif comp == "vae":
            n_up = _num_up_blocks(sd)
            names = {vae_key_to_ldm(k, n_up) for k in sd}
        elif comp == "text_encoder":
            names = {clip_key_to_ldm(k) for k in sd}
        else:
            names = {open_clip_key_to_ldm(k) for k in sd}
        produced |= {p + n for p in prefixes for n in names}
    lost = [k for keys in present.values() for k in keys if k not in produced]
    if lost:
        raise LDMConversionError(f"{len(lost)} {family} tensor(s) of the file have no diffusers counterpart "
                                 f"(e.g. {', '.join(lost[:3])}); the file does not fit the {family} layout/config")
