"""Untrusted page text: sanitising, and structured fields found in what a page shows.

Pure functions, no browser: ``tools.browser`` hands over what Chromium rendered (the visible
text and a tree of the visible elements, hidden ones already pruned) and this module turns it
into clean strings and the fields an expert homepage carries (trigger words, example prompts,
base model, tags).

Two rules hold throughout:

- Everything returned is *data written by a stranger*. Nothing here tries to spot
  "instructions" in it; the registration step validates what the LLM makes of it.
- Every field value is text a person can see on the page. Labels may be recognised from
  attributes (``class``, ``data-*``, ``role``), but values are only ever visible text, so an
  attribute, comment, alt text or hidden element can never become a trigger word or a prompt.

Heuristics are generic (labels such as "Trigger words" or "Base model" in headings, table
rows, definition lists and label/value pairs; chips, code spans and list items as items;
figure captions in galleries as example prompts; YAML front matter of a raw model card), so
they work on the mini world's hub and on pages shaped like the real Civitai and Hugging Face.
"""

from __future__ import annotations

import hashlib
import html as html_lib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import yaml

# ----------------------------------------------------------------------------- sanitising

_ZERO_WIDTH = {0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x180E, 0x00AD,
               0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x17B4, 0x17B5}
_BIDI = {0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_KEEP_CONTROLS = {"\n", "\t", "\r"}
_LINE_BREAKS = str.maketrans({"\r": "\n", "\u2028": "\n", "\u2029": "\n", "\x0b": "\n", "\x0c": "\n",
                              "\x85": "\n", "\t": " "})


def _invisible_kind(ch: str) -> str | None:
    """Why ``ch`` must go (a category name for the warning), or None to keep it."""
    cp = ord(ch)
    if 0xE0000 <= cp <= 0xE007F:
        return "tag characters"
    if cp in _ZERO_WIDTH:
        return "zero-width"
    if cp in _BIDI:
        return "bidi controls"
    if 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        return "variation selectors"
    category = unicodedata.category(ch)
    if category == "Cf":
        return "format controls"
    if category == "Cc" and ch not in _KEEP_CONTROLS:
        return "control characters"
    if category == "Cn" and (0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE):
        return "noncharacters"
    return None


def strip_invisible(text: str, removed: Counter | None = None) -> str:
    """Drop Unicode tag characters, zero-width and bidi controls, variation selectors and other
    invisible format/control characters; count what went into ``removed`` by category."""
    out = []
    for ch in text:
        kind = _invisible_kind(ch) if (ord(ch) < 0x20 or ord(ch) >= 0x7F) else None
        if kind is None:
            out.append(ch)
        elif removed is not None:
            removed[kind] += 1
    return "".join(out)


def clean_text(text: str, removed: Counter | None = None) -> str:
    """Page text as stored and hashed: invisible characters stripped, NFKC-normalised, spaces
    collapsed within lines, lines trimmed, runs of blank lines collapsed to one."""
    text = strip_invisible(text, removed)
    text = unicodedata.normalize("NFKC", text)
    text = strip_invisible(text, removed)  # NFKC never makes these, but cheap insurance
    text = text.translate(_LINE_BREAKS)
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_line(text: str, removed: Counter | None = None) -> str:
    """``clean_text`` folded onto one line (titles, field values, alt text)."""
    return re.sub(r"\s+", " ", clean_text(text, removed)).strip()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_removed(removed: Counter) -> str | None:
    """One warning line for the characters ``clean_text`` stripped, or None."""
    total = sum(removed.values())
    if not total:
        return None
    parts = ", ".join(f"{kind} {n}" for kind, n in removed.most_common())
    note = "; tag characters can spell hidden text" if removed.get("tag characters") else ""
    return f"removed {total} invisible Unicode characters ({parts}){note}"


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars``, at a line or word boundary near the end if one is close."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    for sep in ("\n", " "):
        i = cut.rfind(sep)
        if i >= max_chars - 200 and i > 0:
            return cut[:i].rstrip()
    return cut


# ----------------------------------------------------------------------------- the visible tree

BLOCK_BREAK = {"br"}


@dataclass(eq=False)
class Node:
    """A visible element as the browser reported it. ``hint`` holds lower-cased attribute text
    (class, id, role, itemprop, data-*, a link's path): for recognising labels, never a value."""

    tag: str
    hint: str = ""
    block: bool = False
    pre: bool = False
    chip: bool = False  # inline-block and friends: a person sees a gap around it
    children: list[Node | str] = field(default_factory=list)
    parent: Node | None = field(default=None, repr=False)
    _text: str | None = field(default=None, init=False, repr=False)
    _size: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_json(cls, data: dict, parent: Node | None = None) -> Node:
        node = cls(str(data.get("t", "div")), str(data.get("h", "")), bool(data.get("b")), bool(data.get("p")),
                   bool(data.get("i")), parent=parent)
        for child in data.get("c", ()):
            node.children.append(child if isinstance(child, str) else cls.from_json(child, node))
        return node

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def text(self) -> str:
        """The element's visible text, blocks on their own lines, one line per list item/row."""
        if self._text is None:
            self._text = clean_text(self._raw_text())
        return self._text

    def line(self) -> str:
        return re.sub(r"\s+", " ", self.text()).strip()

    def size(self) -> int:
        """Characters of raw text under this element (cheap: no cleaning), to skip long ones."""
        if self._size is None:
            self._size = sum(len(c) if isinstance(c, str) else c.size() for c in self.children)
        return self._size

    def short_line(self, limit: int = 80) -> str | None:
        """``line()`` for elements with little text, None for the rest (labels are short)."""
        return self.line() if self.size() <= limit else None

    def _raw_text(self) -> str:
        parts = []
        for child in self.children:
            if isinstance(child, str):
                parts.append(child if self.pre else re.sub(r"\s+", " ", child))
            elif child.tag in BLOCK_BREAK:
                parts.append("\n")
            elif child.block:
                parts.append("\n" + child._raw_text() + "\n")
            elif child.tag in ("td", "th") or child.chip:
                parts.append(" " + child._raw_text() + " ")
            else:
                parts.append(child._raw_text())
        return "".join(parts)

    def heading_rank(self) -> int | None:
        if re.fullmatch(r"h[1-6]", self.tag):
            return int(self.tag[1])
        if re.search(r"\bheading\b", self.hint):
            return 7
        return None


def _has_text(child: Node | str) -> bool:
    return bool((child if isinstance(child, str) else child.text()).strip())


# ----------------------------------------------------------------------------- fields

_LABELS = {
    "trigger_words": re.compile(
        r"(trigger|activation|trained|instance)[ _-]?(words?|phrases?|tokens?|prompts?|tags?|text)"
        r"|trigger ?word\(s\)|triggers?|activation"),
    "base_model": re.compile(r"base[ _-]?models?|(fine[ -]?tuned|trained|based) (from|on)"),
    "tags": re.compile(r"(model )?tags?|keywords"),
    "example_prompts": re.compile(r"((example|sample|widget|demo|showcase)[ _-]?)?prompts?|positive prompt"),
}
# Attribute hints that name a container holding a field's values (data-testid="trigger-words" ...).
_HINT_LABELS = {
    "trigger_words": re.compile(r"(trigger|trained|activation)[-_ ]?(words?|phrases?|tokens?)|instance[-_ ]?prompt"),
    "base_model": re.compile(r"base[-_ ]?model"),
    "tags": re.compile(r"(^|[\s_-])(model[-_ ]?)?tags($|[\s_-])|tag[-_ ]?list"),
    "example_prompts": re.compile(r"(example|sample|widget)[-_ ]?prompts?"),
}
_CHIP_HINT = re.compile(r"(^|[^a-z])(chip|badge|pill|tag|token|keyword)s?($|[^a-z])")
_ITEM_TAGS = {"li", "code", "pre", "kbd", "samp", "a", "figcaption", "dd", "button"}
_TAG_LINK = re.compile(r"[/?&](tags?|other|search)[/=]")
_GALLERY_HINT = re.compile(r"gallery|carousel|showcase|example|widget|slider")
_UI_WORDS = {"copy", "copied", "copy prompt", "show more", "see more", "show less", "more", "less", "expand",
             "collapse", "edit", "share", "download", "like", "follow", "report", "view", "..."}
_LORA_TAG = re.compile(r"<lora:[^:<>\s]+(?::[-+]?\d*\.?\d+)?>", re.I)
_USE_TO_TRIGGER = re.compile(r"\buse\s+(.{1,200}?)\s+to\s+trigger\b", re.I)
_INLINE_LABEL = re.compile(r"^\s*[*_]{0,2}([A-Za-z][A-Za-z ()_-]{1,30}?)[*_]{0,2}\s*(?:[:：]|\s[-\u2013\u2014])\s*(.+)$")

LIMITS = {"trigger_words": (32, 100), "example_prompts": (24, 1000), "tags": (64, 60), "base_model": (1, 120)}


@dataclass
class PageFields:
    trigger_words: list[str] = field(default_factory=list)
    example_prompts: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)


def label_kind(text: str) -> str | None:
    """Which field a label names ("Trigger Words", "Base model:", "Tags" ...), or None."""
    text = clean_line(text).lower().rstrip(":：").strip()
    if not text or len(text) > 40:
        return None
    for kind, pattern in _LABELS.items():
        if pattern.fullmatch(text):
            return kind
    return None


def _hint_kind(hint: str) -> str | None:
    for kind, pattern in _HINT_LABELS.items():
        if hint and pattern.search(hint):
            return kind
    return None


def _following(node: Node) -> list[Node | str]:
    if node.parent is None:
        return []
    siblings = node.parent.children
    return [c for c in siblings[siblings.index(node) + 1:] if _has_text(c)]


def _region_after(label: Node) -> list[Node | str]:
    """The content a label names: the next cells of its row, its <dd>, the section under a
    heading, or the element(s) right after a generic label. A label alone in its box (a heading
    wrapped in a div beside a copy button, a <span> in a <th>) climbs to the box first."""
    node, label_text = label, label.line()
    while not _following(node) and node.parent is not None and node.parent.short_line() == label_text:
        node = node.parent
    siblings = _following(node)
    if node.tag in ("th", "td"):
        return [s for s in siblings if isinstance(s, Node) and s.tag in ("td", "th")]
    if node.tag == "dt":
        out = []
        for s in siblings:
            if isinstance(s, Node) and s.tag == "dt":
                break
            out.append(s)
        return out
    rank = label.heading_rank() or node.heading_rank()
    out = []
    for s in siblings:
        if isinstance(s, Node):
            if label_kind(s.short_line() or ""):
                break
            if rank is not None and any((r := d.heading_rank()) is not None and r <= rank for d in s.walk()):
                break
        out.append(s)
        if (rank is None and len(out) >= 2) or len(out) >= 12:
            break
    return out


def _is_item(node: Node) -> bool:
    return node.tag in _ITEM_TAGS or bool(_CHIP_HINT.search(node.hint))


def _items(region: Iterable[Node | str]) -> list[str]:
    """Texts of the outermost item-like elements (chips, code spans, list items, links, captions)."""
    out = []

    def visit(node: Node) -> None:
        if _is_item(node):
            text = node.text()
            if text and (node.tag in ("pre", "li", "figcaption") or "\n" not in text):
                out.append(text)
                return
        for child in node.children:
            if isinstance(child, Node):
                visit(child)

    for part in region:
        if isinstance(part, Node):
            visit(part)
    return out


def _region_text(region: Iterable[Node | str]) -> str:
    return clean_text("\n".join(p if isinstance(p, str) else p.text() for p in region))


def _split_list(text: str) -> list[str]:
    return [p.strip(" .;`'\"") for line in text.split("\n") for p in re.split(r"[,;]", line)]


# A trigger word is a token or a short phrase: word characters with inner spaces, dots,
# apostrophes and hyphens. Quotes, brackets, braces, colons and the like are field syntax, and a
# value showing them is a break-out attempt (``teal"], "skills": ["x``): that part and the rest
# of its value are not trigger words, whatever they spell once the punctuation is stripped.
_TRIGGER_SHAPE = re.compile(r"\w[\w.'\u2019-]*( [\w.'\u2019-]+){0,4}")
_FIELD_SYNTAX = re.compile(r"[\"\u201c\u201d\u201e{}\[\]<>:=\\|`*#]")
_QUOTED = re.compile(r"^([\"'`\u201c])(.*)([\"'`\u201d])$")
MAX_TRIGGER_CHARS = 48


def trigger_words(values: Iterable[str]) -> list[str]:
    """The trigger words in ``values`` (each a chip, a field or a comma-separated list, which ends
    with its sentence): split at commas, semicolons and line breaks, one pair of enclosing quotes
    or backticks removed; a value ends where field syntax first shows (see above), the words
    before it kept."""
    out: list[str] = []
    for value in values:
        for part in re.split(r"[,;\n]", re.split(r"\.\s", str(value), maxsplit=1)[0]):
            part = " ".join(part.split()).strip(" .")
            quoted = _QUOTED.match(part)
            if quoted and (quoted.group(1) + quoted.group(3)) in ('""', "''", "``", "\u201c\u201d"):
                part = quoted.group(2).strip()
            syntax = _FIELD_SYNTAX.search(part)
            head = part[:syntax.start()].strip(" .") if syntax else part
            if head and len(head) <= MAX_TRIGGER_CHARS and _TRIGGER_SHAPE.fullmatch(head):
                out.append(head)
            if syntax:
                break
    return out


def _values(kind: str, region: list[Node | str]) -> list[str]:
    """The values of one field from the region its label names."""
    items = _items(region)
    text = _region_text(region)
    if kind == "trigger_words":
        if items:
            return trigger_words(items)
        m = _USE_TO_TRIGGER.search(text)
        if m:
            return trigger_words([re.sub(r"\s+and\s+", ",", m.group(1))])
        parts = _split_list(text)
        return trigger_words([text]) if all(len(p.split()) <= 6 for p in parts) else []
    if kind == "tags":
        return items or _split_list(text)
    if kind == "base_model":
        lines = items or [line for line in text.split("\n") if line.strip()]
        return lines[:1]
    if kind == "example_prompts":
        if items:
            return items
        return [line for line in text.split("\n") if line.strip()]
    return []


def _front_matter(text: str) -> dict | None:
    """YAML front matter of a raw model card (README.md as served by a Hub), if the text is one."""
    m = re.match(r"---[ \t]*\n(.{0,65536}?)\n---[ \t]*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _scalar_list(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, (str, int, float))]
    return []


def extract_fields(tree: Node | None, text: str, content_type: str = "text/html") -> PageFields:
    """Trigger words, example prompts, base model and tags from a page's visible tree and text."""
    found: dict[str, list[str]] = {k: [] for k in LIMITS}

    # 1. A raw model card (text/markdown or text/plain with YAML front matter).
    card = _front_matter(text) if (content_type.startswith("text/") and not content_type.endswith("html")) else None
    if card:
        found["base_model"] += _scalar_list(card.get("base_model"))
        found["trigger_words"] += trigger_words(_scalar_list(card.get("instance_prompt")))
        for item in card.get("widget") or []:
            if isinstance(item, dict):
                found["example_prompts"] += _scalar_list(item.get("text"))
        found["tags"] += _scalar_list(card.get("tags"))

    # 2. Labelled regions of the visible page, and containers whose attributes name a field.
    if tree is not None:
        seen: set[int] = set()
        for node in tree.walk():
            kind = label_kind(node.short_line() or "") if len(node.children) <= 4 else None
            if kind:
                region = _region_after(node)
                key = id(region[0]) if region else None
                if key is not None and key not in seen:
                    seen.add(key)
                    found[kind] += _values(kind, region)
                continue
            kind = _hint_kind(node.hint)
            if kind and id(node) not in seen and not _is_item(node):
                seen.add(id(node))
                region = [c for c in node.children if not (isinstance(c, Node) and label_kind(c.short_line() or ""))]
                found[kind] += _values(kind, region)

        # Captions of gallery figures: the prompts of the showcase images (HF widgets, Civitai).
        for node in tree.walk():
            if node.tag == "figcaption" and _in_gallery(node):
                found["example_prompts"].append(node.text())

        if not found["tags"]:
            found["tags"] += _header_chips(tree)

    # 3. Fallbacks on the visible text: "Trigger words: x, y" lines, "use `x` to trigger",
    #    <lora:name:w> prompts, and the Hub's base_model:* tags.
    lines = [line for line in text.split("\n") if line.strip()]
    for line in lines:
        m = _INLINE_LABEL.match(line)
        kind = label_kind(m.group(1)) if m else None
        if kind and not found[kind]:
            found[kind] += (trigger_words([m.group(2)]) if kind == "trigger_words" else _split_list(m.group(2))
                            if kind == "tags" else [m.group(2)])
    if not found["trigger_words"]:
        for m in _USE_TO_TRIGGER.finditer(text):
            found["trigger_words"] += trigger_words([re.sub(r"\s+and\s+", ",", m.group(1))])
    if not found["example_prompts"]:
        found["example_prompts"] += [line for line in lines if _LORA_TAG.search(line) and len(line) <= 1000]
    if not found["base_model"]:
        found["base_model"] += [t.rsplit(":", 1)[1] for t in found["tags"]
                                if t.lower().startswith("base_model:") and t.count(":") in (1, 2)]

    # Every value must be text a person can see: anything the tree and the visible text
    # disagree on is dropped rather than trusted.
    flat = re.sub(r"\s+", " ", text)
    shown = {kind: [v for v in _tidy(values, kind) if v in flat] for kind, values in found.items()}
    return PageFields(
        trigger_words=shown["trigger_words"],
        example_prompts=shown["example_prompts"],
        base_model=next(iter(shown["base_model"]), None),
        tags=shown["tags"],
    )


def _in_gallery(node: Node) -> bool:
    figure = node.parent
    if figure is None or figure.tag != "figure":
        return False
    up: Node | None = figure
    for _ in range(4):
        if up is None:
            return False
        if _GALLERY_HINT.search(up.hint):
            return True
        up = up.parent
    return False


def _header_chips(tree: Node) -> list[str]:
    """Chips and tag links right under the page's first <h1> (before any other heading),
    where model pages list tags when they have no "Tags" heading."""
    h1 = next((n for n in tree.walk() if n.tag == "h1"), None)
    if h1 is None:
        return []
    out: list[str] = []
    for s in _following(h1)[:2]:
        if not isinstance(s, Node) or any(d.heading_rank() is not None for d in s.walk()):
            break
        out += [d.text() for d in s.walk() if d is not s and (_CHIP_HINT.search(d.hint) or
                                                               (d.tag == "a" and _TAG_LINK.search(d.hint)))]
    return out


def _tidy(values: Iterable[str], kind: str) -> list[str]:
    count, length = LIMITS[kind]
    out: list[str] = []
    seen = set()
    for value in values:
        value = clean_line(value).strip(" ,;")
        if kind in ("trigger_words", "tags", "base_model"):
            value = value.strip("`'\"")
        if not value or len(value) > length or value.lower() in _UI_WORDS or re.fullmatch(r"\+?\d+", value):
            continue
        if value.lower() not in seen:
            seen.add(value.lower())
            out.append(value)
        if len(out) >= count:
            break
    return out


def html_to_lines(markup: str) -> list[str]:
    """Text of an API's HTML description, one line per block; scripts and styles dropped."""
    text = re.sub(r"(?is)<(script|style|template|noscript)\b.*?</\1\s*>", " ", str(markup))
    text = re.sub(r"(?i)<\s*(br|/p|/div|/li|/h[1-6]|/tr|/blockquote|/pre)\b[^>]*>", "\n", text)
    text = html_lib.unescape(re.sub(r"<[^>]*>", " ", text))
    return [" ".join(line.split()) for line in strip_invisible(text).split("\n") if line.strip()]
