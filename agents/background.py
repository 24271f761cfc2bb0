"""A background GCA run for the chat agent and the server: a thread running ``gca.watch``.

One per process (the GCA's own file lock also keeps two processes from writing one home at
once). Stopping takes effect between passes: a pass in progress finishes, and an interrupted
pass would resume anyway, since passes are checkpointed.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console

from diffgraph.settings import Settings
from diffgraph.tools.sources import parse_source_spec

from .gca import watch


@dataclass
class _Run:
    specs: list[str]
    interval_s: float
    started: float
    thread: threading.Thread
    stop: threading.Event
    log: io.StringIO = field(default_factory=io.StringIO)


class BackgroundGCA:
    def __init__(self):
        self._run: _Run | None = None
        self._lock = threading.Lock()

    def start(self, specs: list[str], interval_s: float, settings: Settings | None = None) -> dict:
        """Start watching ``specs`` (a pass now, then every ``interval_s``); ValueError if one
        runs already or a spec is malformed."""

        for spec in specs:
            parse_source_spec(spec)
        if interval_s < 1:
            raise ValueError("the interval must be at least one second")
        with self._lock:
            if self.running:
                raise ValueError(f"a background GCA run is already going ({' '.join(self._run.specs)}); stop it first")
            stop = threading.Event()
            log = io.StringIO()
            console = Console(file=log, width=120, force_terminal=False, color_system=None)
            thread = threading.Thread(target=watch, name="diffgraph-gca", daemon=True,
                                      kwargs={"specs": list(specs), "interval_s": interval_s, "console": console,
                                              "settings": settings, "stop": stop})
            self._run = _Run(list(specs), interval_s, time.time(), thread, stop, log)
            thread.start()
        return self.status()

    def stop(self, wait_s: float = 0.0) -> dict:
        """Ask the run to stop (it ends after the pass in progress); wait up to ``wait_s``."""
        with self._lock:
            run = self._run
        if run is None or not run.thread.is_alive():
            return {**self.status(), "message": "no background GCA run is going"}
        run.stop.set()
        run.thread.join(timeout=wait_s)
        status = self.status()
        status["message"] = ("stopped" if not run.thread.is_alive()
                             else "stopping: the pass in progress finishes first, then the run ends")
        return status

    @property
    def running(self) -> bool:
        return self._run is not None and self._run.thread.is_alive()

    def status(self) -> dict:
        run = self._run
        if run is None:
            return {"running": False}
        lines = run.log.getvalue().splitlines()
        return {"running": run.thread.is_alive(), "stopping": run.stop.is_set() and run.thread.is_alive(),
                "sources": run.specs, "interval_s": run.interval_s,
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started)),
                "passes": sum(1 for line in lines if line.startswith(("pass ", "pass failed", "skipped a pass"))),
                "log_tail": lines[-8:]}


BACKGROUND = BackgroundGCA()


def parse_interval(text: str | float | int) -> float:
    """'30m', '1h', '1d', '45s' or seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise ValueError(f"an interval like 30m, 1h or 3600, not {text!r}") from None
