"""The offline brain: deterministic stand-ins for the LLM steps (describe an expert, decompose a
prompt, review candidates), used when no LLM endpoint is configured and as the fallback when
the endpoint fails or answers garbage.

It reads prompts the way the LLM is asked to: drop boilerplate quality tags to get the basic
needs, split the prompt into its phrases (components), and turn each modifier of a phrase into
a visual attribute ("striped white background" -> "striped background", "white background").
"""

from __future__ import annotations

import re

from diffgraph.graph_store.records import ExpertRecord
from diffgraph.graph_store.store import GraphStore
from diffgraph.tools import select
from diffgraph.tools.page_text import html_to_lines

from . import injection
from .prompts import SkillDescription

# Community boilerplate that says nothing about content (A1111/Civitai habits).
QUALITY_TAGS = (
    "masterpiece", "best quality", "high quality", "highly detailed", "ultra detailed", "award winning", "4k", "8k",
    "trending on artstation", "intricate", "professional", "beautiful composition", "octane render", "centered",
    "detailed", "sharp", "hdr", "uhd", "photorealistic", "absurdres",
)
ARTICLES = {"a", "an", "the", "some", "image", "picture", "photo", "of"}
ABSENCE_START = re.compile(rf"\b({'|'.join(select.ABSENCE_WORDS)})\b")
SPLIT = re.compile(r",|;|\band\b(?! white)|\bwith\b|\bagainst\b|\bon\b|\bin\b|\bunder\b|\bover\b")


def strip_boilerplate(prompt: str) -> str:
    text = " " + prompt.lower() + " "
    for tag in sorted(QUALITY_TAGS, key=len, reverse=True):
        text = re.sub(rf"(?<![a-z]){re.escape(tag)}(?![a-z])", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return " ".join(text.replace(" ,", ",").split()).strip(" ,")


def summarise(prompt: str) -> str:
    """The basic needs s: the prompt without boilerplate (subject and overall style stay)."""
    return strip_boilerplate(prompt) or prompt.strip()


def components(prompt: str) -> list[str]:
    """The prompt's phrases, e.g. 'a pink circle', 'striped white background', 'warm light'.
    A phrase asking for an absence ('no outline', 'without blur') is not one of them
    (select.asks_for_absence)."""
    text = ABSENCE_START.sub(r", \1", strip_boilerplate(prompt))  # "... background no outline": two phrases
    out = []
    for p in SPLIT.split(text):
        words = [w for w in re.findall(r"[a-z]+", p) if w not in ARTICLES]
        if words and not select.asks_for_absence(p):
            out.append(" ".join(words))
    return list(dict.fromkeys(out))


def attributes(component: str) -> list[str]:
    """Visual attributes of one phrase: each modifier paired with the head noun."""
    words = component.split()
    if len(words) <= 2 or "and" in words:  # "black and white" is one attribute
        return [component]
    head, modifiers = words[-1], words[:-1]
    return [f"{m} {head}" for m in modifiers]


def decompose(prompt: str) -> list[dict]:
    """Chain-of-thought stand-in: components, each with the visual attributes it needs."""
    return [{"component": c, "attributes": attributes(c)} for c in components(prompt)]


def review(store: GraphStore, candidates: list[select.Pick], base_model: str) -> list[select.Pick]:
    """The review without an LLM: the relevant candidates (tools/select.py's rule), near-duplicates
    pruned, at most one checkpoint and a few LoRAs."""
    return select.prune(store, [c for c in candidates if select.relevant(store, c, base_model)])


GENERIC_TAGS = {"lora", "checkpoint", "style", "base model", "sd", "stable diffusion", "text-to-image", "diffusers",
                "safetensors", "template:sd-lora", "region:us"}


def offline_description(record: ExpertRecord, page) -> SkillDescription:
    """The offline brain: a description assembled from the source's fields and the page's
    structured fields, plus the first descriptive sentences of the source's description or, without
    one, of the page (injection.claim: never a sentence addressed to a reader; hidden text never
    reaches here, the reader returns visible text only)."""
    tags = [t for t in dict.fromkeys([*record.tags, *(page.tags if page else [])])
            if t.lower() not in GENERIC_TAGS and ":" not in t and t.lower() != record.base_model.lower()
            and not injection.suspicious(t)]
    name = injection.display_name(record)
    claim = (injection.claim(html_to_lines(record.source_description), field=True)
             or injection.claim(page.visible_text.split("\n") if page else (), skip=page.example_prompts if page else ())
             or name)
    kind = "LoRA adapter" if record.kind == "lora" else "full checkpoint"
    base = record.base_model if not injection.suspicious(record.base_model) else "its base model"
    triggers = injection.listed_triggers(record, page)
    return SkillDescription(
        summary=f"{name} ({kind} for {base}): {claim}",
        skills=tags[:injection.MAX_ITEMS], visual_attributes=[w for w in triggers if w][:injection.MAX_ITEMS], trigger_words=triggers[:injection.MAX_ITEMS],
    )
