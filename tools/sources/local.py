"""A local folder of expert files, as A1111 and ComfyUI users keep them (models/Lora,
models/Stable-diffusion, models/checkpoints, ...), read with whatever metadata sits beside
each file:

- ``<name>.civitai.info``: the Civitai model-version JSON that the Civitai Helper extension
  saves (model name and type, baseModel, trainedWords, modelId);
- ``<name>.json``: A1111's extra-networks metadata ("sd version", "activation text",
  "description"), or our own keys (kind, base_model, trigger_words, name, tags, license,
  homepage_url, description), which win over everything else.

Without metadata the kind comes from the tensor names in the safetensors header (read without
loading anything), or the folder name for pickle files, and so does the base model
(diffgraph.merger.detect; "unknown" when the names do not tell). The version is the file's
sha256, so editing a file in place makes a new version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.merger.detect import BaseDetectionError, detect_base

from .base import Since, as_utc
from .civitai import KINDS as CIVITAI_KINDS
from .download import PICKLE_SUFFIXES, ContentStore
from .errors import InvalidSafetensors, UnsafeFileError
from .validate import validate_safetensors

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
LORA_FOLDERS = {"lora", "loras", "lycoris", "locon"}
MAX_SIDECAR_BYTES = 4 * 2**20
_LORA_KEY = re.compile(r"(^lora_|\.lora_(down|up|A|B)\.|\.lora\.(down|up)\.|\.(hada|lokr)_w)")
log = logging.getLogger(__name__)


class LocalFolderSource:
    """Every weights file under ``root`` (recursively; hidden files skipped)."""

    name = "local"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise NotADirectoryError(f"local source: {self.root} is not a directory")

    def iter_models(self, *, since: Since = None) -> Iterator[ExpertRecord]:
        """A record per weights file whose file or sidecars changed at or after ``since``
        (modification time), hashing only those."""
        since = as_utc(since)
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower() not in WEIGHT_SUFFIXES or not path.is_file() or _hidden(path, self.root):
                continue
            changed = max(_mtime(p) for p in (path, *_sidecars(path)) if p.is_file())
            if since is None or changed >= since:
                yield self.record(path, changed)

    def record(self, path: Path, changed: datetime) -> ExpertRecord:
        info, own = (_read_json(p) for p in _sidecars(path))
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        a1111_base = own.get("sd version") if own.get("sd version") not in (None, "", "Unknown") else None
        words = own.get("trigger_words") or info.get("trainedWords") or _split(own.get("activation text"))
        sha256 = _sha256(path)
        homepage = own.get("homepage_url") or (
            f"https://civitai.com/models/{info['modelId']}" if str(info.get("modelId", "")).isdigit() else None)
        return ExpertRecord(
            source=self.name, source_id=path.relative_to(self.root).as_posix(), version=sha256,
            name=str(own.get("name") or model.get("name") or path.stem),
            kind=_kind(own.get("kind"), model.get("type"), path),
            base_model=str(own.get("base_model") or info.get("baseModel") or a1111_base or _detected_base(path)),
            files=[ExpertFile(name=path.name, url=path.as_uri(), sha256=sha256, size=path.stat().st_size)],
            homepage_url=homepage,
            trigger_words=[str(w) for w in words if str(w).strip()] if isinstance(words, list) else [],
            tags=[str(t) for t in own.get("tags") or []] if isinstance(own.get("tags"), list) else [],
            license=own.get("license") if isinstance(own.get("license"), dict) else {},
            published_at=changed.isoformat(),
            source_description=str(own.get("description") or info.get("description") or ""),
        )

    def download(self, file: ExpertFile, store: ContentStore) -> Path:
        """Copy the file into the store (a copy, not a link: the user may edit the original)."""
        return store.ingest(self._local_path(file.url), file)

    def _local_path(self, url: str) -> Path:
        parts = urlsplit(url)
        path = Path(os.path.normpath(unquote(parts.path)))
        if parts.scheme != "file" or not path.is_relative_to(self.root):
            raise UnsafeFileError(f"local source: {url!r} is not a file under {self.root}")
        return path

    def close(self) -> None:
        """Nothing to release; present for the Source interface."""


def _sidecars(path: Path) -> tuple[Path, Path]:
    """Where Civitai Helper's and A1111's (or our own) metadata for ``path`` would be."""
    return path.with_suffix(".civitai.info"), path.with_suffix(".json")


def _kind(own: str | None, civitai_type: str | None, path: Path) -> str:
    """Our sidecar's kind, else Civitai's model type, else what the file shows: LoRA if the
    tensor names say so (kohya lora_*, PEFT lora_A/B, LyCORIS hada/lokr) or, for pickle files
    and unreadable headers, if the folder is a LoRA folder."""
    if own in ("lora", "ckpt"):
        return own
    if isinstance(civitai_type, str) and civitai_type in CIVITAI_KINDS:
        return CIVITAI_KINDS[civitai_type]
    if path.suffix.lower() == ".safetensors":
        try:
            header = validate_safetensors(path)
        except InvalidSafetensors as exc:
            log.warning("local: %s (kind guessed from its folder; the store will refuse it)", exc)
        else:
            return "lora" if any(_LORA_KEY.search(k) for k in header.tensors) else "ckpt"
    return "lora" if {p.lower() for p in path.parent.parts} & LORA_FOLDERS else "ckpt"


def _detected_base(path: Path) -> str:
    """The base-model family the tensor names show, or "unknown" (pickle, unreadable, undecidable)."""

    if path.suffix.lower() != ".safetensors":
        return "unknown"
    try:
        return detect_base(path)
    except BaseDetectionError:
        return "unknown"


def _read_json(path: Path) -> dict:
    """A sidecar as a dict ({} when absent); one too big or not a JSON object is ignored (logged)."""
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        log.warning("local: ignoring sidecar %s: %s", path, exc)
        return {}


def _split(text) -> list[str]:
    return [w.strip() for w in text.split(",")] if isinstance(text, str) else []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
