"""Why loaded bases copy the tensors safetensors hands out, and what the copy costs.

1. For weights of SD-style projection shapes held at each float offset 0..15 from a 64-byte
   boundary, whether ``F.linear`` gives output bit-identical to the same weight in
   torch-allocated memory.
2. The byte alignment of the tensors ``safetensors.torch.load_file`` returns.
3. The time to read a file of SD1.5-sized tensors with ``load_file`` (the baseline, misaligned)
   against ``real_pipelines.read_tensors`` (each tensor copied), best of ``--repeats``, from
   the page cache, touching every byte in both (a loaded model is used), and their ratio.

    python -m diffgraph.benchmarks.alignment [--megabytes 512]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from safetensors.torch import load_file, save_file

from diffgraph.benchmarks import write_result
from diffgraph.merger.real_pipelines import read_tensors

console = Console()


SHAPES = {  # (rows of the input, in features, out features) of projections in SD-style models
    "tiny time embedding (1 x 32 -> 128)": (1, 32, 128),
    "SD1.5 time embedding (1 x 320 -> 1280)": (1, 320, 1280),
    "SD1.5 cross-attention key (77 x 768 -> 320)": (77, 768, 320),
    "SD1.5 feed-forward (4096 x 320 -> 2560)": (4096, 320, 2560),
}


def linear_offsets(rows: int, inp: int, out: int) -> list[int]:
    """The float offsets (0..15 from a 64-byte boundary) at which ``F.linear`` with the weight
    stored there gives output bit-identical to the same weight in torch-allocated memory."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    reference = torch.nn.functional.linear(x, w, b)
    same = []
    for offset in range(16):
        buf = torch.empty(w.numel() + 16)
        moved = buf[offset:offset + w.numel()].view_as(w)
        moved.copy_(w)
        if torch.equal(torch.nn.functional.linear(x, moved, b), reference):
            same.append(offset)
    return same


def _touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read every byte (a mapped file is only read when touched)."""
    for t in tensors.values():
        t.sum()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(megabytes: int = typer.Option(512, help="Size of the synthetic file."),
         repeats: int = typer.Option(3, help="Timed reads of each kind; the best is kept."),
         out: Path = typer.Option(Path("benchmarks/results/alignment.json"))) -> None:
    offsets = {name: linear_offsets(*shape) for name, shape in SHAPES.items()}
    shapes = [(1280, 1280), (320, 320, 3, 3), (640, 2560), (77, 768), (7,)]  # a UNet's mix, odd sizes included
    g = torch.Generator().manual_seed(1)
    tensors, total, i = {}, 0, 0
    while total < megabytes << 20:
        t = torch.randn(shapes[i % len(shapes)], generator=g)
        tensors[f"t{i:05d}"] = t
        total += t.numel() * 4
        i += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file(tensors, str(path))
        del tensors
        loaded = load_file(str(path))
        misaligned = sum(t.data_ptr() % 64 != 0 for t in loaded.values()) / len(loaded)
        del loaded
        baseline = _best(lambda: _touch(load_file(str(path))), repeats)
        ours = _best(lambda: _touch(read_tensors(path)), repeats)
    result = {"linear_equal_by_float_offset": offsets, "load_file_misaligned_fraction": misaligned,
              "tensors": i, "megabytes": total / 2**20, "load_file_s": baseline, "copied_read_s": ours,
              "ratio": ours / baseline}
    write_result(out, result)
    for name, same in offsets.items():
        console.print(f"F.linear {name}: bit-identical at float offsets {same} of 0..15")
    console.print(f"load_file: {misaligned:.0%} of {i} tensors not 64-byte aligned")
    console.print(f"read {total / 2**20:.0f} MB: load_file {baseline:.3f} s, copied {ours:.3f} s, ratio {ours / baseline:.2f}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
