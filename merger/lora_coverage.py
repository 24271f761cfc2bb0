"""Prove that a LoRA file really landed in a pipeline.

diffusers silently drops keys it does not understand, so "no error" proves nothing. Here each
low-rank matrix in the file must be found, value for value, among the adapter weights that
were injected into the pipeline's modules, whatever naming convention the file used.

A matrix is found whole (the usual case: diffusers renames keys and copies values), or, when
a converter split it across several modules (FLUX's fused qkv / linear1 ``lora_up`` becomes
the q, k, v (and mlp) ``lora_B``; a row permutation such as ``swap_scale_shift``), row by row:
every non-zero row of the file's matrix must be a row (its non-zero entries, in order) of an
injected matrix. All-zero rows change nothing and need not land. Matching is on values
rounded to fp16, so dtype changes on loading do not matter.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch

from diffgraph.families import ADAPTED_COMPONENTS

LOW_RANK_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_mid", "hada_w", "lokr_w")


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float16).reshape(t.shape[0], -1).contiguous()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(_matrix(t).numpy().tobytes()).hexdigest()


def _rows(t: torch.Tensor) -> list[bytes]:
    """The non-zero entries of each non-zero row, as bytes (zero rows are left out)."""
    m = _matrix(t)
    out = []
    for row in m:
        nz = row[row != 0]
        if nz.numel():
            out.append(nz.numpy().tobytes())
    return out


def _is_low_rank(key: str, value: torch.Tensor) -> bool:
    return any(m in key for m in LOW_RANK_MARKERS) and value.ndim >= 2


def injected_parameters(pipe, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the adapter's A and B weights in every model of the pipeline."""
    found = []
    for component in ADAPTED_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            if name.endswith(f".{adapter_name}.weight") and (".lora_A." in name or ".lora_B." in name):
                found.append((f"{component}.{name}", param))
    return found


@dataclass
class Coverage:
    landed: int
    total: int
    missing: list[str] = field(default_factory=list)  # file keys whose matrix is nowhere in the model

    @property
    def fraction(self) -> float:
        return self.landed / self.total if self.total else 0.0


def coverage_report(pipe, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> Coverage:
    """Which of the file's low-rank matrices landed in the pipeline's adapter weights."""
    wanted = [(k, v) for k, v in state_dict.items() if _is_low_rank(k, v)]
    injected = injected_parameters(pipe, adapter_name)
    have = Counter()
    by_digest: dict[str, list[torch.Tensor]] = {}
    for _, p in injected:
        d = _digest(p)
        have[d] += 1
        by_digest.setdefault(d, []).append(p)
    unmatched: list[tuple[str, torch.Tensor]] = []
    landed = 0
    for key, value in wanted:
        d = _digest(value)
        if have[d] > 0:
            have[d] -= 1
            landed += 1
        else:
            unmatched.append((key, value))
    missing: list[str] = []
    if unmatched:
        # injected matrices not claimed whole by a file matrix hold the pieces of split ones
        pool: set[bytes] = set()
        for d, n in have.items():
            for p in by_digest[d][:n] if n > 0 else []:
                pool.update(_rows(p))
        for key, value in unmatched:
            rows = _rows(value)
            if all(r in pool for r in rows):
                landed += 1
            else:
                missing.append(key)
    return Coverage(landed, len(wanted), missing)


def coverage(pipe, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(matrices of the file found in the pipeline, matrices in the file)."""
    report = coverage_report(pipe, adapter_name, state_dict)
    return report.landed, report.total
