"""Write trained LoRA adapters and checkpoints in the file layouts people download online.

- diffusers/PEFT naming: ``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight``
  with the adapter configs (rank, alpha) in the safetensors metadata, as
  ``StableDiffusionPipeline.save_lora_weights`` writes it.
- kohya naming (sd-scripts): ``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight`` and a scalar ``.alpha`` per module; ``lora_te_`` for the text encoder.
- single-file checkpoints: one safetensors with every component, keys prefixed by component.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffgraph.safetensors_header import read_header

CKPT_PREFIXES = ("unet.", "vae.", "text_encoder.")


def _peft_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights in float16, as most published LoRAs are."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def sort_metadata(path: Path) -> None:
    """Rewrite the file's header with its metadata in sorted order. safetensors writes the
    metadata map in an order that changes from process to process, so without this two builds
    of the same weights differ in their bytes and in the manifest's sha256."""
    header = read_header(path)
    length = header.data_start - 8
    metadata = {"__metadata__": dict(sorted(header.metadata.items()))} if header.metadata else {}
    text = json.dumps({**metadata, **header.tensors}, separators=(",", ":"), ensure_ascii=False).encode()
    with open(path, "r+b") as f:
        if len(text) > length:
            raise ValueError(f"{path}: the re-ordered safetensors header does not fit ({len(text)} > {length} bytes)")
        f.seek(8)
        f.write(text.ljust(length))  # safetensors pads its header with spaces


def _config_dict(config) -> dict:
    """The adapter config as stored in the file: sets sorted (their order varies by process) and
    without the local folder the base was loaded from (PEFT records it; it is no one's business
    and would make two builds differ)."""
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    out["base_model_name_or_path"] = None
    return out


def save_diffusers_lora(path: Path, unet, text_encoder, unet_config, te_config) -> None:
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=_peft_state(unet), text_encoder_lora_layers=_peft_state(text_encoder),
            unet_lora_adapter_metadata=_config_dict(unet_config), text_encoder_lora_adapter_metadata=_config_dict(te_config),
        )
        shutil.move(str(Path(tmp) / "pytorch_lora_weights.safetensors"), path)
    sort_metadata(path)


def kohya_state(unet, text_encoder, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT weights renamed to kohya's convention, with the per-module alpha tensors."""
    out: dict[str, torch.Tensor] = {}
    # transformers 5 flattened CLIPTextModel (no ``text_model.`` level); kohya files keep it
    for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
        for key, value in _peft_state(model).items():
            module, _, kind = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_kohya_lora(path: Path, unet, text_encoder, alpha: float, meta: dict) -> None:
    save_file(kohya_state(unet, text_encoder, alpha), str(path), metadata={k: str(v) for k, v in meta.items()})
    sort_metadata(path)


def save_single_file(path: Path, unet, vae, text_encoder, meta: dict, dtype=torch.float16) -> None:
    tensors = {}
    for prefix, model in zip(CKPT_PREFIXES, (unet, vae, text_encoder)):
        for key, value in model.state_dict().items():
            tensors[prefix + key] = value.detach().to(dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "diffgraph": json.dumps(meta)})
    sort_metadata(path)
