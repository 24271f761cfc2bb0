"""Real database and vector servers for tests, started by the test run and private to it.

- ``postgres_server``: a throwaway PostgreSQL cluster (initdb into a temporary directory) that
  listens on a unix socket only (``listen_addresses=''``), so it works inside the loopback-only
  network namespace CI runs in and never opens a TCP port. PostgreSQL refuses to run as root,
  so when the tests run as root (CI) the server runs as the ``postgres`` system user that
  Debian's package creates (``nobody`` if there is none); otherwise as the current user. The
  binaries come from Debian's ``postgresql`` package (.ci/run installs it) or any ``initdb``
  on PATH.
- ``chroma_server``: ``chroma run`` (the server shipped in the chromadb wheel) on 127.0.0.1,
  started from a config file with no ``open_telemetry`` section: the defaults behind
  ``chroma run --path`` export traces to an OTLP collector host, this config exports nothing
  (the server prints "No telemetry is configured.").
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PG_PORT = 5432  # names the socket file only: the server listens on no TCP port


class ServerUnavailable(RuntimeError):
    """The server's binaries are not on this machine."""


def postgres_bindir() -> Path | None:
    """A directory holding PostgreSQL's ``initdb`` and ``postgres``: DIFFGRAPH_TEST_PG_BINDIR,
    the one of ``initdb`` on PATH, or the newest /usr/lib/postgresql/<version>/bin (Debian
    keeps them off PATH)."""
    candidates = []
    if os.environ.get("DIFFGRAPH_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["DIFFGRAPH_TEST_PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name)
                                           if Path(p).parent.name.isdigit() else 0, reverse=True)]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    return None


def _unprivileged() -> dict:
    """Popen arguments that drop root for PostgreSQL (empty when not root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    raise ServerUnavailable("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def postgres_server():
    """Yields the URL of the cluster's ``postgres`` database as superuser ``postgres`` (trust
    authentication over the private socket). Raises ServerUnavailable without binaries."""
    import psycopg

    bindir = postgres_bindir()
    if bindir is None:
        raise ServerUnavailable("no PostgreSQL server binaries (initdb, postgres): apt-get install postgresql")
    drop = _unprivileged()
    # A short path: a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="dg-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    proc = None
    try:
        if drop:
            os.chown(root, drop["user"], drop["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "HOME": str(root)}
        data, log = root / "data", root / "server.log"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env, **drop)
        with open(log, "wb") as out:
            # durability off: a test cluster is thrown away; the catalog's behaviour does not change
            proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-k", str(root), "-p", str(PG_PORT),
                                     "-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off",
                                     "-c", "full_page_writes=off"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, **drop)
        url = f"postgresql://postgres@/postgres?host={root}&port={PG_PORT}"

        def ready() -> bool:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        _wait(ready, proc, log, "PostgreSQL")
        yield url
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
        shutil.rmtree(root, ignore_errors=True)


def chroma_executable() -> str:
    """The ``chroma`` CLI of the chromadb package in this interpreter's environment."""
    beside = Path(sys.executable).with_name("chroma")
    found = str(beside) if beside.exists() else shutil.which("chroma")
    if not found:
        raise ServerUnavailable("the chroma CLI (installed with the chromadb package) is not on this machine")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def chroma_server(directory: Path):
    """Yields (url, log path) of a Chroma server persisting into ``directory``."""
    import httpx

    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = directory / "chroma.yaml"
    config.write_text(f'persist_path: "{directory / "data"}"\nlisten_address: "127.0.0.1"\nport: {port}\n'
                      "# no open_telemetry section: the server exports no traces or metrics\n")
    # The server merges CHROMA_* variables into its config; none may switch telemetry back on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMA_")}
    log = directory / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([chroma_executable(), "run", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(ready, proc, log, "Chroma server")
        yield url, log
    finally:
        _stop(proc, signal.SIGTERM)
