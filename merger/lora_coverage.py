"""Prove that a LoRA file really landed in a pipeline.

diffusers silently drops keys it does not understand, so "no error" proves nothing. Here each
low-rank matrix in the file must be found, value for value, among the adapter weights that
were injected into the pipeline's modules, whatever naming convention the file used.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch

LOW_RANK_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().to(torch.float16).reshape(t.shape[0], -1).contiguous()
    return hashlib.sha1(flat.cpu().numpy().tobytes()).hexdigest()


def file_matrices(state_dict: dict[str, torch.Tensor]) -> Counter:
    """Digests of the low-rank matrices in a LoRA state dict (alphas and others ignored)."""
    return Counter(_digest(v) for k, v in state_dict.items() if any(m in k for m in LOW_RANK_MARKERS) and v.ndim >= 2)


def injected_matrices(pipe, adapter_name: str) -> Counter:
    """Digests of the adapter's A and B weights in every model of the pipeline."""
    found: Counter = Counter()
    for component in ("unet", "text_encoder", "text_encoder_2", "transformer"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            if name.endswith(f".{adapter_name}.weight") and (".lora_A." in name or ".lora_B." in name):
                found[_digest(param)] += 1
    return found


def coverage(pipe, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(matrices of the file found in the pipeline, matrices in the file)."""
    want = file_matrices(state_dict)
    have = injected_matrices(pipe, adapter_name)
    landed = sum(min(n, have[d]) for d, n in want.items())
    return landed, sum(want.values())
