"""A client for the Hugging Face Hub API (https://huggingface.co/docs/hub/api).

It lists repos with ``/api/models`` (filters are Hub tags; pages follow the ``Link: rel="next"``
header), then reads each repo's ``/api/models/{repo}?blobs=true`` for what the listing lacks:
the model card's YAML (``cardData``: base model, trigger words, licence), the commit ``sha``
that versions the repo, and each LFS file's sha256. Listing newest-modified first lets an
incremental run stop at the first repo older than ``since`` instead of walking the Hub.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from diffgraph.families import base_family
from diffgraph.graph_store.records import ExpertFile, ExpertRecord

from .base import Since, as_utc, newest, scope_limit, scope_words
from .download import PICKLE_SUFFIXES, ContentStore
from .errors import ApiError
from .http import HubSource

DEFAULT_URL = "https://huggingface.co"
TOKEN_ENV = "DIFFGRAPH_HF_TOKEN"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LORA_NAME = re.compile(r"(^|[^a-z])lora([^a-z]|$)")  # "pytorch_lora_weights", not "floral"
log = logging.getLogger(__name__)


class HFSource(HubSource):
    """The Hub at ``base_url`` (the real one by default). The token is ``token``, or
    DIFFGRAPH_HF_TOKEN when ``token`` is None ("" sends none); it goes as a Bearer header to
    that host only."""

    name = "hf"
    default_url = DEFAULT_URL
    token_env = TOKEN_ENV

    def iter_models(self, *, filter_tags: Iterable[str] | None = None, base_model: str | None = None,
                    since: Since = None, limit: int | None = None, page_size: int = 100) -> Iterator[ExpertRecord]:
        """Every repo carrying all ``filter_tags`` (and fine-tuned from ``base_model``, if
        given) last modified at or after ``since``, with at least one weights file, at most
        ``limit`` of them. Unset arguments come from the source's scope (its spec's
        ``?filter=lora&library=diffusers&base_model=...&sort=downloads&limit=...``); the
        default is text-to-image repos, most recently modified first. The scope's use policy
        (``licence``, and ``nsfw``: SFW only unless ``nsfw=true``) is applied to each record."""
        scope, policy = self.scope, self.policy()
        tags = list(filter_tags) if filter_tags is not None else scope_words(scope.get("filter")) or ["text-to-image"]
        tags += scope_words(scope.get("library"))
        base_model = base_model or scope.get("base_model") or None
        limit = self.listing_limit(limit if limit is not None else scope_limit(scope.get("limit")))
        sort = scope.get("sort") or "lastModified"
        since = as_utc(since if since is not None else scope.get("since"))
        tags = [*tags, *([f"base_model:{base_model}"] if base_model else [])]
        params = [("filter", t) for t in tags] + [
            ("sort", sort), ("direction", "-1"), ("limit", min(page_size, limit or page_size)),
            ("expand", "lastModified"), ("expand", "sha")]
        yielded = 0
        for item in self._walk(params):
            if limit is not None and yielded >= limit:
                return
            listed = newest(item.get("lastModified"))
            if since is not None and listed is not None and listed < since:
                if sort == "lastModified":
                    return  # newest first: every later repo is older still
                continue
            repo_id = str(item.get("id", ""))
            if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
                log.warning("hf: skipping a repo with an unusable id %r", repo_id)
                continue
            info, _ = self.api.get_json(f"/api/models/{repo_id}", {"blobs": "true"})
            changed = newest(info.get("lastModified")) if isinstance(info, dict) else None
            if since is not None and (changed is None or changed < since):
                continue
            try:
                record = self.record(info)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("hf: skipping malformed model info of %s: %s: %s", repo_id, type(exc).__name__, exc)
                continue
            if base_model and record.base_model != base_family(base_model):
                continue
            if record.files and self.admitted(record, policy):
                yielded += 1
                yield record

    def _walk(self, params: list) -> Iterator[dict]:
        """Items of every page; the next page's URL (from the Link header) is followed only on
        the API's own origin."""
        url, query, seen = "/api/models", params, set()
        while True:
            items, response = self.api.get_json(url, query)
            if not isinstance(items, list):
                raise ApiError(f"hf: GET {url} answered no list of models")
            yield from items
            next_url = response.links.get("next", {}).get("url")
            if not next_url:
                return
            if not self.api.same_origin(next_url):
                raise ApiError(f"hf: refusing to follow the next page to another host: {next_url}")
            if next_url in seen:
                raise ApiError(f"hf: pagination does not advance ({next_url})")
            seen.add(next_url)
            url, query = next_url, None

    def record(self, info: dict) -> ExpertRecord:
        """A repo's model info (``?blobs=true``) as an ExpertRecord at its current commit."""
        repo_id, sha = str(info["id"]), str(info.get("sha") or "main")
        card = info.get("cardData") or {}
        files = _weight_files(info.get("siblings") or [])
        tags = [str(t) for t in (card.get("tags") or info.get("tags") or [])]
        lora = "lora" in {t.lower() for t in [*tags, *(info.get("tags") or [])]} or any(
            _LORA_NAME.search(PurePosixPath(s["rfilename"]).name.lower()) for s in files)
        base = card.get("base_model")
        base = base[0] if isinstance(base, list) and base else base
        words = card.get("instance_prompt")
        return ExpertRecord(
            source=self.name, source_id=repo_id, version=sha, name=repo_id,
            kind="lora" if lora else "ckpt", base_model=str(base or "unknown"),
            files=[self._file(repo_id, sha, s, primary) for s, primary in _with_primary(files)],
            homepage_url=f"{self.base_url}/{repo_id}",
            trigger_words=[w.strip() for w in words.split(",") if w.strip()] if isinstance(words, str) else [],
            tags=tags,
            license={k: card[k] for k in ("license", "license_name", "license_link") if card.get(k)},
            published_at=info.get("lastModified") or info.get("createdAt"),
            nsfw_level=4 if NSFW_TAG in {t.lower() for t in [*tags, *(info.get("tags") or [])]} else 0,
        )

    def _file(self, repo_id: str, sha: str, sibling: dict, primary: bool) -> ExpertFile:
        name = sibling["rfilename"]
        lfs = sibling.get("lfs") or {}
        return ExpertFile(name=name, url=f"{self.base_url}/{repo_id}/resolve/{sha}/{quote(name)}",
                          sha256=str(lfs["sha256"]).lower() if lfs.get("sha256") else None,
                          size=lfs.get("size", sibling.get("size")), primary=primary)

    def download(self, file: ExpertFile, store: ContentStore) -> Path:
        return store.fetch(file, self.api.client, self.api.retry)

    def close(self) -> None:
        self.api.close()


def _weight_files(siblings: list[dict]) -> list[dict]:
    """The repo's .safetensors files; only when it has none, its pickle weights (so a
    pickle-only expert is seen, and refused with a reason, rather than silently missed)."""
    named = [s for s in siblings if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]
    safetensors = [s for s in named if s["rfilename"].lower().endswith(".safetensors")]
    return safetensors or [s for s in named if PurePosixPath(s["rfilename"]).suffix.lower() in PICKLE_SUFFIXES]


NSFW_TAG = "not-for-all-audiences"  # the Hub's flag for adult content
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"  # the name diffusers' trainers save a LoRA under


def _with_primary(files: list[dict]) -> list[tuple[dict, bool]]:
    """The expert's file: one top-level weights file (diffusers' LoRA name first, else the
    first listed), since a repo's other top-level files are other epochs or precisions of it.
    A repo with none at the top level is a diffusers layout, whose files are all its parts."""
    top = [s for s in files if "/" not in s["rfilename"]]
    if not top:
        return [(s, True) for s in files]
    chosen = next((s for s in top if PurePosixPath(s["rfilename"]).name == DIFFUSERS_LORA), top[0])
    return [(chosen, True)]
