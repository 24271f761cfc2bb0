"""Small shared pieces: the preference MLP head and strict, allocation-free model loading."""

from __future__ import annotations

import torch
from torch import nn


class PreferenceMLP(nn.Module):
    """The head shared by the LAION aesthetic predictor v2 and ImageReward.

    ``layers`` is the same ``nn.Sequential`` as in improved-aesthetic-predictor and
    ImageReward: Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
    Dropout, Linear(64, 16), Linear(16, 1) -- no activations -- so the checkpoints' keys
    ``layers.{0,2,4,6,7}.{weight,bias}`` load as they are.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], what: str) -> "PreferenceMLP":
        if "0.weight" in sd:  # saved from a bare nn.Sequential
            sd = {"layers." + k: v for k, v in sd.items()}
        if "layers.0.weight" not in sd:
            raise ValueError(f"{what}: expected keys layers.0.weight ... layers.7.bias, got {sorted(sd)[:8]}")
        mlp = cls(sd["layers.0.weight"].shape[1])
        mlp.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return mlp.eval()


def materialize(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state_dict`` into a model built on the meta device, strictly.

    Missing or unexpected keys, or a shape mismatch, raise. Non-persistent ``position_ids``
    buffers (never stored in checkpoints) are rebuilt; any other tensor left on the meta
    device is an error.
    """
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: the checkpoint does not match the architecture: "
                         f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    for mod_name, mod in model.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                if buf_name != "position_ids":
                    raise ValueError(f"{what}: buffer {mod_name}.{buf_name} was not initialised")
                setattr(mod, buf_name, torch.arange(buf.shape[-1]).expand(buf.shape).clone())
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"{what}: parameter {name} was not loaded")
    return model.eval()
