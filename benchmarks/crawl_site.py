"""A simulated Civitai at the real site's scale (100,000 models and more), served on loopback.

    python -m diffgraph.benchmarks.crawl_site serve --models 100000 --processable 50 [--seed 0] [--port 0]

Crawl benchmarks of the Graph Construction Agent need a Civitai with ~10^5 models, and this
machine has no network. This server speaks Civitai's REST API v1 as tools/sources/civitai.py
reads it, in the shapes the mini world's hub (miniworld/hub.py) serves for its 22 experts:

- ``GET /api/v1/models``: ``limit`` (1-100, default 100), ``sort`` (Highest Rated, the default;
  Most Downloaded; Newest), ``types`` and ``baseModels`` (repeated or comma-separated),
  ``nsfw`` (``false`` hides NSFW models) and ``cursor``. Cursor paging: an opaque
  ``metadata.nextCursor`` and a ``metadata.nextPage`` URL on the same origin, neither on the
  last page. Other parameters (``period``, ...) are accepted and ignored.
- ``GET|HEAD /api/download/models/{versionId}``: a version's primary file, with Range (206,
  416), Content-Length and Content-Disposition.
- ``GET /models/{id}`` and ``/models/{id}/{slug}``: the model's homepage as plain HTML.
- ``GET /_stats`` (pages, bytes and downloads served) and ``GET /_count`` (how many models the
  listing's filters match): the benchmark's own, not Civitai's.

What is simulated. A model is a row of a few numpy arrays drawn from ``seed`` (type, base
model, NSFW level, number of versions, downloads, likes); its JSON is written when a page
asks for it, from its row and a random generator seeded by its index, so a page costs the
same at any size and nothing else is kept per model. Items are as messy as the real ones
(3-10 KB each, 6 KB on average): HTML descriptions, tags, stats, creator, the licence fields, 1-3 versions
newest first with trained words, images with generation metadata, and beside the primary
model file, often a non-primary fp16 or pruned copy or a training-data zip that a client must
not pick. Image URLs are listed, not served.

Which models can be processed here. The first ``processable`` models, first in every sort
order (they are also the most downloaded and the most liked), are LoRAs for ``miniworld-sd``,
the mini world's tiny base, which this machine renders. Each of their versions publishes one
of the mini world's LoRA files (miniworld/artifacts/experts, the manifest's "lora" entries)
with the low mantissa bits of the last few values of its last tensor set to the version id:
every version has its own bytes and SHA256, and is still a valid safetensors LoRA with the
same tensor names, shapes and finite weights. Only that tail is hashed per version (copies
of the prefix's hash state), so listing stays cheap. Every other model names a real-world
base in Civitai's spellings ("SD 1.5", "SDXL 1.0", "Pony", "Illustrious", "Flux.1 D", ...),
none of which is configured on this machine, so the GCA rejects them without downloading:
their files are not served (404, counted as ``missing_files``), and their published hashes
are stand-ins (the SHA256 of the version id), never checked against bytes.

:func:`running_site` starts the server in a child process, so a benchmark measuring the
client's memory does not count the server's.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import random
import select
import socket
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import typer
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from diffgraph.miniworld import ARTIFACTS, homepages
from diffgraph.miniworld.experts import ExpertSpec
from diffgraph.miniworld.hub import (
    _CIVITAI_ALL_TYPES,
    BadRequest,
    _camel,
    _decode_cursor,
    _disposition,
    _encode_cursor,
    _int_param,
    _multi,
    _serve_bytes,
    load_manifest,
    manifest_experts,
)
from diffgraph.safetensors_header import read_header

MODULE = "diffgraph.benchmarks.crawl_site"
MINI_BASE = "miniworld-sd"
# Civitai's baseModel values with their share of the models that are not processable.
BASES = (("SD 1.5", 26), ("SDXL 1.0", 17), ("Pony", 14), ("Illustrious", 14), ("Flux.1 D", 10), ("NoobAI", 3),
         ("Flux.1 S", 2), ("SD 1.4", 1), ("SD 1.5 LCM", 1), ("SDXL Turbo", 1), ("SDXL Lightning", 1), ("SD 2.1", 1),
         ("SD 3.5", 1), ("Hunyuan Video", 1), ("Wan Video 14B t2v", 1), ("Other", 2))
BASE_NAMES = (MINI_BASE, *(name for name, _ in BASES))  # index = the code in Catalogue.bases
TYPES = (("LORA", 62), ("Checkpoint", 18), ("LoCon", 6), ("DoRA", 2), ("TextualInversion", 7), ("Controlnet", 3),
         ("VAE", 2))
TYPE_NAMES = tuple(name for name, _ in TYPES)
VERSION_COUNTS = ((1, 55), (2, 30), (3, 15))
NSFW_LEVELS = ((1, 78), (2, 6), (4, 8), (8, 5), (16, 3))  # Civitai's levels: PG, PG-13, R, X, XXX
NSFW_FROM = 4  # models at R and above are flagged "nsfw"
SORTS = ("Highest Rated", "Most Downloaded", "Newest")
FIRST_MODEL_ID, FIRST_VERSION_ID = 10_000, 1_000_000
VERSION_SLOTS = 4  # version ids per model (at most 3 versions); a model's newest version has its highest id
NEWEST = datetime(2025, 11, 28, 12, tzinfo=timezone.utc)
SPAN = timedelta(days=3 * 365)  # publication dates of the newest versions, spread evenly over three years

# A version id marks its file's bytes: the low mantissa bits of the last values of the last tensor.
_MARK_BITS = {"F32": 12, "F16": 4}  # bits per value: each changes by at most 0.05% (F32) or 1.5% (F16)
_UINT = {"F32": "<u4", "F16": "<u2"}
_MARK_WIDTH = 32  # version ids fit in 32 bits


# ----------------------------------------------------------------------------- the processable files

@dataclass(frozen=True)
class LoraTemplate:
    """One mini-world LoRA file and what every version's copy of it shares: the bytes before
    the few values that carry the version's mark, and their SHA256 and CRC32 states."""

    spec: ExpertSpec
    path: Path
    data: bytes
    tail_start: int
    dtype: str
    fp: str  # the widest float precision in the file, as Civitai reports it
    prefix_sha256: object  # a hashlib sha256 state, copied per version
    prefix_crc32: int

    @classmethod
    def load(cls, spec: ExpertSpec, path: Path) -> LoraTemplate:
        data, header = path.read_bytes(), read_header(path)
        last = max(header.tensors.values(), key=lambda t: t["data_offsets"][1])
        dtype = last["dtype"]
        if dtype not in _MARK_BITS:
            raise ValueError(f"{path.name}: its last tensor is {dtype}; only {', '.join(_MARK_BITS)} can be marked")
        width = math.ceil(_MARK_WIDTH / _MARK_BITS[dtype]) * np.dtype(_UINT[dtype]).itemsize
        begin, end = (header.data_start + offset for offset in last["data_offsets"])
        if end != len(data) or end - begin < width:
            raise ValueError(f"{path.name}: its last tensor is too small or does not end the file")
        fp = "fp32" if any(t["dtype"] == "F32" for t in header.tensors.values()) else "fp16"
        prefix = data[:end - width]
        return cls(spec, path, data, end - width, dtype, fp, hashlib.sha256(prefix), zlib.crc32(prefix))

    def tail(self, mark: int) -> bytes:
        """The last values with their low mantissa bits replaced by ``mark``'s bits; the
        exponents are untouched, so every value stays finite."""
        bits = _MARK_BITS[self.dtype]
        values = np.frombuffer(self.data, _UINT[self.dtype], offset=self.tail_start).copy()
        low = (1 << bits) - 1
        marks = np.array([(mark >> (bits * k)) & low for k in range(len(values))], values.dtype)
        return ((values & ~values.dtype.type(low)) | marks).tobytes()

    def file(self, mark: int) -> bytes:
        return self.data[:self.tail_start] + self.tail(mark)

    def hashes(self, mark: int) -> tuple[str, int]:
        """(sha256 hex, crc32) of ``file(mark)``, hashing only its tail."""
        tail = self.tail(mark)
        sha256 = self.prefix_sha256.copy()
        sha256.update(tail)
        return sha256.hexdigest(), zlib.crc32(tail, self.prefix_crc32)


def mini_world_loras(artifacts: Path = ARTIFACTS) -> list[LoraTemplate]:
    manifest = load_manifest(artifacts)
    return [LoraTemplate.load(spec, artifacts / entry["file"])
            for spec, entry in manifest_experts(manifest) if entry["kind"] == "lora"]


# ----------------------------------------------------------------------------- the model index

def _draw(rng: np.random.Generator, choices: Sequence[tuple[object, int]], n: int) -> np.ndarray:
    """``n`` indices into ``choices``, drawn with their shares."""
    shares = np.array([share for _, share in choices], float)
    return rng.choice(len(choices), size=n, p=shares / shares.sum()).astype(np.uint8)


class Catalogue:
    """The site's models by index, 0 the newest: a few numpy arrays drawn from ``seed``, the
    index order of each sort, and the mini-world LoRAs the processable models publish."""

    def __init__(self, models: int, processable: int, seed: int = 0):
        if not 0 <= processable <= models:
            raise ValueError(f"processable must be between 0 and models ({models}), not {processable}")
        self.size, self.processable, self.seed = models, processable, seed
        rng = np.random.default_rng(seed)
        self.types = _draw(rng, TYPES, models)
        self.bases = _draw(rng, BASES, models) + 1
        self.versions = _draw(rng, VERSION_COUNTS, models) + 1
        moved = (self.versions > 1) & (rng.random(models) < 0.1)  # older versions on another base
        self.old_bases = np.where(moved, _draw(rng, BASES, models) + 1, self.bases).astype(np.uint8)
        self.nsfw_levels = np.array([level for level, _ in NSFW_LEVELS], np.uint8)[_draw(rng, NSFW_LEVELS, models)]
        self.downloads = rng.lognormal(6.5, 1.8, models).astype(np.int64)
        self.likes = (self.downloads * rng.uniform(0.02, 0.12, models)).astype(np.int64)
        self._make_processable()
        self.orders = {"Newest": np.arange(models),
                       "Most Downloaded": np.argsort(-self.downloads, kind="stable"),
                       "Highest Rated": np.argsort(-self.likes, kind="stable")}
        self.loras = mini_world_loras() if processable else []

    def _make_processable(self) -> None:
        """The first models: SFW mini-world LoRAs, ahead of every other model in every sort."""
        p = self.processable
        self.types[:p] = TYPE_NAMES.index("LORA")
        self.bases[:p] = self.old_bases[:p] = BASE_NAMES.index(MINI_BASE)
        self.nsfw_levels[:p] = 1
        ahead = np.arange(p, 0, -1)
        self.downloads[:p] = self.downloads[p:].max(initial=0) + 100 * ahead
        self.likes[:p] = self.likes[p:].max(initial=0) + ahead

    def matching(self, types: Sequence[str] = (), bases: Sequence[str] = (), sfw_only: bool = False) -> np.ndarray:
        """Which models the listing's filters keep: a model matches ``bases`` when any of its
        versions does; an unknown type or base name matches nothing."""
        mask = np.ones(self.size, bool)
        if types:
            mask &= np.isin(self.types, [TYPE_NAMES.index(t) for t in types if t in TYPE_NAMES])
        if bases:
            codes = [BASE_NAMES.index(b) for b in bases if b in BASE_NAMES]
            mask &= np.isin(self.bases, codes) | ((self.versions > 1) & np.isin(self.old_bases, codes))
        if sfw_only:
            mask &= self.nsfw_levels < NSFW_FROM
        return mask

    def page(self, sort: str, mask: np.ndarray, start: int, limit: int) -> tuple[list[int], int | None]:
        """The indices of up to ``limit`` matching models at or after position ``start`` of the
        sort's order, and the position of the next page's first model (None on the last page)."""
        order = self.orders[sort]
        positions = np.flatnonzero(mask[order])
        first = int(np.searchsorted(positions, start))
        chosen = positions[first:first + limit + 1]
        following = int(chosen[limit]) if len(chosen) > limit else None
        return order[chosen[:limit]].tolist(), following

    def model_id(self, i: int) -> int:
        return FIRST_MODEL_ID + self.size - 1 - i

    def index_of(self, model_id: int) -> int | None:
        i = FIRST_MODEL_ID + self.size - 1 - model_id
        return i if 0 <= i < self.size else None

    def version_id(self, i: int, j: int) -> int:
        """The id of model ``i``'s version ``j`` (0 = its newest)."""
        return FIRST_VERSION_ID + VERSION_SLOTS * (self.size - 1 - i) + int(self.versions[i]) - 1 - j

    def version_of(self, version_id: int) -> tuple[int, int] | None:
        """(model index, version number) of a version id, or None."""
        step, slot = divmod(version_id - FIRST_VERSION_ID, VERSION_SLOTS)
        i = self.size - 1 - step
        if not 0 <= i < self.size or slot >= self.versions[i]:
            return None
        return i, int(self.versions[i]) - 1 - slot

    def base(self, i: int, j: int) -> str:
        return BASE_NAMES[self.bases[i] if j == 0 else self.old_bases[i]]

    def published(self, i: int) -> datetime:
        return NEWEST - SPAN * (i / self.size)

    def lora(self, i: int) -> LoraTemplate | None:
        """The LoRA a processable model publishes; None for every other model."""
        return self.loras[i % len(self.loras)] if i < self.processable else None


# ----------------------------------------------------------------------------- messy item text

STYLES = ("watercolor", "oil painting", "pixel art", "anime", "photorealistic", "cinematic", "ink sketch", "cyberpunk",
          "vaporwave", "art nouveau", "ukiyo-e", "claymation", "isometric", "charcoal", "baroque", "flat vector",
          "stained glass", "synthwave", "comic book", "dark fantasy", "chibi", "low poly", "storybook", "film noir",
          "gothic", "pastel", "steampunk", "retro 80s")
SUBJECTS = ("portraits", "landscapes", "cats", "castles", "food", "flowers", "robots", "spaceships", "city streets",
            "forests", "armor", "dragons", "interiors", "fashion", "cars", "mecha", "knights", "witches", "mermaids",
            "architecture")
ADJECTIVES = ("Ultimate", "Detailed", "Dreamy", "Epic", "Moody", "Soft", "Vivid", "Hyper", "Better", "Perfect",
              "Realistic", "Magical")
NAME_PATTERNS = ("{adj} {style} {subject}", "{style} {subject} | {base}", "[{base}] {style} Style",
                 "✨ {adj} {style} ✨", "{style}Mix v{n}", "{subject} ({style}) - {base}", "{adj}{style} XL",
                 "{style} Slider 🎚️")
TAGS = ("style", "anime", "character", "concept", "clothing", "background", "photorealistic", "landscape", "fantasy",
        "sci-fi", "portrait", "architecture", "animal", "vehicle", "base model", "tool", "cute", "horror", "retro",
        "woman", "man", "armor", "food", "poses", "sliders", "illustration", "3d", "realistic")
QUALITY = ("masterpiece", "best quality", "ultra detailed", "8k", "score_9, score_8_up, score_7_up", "absurdres",
           "highly detailed", "sharp focus", "volumetric lighting", "depth of field")
NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry")
SAMPLERS = ("DPM++ 2M Karras", "Euler a", "DPM++ SDE Karras", "DPM++ 2M SDE", "Euler", "Restart")
SIZES = ((512, 768), (768, 512), (832, 1216), (1024, 1024), (896, 1152), (1216, 832))
CREATORS = tuple(f"{a}{b}" for a in ("neo", "pixel", "lora", "dream", "art", "ghost", "kira", "mika", "zen", "nova")
                 for b in ("smith", "forge", "lab", "works", "_ai", "master", "x", "chan", "studio", "_sd"))
COMMERCIAL = (([], 30), (["Image"], 25), (["Image", "Rent"], 15), (["Image", "RentCivit", "Rent", "Sell"], 20),
              (["RentCivit"], 10))
CHANGELOG = (None, "<p>Initial release.</p>", "<p>Retrained on a cleaner dataset: less colour bleed, better hands.</p>",
             "<p>Fixed the overbaked look at weight 1.0; try 0.7.</p>", "<p>Merged with my previous version.</p>")
CHECKPOINT_OF_BASE = {"SD 1.5": "v1-5-pruned-emaonly", "SDXL 1.0": "sd_xl_base_1.0",
                      "Pony": "ponyDiffusionV6XL_v6StartWithThisOne", "Illustrious": "illustriousXL_v01",
                      "Flux.1 D": "flux1-dev-fp8", "NoobAI": "noobaiXLNAIXL_epsilonPred11Version", MINI_BASE: MINI_BASE}
FILE_KB = {"LORA": (9_000, 220_000), "LoCon": (20_000, 340_000), "DoRA": (10_000, 150_000),
           "Checkpoint": (1_990_000, 6_940_000), "TextualInversion": (4, 200), "Controlnet": (700_000, 2_500_000),
           "VAE": (160_000, 335_000)}


@dataclass(frozen=True)
class _Text:
    """What an author wrote about a model."""

    name: str
    description: str | None
    tags: list[str]
    words: list[str]
    lora_name: str  # how example prompts invoke it: <lora:NAME:0.8>


def _wild_text(kind: str, base: str, rng: random.Random) -> _Text:
    style, subject, adj = rng.choice(STYLES), rng.choice(SUBJECTS), rng.choice(ADJECTIVES)
    name = rng.choice(NAME_PATTERNS).format(adj=adj, style=style.title(), subject=subject.title(), base=base,
                                            n=rng.randint(1, 9))
    words = [] if kind in ("Checkpoint", "VAE", "Controlnet") and rng.random() < 0.7 else (
        rng.sample([f"{style} style", style.replace(" ", "_"), subject, f"{adj.lower()} {subject}", "1girl"],
                   rng.randint(1, 3)))
    tags = sorted({*rng.sample(TAGS, rng.randint(2, 8)), style})
    description = None if rng.random() < 0.03 else _description(rng, f"{adj} {style} {kind} for {subject}.", words)
    return _Text(name, description, tags, words, _camel(name) or "model")


def _mini_text(spec: ExpertSpec, i: int, templates: int, rng: random.Random) -> _Text:
    """A processable model's text: its LoRA's own title, homepage claim, tags and trigger words
    (model ``i`` publishes LoRA ``i % templates``; its later copies are named remixes)."""
    name = spec.title if i < templates else f"{spec.title} remix {i // templates}"
    description = homepages.civitai_description(spec) + _description(rng, "Trained on the mini world.", [])
    return _Text(name, description, sorted({*spec.tags, "style"}), list(spec.trigger_words), spec.slug)


def _description(rng: random.Random, intro: str, words: list[str]) -> str:
    """A few paragraphs as Civitai authors write them: usage, settings, thanks, warnings."""
    extras = [
        f"<p>{html.escape(intro)} Trained on {rng.randint(20, 400)} hand-picked images for "
        f"{rng.randint(4, 30)} epochs. Works best with {rng.choice(SAMPLERS)}.</p>",
        "<p><strong>Recommended settings</strong></p><ul><li>Weight: 0.6 - 0.9</li><li>Steps: 25 - 30</li>"
        "<li>CFG scale: 5 - 7</li><li>Hires fix: 4x-UltraSharp, denoise 0.35</li></ul>",
        "<p>Trigger words: " + ", ".join(f"<code>{html.escape(w)}</code>" for w in words) + "</p>" if words else "",
        "<h3>Changelog</h3><p>v2: retrained with a cleaner dataset; less colour bleed on skin tones.</p>",
        f'<p>If you like my work, consider supporting me on <a target="_blank" rel="ugc" '
        f'href="https://ko-fi.com/{rng.choice(CREATORS)}">Ko-fi</a> ❤️ and leave a review!</p>',
        "<p><em>Please do not use this model to make content that breaks the site's terms of service.</em></p>",
    ]
    return "".join(p for p in extras if p and rng.random() < 0.75) or extras[0]


# ----------------------------------------------------------------------------- Civitai JSON

def _iso(when: datetime) -> str:
    """As Civitai writes times: 2025-11-28T12:00:00.000Z."""
    return when.isoformat(timespec="milliseconds")[:23] + "Z"


def model_json(cat: Catalogue, i: int, base_url: str) -> dict:
    """Model ``i`` as ``/api/v1/models`` lists it."""
    rng = random.Random((cat.seed << 32) + i)
    kind, lora, level = TYPE_NAMES[cat.types[i]], cat.lora(i), int(cat.nsfw_levels[i])
    text = (_mini_text(lora.spec, i, len(cat.loras), rng) if lora is not None
            else _wild_text(kind, cat.base(i, 0), rng))
    dates = [cat.published(i)]
    for _ in range(1, int(cat.versions[i])):
        dates.append(dates[-1] - timedelta(days=rng.randint(7, 150), minutes=rng.randint(0, 1440)))
    downloads, likes = int(cat.downloads[i]), int(cat.likes[i])
    return {
        "id": cat.model_id(i), "name": text.name, "description": text.description,
        "allowNoCredit": rng.random() < 0.7,
        "allowCommercialUse": rng.choices([c for c, _ in COMMERCIAL], [w for _, w in COMMERCIAL])[0],
        "allowDerivatives": rng.random() < 0.85, "allowDifferentLicense": rng.random() < 0.6,
        "type": kind, "minor": False, "sfwOnly": level < NSFW_FROM and rng.random() < 0.1, "poi": False,
        "nsfw": level >= NSFW_FROM, "nsfwLevel": level, "availability": "Public", "cosmetic": None,
        "supportsGeneration": rng.random() < 0.4,
        "stats": {"downloadCount": downloads, "favoriteCount": likes // 3, "thumbsUpCount": likes,
                  "thumbsDownCount": likes // rng.randint(40, 400), "commentCount": likes // rng.randint(5, 50),
                  "ratingCount": 0, "rating": 0, "tippedAmountCount": rng.randint(0, 2_000)},
        "creator": {"username": rng.choice(CREATORS) + (str(rng.randint(1, 99)) if rng.random() < 0.4 else ""),
                    "image": None},
        "tags": text.tags,
        "modelVersions": [_version_json(cat, i, j, text, when, rng, base_url) for j, when in enumerate(dates)],
    }


def _version_json(cat: Catalogue, i: int, j: int, text: _Text, when: datetime, rng: random.Random,
                  base_url: str) -> dict:
    version_id, base, level = cat.version_id(i, j), cat.base(i, j), int(cat.nsfw_levels[i])
    name = f"v{int(cat.versions[i]) - j}.0"
    downloads = int(cat.downloads[i]) >> j
    url = f"{base_url}/api/download/models/{version_id}"
    return {
        "id": version_id, "modelId": cat.model_id(i), "index": j, "name": name, "baseModel": base,
        "baseModelType": "Standard", "createdAt": _iso(when - timedelta(hours=rng.randint(1, 30))),
        "updatedAt": _iso(when), "publishedAt": _iso(when), "status": "Published", "availability": "Public",
        "nsfwLevel": level, "description": rng.choice(CHANGELOG), "trainedWords": text.words,
        "trainingStatus": None, "trainingDetails": None,
        "stats": {"downloadCount": downloads, "ratingCount": 0, "rating": 0,
                  "thumbsUpCount": int(cat.likes[i]) >> j, "thumbsDownCount": 0},
        "files": _files_json(cat, i, version_id, f"{_camel(text.name) or 'model'}_{_camel(name)}", when, rng, url),
        "images": [_image_json(version_id * 8 + k, text, base, level if k == 0 else 1, rng, base_url)
                   for k in range(rng.randint(1, 3) if j == 0 else 1)],
        "downloadUrl": url, "supportsGeneration": False,
    }


def _files_json(cat: Catalogue, i: int, version_id: int, stem: str, when: datetime, rng: random.Random,
                url: str) -> list[dict]:
    """The primary model file and, as on the real site, sometimes a non-primary fp16 copy
    (first, now and then) and a training-data zip."""
    kind, lora = TYPE_NAMES[cat.types[i]], cat.lora(i)
    if lora is not None:
        sha256, crc32 = lora.hashes(version_id)
        size_kb, fp = len(lora.data) / 1024, lora.fp
    else:
        sha256, crc32 = hashlib.sha256(f"{cat.seed}/{version_id}".encode()).hexdigest(), rng.getrandbits(32)
        size_kb, fp = rng.uniform(*FILE_KB[kind]), rng.choice(("fp16", "fp32", "bf16"))
    scanned = _iso(when + timedelta(minutes=rng.randint(2, 90)))
    files = [_file_json(version_id * 4, f"{stem}.safetensors", "Model", size_kb, scanned,
                        {"format": "SafeTensor", "size": "full", "fp": fp}, sha256, crc32, url, primary=True)]
    if rng.random() < (0.6 if kind == "Checkpoint" else 0.2):
        copy = _file_json(version_id * 4 + 1, f"{stem}_fp16.safetensors",
                          "Pruned Model" if kind == "Checkpoint" else "Model", size_kb / 2, scanned,
                          {"format": "SafeTensor", "size": "pruned", "fp": "fp16"}, _stand_in(version_id, 1),
                          rng.getrandbits(32), f"{url}?type=Model&format=SafeTensor&size=pruned&fp=fp16")
        files.insert(rng.randint(0, 1), copy)
    if rng.random() < (0.25 if kind != "Checkpoint" else 0.03):
        files.append(_file_json(version_id * 4 + 2, f"{stem}_training_data.zip", "Training Data",
                                rng.uniform(2_000, 900_000), scanned, {"format": "Other"}, _stand_in(version_id, 2),
                                rng.getrandbits(32), f"{url}?type=Training%20Data"))
    return files


def _stand_in(version_id: int, file: int) -> str:
    return hashlib.sha256(f"{version_id}/{file}".encode()).hexdigest()


def _file_json(file_id: int, name: str, kind: str, size_kb: float, scanned: str, metadata: dict, sha256: str,
               crc32: int, url: str, primary: bool = False) -> dict:
    return {"id": file_id, "sizeKB": size_kb, "name": name, "type": kind, "pickleScanResult": "Success",
            "pickleScanMessage": "No Pickle imports", "virusScanResult": "Success", "virusScanMessage": None,
            "scannedAt": scanned, "metadata": metadata,
            "hashes": {"AutoV2": sha256[:10].upper(), "SHA256": sha256.upper(), "CRC32": f"{crc32:08X}"},
            "primary": primary, "downloadUrl": url}


def _image_json(image_id: int, text: _Text, base: str, level: int, rng: random.Random, base_url: str) -> dict:
    width, height = rng.choice(SIZES)
    meta = _image_meta(text, base, width, height, rng) if rng.random() < 0.85 else None
    blurhash = base64.b85encode(rng.randbytes(21)).decode()  # as long as a BlurHash, not a valid one
    return {"id": image_id, "url": f"{base_url}/images/{image_id}.jpeg", "nsfwLevel": level, "width": width,
            "height": height, "hash": blurhash, "type": "image",
            "metadata": {"hash": blurhash, "size": rng.randint(80_000, 2_400_000),
                         "width": width, "height": height},
            "meta": meta, "availability": "Public", "hasMeta": meta is not None,
            "hasPositivePrompt": meta is not None, "onSite": False, "remixOfId": None}


def _image_meta(text: _Text, base: str, width: int, height: int, rng: random.Random) -> dict:
    checkpoint = CHECKPOINT_OF_BASE.get(base, _camel(base))
    model_hash = f"{rng.getrandbits(40):010x}"
    prompt = ", ".join([*rng.sample(QUALITY, 3), *text.words, rng.choice(SUBJECTS), rng.choice(STYLES),
                        f"<lora:{text.lora_name}:0.8>"])
    meta = {"Size": f"{width}x{height}", "seed": rng.getrandbits(32), "Model": checkpoint,
            "steps": rng.choice((20, 25, 28, 30, 35)), "hashes": {"model": model_hash}, "prompt": prompt,
            "Version": rng.choice(("v1.10.1", "f2.0.1v1.10.1-previous-313", "ComfyUI")),
            "sampler": rng.choice(SAMPLERS), "cfgScale": rng.choice((3.5, 5, 6, 7, 7.5)),
            "clipSkip": rng.choice((1, 2)), "Model hash": model_hash, "negativePrompt": NEGATIVE,
            "resources": [{"hash": f"{rng.getrandbits(40):010x}", "name": text.lora_name, "type": "lora",
                           "weight": 0.8}, {"hash": model_hash, "name": checkpoint, "type": "model"}]}
    if rng.random() < 0.4:
        meta.update({"Denoising strength": 0.35, "Hires upscale": 1.5, "Hires upscaler": "4x-UltraSharp"})
    return meta


def _primary_file(cat: Catalogue, i: int, j: int, base_url: str) -> dict:
    version = model_json(cat, i, base_url)["modelVersions"][j]
    return next(f for f in version["files"] if f["primary"])


# ----------------------------------------------------------------------------- homepage

def model_page(model: dict) -> str:
    """A Civitai-like model page in plain HTML: what the GCA reads without a browser."""
    newest = model["modelVersions"][0]
    file = next(f for f in newest["files"] if f["primary"])
    esc = html.escape
    versions = "".join(f"<li>{esc(v['name'])}: {esc(v['baseModel'])}, published {v['publishedAt'][:10]}</li>"
                       for v in model["modelVersions"])
    words = "".join(f"<li><code>{esc(w)}</code></li>" for w in newest["trainedWords"]) or "<li>none</li>"
    details = [("Type", model["type"]), ("Base model", newest["baseModel"]), ("Creator", model["creator"]["username"]),
               ("Downloads", model["stats"]["downloadCount"]), ("File", f"{file['name']} ({file['sizeKB']:.1f} KB)"),
               ("SHA256", file["hashes"]["SHA256"]),
               ("Allow commercial use", ", ".join(model["allowCommercialUse"]) or "None"),
               ("Allow derivatives", "yes" if model["allowDerivatives"] else "no")]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in details)
    tags = ", ".join(esc(t) for t in model["tags"])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(model["name"])} | '
            f'{esc(model["type"])} | Civitai</title></head><body><main><h1>{esc(model["name"])}</h1>'
            f'<section><h2>About this model</h2>{model["description"] or ""}</section>'
            f"<section><h2>Trigger words</h2><ul>{words}</ul></section>"
            f"<section><h2>Versions</h2><ul>{versions}</ul></section>"
            f"<section><h2>Details</h2><dl>{rows}</dl></section>"
            f"<section><h2>Tags</h2><p>{tags}</p></section></main></body></html>")


# ----------------------------------------------------------------------------- the app

def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _json_bytes(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _filters(cat: Catalogue, request: Request) -> np.ndarray:
    """The mask of models that ``types``, ``baseModels`` and ``nsfw`` keep."""
    types = _multi(request, "types")
    if bad := set(types) - _CIVITAI_ALL_TYPES:
        raise BadRequest(f"Invalid model type: {', '.join(sorted(bad))}")
    nsfw = (request.query_params.get("nsfw") or "").lower()
    return cat.matching(types, _multi(request, "baseModels"), sfw_only=nsfw in ("false", "0"))


def _cursor_position(cursor: str | None) -> int:
    if not cursor:
        return 0
    key = _decode_cursor(cursor)
    if len(key) != 1 or not isinstance(key[0], int) or key[0] < 0:
        raise BadRequest(f"Invalid cursor: {cursor}")
    return key[0]


def _listing(cat: Catalogue, request: Request) -> bytes:
    q = request.query_params
    sort = q.get("sort", "Highest Rated")
    if sort not in SORTS:
        raise BadRequest(f"Invalid sort: {sort}; expected one of {', '.join(SORTS)}")
    limit = _int_param(q.get("limit"), 100, 1, 100, "limit")
    indices, following = cat.page(sort, _filters(cat, request), _cursor_position(q.get("cursor")), limit)
    metadata = {}
    if following is not None:
        cursor = _encode_cursor((following,))
        metadata = {"nextCursor": cursor, "nextPage": str(request.url.include_query_params(cursor=cursor))}
    base_url = _base_url(request)
    return _json_bytes({"items": [model_json(cat, i, base_url) for i in indices], "metadata": metadata})


def _download(cat: Catalogue, version_id: str, request: Request) -> Response | None:
    """The primary file of a processable model's version; None for anything else: other
    models' files, and the non-primary files (their URLs say which file: ``?type=...&fp=...``)."""
    located = cat.version_of(int(version_id)) if version_id.isdigit() else None
    other_file = any(key in request.query_params for key in ("type", "format", "size", "fp"))
    if located is None or other_file or cat.lora(located[0]) is None:
        return None
    i, j = located
    name = _primary_file(cat, i, j, _base_url(request))["name"]
    data = cat.lora(i).file(int(version_id))
    return _serve_bytes(request, data, {"Content-Disposition": _disposition(name)})


def create_app(cat: Catalogue) -> FastAPI:
    """The site as an ASGI app; ``app.state.stats`` counts what it served. Handlers are async
    so they run on the event loop's one thread and the counters need no lock."""
    app = FastAPI(title="DiffGraph crawl site", docs_url=None, redoc_url=None, openapi_url=None)
    stats = app.state.stats = dict.fromkeys(
        ("pages", "page_bytes", "downloads", "download_bytes", "missing_files", "homepages", "homepage_bytes"), 0)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/api/v1/models")
    async def list_models(request: Request):
        body = _listing(cat, request)
        stats["pages"] += 1
        stats["page_bytes"] += len(body)
        return Response(body, media_type="application/json")

    @app.api_route("/api/download/models/{version_id}", methods=["GET", "HEAD"])
    async def download(version_id: str, request: Request):
        response = _download(cat, version_id, request)
        if response is None:
            stats["missing_files"] += 1
            return JSONResponse({"error": "File not found (the simulated site serves processable models' "
                                          "primary files only)"}, status_code=404)
        if request.method == "GET":
            stats["downloads"] += 1
            stats["download_bytes"] += int(response.headers["content-length"])
        return response

    @app.get("/models/{model_id}", response_class=HTMLResponse)
    @app.get("/models/{model_id}/{slug}", response_class=HTMLResponse)
    async def homepage(model_id: str, request: Request):  # the slug is decoration, as on Civitai
        i = cat.index_of(int(model_id)) if model_id.isdigit() else None
        if i is None:
            return HTMLResponse("<!doctype html><title>Not found</title><h1>Model not found</h1>", status_code=404)
        page = model_page(model_json(cat, i, _base_url(request)))
        stats["homepages"] += 1
        stats["homepage_bytes"] += len(page.encode())
        return HTMLResponse(page)

    @app.get("/_stats")
    async def get_stats():
        return {"models": cat.size, "processable": cat.processable, **stats}

    @app.get("/_count")
    async def count(request: Request):
        return {"count": int(_filters(cat, request).sum())}

    return app


# ----------------------------------------------------------------------------- running it

def serve(models: int, processable: int, *, seed: int = 0, port: int = 0) -> None:
    """Serve on 127.0.0.1 in the foreground until SIGTERM/SIGINT. The URL is printed as the first
    line of stdout once the socket listens (connections made before the loop runs wait in the
    backlog)."""
    app = create_app(Catalogue(models, processable, seed))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])


@dataclass(frozen=True)
class CrawlSite:
    """A running site: its URL, its process id, and the benchmark's own endpoints."""

    url: str
    pid: int

    def stats(self) -> dict:
        """Pages, bytes and downloads served so far."""
        return httpx.get(f"{self.url}/_stats", timeout=30).json()

    def count(self, types: Sequence[str] = (), base_models: Sequence[str] = (), nsfw: bool | None = None) -> int:
        """How many models the listing's filters match (what a full walk should yield)."""
        params = [("types", t) for t in types] + [("baseModels", b) for b in base_models]
        params += [("nsfw", str(nsfw).lower())] if nsfw is not None else []
        return httpx.get(f"{self.url}/_count", params=params, timeout=30).json()["count"]


@contextmanager
def running_site(models: int, processable: int, *, seed: int = 0, timeout: float = 60) -> Iterator[CrawlSite]:
    """Serve the site from a child process (``python -m ... serve``) for a ``with`` block."""
    command = [sys.executable, "-m", MODULE, "serve", "--models", str(models), "--processable", str(processable),
               "--seed", str(seed), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        yield CrawlSite(_read_url(process, timeout), process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _read_url(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("http://"):
        raise RuntimeError(f"the crawl site did not start within {timeout:.0f} s (exit code {process.poll()})")
    return line.strip()


cli = typer.Typer(add_completion=False)


@cli.callback()
def main() -> None:
    """A simulated Civitai at any scale, served on loopback (see the module's docstring)."""


@cli.command("serve")
def serve_command(models: int = typer.Option(100_000, help="Models the site lists."),
                  processable: int = typer.Option(50, help="Mini-world LoRAs among them, first in every order."),
                  seed: int = typer.Option(0, help="Seed of everything the site publishes."),
                  port: int = typer.Option(0, help="Port on 127.0.0.1 (0: a free one).")) -> None:
    """Serve the site until interrupted; prints its URL first."""
    serve(models, processable, seed=seed, port=port)


if __name__ == "__main__":
    cli()
