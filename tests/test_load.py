"""The HTTP API under concurrent load on loopback (a small version of benchmarks/load.py):
requests are served in arrival order, closed-loop clients share the server evenly, nothing
fails, a full queue is refused with an OpenAI-style 503, and memory stays flat (bounded id
index, one request's working memory at a time). Behaviour is asserted, not timings."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from diffgraph.settings import Settings
from support.serving import serving

PROMPTS = ["a pink circle on a striped white background", "a teal diamond on a mint background",
           "vintage sepia photo of a red square", "a purple triangle at night", "neon style blue cross",
           "an orange circle on a polka dot background", "a green square on a checkered gray background"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def server(graph_home, tmp_path_factory):
    from diffgraph.agents.chat import ChatAgent
    from diffgraph.agents.server import create_app

    home = tmp_path_factory.mktemp("load_home")
    shutil.copytree(graph_home, home, dirs_exist_ok=True)
    settings = Settings(home=home)
    with ChatAgent(settings, llm=None) as agent:
        app = create_app(settings, agent=agent, ui=False)
        with serving(app) as url:
            r = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPTS[0], "seed": 0}, timeout=300)
            assert r.status_code == 200, r.text  # warm: pipeline, scorers, first merges
            yield url, app


def _queue(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=30).json()["queue"]


def _wait_for(url: str, what: str, value: int, timeout_s: float = 120) -> dict:
    """Polls /healthz until ``queue[what] >= value`` (what: "active", "waiting" or "arrived",
    every request the queue has seen: served + active + waiting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        queue = _queue(url)
        queue["arrived"] = queue["served"] + queue["active"] + queue["waiting"]
        if queue[what] >= value:
            return queue
        assert time.monotonic() < deadline, f"the queue never reached {what} = {value}: {queue}"
        time.sleep(0.01)


def _post_in_thread(url: str, body: dict, results: list, order: list, lock: threading.Lock, tag) -> threading.Thread:
    def run():
        r = httpx.post(url + "/v1/images/generations", json=body, timeout=600)
        with lock:
            order.append(tag)
            results.append((tag, r.status_code, r.json(), r.headers))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_requests_are_served_in_arrival_order(server):
    url, _ = server
    results, order, lock = [], [], threading.Lock()
    seen = _wait_for(url, "arrived", 0)["arrived"]
    threads = [_post_in_thread(url, {"prompt": PROMPTS[1], "n": 3, "seed": 50}, results, order, lock, "first")]
    _wait_for(url, "active", 1)
    most_waiting = 0
    for i in range(5):  # each is sent once the one before it is in the queue: a known arrival order
        threads.append(_post_in_thread(url, {"prompt": PROMPTS[i], "seed": 100 + i}, results, order, lock, i))
        most_waiting = max(most_waiting, _wait_for(url, "arrived", seen + i + 2)["waiting"])
    for thread in threads:
        thread.join(timeout=600)
    assert all(status == 200 for _, status, _, _ in results), results
    assert most_waiting >= 3, "requests really queued behind the first (it renders three images)"
    assert order == ["first", 0, 1, 2, 3, 4]
    assert _queue(url)["waiting"] == 0 and _queue(url)["active"] == 0


def test_a_full_queue_is_refused_with_retry_after(server):
    url, app = server
    queue = app.state.queue
    saved = queue.max_waiting
    queue.max_waiting = 1
    results, order, lock = [], [], threading.Lock()
    try:
        threads = [_post_in_thread(url, {"prompt": PROMPTS[2], "n": 3, "seed": 7}, results, order, lock, "served")]
        _wait_for(url, "active", 1)
        threads.append(_post_in_thread(url, {"prompt": PROMPTS[3], "seed": 8}, results, order, lock, "waited"))
        _wait_for(url, "waiting", 1)
        refused = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPTS[4]}, timeout=60)
        for thread in threads:
            thread.join(timeout=600)
    finally:
        queue.max_waiting = saved
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "server_error" and "busy" in error["message"]
    assert sorted(status for _, status, _, _ in results) == [200, 200] and order == ["served", "waited"]


def test_sustained_load_is_fair_error_free_and_flat_in_memory(server):
    """Six closed-loop clients: each sends its next request when the last is answered. Served in
    arrival order, they take turns, so when sending stops no client is more than one answer ahead
    of another. Two rounds: the second must not grow the process (caches are warm by then)."""
    url, app = server
    api = app.state.api
    saved_index = api.index_size
    api.index_size = 8  # small, so the run shows the id index stays bounded and old ids are still served
    try:
        first_round = _closed_loop(url, clients=6, seconds=8)
        before = rss_mb()
        second_round = _closed_loop(url, clients=6, seconds=8)
        grown = rss_mb() - before
        index_len = len(api._index)
    finally:
        api.index_size = saved_index
    for counts, errors, first_url in (first_round, second_round):
        assert errors == [], errors
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1, counts
    assert index_len <= 8
    early = httpx.get(first_round[2], timeout=30)  # dropped from the index long ago, found on disk
    assert early.status_code == 200 and early.headers["content-type"] == "image/png"
    assert grown < 100, f"RSS grew by {grown:.0f} MB over the second round of {sum(second_round[0])} requests"


def _closed_loop(url: str, clients: int, seconds: float) -> tuple[list[int], list[str], str]:
    stop_at = time.monotonic() + seconds
    counts = [0] * clients
    errors: list[str] = []
    first_urls: list[str] = []
    lock = threading.Lock()

    def client(c: int):
        k = 0
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop_at:
                r = http.post(url + "/v1/images/generations", json={"prompt": PROMPTS[(c + k) % len(PROMPTS)],
                                                                    "seed": 1000 * c + k})
                k += 1
                with lock:
                    if r.status_code == 200:
                        counts[c] += 1
                        if not first_urls:
                            first_urls.append(r.json()["data"][0]["url"])
                    else:
                        errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return counts, errors, first_urls[0] if first_urls else ""


def test_generation_queue_hands_slots_to_the_oldest_waiter():
    """The queue itself, without a server: arrival order, the max_active bound, a waiter that is
    cancelled before or after it was handed a slot, and refusal past max_waiting."""
    import asyncio

    from diffgraph.agents.server import APIError, GenerationQueue

    async def scenario(max_active: int):
        queue = GenerationQueue(max_waiting=6 - max_active, max_active=max_active)
        started, most_active = [], 0
        gate = asyncio.Event()

        async def request(tag):
            nonlocal most_active
            async with queue.turn():
                started.append(tag)
                most_active = max(most_active, queue.active)
                await gate.wait()

        tasks = []
        for tag in range(6):  # 0 .. max_active-1 start at once, the rest wait in arrival order
            tasks.append(asyncio.create_task(request(tag)))
            await asyncio.sleep(0)
        assert queue.waiting == 6 - max_active
        with pytest.raises(APIError) as refused:
            async with queue.turn():
                pass
        assert refused.value.status == 503 and queue.refused == 1
        tasks[max_active].cancel()  # cancelled while waiting: leaves the line
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert started == [t for t in range(6) if t != max_active]
        assert most_active == max_active and queue.status()["active"] == 0 and queue.waiting == 0

        # handed a slot, then cancelled before it could run: the slot goes on to the next waiter
        hold = asyncio.Event()
        order = []

        async def quick(tag):
            async with queue.turn():
                order.append(tag)

        async def holder():
            async with queue.turn():
                await hold.wait()

        holders = [asyncio.create_task(holder()) for _ in range(max_active)]
        await asyncio.sleep(0)
        b, c = asyncio.create_task(quick("b")), None
        await asyncio.sleep(0)
        c = asyncio.create_task(quick("c"))
        await asyncio.sleep(0)
        hold.set()
        await asyncio.sleep(0)  # a holder leaves and hands its slot to b, which has not run yet
        b.cancel()
        await asyncio.gather(*holders, b, c, return_exceptions=True)
        assert order == ["c"] and queue.active == 0 and queue.waiting == 0

    asyncio.run(scenario(1))
    asyncio.run(scenario(2))
