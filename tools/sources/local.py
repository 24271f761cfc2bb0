"""A local folder of expert files, as A1111, Forge and ComfyUI users keep them (models/Lora,
models/LyCORIS, models/Stable-diffusion, models/checkpoints, models/loras, ...), read with
whatever metadata sits beside each file, and the checkpoint and LoRA folders a ComfyUI
``extra_model_paths.yaml`` in it names. Who wins where they disagree, highest first:

1. ``<name>.json`` with our own keys (kind, base_model, trigger_words, name, tags, license,
   homepage_url, description, preferred_weight);
2. the same file as A1111 writes it ("sd version", "activation text", "preferred weight",
   "description"): the user's own words beat any hub's;
3. ``<name>.civitai.info`` (Civitai Helper: the model-version JSON, with baseModel,
   trainedWords, modelId) and ``<name>.metadata.json`` (ComfyUI-Lora-Manager: model_name,
   base_model, civitai.trainedWords, tags, modelDescription, usage_tips' strength);
4. the file itself: kohya's ``ss_*`` metadata and the tensor names of its safetensors header
   (read without loading anything; diffgraph.merger.detect), or the folder name for pickles.

Files that are not experts are skipped with a one-line note in :attr:`LocalFolderSource.notes`,
not rejected: VAEs, textual-inversion embeddings, ControlNets, the configured base models
themselves (DIFFGRAPH_BASE_SD15 / _SDXL), and the component files of diffusers pipeline folders
(ComfyUI's models/diffusers: a folder with a model_index.json).

One model is one expert: byte-identical copies are files of one expert (named by the copy with
the user's sidecars), and an fp16 or bf16 copy of an fp32 file (the same tensors, rounded) is a
file of the fp32 file's expert, which merges from the fp32 file. Files are used where they are
(no copy into DIFFGRAPH_HOME), and their sha256 is cached by (path, size, mtime), so an
unchanged pass over a large library reads no file twice. The version is the file's sha256, so
editing a file in place makes a new version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

from diffgraph.graph_store.records import ExpertFile, ExpertRecord
from diffgraph.merger.detect import BaseDetectionError, detect_base

from .base import Since, as_utc
from .civitai import KINDS as CIVITAI_KINDS
from .civitai import nsfw_level
from .download import PICKLE_SUFFIXES, ContentStore
from .errors import IntegrityError, InvalidSafetensors, UnsafeFileError
from .validate import validate_safetensors

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
LORA_FOLDERS = {"lora", "loras", "lycoris", "locon"}
MAX_SIDECAR_BYTES = 4 * 2**20
_LORA_KEY = re.compile(r"(^lora_|\.lora_(down|up|A|B)\.|\.lora\.(down|up)\.|\.(hada|lokr)_w)")
_VAE_KEY = re.compile(r"^(first_stage_model\.|vae\.)?(encoder|decoder|quant_conv|post_quant_conv)\b")
_EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g"}  # A1111 / SDXL textual inversions (or string_to_* keys)
NOT_EXPERT_FOLDERS = {"vae": "a VAE", "embeddings": "a textual-inversion embedding", "controlnet": "a ControlNet",
                      "upscale_models": "an upscaler", "esrgan": "an upscaler", "clip": "a text encoder"}
log = logging.getLogger(__name__)


class LocalFolderSource:
    """Every expert file under ``root`` (recursively; hidden files skipped).

    ``hash_cache``: a SQLite file remembering each file's sha256 by (path, size, mtime_ns)
    across runs (the GCA keeps it at DIFFGRAPH_HOME/local_hashes.sqlite; without one, hashes are
    remembered for this source's lifetime only); ``skip_paths``: files that are not experts
    whatever they hold (default: the configured base models)."""

    name = "local"

    def __init__(self, root: str | Path, hash_cache: Path | None = None, skip_paths: tuple[Path, ...] | None = None):
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise NotADirectoryError(f"local source: {self.root} is not a directory")
        self.roots = [self.root, *extra_model_paths(self.root)]  # the folder, and what its ComfyUI config adds
        self.notes: list[str] = []
        self.hashed = 0  # files the last listing read to hash them (the rest came from the cache)
        self._hash_cache = Path(hash_cache) if hash_cache else None
        self._hashes: dict[tuple[str, int, int], str] = {}  # this process's, with or without the file
        self._headers: dict[Path, object] = {}  # each file's header, read once per listing
        self._skip = {p.resolve() for p in (configured_bases() if skip_paths is None else skip_paths)}

    def iter_models(self, *, since: Since = None) -> Iterator[ExpertRecord]:
        """A record per distinct expert file whose file or sidecars changed at or after ``since``
        (modification time). Byte-identical copies are one record, named by the copy that has
        sidecars (the user's metadata), else by the first path in sorted order."""
        since = as_utc(since)
        self.notes, self.hashed, self._headers = [], 0, {}
        copies: dict[str, list[tuple[bool, ExpertRecord]]] = {}
        seen: set[Path] = set()
        for root, path in ((root, path) for root in self.roots for path in sorted(root.rglob("*"))):
            if path.suffix.lower() not in WEIGHT_SUFFIXES or not path.is_file() or _hidden(path, root) or path in seen:
                continue
            seen.add(path)  # a ComfyUI config may name a folder inside this one
            what = self._not_an_expert(path)
            if what:
                self.notes.append(f"{self._id(path)}: {what}, not an expert; skipped")
                continue
            changed = max(_mtime(p) for p in (path, *_sidecars(path)) if p.is_file())
            if since is None or changed >= since:
                record = self.record(path, changed)
                copies.setdefault(record.version, []).append((any(p.is_file() for p in _sidecars(path)), record))
        listed = sum(len(group) for group in copies.values())
        self.notes.append(f"{listed} files listed, {self.hashed} of them read to hash them (the rest from the hash cache)")
        experts = []
        for group in copies.values():
            named = next((r for has_sidecars, r in group if has_sidecars), group[0][1])
            for _, other in group:
                if other is not named:
                    named.files.append(replace(other.files[0], primary=False))
                    self.notes.append(f"{other.source_id}: the same bytes as {named.source_id}; one expert")
            experts.append(named)
        yield from self._link_precision_variants(experts)

    def _link_precision_variants(self, records: list[ExpertRecord]) -> list[ExpertRecord]:
        """fp16 / bf16 copies of an fp32 file (same tensor names and shapes, the same values once
        rounded) become files of the fp32 file's expert: it merges from the most precise one."""
        by_layout: dict[tuple, list[tuple[ExpertRecord, dict]]] = {}
        for record in records:
            header = self._header(self._local_path(record.files[0].url))
            if header is not None:
                layout = (record.kind, tuple(sorted((k, tuple(v["shape"])) for k, v in header.tensors.items())))
                by_layout.setdefault(layout, []).append((record, header.tensors))
        merged: set[int] = set()
        for group in by_layout.values():
            full = [(r, h) for r, h in group if _float_dtypes(h) == {"F32"}]
            for record, header in group:
                half = _float_dtypes(header)
                if half not in ({"F16"}, {"BF16"}):
                    continue
                twin = next((r for r, h in full if _same_values(self._local_path(r.files[0].url),
                                                                self._local_path(record.files[0].url), header)), None)
                if twin is not None:
                    twin.files.extend(replace(f, primary=False) for f in record.files)
                    merged.add(id(record))
                    precision = {"F16": "fp16", "BF16": "bf16"}[next(iter(half))]
                    self.notes.append(f"{record.source_id}: the {precision} copy of {twin.source_id}; "
                                      "one expert, merged from the fp32 file")
        return [r for r in records if id(r) not in merged]

    def _not_an_expert(self, path: Path) -> str | None:
        """What a file that is no expert is ("a VAE", ...), or None for a checkpoint or LoRA."""
        resolved = path.resolve()
        if any(resolved == base or resolved.is_relative_to(base) for base in self._skip):
            return "the configured base model"
        root = self._root_of(path)
        if any((root / folder / "model_index.json").is_file() for folder in path.relative_to(root).parents):
            return "a part of a diffusers pipeline folder (to use it as a base, point DIFFGRAPH_BASE_<FAMILY> at it)"
        folder = next((NOT_EXPERT_FOLDERS[p.lower()] for p in path.relative_to(root).parent.parts
                       if p.lower() in NOT_EXPERT_FOLDERS), None)
        header = self._header(path)
        if header is None:
            return folder
        keys = list(header.tensors)
        if keys and all(k in _EMBEDDING_KEYS or k.startswith("string_to_") for k in keys):
            return "a textual-inversion embedding"
        if any(k.startswith(("control_model.", "controlnet_")) for k in keys):
            return "a ControlNet"
        if keys and all(_VAE_KEY.match(k) for k in keys):
            return "a VAE"
        return folder if folder and not any(_LORA_KEY.search(k) for k in keys) else None

    def record(self, path: Path, changed: datetime) -> ExpertRecord:
        info, own, manager = (_read_json(p) for p in _sidecars(path))
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        manager_civitai = manager.get("civitai") if isinstance(manager.get("civitai"), dict) else {}
        header = self._header(path)
        metadata = header.metadata if header else {}
        a1111_base = own.get("sd version") if own.get("sd version") not in (None, "", "Unknown") else None
        words = (own.get("trigger_words") or _split(own.get("activation text")) or info.get("trainedWords")
                 or manager_civitai.get("trainedWords"))
        sha256 = self._sha256(path)
        homepage = _text(own.get("homepage_url")) or (
            f"https://civitai.com/models/{info['modelId']}" if str(info.get("modelId", "")).isdigit() else None)
        declared = _text(own.get("base_model"), a1111_base, info.get("baseModel"), manager.get("base_model"),
                         metadata.get("ss_base_model_version")) or _detected_base(path)
        return ExpertRecord(
            source=self.name, source_id=self._id(path), version=sha256,
            name=_text(own.get("name"), model.get("name"), manager.get("model_name")) or path.stem,
            kind=_kind(own.get("kind"), model.get("type"), path, header),
            base_model=declared,
            files=[ExpertFile(name=path.name, url=path.as_uri(), sha256=sha256, size=path.stat().st_size)],
            homepage_url=homepage if homepage and homepage.startswith(("http://", "https://")) else None,
            trigger_words=_words(words),
            tags=_words(own.get("tags") or manager.get("tags")),
            license=own.get("license") if isinstance(own.get("license"), dict) else {},
            published_at=changed.isoformat(),
            source_description=_text(own.get("description"), info.get("description"), manager.get("modelDescription")),
            preferred_weight=_weight(own.get("preferred_weight"), own.get("preferred weight"),
                                     _usage_tips(manager).get("strength")),
            nsfw_level=4 if own.get("nsfw") is True else nsfw_level(model, info),  # Civitai Helper's copy of the version
        )

    def download(self, file: ExpertFile, store: ContentStore) -> Path:
        """A safetensors file where it is (a library of multi-GB checkpoints is not copied), after
        the checks a download gets and a check that it still holds the bytes it was listed with;
        a pickle is copied into the store, where it is refused unless opted in (and converted)."""
        path = self._local_path(file.url)
        if not path.is_file():
            raise IntegrityError(f"local source: {path} is gone")
        if path.suffix.lower() != ".safetensors":
            return store.ingest(path, file)
        return store.check_in_place(path, file, self._sha256(path))

    def _local_path(self, url: str) -> Path:
        parts = urlsplit(url)
        path = Path(os.path.normpath(unquote(parts.path)))
        if parts.scheme != "file" or not any(path.is_relative_to(root) for root in self.roots):
            raise UnsafeFileError(f"local source: {url!r} is not a file under {self.root}")
        return path

    def _header(self, path: Path):
        """The file's checked safetensors header (None for a pickle or an unreadable file), read
        once per listing: kind, base, non-expert and precision checks all look at it."""
        if path not in self._headers:
            self._headers[path] = _safetensors_header(path)
        return self._headers[path]

    def _root_of(self, path: Path) -> Path:
        """The listed folder ``path`` lies under (the innermost, when they nest)."""
        return max((root for root in self.roots if path.is_relative_to(root)), key=lambda root: len(root.parts))

    def _id(self, path: Path) -> str:
        """The expert's source id: its path under the folder, absolute for one a ComfyUI config adds."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else path.as_posix()

    def _sha256(self, path: Path) -> str:
        """The file's sha256, read once per (path, size, mtime)."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in self._hashes:
            return self._hashes[key]
        if self._hash_cache is None:
            digest = self._hashes[key] = self._hash(path)
            return digest
        self._hash_cache.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self._hash_cache)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)")
            row = db.execute("SELECT sha256 FROM hashes WHERE path = ? AND size = ? AND mtime_ns = ?", key).fetchone()
            digest = row[0] if row else self._hash(path)
            if not row:
                db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", (*key, digest))
        self._hashes[key] = digest
        return digest

    def _hash(self, path: Path) -> str:
        self.hashed += 1
        return _sha256(path)

    def close(self) -> None:
        """Nothing to release; present for the Source interface."""


EXPERT_PATH_KEYS = ("checkpoints", "loras")  # ComfyUI's model kinds that hold experts (vae, embeddings... do not)


def extra_model_paths(root: Path) -> list[Path]:
    """The checkpoint and LoRA folders a ComfyUI ``extra_model_paths.yaml`` in ``root`` adds
    (an A1111 install shared with ComfyUI, say): each section's ``base_path`` (relative to the
    file) joined with every line of its ``checkpoints`` and ``loras`` entries. A file that is
    not such a config is ignored with a warning: it is the user's, not ours to fail on."""
    config = root / "extra_model_paths.yaml"
    if not config.is_file():
        return []
    import yaml

    try:
        sections = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if not isinstance(sections, dict):
            raise ValueError("not a mapping of sections")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("local: ignoring %s: %s", config, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []
    folders = []
    for section in sections.values():
        if not isinstance(section, dict):
            continue
        base = Path(str(section.get("base_path") or ".")).expanduser()
        base = base if base.is_absolute() else root / base
        for key in EXPERT_PATH_KEYS:
            for line in str(section.get(key) or "").splitlines():
                folder = (base / line.strip()).expanduser().absolute() if line.strip() else None
                if folder is not None and folder.is_dir() and folder not in folders:
                    folders.append(folder)
    return folders


def configured_bases() -> tuple[Path, ...]:
    """The base models the user configured (DIFFGRAPH_BASE_<FAMILY>: a single file or a
    diffusers folder), which are not experts."""
    return tuple(Path(v).expanduser() for k, v in os.environ.items()
                 if k.startswith("DIFFGRAPH_BASE_") and v and Path(v).expanduser().exists())


def _safetensors_header(path: Path):
    """The checked safetensors header (tensors and ``__metadata__``, with kohya's ss_* keys),
    None for a pickle or an unreadable file (which the store refuses later, with the reason)."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        return validate_safetensors(path)
    except InvalidSafetensors:
        return None


def _float_dtypes(header: dict) -> set[str]:
    return {t["dtype"] for t in header.values() if t["dtype"] in ("F64", "F32", "BF16", "F16")}


VARIANT_SAMPLE = 8  # tensors compared to call two files precision variants: cheap for a multi-GB checkpoint


def _same_values(full: Path, half: Path, header: dict) -> bool:
    """Whether ``half`` holds ``full``'s values rounded to its dtype, on a spread of tensors."""
    import torch
    from safetensors import safe_open

    names = sorted(k for k, t in header.items() if t["dtype"] in ("BF16", "F16"))
    sample = names[:: max(1, len(names) // VARIANT_SAMPLE)][:VARIANT_SAMPLE]
    with safe_open(str(full), "pt") as a, safe_open(str(half), "pt") as b:
        for name in sample:
            small = b.get_tensor(name)
            if not torch.equal(a.get_tensor(name).to(small.dtype), small):
                return False
    return bool(sample)


def _text(*candidates) -> str:
    """The first candidate that is a non-empty string, whitespace collapsed ("" if none is):
    sidecars are the user's files, and a field of the wrong type is as good as absent."""
    return next((" ".join(c.split()) for c in candidates if isinstance(c, str) and c.strip()), "")


def _weight(*candidates) -> float | None:
    """The first usable LoRA weight: a finite number in (0, 5]. A1111 writes 0 for "not set"."""
    for value in candidates:
        try:
            weight = float(value)
        except (TypeError, ValueError):
            continue
        if 0 < weight <= 5:
            return weight
    return None


def _usage_tips(manager: dict) -> dict:
    """ComfyUI-Lora-Manager's usage_tips: a JSON object, usually in a string ({"strength": 0.8})."""
    tips = manager.get("usage_tips")
    if isinstance(tips, str):
        try:
            tips = json.loads(tips)
        except ValueError:
            return {}
    return tips if isinstance(tips, dict) else {}


def _words(words) -> list[str]:
    """Trigger words (or tags) as a clean list: strings only, stripped, each once, in their order."""
    if not isinstance(words, list):
        return []
    return list(dict.fromkeys(w for w in (" ".join(str(x).split()) for x in words if isinstance(x, str)) if w))


def _sidecars(path: Path) -> tuple[Path, Path, Path]:
    """Where Civitai Helper's, A1111's (or our own) and ComfyUI-Lora-Manager's metadata for
    ``path`` would be."""
    return path.with_suffix(".civitai.info"), path.with_suffix(".json"), path.with_suffix(".metadata.json")


def _kind(own: str | None, civitai_type: str | None, path: Path, header) -> str:
    """Our sidecar's kind, else Civitai's model type, else what the file shows (its ``header``):
    LoRA if the tensor names say so (kohya lora_*, PEFT lora_A/B, LyCORIS hada/lokr) or, for
    pickle files and unreadable headers, if the folder is a LoRA folder."""
    if own in ("lora", "ckpt"):
        return own
    if isinstance(civitai_type, str) and civitai_type in CIVITAI_KINDS:
        return CIVITAI_KINDS[civitai_type]
    if header is not None:
        return "lora" if any(_LORA_KEY.search(k) for k in header.tensors) else "ckpt"
    if path.suffix.lower() == ".safetensors":
        log.warning("local: %s is not a valid safetensors file (kind guessed from its folder; the store "
                    "will refuse it)", path.name)
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
