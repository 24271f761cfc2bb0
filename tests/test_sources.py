"""The source clients against real HTTP servers on loopback: the mini-world hub (Civitai and
Hugging Face wire formats) and, for hostile answers the hub cannot give, a small fake API
served from the test in the same wire format. No mocks: every byte goes through httpx."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save, save_file
from support.fake_site import FakeSite
from support.serving import serving as serve

from diffgraph.miniworld.experts import EXPERTS
from diffgraph.miniworld.hub import manifest_experts, running_hub
from diffgraph.tools.sources import (
    ApiError,
    CivitaiSource,
    ContentStore,
    DownloadError,
    HFSource,
    IntegrityError,
    InvalidSafetensors,
    LocalFolderSource,
    RetryPolicy,
    SourceSpec,
    UnsafeFileError,
    load_weights,
    open_sources,
    parse_source_spec,
    safe_name,
    validate_safetensors,
)

SPECS = {s.slug: s for s in EXPERTS}
FAST = RetryPolicy(attempts=4, initial_wait=0.01, max_wait=5)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def manifest(artifacts_dir) -> dict:
    return json.loads((artifacts_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def hub(artifacts_dir):
    with running_hub(artifacts_dir) as running:
        yield running


@pytest.fixture
def civitai(hub):
    source = CivitaiSource(hub.url, token="", retry=FAST)
    yield source
    source.close()
    hub.clear_faults()


@pytest.fixture
def hf(hub):
    source = HFSource(hub.url, token="", retry=FAST)
    yield source
    source.close()
    hub.clear_faults()


def _slugs(site: str, manifest: dict, kind: str | None = None, since: str = "") -> list[str]:
    return sorted(e["slug"] for e in manifest["experts"] if SPECS[e["slug"]].site == site
                  and kind in (None, e["kind"]) and SPECS[e["slug"]].published >= since)


def _civitai_slug(record) -> str:
    return next(s.slug for s in EXPERTS if s.title == record.name)


def _hf_slug(record) -> str:
    return record.source_id.split("/", 1)[1]


def _count(hub, prefix: str) -> int:
    return sum(r.startswith(prefix) for r in hub.requests)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# ----------------------------------------------------------------------------- listing

def test_civitai_lists_every_expert_once_across_pages(hub, civitai, manifest):
    before = _count(hub, "GET /api/v1/models?")
    records = list(civitai.iter_models(page_size=4))
    slugs = sorted(_civitai_slug(r) for r in records)
    assert slugs == _slugs("civitai", manifest)  # each exactly once
    assert _count(hub, "GET /api/v1/models?") - before == -(-len(slugs) // 4)
    shas = {e["slug"]: e["sha256"] for e in manifest["experts"]}
    for r in records:
        spec = SPECS[_civitai_slug(r)]
        assert r.id == f"civitai:{r.source_id}" and r.source_id.isdigit() and r.version.isdigit()
        assert (r.kind, r.base_model, r.trigger_words) == (spec.kind, manifest["base_model"], list(spec.trigger_words))
        assert [f.sha256 for f in r.files] == [shas[spec.slug]]
        assert r.published_at.startswith(spec.published) and r.license["allowDerivatives"] is True
    page = httpx.get(records[0].homepage_url)
    assert page.status_code == 200 and records[0].name in page.text


def test_civitai_filters_by_type_and_base_model(civitai, manifest):
    ckpts = sorted(_civitai_slug(r) for r in civitai.iter_models(types=("Checkpoint",), page_size=2))
    assert ckpts == _slugs("civitai", manifest, "ckpt")
    assert list(civitai.iter_models(base_models=["SDXL 1.0"])) == []
    assert len(list(civitai.iter_models(base_models=[manifest["base_model"]]))) == len(_slugs("civitai", manifest))


def test_hf_lists_every_repo_once_across_pages(hub, hf, manifest):
    before = _count(hub, "GET /api/models?")
    records = list(hf.iter_models(page_size=3))
    assert sorted(_hf_slug(r) for r in records) == _slugs("hf", manifest)
    assert _count(hub, "GET /api/models?") - before == -(-len(records) // 3)
    shas = {e["slug"]: e["sha256"] for e in manifest["experts"]}
    for r in records:
        spec = SPECS[_hf_slug(r)]
        assert (r.kind, r.base_model) == (spec.kind, manifest["base_model"]) and len(r.version) == 40
        [file] = r.files
        assert file.sha256 == shas[spec.slug] and file.url.endswith(f"/resolve/{r.version}/{file.name}")
        assert r.trigger_words == list(spec.trigger_words) and r.homepage_url == f"{hub.url}/{r.source_id}"


def test_hf_filters_by_tag_and_base_model(hf, manifest):
    assert sorted(_hf_slug(r) for r in hf.iter_models(filter_tags=("lora",), page_size=2)) == _slugs("hf", manifest, "lora")
    assert list(hf.iter_models(base_model="stabilityai/sdxl")) == []
    assert len(list(hf.iter_models(base_model=manifest["base_model"]))) == len(_slugs("hf", manifest))


def test_since_skips_versions_published_before_it(hub, civitai, hf, manifest):
    assert sorted(_civitai_slug(r) for r in civitai.iter_models(since="2024-03-01")) == \
        _slugs("civitai", manifest, since="2024-03-01")
    info_requests = _count(hub, "GET /api/models/")
    newer = sorted(_hf_slug(r) for r in hf.iter_models(since="2024-03-01T00:00:00Z"))
    assert newer == _slugs("hf", manifest, since="2024-03-01") and 0 < len(newer) < len(_slugs("hf", manifest))
    # newest first: the walk stops at the first older repo, without reading the older ones
    assert _count(hub, "GET /api/models/") - info_requests == len(newer)


# ----------------------------------------------------------------------------- retries

def test_429_then_500_then_valid_json_succeeds(hub, civitai, hf, manifest):
    hub.inject_fault("/api/v1/models", 429, retry_after=1)
    hub.inject_fault("/api/v1/models", 500)
    before, start = _count(hub, "GET /api/v1/models?"), time.monotonic()
    assert len(list(civitai.iter_models())) == len(_slugs("civitai", manifest))
    assert _count(hub, "GET /api/v1/models?") - before == 3 and time.monotonic() - start >= 1  # Retry-After honoured
    hub.inject_fault("/api/models", 503)
    hub.inject_fault("/api/models", 502)
    assert len(list(hf.iter_models())) == len(_slugs("hf", manifest))


def test_retries_are_bounded_and_errors_are_one_line(hub, civitai):
    hub.inject_fault("/api/v1/models", 500, times=10)
    before = _count(hub, "GET /api/v1/models?")
    with pytest.raises(ApiError, match=r"failed after 4 attempts: HTTP 500") as failed:
        list(civitai.iter_models())
    assert _count(hub, "GET /api/v1/models?") - before == 4 and "\n" not in str(failed.value)
    hub.clear_faults()
    hub.inject_fault("/api/v1/models", 429, retry_after=3600)
    with pytest.raises(ApiError, match="server asks to wait 3600 s"):
        list(civitai.iter_models())
    before = _count(hub, "GET /api/v1/models?")
    with pytest.raises(ApiError, match="HTTP 400 Bad Request: limit must be an integer between 1 and 100"):
        list(civitai.iter_models(page_size=101))
    assert _count(hub, "GET /api/v1/models?") - before == 1  # a 4xx is not retried
    with pytest.raises(ValueError, match="TextualInversion not an expert type"):
        list(civitai.iter_models(types=("LORA", "TextualInversion")))


# ----------------------------------------------------------------------------- downloads

def test_downloads_land_in_the_store_verified_and_once(hub, civitai, hf, tmp_path):
    store = ContentStore(tmp_path)
    for source in (civitai, hf):
        record = next(iter(source.iter_models(types=("Checkpoint",)) if source is civitai
                           else source.iter_models(filter_tags=("lora",))))
        [file] = record.files
        path = source.download(file, store)
        assert path == tmp_path / "blobs" / "sha256" / file.sha256[:2] / file.sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == file.sha256
        before = len(hub.requests)
        assert source.download(file, store) == path and len(hub.requests) == before  # content-addressed
    assert not list(tmp_path.rglob("*.partial"))


def test_a_cut_download_resumes_where_it_stopped(hub, civitai, tmp_path):
    record = next(r for r in civitai.iter_models() if _civitai_slug(r) == "stripes-pro")
    [file] = record.files
    assert file.size > 60_000
    path = f"/api/download/models/{record.version}"
    store = ContentStore(tmp_path)
    # every response is cut after a sixth of the file: only resuming with Range requests can
    # finish, and four attempts are not enough
    hub.inject_fault(path, cut_after=file.size // 6 + 1, times=50)
    with pytest.raises(DownloadError, match="failed after 4 attempts"):
        civitai.download(file, store)
    partial = store.path(file.sha256).with_suffix(".partial")
    assert 0 < partial.stat().st_size < file.size  # kept for the next run
    patient = CivitaiSource(hub.url, token="", retry=replace(FAST, attempts=10))
    try:
        stored = patient.download(file, store)
    finally:
        patient.close()
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == file.sha256 and not partial.exists()


def test_a_wrong_published_sha256_is_refused_and_leaves_nothing(artifacts_dir, manifest, tmp_path):
    spec, entry = next((s, e) for s, e in manifest_experts(manifest) if s.site == "civitai")
    doctored = (spec, {**entry, "sha256": "0" * 63 + "1"})
    with running_hub(artifacts_dir, experts=[doctored]) as lying:
        source = CivitaiSource(lying.url, token="", retry=FAST)
        [record] = source.iter_models()
        with pytest.raises(IntegrityError, match="sha256 mismatch: published 0+1, downloaded "):
            source.download(record.files[0], ContentStore(tmp_path))
        source.close()
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------- hostile APIs

@pytest.fixture
def fake():
    site = FakeSite()
    with serve(site.app) as url:
        site.url = url
        yield site


def _tiny_safetensors(prefix: str = "lora_unet_x") -> bytes:
    return save({f"{prefix}.lora_down.weight": np.ones((2, 4), np.float32),
                 f"{prefix}.lora_up.weight": np.zeros((4, 2), np.float32)})


@pytest.mark.parametrize("name", ["../../evil.safetensors", "/etc/evil.safetensors", "a/../../evil.safetensors",
                                  "..\\..\\evil.safetensors", "C:evil.safetensors", "evil\0.safetensors"])
def test_a_hostile_file_name_cannot_escape_the_store(fake, tmp_path, name):
    fake.publish_civitai(name, _tiny_safetensors())
    source = CivitaiSource(fake.url, token="", retry=FAST)
    [record] = source.iter_models()
    assert record.files[0].name == name  # carried as data...
    store_home = tmp_path / "home"
    with pytest.raises(UnsafeFileError, match="unsafe file name"):
        source.download(record.files[0], ContentStore(store_home))  # ...never used as a path
    source.close()
    assert _files(tmp_path) == [] and not any(p.startswith("/files/") for p, _ in fake.seen)


def test_safe_names_keep_repo_folders():
    assert str(safe_name("unet/diffusion_pytorch_model.safetensors")) == "unet/diffusion_pytorch_model.safetensors"


def test_pickle_files_are_refused_unless_opted_in(fake, tmp_path, monkeypatch):
    import torch

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buffers = {}
    for key, obj in (("good", {"w": torch.ones(2)}), ("evil", {"w": Exploit()})):
        path = tmp_path / f"{key}.ckpt"
        torch.save(obj, path)
        buffers[key] = path.read_bytes()
    fake.publish_civitai("model.ckpt", buffers["good"])
    fake.publish_civitai("evil.ckpt", buffers["evil"])
    fake.publish_civitai("disguised.safetensors", buffers["good"])
    fake.publish_hf("someone/pickle-only", {"pytorch_lora_weights.bin": buffers["good"]})
    civitai, hf = CivitaiSource(fake.url, token="", retry=FAST), HFSource(fake.url, token="", retry=FAST)
    good, evil, disguised = (r.files[0] for r in civitai.iter_models())
    [repo] = hf.iter_models()
    assert repo.kind == "lora" and [f.name for f in repo.files] == ["pytorch_lora_weights.bin"]

    refusing = ContentStore(tmp_path / "default")
    for source, file in ((civitai, good), (hf, repo.files[0])):
        with pytest.raises(UnsafeFileError, match="is a pickle file.*DIFFGRAPH_ALLOW_PICKLE"):
            source.download(file, refusing)
    assert not any(p.startswith("/files/") for p, _ in fake.seen)  # refused before any byte
    with pytest.raises(InvalidSafetensors, match="not a valid safetensors file"):
        civitai.download(disguised, refusing)  # the content decides, not the name
    assert _files(tmp_path / "default") == []

    monkeypatch.setenv("DIFFGRAPH_ALLOW_PICKLE", "1")
    opted_in = ContentStore(tmp_path / "opted-in")
    assert torch.equal(load_weights(civitai.download(good, opted_in))["w"], torch.ones(2))
    import pickle

    with pytest.raises(pickle.UnpicklingError):
        load_weights(civitai.download(evil, opted_in))  # weights_only=True refuses code
    assert not (tmp_path / "pwned").exists()
    monkeypatch.delenv("DIFFGRAPH_ALLOW_PICKLE")
    with pytest.raises(UnsafeFileError, match="pickle loading is off"):
        load_weights(opted_in.path(good.sha256))
    civitai.close()
    hf.close()


def test_the_token_goes_to_the_api_host_only(fake, tmp_path, monkeypatch):
    other = FakeSite()
    with serve(other.app) as other_url:
        other.url = other_url
        other.blobs["0"] = data = _tiny_safetensors()
        fake.publish_civitai("x.safetensors", data, url=f"{other_url}/files/0")
        monkeypatch.setenv("DIFFGRAPH_CIVITAI_TOKEN", "s3cret")
        source = CivitaiSource(fake.url, retry=FAST)
        [record] = source.iter_models()
        assert fake.seen[-1] == ("/api/v1/models", "Bearer s3cret")
        source.download(record.files[0], ContentStore(tmp_path))
        source.close()
    assert other.seen == [("/files/0", None)]


def test_malformed_api_entries_are_skipped_not_fatal(fake):
    fake.civitai.append({"id": 1, "type": "LORA", "modelVersions": [{"id": 2, "files": "garbage"}]})
    fake.civitai.append("not even an object")
    fake.publish_civitai("fine.safetensors", _tiny_safetensors())
    source = CivitaiSource(fake.url, token="", retry=FAST)
    assert [r.name for r in source.iter_models()] == ["Hostile 102"]
    source.close()


def test_a_download_larger_than_the_limit_is_stopped(fake, tmp_path):
    data = _tiny_safetensors()
    fake.publish_civitai("big.safetensors", data)
    source = CivitaiSource(fake.url, token="", retry=FAST)
    [record] = source.iter_models()
    with pytest.raises(UnsafeFileError, match="over the 100-byte limit"):
        source.download(record.files[0], ContentStore(tmp_path, max_bytes=100))
    source.close()
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------- safetensors checks

def _raw(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text)) + text.encode() + data


_T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "truncated": (None, "truncated"),
    "huge-header": (struct.pack("<Q", 2**40) + b"{}", "header length 1099511627776 is not sane"),
    "too-short": (b"\x01\x02", "too short"),
    "not-json": (_raw("{not json", b""), "not valid JSON"),
    "overlap": (_raw({"a": _T, "b": {**_T, "data_offsets": [4, 12]}}, bytes(12)), "'a' and 'b' overlap"),
    "duplicate": (_raw('{"a": %s, "a": %s}' % (json.dumps(_T), json.dumps(_T)), bytes(8)), "duplicate key 'a'"),
    "dtype": (_raw({"a": {**_T, "dtype": "F99"}}, bytes(8)), "unknown dtype 'F99'"),
    "shape": (_raw({"a": {**_T, "shape": [3]}}, bytes(8)), "needs 12 bytes but its offsets span 8"),
    "gap": (_raw({"a": {**_T, "data_offsets": [4, 12]}}, bytes(12)), "4 unaccounted bytes before tensor 'a'"),
    "trailing": (_raw({"a": _T}, bytes(10)), "2 trailing bytes"),
    "beyond-end": (_raw({"a": _T, "b": {**_T, "data_offsets": [8, 16]}}, bytes(12)), "'b' ends at data byte 16"),
    "metadata": (_raw({"__metadata__": {"n": 1}, "a": _T}, bytes(8)), "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_are_refused_with_a_clear_message(tmp_path, case):
    data, message = BAD_FILES[case]
    if data is None:
        data = _tiny_safetensors()[:-5]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidSafetensors, match="not a valid safetensors file") as refused:
        validate_safetensors(path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_wellformed_safetensors_pass(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.ones((2, 3), np.float16), "empty": np.zeros((0,), np.int64)}, path, metadata={"k": "v"})
    header = validate_safetensors(path)
    assert set(header.tensors) == {"a", "empty"} and header.metadata == {"k": "v"}


# ----------------------------------------------------------------------------- local folder

def test_local_folder_reads_sidecars_and_tensor_names(tmp_path):
    lora_dir, ckpt_dir = tmp_path / "models" / "Lora", tmp_path / "models" / "Stable-diffusion"
    lora_dir.mkdir(parents=True)
    ckpt_dir.mkdir(parents=True)
    (lora_dir / "kohya.safetensors").write_bytes(_tiny_safetensors())
    (lora_dir / "kohya.civitai.info").write_text(json.dumps({
        "id": 22, "modelId": 11, "baseModel": "SD 1.5", "trainedWords": ["stripes"],
        "model": {"name": "Stripes", "type": "LORA"}, "description": "<p>lines</p>"}))
    save_file({"unet.x.lora_A.weight": np.ones((2, 4), np.float32)}, lora_dir / "peft.safetensors")
    (lora_dir / "peft.json").write_text(json.dumps({"sd version": "SDXL", "activation text": "dots, spots",
                                                    "description": "dotty"}))
    save_file({"model.diffusion_model.w": np.ones((4,), np.float32)}, ckpt_dir / "full.safetensors")
    save_file({"unet.own.weight": np.ones((3,), np.float32)}, ckpt_dir / "own.safetensors")
    (ckpt_dir / "own.json").write_text(json.dumps({"kind": "ckpt", "base_model": "miniworld-sd", "name": "Mine"}))
    (lora_dir / "old.pt").write_bytes(b"\x80\x02pickle")
    (lora_dir / "broken.safetensors").write_bytes(b"\x00" * 4)
    (lora_dir / "notes.txt").write_text("not a model")
    old = time.time() - 86_400 * 30
    os.utime(lora_dir / "old.pt", (old, old))

    source = LocalFolderSource(tmp_path)
    records = {r.source_id: r for r in source.iter_models()}
    assert sorted(records) == ["models/Lora/broken.safetensors", "models/Lora/kohya.safetensors",
                               "models/Lora/old.pt", "models/Lora/peft.safetensors",
                               "models/Stable-diffusion/full.safetensors", "models/Stable-diffusion/own.safetensors"]
    kohya, peft = records["models/Lora/kohya.safetensors"], records["models/Lora/peft.safetensors"]
    assert (kohya.name, kohya.kind, kohya.base_model, kohya.trigger_words) == ("Stripes", "lora", "sd15", ["stripes"])
    assert kohya.declared_base == "SD 1.5"
    assert kohya.homepage_url == "https://civitai.com/models/11" and kohya.source_description == "<p>lines</p>"
    assert (peft.kind, peft.base_model, peft.trigger_words, peft.source_description) == \
        ("lora", "sdxl", ["dots", "spots"], "dotty")
    full, own = records["models/Stable-diffusion/full.safetensors"], records["models/Stable-diffusion/own.safetensors"]
    assert (full.kind, full.base_model) == ("ckpt", "unknown")
    assert (own.kind, own.base_model, own.name) == ("ckpt", "miniworld-sd", "Mine")
    assert records["models/Lora/old.pt"].kind == "lora"  # from its folder: a pickle is never opened
    for r in records.values():
        assert r.id == f"local:{r.source_id}" and r.version == r.files[0].sha256 == \
            hashlib.sha256((tmp_path / r.source_id).read_bytes()).hexdigest()

    store = ContentStore(tmp_path / "store")
    assert source.download(kohya.files[0], store) == lora_dir / "kohya.safetensors"  # used where it is
    with pytest.raises(InvalidSafetensors):
        source.download(records["models/Lora/broken.safetensors"].files[0], store)
    with pytest.raises(UnsafeFileError, match="pickle"):
        source.download(records["models/Lora/old.pt"].files[0], store)
    assert len(_files(tmp_path / "store")) == 0  # nothing copied
    recent = {r.source_id for r in source.iter_models(since=datetime.fromtimestamp(old + 86_400, timezone.utc))}
    assert recent == set(records) - {"models/Lora/old.pt"}


# ----------------------------------------------------------------------------- specs

@pytest.mark.parametrize(("text", "spec"), [
    ("civitai", SourceSpec("civitai")),
    ("civitai:http://127.0.0.1:9000", SourceSpec("civitai", "http://127.0.0.1:9000")),
    ("hf", SourceSpec("hf")), ("HF:https://hub.example.org", SourceSpec("hf", "https://hub.example.org")),
    ("local:/data/models", SourceSpec("local", "/data/models")), ("miniworld", SourceSpec("miniworld")),
])
def test_source_specs_parse(text, spec):
    assert parse_source_spec(text) == spec


@pytest.mark.parametrize("text", ["civitai:ftp://x", "hf:", "local", "github:foo", "civitai:not a url"])
def test_bad_source_specs_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="civitai|local:DIR|URL"):
        parse_source_spec(text)


def test_miniworld_spec_crawls_the_bundled_hub_through_both_clients(artifacts_dir, manifest):
    with open_sources(f"miniworld:{artifacts_dir}", retry=FAST) as sources:
        assert [s.name for s in sources] == ["civitai", "hf"]
        ids = [r.id for s in sources for r in s.iter_models()]
        url = sources[0].base_url
        assert url.startswith("http://127.0.0.1:") and sources[1].base_url == url
    assert len(ids) == len(set(ids)) == len(manifest["experts"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/v1/models")  # the hub stopped with the block


# ----------------------------------------------------------------------------- crawl scope


def test_a_scoped_civitai_crawl_lists_exactly_what_its_filters_select(hub):
    """`civitai?types=LORA&sort=Most Downloaded&limit=3`: the three most downloaded LoRAs, asked
    of the API in its own words (SFW only unless told), and nothing else listed."""
    from diffgraph.tools.sources.spec import open_sources

    loras = [e for e in hub.experts("civitai") if e.spec.kind == "lora"]
    expected = [str(e.model_id) for e in sorted(loras, key=lambda e: (-e.stats["downloads"], e.model_id))[:3]]
    mark = len(hub.requests)
    with open_sources(f"civitai:{hub.url}?types=LORA&sort=Most Downloaded&limit=3") as (source,):
        records = list(source.iter_models())
    assert [r.source_id for r in records] == expected and {r.kind for r in records} == {"lora"}
    asked = [r for r in hub.requests[mark:] if r.startswith("GET /api/v1/models")]
    assert asked and all("types=LORA" in r and "sort=Most+Downloaded" in r and "nsfw=false" in r for r in asked), asked
    assert not [r for r in hub.requests[mark:] if "/download" in r]  # listing fetches no file


def test_a_scoped_hub_crawl_and_a_dry_run_fetch_nothing_but_the_listing(hub, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffgraph.agents.cli import app
    from diffgraph.tools.sources.spec import open_sources

    with open_sources(f"hf:{hub.url}?limit=2") as (source,):
        assert len(list(source.iter_models())) == 2
    monkeypatch.setenv("DIFFGRAPH_HOME", str(tmp_path / "home"))
    mark = len(hub.requests)
    run = CliRunner().invoke(app, ["gca", "run", "--source", f"civitai:{hub.url}", "--types", "LORA", "--limit", "2",
                                   "--dry-run"], env={"COLUMNS": "300"})
    assert run.exit_code == 0, run.output
    assert "2 experts, 2 files" in run.output and "nothing was fetched" in run.output, run.output
    assert not [r for r in hub.requests[mark:] if "/download" in r] and not (tmp_path / "home" / "catalog.sqlite").exists()
    tight = CliRunner().invoke(app, ["gca", "run", "--source", f"civitai:{hub.url}", "--types", "LORA", "--limit", "2",
                                     "--dry-run"], env={"COLUMNS": "300", "DIFFGRAPH_MAX_STORE_GB": "0.0001"})
    assert tight.exit_code == 0 and re.search(r"holds 0\.0 KiB of its 104\.9 KiB budget \(DIFFGRAPH_MAX_STORE_GB\): this pass "
                                              r"would exceed it by [\d.]+ KiB, and what does not fit is skipped", tight.output), tight.output
    bad = CliRunner().invoke(app, ["gca", "run", "--source", "civitai?colour=red", "--dry-run"])
    assert bad.exit_code == 1 and "unknown scope colour" in bad.output and "Traceback" not in bad.output


def test_the_public_site_is_listed_only_up_to_a_limit_unless_the_user_sets_one(hub):
    """An unscoped crawl of the real Civitai would list 100,000+ models: the public site gets a
    limit by default, with a note; a scope's or the flag's limit replaces it."""

    class PublicCivitai(CivitaiSource):  # the hub standing in for civitai.com
        default_url = hub.url

    source = PublicCivitai(None, token="", retry=FAST)
    source.PUBLIC_LIMIT = 2
    try:
        assert len(list(source.iter_models())) == 2
        assert source.notes and "listing at most 2 experts of the public site" in source.notes[0]
        source.scope = {"limit": "3"}
        assert len(list(source.iter_models())) == 3
    finally:
        source.close()


def test_a_civitai_version_is_one_model_file_the_primary_one(fake):
    """Civitai versions list their fp16 and fp32 files, pruned copies and training data side by
    side; the expert is one model: its primary model file, and nothing else is fetched."""
    def entry(name, kind, primary, size_kb):
        return {"id": len(name), "name": name, "type": kind, "primary": primary, "sizeKB": size_kb,
                "downloadUrl": f"{fake.url}/files/{name}", "hashes": {"SHA256": "AB" * 32}}

    fake.civitai.append({"id": 7, "name": "Glow", "type": "LORA", "modelVersions": [{
        "id": 70, "baseModel": "SD 1.5", "publishedAt": "2024-05-01T00:00:00Z", "trainedWords": ["glow"],
        "files": [entry("glow_fp32.safetensors", "Model", False, 144000.0),
                  entry("glow_fp16.safetensors", "Model", True, 72000.0),
                  entry("glow_dataset.zip", "Training Data", False, 900000.0)]}]})
    (record,) = CivitaiSource(fake.url, token="", retry=FAST).iter_models()
    assert [(f.name, f.primary, f.sha256) for f in record.files] == [("glow_fp16.safetensors", True, "ab" * 32)]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60),
                 st.builds(lambda kind, q: f"{kind}?{q}", st.sampled_from(["civitai", "hf", "CIVITAI", "local:/x", "url:http://a"]),
                           st.text(max_size=40))))
def test_any_spec_text_parses_or_is_refused_in_one_line(text):
    """Whatever is typed after --source: a spec that prints back as a spec parsing to itself,
    or a ValueError of one line; nothing else escapes."""
    from diffgraph.tools.sources.spec import parse_source_spec

    try:
        spec = parse_source_spec(text)
    except ValueError as exc:
        assert "\n" not in str(exc).strip() or "\n" in text
        return
    assert parse_source_spec(str(spec)) == spec


def test_a_hub_repo_is_one_expert_file_not_its_epochs_and_checkpoints(fake):
    """Trainers push every epoch and their checkpoints beside the final LoRA: the expert is the
    file diffusers' trainers name pytorch_lora_weights.safetensors (else the first top-level one)."""
    data = _tiny_safetensors()
    fake.publish_hf("someone/glow", {"lora_epoch5.safetensors": data + b" ", "pytorch_lora_weights.safetensors": data,
                                     "checkpoint-500/pytorch_lora_weights.safetensors": data + b"  "})
    fake.publish_hf("someone/epochs", {"glow-e1.safetensors": data, "glow-e2.safetensors": data + b" "})
    records = {r.source_id: r for r in HFSource(fake.url, token="", retry=FAST).iter_models()}
    assert [f.name for f in records["someone/glow"].files] == ["pytorch_lora_weights.safetensors"]
    assert [f.name for f in records["someone/epochs"].files] == ["glow-e1.safetensors"]


def test_a_crawl_keeps_to_its_licence_and_nsfw_scope_and_records_both(fake):
    """Civitai answers with mixed licences and NSFW levels (some regions ignore the API's own
    filter): a scope of licence=commercial and the default SFW-only admit exactly the matching
    ones, each record carries its NSFW level and licence, the rest are one note, and a scope
    naming an unknown term or a bad date is refused before anything is listed."""
    data = _tiny_safetensors()
    cases = {"sell": (1, ["Image", "Sell"]), "nsfw-sell": (4, ["Sell"]), "flagged": (None, ["Image"]),
             "no-sale": (1, []), "legacy": (2, "Image")}
    for name, (level, commercial) in cases.items():
        model_id = fake.publish_civitai(f"{name}.safetensors", data + name.encode(), model_name=name)
        model = fake.civitai[-1]
        model["allowCommercialUse"] = commercial
        if level is None:
            model["nsfw"] = True
        else:
            model["modelVersions"][0]["nsfwLevel"] = level
        assert model_id
    source = CivitaiSource(fake.url, token="", scope={"licence": "commercial"})
    try:
        records = {r.name: r for r in source.iter_models()}
        assert set(records) == {"sell", "legacy"}
        assert records["sell"].nsfw_level == 1 and records["sell"].license["allowCommercialUse"] == ["Image", "Sell"]
        assert source.notes == ["civitai: 2 listed experts left out: NSFW (set nsfw=true to include it)",
                                "civitai: 1 listed experts left out: its licence does not grant commercial use"]
    finally:
        source.close()
    everything = CivitaiSource(fake.url, token="", scope={"nsfw": "true"})
    try:
        levels = {r.name: r.nsfw_level for r in everything.iter_models()}
    finally:
        everything.close()
    assert levels == {"sell": 1, "nsfw-sell": 4, "flagged": 4, "no-sale": 1, "legacy": 2}
    for bad, why in ((f"civitai:{fake.url}?licence=free", "unknown licence term 'free'"),
                     (f"civitai:{fake.url}?since=last week", "not an ISO 8601 time")):
        with pytest.raises(ValueError, match=why):
            parse_source_spec(bad)
