"""The two merge operations of the paper (Sec. 3.3), one tensor at a time.

- Checkpoints: W = sum_i softmax(w_ckpt)_i W_i, streamed key by key from safetensors so that
  only one tensor of each input is in memory at a time (plus the result), accumulated in fp32.
- LoRAs: W += sum_j softmax(w_peft)_j dW_j with dW_j = (alpha/rank) B_j A_j computed per expert
  by PEFT's own ``get_delta_weight`` after diffusers has converted and loaded the file, so every
  naming convention diffusers understands is handled by diffusers' converters. Weighting the
  full delta (never A and B separately, which would square the weight) is what makes the
  coefficients mean what they say.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .lora_coverage import coverage


class MergeError(ValueError):
    """An expert that cannot be merged into this base (wrong shapes, missing tensors...)."""


class TensorSource:
    """Keys and tensors of one merge input: a safetensors file (read lazily) or a mapping."""

    def __init__(self, source: Path | Mapping[str, torch.Tensor], stack: ExitStack | None = None):
        if isinstance(source, Mapping):
            self._map, self._file = source, None
        else:
            self._map, self._file = None, (stack or ExitStack()).enter_context(safe_open(str(source), framework="pt"))
        self.name = "weights in memory" if self._file is None else Path(str(source)).name

    def keys(self) -> list[str]:
        return list(self._map.keys() if self._map is not None else self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._map[key] if self._map is not None else self._file.get_tensor(key)


def merge_checkpoints(inputs: Iterable[tuple[Path | Mapping[str, torch.Tensor], float]],
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weighted sum of checkpoints with identical keys and shapes, streamed tensor by tensor."""
    inputs = list(inputs)
    if not inputs:
        raise MergeError("no checkpoints to merge")
    with ExitStack() as stack:
        sources = [(TensorSource(src, stack), w) for src, w in inputs]
        keys = sources[0][0].keys()
        for src, _ in sources[1:]:
            if set(src.keys()) != set(keys):
                missing = sorted(set(keys) ^ set(src.keys()))[:3]
                raise MergeError(f"{src.name} has different tensors from {sources[0][0].name} (e.g. {missing})")
        merged: dict[str, torch.Tensor] = {}
        for key in keys:
            acc = None
            for src, w in sources:
                t = src.get(key).to(torch.float32)
                if acc is not None and t.shape != acc.shape:
                    raise MergeError(f"{src.name}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(acc.shape)}")
                acc = t * w if acc is None else acc.add_(t, alpha=w)
            merged[key] = acc.to(dtype)
    return merged


def lora_deltas(pipe, path: Path, adapter: str = "delta", min_coverage: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-parameter dW of one LoRA file, keyed like the pipeline's state ("unet.<module>.weight").

    ``pipe`` is a scratch pipeline with the base's architecture; the adapter is removed again.
    Raises MergeError if the file does not fit the architecture or not all of it lands.
    """
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter)
    except Exception as exc:  # diffusers raises size-mismatch RuntimeErrors, ValueErrors for bad keys
        pipe.unload_lora_weights()
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0])
        raise MergeError(f"LoRA does not fit this base model: {detail[:240]}") from exc
    try:
        landed, total = coverage(pipe, adapter, load_file(str(path)))
        if total == 0 or landed < min_coverage * total:
            raise MergeError(f"{Path(path).name}: only {landed} of {total} LoRA matrices landed in the model")
        deltas: dict[str, torch.Tensor] = {}
        for component in ("unet", "text_encoder"):
            model = getattr(pipe, component)
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    deltas[f"{component}.{name}.weight"] = module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
        return deltas
    finally:
        pipe.unload_lora_weights()


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
