"""Source specs as the CLI takes them, and opening the clients they name.

``civitai[:URL]`` and ``hf[:URL]`` (the real sites unless a URL is given), ``local:DIR``,
``url:MODEL_PAGE_URL`` and ``file:PATH`` (one expert, see single.py) are built in. Other kinds
come from the ``diffgraph.sources`` entry points: a name -> ``open(location, *, retry,
hub_port)``, a context manager yielding the kind's source clients (a plugin's hub served on a
loopback port and crawled through the Civitai and Hugging Face clients, say). Because such a
kind may start and stop a server,
:func:`open_sources` is a context manager for every spec.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import httpx

from diffgraph.graph_store.records import UsePolicy
from diffgraph.registry import Registry

from .base import Source, parse_time, scope_limit
from .civitai import CivitaiSource
from .hf import HFSource
from .http import RetryPolicy
from .local import LocalFolderSource
from .single import path_source, url_source

BUILT_IN = ("civitai", "hf", "local", "url", "file")
LOCAL_HASHES = "local_hashes.sqlite"  # under DIFFGRAPH_HOME: local files' sha256 by (path, size, mtime)
SOURCE_KINDS: Registry[Callable[..., AbstractContextManager[list[Source]]]] = Registry("diffgraph.sources", "source kind")


def kinds() -> list[str]:
    return [*BUILT_IN, *SOURCE_KINDS.names()]


# What a crawl of each hub lists, in the hub's own query words (after "?" in a spec).
SCOPES = {"civitai": ("types", "baseModels", "sort", "period", "limit", "nsfw", "since", "licence"),
          "hf": ("filter", "library", "base_model", "sort", "limit", "nsfw", "since", "licence")}


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # one of kinds()
    location: str | None = None  # base URL, folder, or whatever a registered kind takes
    scope: tuple[tuple[str, str], ...] = ()  # civitai / hf: what to list (SCOPES), e.g. (("types", "LORA"),)

    def __str__(self) -> str:
        text = f"{self.kind}:{self.location}" if self.location else self.kind
        return f"{text}?{urlencode(self.scope)}" if self.scope else text


def parse_source_spec(text: str) -> SourceSpec:
    """Parse a spec; raise ValueError with a one-line message saying what is accepted. A
    Civitai or Hugging Face spec may end in a scope, in the site's own query words:
    ``civitai?types=LORA&baseModels=SD 1.5,SDXL 1.0&sort=Most Downloaded&limit=500``."""
    kind = re.split(r"[:?]", text.strip(), maxsplit=1)[0].lower()
    if kind not in SCOPES:  # a url: or file: spec keeps its "?" (a model page's query, a file name)
        return _parse_head(text)
    head, _, query = text.strip().partition("?")
    spec = _parse_head(head)
    if not query:
        return spec
    scope = parse_qsl(query, keep_blank_values=False, separator="&")
    unknown = sorted({k for k, _ in scope} - set(SCOPES[spec.kind]))
    if unknown:
        raise ValueError(f"source {text!r}: unknown scope {', '.join(unknown)}; {spec.kind} takes "
                         f"{', '.join(SCOPES[spec.kind])}")
    _check_scope(text, dict(scope))
    return SourceSpec(spec.kind, spec.location, tuple(scope))


def _check_scope(text: str, scope: dict[str, str]) -> None:
    """Values that would otherwise fail only once the listing starts, refused up front."""
    try:
        UsePolicy.parse(scope.get("licence"), scope.get("nsfw"))
        scope_limit(scope.get("limit"))
        if scope.get("since"):
            parse_time(scope["since"])
    except ValueError as exc:
        raise ValueError(f"source {text!r}: {exc}") from None


def with_scope(spec: SourceSpec, **fields: str | None) -> SourceSpec:
    """``spec`` with the scope fields given (command-line flags) set, over the spec's own."""
    given = {k: v for k, v in fields.items() if v is not None and k in SCOPES.get(spec.kind, ())}
    if not given:
        return spec
    return SourceSpec(spec.kind, spec.location, tuple({**dict(spec.scope), **given}.items()))


def _parse_head(text: str) -> SourceSpec:
    kind, sep, location = text.strip().partition(":")
    kind, location = kind.lower(), location.strip() or None
    usage = "expected civitai[:URL], hf[:URL], local:DIR, url:MODEL_PAGE, file:PATH" + "".join(
        f", {name}[:LOCATION]" for name in SOURCE_KINDS.names())
    if kind not in kinds():
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
def open_sources(spec: str | SourceSpec, *, retry: RetryPolicy | None = None, hub_port: int = 0,
                 home: Path | None = None, allowed_hosts: tuple[str, ...] | None = None) -> Iterator[list[Source]]:
    """The source clients a spec names, closed (and a registered kind's server stopped) on exit.
    ``home`` (DIFFGRAPH_HOME) keeps a local folder's hash cache across runs; ``allowed_hosts``
    (DIFFGRAPH_ALLOWED_HOSTS when None) may be inside the network (destinations.py).

    ``hub_port`` pins the port of a kind that serves its own hub (DIFFGRAPH_HUB_PORT), so the
    URLs it publishes (and the catalog stores) are the same from one crawl to the next; 0 takes
    any free port."""
    spec = parse_source_spec(spec) if isinstance(spec, str) else spec
    with ExitStack() as stack:
        if spec.kind == "civitai":
            sources: list[Source] = [CivitaiSource(spec.location, retry=retry, scope=dict(spec.scope),
                                                   allowed_hosts=allowed_hosts)]
        elif spec.kind == "hf":
            sources = [HFSource(spec.location, retry=retry, scope=dict(spec.scope), allowed_hosts=allowed_hosts)]
        elif spec.kind == "local":
            sources = [LocalFolderSource(spec.location, hash_cache=home / LOCAL_HASHES if home else None)]
        elif spec.kind in ("url", "file"):

            sources = [url_source(spec.location, retry, allowed_hosts) if spec.kind == "url"
                       else path_source(spec.location)]
        else:
            opener = SOURCE_KINDS.get(spec.kind)
            sources = list(stack.enter_context(opener(spec.location, retry=retry, hub_port=hub_port)))
        for source in sources:
            stack.callback(source.close)
        yield sources
