"""open_clip CLIP state dicts (HPSv2's ``HPS_v2.1_compressed.pt``) as transformers' CLIPModel.

open_clip's modules import torchvision (``open_clip.utils`` needs
``torchvision.ops.misc.FrozenBatchNorm2d``, and the package ``__init__`` pulls in its
torchvision transforms), and torchvision must stay out of this environment. The ViT-H-14
CLIP that HPSv2 fine-tunes is, layer for layer, the architecture of transformers'
``CLIPModel`` (pre-LN transformer blocks, exact GELU, a class token, a learned position
table, pre/post LayerNorms, bias-free projections, causal text tower pooled at the end token)
-- the LAION Hub repo ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` ships exactly this
conversion. So we map the keys:

=====================================================  ===============================================================
open_clip                                              transformers CLIPModel
=====================================================  ===============================================================
``token_embedding.weight``                             ``text_model.embeddings.token_embedding.weight``
``positional_embedding`` (ctx, W)                      ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.{i}.ln_1`` / ``ln_2``          ``text_model.encoder.layers.{i}.layer_norm1`` / ``layer_norm2``
``transformer.resblocks.{i}.attn.in_proj_weight``      split in three rows blocks -> ``self_attn.{q,k,v}_proj.weight``
``transformer.resblocks.{i}.attn.in_proj_bias``        split in three -> ``self_attn.{q,k,v}_proj.bias``
``transformer.resblocks.{i}.attn.out_proj``            ``self_attn.out_proj``
``transformer.resblocks.{i}.mlp.c_fc`` / ``c_proj``    ``mlp.fc1`` / ``mlp.fc2``
``ln_final``                                           ``text_model.final_layer_norm``
``text_projection`` (W, E), used as ``x @ P``          ``text_projection.weight`` = ``P.T`` (or a Linear's weight as is)
``visual.class_embedding`` (W,)                        ``vision_model.embeddings.class_embedding``
``visual.positional_embedding`` (N+1, W)               ``vision_model.embeddings.position_embedding.weight``
``visual.conv1.weight`` (no bias)                      ``vision_model.embeddings.patch_embedding.weight``
``visual.ln_pre``                                      ``vision_model.pre_layrnorm`` (sic)
``visual.transformer.resblocks.{i}.*``                 ``vision_model.encoder.layers.{i}.*`` as for the text tower
``visual.ln_post``                                     ``vision_model.post_layernorm``
``visual.proj`` (W, E)                                 ``visual_projection.weight`` = ``proj.T``
``logit_scale``                                        ``logit_scale``
``attn_mask`` (buffer, in old checkpoints)             dropped (the causal mask is built on the fly)
=====================================================  ===============================================================

The number of heads is not stored in a state dict; ViT-H-14 uses 80-wide vision heads
(1280 / 16) and 64-wide text heads (1024 / 16), which are the defaults here. Every other size
(widths, depths, MLP width, patch size, image size, context length, vocabulary, embedding
size) is read from the tensor shapes. Any key that is neither mapped nor known to be
ignorable is an error, as is any CLIPModel parameter left unfilled.
"""

from __future__ import annotations

import re

import torch

IGNORED = {"attn_mask", "logit_bias", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_RES = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def unwrap(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The state dict inside an open_clip training checkpoint (``{"state_dict": ...}``),
    with DistributedDataParallel's ``module.`` prefix removed."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(sd, dict):
        raise ValueError("not an open_clip checkpoint: expected a dict of tensors or {'state_dict': {...}}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def convert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        if key in IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = t
            continue
        if key == "text_projection":
            out["text_projection.weight"] = t.t().contiguous()
            continue
        if key == "text_projection.weight":
            out["text_projection.weight"] = t
            continue
        if key == "visual.proj":
            out["visual_projection.weight"] = t.t().contiguous()
            continue
        m = _RES.match(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                q, k, v = t.chunk(3, dim=0)
                out[prefix + f"self_attn.q_proj.{kind}"] = q.contiguous()
                out[prefix + f"self_attn.k_proj.{kind}"] = k.contiguous()
                out[prefix + f"self_attn.v_proj.{kind}"] = v.contiguous()
                continue
            if rest in _BLOCK:
                out[prefix + _BLOCK[rest]] = t
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys for an open_clip ViT CLIP: {unknown[:10]}"
                         + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    return out


def _depth(sd, prefix: str) -> int:
    pat = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def config_from_state_dict(sd: dict[str, torch.Tensor], vision_head_width: int = VISION_HEAD_WIDTH,
                           text_head_width: int = TEXT_HEAD_WIDTH):
    """A CLIPConfig with every size read from an open_clip state dict's shapes."""
    from transformers import CLIPConfig

    tok = sd["token_embedding.weight"]
    text_w = tok.shape[1]
    conv = sd["visual.conv1.weight"]
    vis_w, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    tp = sd["text_projection"] if "text_projection" in sd else sd["text_projection.weight"].t()
    embed = tp.shape[1]
    if sd["visual.proj"].shape[1] != embed:
        raise ValueError("open_clip checkpoint: image and text projections disagree on the embedding size")
    for w, hw, what in ((vis_w, vision_head_width, "vision"), (text_w, text_head_width, "text")):
        if w % hw:
            raise ValueError(f"{what} width {w} is not a multiple of the head width {hw}")
    text_cfg = dict(
        vocab_size=tok.shape[0], hidden_size=text_w,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_depth(sd, "transformer.resblocks."), num_attention_heads=text_w // text_head_width,
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=embed,
    )
    vision_cfg = dict(
        hidden_size=vis_w, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_depth(sd, "visual.transformer.resblocks."), num_attention_heads=vis_w // vision_head_width,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=embed,
    )
    return CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=embed)


def clip_model_from_open_clip(checkpoint: dict, dtype=torch.float32, vision_head_width: int = VISION_HEAD_WIDTH,
                              text_head_width: int = TEXT_HEAD_WIDTH):
    """Build the transformers CLIPModel that computes what the open_clip model computes."""
    from transformers import CLIPModel

    from .modules import materialize

    sd = unwrap(checkpoint)
    config = config_from_state_dict(sd, vision_head_width, text_head_width)
    converted = {k: v.to(dtype) for k, v in convert(sd).items()}
    with torch.device("meta"):
        model = CLIPModel(config)
    return materialize(model, converted, what="HPSv2 (open_clip ViT-H-14 -> CLIPModel)")
