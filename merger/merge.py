"""The LoRA half of the merge (paper Sec. 3.3), and the error every merge raises.

W += sum_j c_j dW_j, c_j the recipe's LoRA weights, with dW_j = (alpha/rank) B_j A_j computed
per expert by PEFT's own ``get_delta_weight`` after diffusers has converted and loaded the file,
so every naming convention diffusers understands is handled by diffusers' converters. Weighting
the full delta (never A and B separately, which would square the weight) is what makes the
coefficients mean what they say. Checkpoints (W = sum_i softmax(w_ckpt)_i W_i) are summed by
``merger/stream.py``, tensor by tensor in fp32, for the engine and for files alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffgraph.errors import DiffGraphError, one_line, reason

if TYPE_CHECKING:
    from .lora_formats import PreparedLora


class MergeError(DiffGraphError, ValueError):
    """An expert that cannot be merged into this base (wrong shapes, missing tensors...)."""


def read_lora(path: Path, family: str | None, *, unet_config=None, components=None) -> PreparedLora:
    """The one LoRA reader, for in-memory merges and merged files alike: the file (or a PEFT
    ``save_pretrained`` folder, whose adapter_config.json gives its alpha) read, its format
    named and normalised by ``lora_formats.prepare_lora`` (same arguments), or a one-line
    MergeError."""
    from safetensors.torch import load_file

    from .lora_formats import prepare_lora

    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise MergeError(f"{path.name} is not a readable safetensors file: {reason(exc, 200)}") from exc
    config_path = path.parent / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() and any(
        k.startswith("base_model.model.") for k in state) else None
    return prepare_lora(state, family, unet_config=unet_config, components=components, peft_config=config)


def _mismatch(exc: Exception) -> str:
    """torch's load_state_dict error in one line: its first line only names the model, so the
    first "size mismatch" line (the tensor that does not fit) leads."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return one_line(next((ln for ln in lines if "size mismatch" in ln), " ".join(lines)), 240) or type(exc).__name__


def lora_deltas(pipe, path: Path, adapter: str = "delta", min_coverage: float = 1.0,
                family: str | None = None) -> dict[str, torch.Tensor]:
    """Per-parameter dW of one LoRA file, keyed like the pipeline's state ("unet.<module>.weight").

    ``pipe`` is a scratch pipeline with the base's architecture (SD 1.5, SDXL, FLUX or the mini
    world's); the adapter is removed again. The file is named and normalised first
    (``lora_formats``), loaded by diffusers' own converters, and then at least ``min_coverage``
    of its low-rank matrices must be found in the model (``lora_coverage``). Raises MergeError
    (one line) if the format is unsupported, the file is for another base, it does not fit
    the architecture, or not enough of it lands.
    """
    from peft.tuners.lora import LoraLayer

    from .lora_formats import pipeline_components, pipeline_family

    path = Path(path)
    components = pipeline_components(pipe)
    unet = components.get("unet")
    prepared = read_lora(path, family or pipeline_family(pipe), unet_config=unet.config if unet is not None else None,
                         components=components)
    # an unchanged file is loaded from disk, so diffusers also reads its adapter metadata (alpha)
    source = str(path) if prepared.unchanged and not path.is_dir() else prepared.loadable

    def shapes():  # PEFT renames a wrapped layer's weight to <module>.base_layer.weight
        return {f"{c}.{n.replace('.base_layer.', '.')}": p.shape for c, m in components.items()
                for n, p in m.named_parameters() if f".{adapter}." not in n}

    def unload():
        try:  # FLUX: also undo layers diffusers widened for the LoRA (Control-style inputs)
            pipe.unload_lora_weights(reset_to_overwritten_params=True)
        except TypeError:
            pipe.unload_lora_weights()

    before = shapes()
    try:
        pipe.load_lora_weights(source, adapter_name=adapter)
    except Exception as exc:  # diffusers raises size-mismatch RuntimeErrors, ValueErrors for bad keys
        unload()
        raise MergeError(f"LoRA does not fit this base model: {_mismatch(exc)}") from exc
    try:
        after = shapes()
        grown = sorted(n for n in before if after.get(n, before[n]) != before[n])
        if grown:
            raise MergeError(f"{path.name}: loading it changed the shape of {grown[0]} (a LoRA for another model)")
        from .lora_coverage import coverage_report

        report = coverage_report(pipe, adapter, prepared.matrices)
        if report.total == 0 or report.landed < min_coverage * report.total:
            example = f" (e.g. {report.missing[0]!r} did not)" if report.missing else ""
            raise MergeError(f"{path.name}: only {report.landed} of {report.total} LoRA matrices landed in the model"
                             f"{example}")
        deltas: dict[str, torch.Tensor] = {}
        for component, model in components.items():
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    deltas[f"{component}.{name}.weight"] = module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
        return deltas
    finally:
        unload()


def add_deltas(weights: dict[str, torch.Tensor], deltas: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """weights + sum_j c_j dW_j (a new dict; untouched tensors are shared, not copied)."""
    out = dict(weights)
    for delta, c in deltas:
        for key, d in delta.items():
            if key not in out:
                raise MergeError(f"LoRA delta for {key}, which this base model does not have")
            base = out[key]
            out[key] = (base.to(torch.float32) + c * d.reshape(base.shape)).to(base.dtype)
    return out
