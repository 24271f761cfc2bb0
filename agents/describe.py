"""Describe (paper Sec. 3.1, node registration): a concise skill description of an expert,
written by the LLM from its homepage (or by the offline brain from the page's fields), then
validated by the injection defence (agents/injection.py). Page text and API fields reach the
LLM only as delimited data (agents/prompts.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from diffgraph.graph_store.records import ExpertRecord
from diffgraph.tools.page_text import html_to_lines, strip_invisible

from . import brain, injection, prompts


@dataclass
class Description:
    """A validated description, its text for embedding, and what validation removed."""

    description: dict
    text: str
    brain: str  # "llm" | "offline" | "offline (llm failed: ...)"
    dropped: list[str] = field(default_factory=list)


def description_text(desc: dict) -> str:
    """The text that is embedded as the node feature."""
    parts = [desc["summary"]]
    for key, label in (("skills", "Skills"), ("styles", "Styles"), ("visual_attributes", "Visual attributes"),
                       ("subjects", "Subjects"), ("trigger_words", "Trigger words")):
        if desc.get(key):
            parts.append(f"{label}: {', '.join(desc[key])}.")
    return " ".join(parts)


_DELIMITERS = re.compile(r"<\s*/?\s*(homepage_data|metadata)\s*>", re.IGNORECASE)


def _field(value: str, limit: int = 300) -> str:
    """A metadata value for the prompt: one line, no delimiters of ours, bounded."""
    return " ".join(_DELIMITERS.sub(" ", strip_invisible(str(value))).split())[:limit]


def describe(record: ExpertRecord, page, llm=None) -> Description:
    """Describe an expert: the LLM when given (with validation), else the offline brain."""
    offline = brain.offline_description(record, page)
    if llm is None:
        desc, dropped = injection.validate(offline, record, page, offline.summary)
        return Description(desc, description_text(desc), "offline", dropped)
    prompt = prompts.DESCRIBE.format(
        name=_field(record.name), kind=record.kind, base_model=_field(record.base_model),
        tags=_field(", ".join(record.tags)), triggers=_field(", ".join(record.trigger_words)),
        page_text=_DELIMITERS.sub(" ", page.visible_text[:8000] if page else "\n".join(html_to_lines(
            record.source_description))[:8000]),
    )
    try:
        raw = llm.with_structured_output(prompts.SkillDescription, method="function_calling").invoke(prompt)
        if not isinstance(raw, prompts.SkillDescription):
            raise ValueError("the model did not call the SkillDescription tool")
        brain_used = "llm"
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
        raw, brain_used = offline, f"offline (llm answer unusable: {type(exc).__name__})"
    except Exception as exc:  # endpoint dead, timeout, HTTP error: registration must go on
        raw, brain_used = offline, f"offline (llm unavailable: {type(exc).__name__})"
    desc, dropped = injection.validate(raw, record, page, offline.summary)
    if brain_used == "llm":
        desc, dropped = injection.keep_facts(desc, dropped, injection.validate(offline, record, page, offline.summary)[0])
    return Description(desc, description_text(desc), brain_used, dropped)
