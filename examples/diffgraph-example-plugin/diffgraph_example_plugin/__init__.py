"""An example DiffGraph plugin: two LangChain tools, registered in pyproject.toml under the
entry-point group ``diffgraph.tools``. Nothing here imports diffgraph."""

from __future__ import annotations

import hashlib
import re

from langchain_core.tools import tool

SHORTHAND = {
    "warm": "warm light",
    "night": "at night",
    "stripes": "striped background",
    "dots": "polka dot background",
    "checks": "checkered background",
    "sepia": "vintage sepia photo",
    "neon": "neon style",
    "pastel": "pastel colors",
    "blurry": "blurry",
    "outline": "with a black outline",
}


@tool
def lucky_seed(text: str) -> int:
    """A reproducible lucky seed (0-99999) from any word or phrase, e.g. a name. Use it when the
    user asks for a lucky, personal or named seed."""
    return int(hashlib.sha256(text.strip().lower().encode()).hexdigest(), 16) % 100_000


@tool
def expand_shorthand(prompt: str) -> str:
    """Expand hashtags in an image prompt (#warm, #night, #stripes, #dots, #checks, #sepia, #neon,
    #pastel, #blurry, #outline) into the phrases experts are described with."""
    def replace(match: re.Match) -> str:
        phrase = SHORTHAND.get(match.group(1).lower())
        return f", {phrase}," if phrase else match.group(0)

    expanded = re.sub(r"#(\w+)", replace, prompt)
    expanded = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"\s+", " ", expanded))
    return expanded.replace(" ,", ",").strip(" ,")


# The Expert Selection Agent runs this tool on every prompt before decomposing it; the chat agent
# may call it too. (A LangChain tool declares its DiffGraph stage in its metadata.)
expand_shorthand.metadata = {"diffgraph": {"esa": "prompt", "chat": True}}
