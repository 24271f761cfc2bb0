"""`diffgraph serve`'s HTTP API on the mini world, served by uvicorn on loopback with the Gradio UI
mounted: the OpenAI Images API under 20 concurrent clients (all answered, valid PNGs, memory
bounded because the merge engine's byte-bounded caches evict), OpenAI-style errors, and the
recipe and graph-status endpoints."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from diffgraph.miniworld.domain import EXAMPLE_REQUESTS
from diffgraph.settings import Settings
from support.serving import serving

PROMPTS = EXAMPLE_REQUESTS


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def base_url(graph_home, tmp_path_factory):
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    home = tmp_path_factory.mktemp("server_home")
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    settings = Settings(home=home)
    with ChatAgent(settings, llm=None) as agent, serving(create_app(settings, agent=agent)) as url:
        yield url


def test_ui_and_api_share_the_server(base_url):
    page = httpx.get(base_url + "/", timeout=30)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    assert httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"] == "miniworld-sd"


def test_images_api_with_openai_fields(base_url):
    response = httpx.post(base_url + "/v1/images/generations", timeout=120, json={
        "prompt": "a pink circle on a striped white background", "n": 2, "seed": 11, "size": "128x128",
        "response_format": "b64_json", "model": "dall-e-2", "user": "someone"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    seeds = []
    for item in body["data"]:
        png = base64.b64decode(item["b64_json"])
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size == (128, 128)
            assert json.loads(im.info["diffgraph"])["recipe"]["prompt"] == item["revised_prompt"]
        seeds.append(item["diffgraph"]["seed"])
        assert {e["name"] for e in item["diffgraph"]["experts"]} >= {"Pink Pop"}
    assert seeds == [11, 12]

    url_item = httpx.post(base_url + "/v1/images/generations", json={"prompt": "a teal diamond", "seed": 3},
                          timeout=120).json()["data"][0]
    image = httpx.get(url_item["url"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)

    recipe = httpx.get(url_item["diffgraph"]["recipe_url"], timeout=30).json()
    assert recipe["id"] == url_item["diffgraph"]["id"]
    assert recipe["recipe"]["prompt"] == "a teal diamond" and recipe["recipe"]["seed"] == 3
    assert recipe["recipe"]["base_model"] == "miniworld-sd" and "Seed: 3" in recipe["parameters"]
    assert [e["id"] for e in recipe["explanation"]["experts"]] == [e["id"] for e in url_item["diffgraph"]["experts"]]


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": "a red square", "n": 0}, "n"),
    ({"prompt": "a red square", "n": 11}, "n"),
    ({"prompt": "a red square", "n": "2"}, "n"),
    ({"prompt": "a red square", "size": "huge"}, "size"),
    ({"prompt": "a red square", "size": "4096x4096"}, "size"),
    ({"prompt": "a red square", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "a red square", "seed": -1}, "seed"),
    ([1, 2], None),
])
def test_bad_requests_get_openai_style_errors(base_url, body, param):
    response = httpx.post(base_url + "/v1/images/generations", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_not_json_and_unknown_images(base_url):
    response = httpx.post(base_url + "/v1/images/generations", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for path in ("/v1/images/nope-123", "/v1/images/nope-123/recipe", "/v1/images/.catalog"):
        missing = httpx.get(base_url + path, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    traversal = httpx.get(base_url + "/v1/images/..%2F..%2Fcatalog.sqlite", timeout=30)
    assert traversal.status_code == 404 and b"SQLite" not in traversal.content


def test_graph_status_endpoint(base_url):
    status = httpx.get(base_url + "/v1/graph/status", timeout=30).json()
    assert status["experts"]["by_status"]["active"] == 22
    assert status["reference_prompts"] == 4 and status["calibration"]["edges"] == 88
    assert status["background_gca"]["running"] is False


def test_twenty_concurrent_requests_all_answered_with_bounded_memory(base_url):
    from diffgraph.tools.bases import engine_for

    engine = engine_for("miniworld-sd")
    saved = engine.bases.max_bytes, engine.deltas.max_bytes
    one_base = sum(t.numel() * t.element_size() for t in engine.base_state.values())
    # bounds that hold about two merged bases and a few LoRA deltas: the burst must evict
    engine.bases.resize(2 * one_base + one_base // 2)
    engine.deltas.resize(1_000_000)
    evictions = engine.bases.evictions + engine.deltas.evictions
    try:
        httpx.post(base_url + "/v1/images/generations", json={"prompt": PROMPTS[0]}, timeout=120)  # warm
        before = rss_bytes()

        def request(i: int):
            fmt = "b64_json" if i % 2 else "url"
            r = httpx.post(base_url + "/v1/images/generations", timeout=600,
                           json={"prompt": PROMPTS[i], "seed": i, "response_format": fmt})
            assert r.status_code == 200, r.text
            item = r.json()["data"][0]
            png = base64.b64decode(item["b64_json"]) if fmt == "b64_json" else httpx.get(item["url"], timeout=60).content
            with Image.open(io.BytesIO(png)) as im:
                im.load()
                return im.format, im.size, item["diffgraph"]["seed"], "diffgraph" in im.info

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(request, range(20)))
        elapsed = time.monotonic() - started
        grown = rss_bytes() - before
    finally:
        caches = {name: (cache.total_bytes, cache.max_bytes, _largest(cache), len(cache))
                  for name, cache in (("bases", engine.bases), ("deltas", engine.deltas))}
        evicted = engine.bases.evictions + engine.deltas.evictions - evictions
        engine.bases.resize(saved[0])
        engine.deltas.resize(saved[1])
    assert results == [("PNG", (32, 32), i, True) for i in range(20)]
    # a cache holds at most its bound, or a single entry larger than the bound
    for name, (total, bound, largest, count) in caches.items():
        assert total <= bound or (count == 1 and total == largest), (name, caches)
    assert evicted > 0, "the burst made the caches evict"
    assert grown < 400 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB over 20 requests"
    assert elapsed < 300


def _largest(cache) -> int:
    return max((size for _, size in cache._items.values()), default=0)


def test_the_official_openai_client_works(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(prompt="a pink circle on a striped white background", n=1, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 5})
    with Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))) as im:
        assert im.size == (64, 64)
    assert result.data[0].revised_prompt.startswith("a pink circle on a striped white background")  # + trigger words
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(prompt="", n=1)
    assert error.value.status_code == 400 and "prompt is required" in str(error.value)
