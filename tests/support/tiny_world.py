"""A CPU-sized copy of a real user's setup: tiny random-weight SD 1.5 and SDXL bases with the
real module names (tests/support/tiny_layouts.py), saved as diffusers folders, and an
AUTOMATIC1111-style model folder of LoRAs for them, with the sidecars, copies and non-experts
such folders hold.

What the library holds (``LIBRARY``: path under models/ -> what DiffGraph must make of it):

- four SD 1.5 LoRAs, their base spelled four ways ("SD 1.5" in a Civitai Helper sidecar,
  "SD1" in A1111's own JSON, "sd_v1" in kohya's ss_* metadata, "SD 1.4" in a
  ComfyUI-Lora-Manager sidecar), trigger words in their sidecars;
- a byte-identical copy of one of them ("pixel_art (1).safetensors");
- an SDXL LoRA declared "Pony" (active once an SDXL base is configured);
- a file declared "Pony" that holds SD 1.5 weights (refused with that reason);
- a VAE, a textual-inversion embedding, and the user's base checkpoint itself (skipped).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import lora_writers as W
from .tiny_layouts import sd15_components, sdxl_components

SD15_TARGETS = r".*(down_blocks\.[02]|mid_block|up_blocks\.[13])\.attentions\.[01]\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
SDXL_TARGETS = r".*(down_blocks\.1\.attentions\.1\.transformer_blocks\.1|mid_block\.attentions\.0\.transformer_blocks\.5)\.attn[12]\.(to_q|to_v)"
CLIP_TARGETS = r".*layers\.(0|5|11)\.self_attn\.(q_proj|v_proj)"

LIBRARY = {
    "Lora/styles/pixel_art.safetensors": ("sd15", ["pxlart"]),
    "Lora/ink_wash.safetensors": ("sd15", ["inkwash"]),
    "Lora/sketch.safetensors": ("sd15", []),
    "LyCORIS/watercolor.safetensors": ("sd15", ["wtrclr"]),
    "Lora/xl/pony_glow.safetensors": ("sdxl", ["glowpony"]),
}
COPY = "Lora/styles/pixel_art (1).safetensors"
MISDECLARED = "Lora/xl/not_really_pony.safetensors"
SKIPPED = {"VAE/vae-ft-mse.safetensors": "a VAE", "../embeddings/badhands.safetensors": "a textual-inversion embedding"}


def tokenizer():
    from diffgraph.tools.scoring import preprocess

    return preprocess.clip_tokenizer(None)  # CLIP's real BPE (49408 tokens), built offline


def pipeline(family: str, seed: int = 0):
    """A tiny SD 1.5 or SDXL pipeline with the real module names."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tok = tokenizer()
    if family == "sd15":
        c = sd15_components(seed)
        return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=tok, unet=c["unet"],
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    c = sdxl_components(seed)
    return StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
                                     tokenizer=tok, tokenizer_2=tok, unet=c["unet"], scheduler=scheduler)


def base_folder(family: str, path: Path, seed: int = 0):
    """The tiny base saved as a diffusers folder (what DIFFGRAPH_BASE_<FAMILY> may name); returns
    the pipeline."""
    pipe = pipeline(family, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def kohya_lora(pipe, family: str, seed: int, path: Path, metadata: dict | None = None) -> Path:
    """A kohya LoRA over the UNet's attention and the first text encoder, real names."""
    targets = SD15_TARGETS if family == "sd15" else SDXL_TARGETS
    unet, _ = W.lora_factors(pipe.unet, targets, 4, 4.0, seed)
    te, _ = W.lora_factors(pipe.text_encoder, CLIP_TARGETS, 4, 4.0, seed + 100)
    written = W.kohya({"unet": (pipe.unet, unet), "text_encoder": (pipe.text_encoder, te)}, 4.0, 4, family)
    written.metadata = dict(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    return written.save(path)


def a1111_library(webui: Path, sd15, sdxl, base_checkpoint: Path | None = None) -> Path:
    """The folder described in the module docstring, under ``webui`` (webui/models/...)."""
    models = webui / "models"
    for i, (rel, (family, words)) in enumerate(LIBRARY.items()):
        path = models / rel
        meta = {"ss_base_model_version": "sd_v1"} if rel.endswith("sketch.safetensors") else None
        kohya_lora(sd15 if family == "sd15" else sdxl, family, 10 + i, path, meta)
        if rel.endswith("pixel_art.safetensors"):
            path.with_suffix(".civitai.info").write_text(json.dumps(
                {"modelId": 101, "baseModel": "SD 1.5", "trainedWords": ["pixel art style"],
                 "model": {"name": "Pixel Art", "type": "LORA"}, "description": "pixel art, crisp 8-bit sprites"}))
            path.with_suffix(".json").write_text(json.dumps(
                {"sd version": "SD1", "activation text": ", ".join(words), "preferred weight": 0.8,
                 "description": "Pixel art: blocky sprites with a limited palette"}))
        elif rel.endswith("ink_wash.safetensors"):
            path.with_suffix(".json").write_text(json.dumps(
                {"sd version": "SD1", "activation text": ", ".join(words), "description": "ink wash painting, sumi-e brush"}))
        elif rel.endswith("watercolor.safetensors"):
            path.with_suffix(".metadata.json").write_text(json.dumps(
                {"model_name": "Watercolor", "base_model": "SD 1.4", "civitai": {"trainedWords": words},
                 "modelDescription": "soft watercolor painting with paper texture"}))
        elif rel.endswith("pony_glow.safetensors"):
            path.with_suffix(".civitai.info").write_text(json.dumps(
                {"modelId": 102, "baseModel": "Pony", "trainedWords": words,
                 "model": {"name": "Pony Glow", "type": "LORA"}, "description": "neon glow outlines"}))
    shutil.copy(models / "Lora/styles/pixel_art.safetensors", models / COPY)
    kohya_lora(sd15, "sd15", 99, models / MISDECLARED)
    (models / MISDECLARED).with_suffix(".civitai.info").write_text(json.dumps(
        {"baseModel": "Pony", "model": {"name": "Not really Pony", "type": "LORA"}}))
    vae = {f"vae.{k}": v.contiguous() for k, v in sd15.vae.state_dict().items()}
    (models / "VAE").mkdir(parents=True)
    save_file({k.removeprefix("vae."): v for k, v in vae.items()}, str(models / "VAE/vae-ft-mse.safetensors"))
    (webui / "embeddings").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32)}, str(webui / "embeddings/badhands.safetensors"))
    if base_checkpoint is not None:
        (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
        shutil.copy(base_checkpoint, models / "Stable-diffusion" / base_checkpoint.name)
    return webui
