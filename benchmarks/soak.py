"""A long-running server under a steady request rate: does it stay flat?

    python -m diffgraph.benchmarks.soak [--duration 3600] [--rate 30] [--home DIR]

`diffgraph serve` on the mini world in a child process, with an API key configured (so every
request passes the key check) and the per-key rate limit raised above the soak's rate. Requests
are sent open-loop at a fixed rate (one every 60/rate seconds, whatever the answers take), cycling
through what a client does: renders (b64_json and url), fetching the image and its recipe, the
model list, the graph status, the health check, and requests that must fail (invalid JSON, a bad
size, an unknown image, a missing key), so the error paths are soaked too. Each answer must have
its expected status; anything else, a timeout or a dropped connection is an error.

Recorded every 10 s: the server's RSS, open file descriptors and threads. The result (requests
served, errors, RSS and descriptors at start and end, their growth from the first to the last
quarter) goes to benchmarks/results/soak.json; benchmarks/RESULTS.md keeps the figures.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from diffgraph.benchmarks import write_result
from diffgraph.benchmarks.load import PROMPTS, Server, build_home, rss_mb
from rich.console import Console
from rich.progress import Progress

console = Console()
KEY = "soak-benchmark-key-0123456789"
SAMPLE_EVERY_S = 10.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _requests(url: str, k: int, last_image: dict) -> list[tuple[str, str, dict, int]]:
    """The k-th step of the cycle: (method, url, httpx kwargs, expected status) tuples."""
    auth = {"Authorization": f"Bearer {KEY}"}
    prompt = PROMPTS[k % len(PROMPTS)]
    step = k % 10
    if step in (0, 5):
        return [("POST", f"{url}/v1/images/generations", {"headers": auth, "json": {
            "prompt": prompt, "seed": k, "response_format": "b64_json" if step == 0 else "url"}}, 200)]
    if step in (1, 6) and last_image:
        return [("GET", last_image["url"], {"headers": auth}, 200), ("GET", last_image["recipe"], {"headers": auth}, 200)]
    if step == 2:
        return [("GET", f"{url}/v1/models", {"headers": auth}, 200), ("GET", f"{url}/healthz", {}, 200)]
    if step == 3:
        return [("GET", f"{url}/v1/graph/status", {"headers": auth}, 200)]
    if step == 4:
        return [("POST", f"{url}/v1/images/generations", {"headers": {**auth, "Content-Type": "application/json"},
                                                         "content": b"{not json"}, 400),
                ("POST", f"{url}/v1/images/generations", {"headers": auth, "json": {"prompt": prompt, "size": "9x9"}}, 400)]
    if step == 7:
        return [("GET", f"{url}/v1/images/no-such-image-{k}", {"headers": auth}, 404)]
    if step == 8:
        return [("GET", f"{url}/v1/models", {}, 401)]
    return [("GET", f"{url}/healthz", {}, 200)]


def run_soak(url: str, pid: int, duration_s: float, rate_per_min: float) -> dict:
    import httpx

    interval = 60.0 / rate_per_min
    t0 = time.monotonic()
    samples: list[dict] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(pid), 1),
                            "fds": open_fds(pid), "threads": threads(pid)})
            done.wait(SAMPLE_EVERY_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    served = errors = 0
    latencies: list[float] = []
    failures: list[str] = []
    last_image: dict = {}
    with httpx.Client(timeout=300) as http, Progress(console=console, transient=True) as progress:
        task = progress.add_task("soak", total=duration_s)
        k = 0
        while (now := time.monotonic() - t0) < duration_s:
            for method, target, kwargs, expected in _requests(url, k, last_image):
                sent = time.monotonic()
                try:
                    answer = http.request(method, target, **kwargs)
                    status = answer.status_code
                    if status == 200 and target.endswith("/generations"):
                        item = answer.json()["data"][0]
                        last_image = {"url": item.get("url") or f"{url}/v1/images/{item['diffgraph']['id']}.png",
                                      "recipe": item["diffgraph"]["recipe_url"]}
                except Exception as exc:  # a timeout or a dropped connection is an error of the run
                    status, answer = f"{type(exc).__name__}", None
                latencies.append(time.monotonic() - sent)
                served += 1
                if status != expected:
                    errors += 1
                    failures.append(f"{method} {target[len(url):]}: {status}, expected {expected}")
            k += 1
            progress.update(task, completed=now)
            time.sleep(max(0.0, t0 + k * interval - time.monotonic()))
    done.set()
    sampler.join()
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    return {
        "duration_s": round(time.monotonic() - t0, 1), "rate_per_min": rate_per_min, "steps": k,
        "requests_served": served, "errors": errors, "first_errors": failures[:10],
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "rss_mb": {"start": samples[0]["rss_mb"], "end": samples[-1]["rss_mb"], "max": max(s["rss_mb"] for s in samples),
                   "first_quarter_mean": round(statistics.mean(s["rss_mb"] for s in first), 1),
                   "last_quarter_mean": round(statistics.mean(s["rss_mb"] for s in last), 1)},
        "fds": {"start": samples[0]["fds"], "end": samples[-1]["fds"], "max": max(s["fds"] for s in samples)},
        "threads": {"start": samples[0]["threads"], "end": samples[-1]["threads"]},
        "samples": samples,
    }


def main(duration: float = typer.Option(3600, help="seconds of steady load"),
         rate: float = typer.Option(30, help="request steps a minute (each one to three requests)"),
         home: Optional[Path] = typer.Option(None, help="a DIFFGRAPH_HOME with a graph; default: build one"),
         out: Path = typer.Option(Path("benchmarks/results/soak.json"), help="where the JSON goes")) -> None:
    with tempfile.TemporaryDirectory(prefix="diffgraph-soak-") as tmp:
        if home is None:
            home = Path(tmp) / "home"
            console.print("building the mini-world graph (a GCA pass)...")
            build_home(home)
        os.environ["DIFFGRAPH_API_KEYS"] = KEY
        os.environ["DIFFGRAPH_RATE_LIMIT"] = str(int(rate * 10))
        server = Server(home, Path(tmp) / "server.log")
        try:
            server.wait_ready()
            result = run_soak(server.url, server.proc.pid, duration, rate)
        finally:
            server.stop()
    result["command"] = f"python -m diffgraph.benchmarks.soak --duration {duration:g} --rate {rate:g}"
    write_result(out, result)
    console.print(f"served {result['requests_served']} requests in {result['duration_s']:.0f} s, "
                  f"{result['errors']} errors; RSS {result['rss_mb']['start']} -> {result['rss_mb']['end']} MB "
                  f"(first/last quarter mean {result['rss_mb']['first_quarter_mean']} / "
                  f"{result['rss_mb']['last_quarter_mean']}); fds {result['fds']['start']} -> {result['fds']['end']}; "
                  f"threads {result['threads']['start']} -> {result['threads']['end']}")


if __name__ == "__main__":
    typer.run(main)
