"""Source specs as the CLI takes them, and opening the clients they name.

``civitai[:URL]`` and ``hf[:URL]`` (the real sites unless a URL is given), ``local:DIR``,
``url:MODEL_PAGE_URL`` and ``file:PATH`` (one expert, see single.py), and
``miniworld[:ARTIFACTS_DIR]``: the bundled hub started on a free loopback port and crawled
through both the Civitai and the Hugging Face client, so the mini world exercises exactly the
code that runs against the real sites. Because that hub must stop afterwards,
:func:`open_sources` is a context manager for every spec.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .base import Source
from .civitai import CivitaiSource
from .hf import HFSource
from .http import RetryPolicy
from .local import LocalFolderSource

KINDS = ("civitai", "hf", "local", "miniworld", "url", "file")


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # one of KINDS
    location: str | None = None  # base URL, folder, or mini-world artifacts folder

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" if self.location else self.kind


def parse_source_spec(text: str) -> SourceSpec:
    """Parse a spec; raise ValueError with a one-line message saying what is accepted."""
    kind, sep, location = text.strip().partition(":")
    kind, location = kind.lower(), location.strip() or None
    usage = "expected civitai[:URL], hf[:URL], local:DIR, url:MODEL_PAGE, file:PATH or miniworld[:DIR]"
    if kind not in KINDS:
        raise ValueError(f"unknown source {text!r}; {usage}")
    if sep and location is None:
        raise ValueError(f"source {text!r} has an empty location; {usage}")
    if kind == "local" and location is None:
        raise ValueError(f"source {text!r} needs a folder: local:DIR")
    if kind in ("local", "url", "file") and location is None:
        raise ValueError(f"source {text!r} needs a location; {usage}")
    if kind in ("civitai", "hf", "url") and location is not None:
        try:
            url = httpx.URL(location)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"source {text!r}: {location!r} is not an http(s) URL")
    return SourceSpec(kind, location)


@contextmanager
def open_sources(spec: str | SourceSpec, *, retry: RetryPolicy | None = None, hub_port: int = 0) -> Iterator[list[Source]]:
    """The source clients a spec names, closed (and the mini-world hub stopped) on exit.

    ``hub_port`` pins the mini-world hub's port, so the URLs it publishes (and the catalog
    stores) are the same from one crawl to the next; 0 takes any free port."""
    spec = parse_source_spec(spec) if isinstance(spec, str) else spec
    with ExitStack() as stack:
        if spec.kind == "civitai":
            sources: list[Source] = [CivitaiSource(spec.location, retry=retry)]
        elif spec.kind == "hf":
            sources = [HFSource(spec.location, retry=retry)]
        elif spec.kind == "local":
            sources = [LocalFolderSource(spec.location)]
        elif spec.kind in ("url", "file"):
            from .single import path_source, url_source

            sources = [url_source(spec.location, retry) if spec.kind == "url" else path_source(spec.location)]
        else:
            from diffgraph.miniworld.hub import running_hub

            hub = stack.enter_context(running_hub(Path(spec.location) if spec.location else None, port=hub_port))
            sources = [CivitaiSource(hub.civitai_url, token="", retry=retry),
                       HFSource(hub.hf_url, token="", retry=retry)]
        for source in sources:
            stack.callback(source.close)
        yield sources
