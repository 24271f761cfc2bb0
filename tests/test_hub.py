"""The mini-world hub speaks Civitai's and the Hugging Face Hub's wire formats, over real HTTP.

The source clients are written against the real services and must run against this hub
unchanged, so these tests talk to it only through HTTP on loopback (httpx, huggingface_hub
and a real browser), never through its Python internals.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from diffgraph.miniworld.experts import BASE_MODEL, EXPERTS
from diffgraph.miniworld.hub import manifest_experts, running_hub

SPECS = {s.slug: s for s in EXPERTS}
CIVITAI = sorted(s.slug for s in EXPERTS if s.site == "civitai")
HF = sorted(s.slug for s in EXPERTS if s.site == "hf")


@pytest.fixture(scope="module")
def manifest(artifacts_dir: Path) -> dict:
    return json.loads((artifacts_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def hub(artifacts_dir: Path):
    with running_hub(artifacts_dir) as running:
        yield running


@pytest.fixture
def client(hub):
    with httpx.Client(base_url=hub.url, timeout=30) as c:
        yield c


def _sha(manifest: dict, slug: str) -> str:
    return next(e["sha256"] for e in manifest["experts"] if e["slug"] == slug)


def _civitai_models(client: httpx.Client, **params) -> list[dict]:
    """Every model of a listing, following metadata.nextPage as a Civitai client does."""
    items, url = [], "/api/v1/models"
    r = client.get(url, params=params)
    while True:
        r.raise_for_status()
        body = r.json()
        assert len(body["items"]) <= params.get("limit", 100)
        items += body["items"]
        if "nextCursor" not in body["metadata"]:
            assert "nextPage" not in body["metadata"]
            return items
        assert f"cursor={body['metadata']['nextCursor']}" in body["metadata"]["nextPage"]
        r = client.get(body["metadata"]["nextPage"])


def _hf_models(client: httpx.Client, **params) -> list[dict]:
    """Every repo of a listing, following the Link: <...>; rel="next" header like huggingface_hub."""
    items = []
    r = client.get("/api/models", params=params)
    while True:
        r.raise_for_status()
        items += r.json()
        if "next" not in r.links:
            return items
        r = client.get(r.links["next"]["url"])


def _slugs(items: list[dict], key: str) -> list[str]:
    return sorted(item[key].split("/")[-1] if key == "id" else _slug_of_name(item[key]) for item in items)


def _slug_of_name(name: str) -> str:
    return next(s.slug for s in EXPERTS if s.title == name)


def _page_text(page: str) -> str:
    """What a reader sees of a page: tags, styles, scripts and data URIs stripped."""
    page = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


# ----------------------------------------------------------------------------- Civitai

@pytest.mark.parametrize("sort", ["Highest Rated", "Most Downloaded", "Newest"])
def test_civitai_pages_list_every_civitai_expert_exactly_once(client, sort):
    items = _civitai_models(client, limit=4, sort=sort)
    assert _slugs(items, "name") == CIVITAI
    assert len({i["id"] for i in items}) == len(CIVITAI)
    if sort == "Newest":
        dates = [i["modelVersions"][0]["publishedAt"] for i in items]
        assert dates == sorted(dates, reverse=True)


def test_civitai_filters_by_type_base_model_and_query(client):
    loras = [s for s in CIVITAI if SPECS[s].kind == "lora"]
    assert _slugs(_civitai_models(client, types="LORA", limit=5), "name") == loras
    ckpts = _civitai_models(client, types="Checkpoint")
    assert _slugs(ckpts, "name") == [s for s in CIVITAI if SPECS[s].kind == "ckpt"]
    assert {m["type"] for m in ckpts} == {"Checkpoint"}
    both = client.get("/api/v1/models", params=[("types", "LORA"), ("types", "Checkpoint")]).json()["items"]
    assert _slugs(both, "name") == CIVITAI
    assert _slugs(_civitai_models(client, baseModels=BASE_MODEL), "name") == CIVITAI
    assert client.get("/api/v1/models", params={"baseModels": "SD 1.5"}).json() == {"items": [], "metadata": {}}
    assert "stripes-pro" in _slugs(_civitai_models(client, query="stripes"), "name")
    bad = client.get("/api/v1/models", params={"types": "Spaceship"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_civitai_item_has_the_real_api_shape(client, manifest):
    model = next(m for m in _civitai_models(client) if m["name"] == SPECS["stripes-pro"].title)
    spec, version = SPECS["stripes-pro"], model["modelVersions"][0]
    assert model["type"] == "LORA" and model["nsfw"] is False and model["tags"] == list(spec.tags)
    assert spec.claim in html.unescape(model["description"])
    assert model["allowCommercialUse"] == ["Image"] and model["allowDerivatives"] is True
    assert version["baseModel"] == BASE_MODEL and version["trainedWords"] == list(spec.trigger_words)
    assert version["publishedAt"].startswith(spec.published)
    (file,) = version["files"]
    assert file["type"] == "Model" and file["primary"] is True and file["pickleScanResult"] == "Success"
    assert file["metadata"]["format"] == "SafeTensor"
    assert file["hashes"]["SHA256"] == _sha(manifest, "stripes-pro").upper()
    assert file["hashes"]["AutoV2"] == file["hashes"]["SHA256"][:10]
    assert all("<lora:stripes-pro:" in img["meta"]["prompt"] for img in version["images"])
    assert client.get(version["images"][0]["url"]).headers["content-type"] == "image/png"


def test_civitai_lookups_by_model_version_and_hash_agree(client, manifest):
    for model in _civitai_models(client):
        version = model["modelVersions"][0]
        assert client.get(f"/api/v1/models/{model['id']}").json() == model
        details = client.get(f"/api/v1/model-versions/{version['id']}").json()
        assert details["modelId"] == model["id"] and details["model"]["name"] == model["name"]
        assert details["files"] == version["files"]
        sha = _sha(manifest, _slug_of_name(model["name"]))
        for file_hash in (sha, sha.upper(), version["files"][0]["hashes"]["AutoV2"]):
            assert client.get(f"/api/v1/model-versions/by-hash/{file_hash}").json()["id"] == version["id"]


def test_civitai_downloads_match_the_advertised_hash_and_the_manifest(client, manifest):
    for model in _civitai_models(client):
        (file,) = model["modelVersions"][0]["files"]
        r = client.get(file["downloadUrl"])
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == file["hashes"]["SHA256"].lower() \
            == _sha(manifest, _slug_of_name(model["name"]))
        assert len(r.content) == round(file["sizeKB"] * 1024)
        assert f'filename="{file["name"]}"' in r.headers["content-disposition"]


# ----------------------------------------------------------------------------- Hugging Face

@pytest.mark.parametrize("params", [{}, {"sort": "downloads"}, {"sort": "createdAt", "direction": "1"}])
def test_hf_pages_list_every_hf_expert_exactly_once(client, params):
    items = _hf_models(client, author="miniworld", limit=3, **params)
    assert _slugs(items, "id") == HF and len({i["id"] for i in items}) == len(HF)
    if params.get("sort") == "downloads":
        assert [i["downloads"] for i in items] == sorted((i["downloads"] for i in items), reverse=True)
    if params.get("sort") == "createdAt":
        assert [i["createdAt"] for i in items] == sorted(i["createdAt"] for i in items)


def test_hf_filters_by_tags_author_and_search(client):
    loras = [s for s in HF if SPECS[s].kind == "lora"]
    assert _slugs(_hf_models(client, filter="lora", limit=2), "id") == loras
    assert _slugs(_hf_models(client, filter=f"base_model:{BASE_MODEL}"), "id") == HF
    textures = client.get("/api/models", params=[("filter", "lora"), ("filter", "texture")]).json()
    assert _slugs(textures, "id") == sorted(s for s in loras if "texture" in SPECS[s].tags)
    assert _slugs(_hf_models(client, search="stripes"), "id") == ["stripes-lite"]
    assert _hf_models(client, author="someone-else") == []


def test_hf_model_info_card_and_downloads_match_the_manifest(client, manifest):
    for slug in HF:
        spec, repo = SPECS[slug], f"miniworld/{slug}"
        info = client.get(f"/api/models/{repo}", params={"blobs": "true"}).json()
        assert info["id"] == info["modelId"] == repo and info["pipeline_tag"] == "text-to-image"
        assert info["library_name"] == "diffusers" and info["cardData"]["base_model"] == BASE_MODEL
        assert info["cardData"]["instance_prompt"] == ", ".join(spec.trigger_words)
        assert client.get(f"/api/models/{repo}/revision/{info['sha']}").json()["sha"] == info["sha"]
        readme = client.get(f"/{repo}/resolve/main/README.md").text
        front, card = re.fullmatch(r"---\n(.*?)\n---\n(.*)", readme, flags=re.S).groups()
        assert yaml.safe_load(front) == info["cardData"] and spec.claim in card
        (weights,) = [s for s in info["siblings"] if "lfs" in s]
        r = client.get(f"/{repo}/resolve/{info['sha']}/{weights['rfilename']}")
        assert hashlib.sha256(r.content).hexdigest() == weights["lfs"]["sha256"] == _sha(manifest, slug)
        assert r.headers["x-linked-etag"] == f'"{_sha(manifest, slug)}"' and r.headers["x-repo-commit"] == info["sha"]
        assert int(r.headers["x-linked-size"]) == weights["size"] == len(r.content)


def test_huggingface_hub_library_runs_against_the_hub_unchanged(hub, manifest, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=hub.hf_url, token=False)
    listed = list(api.list_models(author="miniworld", filter="lora"))
    assert sorted(m.id.split("/")[1] for m in listed) == [s for s in HF if SPECS[s].kind == "lora"]
    info = api.model_info("miniworld/checkerboard", files_metadata=True)
    (weights,) = [s for s in info.siblings if s.lfs]
    assert weights.lfs.sha256 == _sha(manifest, "checkerboard") and info.card_data.base_model == BASE_MODEL
    path = hf_hub_download("miniworld/checkerboard", weights.rfilename, endpoint=hub.hf_url,
                           cache_dir=tmp_path, token=False)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == _sha(manifest, "checkerboard")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("miniworld/no-such-repo")


# ----------------------------------------------------------------------------- downloads

def _download_urls(client: httpx.Client) -> dict[str, str]:
    civitai = _civitai_models(client, types="Checkpoint")[0]
    return {"civitai": civitai["modelVersions"][0]["downloadUrl"],
            "hf": "/miniworld/stripes-lite/resolve/main/pytorch_lora_weights.safetensors"}


@pytest.mark.parametrize("site", ["civitai", "hf"])
def test_range_requests_return_the_right_slice(client, site):
    url = _download_urls(client)[site]
    whole = client.get(url).content
    size = len(whole)
    r = client.get(url, headers={"Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == whole[100:1100]
    assert r.headers["content-range"] == f"bytes 100-1099/{size}" and r.headers["accept-ranges"] == "bytes"
    assert client.get(url, headers={"Range": f"bytes={size - 10}-"}).content == whole[-10:]
    assert client.get(url, headers={"Range": "bytes=-64"}).content == whole[-64:]
    unsatisfiable = client.get(url, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == f"bytes */{size}"
    head = client.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == size and head.content == b""


# ----------------------------------------------------------------------------- homepages

def _homepages(client: httpx.Client) -> dict[str, str]:
    pages = {m["name"]: client.get(f"/models/{m['id']}/{_slug_of_name(m['name'])}").text
             for m in _civitai_models(client)}
    pages = {_slug_of_name(name): page for name, page in pages.items()}
    pages.update({slug: client.get(f"/miniworld/{slug}").text for slug in HF})
    return pages


def test_homepages_state_the_claim_and_js_only_pages_hide_it(client):
    for slug, page in _homepages(client).items():
        spec = SPECS[slug]
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), f"{slug}: external resource"
        if spec.js_only_page:
            assert spec.claim not in html.unescape(page) and "<script>" in page
            continue
        text = _page_text(page)
        assert spec.claim in text
        assert all(w in text for w in spec.trigger_words) and BASE_MODEL in text
        assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="[^"]+"', page)
        if spec.site == "civitai" and spec.kind == "lora":
            assert f"<lora:{slug}:0.8>" in text


@pytest.mark.browser
def test_a_browser_sees_the_js_only_pages(hub, client):
    if not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed")
    from playwright.sync_api import sync_playwright

    models = {_slug_of_name(m["name"]): m["id"] for m in _civitai_models(client)}
    urls = {s: f"{hub.url}/models/{models[s]}/{s}" if SPECS[s].site == "civitai" else f"{hub.url}/miniworld/{s}"
            for s in SPECS if SPECS[s].js_only_page}
    fetched = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
            "--no-sandbox", '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1'])
        page = browser.new_page()
        page.on("request", lambda request: fetched.append(request.url))
        for slug, url in urls.items():
            page.goto(url, wait_until="load")
            text = page.inner_text("body")
            assert SPECS[slug].claim in text and all(w in text for w in SPECS[slug].trigger_words)
            assert page.title() not in ("Mini Civitai", "Mini Hugging Face")  # drawn by the script too
        browser.close()
    assert all(u.startswith(hub.url) or u.startswith("data:") for u in fetched), fetched


# ----------------------------------------------------------------------------- errors

def test_unknown_ids_get_404_json_like_the_real_apis(client):
    assert client.get("/api/v1/models/999").json() == {"error": "No model with id 999"}
    for path in ("/api/v1/models/999", "/api/v1/model-versions/1", "/api/v1/model-versions/by-hash/DEADBEEF00",
                 "/api/download/models/1"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"}, path
    assert client.get("/api/v1/models/not-a-number").status_code == 400
    for path, code in [("/api/models/miniworld/nope", "RepoNotFound"),
                       ("/api/models/miniworld/stripes-pro", "RepoNotFound"),  # a Civitai expert
                       ("/api/models/miniworld/stripes-lite/revision/v9", "RevisionNotFound"),
                       ("/miniworld/stripes-lite/resolve/main/nope.bin", "EntryNotFound")]:
        r = client.get(path)
        assert r.status_code == 404 and r.headers["x-error-code"] == code and "error" in r.json(), path
    assert client.get("/models/999/nothing").status_code == 404
    assert client.get("/miniworld/nothing").status_code == 404


# ----------------------------------------------------------------------------- mutation and faults

def test_a_hub_can_start_with_one_expert_less_and_change_while_running(artifacts_dir, manifest):
    pairs = manifest_experts(manifest)
    dropped = next(p for p in pairs if p[0].site == "civitai")
    with running_hub(artifacts_dir, experts=[p for p in pairs if p is not dropped]) as small, \
            httpx.Client(base_url=small.url, timeout=30) as c:
        assert dropped[0].slug not in _slugs(_civitai_models(c), "name")
        small.add_expert(*dropped)
        assert _slugs(_civitai_models(c), "name") == CIVITAI
        small.remove_expert("stripes-lite")
        assert "stripes-lite" not in _slugs(_hf_models(c), "id")
        assert c.get("/api/models/miniworld/stripes-lite").status_code == 404


def test_injected_faults_fail_the_next_requests_then_clear(artifacts_dir):
    with running_hub(artifacts_dir) as flaky, httpx.Client(base_url=flaky.url, timeout=30) as c:
        flaky.inject_fault("/api/v1/models", 429, times=2, retry_after=3)
        first, second = c.get("/api/v1/models"), c.get("/api/v1/models?limit=1")
        assert first.status_code == second.status_code == 429 and first.headers["retry-after"] == "3"
        assert c.get("/api/v1/models").status_code == 200
        flaky.inject_fault("/api/models", 500)
        assert c.get("/api/models").status_code == 500 and c.get("/api/models").status_code == 200
        assert "GET /api/v1/models?limit=1" in flaky.requests


def test_a_dropped_download_resumes_with_a_range_request(artifacts_dir, manifest):
    with running_hub(artifacts_dir) as flaky, httpx.Client(base_url=flaky.url, timeout=30) as c:
        model = _civitai_models(c, types="Checkpoint")[0]
        url, sha = model["modelVersions"][0]["downloadUrl"], _sha(manifest, _slug_of_name(model["name"]))
        flaky.inject_fault("/api/download/", cut_after=100_000)
        received = bytearray()
        with pytest.raises(httpx.TransportError), c.stream("GET", url) as r:
            for chunk in r.iter_bytes():
                received += chunk
        assert 0 < len(received) <= 100_000
        rest = c.get(url, headers={"Range": f"bytes={len(received)}-"})
        assert rest.status_code == 206
        assert hashlib.sha256(bytes(received) + rest.content).hexdigest() == sha
