"""Rendering through a diffusers pipeline, deterministic for a seed on a given machine."""

from __future__ import annotations

import torch
from PIL import Image

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def render(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
           guidance: float = DEFAULT_GUIDANCE, batch: int = 32, negative_prompt: str = "",
           width: int | None = None, height: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), ``width`` x ``height`` (default: the pipeline's native
    size). Each image has its own CPU generator, so an image does not depend on which batch it
    was rendered in."""
    if len(prompts) != len(seeds):
        raise ValueError("render: prompts and seeds must have the same length")
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch]]
        chunk = list(prompts[i : i + batch])
        out = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                   generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                   width=width, height=height)
        images.extend(out.images)
    return images
