"""The mini world's local hub: a loopback stand-in for Civitai and the Hugging Face Hub.

The source clients are written against the real services, so this server copies their wire
formats (paths, field names, pagination, hash formats, download headers, error bodies) closely
enough that a client runs against it unchanged; the real sites are the spec, this is the fake.

- Civitai REST v1: ``/api/v1/models`` (cursor pagination via ``metadata.nextCursor`` and
  ``metadata.nextPage``), ``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}``,
  ``/api/v1/model-versions/by-hash/{hash}``, ``/api/download/models/{versionId}`` and the model
  page ``/models/{id}/{slug}``. Only experts with ``site == "civitai"``.
- Hugging Face Hub: ``/api/models`` (pagination via the ``Link: <...>; rel="next"`` header),
  ``/api/models/{repo}[/revision/{rev}]``, ``/api/models/{repo}/tree/{rev}``,
  ``/{repo}/resolve/{rev}/{file}`` and the model page ``/{repo}``. Only ``site == "hf"``.

Downloads honour Range requests, so resumable clients can be tested. A test can publish one
expert more or less (``add_expert``/``remove_expert``) and make the next responses on a path
fail (``inject_fault``), and can read what clients asked for (``requests``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property
from http import HTTPStatus
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from diffgraph.safetensors_header import read_header

from . import ARTIFACTS, homepages
from .experts import EXPERTS, ExpertSpec

HF_OWNER = "miniworld"
CIVITAI_CREATOR = "miniworld"
CIVITAI_TYPES = {"lora": "LORA", "ckpt": "Checkpoint"}
CIVITAI_VERSION_NAME = "v1.0"
CHUNK = 64 * 1024
_DTYPE_FP = (("F32", "fp32"), ("BF16", "bf16"), ("F16", "fp16"))  # widest first
_CIVITAI_ALL_TYPES = {"Checkpoint", "TextualInversion", "Hypernetwork", "AestheticGradient", "LORA", "LoCon",
                      "DoRA", "Controlnet", "Poses", "VAE", "Upscaler", "MotionModule", "Wildcards",
                      "Workflows", "Other"}
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.ckpt filter=lfs diff=lfs merge=lfs -text\n"


class BadRequest(Exception):
    """A malformed query; answered with 400 and a ``{"error": ...}`` body as Civitai does."""


class HfNotFound(Exception):
    """A missing repo, revision or file; answered as the Hub does, with 404 and the reason in
    X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub reads."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- published experts

@dataclass(frozen=True, eq=False)
class HubExpert:
    """One published expert: its spec, its manifest entry, the file served, and everything the
    two sites derive from them (ids, hashes, names, dates), computed once on first use."""

    spec: ExpertSpec
    entry: dict
    path: Path
    base_model: str
    page: tuple[int, str] | None = None  # (HTTP status, HTML) served instead of the generated homepage

    @property
    def slug(self) -> str:
        return self.spec.slug

    @property
    def sha256(self) -> str:
        return self.entry["sha256"]

    @cached_property
    def model_id(self) -> int:
        return _stable_int(f"model/{self.slug}", 100_000, 800_000)

    @cached_property
    def version_id(self) -> int:
        return _stable_int(f"version/{self.slug}", 1_000_000, 8_000_000)

    @cached_property
    def file_id(self) -> int:
        return _stable_int(f"file/{self.slug}", 1_000_000, 8_000_000)

    @cached_property
    def stats(self) -> dict:
        downloads = _stable_int(f"downloads/{self.slug}", 40, 9_000)
        return {"downloads": downloads, "likes": downloads // _stable_int(f"ratio/{self.slug}", 8, 30)}

    @property
    def published(self) -> date:
        return date.fromisoformat(self.spec.published)

    @cached_property
    def examples(self) -> list[homepages.ExampleImage]:
        return homepages.example_images(self.spec)

    @cached_property
    def fp(self) -> str:
        """Float precision as Civitai reports it: the widest float dtype in the safetensors header."""
        dtypes = {v["dtype"] for v in read_header(self.path).tensors.values()}
        return next((fp for dtype, fp in _DTYPE_FP if dtype in dtypes), "fp32")

    @cached_property
    def civitai_hashes(self) -> dict:
        """The hash set Civitai lists per file (upper-case hex): SHA256, AutoV2 (its first ten
        digits), CRC32, AutoV1 for checkpoints (A1111's legacy hash) and AutoV3 for LoRAs (the
        first twelve digits of the SHA256 of the tensor data after the safetensors header).
        Civitai's BLAKE3 is left out: hashlib has no BLAKE3."""
        data = self.path.read_bytes()
        hashes = {"AutoV2": self.sha256[:10].upper(), "SHA256": self.sha256.upper(),
                  "CRC32": f"{zlib.crc32(data):08X}"}
        if self.spec.kind == "ckpt":
            hashes["AutoV1"] = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper()
        else:
            hashes["AutoV3"] = hashlib.sha256(data[read_header(self.path).data_start:]).hexdigest()[:12].upper()
        return hashes

    @cached_property
    def civitai_file_name(self) -> str:
        """Civitai renames downloads to ``<modelName>_<versionName>.<ext>`` (camel-cased)."""
        return f"{_camel(self.spec.title)}_{_camel(CIVITAI_VERSION_NAME)}.safetensors"

    @property
    def repo_id(self) -> str:
        return f"{HF_OWNER}/{self.slug}"

    @cached_property
    def hf_weights_name(self) -> str:
        """diffusers' LoRA scripts save ``pytorch_lora_weights.safetensors``; others keep a name."""
        diffusers = self.spec.file_format == "diffusers"
        return "pytorch_lora_weights.safetensors" if diffusers else f"{self.slug}.safetensors"

    @cached_property
    def hf_commit(self) -> str:
        return hashlib.sha1(f"{self.repo_id}@{self.sha256}".encode()).hexdigest()

    @cached_property
    def card_data(self) -> dict:
        return homepages.model_card_data(self.spec, self.base_model)

    @cached_property
    def hf_files(self) -> dict[str, bytes | Path]:
        """The repo's files in git order: small ones as bytes, the weights (an LFS file) as a path."""
        files: dict[str, bytes | Path] = {
            ".gitattributes": _GITATTRIBUTES,
            "README.md": homepages.model_card(self.spec, self.card_data, self.hf_weights_name).encode(),
        }
        files.update({homepages.example_path(i): img.png for i, img in enumerate(self.examples)})
        files[self.hf_weights_name] = self.path
        return dict(sorted(files.items()))


def load_manifest(artifacts_dir: Path) -> dict:
    return json.loads((artifacts_dir / "manifest.json").read_text())


def manifest_experts(manifest: dict) -> list[tuple[ExpertSpec, dict]]:
    """The manifest's experts joined with their specs (every built expert must have one)."""
    specs = {s.slug: s for s in EXPERTS}
    return [(specs[entry["slug"]], entry) for entry in manifest["experts"]]


# ----------------------------------------------------------------------------- hub state

@dataclass
class Fault:
    """The next ``times`` requests whose path starts with ``prefix`` fail: with HTTP ``status``,
    or, when ``cut_after`` is set, by dropping the connection after that many body bytes."""

    prefix: str
    status: int = 500
    times: int = 1
    cut_after: int | None = None
    retry_after: int | None = None


@dataclass
class Hub:
    """What the server publishes, mutable while it runs (all methods are thread-safe)."""

    artifacts_dir: Path
    base_model: str
    url: str | None = None  # set by running_hub once the server listens
    faults: list[Fault] = field(default_factory=list, init=False)
    requests: list[str] = field(default_factory=list, init=False)  # "GET /path?query", in arrival order
    _experts: dict[str, HubExpert] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def civitai_url(self) -> str | None:
        return self.url

    @property
    def hf_url(self) -> str | None:
        return self.url

    def add_expert(self, spec: ExpertSpec, entry: dict, *, base_model: str | None = None,
                   page_html: str | None = None, page_status: int = 200) -> HubExpert:
        """Publish an expert; ``entry`` is a manifest entry, its file relative to artifacts_dir.
        Tests may publish it under another ``base_model`` than the hub's, and serve ``page_html``
        (with ``page_status``) as its homepage instead of the generated one."""
        page = (page_status, page_html) if page_html is not None else None
        expert = HubExpert(spec, entry, self.artifacts_dir / entry["file"], base_model or self.base_model, page)
        with self._lock:
            if spec.slug in self._experts:
                raise ValueError(f"expert {spec.slug!r} is already published")
            taken = {i for e in self._experts.values() for i in (e.model_id, e.version_id)}
            if {expert.model_id, expert.version_id} & taken:
                raise ValueError(f"id collision for {spec.slug!r}; rename it")
            self._experts[spec.slug] = expert
        return expert

    def remove_expert(self, slug: str) -> None:
        with self._lock:
            del self._experts[slug]

    def experts(self, site: str) -> list[HubExpert]:
        with self._lock:
            return [e for e in self._experts.values() if e.spec.site == site]

    def inject_fault(self, prefix: str, status: int = 500, times: int = 1, *,
                     cut_after: int | None = None, retry_after: int | None = None) -> None:
        with self._lock:
            self.faults.append(Fault(prefix, status, times, cut_after, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, path: str) -> Fault | None:
        """Consume one use of the first fault matching ``path``."""
        with self._lock:
            for fault in self.faults:
                if path.startswith(fault.prefix):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def civitai_expert(self, *, model_id: int | None = None, version_id: int | None = None,
                       file_hash: str | None = None) -> HubExpert | None:
        for e in self.experts("civitai"):
            if (e.model_id == model_id or e.version_id == version_id
                    or (file_hash and file_hash.upper() in e.civitai_hashes.values())):
                return e
        return None

    def hf_expert(self, owner: str, repo: str) -> HubExpert | None:
        return next((e for e in self.experts("hf") if e.repo_id == f"{owner}/{repo}"), None)


def _build_hub(artifacts_dir: Path | None, experts: Iterable[tuple[ExpertSpec, dict]] | None) -> Hub:
    root = Path(artifacts_dir or ARTIFACTS)
    manifest = load_manifest(root)
    hub = Hub(root, manifest["base_model"])
    for spec, entry in manifest_experts(manifest) if experts is None else experts:
        hub.add_expert(spec, entry)
    return hub


# ----------------------------------------------------------------------------- shared helpers

def _stable_int(text: str, low: int, span: int) -> int:
    """A number fixed by ``text``: ids and stats survive restarts and other experts' changes."""
    return low + int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) % span


def _camel(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return "".join(w.lower() if i == 0 else w[:1].upper() + w[1:].lower() for i, w in enumerate(words))


def _iso(day: date, hour: int = 12) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00.000Z"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _encode_cursor(key: tuple) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple:
    try:
        return tuple(json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))))
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"Invalid cursor: {cursor}") from exc


def _keyset_page(items: list, key, cursor: str | None, limit: int, offset: int = 0) -> tuple[list, str | None]:
    """One page of ``items`` in ``key`` order. The cursor is the key of the next page's first
    item, not an offset, so experts added or removed mid-walk make it skip or repeat no other."""
    ordered = sorted(items, key=key)
    if cursor:
        start = _decode_cursor(cursor)
        try:
            ordered = [x for x in ordered if key(x) >= start]
        except TypeError as exc:
            raise BadRequest(f"Invalid cursor: {cursor}") from exc
    ordered = ordered[offset:]
    page = ordered[:limit]
    return page, (_encode_cursor(key(ordered[limit])) if len(ordered) > limit else None)


def _int_param(value: str | None, default: int, low: int, high: int, name: str) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer between {low} and {high}")
    return int(value)


def _multi(request: Request, name: str) -> list[str]:
    """A repeatable query parameter, also accepting comma-separated values."""
    return [v for raw in request.query_params.getlist(name) for v in raw.split(",") if v]


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end) inclusive slice a single ``Range: bytes=...`` header asks for; None for
    the whole file. Raises ValueError when unsatisfiable (answered with 416)."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not m or m.groups() == ("", ""):
        return None  # absent, multi-range or malformed: serve the whole file, as RFC 9110 allows
    first, last = m.groups()
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError("unsatisfiable range")
    return start, end


def _serve_bytes(request: Request, source: bytes | Path, headers: dict) -> Response:
    """Serve a file or a byte string with Range support (206/416) and HEAD, streaming files."""
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    headers = {**headers, "Accept-Ranges": "bytes"}
    try:
        span = _byte_range(request.headers.get("range"), size)
    except ValueError:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span or (0, size - 1)
    if span:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    status = 206 if span else 200
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    if isinstance(source, bytes):
        return Response(source[start:end + 1], status, headers, media_type="application/octet-stream")
    return StreamingResponse(_read_span(source, start, end), status, headers, media_type="application/octet-stream")


def _read_span(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start + 1
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def _disposition(name: str) -> str:
    return f"attachment; filename=\"{name}\"; filename*=UTF-8''{name}"


# ----------------------------------------------------------------------------- Civitai JSON

_CIVITAI_SORTS = {
    "Highest Rated": lambda e: (-e.stats["likes"], e.model_id),
    "Most Liked": lambda e: (-e.stats["likes"], e.model_id),
    "Most Downloaded": lambda e: (-e.stats["downloads"], e.model_id),
    "Newest": lambda e: (-e.published.toordinal(), e.model_id),
    "Oldest": lambda e: (e.published.toordinal(), e.model_id),
}


def _civitai_commercial(value) -> list[str]:
    """Civitai now lists commercial permissions as an array (older answers used one string)."""
    values = [value] if isinstance(value, str) else list(value)
    return [v for v in values if v != "None"]


def civitai_model(e: HubExpert, base_url: str) -> dict:
    """A model as ``/api/v1/models`` and ``/api/v1/models/{id}`` return it."""
    licence = e.spec.license
    return {
        "id": e.model_id, "name": e.spec.title, "description": homepages.civitai_description(e.spec),
        "allowNoCredit": licence.get("allowNoCredit", True),
        "allowCommercialUse": _civitai_commercial(licence.get("allowCommercialUse", "None")),
        "allowDerivatives": licence.get("allowDerivatives", True),
        "allowDifferentLicense": licence.get("allowDifferentLicense", True),
        "type": CIVITAI_TYPES[e.spec.kind], "minor": False, "sfwOnly": False, "poi": False, "nsfw": False,
        "nsfwLevel": 1, "availability": "Public", "cosmetic": None, "supportsGeneration": False,
        "stats": {"downloadCount": e.stats["downloads"], "favoriteCount": 0, "thumbsUpCount": e.stats["likes"],
                  "thumbsDownCount": 0, "commentCount": 0, "ratingCount": 0, "rating": 0, "tippedAmountCount": 0},
        "creator": {"username": CIVITAI_CREATOR, "image": None},
        "tags": list(e.spec.tags),
        "modelVersions": [_civitai_version(e, base_url)],
    }


def civitai_version_details(e: HubExpert, base_url: str) -> dict:
    """A version as ``/api/v1/model-versions/{id}`` and ``.../by-hash/{hash}`` return it."""
    ecosystem = re.sub(r"[^a-z0-9]+", "", e.base_model.lower())
    return {
        **_civitai_version(e, base_url),
        "air": f"urn:air:{ecosystem}:{CIVITAI_TYPES[e.spec.kind].lower()}:civitai:{e.model_id}@{e.version_id}",
        "status": "Published", "uploadType": "Created", "usageControl": "Download",
        "earlyAccessConfig": None, "earlyAccessEndsAt": None, "trainingStatus": None, "trainingDetails": None,
        "model": {"name": e.spec.title, "type": CIVITAI_TYPES[e.spec.kind], "nsfw": False, "poi": False},
    }


def _civitai_version(e: HubExpert, base_url: str) -> dict:
    download = f"{base_url}/api/download/models/{e.version_id}"
    return {
        "id": e.version_id, "modelId": e.model_id, "index": 0, "name": CIVITAI_VERSION_NAME,
        "baseModel": e.base_model, "baseModelType": "Standard",
        "createdAt": _iso(e.published, 9), "updatedAt": _iso(e.published), "publishedAt": _iso(e.published),
        "availability": "Public", "nsfwLevel": 1, "description": "<p>First release.</p>",
        "trainedWords": list(e.spec.trigger_words),
        "stats": {"downloadCount": e.stats["downloads"], "ratingCount": 0, "rating": 0,
                  "thumbsUpCount": e.stats["likes"], "thumbsDownCount": 0},
        "files": [{
            "id": e.file_id, "sizeKB": e.entry["bytes"] / 1024, "name": e.civitai_file_name,
            "type": "Model", "pickleScanResult": "Success", "pickleScanMessage": "No Pickle imports",
            "virusScanResult": "Success", "virusScanMessage": None, "scannedAt": _iso(e.published, 10),
            "metadata": {"format": "SafeTensor", "size": "full", "fp": e.fp},
            "hashes": e.civitai_hashes, "primary": True, "downloadUrl": download,
        }],
        "images": [_civitai_image(e, i, img, base_url) for i, img in enumerate(e.examples)],
        "downloadUrl": download,
    }


def _civitai_image(e: HubExpert, index: int, img: homepages.ExampleImage, base_url: str) -> dict:
    side = homepages.EXAMPLE_PIXELS
    prompt = homepages.civitai_prompt(e.spec, img.prompt)
    return {
        "id": _stable_int(f"image/{e.slug}/{index}", 10_000_000, 80_000_000),
        "url": f"{base_url}/images/{e.slug}/{index}.png", "nsfwLevel": 1, "width": side, "height": side,
        "type": "image", "metadata": {"width": side, "height": side}, "availability": "Public",
        "hasMeta": True, "hasPositivePrompt": True, "onSite": False,
        "meta": {"prompt": prompt, "negativePrompt": homepages.NEGATIVE_PROMPT, "seed": img.seed, "steps": 20,
                 "sampler": "Euler a", "cfgScale": 7, "Size": f"{side}x{side}", "Model": e.base_model,
                 "resources": [{"name": e.slug, "type": e.spec.kind, "weight": homepages.LORA_WEIGHT}]
                 if e.spec.kind == "lora" else []},
    }


def _civitai_matches(e: HubExpert, request: Request) -> bool:
    """The /api/v1/models filters: types, baseModels, tag, username and a full-text query."""
    q = request.query_params
    types, bases = _multi(request, "types"), _multi(request, "baseModels")
    words = (q.get("query") or "").lower().split()
    haystack = " ".join([e.spec.title, *e.spec.tags, *e.spec.trigger_words]).lower()
    return ((not types or CIVITAI_TYPES[e.spec.kind] in types)
            and (not bases or e.base_model in bases)
            and (not q.get("tag") or q["tag"].lower() in (t.lower() for t in e.spec.tags))
            and (not q.get("username") or q["username"].lower() == CIVITAI_CREATOR)
            and all(w in haystack for w in words))


def civitai_list(hub: Hub, request: Request) -> dict:
    q = request.query_params
    bad_types = set(_multi(request, "types")) - _CIVITAI_ALL_TYPES
    if bad_types:
        raise BadRequest(f"Invalid model type: {', '.join(sorted(bad_types))}")
    sort = q.get("sort", "Highest Rated")
    if sort not in _CIVITAI_SORTS:
        raise BadRequest(f"Invalid sort: {sort}; expected one of {', '.join(_CIVITAI_SORTS)}")
    limit = _int_param(q.get("limit"), 100, 1, 100, "limit")
    page = _int_param(q.get("page"), 1, 1, 10**6, "page") if not q.get("cursor") else 1
    if q.get("query") and q.get("page"):
        raise BadRequest("Cannot use page param with query search. Use cursor-based pagination.")
    experts = [e for e in hub.experts("civitai") if _civitai_matches(e, request)]
    items, next_cursor = _keyset_page(experts, _CIVITAI_SORTS[sort], q.get("cursor"), limit, (page - 1) * limit)
    base = _base_url(request)
    metadata: dict = {}
    if next_cursor:
        metadata["nextCursor"] = next_cursor
        metadata["nextPage"] = str(request.url.remove_query_params("page").include_query_params(cursor=next_cursor))
    if q.get("page") and not q.get("cursor"):
        metadata.update(currentPage=page, pageSize=limit)
    return {"items": [civitai_model(e, base) for e in items], "metadata": metadata}


# ----------------------------------------------------------------------------- Hugging Face JSON

_HF_SORTS = {
    "downloads": lambda e: e.stats["downloads"],
    "likes": lambda e: e.stats["likes"],
    "trendingScore": lambda e: 0,
    "createdAt": lambda e: e.published.toordinal(),
    "lastModified": lambda e: e.published.toordinal(),
}
_HF_LIST_FIELDS = ("likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag",
                   "library_name", "createdAt", "modelId")
_HF_FULL_FIELDS = ("author", "sha", "lastModified", "gated", "disabled", "siblings")


def hf_tags(e: HubExpert) -> list[str]:
    """The Hub's tag list: the card's tags plus those it derives (library, format, pipeline,
    base-model relation, licence, region); ``filter=`` matches against these."""
    relation = "adapter" if e.spec.kind == "lora" else "finetune"
    derived = ["diffusers", "safetensors", "text-to-image", f"base_model:{e.base_model}",
               f"base_model:{relation}:{e.base_model}", f"license:{homepages.HF_LICENSE}", "region:us"]
    return list(dict.fromkeys([*e.card_data["tags"], *derived]))


def hf_siblings(e: HubExpert, blobs: bool) -> list[dict]:
    """``siblings``; with ``blobs=true`` each also has size, blobId and, for LFS files, lfs."""
    if not blobs:
        return [{"rfilename": name} for name in e.hf_files]
    return [{"rfilename": name, **_hf_blob(e, name)} for name in e.hf_files]


def _hf_blob(e: HubExpert, name: str) -> dict:
    content = e.hf_files[name]
    if isinstance(content, bytes):
        return {"blobId": _git_blob_id(content), "size": len(content)}
    pointer = _lfs_pointer(e.sha256, e.entry["bytes"])
    return {"blobId": _git_blob_id(pointer), "size": e.entry["bytes"],
            "lfs": {"sha256": e.sha256, "size": e.entry["bytes"], "pointerSize": len(pointer)}}


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def hf_model_info(e: HubExpert, blobs: bool = False) -> dict:
    """A repo as ``/api/models/{repo_id}`` returns it (list items are a projection of this)."""
    card = e.card_data
    return {
        "_id": hashlib.sha1(e.repo_id.encode()).hexdigest()[:24], "id": e.repo_id, "modelId": e.repo_id,
        "author": HF_OWNER, "sha": e.hf_commit, "lastModified": _iso(e.published), "private": False,
        "disabled": False, "gated": False, "downloads": e.stats["downloads"], "likes": e.stats["likes"],
        "trendingScore": 0, "library_name": card["library_name"], "tags": hf_tags(e),
        "pipeline_tag": card["pipeline_tag"], "cardData": card,
        "widgetData": card["widget"], "spaces": [], "createdAt": _iso(e.published),
        "siblings": hf_siblings(e, blobs), "usedStorage": sum(_hf_blob(e, n)["size"] for n in e.hf_files),
    }


def _hf_project(info: dict, request: Request) -> dict:
    """List items carry a few fields by default; ``full``, ``cardData`` and ``expand`` add more."""
    q = request.query_params
    fields = _multi(request, "expand")
    if not fields:
        fields = [*_HF_LIST_FIELDS, *(_HF_FULL_FIELDS if _truthy(q.get("full")) else ()),
                  *(("cardData",) if _truthy(q.get("cardData")) else ())]
    return {"_id": info["_id"], "id": info["id"], **{f: info[f] for f in fields if f in info}}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() not in ("", "0", "false")


def _hf_matches(e: HubExpert, request: Request) -> bool:
    q = request.query_params
    tags = set(hf_tags(e))
    return ((not q.get("author") or q["author"].lower() == HF_OWNER)
            and (not q.get("search") or q["search"].lower() in e.repo_id.lower())
            and (not q.get("pipeline_tag") or q["pipeline_tag"] == e.card_data["pipeline_tag"])
            and (not q.get("library") or q["library"] == e.card_data["library_name"])
            and all(f in tags for f in _multi(request, "filter")))


def hf_list(hub: Hub, request: Request) -> Response:
    q = request.query_params
    sort = q.get("sort")
    if sort is not None and sort not in _HF_SORTS:
        raise BadRequest(f"Invalid sort: {sort}")
    descending = q.get("direction", "-1") != "1"

    def key(e: HubExpert) -> tuple:
        score = _HF_SORTS[sort](e) if sort else 0
        return (-score if descending else score, e.repo_id)

    limit = _int_param(q.get("limit"), 1000, 1, 1000, "limit")
    experts = [e for e in hub.experts("hf") if _hf_matches(e, request)]
    items, next_cursor = _keyset_page(experts, key, q.get("cursor"), limit)
    headers = {}
    if next_cursor:
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    return JSONResponse([_hf_project(hf_model_info(e), request) for e in items], headers=headers)


def _hf_repo(hub: Hub, owner: str, repo: str, rev: str = "main") -> HubExpert:
    """The repo at a revision (its one branch, ``main``, or its commit sha)."""
    e = hub.hf_expert(owner, repo)
    if e is None:
        raise HfNotFound("RepoNotFound", "Repository not found")
    if rev not in ("main", e.hf_commit):
        raise HfNotFound("RevisionNotFound", f"Invalid rev id: {rev}")
    return e


# ----------------------------------------------------------------------------- the app

def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


class _FaultsAndLog:
    """ASGI middleware: logs every request, then plays an injected fault if one matches."""

    def __init__(self, app, hub: Hub):
        self.app, self.hub = app, hub

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = scope.get("query_string", b"").decode()
        self.hub.requests.append(f"{scope['method']} {scope['path']}" + (f"?{query}" if query else ""))
        fault = self.hub.take_fault(scope["path"])
        if fault is None:
            return await self.app(scope, receive, send)
        if fault.cut_after is not None:
            return await self.app(scope, receive, _cutting_send(send, fault.cut_after))
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
        await _error(fault.status, HTTPStatus(fault.status).phrase, headers)(scope, receive, send)


def _cutting_send(send, budget: int):
    """Wrap ``send`` so the response body stops after ``budget`` bytes, as a flaky network
    does mid-download. The rest is swallowed, so the response never completes and the server
    closes the connection: the client sees a short body and must resume."""
    sent = 0

    async def cut(message):
        nonlocal sent
        if message["type"] != "http.response.body":
            return await send(message)
        body = message.get("body", b"")
        if sent >= budget:
            return None
        if sent + len(body) > budget:
            message = {"type": "http.response.body", "body": body[:budget - sent], "more_body": True}
        sent += len(message["body"])
        await send(message)

    return cut


def create_app(artifacts_dir: Path | None = None, *,
               experts: Iterable[tuple[ExpertSpec, dict]] | None = None) -> FastAPI:
    """The hub as an ASGI app. ``experts`` replaces the manifest's list of (spec, manifest
    entry) pairs, e.g. to start with one expert more or less; ``app.state.hub`` is the Hub."""
    hub = _build_hub(artifacts_dir, experts)
    app = FastAPI(title="DiffGraph mini-world hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.add_middleware(_FaultsAndLog, hub=hub)

    @app.exception_handler(BadRequest)
    def bad_request(request: Request, exc: BadRequest):
        return _error(400, str(exc))

    @app.exception_handler(HfNotFound)
    def hf_not_found(request: Request, exc: HfNotFound):
        return _error(404, str(exc), {"X-Error-Code": exc.code, "X-Error-Message": str(exc)})

    _civitai_routes(app, hub)
    _hf_routes(app, hub)
    return app


def _parse_id(text: str) -> int:
    if not text.isdigit():
        raise BadRequest(f"Invalid id: {text}")
    return int(text)


def _civitai_routes(app: FastAPI, hub: Hub) -> None:
    @app.get("/api/v1/models")
    def list_models(request: Request):
        return civitai_list(hub, request)

    @app.get("/api/v1/models/{model_id}")
    def get_model(model_id: str, request: Request):
        e = hub.civitai_expert(model_id=_parse_id(model_id))
        return civitai_model(e, _base_url(request)) if e else _error(404, f"No model with id {model_id}")

    @app.get("/api/v1/model-versions/by-hash/{file_hash}")
    def get_version_by_hash(file_hash: str, request: Request):
        e = hub.civitai_expert(file_hash=file_hash)
        return civitai_version_details(e, _base_url(request)) if e else _error(404, "Model not found")

    @app.get("/api/v1/model-versions/{version_id}")
    def get_version(version_id: str, request: Request):
        e = hub.civitai_expert(version_id=_parse_id(version_id))
        return civitai_version_details(e, _base_url(request)) if e else _error(404, "Model not found")

    @app.api_route("/api/download/models/{version_id}", methods=["GET", "HEAD"])
    def download(version_id: str, request: Request):
        e = hub.civitai_expert(version_id=_parse_id(version_id))
        if e is None:
            return _error(404, "Model not found")
        return _serve_bytes(request, e.path, {"Content-Disposition": _disposition(e.civitai_file_name)})

    @app.get("/images/{slug}/{index}.png")
    def image(slug: str, index: str):
        e = next((x for x in hub.experts("civitai") if x.slug == slug), None)
        if e is None or not index.isdigit() or int(index) >= len(e.examples):
            return _error(404, "Image not found")
        return Response(e.examples[int(index)].png, media_type="image/png")

    @app.get("/models/{model_id}", response_class=HTMLResponse)
    @app.get("/models/{model_id}/{slug}", response_class=HTMLResponse)
    def model_page(model_id: str, request: Request):  # the slug is decoration, as on Civitai
        e = hub.civitai_expert(model_id=int(model_id)) if model_id.isdigit() else None
        if e is None:
            return HTMLResponse(homepages.not_found_page(f"Model {model_id}"), status_code=404)
        if e.page is not None:
            return HTMLResponse(e.page[1], status_code=e.page[0])
        return homepages.civitai_page(e.spec, civitai_model(e, _base_url(request)))


def _hf_routes(app: FastAPI, hub: Hub) -> None:
    @app.get("/api/models")
    def list_models(request: Request):
        return hf_list(hub, request)

    @app.get("/api/models/{owner}/{repo}")
    @app.get("/api/models/{owner}/{repo}/revision/{rev}")
    def model_info(owner: str, repo: str, request: Request, rev: str = "main"):
        e = _hf_repo(hub, owner, repo, rev)
        info = hf_model_info(e, blobs=_truthy(request.query_params.get("blobs")))
        return _hf_project(info, request) if request.query_params.get("expand") else info

    @app.get("/api/models/{owner}/{repo}/tree/{rev}")
    def tree(owner: str, repo: str, rev: str, request: Request):
        e = _hf_repo(hub, owner, repo, rev)
        return _hf_tree(e, recursive=_truthy(request.query_params.get("recursive")))

    @app.api_route("/{owner}/{repo}/resolve/{rev}/{filename:path}", methods=["GET", "HEAD"])
    def resolve(owner: str, repo: str, rev: str, filename: str, request: Request):
        e = _hf_repo(hub, owner, repo, rev)
        if filename not in e.hf_files:
            raise HfNotFound("EntryNotFound", "Entry not found")
        return _serve_bytes(request, e.hf_files[filename], _resolve_headers(e, filename))

    @app.get("/{owner}/{repo}", response_class=HTMLResponse)
    def model_page(owner: str, repo: str):
        e = hub.hf_expert(owner, repo)
        if e is None:
            return HTMLResponse(homepages.not_found_page(f"Repository {owner}/{repo}"), status_code=404)
        if e.page is not None:
            return HTMLResponse(e.page[1], status_code=e.page[0])
        return homepages.hf_page(e.spec, hf_model_info(e, blobs=True))


def _resolve_headers(e: HubExpert, filename: str) -> dict:
    """What huggingface_hub reads from a resolve response: the commit, and the ETag it keys its
    cache on (for LFS files the sha256 of the content, repeated in X-Linked-Etag/-Size)."""
    blob = _hf_blob(e, filename)
    headers = {"X-Repo-Commit": e.hf_commit, "Content-Disposition": _disposition(filename.rsplit("/", 1)[-1])}
    if "lfs" in blob:
        etag = f'"{e.sha256}"'
        headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(blob["size"])})
    else:
        headers["ETag"] = f'"{blob["blobId"]}"'
    return headers


def _hf_tree(e: HubExpert, recursive: bool) -> list[dict]:
    """``/api/models/{repo}/tree/{rev}``: root entries (folders as directories) or, recursively,
    every file."""
    entries, folders = [], {}
    for name in e.hf_files:
        blob = _hf_blob(e, name)
        folder = name.split("/", 1)[0] if "/" in name else None
        if folder and not recursive:
            folders.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                        "size": 0, "path": folder})
            continue
        entry = {"type": "file", "oid": blob["blobId"], "size": blob["size"], "path": name}
        if "lfs" in blob:
            entry["lfs"] = {"oid": blob["lfs"]["sha256"], "size": blob["size"],
                            "pointerSize": blob["lfs"]["pointerSize"]}
        entries.append(entry)
    return [*folders.values(), *entries]


# ----------------------------------------------------------------------------- running it

@contextmanager
def running_hub(artifacts_dir: Path | None = None, host: str = "127.0.0.1", port: int = 0, **kw) -> Iterator[Hub]:
    """Serve the hub from a background thread for the duration of a ``with`` block and yield
    its Hub (``.url``, ``.civitai_url``, ``.hf_url``, mutation and fault methods). ``port=0``
    takes a free port; ``kw`` goes to create_app."""
    app = create_app(artifacts_dir, **kw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="miniworld-hub", daemon=True)
    thread.start()
    try:
        _wait_started(server, thread)
        hub: Hub = app.state.hub
        hub.url = f"http://{host}:{sock.getsockname()[1]}"
        yield hub
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the mini-world hub did not start")
        time.sleep(0.02)


def serve(host: str = "127.0.0.1", port: int = 8765, artifacts_dir: Path | None = None) -> None:
    """Serve the hub in the foreground until interrupted (``diffgraph miniworld serve``)."""
    uvicorn.run(create_app(artifacts_dir), host=host, port=port, log_level="info")
