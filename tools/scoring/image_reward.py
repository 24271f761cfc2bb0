"""ImageReward (Xu et al., 2023) on transformers' BLIP classes.

ImageReward is BLIP's ViT-L/16 image encoder, BLIP's text encoder (BERT-base whose every
layer adds cross-attention to the image tokens, ``med.py``'s ``BertModel`` without pooler),
and an MLP on the text encoder's [CLS] state; the reward is ``(mlp(h_cls) - mean) / std``
with ``mean = 0.16717362830052426`` and ``std = 1.0333394966054072``. Prompts are tokenised
with ``bert-base-uncased``, padded to 35 tokens; images go through OpenAI CLIP's
preprocessing at 224 px.

``ImageReward.pt`` is the state dict of ImageReward's module. Its key layout and our mapping:

==========================================================  ==============================================================
ImageReward.pt                                              ours
==========================================================  ==============================================================
``blip.visual_encoder.patch_embed.proj.{weight,bias}``      BlipVisionModel ``embeddings.patch_embedding.{weight,bias}``
``blip.visual_encoder.cls_token`` (1, 1, W)                 ``embeddings.class_embedding``
``blip.visual_encoder.pos_embed`` (1, N+1, W)               ``embeddings.position_embedding``
``blip.visual_encoder.blocks.{i}.norm1`` / ``norm2``        ``encoder.layers.{i}.layer_norm1`` / ``layer_norm2``
``blip.visual_encoder.blocks.{i}.attn.qkv``                 ``encoder.layers.{i}.self_attn.qkv`` (same q|k|v row order)
``blip.visual_encoder.blocks.{i}.attn.proj``                ``encoder.layers.{i}.self_attn.projection``
``blip.visual_encoder.blocks.{i}.mlp.fc1`` / ``fc2``        ``encoder.layers.{i}.mlp.fc1`` / ``fc2``
``blip.visual_encoder.norm``                                ``post_layernorm``
``blip.text_encoder.*``                                     BlipTextModel (no pooler) with the *same* names
                                                            (it is a port of BLIP's ``med.py``): ``embeddings.*``,
                                                            ``encoder.layer.{i}.attention.*``, ``.crossattention.*``,
                                                            ``.intermediate.dense``, ``.output.*``
``blip.text_encoder.embeddings.position_ids``               dropped (a buffer, rebuilt)
``mlp.layers.{0,2,4,6,7}``                                  :class:`PreferenceMLP` ``layers.{0,2,4,6,7}``
``blip.vision_proj``, ``blip.text_proj`` (and any other     unused by the reward; ignored, as ImageReward's own
``blip.*`` module outside the two encoders)                 ``load_state_dict(strict=False)`` does
==========================================================  ==============================================================

The two encoders are then loaded strictly. BLIP's ViT is timm's: pre-norm blocks,
LayerNorm eps 1e-6, exact GELU, biased qkv, scale ``head_dim ** -0.5`` -- what BlipVisionModel
computes with ``layer_norm_eps=1e-6``; its ``last_hidden_state`` is post-LayerNormed like
BLIP's ``VisionTransformer.forward``. The text encoder runs bidirectionally
(``is_decoder=False``) over its padding mask, with cross-attention to all image tokens.

Sizes come from the tensor shapes. Heads are not stored: ViT-L has 64-wide heads (1024/16);
the text encoder's head count and LayerNorm eps come from ``med_config.json`` when it is next
to the checkpoint, else BERT-base's (64-wide heads, eps 1e-12).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import preprocess
from .modules import PreferenceMLP, materialize

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_TOKENS = 35
VISION_HEAD_WIDTH = 64

_VIS_TOP = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIS_BLOCK = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def split_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt -> (BlipVisionModel state dict, BlipTextModel state dict, MLP state dict)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, t in sd.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            if k in _VIS_TOP:
                vision[_VIS_TOP[k]] = t
            elif (m := _BLOCK_RE.match(k)) and m.group(2) in _VIS_BLOCK:
                vision[f"encoder.layers.{m.group(1)}.{_VIS_BLOCK[m.group(2)]}.{m.group(3)}"] = t
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            k = key[len("blip.text_encoder."):]
            if k != "embeddings.position_ids":
                text[k] = t
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = t
        elif not key.startswith("blip."):
            unknown.append(key)
    if unknown:
        raise ValueError(f"ImageReward checkpoint: unexpected keys {unknown[:8]}")
    if not vision or not text or not mlp:
        raise ValueError("ImageReward checkpoint: expected blip.visual_encoder.*, blip.text_encoder.* and mlp.* keys")
    return vision, text, mlp


def _depth(sd, pattern: str) -> int:
    pat = re.compile(pattern)
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def vision_config(sd):
    from transformers import BlipVisionConfig

    w = sd["embeddings.patch_embedding.weight"]
    width, patch = w.shape[0], w.shape[-1]
    grid = int(round((sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    if width % VISION_HEAD_WIDTH:
        raise ValueError(f"ImageReward ViT width {width} is not a multiple of the head width {VISION_HEAD_WIDTH}")
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_depth(sd, r"^encoder\.layers\.(\d+)\."), num_attention_heads=width // VISION_HEAD_WIDTH,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
    )


def text_config(sd, med_config: dict | None):
    from transformers import BlipTextConfig

    med = med_config or {}
    hidden = sd["embeddings.word_embeddings.weight"].shape[1]
    if "encoder.layer.0.crossattention.self.key.weight" not in sd:
        raise ValueError("ImageReward checkpoint: the text encoder has no cross-attention layers")
    cfg = BlipTextConfig(
        vocab_size=sd["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        encoder_hidden_size=sd["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_depth(sd, r"^encoder\.layer\.(\d+)\."),
        num_attention_heads=int(med.get("num_attention_heads", hidden // 64)),
        max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=int(med.get("pad_token_id", 0)),
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False
    )
    cfg._attn_implementation = "eager"
    return cfg


class ImageRewardScorer:
    name = "image_reward"

    def __init__(self, checkpoint: Path, tokenizer_dir: Path, med_config: Path | None = None,
                 device: str = "cpu", dtype=torch.float32):
        from transformers import BlipTextModel, BlipVisionModel

        from .assets import load_state_dict, prefer_safetensors

        vision_sd, text_sd, mlp_sd = split_checkpoint(load_state_dict(prefer_safetensors(Path(checkpoint))))
        med = json.loads(Path(med_config).read_text()) if med_config else None
        vcfg, tcfg = vision_config(vision_sd), text_config(text_sd, med)
        with torch.device("meta"):
            vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
        self.vision = materialize(vision, {k: v.to(dtype) for k, v in vision_sd.items()}, "ImageReward BLIP ViT").to(device)
        self.text = materialize(text, {k: v.to(dtype) for k, v in text_sd.items()}, "ImageReward BLIP text encoder").to(device)
        self.mlp = PreferenceMLP.from_state_dict(mlp_sd, "ImageReward MLP").to(device)
        self.tokenizer = preprocess.bert_tokenizer(tokenizer_dir)
        self.image_size = vcfg.image_size
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def score(self, images, prompts) -> list[float]:
        pix = preprocess.batch(images, "openai_clip", self.image_size).to(self.device, self.dtype)
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        image_embeds = self.vision(pixel_values=pix).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False)
        cls = out.last_hidden_state[:, 0, :].float()
        rewards = (self.mlp(cls).squeeze(-1) - MEAN) / STD
        return rewards.cpu().tolist()
