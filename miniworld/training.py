"""Training loops of the mini world: the VAE, the denoiser (base, checkpoint and LoRA experts).

Images are rendered from scenes, encoded once to latents, and captions are re-drawn at every
step from the scene's attributes, so the text side sees many phrasings of the same picture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from . import domain
from .models import MAX_TOKENS


@dataclass
class LatentSet:
    """Scenes with their (scaled) latents, the training set of a denoiser."""

    scenes: list
    latents: torch.Tensor


def render_batch(scenes, corrupt_rng: random.Random | None = None) -> torch.Tensor:
    """Render scenes to a (N, 3, 32, 32) tensor in [-1, 1]; ``corrupt_rng`` damages images
    (noise and colour swaps) to make the harmful expert's training data."""
    images = [domain.render(s) for s in scenes]
    arr = domain.to_tensor_array(images)
    if corrupt_rng is not None:
        g = np.random.default_rng(corrupt_rng.randrange(2**31))
        arr = arr[:, g.permutation(3)] * 0.6 + g.normal(0, 0.45, arr.shape).astype(np.float32)
    return torch.from_numpy(np.clip(arr, -1, 1).astype(np.float32))


def burn(vae, x: torch.Tensor, severity: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Damage images the way an overdosed merge does, ``severity`` in [0, 1] per image.

    An overdosed UNet hands the VAE decoder latents far from any it was trained on, so most of
    the damage is made there: latents scaled up (blown-out contrast), latent noise at the
    latents' own resolution and at 2x2 and 4x4 (the smeared blobs of a burnt LoRA stack) and a
    per-channel shift (a colour cast), decoded by the real VAE. On top, in pixels: speckle and a
    channel swap blended in (the harmful expert's colour damage). Each image mixes these in its
    own random proportions, so a judge trained on them learns "damaged", not one signature.
    Images are in [-1, 1]."""
    n = x.shape[0]
    s = severity.view(n, 1, 1, 1)
    mix = torch.rand(n, 7, 1, 1, 1, generator=generator)
    mix = mix / mix.sum(dim=1, keepdim=True) * 3
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        scale = z.std()
        size = z.shape[-2:]
        z = z * (1 + mix[:, 0] * s * 3.0)
        z = z + mix[:, 1] * s * 2.5 * scale * torch.randn(z.shape, generator=generator)
        for i, grid in enumerate((2, 4)):
            blob = torch.randn(n, z.shape[1], grid, grid, generator=generator)
            z = z + mix[:, 2 + i] * s * 3.0 * scale * F.interpolate(blob, size=size, mode="bilinear", align_corners=False)
        z = z + mix[:, 4] * s * 2.0 * scale * torch.randn(n, z.shape[1], 1, 1, generator=generator)
        out = vae.decode(z).sample
    out = out + mix[:, 5] * s * 0.3 * torch.randn(x.shape, generator=generator)
    swapped = out[:, torch.randperm(3, generator=generator)]
    out = out + mix[:, 6] * s * 0.5 * (swapped - out)
    return out.clamp(-1, 1)


def train_vae(vae, steps: int, batch: int, rng: random.Random, progress: Progress) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    task = progress.add_task("VAE", total=steps)
    vae.train()
    for _ in range(steps):
        x = render_batch([domain.sample_scene(rng, uniform=True) for _ in range(batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress.update(task, advance=1, description=f"VAE loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, scenes, corrupt_rng: random.Random | None = None, chunk: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(scenes), chunk):
        x = render_batch(scenes[i : i + chunk], corrupt_rng)
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


def train_denoiser(
    *, unet, text_encoder, tokenizer, scheduler, data: LatentSet, params, steps: int, lr: float, batch: int,
    rng: random.Random, progress: Progress, label: str, drop_caption: float = 0.1,
) -> list[float]:
    """Epsilon-prediction training of ``params`` (the whole model, or only LoRA weights).

    Captions are dropped to "" with probability ``drop_caption`` so classifier-free guidance
    works at render time.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    task = progress.add_task(label, total=steps)
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    losses = []
    n = len(data.scenes)
    for _ in range(steps):
        idx = [rng.randrange(n) for _ in range(batch)]
        texts = ["" if rng.random() < drop_caption else domain.caption(data.scenes[i].attrs, rng) for i in idx]
        latents = data.latents[idx]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        cond = text_encoder(tokenize(tokenizer, texts))[0]
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            progress.update(task, advance=10, description=f"{label} loss {np.mean(losses[-50:]):.4f}")
    progress.update(task, completed=steps)
    unet.eval()
    text_encoder.eval()
    return losses
