"""Listing a user's model folder: the first pass (every file hashed) against an unchanged second
pass (sha256 from the hash cache, keyed by path, size and mtime) and against a pass that hashes
again without a cache (what every pass did before the cache), on a synthetic A1111 folder of
``--files`` LoRA-sized files with sidecars, and their ratio.

    python -m diffgraph.benchmarks.local_library [--files 500 --megabytes 8]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from safetensors.numpy import save_file

from diffgraph.benchmarks import write_result
from diffgraph.tools.sources.local import LocalFolderSource

console = Console()
RESULT = Path(__file__).parent / "results" / "local_library.json"


def build(root: Path, files: int, megabytes: float) -> None:
    """``files`` kohya-named LoRAs of about ``megabytes`` each under root/models/Lora, each with
    a Civitai Helper sidecar, in subfolders of 50 as people sort them."""
    rng = np.random.default_rng(0)
    n = max(1, int(megabytes * 2**20 / 4 / 2))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for i in range(files):
        path = root / "models" / "Lora" / f"set{i // 50:02d}" / f"lora_{i:04d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        down = rng.standard_normal((4, n // 4), dtype=np.float32)
        save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": down.T.copy()}, str(path))
        path.with_suffix(".civitai.info").write_text(json.dumps(
            {"modelId": i, "baseModel": "SD 1.5", "trainedWords": [f"tok{i}"], "model": {"name": f"LoRA {i}", "type": "LORA"}}))


def timed(source: LocalFolderSource) -> tuple[float, int]:
    start = time.perf_counter()
    records = list(source.iter_models())
    return time.perf_counter() - start, len(records)


def main(files: int = typer.Option(500, help="LoRA files in the folder."),
         megabytes: float = typer.Option(8.0, help="Size of each file (a small LoRA is 10-150 MB).")) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "webui", Path(tmp) / "local_hashes.sqlite"
        build(root, files, megabytes)
        os.sync()
        first, listed = timed(LocalFolderSource(root, hash_cache=cache))
        second, _ = timed(LocalFolderSource(root, hash_cache=cache))
        uncached, _ = timed(LocalFolderSource(root))  # hashes every file again, as each pass did without the cache
        total = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    result = {"files": files, "megabytes_each": megabytes, "bytes": total, "experts": listed,
              "first_pass_s": round(first, 3), "unchanged_pass_s": round(second, 3), "uncached_pass_s": round(uncached, 3),
              "speedup_unchanged_vs_uncached": round(uncached / second, 1)}
    console.print(result)
    write_result(RESULT, result)


if __name__ == "__main__":
    typer.run(main)
