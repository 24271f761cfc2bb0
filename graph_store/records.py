"""The typed values that flow from sources into the universal graph.

A source (Civitai, Hugging Face, a local folder, the mini world's hub) yields ExpertRecords;
the Graph Construction Agent enriches them (homepage text, skill description, local files)
and the catalog stores them. Everything here is plain data, serialisable to JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from diffgraph.families import base_family
from diffgraph.settings import Settings

Kind = Literal["ckpt", "lora"]
Status = Literal["pending", "active", "rejected", "failed", "removed"]


@dataclass
class ExpertFile:
    """One downloadable file of an expert version."""

    name: str  # as published; never used as a path
    url: str
    sha256: str | None  # lower-case hex as published (None when the source publishes none)
    size: int | None = None
    primary: bool = True
    local_path: str | None = None  # set once downloaded into the content-addressed store


@dataclass
class ExpertRecord:
    """An expert version as a source describes it.

    ``id`` is stable across runs: "<source>:<source_id>", so a re-crawl finds the same row,
    and a new ``version`` of the same id replaces its predecessor.
    """

    source: str  # "civitai" | "hf" | "local"
    source_id: str  # Civitai model id, HF repo id, or a file path for local
    version: str  # Civitai version id, HF commit sha, or file sha256 for local
    name: str
    kind: Kind
    base_model: str
    files: list[ExpertFile] = field(default_factory=list)
    homepage_url: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    license: dict = field(default_factory=dict)
    published_at: str | None = None  # ISO 8601
    source_description: str = ""  # the description text the API returned (untrusted)
    declared_base: str = ""  # the base model as published ("SD 1.5", "Pony"), kept for display
    preferred_weight: float | None = None  # the LoRA weight its publisher or user recommends (A1111's "preferred weight")
    nsfw_level: int = 0  # Civitai's browsing level bits (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX); 0 unknown

    def __post_init__(self):
        # One vocabulary: ``base_model`` is the family every lookup uses, whatever the spelling.
        if not self.declared_base:
            self.declared_base = self.base_model
        self.base_model = base_family(self.base_model)

    @property
    def id(self) -> str:
        return f"{self.source}:{self.source_id}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertRecord":
        d = dict(d)
        d["files"] = [ExpertFile(**f) for f in d.get("files", [])]
        return cls(**d)


# ---- terms of use: NSFW level and licence ------------------------------------------------------

NSFW_BITS = 4 | 8 | 16  # R, X, XXX: any of Civitai's browsing levels above PG-13
LICENCE_TERMS = ("commercial", "derivatives", "no-credit", "relicense")
# Hugging Face licence ids (the card's ``license``) that allow commercial use of the weights' outputs
_COMMERCIAL_IDS = {"apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
                   "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "bsd-3-clause", "bsd-2-clause", "unlicense"}
_CIVITAI_TERMS = {"derivatives": "allowDerivatives", "no-credit": "allowNoCredit", "relicense": "allowDifferentLicense"}


def is_nsfw(nsfw_level: int) -> bool:
    return bool(nsfw_level & NSFW_BITS)


def licence_grants(licence: dict, term: str) -> bool | None:
    """Whether an expert's licence (as its source published it: Civitai's allow* fields or a
    Hugging Face licence id) grants ``term`` (LICENCE_TERMS); None when it does not say."""
    if term not in LICENCE_TERMS:
        raise ValueError(f"unknown licence term {term!r}; use {', '.join(LICENCE_TERMS)}")
    if term == "commercial" and "allowCommercialUse" in licence:
        value = licence["allowCommercialUse"]  # a list of uses ("Image", "Rent", "Sell") or, in older answers, one
        uses = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        return any(u in ("Image", "Rent", "RentCivit", "Sell") for u in uses)
    if term in _CIVITAI_TERMS and isinstance(licence.get(_CIVITAI_TERMS[term]), bool):
        return licence[_CIVITAI_TERMS[term]]
    spdx = str(licence.get("license") or "").lower()
    if term == "commercial" and spdx:
        if "nc" in spdx.split("-") or "non-commercial" in spdx or "noncommercial" in spdx:
            return False
        return True if spdx in _COMMERCIAL_IDS else None
    return None


@dataclass(frozen=True)
class UsePolicy:
    """Which experts may be crawled and used: NSFW ones only when ``nsfw`` (off by default), and
    only experts whose licence grants each of ``licence``'s terms (one that does not say counts
    as not granting: a user asking for commercial use wants to be sure)."""

    nsfw: bool = False
    licence: tuple[str, ...] = ()

    @classmethod
    def parse(cls, licence: str | None = None, nsfw: str | bool | None = None) -> "UsePolicy":
        """From words as users and specs write them: ``licence="commercial,derivatives"``,
        ``nsfw="true"``; ValueError (one line) for an unknown term."""
        terms = tuple(t.strip().lower() for t in (licence or "").split(",") if t.strip() and t.strip() != "any")
        for term in terms:
            licence_grants({}, term)  # raises for an unknown term
        allow = nsfw if isinstance(nsfw, bool) else str(nsfw or "false").strip().lower() in ("1", "true", "yes", "on")
        return cls(nsfw=allow, licence=terms)

    @classmethod
    def from_settings(cls, settings: Settings) -> "UsePolicy":
        """DIFFGRAPH_NSFW and DIFFGRAPH_LICENCE: what generation may use."""
        return cls.parse(settings.licence, settings.nsfw)

    def refuses(self, nsfw_level: int, licence: dict) -> str | None:
        """Why an expert is outside this policy, or None when it is admitted."""
        if not self.nsfw and is_nsfw(nsfw_level):
            return "NSFW (set nsfw=true to include it)"
        for term in self.licence:
            if not licence_grants(licence, term):
                return f"its licence does not grant {term} use" if term == "commercial" else \
                    f"its licence does not grant {term}"
        return None


# The structured skill description the Graph Construction Agent writes for an expert (by an
# LLM or the offline brain): a one- or two-sentence "summary" plus these fields, each a list of
# short strings. Fixed fields, so that code rather than the LLM decides what a valid description is.
DESCRIPTION_FIELDS = ("skills", "subjects", "styles", "visual_attributes", "trigger_words", "caveats")


def check_description(description: dict) -> dict:
    """Return ``description`` with every field present (missing ones empty), or raise ValueError.

    Unknown keys and values of the wrong type are errors rather than being dropped, so a
    malformed LLM answer fails loudly at registration instead of reaching the catalog.
    """
    unknown = set(description) - {"summary", *DESCRIPTION_FIELDS}
    if unknown:
        raise ValueError(f"unknown description fields: {sorted(unknown)}")
    summary = description.get("summary", "")
    if not isinstance(summary, str):
        raise ValueError("description field 'summary' must be a string")
    checked = {"summary": summary}
    for key in DESCRIPTION_FIELDS:
        items = description.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"description field {key!r} must be a list of strings")
        checked[key] = list(items)
    return checked
