"""Refinements of the last image: a small, documented language (docs/chat.md) parsed in code.

A refinement is either a prompt edit ("a cat instead of a dog", "warmer light", "add stripes"),
after which the Expert Selection Agent picks experts for the new prompt, or a recipe edit
("less of Pink Pop", "without the stripes expert", "use only two experts", "another seed"),
which changes the MergeRecipe directly and re-renders it: no selection, no planning, and the
engine's caches make the merge cheap. The seed is kept unless the edit is about the seed.

What "less of X" and "more of X" do to the weights is the merge rule's to say
(merger.recipe: MergeRecipe.less_of / more_of); this module only parses the wish.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from diffgraph.errors import DiffGraphError
from diffgraph.merger.recipe import BASE, AtFullWeight, ExpertWeight, MergeRecipe

NUMBERS = {"zero": 0, "no": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
           "six": 6}
# Prompt phrases by effect, the phrase added first, then common community variants.
WARM = ("warm light", "golden hour light", "warm glow", "golden hour", "warm lighting", "warm")
DARK = ("at night", "dim light", "low light", "night", "dark")
BLUR = ("blurry", "out of focus", "soft focus")
ADJECTIVES = {
    "warmer": ("add", "warm light", WARM, DARK), "cooler": ("remove", None, WARM, ()),
    "colder": ("remove", None, WARM, ()), "darker": ("add", "at night", DARK, WARM),
    "brighter": ("remove", None, DARK, ()), "lighter": ("remove", None, DARK, ()),
    "blurrier": ("add", "blurry", BLUR, ()), "softer": ("add", "blurry", BLUR, ()),
    "sharper": ("remove", None, BLUR, ()),
}
EXPERT_WORDS = {"the", "expert", "experts", "lora", "loras", "checkpoint", "model", "adapter", "style", "of"}
# First words that mark a message as an attempt at a refinement (for the offline brain).
CUES = ("same", "less", "more", "use only", "only", "without", "drop", "remove", "no ", "add ", "also ", "plus ",
        "replace", "refine", "make it", "change", "now ", "but ", "again", "another", "new seed", "different seed",
        "reroll", "seed ", "keep ", "at most", "swap", *ADJECTIVES)

HELP = """Refinements of the last image (the seed is kept):
  same but a cat instead of a dog | replace dog with cat   prompt substitution; experts picked again
  warmer / cooler / darker / brighter / blurrier / sharper  lighting and focus phrases in the prompt
  add <phrase> | with <phrase>                              add a phrase to the prompt
  without <phrase>                                          take a phrase out of the prompt
  less of <expert> | more of <expert>                       halve / double its odds in the merge
  without <expert> | drop <expert>                          take an expert out of the merge
  use only two experts | only 1 expert | no experts         keep the strongest N experts
  another seed | seed 42                                     same recipe, another seed"""


class RefinementError(DiffGraphError, ValueError):
    """A refinement that cannot be applied; the message says why and what works."""


@dataclass
class Edit:
    prompt: str | None = None  # a new prompt: experts are selected again
    less: list[str] = field(default_factory=list)  # expert ids
    more: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    keep_only: int | None = None
    seed: int | None = None
    description: str = ""

    @property
    def changes_recipe(self) -> bool:
        return bool(self.less or self.more or self.remove or self.keep_only is not None or self.seed is not None)


def looks_like_refinement(text: str) -> bool:
    t = _normal(text)
    return t.startswith(CUES) or " instead of " in f" {t} "


def _q(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!?").split())


def _strip_lead(text: str) -> str:
    t = _normal(text)
    for lead in ("refine:", "refine", "please", "now", "ok", "okay", "and", "but", "then", "make it", "make the image",
                 "can you", "could you", "i want", "same image", "same but", "same, but", "same with", "same", ","):
        if t.startswith(lead + " ") or t == lead:
            t = t[len(lead):].strip(" ,")
    return t


def _article_free(text: str) -> str:
    return re.sub(r"^(?:a|an|the|some)\s+", "", text.strip(" ,"))


def _number(text: str) -> int | None:
    text = text.strip()
    if text.isdigit():
        return int(text)
    return NUMBERS.get(text)


def expert_label(expert: dict) -> str:
    return expert.get("name") or expert["id"]


def match_expert(text: str, experts: list[dict]) -> dict | None:
    """The expert of the image that ``text`` names (by name, id or a distinctive word), or None.
    RefinementError if several match equally well."""
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in EXPERT_WORDS]
    if not words:
        return None
    query = " ".join(words)
    scored = []
    for e in experts:
        label = f"{e.get('name') or ''} {e['id']}".lower()
        tokens = re.findall(r"[a-z0-9]+", label)
        name = " ".join(re.findall(r"[a-z0-9]+", (e.get("name") or "").lower()))
        if query == name or query in (e["id"].lower(), e["id"].split(":")[-1].lower()):
            score = 3
        elif all(any(t.startswith(w) or (len(t) >= 4 and w.startswith(t)) for t in tokens) for w in words):
            score = 2
        elif query in label:
            score = 1
        else:
            continue
        scored.append((score, e))
    if not scored:
        return None
    best = max(s for s, _ in scored)
    top = [e for s, e in scored if s == best]
    if len(top) > 1:
        raise RefinementError(f"'{text}' could mean {' or '.join(expert_label(e) for e in top)}; say which")
    return top[0]


def _has(prompt: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", prompt, re.IGNORECASE) is not None


def _remove_phrase(prompt: str, phrase: str) -> str:
    out = re.sub(rf"(?:\b(?:with|in|and|under)\s+)?(?<![a-z]){re.escape(phrase)}(?![a-z])", " ", prompt,
                 flags=re.IGNORECASE)
    return _tidy(out)


def _tidy(prompt: str) -> str:
    out = re.sub(r"\s+", " ", prompt)
    out = re.sub(r"\s*,(\s*,)+", ",", out).replace(" ,", ",")
    out = re.sub(r"\b(with|and|in|on|under)\s*(,|$)", r"\2", out)
    return out.strip(" ,")


def _add_phrase(prompt: str, phrase: str) -> str:
    return _tidy(f"{prompt}, {phrase}")


def substitute(prompt: str, old: str, new: str) -> str:
    old, new = _article_free(old), _article_free(new)
    if not old or not new:
        raise RefinementError("say what to replace and with what, e.g. 'a square instead of a circle'")
    pattern = re.compile(rf"(?<![a-z]){re.escape(old)}(?![a-z])", re.IGNORECASE)
    if not pattern.search(prompt):
        raise RefinementError(f"the prompt '{_q(prompt)}' has no '{old}' to replace")
    out = pattern.sub(new, prompt)
    # keep "a"/"an" in agreement with the new word
    out = re.sub(rf"\b([Aa])n?\s+({re.escape(new)})", lambda m: (m.group(1) + ("n" if new[:1].lower() in "aeiou" else ""))
                 + " " + m.group(2), out)
    return _tidy(out)


def parse(text: str, image: dict) -> Edit:
    """The edit that ``text`` asks of ``image`` (a chat image: prompt, seed, experts); raises
    RefinementError saying what is understood when it cannot."""
    prompt, experts = image["prompt"], image.get("experts", [])
    t = _strip_lead(text)
    if not t:
        raise RefinementError("say how to change the image.\n" + HELP)

    # seeds
    if m := re.fullmatch(r"(?:use |with |try )?seed (\d{1,9})", t):
        return Edit(seed=int(m.group(1)), description=f"seed {m.group(1)}")
    if re.fullmatch(r"(?:again )?(?:(?:with |try )?(?:an?other|a new|new|a different|different) seed|reroll|again)", t):
        return Edit(seed=int(image.get("seed", 0)) + 1, description="another seed")

    # how many experts
    m = re.fullmatch(r"(?:use |keep )?(?:only|just|at most|the top|top) (\w+|a single)(?: strongest| best)? experts?", t) \
        or re.fullmatch(r"(?:use |keep )(\w+) experts?(?: only)?", t)
    if m and _number(m.group(1)) is not None:
        n = _number(m.group(1))
        return Edit(keep_only=n, description=f"only the {n} strongest expert{'s' if n != 1 else ''}")
    if re.fullmatch(r"(?:use )?(?:no experts?|without (?:any )?experts|the base model only|base model only|just the base model)", t):
        return Edit(keep_only=0, description="no experts (the base model only)")

    # substitution
    m = re.fullmatch(r"(?:with |use |draw |show )?(.+?) instead of (.+)", t) or None
    if m:
        new, old = m.group(1), m.group(2)
        return Edit(prompt=substitute(prompt, old, new), description=f"{_article_free(new)} instead of {_article_free(old)}")
    m = re.fullmatch(r"(?:replace|swap|change) (.+?) (?:with|for|to|into) (.+)", t)
    if m:
        old, new = m.group(1), m.group(2)
        return Edit(prompt=substitute(prompt, old, new), description=f"{_article_free(new)} instead of {_article_free(old)}")

    # lighting / focus adjectives
    m = re.fullmatch(r"(?:a bit |a little |slightly |much |more )?(\w+?)(?: light| lighting| image| picture| focus)?", t)
    if m and m.group(1) in ADJECTIVES:
        word = m.group(1)
        action, phrase, family, opposite = ADJECTIVES[word]
        new = prompt
        for p in opposite:
            if _has(new, p):
                new = _remove_phrase(new, p)
        if action == "add":
            if any(_has(prompt, p) for p in family):
                helper = next((e for e in experts if any(w in (e.get("reason") or "").lower() for w in family)), None)
                hint = f"; try 'more of {expert_label(helper)}'" if helper else ""
                raise RefinementError(f"the prompt already asks for that ('{_q(prompt)}'){hint}")
            new = _add_phrase(new, phrase)
        else:
            present = [p for p in family if _has(new, p)]
            if not present:
                raise RefinementError(f"the prompt '{_q(prompt)}' has nothing to make {word}")
            for p in present:
                new = _remove_phrase(new, p)
        return Edit(prompt=new or prompt, description=word)

    # experts: less / more / without
    m = re.fullmatch(r"(less|more|fewer) (?:of )?(.+)", t)
    if m:
        which = m.group(1)
        expert = match_expert(m.group(2), experts)
        if expert is None:
            raise RefinementError(f"I do not know the refinement '{_q(text)}': '{m.group(2)}' is not an expert of this "
                                  "image (it has: " + (", ".join(expert_label(e) for e in experts) or "no experts")
                                  + ").\n" + HELP)
        edit = Edit(description=f"{'more' if which == 'more' else 'less'} of {expert_label(expert)}")
        (edit.more if which == "more" else edit.less).append(expert["id"])
        return edit
    m = re.fullmatch(r"(?:without|drop|remove|no|take out|lose) (?:the )?(.+)", t)
    if m:
        target = m.group(1)
        expert = match_expert(target, experts)
        if expert is not None:
            return Edit(remove=[expert["id"]], description=f"without {expert_label(expert)}")
        phrase = _article_free(target)
        if _has(prompt, phrase):
            return Edit(prompt=_remove_phrase(prompt, phrase) or prompt, description=f"without '{phrase}'")
        raise RefinementError(f"neither an expert of this image nor the prompt '{_q(prompt)}' has '{_q(target)}'")
    m = re.fullmatch(r"(?:add|also|plus|with|and) (.+)", t)
    if m:
        phrase = m.group(1).strip(" ,")
        if _has(prompt, phrase):
            raise RefinementError(f"the prompt already has '{phrase}'")
        return Edit(prompt=_add_phrase(prompt, phrase), description=f"add '{phrase}'")
    raise RefinementError(f"I do not know the refinement '{_q(text)}'.\n" + HELP)


# ---------------------------------------------------------------------------- recipe edits


def _group(recipe: MergeRecipe, expert_id: str) -> list[ExpertWeight]:
    for group in (recipe.checkpoints, recipe.loras):
        if any(e.name == expert_id for e in group):
            return group
    raise RefinementError(f"{expert_id} is not in this image's recipe")


def _entry(group: list[ExpertWeight], expert_id: str) -> ExpertWeight:
    return next(e for e in group if e.name == expert_id)


def apply(recipe: MergeRecipe, edit: Edit, names: dict[str, str] | None = None) -> MergeRecipe:
    """A new recipe with ``edit``'s recipe changes (the prompt is left to the caller)."""
    names = names or {}
    out = copy.deepcopy(recipe)
    for expert_id in edit.remove:
        group = _group(out, expert_id)
        group.remove(_entry(group, expert_id))
    if edit.keep_only is not None:
        ranked = sorted(((w, e.name) for e, w in [*out.checkpoint_weights(), *out.lora_weights()] if e.name != BASE),
                        key=lambda x: -x[0])
        keep = {name for _, name in ranked[:edit.keep_only]}
        if len(ranked) <= edit.keep_only and edit.keep_only > 0:
            raise RefinementError(f"this image uses {len(ranked)} expert{'s' if len(ranked) != 1 else ''}, "
                                  f"not more than {edit.keep_only}: nothing to drop")
        out.checkpoints = [e for e in out.checkpoints if e.name in keep or e.name == BASE]
        out.loras = [e for e in out.loras if e.name in keep or e.name == BASE]
    for expert_id in edit.less:
        _group(out, expert_id)
        out = out.less_of(expert_id)
    for expert_id in edit.more:
        _group(out, expert_id)
        try:
            out = out.more_of(expert_id)
        except AtFullWeight as exc:
            raise RefinementError(f"{names.get(expert_id, expert_id)} {exc}") from None
    out = out.without_lone_anchors()
    if edit.seed is not None:
        out.seed = int(edit.seed)
    return out
