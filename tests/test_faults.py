"""Faults a long-running server meets (issue 18): the disk filling up during a download or a
merged-model export, and Chroma's files left broken by a kill mid-write.

A full disk is a real one: a small tmpfs mounted for the test (the machines run the suite as
root, as .ci/run does; a machine where mounting is not allowed fails here, it does not skip).
Every case must end with a one-line error, no file left under a final name as if complete, and
everything stored before intact.
"""

from __future__ import annotations

import hashlib
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save
from support import crash_children
from support.fake_site import FakeSite
from support.serving import serving

from diffgraph.graph_store.records import ExpertFile
from diffgraph.merger.merge import MergeError
from diffgraph.settings import Settings
from diffgraph.tools.export import ExportError
from diffgraph.tools.sources import ContentStore, StoreFull


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block: a filesystem that really fills."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _weights(n_floats: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({"lora_unet_x.lora_down.weight": torch.randn(n_floats, generator=g), "lora_unet_x.alpha": torch.tensor(4.0)})


def _store_files(home: Path) -> dict[str, str]:
    root = home / "blobs"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_a_disk_that_fills_during_a_download_leaves_the_store_as_it_was(tmp_path):
    small, big = _weights(20_000, 1), _weights(600_000, 2)  # 80 KB, then 2.4 MB onto a 1 MB disk
    site = FakeSite()
    with serving(site.app) as url, small_disk(tmp_path / "disk", "1m") as disk:
        site.url = url
        store = ContentStore(disk / "home")
        files = []
        for name, data in (("small.safetensors", small), ("big.safetensors", big)):
            key = str(len(site.blobs))
            site.blobs[key] = data
            files.append(ExpertFile(name=name, url=f"{url}/files/{key}", sha256=hashlib.sha256(data).hexdigest()))
        with httpx.Client() as client:
            kept = store.fetch(files[0], client)
            before = _store_files(disk / "home")
            with pytest.raises(StoreFull) as refused:
                store.fetch(files[1], client)
            message = str(refused.value)
            assert "\n" not in message and "disk holding the store is full" in message and "big.safetensors" in message
            assert _store_files(disk / "home") == before  # no partial file, no blob under the big file's name
            assert store.get(files[1].sha256) is None
            assert hashlib.sha256(kept.read_bytes()).hexdigest() == files[0].sha256
            # room again (the disk grows): the same download now completes and verifies
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            assert hashlib.sha256(store.fetch(files[1], client).read_bytes()).hexdigest() == files[1].sha256


def test_a_disk_that_fills_during_an_import_of_a_local_file_leaves_the_store_as_it_was(tmp_path):
    data = _weights(600_000, 3)
    source = tmp_path / "lora.safetensors"
    source.write_bytes(data)
    with small_disk(tmp_path / "disk", "1m") as disk:
        store = ContentStore(disk / "home")
        with pytest.raises(StoreFull) as refused:
            store.ingest(source, ExpertFile(name="lora.safetensors", url="", sha256=hashlib.sha256(data).hexdigest()))
        assert "\n" not in str(refused.value) and "full" in str(refused.value)
        assert _store_files(disk / "home") == {}


def test_a_disk_that_fills_during_an_export_leaves_nothing_under_the_name(tmp_path, graph_home):
    from diffgraph.agents.generate import generate
    from diffgraph.merger.recipe import MergeRecipe
    from diffgraph.merger.stream import merge_recipe_to_file
    from diffgraph.tools.export import export_checkpoint

    made = generate("a pink circle on a striped white background", seed=1, settings=Settings(home=graph_home),
                    out=tmp_path / "made.png")
    recipe = MergeRecipe.from_dict(made.recipe)
    with small_disk(tmp_path / "disk", "256k") as disk:
        old = disk / "merged.safetensors"
        old.write_bytes(b"an older export, kept whole")
        with pytest.raises(ExportError) as refused:
            export_checkpoint(recipe, old)
        assert "\n" not in str(refused.value) and "free" in str(refused.value)
        with pytest.raises(MergeError) as refused_stream:
            merge_recipe_to_file(crash_children.merged_recipe(), disk / "streamed.safetensors")
        assert "\n" not in str(refused_stream.value) and "disk" in str(refused_stream.value)
        assert sorted(p.name for p in disk.iterdir()) == ["merged.safetensors"]
        assert old.read_bytes() == b"an older export, kept whole"
