"""The typed values that flow from sources into the universal graph.

A source (Civitai, Hugging Face, a local folder, the mini world's hub) yields ExpertRecords;
the Graph Construction Agent enriches them (homepage text, skill description, local files)
and the catalog stores them. Everything here is plain data, serialisable to JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from diffgraph.families import base_family

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
