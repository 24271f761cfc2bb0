"""The simulated Civitai of benchmarks/crawl_site.py, over real HTTP, read by the project's own
Civitai client: paging and filters are exact, the client picks only primary files, and a
processable model's file downloads into the content store as a valid, verified LoRA."""

from __future__ import annotations

import hashlib

import httpx
import numpy as np
import pytest

from diffgraph.benchmarks.crawl_site import MINI_BASE, mini_world_loras, running_site
from diffgraph.safetensors_header import read_header
from diffgraph.tools.sources import ContentStore
from diffgraph.tools.sources.civitai import CivitaiSource

MODELS, PROCESSABLE = 2000, 30  # more processable models than mini-world LoRAs: some LoRAs are published twice
FLOAT = {"F16": np.float16, "F32": np.float32}


@pytest.fixture(scope="module")
def site():
    with running_site(MODELS, PROCESSABLE) as running:
        yield running


@pytest.fixture(scope="module")
def everything(site) -> list[dict]:
    """Every model, walked through the raw API with no filter."""
    items, params = [], {"limit": 100, "sort": "Newest"}
    with httpx.Client(timeout=60) as client:
        while True:
            page = client.get(f"{site.url}/api/v1/models", params=params).json()
            items += page["items"]
            if "nextCursor" not in page["metadata"]:
                return items
            assert page["metadata"]["nextPage"].startswith(f"{site.url}/api/v1/models?")
            params = {**params, "cursor": page["metadata"]["nextCursor"]}


def _records(site, **scope) -> list:
    source = CivitaiSource(site.url, token="", scope={"limit": "100000", **scope})
    try:
        return list(source.iter_models())
    finally:
        source.close()


def _expected(items: list[dict], types: set[str], bases: set[str] | None = None) -> set[str]:
    return {str(m["id"]) for m in items if m["type"] in types and not m["nsfw"]
            and (bases is None or any(v["baseModel"] in bases for v in m["modelVersions"]))}


def test_the_client_lists_exactly_the_filtered_models_across_pages(site, everything):
    assert len(everything) == len({m["id"] for m in everything}) == MODELS
    default = _records(site)  # LoRAs and checkpoints, SFW, newest first
    assert [r.source_id for r in default] == [str(m["id"]) for m in everything if str(m["id"]) in
                                              _expected(everything, {"LORA", "Checkpoint"})]
    assert len(default) == site.count(types=["LORA", "Checkpoint"], nsfw=False)
    by_downloads = _records(site, sort="Most Downloaded")
    assert sorted(r.source_id for r in by_downloads) == sorted(r.source_id for r in default)

    bases = {"Pony", "SD 1.5", MINI_BASE}
    filtered = _records(site, types="LORA,LoCon", baseModels=",".join(sorted(bases)))
    assert {r.source_id for r in filtered} == _expected(everything, {"LORA", "LoCon"}, bases)
    assert len(filtered) == len({r.source_id for r in filtered}) > PROCESSABLE
    assert all(r.declared_base in bases and r.kind == "lora" for r in filtered)


def test_processable_models_come_first_with_one_primary_file_each(site, everything):
    for sort in ("Newest", "Highest Rated"):
        records = _records(site, sort=sort)
        assert [r.base_model for r in records[:PROCESSABLE]] == [MINI_BASE] * PROCESSABLE
        assert MINI_BASE not in {r.base_model for r in records[PROCESSABLE:]}
        for r in records[:PROCESSABLE]:
            assert len(r.files) == 1 and r.files[0].primary
            assert r.files[0].url == f"{site.url}/api/download/models/{r.version}"
            assert r.files[0].name.endswith(".safetensors") and len(r.files[0].sha256) == 64
    # the listing offers more than the primary file for some of them: the client skipped those
    assert any(len(m["modelVersions"][0]["files"]) > 1 for m in everything[:PROCESSABLE])


def test_a_processable_file_downloads_verified_and_serves_ranges(site, tmp_path):
    records = _records(site)[:PROCESSABLE]
    templates = mini_world_loras()
    first, twin = records[0], records[len(templates)]  # model i publishes templates[i % len(templates)]
    template = templates[0]
    assert first.files[0].sha256 != twin.files[0].sha256
    before = site.stats()
    store = ContentStore(tmp_path)
    source = CivitaiSource(site.url, token="")
    for record in (first, twin):
        path = source.download(record.files[0], store)  # the store checks the sha256, header and finiteness
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.files[0].sha256 and len(data) == record.files[0].size
        assert read_header(path).tensors == read_header(template.path).tensors
        assert data[:template.tail_start] == template.data[:template.tail_start]  # only the last values differ
        marked, original = (np.frombuffer(b[template.tail_start:], FLOAT[template.dtype])
                            for b in (data, template.data))
        assert np.isfinite(marked).all() and np.allclose(marked, original, rtol=0.02, atol=1e-6)
    source.close()
    assert site.stats()["downloads"] == before["downloads"] + 2

    url, size = first.files[0].url, first.files[0].size
    full = httpx.get(url).content
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-199/{size}"
    assert part.content == full[100:200] and part.headers["content-length"] == "100"
    tail = httpx.get(url, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == full[-16:]
    beyond = httpx.get(url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert "attachment" in httpx.head(url).headers["content-disposition"]


def test_other_files_are_not_served_and_homepages_are_html(site, everything):
    wild = next(m for m in everything if m["modelVersions"][0]["baseModel"] != MINI_BASE)
    missing = site.stats()["missing_files"]
    assert httpx.get(wild["modelVersions"][0]["downloadUrl"]).status_code == 404
    assert site.stats()["missing_files"] == missing + 1

    record = _records(site)[0]
    page = httpx.get(record.homepage_url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert record.name in page.text and all(w in page.text for w in record.trigger_words)
    assert httpx.get(f"{site.url}/models/1").status_code == 404
    assert httpx.get(f"{site.url}/api/v1/models", params={"cursor": "not-a-cursor"}).status_code == 400
