"""The mini metric suite: stand-ins for the paper's five image metrics in this domain.

- ``attr``: prompt-attribute agreement judged by a small attribute classifier trained on the
  synthetic ground truth (the CLIP-Score analogue: does the image show what was asked?).
- ``miniclip``: a small contrastive text-image model (image CNN against MiniLM text
  embeddings), the analogue of the learned preference scorers (PickScore, HPS).
- ``quality``: sharpness and contrast of the image, the aesthetic-score analogue.
- ``damage``: how burnt the image looks (0 clean, 1 destroyed), judged by a small network
  trained on clean scenes against scenes damaged the way overdosed merges damage them
  (``training.burn``). It is what makes the reward penalise an overcooked image as ImageReward
  does: sharpness and contrast alone rise when a LoRA stack burns an image into noise.

Each returns one float per (image, prompt); :func:`combined_reward` folds them into the
scalar the planner is trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import domain

METRICS = ("attr", "miniclip", "quality", "damage")
DAMAGE_PENALTY = 0.5  # reward lost by a fully burnt image: more than any skill can win back


def _conv_trunk(width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
        nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
    )


class AttributeNet(nn.Module):
    """One classification head per attribute over a shared convolutional trunk."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.trunk = _conv_trunk(width)
        self.heads = nn.ModuleDict({a: nn.Linear(8 * width, len(v)) for a, v in domain.ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {a: head(h) for a, head in self.heads.items()}


class DamageNet(nn.Module):
    """One logit per image: how damaged it is (sigmoid: 0 clean, 1 destroyed)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.trunk = _conv_trunk(width)
        self.head = nn.Linear(8 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).squeeze(-1)


class MiniClip(nn.Module):
    """Image CNN and a projection of frozen MiniLM sentence embeddings into one space."""

    def __init__(self, width: int = 32, text_dim: int = 384, dim: int = 64):
        super().__init__()
        self.image = nn.Sequential(_conv_trunk(width), nn.Linear(8 * width, dim))
        self.text = nn.Sequential(nn.Linear(text_dim, 128), nn.GELU(), nn.Linear(128, dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(text_emb), dim=-1)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(domain.to_tensor_array([im.convert("RGB").resize((domain.SIZE, domain.SIZE)) for im in images]))


def quality_score(images: torch.Tensor) -> torch.Tensor:
    """Sharpness (mean absolute Laplacian) plus RMS contrast, in roughly [0, 1]."""
    gray = images.mean(dim=1, keepdim=True)
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    sharp = F.conv2d(gray, lap, padding=1)[..., 1:-1, 1:-1].abs().mean(dim=(1, 2, 3))
    contrast = gray.std(dim=(1, 2, 3))
    return (sharp / 0.25).clamp(0, 1) * 0.6 + (contrast / 0.6).clamp(0, 1) * 0.4


class MetricSuite:
    """Scores rendered images against their prompts with the mini metrics (METRICS)."""

    def __init__(self, attribute_net: AttributeNet, miniclip: MiniClip, damage_net: DamageNet, embed):
        self.attribute_net = attribute_net.eval()
        self.miniclip = miniclip.eval()
        self.damage_net = damage_net.eval()
        self.embed = embed  # texts -> unit-norm MiniLM vectors, as in training

    @classmethod
    def load(cls, directory: Path) -> "MetricSuite":
        from safetensors.torch import load_file

        from diffgraph.text_embedding import embed

        net, clip, damage = AttributeNet(), MiniClip(), DamageNet()
        net.load_state_dict(load_file(directory / "attribute_net.safetensors"))
        clip.load_state_dict(load_file(directory / "miniclip.safetensors"))
        damage.load_state_dict(load_file(directory / "damage_net.safetensors"))
        return cls(net, clip, damage, embed)

    @torch.no_grad()
    def predict_attributes(self, images: torch.Tensor) -> list[dict]:
        logits = self.attribute_net(images)
        preds = {a: logits[a].argmax(-1).tolist() for a in logits}
        return [{a: domain.ATTRIBUTES[a][preds[a][i]] for a in preds} for i in range(images.shape[0])]

    @torch.no_grad()
    def damage(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.damage_net(images))

    @torch.no_grad()
    def score(self, images: list[Image.Image] | torch.Tensor, prompts: list[str]) -> list[dict[str, float]]:
        x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
        preds = self.predict_attributes(x)
        img_emb, txt_emb = self.miniclip(x, torch.as_tensor(self.embed(prompts)))
        clip = (img_emb * txt_emb).sum(-1)
        qual = quality_score(x)
        damage = self.damage(x)
        out = []
        for i, prompt in enumerate(prompts):
            target = domain.target_attrs(prompt)
            agree = float(np.mean([preds[i][a] == v for a, v in target.items()])) if target else 0.0
            out.append({"attr": agree, "miniclip": float(clip[i]), "quality": float(qual[i]), "damage": float(damage[i])})
        return out


def combined_reward(scores: dict[str, float]) -> float:
    """The scalar reward: agreement dominates, the learned and quality scores refine it, and
    damage is subtracted, so a burnt image scores below a clean one that misses its skill."""
    return (0.6 * scores["attr"] + 0.3 * (scores["miniclip"] + 1) / 2 + 0.1 * scores["quality"]
            - DAMAGE_PENALTY * scores["damage"])


def save_config(directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps({"metrics": list(METRICS), "attributes": domain.ATTRIBUTES}, indent=1))
