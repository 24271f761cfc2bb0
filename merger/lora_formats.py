"""The LoRA file formats of the wild: name them, make them loadable, or refuse them in one line.

diffusers' ``load_lora_weights`` converts many namings itself and silently drops the keys it
does not understand (diffusers issues #9291, #10599, #11224; ComfyUI's "lora key not
loaded"). DiffGraph therefore names every file's format first (:func:`identify_lora_format`),
rewrites only what diffusers would drop or misread into a naming it loads
(:func:`normalize_lora`, :func:`prepare_lora`), lets diffusers' own converters do everything
else, and afterwards proves that every low-rank matrix landed (``merger/lora_coverage.py``).

Formats (``identify_lora_format`` returns these names):

=====================  ========================================================  ===========================
name                   keys look like                                            handled by
=====================  ========================================================  ===========================
kohya                  ``lora_unet_down_blocks_0_…_to_q.lora_down.weight``,       diffusers' converter
                       ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, ``.alpha``
ldm-kohya              kohya names built from LDM blocks:                         block indices mapped here
                       ``lora_unet_input_blocks_4_1_…``, ``middle_block``,       (from the UNet's config),
                       ``output_blocks`` (sd-scripts' SDXL files)                 then diffusers' converter
lycoris-locon          kohya names with ``lora_down``/``lora_up`` on conv and     diffusers' converter; a
                       resnet layers too, optionally ``lora_mid``                 Tucker ``lora_mid`` is folded
lycoris-loha           ``….hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` rewritten here as an exact LoRA
lycoris-lokr           ``….lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``_a/_b``  rewritten here as an exact LoRA
diffusers              ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` /      diffusers (unprefixed keys get
                       ``transformer.`` + ``lora_A``/``lora_B`` or                their component prefix here)
                       ``lora.down``/``lora.up`` (also without the prefix)
peft-native            ``base_model.model.<module>.lora_A.weight`` (PEFT's        renamed here, the alpha of
                       ``save_pretrained``; alpha in adapter_config.json)         its adapter config baked in
flux-kohya             ``lora_unet_double_blocks_0_img_attn_qkv…``,               diffusers' FLUX converter
                       ``lora_unet_single_blocks_…``, ``lora_unet_img_in`` …
flux-comfy             ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down…``  diffusers' FLUX converter
                       (ComfyUI / BFL module names; ``lora_A/B`` spellings too)   (``lora_A/B`` renamed here)
flux-kohya-diffusers   ``lora_transformer_single_transformer_blocks_0_…``         diffusers' FLUX converter
                                                                                 (attention modules only)
flux-xlabs             ``double_blocks.0.processor.qkv_lora1.down.weight``        diffusers' FLUX converter
flux-fal-kontext       ``base_model.model.double_blocks.0.img_attn.qkv.lora_A…``  diffusers' FLUX converter
flux-control           BFL Control LoRAs (``…query_norm.scale`` next to LoRA      refused: they widen the
                       keys)                                                      model's input layer
=====================  ========================================================  ===========================

Two things diffusers 0.42 gets wrong are repaired here, both found by the coverage proof and
the tests: (1) for kohya files whose alphas differ between modules, the ``alpha_pattern`` it
builds does not match attention and text-encoder module names, so such a module whose alpha
is not the most common one gets the wrong scale: the alphas are then baked into ``lora_up``
(scale 1 everywhere); (2) its FLUX kohya converter emits the top-level modules (``img_in``,
``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``) without their
``transformer.`` prefix, so they would be dropped: FLUX kohya-style files are converted by
diffusers' converter here and the prefix is added. FLUX kohya alphas are baked into
``lora_up`` too (alpha := rank), so the converter copies values unchanged and the coverage
proof can find them. diffusers' FLUX converter hardcodes FLUX.1's widths for the fused
``linear1`` of the single blocks (3072/12288): on another width it is refused.

LoHa and LoKr are **supported**, by an exact algebraic rewrite into an ordinary LoRA that
diffusers then converts and loads like any kohya file:

- LoHa: dW = s (w1a w1b) ∘ (w2a w2b), s = alpha / rank (rank = ``hada_w1_b.shape[0]``). The
  Hadamard product of two rank-r factorisations is the rank-r1·r2 product B A with
  B[:, (i, j)] = w1a[:, i] ∘ w2a[:, j] and A[(i, j), :] = w1b[i, :] ∘ w2b[j, :].
- LoKr: dW = s kron(W1, W2), s = alpha / rank when a factor is low-rank (rank of ``w2_b``, else
  of ``w1_b``) and 1 when both are stored full; with Wk = Uk Vk, kron(W1, W2) =
  kron(U1, U2) kron(V1, V2) (mixed-product property).

When the rewritten rank would exceed min(out, in·k·k), the dense dW is written as B = dW,
A = I (or B = I, A = dW), which is just as exact. Refused with a one-line ``MergeError``: the
Tucker variants of LoHa/LoKr (``hada_t1``, ``lokr_t2``), DoRA (``dora_scale``,
``lora_magnitude_vector``: its delta is not (alpha/rank)·B·A), FLUX Control LoRAs, PEFT-native
files without their adapter config (their alpha is unknown), files whose names belong to
another base family (:func:`lora_family`), and anything unrecognised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from diffgraph.errors import describe
from diffgraph.families import ADAPTED_COMPONENTS, label

from .merge import MergeError

FAMILIES = ("sd15", "sdxl", "flux")  # the LoRA layouts in the wild: SD 1.5-like, SDXL-like, FLUX
FAMILY_NAMES = {**{f: label(f) for f in FAMILIES}, "sd": "Stable Diffusion (SD 1.5/SDXL)"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale")
LOHA_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".alpha", ".dora_scale")
LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".alpha",
                 ".dora_scale")
FLUX_KOHYA_BLOCKS = ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_", "guidance_in_",
                     "final_layer_")
# kohya/LyCORIS names of the UNet's convolution and resnet layers (a LoCon trains these too)
LOCON_PARTS = ("_resnets_", "_downsamplers_", "_upsamplers_", "_in_layers_", "_out_layers_", "_emb_layers_",
               "_skip_connection", "_op.", "conv_in", "conv_out", "input_blocks_0_0", "_out_2.")
LOW_RANK = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.",
            ".lora_linear_layer.")
# module names that exist only in FLUX's transformer (diffusers' and BFL's spellings)
FLUX_MODULES = re.compile(r"^(transformer\.)?(base_model\.model\.)?(diffusion_model\.)?"
                          r"(transformer_blocks|single_transformer_blocks|double_blocks|single_blocks|x_embedder|"
                          r"context_embedder|time_text_embed|norm_out|img_in|txt_in|final_layer)[._]")


def _keys(state_dict_or_keys) -> list[str]:
    return list(state_dict_or_keys.keys() if isinstance(state_dict_or_keys, Mapping) else state_dict_or_keys)


def _is_kohya(keys: list[str]) -> bool:
    return all(k.startswith(KOHYA_PREFIXES) for k in keys)


def identify_lora_format(state_dict_or_keys) -> str:
    """The format's name (see the module docstring), or "unknown"."""
    keys = _keys(state_dict_or_keys)
    if not keys:
        return "unknown"
    if any(".hada_w" in k for k in keys):
        return "lycoris-loha"
    if any(".lokr_w" in k for k in keys):
        return "lycoris-lokr"
    if any("query_norm.scale" in k or "key_norm.scale" in k for k in keys):
        return "flux-control"
    if any(k.startswith("base_model.model.") for k in keys):
        return "flux-fal-kontext" if any(".double_blocks." in k or ".single_blocks." in k for k in keys) else "peft-native"
    if any(".processor." in k and ("qkv_lora" in k or "proj_lora" in k) for k in keys):
        return "flux-xlabs"
    if any(k.startswith("lora_transformer_") for k in keys):
        return "flux-kohya-diffusers"
    if any(k.startswith("lora_unet_" + b) for k in keys for b in FLUX_KOHYA_BLOCKS):
        return "flux-kohya"
    if any(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.", "double_blocks.",
                         "single_blocks.")) for k in keys):
        return "flux-comfy"
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        if any(".lora_mid." in k for k in keys) or any(k.startswith("lora_unet_") and p in k for k in keys
                                                         for p in LOCON_PARTS):
            return "lycoris-locon"
        if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in keys):
            return "ldm-kohya"
        return "kohya"
    if any(any(m in k for m in LOW_RANK) for k in keys):
        return "diffusers"
    return "unknown"


def lora_family(state_dict_or_keys) -> str | None:
    """The base family the file's names imply: "flux", "sdxl", "sd" (SD 1.5 or SDXL) or None."""
    keys = _keys(state_dict_or_keys)
    stripped = [k.removeprefix("lora_unet_").removeprefix("lora_transformer_") for k in keys]
    if any(k.startswith("lora_transformer_") for k in keys) or any(FLUX_MODULES.match(k) for k in stripped):
        return "flux"
    # (text-encoder-only names say nothing: CLIP-L LoRAs exist for SD 1.5, SDXL and FLUX alike)
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "unet.add_embedding")) for k in keys) \
            or any(re.search(r"(input_blocks|middle_block|output_blocks)_\d+_1_transformer_blocks_[1-9]", k) for k in keys):
        return "sdxl"
    if any(re.search(r"(down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)[._]\d", k) for k in keys) \
            or any(k.startswith("unet.") for k in keys):
        return "sd"
    return None


def pipeline_family(pipe) -> str:
    """"flux" (a transformer), "sdxl" (two text encoders and a UNet) or "sd15" (any other UNet pipeline)."""
    if getattr(pipe, "transformer", None) is not None:
        return "flux"
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd15"


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in ADAPTED_COMPONENTS if getattr(pipe, c, None) is not None}


def _example(keys: Iterable[str]) -> str:
    return min(keys, default="?")


def check_family(state_dict_or_keys, family: str) -> None:
    """Refuse a file whose names belong to another base family than ``family``."""
    found = lora_family(state_dict_or_keys)
    if found is None or family not in FAMILIES:
        return
    fits = found == family or (found == "sd" and family in ("sd15", "sdxl"))
    if not fits:
        why = {"flux": "it names FLUX transformer modules", "sdxl": "it names a second text encoder or SDXL-only blocks",
               "sd": "it names Stable Diffusion UNet/CLIP modules"}[found]
        raise MergeError(f"this LoRA is for {FAMILY_NAMES[found]} ({why}); the base model is {FAMILY_NAMES[family]}")


# ----------------------------------------------------------------------------------------------
# LDM (sgm) UNet block names -> diffusers names, from the UNet's own config


def ldm_unet_map(unet_config) -> dict[str, str]:
    """LDM block prefixes of a UNet2DConditionModel ("input_blocks_4_1") -> diffusers module
    prefixes ("down_blocks_1_attentions_0"), derived from its config (SD 1.5, SDXL, any UNet
    built from the standard down/up blocks)."""
    cfg = unet_config if isinstance(unet_config, Mapping) else dict(unet_config)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    lpb = cfg["layers_per_block"]
    lpb = [lpb] * len(down) if isinstance(lpb, int) else list(lpb)
    m: dict[str, str] = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "out_0": "conv_norm_out",
                         "time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
                         "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
                         "middle_block_0": "mid_block_resnets_0", "middle_block_1": "mid_block_attentions_0",
                         "middle_block_2": "mid_block_resnets_1"}
    idx = 1
    for i, kind in enumerate(down):
        for j in range(lpb[i]):
            m[f"input_blocks_{idx}_0"] = f"down_blocks_{i}_resnets_{j}"
            if "CrossAttn" in kind:
                m[f"input_blocks_{idx}_1"] = f"down_blocks_{i}_attentions_{j}"
            idx += 1
        if i < len(down) - 1:
            m[f"input_blocks_{idx}_0"] = f"down_blocks_{i}_downsamplers_0"
            idx += 1
    idx = 0
    up_lpb = list(reversed(lpb))
    for i, kind in enumerate(up):
        n = up_lpb[i] + 1
        for j in range(n):
            m[f"output_blocks_{idx}_0"] = f"up_blocks_{i}_resnets_{j}"
            attn = "CrossAttn" in kind
            if attn:
                m[f"output_blocks_{idx}_1"] = f"up_blocks_{i}_attentions_{j}"
            if j == n - 1 and i < len(up) - 1:
                m[f"output_blocks_{idx}_{2 if attn else 1}"] = f"up_blocks_{i}_upsamplers_0"
            idx += 1
    return m


RESNET_PARTS = {"in_layers_0": "norm1", "in_layers_2": "conv1", "emb_layers_1": "time_emb_proj",
                "out_layers_0": "norm2", "out_layers_3": "conv2", "skip_connection": "conv_shortcut"}
LDM_BLOCK = re.compile(r"^(input_blocks_\d+_\d+|output_blocks_\d+_\d+|middle_block_\d+|out_[02]|time_embed_[02]|"
                       r"label_emb_0_[02])(?:_(.+))?$")


def _ldm_module_to_diffusers(body: str, blocks: dict[str, str]) -> str:
    """``input_blocks_1_0_in_layers_2`` -> ``down_blocks_0_resnets_0_conv1`` (kohya spelling kept)."""
    match = LDM_BLOCK.match(body)
    if match is None or match.group(1) not in blocks:
        raise MergeError(f"LoRA module lora_unet_{body} names an LDM block this UNet does not have "
                         "(a LoRA for another base model?)")
    block, rest = blocks[match.group(1)], match.group(2)
    if rest is None:
        return block
    if "_resnets_" in block:
        rest = RESNET_PARTS.get(rest, rest)
    elif "_downsamplers_" in block:
        rest = "conv" if rest == "op" else rest
    return f"{block}_{rest}"


def _map_ldm_names(sd: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    if unet_config is None:
        raise MergeError("an LDM-named LoRA needs the UNet's config to map its block indices")
    blocks = ldm_unet_map(unet_config)
    out = {}
    for key, value in sd.items():
        stem, dot, suffix = key.partition(".")
        if stem.startswith("lora_unet_"):
            body = stem[len("lora_unet_"):]
            if LDM_BLOCK.match(body):
                stem = "lora_unet_" + _ldm_module_to_diffusers(body, blocks)
        out[stem + dot + suffix] = value
    return out


# ----------------------------------------------------------------------------------------------
# LyCORIS: LoCon's Tucker mid, LoHa and LoKr as exact LoRAs


def _groups(sd: Mapping[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix in sorted(suffixes, key=len, reverse=True):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[suffix[1:]] = value
                break
        else:
            raise MergeError(f"LoRA key {key} is not part of a LyCORIS module (mixed or damaged file?)")
    return groups


def _lora_from_dense_factors(b: torch.Tensor, a: torch.Tensor, scale: float, kernel: tuple[int, ...] | None
                             ) -> dict[str, torch.Tensor]:
    """kohya tensors (down, up, alpha) for dW = scale * b @ a, a of shape [rank, in*k*k]."""
    rank = a.shape[0]
    down = a.reshape(rank, -1, *kernel) if kernel else a
    up = b.reshape(b.shape[0], rank, 1, 1) if kernel else b
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(scale * rank))}


def _as_lora(b: torch.Tensor, a: torch.Tensor, scale: float, kernel) -> dict[str, torch.Tensor]:
    """Keep the factorisation when it is no larger than the dense matrix, else write dW = B·I or I·A."""
    out_dim, in_dim = b.shape[0], a.shape[1]
    if a.shape[0] <= min(out_dim, in_dim):
        return _lora_from_dense_factors(b, a, scale, kernel)
    dense = b @ a
    if in_dim <= out_dim:
        return _lora_from_dense_factors(dense, torch.eye(in_dim), scale, kernel)
    return _lora_from_dense_factors(torch.eye(out_dim), dense, scale, kernel)


def _loha_to_lora(stem: str, g: dict[str, torch.Tensor], kernel_hint: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    if "hada_t1" in g or "hada_t2" in g:
        raise MergeError(f"LoHa module {stem} uses a Tucker decomposition (hada_t1/hada_t2), which DiffGraph does not support")
    missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - set(g)
    if missing:
        raise MergeError(f"LoHa module {stem} lacks {min(missing)}")
    w1a, w1b, w2a, w2b = (g[n].to(torch.float32) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
    rank = w1b.shape[0]
    scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return _as_lora(b, a, scale, kernel_hint)


def _factors(full: torch.Tensor | None, left: torch.Tensor | None, right: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U @ V the factor, each 2-D: a stored low-rank pair, or the full matrix and an identity."""
    if full is None:
        return left.to(torch.float32), right.to(torch.float32).reshape(right.shape[0], -1)
    full = full.to(torch.float32).reshape(full.shape[0], -1)
    rows, cols = full.shape
    return (full, torch.eye(cols)) if cols <= rows else (torch.eye(rows), full)


def _lokr_to_lora(stem: str, g: dict[str, torch.Tensor], kernel_hint: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    if "lokr_t2" in g:
        raise MergeError(f"LoKr module {stem} uses a Tucker decomposition (lokr_t2), which DiffGraph does not support")
    if not ({"lokr_w1"} <= set(g) or {"lokr_w1_a", "lokr_w1_b"} <= set(g)) or \
            not ({"lokr_w2"} <= set(g) or {"lokr_w2_a", "lokr_w2_b"} <= set(g)):
        raise MergeError(f"LoKr module {stem} lacks one of its Kronecker factors")
    if "lokr_w2" in g and g["lokr_w2"].ndim == 4 and kernel_hint is None:
        kernel_hint = tuple(g["lokr_w2"].shape[2:])
    rank = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else None
    scale = float(g["alpha"]) / rank if ("alpha" in g and rank is not None) else 1.0
    u1, v1 = _factors(g.get("lokr_w1"), g.get("lokr_w1_a"), g.get("lokr_w1_b"))
    u2, v2 = _factors(g.get("lokr_w2"), g.get("lokr_w2_a"), g.get("lokr_w2_b"))
    return _as_lora(torch.kron(u1, u2), torch.kron(v1, v2), scale, kernel_hint)


def _lycoris_to_lora(sd: dict[str, torch.Tensor], kernels: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Every LoHa/LoKr module rewritten as kohya lora_down/lora_up/alpha; plain LoRA modules kept."""
    out: dict[str, torch.Tensor] = {}
    for stem, g in _groups(sd, LORA_SUFFIXES + LOHA_SUFFIXES + LOKR_SUFFIXES).items():
        if "dora_scale" in g:
            raise MergeError(f"{stem} is a DoRA module (dora_scale), which DiffGraph does not support")
        if any(n.startswith("hada_") for n in g):
            converted = _loha_to_lora(stem, g, kernels.get(stem))
        elif any(n.startswith("lokr_") for n in g):
            converted = _lokr_to_lora(stem, g, kernels.get(stem))
        else:
            converted = g
        out.update({f"{stem}.{name}": tensor for name, tensor in converted.items()})
    return out


def _fold_lora_mid(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoCon with a Tucker core: up(1x1) ∘ mid(kxk) ∘ down(1x1) is one kxk down conv, exactly."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".lora_mid.weight")]:
        stem = key[: -len(".lora_mid.weight")]
        mid, down = out.pop(key).to(torch.float32), out[f"{stem}.lora_down.weight"].to(torch.float32)
        out[f"{stem}.lora_down.weight"] = torch.einsum("ijhw,jc->ichw", mid, down.reshape(down.shape[0], -1)).contiguous()
    return out


def _kohya_kernels(components: Mapping[str, torch.nn.Module] | None) -> dict[str, tuple[int, ...]]:
    """kohya stem -> kernel size of the UNet's conv layers (LoHa/LoKr store conv factors flattened)."""
    unet = (components or {}).get("unet")
    if unet is None:
        return {}
    return {"lora_unet_" + name.replace(".", "_"): tuple(m.kernel_size) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d)}


# ----------------------------------------------------------------------------------------------
# PEFT-native and unprefixed diffusers keys: give them their component


def _component_for(modules: Mapping[str, torch.Tensor | None], components: Mapping[str, torch.nn.Module] | None,
                   family: str | None) -> dict[str, str]:
    """module name -> the component it belongs to, for files that name one model's modules without
    saying which (PEFT's save_pretrained, bare get_peft_model_state_dict dumps). One model is
    preferred for the whole file: the first component that has every module with the LoRA's input
    width (so an SDXL text_encoder_2 file is not split across both CLIP models); else module by module."""
    default = "transformer" if family == "flux" else "unet"
    if not components:
        return {m: "text_encoder" if m.startswith(("text_model.", "encoder.layers.")) else default for m in modules}
    tables = {c: dict(model.named_modules()) for c, model in components.items()}

    def fits(comp: str, module: str, a: torch.Tensor | None) -> bool:
        table = tables[comp]
        target = table.get(module) or table.get(module.removeprefix("text_model."))
        return target is not None and (a is None or _in_features(target) in (None, a.shape[1]))

    for comp in components:
        if all(fits(comp, m, a) for m, a in modules.items()):
            return dict.fromkeys(modules, comp)
    return {m: next((c for c in components if fits(c, m, a)), default) for m, a in modules.items()}


def _in_features(module: torch.nn.Module) -> int | None:
    return getattr(module, "in_features", None) or getattr(module, "in_channels", None)


def _peft_module(key: str) -> tuple[str, str]:
    """``base_model.model.a.b.lora_A.weight`` -> ("a.b", "lora_A.weight")."""
    body = key.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_"):
        if marker in body:
            module, _, tail = body.partition(marker)
            return module, marker.strip(".") + ("." + tail if tail else "")
    raise MergeError(f"PEFT key {key} is not a LoRA weight")


def _peft_native_to_diffusers(sd: dict[str, torch.Tensor], peft_config, components, family) -> dict[str, torch.Tensor]:
    if peft_config is None:
        raise MergeError("PEFT-native LoRA (base_model.model.* keys) without its adapter_config.json: its alpha is unknown")
    cfg = peft_config if isinstance(peft_config, Mapping) else peft_config.to_dict()
    if cfg.get("peft_type", "LORA") not in ("LORA", None):
        raise MergeError(f"PEFT adapter of type {cfg.get('peft_type')} is not a LoRA")
    if cfg.get("use_dora"):
        raise MergeError("DoRA adapters (use_dora) are not supported: their delta is not (alpha/rank)·B·A")
    from peft.utils.other import get_pattern_key

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, kind = _peft_module(key)
        if kind not in ("lora_A.weight", "lora_B.weight"):
            raise MergeError(f"PEFT key {key} is not a LoRA matrix (bias/embedding LoRAs are not supported)")
        modules.setdefault(module, {})[kind] = value
    owner = _component_for({m: p.get("lora_A.weight") for m, p in modules.items()}, components, family)
    out = {}
    for module, parts in modules.items():
        if set(parts) != {"lora_A.weight", "lora_B.weight"}:
            raise MergeError(f"PEFT LoRA module {module} lacks its lora_A or lora_B matrix")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        rank = a.shape[0]
        alpha_key = get_pattern_key(list((cfg.get("alpha_pattern") or {}).keys()), module)
        alpha = (cfg.get("alpha_pattern") or {}).get(alpha_key, cfg.get("lora_alpha", 8))
        scale = alpha / rank ** 0.5 if cfg.get("use_rslora") else alpha / rank
        comp = owner[module]
        out[f"{comp}.{module}.lora_A.weight"] = a
        # the scale goes into B: a dict handed to diffusers carries no adapter metadata
        out[f"{comp}.{module}.lora_B.weight"] = b if scale == 1 else (b.to(torch.float32) * scale)
    return out


def _prefix_diffusers(sd: dict[str, torch.Tensor], components, family) -> dict[str, torch.Tensor]:
    prefixes = tuple(c + "." for c in ADAPTED_COMPONENTS)
    if all(k.startswith(prefixes) for k in sd):
        return sd
    bare = {k for k in sd if not k.startswith(prefixes)}

    def module_of(key: str) -> str:
        return next((key.partition(m)[0] for m in LOW_RANK if m in key), key.rsplit(".", 1)[0])

    downs = {module_of(k): v for k, v in sd.items() if k in bare and any(m in k for m in (".lora_A.", "down."))}
    owner = _component_for({module_of(k): downs.get(module_of(k)) for k in bare}, components, family)
    return {(f"{owner[module_of(k)]}.{k}" if k in bare else k): v for k, v in sd.items()}


def _bake_kohya_alpha(sd: dict[str, torch.Tensor], keep_alpha: bool) -> dict[str, torch.Tensor]:
    """Put each module's alpha/rank into its lora_up; then alpha = rank (``keep_alpha``) or no alpha keys.

    FLUX: diffusers' FLUX converters scale A and B by alpha/rank themselves; with the scale baked
    in they copy the values unchanged, so the coverage proof can find every matrix of the file.
    SD/SDXL: diffusers turns kohya alphas into a LoraConfig whose ``alpha_pattern`` keys do not
    match the attention and text-encoder module names (diffusers 0.42), so a module whose alpha
    differs from the most common one (a LoCon's conv_alpha, LoHa/LoKr rewrites) would get the
    wrong scale; with the alphas baked and dropped every module is loaded at scale 1.
    """
    out = dict(sd)
    for stem in [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]:
        down, up = sd[f"{stem}.lora_down.weight"], sd.get(f"{stem}.lora_up.weight")
        rank = down.shape[0]
        alpha = sd.get(f"{stem}.alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0
        if up is not None and scale != 1.0:
            out[f"{stem}.lora_up.weight"] = up.to(torch.float32) * scale
        if keep_alpha:
            out[f"{stem}.alpha"] = torch.tensor(float(rank))
        else:
            out.pop(f"{stem}.alpha", None)
    return out


def _text_encoder_without_out_proj(sd: Mapping[str, torch.Tensor]) -> bool:
    """A kohya file whose text-encoder modules include no out_proj: diffusers (0.42) converts its
    text-encoder keys to the old ``to_q_lora`` naming and then cannot tell that naming's type
    without a ``to_out_lora`` key ("Could not automatically infer state dict type"), so such a
    file (trained on q/k/v only, as some trainers do) would never load."""
    te = [k for k in sd if k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) and k.endswith(".lora_down.weight")]
    return bool(te) and not any("out_proj" in k for k in te)


def _kohya_to_new_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya file (alphas baked in) in diffusers' current naming, through diffusers' own
    converters: its kohya converter, then the old-to-new text-encoder mapping and the UNet's
    mapping to PEFT names, so the loader need not infer the naming."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    converted, _alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))  # it empties its input; alphas baked: none left
    te = {k: v for k, v in converted.items() if k.startswith("text_encoder")}
    unet = {k: v for k, v in converted.items() if not k.startswith("text_encoder")}
    return {**convert_unet_state_dict_to_peft(unet),
            **(convert_state_dict_to_diffusers(te, original_type=StateDictType.DIFFUSERS_OLD) if te else {})}


def _alphas_misread(sd: Mapping[str, torch.Tensor]) -> bool:
    """Would diffusers give some module of this kohya file the wrong alpha? (see _bake_kohya_alpha)"""
    stems = [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]
    alphas = {float(sd[f"{s}.alpha"]) if f"{s}.alpha" in sd else None for s in stems}
    return len(alphas) > 1


# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedLora:
    """A LoRA file made ready for diffusers.

    ``matrices``: the file after value-preserving renames and rewrites only (every low-rank
    matrix of the file is one of them, or, for LoHa/LoKr/Tucker, their exact LoRA rewrite):
    what the coverage proof looks for in the model. ``loadable``: what ``load_lora_weights``
    gets (for FLUX kohya-style files, diffusers' own converter's output with its unprefixed
    top-level modules repaired). ``unchanged``: the file can be loaded as it is (from its path,
    so diffusers also reads its adapter metadata).
    """

    format: str
    matrices: dict[str, torch.Tensor]
    loadable: dict[str, torch.Tensor]
    unchanged: bool


def _flux_convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' FLUX converter, then the "transformer." prefix it forgets on the top-level
    modules (img_in, txt_in, time_in, vector_in, guidance_in, final_layer: diffusers 0.42 emits
    ``x_embedder.lora_A.weight``, which load_lora_weights then silently drops)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        converted, _alphas = FluxLoraLoaderMixin.lora_state_dict(dict(sd), return_alphas=True)
    except Exception as exc:  # its converters raise ValueError/KeyError/AssertionError on what they cannot map
        detail = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())[:200]
        raise MergeError(f"diffusers cannot convert this FLUX LoRA: {type(exc).__name__}: {detail}") from exc
    return {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v for k, v in converted.items()}


def prepare_lora(state_dict: Mapping[str, torch.Tensor], family: str | None, *, unet_config=None,
                 components: Mapping[str, torch.nn.Module] | None = None, peft_config=None) -> PreparedLora:
    """Name the file's format, refuse what cannot be merged, rewrite what diffusers would drop.

    ``family`` is the base's family ("sd15", "sdxl", "flux"; None skips the family check);
    ``unet_config`` maps LDM block names; ``components`` ({"unet": model, ...}) places
    PEFT-native and unprefixed keys in the right model and gives LoHa/LoKr conv kernels;
    ``peft_config`` (a LoraConfig or its dict, i.e. adapter_config.json) gives PEFT-native
    files their alpha. Raises MergeError with a one-line reason.
    """
    sd = dict(state_dict)
    fmt = identify_lora_format(sd)
    if fmt == "unknown":
        raise MergeError(f"unrecognised LoRA format (keys like {_example(sd)!r})")
    if fmt == "flux-control":
        raise MergeError("FLUX Control LoRA (it widens the model's input layer and norms): not a style expert")
    if any(k.endswith(".dora_scale") or ".lora_magnitude_vector" in k for k in sd):
        raise MergeError("DoRA LoRA (dora_scale / lora_magnitude_vector): not supported, its delta is not (alpha/rank)·B·A")
    check_family(sd, family)
    try:
        return _converted(state_dict, sd, fmt, family, unet_config, components, peft_config)
    except MergeError:
        raise
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError) as exc:  # half a pair, a tensor of the wrong rank
        raise MergeError(f"malformed {fmt} LoRA: {describe(exc)}") from None


def _converted(state_dict, sd: dict, fmt: str, family: str | None, unet_config, components, peft_config) -> PreparedLora:
    changed = False
    if family in ("sd15", "sdxl") and _is_kohya(list(sd)) and any(
            re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|out_[02]|time_embed_|label_emb_)", k) for k in sd):
        sd, changed = _map_ldm_names(sd, unet_config), True
    if fmt in ("lycoris-loha", "lycoris-lokr"):
        sd, changed = _lycoris_to_lora(sd, _kohya_kernels(components)), True
    if any(k.endswith(".lora_mid.weight") for k in sd):
        sd, changed = _fold_lora_mid(sd), True
    now = identify_lora_format(sd)
    if now == "peft-native":
        sd, changed = _peft_native_to_diffusers(sd, peft_config, components, family), True
    elif now == "diffusers":
        prefixed = _prefix_diffusers(sd, components, family)
        changed = changed or prefixed is not sd
        sd = prefixed
    elif now == "flux-comfy":
        renamed = {k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v
                   for k, v in sd.items()}
        changed = changed or list(renamed) != list(sd)
        sd = renamed
    now = identify_lora_format(sd)
    if family == "flux" and now in ("flux-kohya", "flux-comfy", "flux-kohya-diffusers"):
        sd = _bake_kohya_alpha(sd, keep_alpha=True)
        return PreparedLora(fmt, sd, _flux_convert(sd), unchanged=False)
    if _is_kohya(list(sd)) and _alphas_misread(sd):
        sd, changed = _bake_kohya_alpha(sd, keep_alpha=False), True
    if _is_kohya(list(sd)) and _text_encoder_without_out_proj(sd):
        baked = _bake_kohya_alpha(sd, keep_alpha=False)
        return PreparedLora(fmt, baked, _kohya_to_new_diffusers(baked), unchanged=False)
    if not changed:
        return PreparedLora(fmt, dict(state_dict), dict(state_dict), unchanged=True)
    return PreparedLora(fmt, sd, sd, unchanged=False)


def normalize_lora(state_dict: Mapping[str, torch.Tensor], family: str | None, **kw) -> dict[str, torch.Tensor]:
    """A state dict that diffusers' ``load_lora_weights`` loads completely, or a MergeError.

    Same arguments as :func:`prepare_lora`. Returns ``state_dict`` itself when diffusers
    converts it as it is (kohya, diffusers with component prefixes, LoCon without a Tucker core
    and with uniform alphas, FLUX xlabs / fal-kontext).
    """
    prepared = prepare_lora(state_dict, family, **kw)
    return state_dict if prepared.unchanged else prepared.loadable  # type: ignore[return-value]
