"""One settings object, read from environment variables that all start with DIFFGRAPH_.

Every component takes its paths and endpoints from here, so a test or a deployment changes
behaviour by setting variables rather than by editing code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "DIFFGRAPH_"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :func:`get_settings`."""

    home: Path
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout: float = 60.0  # seconds per LLM request
    llm_retries: int = 2  # retries of a failed LLM request before the offline brain answers
    chroma_url: str | None = None
    db_url: str | None = None
    ray_address: str | None = None  # calibration fans out over this Ray cluster when set
    ray_workers: int | None = None  # calibration actors on it (default: its CPUs / torch threads)
    ray_gpus_per_worker: float = 0.0  # > 0: each calibration actor reserves this share of a GPU and renders on it
    device: str = "auto"
    allow_pickle: bool = False
    reference_prompts: int = 12  # N_r, reference prompts chosen when a graph is first built
    hub_port: int = 8765  # of a source kind serving its own hub; fixed, so the URLs the catalog stores stay valid
    base: str | None = None  # the base model to generate with when a command or request names none
    max_store_bytes: int | None = None  # DIFFGRAPH_MAX_STORE_GB: what the downloaded files may take in all
    nsfw: str = "false"  # DIFFGRAPH_NSFW: "true" lets NSFW experts be retrieved (graph_store.records.UsePolicy)
    licence: str = ""  # DIFFGRAPH_LICENCE: terms every retrieved expert's licence must grant ("commercial,derivatives")
    api_keys: str = ""  # DIFFGRAPH_API_KEYS: "KEY" (generate) and "KEY:admin", comma-separated (agents/auth.py)
    rate_limit: int = 60  # DIFFGRAPH_RATE_LIMIT: requests a minute per API key, and chat turns per UI login and address
    # DIFFGRAPH_SERVER_HOSTS: the names clients reach `serve` by (its Host header), besides loopback and the bind
    # address; a request naming any other host is refused, so no web page can rebind its own name to this server
    # (agents/auth.HostCheck). Not DIFFGRAPH_ALLOWED_HOSTS, which says where the crawler may fetch from.
    server_hosts: tuple[str, ...] = ()
    gca_checkpoints: int = 20  # checkpoints a GCA pass keeps of its thread (0: all); one suffices to resume
    allowed_hosts: tuple[str, ...] = ()  # DIFFGRAPH_ALLOWED_HOSTS: hosts inside the network sources may fetch from
    page_hosts: tuple[str, ...] = ()  # hosts (host or host:port) whose homepages the GCA may read besides the sources' own

    @property
    def artifacts_dir(self) -> Path:
        """Where images and downloaded/cached files of this home live."""
        return self.home / "outputs"

    @property
    def torch_device(self) -> str:
        """CUDA when present unless the user pinned a device."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def get_settings() -> Settings:
    """Read the environment now (not at import), so tests can set variables per test."""
    home = Path(_env("HOME", str(Path.home() / ".diffgraph"))).expanduser()
    return Settings(
        home=home,
        llm_base_url=_env("LLM_BASE_URL"),
        llm_model=_env("LLM_MODEL"),
        llm_api_key=_env("LLM_API_KEY"),
        llm_timeout=float(_env("LLM_TIMEOUT", "60")),
        llm_retries=int(_env("LLM_RETRIES", "2")),
        chroma_url=_env("CHROMA_URL"),
        db_url=_env("DB_URL"),
        ray_address=_env("RAY_ADDRESS"),
        ray_workers=int(_env("RAY_WORKERS")) if _env("RAY_WORKERS") else None,
        ray_gpus_per_worker=float(_env("RAY_GPUS_PER_WORKER", "0")),
        device=_env("DEVICE", "auto"),
        allow_pickle=_env("ALLOW_PICKLE", "0") in ("1", "true", "yes"),
        hub_port=int(_env("HUB_PORT", "8765")),
        reference_prompts=int(_env("REFERENCE_PROMPTS", "12")),
        base=_env("BASE"),
        max_store_bytes=round(float(_env("MAX_STORE_GB")) * 2**30) if _env("MAX_STORE_GB") else None,
        nsfw=_env("NSFW", "false"),
        licence=_env("LICENCE", ""),
        api_keys=_env("API_KEYS", ""),
        rate_limit=int(_env("RATE_LIMIT", "60")),
        server_hosts=tuple(h.strip().lower() for h in (_env("SERVER_HOSTS") or "").split(",") if h.strip()),
        gca_checkpoints=int(_env("GCA_CHECKPOINTS", "20")),
        allowed_hosts=tuple(h.strip().lower() for h in (_env("ALLOWED_HOSTS") or "").split(",") if h.strip()),
        page_hosts=tuple(h.strip().lower() for h in (_env("PAGE_HOSTS") or "").split(",") if h.strip()),
    )
