"""A client for the Civitai REST API v1 (https://developer.civitai.com/docs/api/public-rest).

It walks ``/api/v1/models`` with cursor pagination and turns each model into one
ExpertRecord: the model's newest version that passes the filters (Civitai lists versions
newest first). One record per model, not per version, because the record's id is the model
("civitai:<modelId>") and a newer version replaces its predecessor in the graph; yielding
every version would let an old one overwrite the new. Only LoRA-like and checkpoint types
map to experts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffgraph.graph_store.records import ExpertFile, ExpertRecord

from .base import Since, as_utc, newest, scope_limit, scope_words
from .download import ContentStore
from .errors import ApiError
from .http import HubSource

DEFAULT_URL = "https://civitai.com"
TOKEN_ENV = "DIFFGRAPH_CIVITAI_TOKEN"
KINDS = {"LORA": "lora", "LoCon": "lora", "DoRA": "lora", "Checkpoint": "ckpt"}
MODEL_FILE_TYPES = {"Model", "Pruned Model"}  # not "Training Data", "Config", "VAE", ...
LICENSE_FIELDS = ("allowNoCredit", "allowCommercialUse", "allowDerivatives", "allowDifferentLicense")
log = logging.getLogger(__name__)


class CivitaiSource(HubSource):
    """Civitai at ``base_url`` (the real site by default). The API token is ``token``, or
    DIFFGRAPH_CIVITAI_TOKEN when ``token`` is None ("" sends none); it goes as a Bearer
    header to that host only."""

    name = "civitai"
    default_url = DEFAULT_URL
    token_env = TOKEN_ENV

    def iter_models(self, *, types: Iterable[str] | None = None, base_models: Iterable[str] | None = None,
                    since: Since = None, limit: int | None = None, page_size: int = 100) -> Iterator[ExpertRecord]:
        """Every model of the given Civitai ``types`` (and ``base_models``, if given) whose
        newest matching version was published or updated at or after ``since``, at most
        ``limit`` of them, that the scope's use policy admits (``nsfw``, ``licence``: checked
        here on each record too, since the API's own filter is not everywhere the same). Unset
        arguments come from the source's scope (its spec's ``?types=LORA,Checkpoint&baseModels=
        SD 1.5&sort=Most Downloaded&period=AllTime&limit=500&nsfw=false&licence=commercial
        &since=2024-01-01``); the defaults are LoRAs and checkpoints, newest first, SFW only."""
        scope, policy = self.scope, self.policy()
        types = list(types) if types is not None else scope_words(scope.get("types")) or ["LORA", "Checkpoint"]
        bases = set(base_models) if base_models is not None else set(scope_words(scope.get("baseModels")))
        limit = self.listing_limit(limit if limit is not None else scope_limit(scope.get("limit")))
        since = as_utc(since if since is not None else scope.get("since"))
        if unknown := [t for t in types if t not in KINDS]:
            raise ValueError(f"civitai: {', '.join(unknown)} not an expert type; use {', '.join(KINDS)}")
        params = [("limit", min(page_size, limit or page_size)), ("sort", scope.get("sort") or "Newest"),
                  ("nsfw", scope.get("nsfw") or "false")]
        params += [("period", scope["period"])] if scope.get("period") else []
        params += [("types", t) for t in types] + [("baseModels", b) for b in sorted(bases)]
        yielded = 0
        for model in self._walk(params):
            if limit is not None and yielded >= limit:
                return
            try:
                version = self._pick_version(model, bases, since) if model.get("type") in types else None
                record = self.record(model, version) if version is not None else None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("civitai: skipping a malformed model: %s: %s", type(exc).__name__, exc)
                continue
            if record is not None and self.admitted(record, policy):
                yielded += 1
                yield record

    def _walk(self, params: list) -> Iterator[dict]:
        """Items of every page. A cursor goes back to our own endpoint with our parameters;
        a bare ``nextPage`` is followed only on the API's own origin (it would get the token)."""
        url, query, seen = "/api/v1/models", params, set()
        while True:
            page, _ = self.api.get_json(url, query)
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise ApiError(f"civitai: GET {url} answered no 'items' list")
            yield from page["items"]
            metadata = page.get("metadata") or {}
            if metadata.get("nextCursor"):
                url, query = "/api/v1/models", params + [("cursor", str(metadata["nextCursor"]))]
            elif metadata.get("nextPage"):
                url, query = str(metadata["nextPage"]), None
                if not self.api.same_origin(url):
                    raise ApiError(f"civitai: refusing to follow nextPage to another host: {url}")
            else:
                return
            if (url, str(query)) in seen:
                raise ApiError(f"civitai: pagination does not advance ({url})")
            seen.add((url, str(query)))

    @staticmethod
    def _pick_version(model: dict, bases: set[str], since) -> dict | None:
        for version in model.get("modelVersions") or []:
            if bases and version.get("baseModel") not in bases:
                continue
            changed = newest(version.get("publishedAt"), version.get("updatedAt"), version.get("createdAt"))
            if since is not None and (changed is None or changed < since):
                return None  # the newest matching version is older: nothing new in this model
            return version
        return None

    def record(self, model: dict, version: dict) -> ExpertRecord:
        """One model version as an ExpertRecord, in Civitai's v1 field names."""
        model_id = model["id"]
        return ExpertRecord(
            source=self.name, source_id=str(model_id), version=str(version["id"]),
            name=str(model.get("name") or model_id), kind=KINDS[model["type"]],
            base_model=str(version.get("baseModel") or "unknown"),
            files=_primary_file(version.get("files") or []),
            homepage_url=f"{self.base_url}/models/{model_id}/{_slug(str(model.get('name', '')))}",
            trigger_words=[w for w in version.get("trainedWords") or [] if isinstance(w, str)],
            tags=[t["name"] if isinstance(t, dict) else str(t) for t in model.get("tags") or []],
            license={k: model[k] for k in LICENSE_FIELDS if k in model},
            published_at=version.get("publishedAt") or version.get("createdAt"),
            source_description=str(model.get("description") or ""),
            nsfw_level=nsfw_level(model, version),
        )

    def download(self, file: ExpertFile, store: ContentStore) -> Path:
        return store.fetch(file, self.api.client, self.api.retry)

    def close(self) -> None:
        self.api.close()


def nsfw_level(model: dict, version: dict) -> int:
    """Civitai's browsing level of the version (else the model's): bits 1 PG, 2 PG-13, 4 R, 8 X,
    16 XXX; a model flagged ``nsfw`` with no level counts as R."""
    for level in (version.get("nsfwLevel"), model.get("nsfwLevel")):
        if isinstance(level, int) and not isinstance(level, bool) and level > 0:
            return level
    return 4 if model.get("nsfw") is True else 0


def _primary_file(files: list) -> list[ExpertFile]:
    """The version's one model file: the one Civitai marks primary, else its first model file.
    A version's other files are other precisions, pruned copies, training data or configs: the
    expert is one model, merged from one file, and nothing else is downloaded."""
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        raise TypeError("a version's files must be a list of objects")  # a malformed model: skipped
    models = [f for f in files if f.get("type", "Model") in MODEL_FILE_TYPES]
    chosen = next((f for f in models if f.get("primary")), models[0] if models else None)
    return [_file(chosen)] if chosen is not None else []


def _file(f: dict) -> ExpertFile:
    sha256 = (f.get("hashes") or {}).get("SHA256")
    size_kb = f.get("sizeKB")
    return ExpertFile(name=str(f.get("name", "")), url=str(f.get("downloadUrl", "")),
                      sha256=sha256.lower() if isinstance(sha256, str) else None,
                      size=round(size_kb * 1024) if isinstance(size_kb, (int, float)) else None,
                      primary=bool(f.get("primary", True)))


def _slug(name: str) -> str:
    """Civitai's decorative URL slug: lower-case words joined by dashes (the id decides)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
