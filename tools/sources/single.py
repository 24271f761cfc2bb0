"""One expert named by a URL or a path: what "add this expert" crawls, instead of a whole site.

``url:URL`` takes a Civitai model page (``https://HOST/models/<id>[/slug]``) or a Hugging Face
repo page (``https://HOST/<owner>/<repo>``) and asks that host's API for just that model;
``file:PATH`` takes a weights file (with its sidecars) or a folder of them. The source lists
only what was named, so it sets ``sweeps = False``: a GCA pass over it never marks the other
experts of the same site as removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx

from diffgraph.graph_store.records import ExpertRecord

from .civitai import CivitaiSource
from .download import ContentStore
from .errors import ApiError
from .hf import HFSource
from .local import LocalFolderSource

REAL_HOSTS = {"civitai": ("civitai.com", "www.civitai.com"), "hf": ("huggingface.co", "www.huggingface.co")}
_CIVITAI_PAGE = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
_HF_PAGE = re.compile(r"^/([A-Za-z0-9][\w.-]*)/([\w.-]+?)(?:/(?:tree|blob|resolve)/.*)?/?$")


class OneModelSource:
    """A source client limited to the records given (the inner client downloads and closes)."""

    sweeps = False

    def __init__(self, inner, records: list[ExpertRecord]):
        self.inner, self.records = inner, list(records)
        self.name = inner.name

    @property
    def base_url(self) -> str | None:
        return getattr(self.inner, "base_url", None)

    def iter_models(self, **_) -> Iterator[ExpertRecord]:
        yield from self.records

    def download(self, file, store: ContentStore) -> Path:
        return self.inner.download(file, store)

    def close(self) -> None:
        self.inner.close()


def parse_model_url(url: str) -> tuple[str, str, str]:
    """(site, origin, model id or repo id) of a Civitai model page or a Hugging Face repo page;
    ValueError (one line, saying what is accepted) for anything else."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL")
    origin = f"{parsed.scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else "")
    if m := _CIVITAI_PAGE.match(parsed.path):
        return "civitai", origin, m.group(1)
    if parsed.host in REAL_HOSTS["civitai"]:
        raise ValueError(f"{url!r} is not a Civitai model page (https://civitai.com/models/<id>)")
    if (m := _HF_PAGE.match(parsed.path)) and m.group(1) not in ("api", "models", "images", "spaces", "datasets"):
        return "hf", origin, f"{m.group(1)}/{m.group(2)}"
    raise ValueError(f"{url!r} is neither a Civitai model page (/models/<id>) nor a Hugging Face repo (/<owner>/<repo>)")


def url_source(url: str, retry=None, allowed_hosts=None) -> OneModelSource:
    """The one model a page URL names, fetched from its host's API (a token is sent only to the
    real sites, never to another host)."""
    site, origin, model_id = parse_model_url(url)
    token = None if httpx.URL(origin).host in REAL_HOSTS[site] else ""
    if site == "civitai":
        client = CivitaiSource(origin, token=token, retry=retry, allowed_hosts=allowed_hosts)
        try:
            model, _ = client.api.get_json(f"/api/v1/models/{model_id}", None)
            version = client._pick_version(model, set(), None) if isinstance(model, dict) else None
            if version is None:
                raise ApiError(f"civitai: model {model_id} has no published version")
            return OneModelSource(client, [client.record(model, version)])
        except BaseException:
            client.close()
            raise
    client = HFSource(origin, token=token, retry=retry, allowed_hosts=allowed_hosts)
    try:
        info, _ = client.api.get_json(f"/api/models/{model_id}", {"blobs": "true"})
        record = client.record(info) if isinstance(info, dict) else None
        if record is None or not record.files:
            raise ApiError(f"hf: {model_id} has no weights file")
        return OneModelSource(client, [record])
    except BaseException:
        client.close()
        raise


def path_source(path: str | Path) -> OneModelSource:
    """A weights file (with its sidecars) or every weights file under a folder."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        folder = LocalFolderSource(path)
        return OneModelSource(folder, list(folder.iter_models()))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    folder = LocalFolderSource(path.parent)
    from datetime import datetime, timezone

    changed = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return OneModelSource(folder, [folder.record(path, changed)])
