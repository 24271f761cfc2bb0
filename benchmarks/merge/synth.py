"""Synthetic full-size SD1.5 files: real LDM names and shapes, random fp16 values, nothing
downloaded. Names and shapes come from diffusers' UNet2DConditionModel / AutoencoderKL and
transformers' CLIPTextModel built on the meta device from SD1.5's published configs (shipped in
merger/configs/sd15), renamed to LDM names by merger.ldm_keys.diffusers_to_ldm; the LoRAs are
kohya-named (lora_unet_…, lora_te_text_model_…) over the modules real SD1.5 LoRAs train:
attention q/k/v/out, feed-forward and the transformer blocks' proj_in/proj_out (UNet), and
q/k/v/out_proj + mlp fc1/fc2 (text encoder)."""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import torch
from diffgraph.merger.stream import ST_NAMES

POOL_ELEMS = 48 << 20  # 96 MB of fp16 noise; tensors are slices of it at per-file offsets
UNET_LORA = re.compile(r"attentions\.\d+\.(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj"
                       r"|ff\.net\.2)|proj_in|proj_out)$")
TE_LORA = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
LORA_RANKS = (32, 64, 128, 64, 32, 128, 64, 32)  # LoRA j has rank LORA_RANKS[j % 8]


def sd15_models():
    """(unet, vae, text_encoder) with SD1.5's configs, parameters on the meta device."""
    from diffgraph.merger.real_pipelines import shipped_configs
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = shipped_configs("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
    return unet, vae, te


def sd15_layout() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """({LDM key: shape} of a full SD1.5 single file, {kohya module: down/up shapes source})."""
    from diffgraph.merger.ldm_keys import diffusers_to_ldm

    unet, vae, te = sd15_models()
    state = {}
    for comp, model in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        state.update({f"{comp}.{k}": v for k, v in model.state_dict().items()})
    ldm = diffusers_to_ldm(state, "sd15")
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    modules = {}
    for name, mod in unet.named_modules():
        if UNET_LORA.search(name):
            modules["lora_unet_" + name.replace(".", "_")] = tuple(mod.weight.shape)
    flat = not any(k.startswith("text_model.") for k in te.state_dict())
    for name, mod in te.named_modules():
        if TE_LORA.search(name):
            full = ("text_model." + name) if flat else name
            modules["lora_te_" + full.replace(".", "_")] = tuple(mod.weight.shape)
    return shapes, modules


def _pool(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(POOL_ELEMS, generator=g) * 0.02).to(torch.float16)


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], fill, metadata=None) -> int:
    """Write a safetensors file tensor by tensor: fill(key, n, dtype) gives each tensor's values."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape, dtype in entries:
            t = fill(key, math.prod(shape), dtype)
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tmp.replace(path)
    return path.stat().st_size


def _slice(pool: torch.Tensor, key: str, salt: int, n: int) -> torch.Tensor:
    start = zlib.crc32(f"{salt}:{key}".encode()) % (pool.numel() - n)
    return pool[start:start + n]


def make_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    pool = _pool(seed)
    entries = [(k, s, torch.float16) for k, s in shapes.items()]
    entries.append(("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 77), torch.int64))

    def fill(key, n, dtype):
        if dtype == torch.int64:
            return torch.arange(77)
        return _slice(pool, key, seed, n)

    return write_safetensors(path, entries, fill, {"diffgraph_bench": f"synthetic SD1.5 checkpoint, seed {seed}"})


def make_lora(path: Path, modules: dict[str, tuple[int, ...]], rank: int, seed: int) -> int:
    """A kohya LoRA: down [r, in(, 1, 1)], up [out, r(, 1, 1)], alpha = rank / 2, fp16."""
    pool = _pool(1000 + seed)
    entries = []
    for name, wshape in modules.items():
        out, inp = wshape[0], wshape[1]
        tail = tuple(wshape[2:])  # (1, 1) for SD1.5's conv proj_in/proj_out
        entries += [(f"{name}.alpha", (), torch.float16), (f"{name}.lora_down.weight", (rank, inp) + tail, torch.float16),
                    (f"{name}.lora_up.weight", (out, rank) + tail, torch.float16)]

    def fill(key, n, dtype):
        if key.endswith(".alpha"):
            return torch.tensor(rank / 2, dtype=torch.float16)
        return _slice(pool, key, seed, n)

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
            "ss_base_model_version": "sd_v1"}
    return write_safetensors(path, entries, fill, meta)
