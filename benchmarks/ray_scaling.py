"""Calibration throughput over Ray with 1 and 2 workers, and the scaling efficiency t1 / (2 t2).

    unshare -n bash -c 'ip link set lo up && python -m diffgraph.benchmarks.ray_scaling'
    python -m diffgraph.benchmarks.ray_scaling --address HOST:PORT   # an existing cluster

Without --address it starts a local Ray cluster (--cpus CPUs) and, because Ray probes outside
addresses when it starts, refuses to run outside a loopback-only network namespace; it gives
Ray a HOME of its own with `provider: {type: local}` and usage stats off.

The work is E experts x P reference prompts x S seeds (one render each, then the metric suite).
Each worker runs torch with one thread, as does the in-process run it is checked against: the
scores of every Ray run must equal the in-process ones exactly. For each worker count and repeat
a fresh pool is started and each actor renders a warm-up expert first, so the timed run measures
calibration (LoRA deltas and checkpoint merges included) and not process start-up or pipeline
loading. Throughput = renders / wall seconds of the timed run; the median over repeats is kept.
The workers' CPU seconds per render are recorded too: when they stay the same with 2 workers
while the wall time does not halve, the limit is the CPU the machine had to spare, not Ray.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from diffgraph.benchmarks import write_result

console = Console()
BASE = "miniworld-sd"


def _jobs(n: int):
    """n timed experts (LoRAs of both file formats and checkpoints, interleaved) and a warm-up one."""
    from diffgraph.miniworld import ARTIFACTS, artifacts_io
    from diffgraph.tools.calibrate import CalibrationJob

    entries = artifacts_io.manifest()["experts"]
    loras = [e for e in entries if e["kind"] == "lora"]
    ckpts = [e for e in entries if e["kind"] == "ckpt"]
    warm, loras = loras[-1], loras[:-1]
    picked = []
    while len(picked) < n and (loras or ckpts):
        for pool in (loras, loras, ckpts):  # about one checkpoint in three, as in the mini world
            if pool and len(picked) < n:
                picked.append(pool.pop(0))
    job = lambda e: CalibrationJob(BASE, e["kind"], e["slug"], str(ARTIFACTS / e["file"]), e["sha256"])  # noqa: E731
    return [job(e) for e in picked], job(warm)


def main(experts: int = typer.Option(6, help="E: experts calibrated per run"),
         prompts: int = typer.Option(8, help="P: reference prompts"),
         seeds: int = typer.Option(1, help="S: seeds per prompt"),
         repeats: int = typer.Option(2, help="timed runs per worker count (median kept)"),
         cpus: int = typer.Option(2, help="CPUs of the local cluster (without --address)"),
         address: Optional[str] = typer.Option(None, help="an existing Ray cluster instead of a local one"),
         out: Path = typer.Option(Path("benchmarks/results/ray_scaling.json"))) -> None:
    scratch: list[str] = []  # Ray's HOME and session folder, removed at the end
    if address is None:
        if {name for _, name in socket.if_nameindex()} - {"lo"}:
            raise SystemExit("refusing to start Ray outside a loopback-only network namespace: run "
                             "unshare -n bash -c 'ip link set lo up && python -m diffgraph.benchmarks.ray_scaling'")
        ray_home = Path(tempfile.mkdtemp(prefix="dg-ray-home-"))
        scratch.append(str(ray_home))
        (ray_home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
        os.environ["HOME"] = str(ray_home)
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    import torch

    from diffgraph.tools import bases
    from diffgraph.tools.calibrate import calibrate_experts
    from diffgraph.tools.ray_calibrate import RayCalibrationPool

    torch.set_num_threads(1)
    jobs, warm = _jobs(experts)
    refs = bases.profile(BASE).reference_candidates(prompts)
    seed_list = tuple(range(seeds))
    renders = len(jobs) * len(refs) * len(seed_list)
    load_before = os.getloadavg()

    calibrate_experts([warm], refs[:1], (0,))  # load the pipeline and scorers once
    t0, cpu0 = time.perf_counter(), time.process_time()
    local = calibrate_experts(jobs, refs, seed_list)
    t_local, cpu_local = time.perf_counter() - t0, time.process_time() - cpu0
    console.print(f"in process (1 thread): {renders} renders in {t_local:.1f} s = {renders / t_local:.2f} renders/s "
                  f"(CPU {cpu_local / renders:.3f} s per render)")

    if address is None:
        scratch.append(tempfile.mkdtemp(prefix="dgray-", dir="/tmp"))  # short: unix socket paths are limited
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 _temp_dir=scratch[-1])
    else:
        ray.init(address=address, log_to_driver=False)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for repeat in range(repeats):
            for workers in (1, 2):
                pool = RayCalibrationPool(workers=workers, threads=1)
                try:
                    ray.get([a.score.remote([(warm, refs[0])], (0,)) for a in pool.actors])
                    t0 = time.perf_counter()
                    vectors = pool.run(jobs, refs, seed_list)
                    seconds = time.perf_counter() - t0
                finally:
                    pool.close()
                if vectors != local:
                    raise SystemExit(f"{workers} worker(s): Ray's scores differ from the in-process ones")
                busy = {pid: round(w.seconds, 2) for pid, w in pool.last.workers.items()}
                cpu = sum(w.cpu_seconds for w in pool.last.workers.values())
                runs[workers].append({"seconds": seconds, "renders_per_s": renders / seconds, "busy_s": busy,
                                      "cpu_s": round(cpu, 2), "cpu_s_per_render": round(cpu / renders, 3)})
                console.print(f"repeat {repeat}: {workers} worker(s): {seconds:.1f} s = {renders / seconds:.2f} "
                              f"renders/s (busy per worker: {list(busy.values())} s; CPU {cpu / renders:.3f} s per "
                              f"render, {cpu / seconds:.2f} cores used); scores equal in-process")
    finally:
        ray.shutdown()
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
    t1 = statistics.median(r["seconds"] for r in runs[1])
    t2 = statistics.median(r["seconds"] for r in runs[2])
    result = {
        "experts": len(jobs), "prompts": len(refs), "seeds": len(seed_list), "renders_per_run": renders,
        "cluster": address or f"local, {cpus} CPUs", "threads_per_worker": 1, "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "in_process_s": t_local, "in_process_renders_per_s": renders / t_local,
        "in_process_cpu_s_per_render": cpu_local / renders,
        "t1_s": t1, "t2_s": t2, "renders_per_s_1": renders / t1, "renders_per_s_2": renders / t2,
        "scaling_efficiency": t1 / (2 * t2), "runs": runs, "scores_equal_in_process": True,
    }
    write_result(out, result)
    console.print(f"t1 = {t1:.1f} s, t2 = {t2:.1f} s, efficiency t1/(2 t2) = {result['scaling_efficiency']:.2f} "
                  f"(load average before/after: {load_before[0]:.2f}/{result['machine']['loadavg_after'][0]:.2f})")


if __name__ == "__main__":
    typer.run(main)
