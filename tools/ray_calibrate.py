"""Calibration over a Ray cluster (DIFFGRAPH_RAY_ADDRESS): actors that each hold a merge engine
render and score a share of the (expert, reference prompt) pairs.

    calibrate_on_ray(jobs, prompts, seeds, address="10.0.0.5:6379")  ->  vectors[job][prompt]

Each actor is a long-lived process with its own `bases.engine_for` (pipeline and merge caches)
and metric suite, kept between calls, so a GCA pass pays the pipeline load once per worker, not
once per expert. The pairs are cut into contiguous shares (job-major, so an actor's share spans
few experts and their LoRA deltas and merged checkpoints come from its caches) and handed out
as actors become free. Every pair is scored by `calibrate.score_prompt`, the function the local
path calls, and an actor runs torch with the driver's thread count: CPU kernels split their
reductions by thread count, so that is what makes the numbers identical to a local run on the
same machine, not just close. An actor reserves that many CPUs, so the default worker count is
the cluster's CPUs divided by it.

Workers read expert files at the driver's paths: one machine, or a filesystem shared by the
cluster's nodes. Workers render on the CPU unless ``gpus_per_worker`` is set (Ray hides GPUs
from actors that reserve none).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import bases
from .calibrate import CalibrationJob, score_prompt

# Workers see the driver's DIFFGRAPH_* settings (where bases and plugin data live, the device)
# but no credential: API keys, tokens and database URLs stay in the driver.
SECRET_MARKERS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "DB_URL")


def forwarded_env(environ=os.environ) -> dict[str, str]:
    """The variables a calibration worker gets from the driver."""
    return {k: v for k, v in environ.items()
            if v and (k == "OMP_WAIT_POLICY" or (k.startswith("DIFFGRAPH_") and not any(m in k for m in SECRET_MARKERS)))}
READY_TIMEOUT_S = 600.0


class CalibrationWorker:
    """The body of one Ray actor (wrapped with ``ray.remote`` by the pool)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.threads = threads

    def ready(self) -> int:
        return os.getpid()

    def score(self, units: list[tuple[CalibrationJob, str]], seeds: tuple[int, ...]) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        vectors = [score_prompt(bases.engine_for(job.base_model), bases.suite_for(job.base_model), job, prompt, seeds)
                   for job, prompt in units]
        return {"pid": os.getpid(), "vectors": vectors, "seconds": time.perf_counter() - started,
                "cpu_seconds": time.process_time() - cpu}


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (a driver that is already connected stays where it is)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, namespace="diffgraph")


@dataclass
class WorkerStats:
    units: int = 0
    seconds: float = 0.0  # wall time in `score`
    cpu_seconds: float = 0.0  # CPU time of the worker process in `score` (all its threads)


@dataclass
class RunStats:
    """What the last run did: wall time and, per worker process, pairs scored, busy and CPU seconds."""

    seconds: float = 0.0
    shares: int = 0
    workers: dict[int, WorkerStats] = field(default_factory=dict)


class RayCalibrationPool:
    """``workers`` calibration actors on the connected cluster, each with ``threads`` torch threads."""

    def __init__(self, workers: int | None = None, threads: int | None = None, gpus_per_worker: float = 0.0):
        import ray
        import torch

        cpus = ray.cluster_resources().get("CPU", 1.0)
        self.threads = max(1, min(int(threads or torch.get_num_threads()), int(cpus) or 1))
        capacity = max(1, int(cpus // self.threads))
        if workers is not None and workers > capacity:
            raise ValueError(f"{workers} calibration workers of {self.threads} CPUs each do not fit the cluster's "
                             f"{cpus:g} CPUs (at most {capacity})")
        self.size = workers or capacity
        env = forwarded_env()
        env["OMP_NUM_THREADS"] = str(self.threads)
        actor = ray.remote(CalibrationWorker).options(num_cpus=self.threads, num_gpus=gpus_per_worker,
                                                      runtime_env={"env_vars": env})
        self.actors = [actor.remote(self.threads) for _ in range(self.size)]
        try:
            self.pids = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"Ray did not start {self.size} calibration workers ({self.threads} CPUs each) within "
                               f"{READY_TIMEOUT_S:.0f} s; the cluster has {cpus:g} CPUs") from None
        self.last = RunStats()

    def run(self, jobs: Sequence[CalibrationJob], prompts: list[str], seeds: tuple[int, ...],
            share: int | None = None) -> list[list[list[float]]]:
        """``vectors[j][p]`` for every job and prompt; ``share`` pairs per actor call (default:
        about two shares per worker, so a worker that finishes early takes another)."""
        import ray

        started = time.perf_counter()
        units = [(job, prompt) for job in jobs for prompt in prompts]
        if not units:
            return [[] for _ in jobs]
        share = share or max(1, math.ceil(len(units) / (2 * len(self.actors))))
        queue = deque(enumerate(units[i:i + share] for i in range(0, len(units), share)))
        results: dict[int, dict] = {}
        idle, pending = list(self.actors), {}
        seeds = tuple(int(s) for s in seeds)
        try:
            while queue or pending:
                while idle and queue:
                    index, chunk = queue.popleft()
                    actor = idle.pop()
                    pending[actor.score.remote(chunk, seeds)] = (index, actor)
                done, _ = ray.wait(list(pending), num_returns=1)
                index, actor = pending.pop(done[0])
                results[index] = ray.get(done[0])
                idle.append(actor)
        except ray.exceptions.RayTaskError as exc:  # the worker's own exception (e.g. MergeError), remote trace chained
            self._cancel(pending)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from exc
            raise
        except ray.exceptions.RayActorError:
            self._cancel(pending)
            _drop(self)
            raise
        stats = RunStats(seconds=time.perf_counter() - started, shares=len(results))
        for r in results.values():
            w = stats.workers.setdefault(r["pid"], WorkerStats())
            w.units += len(r["vectors"])
            w.seconds += r["seconds"]
            w.cpu_seconds += r["cpu_seconds"]
        self.last = stats
        flat = [v for i in range(len(results)) for v in results[i]["vectors"]]
        return [flat[j * len(prompts):(j + 1) * len(prompts)] for j in range(len(jobs))]

    @staticmethod
    def _cancel(pending: dict) -> None:
        import ray

        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:  # already finished, or the actor is gone
                pass

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []


_POOLS: dict[tuple, RayCalibrationPool] = {}


def _drop(pool: RayCalibrationPool) -> None:
    for key, value in list(_POOLS.items()):
        if value is pool:
            del _POOLS[key]
    pool.close()


def get_pool(workers: int | None = None, threads: int | None = None, gpus_per_worker: float = 0.0) -> RayCalibrationPool:
    """The pool for this cluster and shape, made once and kept (actors keep their engines warm)."""
    import ray
    import torch

    key = (ray.get_runtime_context().gcs_address, workers, threads or torch.get_num_threads(), gpus_per_worker)
    for other in [k for k in _POOLS if k[0] != key[0]]:  # a pool on a cluster this driver has left
        del _POOLS[other]
    if key not in _POOLS:
        _POOLS[key] = RayCalibrationPool(workers, threads, gpus_per_worker)
    return _POOLS[key]


def shutdown_pools() -> None:
    """Stop every calibration actor this driver started."""
    for pool in list(_POOLS.values()):
        _drop(pool)


def calibrate_on_ray(jobs: Sequence[CalibrationJob], prompts: list[str], seeds: tuple[int, ...] = (0,), *,
                     address: str, workers: int | None = None, gpus_per_worker: float = 0.0) -> list[list[list[float]]]:
    connect(address)
    return get_pool(workers, gpus_per_worker=gpus_per_worker).run(jobs, prompts, seeds)
