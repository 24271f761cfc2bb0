"""The HTTP API under sustained concurrent load on loopback: `diffgraph serve` on the mini world,
C closed-loop clients posting to /v1/images/generations for D seconds.

    python -m diffgraph.benchmarks.load [--clients 8 --clients 16] [--duration 60] [--home DIR]

The server is a separate process (`diffgraph serve`, Gradio UI mounted, as deployed), so its
RSS is its own; it is sampled every second. Without --home a graph of the whole mini world is
built first by a GCA pass (N_r = 4, homepages not read) in a temporary home. Each client sends
its next request as soon as the previous one is answered (prompts from a fixed list, a new seed
each time, PNGs returned as b64_json) and stops sending after D seconds; requests in flight
then finish. Recorded per client count:

- throughput (answered requests per second over the run) and latency p50/p95/p99/max;
- errors (non-200 answers, timeouts, connection failures);
- server RSS over time, and its growth from the first to the last quarter of the run;
- fairness: requests answered per client (min/max, Jain's index) and FIFO overtakes: pairs
  where a request sent at least 50 ms after another was answered before it (0 when requests
  are served in arrival order).

--no-fifo serves the same app with its GenerationQueue turned into a pass-through, i.e. the
server as it was before requests were queued in arrival order (renders then only wait for the
engine's threading.Lock), for an A/B comparison on the same machine; --max-active 2 runs
`diffgraph serve --max-active 2` (one request selecting experts while another renders).
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from diffgraph.benchmarks import write_result
from diffgraph.miniworld.domain import EXAMPLE_REQUESTS

console = Console()
OVERTAKE_MARGIN_S = 0.05
PROMPTS = EXAMPLE_REQUESTS[:12]  # the first 12, as every recorded run used


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def build_home(home: Path) -> None:
    from diffgraph.agents.gca import run_pass
    from diffgraph.settings import Settings

    result = run_pass(["miniworld"], settings=Settings(home=home, reference_prompts=4, hub_port=free_port()),
                      console=Console(quiet=True), read_pages=False)
    if result["counts"].get("active") != 22:
        raise SystemExit(f"the GCA pass did not activate the 22 mini-world experts: {result}")


NO_FIFO_SERVER = """
import contextlib, sys, uvicorn
from diffgraph.agents.server import create_app

app = create_app()

@contextlib.asynccontextmanager
async def turn():  # no queue: every request goes straight to a worker thread
    yield

app.state.queue.turn = turn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


class Server:
    """`diffgraph serve` in a child process on a free loopback port."""

    def __init__(self, home: Path, log: Path, max_active: int = 1, fifo: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DIFFGRAPH_HOME": str(home)}
        self._log = open(log, "w")
        cmd = ([sys.executable, "-m", "diffgraph.agents.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-active", str(max_active)] if fifo else [sys.executable, "-c", NO_FIFO_SERVER, str(self.port)])
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"the server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_load(url: str, pid: int, clients: int, duration_s: float, request_timeout_s: float = 600) -> dict:
    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s
    counter = iter(range(10**9))
    rss: list[tuple[float, float]] = []
    done = threading.Event()
    t_start = time.monotonic()

    def sample():
        while not done.is_set():
            rss.append((time.monotonic() - t_start, rss_mb(pid)))
            done.wait(1.0)

    def client(c: int):
        with httpx.Client(timeout=request_timeout_s) as http:
            while time.monotonic() < stop_at:
                with lock:
                    k = next(counter)
                body = {"prompt": PROMPTS[k % len(PROMPTS)], "seed": k, "response_format": "b64_json"}
                sent = time.monotonic()
                status, error = None, None
                try:
                    r = http.post(url + "/v1/images/generations", json=body)
                    status = r.status_code
                    if status == 200:
                        png = base64.b64decode(r.json()["data"][0]["b64_json"])
                        if not png.startswith(b"\x89PNG"):
                            error = "not a PNG"
                    else:
                        error = r.text[:200]
                except Exception as exc:  # a timeout or a dropped connection is an error of the run
                    error = f"{type(exc).__name__}: {exc}"[:200]
                with lock:
                    records.append({"client": c, "sent": sent - t_start, "answered": time.monotonic() - t_start,
                                    "status": status, "error": error})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    done.set()
    sampler.join()
    return summarise(records, rss, clients, wall)


def overtakes(records: list[dict]) -> int:
    """Pairs (i, j): j sent >= 50 ms after i, yet answered before i."""
    ok = sorted((r for r in records if r["error"] is None), key=lambda r: r["sent"])
    n = 0
    for a, i in enumerate(ok):
        for j in ok[a + 1:]:
            if j["sent"] - i["sent"] >= OVERTAKE_MARGIN_S and j["answered"] < i["answered"]:
                n += 1
    return n


def summarise(records: list[dict], rss: list[tuple[float, float]], clients: int, wall: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    latency = [r["answered"] - r["sent"] for r in ok]
    per_client = [sum(1 for r in ok if r["client"] == c) for c in range(clients)]
    jain = sum(per_client) ** 2 / (clients * sum(x * x for x in per_client)) if any(per_client) else 0.0
    quarter = max(1, len(rss) // 4)
    first, last = [m for _, m in rss[:quarter]], [m for _, m in rss[-quarter:]]
    return {
        "clients": clients, "wall_s": round(wall, 1), "requests": len(records), "answered_ok": len(ok),
        "errors": len(records) - len(ok), "error_samples": sorted({r["error"] for r in records if r["error"]})[:5],
        "throughput_rps": round(len(ok) / wall, 3),
        "latency_s": {"p50": round(percentile(latency, 50), 2), "p95": round(percentile(latency, 95), 2),
                      "p99": round(percentile(latency, 99), 2), "max": round(max(latency), 2),
                      "mean": round(statistics.mean(latency), 2)} if latency else None,
        "per_client_answered": per_client, "jain_index": round(jain, 4),
        "fifo_overtakes": overtakes(records),
        "rss_mb": {"start": round(rss[0][1], 1), "end": round(rss[-1][1], 1), "max": round(max(m for _, m in rss), 1),
                   "first_quarter_mean": round(statistics.mean(first), 1),
                   "last_quarter_mean": round(statistics.mean(last), 1),
                   "growth_first_to_last_quarter": round(statistics.mean(last) - statistics.mean(first), 1),
                   "series": [(round(t, 1), round(m, 1)) for t, m in rss]},
    }


def main(clients: List[int] = typer.Option([8, 16], "--clients", help="concurrent clients (repeatable)"),
         duration: float = typer.Option(60.0, help="seconds each client keeps sending"),
         home: Optional[Path] = typer.Option(None, help="a DIFFGRAPH_HOME with the mini world's graph (default: build one)"),
         no_fifo: bool = typer.Option(False, "--no-fifo", help="without the arrival-order queue (A/B)"),
         max_active: int = typer.Option(1, help="requests in progress at a time (the server's default: 1)"),
         out: Path = typer.Option(Path("benchmarks/results/load.json"))) -> None:
    import httpx

    tmp = tempfile.TemporaryDirectory(prefix="dg-load-")
    if home is None:
        home = Path(tmp.name) / "home"
        console.print("building the mini world's graph (GCA pass, N_r = 4) ...")
        t0 = time.perf_counter()
        build_home(home)
        console.print(f"  done in {time.perf_counter() - t0:.0f} s")
    server = Server(home, Path(tmp.name) / "server.log", max_active=max_active, fifo=not no_fifo)
    results = []
    try:
        server.wait_ready()
        for i in range(2):  # warm: pipeline, scorers, planner, first merges
            httpx.post(server.url + "/v1/images/generations", json={"prompt": PROMPTS[i], "seed": i}, timeout=600)
        rss_warm = rss_mb(server.proc.pid)
        for c in clients:
            result = run_load(server.url, server.proc.pid, c, duration)
            result["rss_mb"]["after_warmup"] = round(rss_warm, 1)
            results.append(result)
            lat = result["latency_s"] or {}
            console.print(f"{c} clients, {duration:.0f} s: {result['answered_ok']} answered, {result['errors']} errors, "
                          f"{result['throughput_rps']} req/s, latency p50 {lat.get('p50')} p95 {lat.get('p95')} "
                          f"p99 {lat.get('p99')} max {lat.get('max')} s; per client {result['per_client_answered']} "
                          f"(Jain {result['jain_index']}); FIFO overtakes {result['fifo_overtakes']}; RSS "
                          f"{result['rss_mb']['start']} -> {result['rss_mb']['end']} MB (max {result['rss_mb']['max']}, "
                          f"first->last quarter {result['rss_mb']['growth_first_to_last_quarter']:+} MB)")
    finally:
        server.stop()
        tmp.cleanup()
    write_result(out, {"duration_s": duration, "fifo_queue": not no_fifo, "max_active": max_active,
                       "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "runs": results})


if __name__ == "__main__":
    typer.run(main)
