"""The offline brain: deterministic stand-ins for the LLM steps of the Expert Selection Agent,
used when no LLM endpoint is configured (and as the fallback when the endpoint fails).

It reads prompts the way the LLM is asked to: drop boilerplate quality tags to get the basic
needs, split the prompt into its phrases (components), and turn each modifier of a phrase into
a visual attribute ("striped white background" -> "striped background", "white background").
"""

from __future__ import annotations

import re

# Community boilerplate that says nothing about content (A1111/Civitai habits).
QUALITY_TAGS = (
    "masterpiece", "best quality", "high quality", "highly detailed", "ultra detailed", "award winning", "4k", "8k",
    "trending on artstation", "intricate", "professional", "beautiful composition", "octane render", "centered",
    "detailed", "sharp", "hdr", "uhd", "photorealistic", "absurdres",
)
ARTICLES = {"a", "an", "the", "some", "image", "picture", "photo", "of"}
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
    """The prompt's phrases, e.g. 'a pink circle', 'striped white background', 'warm light'."""
    parts = [p.strip() for p in SPLIT.split(strip_boilerplate(prompt))]
    out = []
    for p in parts:
        words = [w for w in re.findall(r"[a-z]+", p) if w not in ARTICLES]
        if words:
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
