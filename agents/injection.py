"""The injection defence of the describe step: what an expert description may contain, checked
in code on the assumption that the LLM may have obeyed an instruction hidden in the page.

Page text and API fields are written by strangers, so they reach the LLM only as delimited
data, and whatever comes back is checked here, on the assumption that the LLM may have obeyed
an instruction hidden in that data:

- sizes are bounded; nothing that reads like an instruction, a role turn, a tool call, a link
  or code survives. Instructions are recognised after folding what hides them from a pattern:
  NFKC, invisible characters removed, Cyrillic/Greek look-alike letters mapped to Latin,
  right-to-left reversal, base64-encoded text decoded;
- the page is split into *evidence*: structured fields (name, tags, trigger words, base model,
  example prompts) free of instructions, and *descriptive sentences*, the ones that state what
  the model does rather than speak to a reader (see "descriptive sentences" below), are
  trusted; words the page shows only elsewhere (sentences addressed to a reader, agent, model
  or tool, instructions, UI text, words mixing scripts) are tainted;
- every list item must be made of trusted words (or a few generic descriptive words), and may
  not use a tainted one; trigger words must be ones the source or page lists, shaped like
  trigger words; the summary obeys the same rule, else the offline brain's summary (its claim
  drawn from descriptive sentences only) replaces it.

So an instruction can reach the LLM, and the LLM can obey it, but what it adds is either words
the page shows only inside the instruction (tainted), words the page does not show at all
(unsupported), or an instruction itself: all three are dropped. What fails a check is dropped,
not trusted, and each drop is recorded with its reason.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffgraph.graph_store.records import ExpertRecord
from diffgraph.tools.page_text import extract_fields, html_to_lines, label_kind, strip_invisible, trigger_words

if TYPE_CHECKING:
    from .prompts import SkillDescription

MAX_ITEMS = 8
MAX_ITEM_CHARS = 60
MAX_SUMMARY_CHARS = 400
MAX_NAME_CHARS = 100
LIST_FIELDS = ("skills", "subjects", "styles", "visual_attributes", "trigger_words", "caveats")
# Natural-language instructions aimed at whoever reads the page, role turns and tool-call syntax.
INSTRUCTION = re.compile(
    r"(ignore|disregard|forget|override|bypass|skip)\W+(\w+\W+){0,4}"
    r"(instruction|previous|prior|above|earlier|prompt|rule|guideline|directive|context|system)s?"
    r"|\b(new|updated|real|actual|hidden|secret)\s+(instruction|rule|task|directive|system prompt)s?\b"
    r"|\bfrom now on\b|system\s*prompt|\bsystem\s*(message|override|note|notice)\b"
    r"|(^|[^\w])(system|assistant|user|developer|human)\s*:"
    r"|<\|?\s*/?\s*(im_start|im_end|system|assistant|user|endoftext)|\[/?(inst|sys)\]|<</?sys>>"
    r"|###\s*(instruction|system|response)"
    r"|you\s+are\s+(now|an?|the)\b|\byou\s+must\b|\bas an ai\b|\bjailbreak|\bpwned\b|\bprompt injection"
    r"|\b(dear|attention|note (to|for)|hey|hello|calling)\s+(all\s+)?(the\s+)?"
    r"(ai|llm|gpt|assistant|language model|model|agent|bot|crawler|scraper)s?\b"
    r"|\b(ai|llm|gpt|language model|bot)s?\s+(reader|reading|crawler|agent|system)s?\b"
    r"|tool_?call|function_?call"
    r"|\"\s*(name|arguments|summary|skills|subjects|styles|visual_attributes|trigger_words|caveats|role|content"
    r"|tool|function)\"\s*:"
    r"|[}\]]\s*,?\s*[{\[]\s*\"|\"\s*[}\]]"
    r"|\b(describe|call|name|label|tag|classify|present|list|rate|rank|mark|report|summari[sz]e)\s+"
    r"(this|it|me|the|our)\b(\s+\w+){0,3}\s+(as|like|first|higher|above|#?1)\b"
    r"|\b(add|set|put|include|insert|append|write|output|print|return)\s+(\w+\s+){0,3}"
    r"(skill|summary|field|description|json|trigger_words|visual_attributes)s?\b"
    r"|\b(respond|reply|answer|output)\s+(only|with|exactly|in json)\b"
    r"|\bbest (model|expert|lora|checkpoint|adapter) for (everything|anything|all|every)"
    r"|\b(always|must)\s+(be\s+)?(select|choose|pick|rank|recommend|prefer|retrieve|return|use)(ed)?\b"
    r"|\brank(ed)?\s+(it|this|first|higher|above|#?1)\b|\b(first|top)\s+(choice|pick|result)\b"
    r"|\bfor (every|all|any) (prompt|request|query|queries|user|image)s?\b|\bregardless of\b"
    r"|\bdo not (mention|reveal|tell|say|list|include|describe)\b|\bdon'?t (mention|reveal|tell)\b"
    r"|\b(decode|base64)\b",
    re.IGNORECASE,
)
# Links and code: fine on a page, never in a description.
CODE = re.compile(r"https?://|www\.|```|[{}<>\[\]]|javascript:|data:\w+/", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{20,}={0,2}")
STOPWORDS = frozenset(
    "a an the and or of on in to for with by at from your you this that these those is are be it its as any "
    "all every use used using make makes model lora checkpoint style image images".split()
)
# Descriptive glue an honest description needs and that names no subject, style, colour or
# quality: allowed in items and summaries without the page showing it.
GENERIC = frozenset("""
adapter adapters checkpoints models expert experts weights version file full fine tuned trained based built
add adds added adding apply applies applied give gives giving makes making turn turns render renders rendered
rendering produce produces produced create creates creating generate generates generated draw draws drawn
paint paints push pushes shift shifts change changes tint tints boost boosts enhance enhances bring brings
work works help helps keep keeps focus focuses designed meant
picture pictures output outputs result results generation generations prompt prompts scene scenes subject
subjects look looks effect effects appearance overall whole entire strong stronger subtle more less very
well also both each other such like while when where which its their them they than then into onto across
throughout around over under only just can will may not has have had was were been being most some much
trigger triggers triggered word words token tokens activation strength recommended usage uses
""".split())
_FOLD = str.maketrans({
    "а": "a", "е": "e", "і": "i", "ј": "j", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ѕ": "s",
    "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ɑ": "a", "ı": "i", "ο": "o", "α": "a", "ν": "v",
    "ι": "i", "ρ": "p", "κ": "k", "υ": "u", "օ": "o", "ս": "u", "ո": "n",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H",
    "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_OTHER_SCRIPTS = ("CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE")


def skeleton(text: str) -> str:
    """``text`` as a pattern should see it: NFKC, invisible characters removed, look-alike
    letters of other scripts folded to Latin, whitespace collapsed."""
    text = strip_invisible(unicodedata.normalize("NFKC", str(text)))
    return " ".join(text.translate(_FOLD).split())


def mixes_scripts(text: str) -> bool:
    """A word spelling Latin with letters of another script (the homoglyph trick)."""
    for word in re.findall(r"\w{2,}", unicodedata.normalize("NFKC", str(text))):
        latin = other = False
        for ch in word:
            if ch.isalpha():
                name = unicodedata.name(ch, "")
                latin |= name.startswith("LATIN")
                other |= name.startswith(_OTHER_SCRIPTS)
        if latin and other:
            return True
    return False


def _decoded_base64(text: str) -> list[str]:
    out = []
    for token in _BASE64.findall(text):
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(token + "=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(decoded) >= 8 and sum(32 <= ord(c) < 127 or c in "\n\t" for c in decoded) >= 0.95 * len(decoded):
                out.append(decoded)
                break
    return out


def instruction_like(text: str) -> bool:
    """Does ``text`` carry an instruction, however disguised (look-alike letters, mixed
    scripts, reversed, base64)?"""
    folded = skeleton(text)
    if INSTRUCTION.search(folded) or INSTRUCTION.search(folded[::-1]) or mixes_scripts(text):
        return True
    return any(INSTRUCTION.search(skeleton(d)) or _BASE64.fullmatch(d.strip() or "-") for d in _decoded_base64(folded))


def suspicious(text: str) -> bool:
    """An instruction, a link or code: never allowed in a description."""
    return instruction_like(text) or bool(CODE.search(skeleton(text))) or bool(_decoded_base64(skeleton(text)))


def _stem(word: str) -> str:
    """A crude stem, the same for "stripes", "striped" and "stripe", "tones" and "tone"."""
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith(("ss", "us", "is")):
            word = word[: len(word) - len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _words(text: str) -> set[str]:
    """Content words of ``text`` (folded, lower-case, no stopwords), as stems."""
    return {_stem(w) for w in re.findall(r"[a-z][a-z0-9]+", skeleton(text).lower()) if len(w) > 2 and w not in STOPWORDS}


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z0-9]+", skeleton(text).lower()) if len(w) > 2 and w not in STOPWORDS]


# ----------------------------------------------------------------------------- descriptive sentences
# A description states what a model does or shows; a sentence addressed to someone asks its
# reader to do something. Only the first kind may be stated as an expert's skill, whatever the
# words it uses, so the test is on the grammar of the sentence, not on what it asks for:
#
# - an imperative: a clause opening with a verb in its base form ("Describe ...", "Call it
#   ...", "Please note that ..."), told by an English lexicon (lemminflect); a verb that is
#   also a noun or adjective ("Paint", "Light") counts only when an object or a word the
#   lexicon does not know follows;
# - an obligation or a request (should, must, needs to, is to be, make sure, you will ...);
# - a vocative to a machine reader or a processing role ("Dear crawler", "AI agents:",
#   "models reading this"), or talk about the text and what is done with it (this page, the
#   summary, metadata, describe, index, classify, respond ...) or an action a reader would
#   take (fetch, download, visit, call a tool, a URL ...);
# - and everything after such a sentence in the same paragraph: an address runs on.
# What remains are third-person statements; an instruction that slips through them anyway is
# still caught by ``instruction_like``.

_MACHINES = (r"(ai|a\.i\.|llms?|gpts?|chatgpt|claude|gemini|assistants?|agents?|bots?|chatbots?|crawlers?|scrapers?"
             r"|spiders?|indexers?|summari[sz]ers?|parsers?)")
_ROLES = rf"({_MACHINES[1:-1]}|pipelines?|readers?|reviewers?|moderators?|machines?|(language )?models?|systems?|tools?)"
_VOCATIVE = re.compile(
    rf"^(all\s+|any\s+|the\s+)?(\w+\s+)?{_MACHINES}\s*[,:;!\u2014]"
    rf"|\b(dear|hey|hi|hello|attention|note (to|for)|message (to|for)|calling|instructions for)[\s,:]+(\w+\s+){{0,2}}"
    rf"{_ROLES}\b"
    rf"|\b{_ROLES}\s+(that|which|who)?\s*(are\s+|is\s+)?(read|process|summar|index|crawl|scrap|pars|ingest|view"
    rf"|visit|analy[sz])\w*",
    re.IGNORECASE)
_OBLIGATION = re.compile(
    r"\b(should|must|shall|ought|needs? to|needed to|ha(s|ve) to|(is|are|be) to be|required to|instructed|expected to"
    r"|supposed to|asked to|make sure|be sure|remember to|do not|don'?t|please|kindly"
    r"|you('ll| will| are going to| are to| can now))\b",
    re.IGNORECASE)
_ABOUT_THE_TEXT = re.compile(
    r"\b(this|the following|the above|the below|above|below)\s+(page|text|document|post|card|listing|entry|content"
    r"|message|section|note|readme|information|paragraph|passage)\b"
    r"|\b(summar\w*|describ\w*|descriptions?|metadata|json|schema|instructions?|directives?|classif\w*"
    r"|categori[sz]\w*|indexe[sd]|indexing|crawl\w*|scrap(e|es|ed|ing|er|ers)|pars(e|es|ed|ing|er)|respond\w*"
    r"|repl(y|ies|ying)|answer\w*|fetch\w*|download\w*|visit\w*|navigat\w*|install\w*|execut\w*|invok\w*"
    r"|click\w*|regist(er|ers|ered|ering|ry)|add_expert|tool_?calls?|functions?|api|endpoints?|urls?|links?|websites?"
    r"|commands?|scripts?|skills?|fields|visual[ _]attributes?|trigger[ _]words?|caveats?)\b",
    re.IGNORECASE)
_LEADERS = frozenset("please kindly now just simply also then and so first next finally always never do don't dont "
                     "not to".split())
_OBJECTS = frozenset("this that these those it its them me us him her the a an all every any each some my our their "
                     "his out up off away down".split())
# Words the lexicon has no entry for although they are English (it lists content words only).
_FUNCTION_WORDS = frozenset("and or but nor of with without for to in on at by from as than so yet into onto over under "
                            "about after before around behind between through across along per via plus".split())
_LABEL = re.compile(r"^\s*([^:.!?]{1,40}?)\s*[:\uff1a]\s+(?=\S)")
MAX_CLAIM_CHARS = 260


def _imperative(clause: str, strict: bool = False) -> bool:
    """Does ``clause`` open with a verb in its base form (an order to its reader)? ``strict``:
    only a word that is nothing but a verb ("Describe", not "Perfect"), for clauses after a comma."""
    from lemminflect import getAllLemmas  # its lexicon loads on first use (~1 s)

    words = re.findall(r"[a-z][a-z']*", skeleton(clause).lower())
    while words and words[0] in _LEADERS:
        words.pop(0)
    if not words:
        return False
    lemmas = getAllLemmas(words[0])
    if words[0] not in lemmas.get("VERB", ()):
        return False
    if set(lemmas) <= {"VERB"} or strict:
        return set(lemmas) <= {"VERB"}
    # "Paint splashes" is a noun phrase, "Paint the wall" and "Paint ohwx cats" are orders.
    return len(words) > 1 and (words[1] in _OBJECTS or (words[1] not in _FUNCTION_WORDS and not getAllLemmas(words[1])))


def addressed(sentence: str) -> bool:
    """Does ``sentence`` speak to a reader (see above) instead of describing the model?"""
    text = skeleton(sentence)
    if _VOCATIVE.search(text) or _OBLIGATION.search(text) or instruction_like(sentence):
        return True
    label = _LABEL.match(text)  # "Description: ..." names a field; a longer lead-in is part of the sentence
    body = text[label.end():] if label and len(label.group(1).split()) <= 2 else text
    if _ABOUT_THE_TEXT.search(body):
        return True
    clauses = re.split(r"[:;\u2014]|\s-\s", body)
    return any(_imperative(c) for c in clauses) or any(_imperative(c, strict=True) for c in re.split(r",", body)[1:])


def _prose(sentence: str, field: bool = False) -> bool:
    """A sentence, not a title, tag list, prompt or field ("Trigger words: x."): one that ends
    like a sentence, or a long run of mostly lower-case words (a description without its full
    stop, or cut short by the page's size limit); with many commas only when it ends like a
    sentence. In a description ``field`` (an API's or a sidecar's), where nothing else stands,
    a short phrase is one too ("neon glow outlines")."""
    words = re.findall(r"[^\W\d_][\w'-]*", sentence)
    label = _LABEL.match(sentence)
    if len(words) < (2 if field else 3) or len(sentence) < 8 or suspicious(sentence) or (
            label and label_kind(label.group(1))):
        return False
    if field or re.search(r"[.!?\u2026]$", sentence):
        return True
    return sentence.count(",") < 3 and len(words) >= 6 and sum(w[0].islower() for w in words) >= 0.6 * len(words)


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(str(paragraph).split())) if s.strip()]


def split_paragraph(paragraph: str, field: bool = False) -> tuple[list[str], list[str]]:
    """(descriptive sentences, the rest) of one paragraph: sentences up to the first addressed
    one that are prose (``_prose``); that one and all after it are the rest."""
    kept: list[str] = []
    ss = sentences(paragraph)
    for i, sentence in enumerate(ss):
        if addressed(sentence):
            return kept, [s for s in ss[:i] if s not in kept] + ss[i:]
        if _prose(sentence, field):
            kept.append(sentence)
    return kept, [s for s in ss if s not in kept]


def claim(paragraphs, skip=(), field: bool = False) -> str:
    """The first descriptive sentences (at most two, at most MAX_CLAIM_CHARS) of the first
    paragraph that has any; paragraphs in ``skip`` (example prompts, tags) are not prose;
    ``field``: the paragraphs are a description field's (``_prose``)."""
    skip = {" ".join(s.split()) for s in skip}
    for paragraph in paragraphs:
        if " ".join(paragraph.split()) in skip:
            continue
        kept, _ = split_paragraph(paragraph, field)
        if kept:
            out = kept[0]
            if len(kept) > 1 and len(out) + 1 + len(kept[1]) <= MAX_CLAIM_CHARS:
                out += " " + kept[1]
            if len(out) > MAX_CLAIM_CHARS:
                out = out[:MAX_CLAIM_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + "\u2026"
            return out
    return ""


def listed_triggers(record: ExpertRecord, page) -> list[str]:
    """The trigger words the source, its description and the page list, in that order: only
    ones shaped like trigger words (tools.page_text.trigger_words) and free of instructions."""
    found = [*record.trigger_words, *extract_fields(None, "\n".join(html_to_lines(record.source_description)),
                                                    "text/plain").trigger_words]
    if page is not None:
        found += page.trigger_words
    return [t for t in dict.fromkeys(trigger_words(found)) if not suspicious(t)][:MAX_ITEMS]


@dataclass(frozen=True)
class Evidence:
    """What the source and the page say, split by trust: ``trusted`` stems come from structured
    fields (name, tags, trigger words, base model, example prompts) free of instructions and
    from descriptive sentences; ``tainted`` stems only from everything else the page shows
    (sentences addressed to a reader, instructions, UI text); ``listed`` holds the trigger
    words (see ``listed_triggers``)."""

    trusted: frozenset[str]
    tainted: frozenset[str]
    listed: frozenset[str]


def evidence(record: ExpertRecord, page) -> Evidence:
    fields = [record.name, record.base_model, *record.tags, *record.trigger_words]
    if page is not None:
        fields += [page.title or "", page.base_model or "", *page.tags, *page.trigger_words, *page.example_prompts]
    trusted: set[str] = set()
    tainted: set[str] = set()
    for line in fields:
        (tainted if instruction_like(line) else trusted).update(_words(line))
    paragraphs = [(p, True) for p in html_to_lines(record.source_description)]
    paragraphs += [(p, False) for p in (page.visible_text.split("\n") if page else ())]
    for paragraph, field in paragraphs:
        kept, rest = split_paragraph(paragraph, field)
        for sentence in kept:
            trusted.update(_words(sentence))
        for sentence in rest:
            tainted.update(_words(sentence))
    listed = {skeleton(t).lower() for t in listed_triggers(record, page)}
    return Evidence(frozenset(trusted), frozenset(tainted - trusted), frozenset(listed))


def _unsupported(text: str, ev: Evidence) -> str | None:
    """Why ``text`` is not grounded in the evidence, or None when it is."""
    words = _content(text)
    if not words:
        return "names nothing the page shows"
    stems = {_stem(w) for w in words}
    if stems & ev.tainted:
        return f"uses words the page shows only outside its description ({', '.join(sorted(stems & ev.tainted))})"
    unsupported = sorted({w for w in words if _stem(w) not in ev.trusted and w not in GENERIC})
    if unsupported:
        return f"not supported by the page ({', '.join(unsupported[:4])})"
    if not stems & ev.trusted:
        return "names nothing the page shows"
    return None


def validate(raw: SkillDescription, record: ExpertRecord, page, fallback_summary: str) -> tuple[dict, list[str]]:
    """Keep only what the page supports; return the clean description and what was dropped."""
    ev = evidence(record, page)
    dropped: list[str] = []
    out: dict = {}
    for key in LIST_FIELDS:
        kept: list[str] = []
        for item in getattr(raw, key)[: 3 * MAX_ITEMS]:
            item = " ".join(str(item).split())
            reason = None
            if not item:
                continue
            if len(item) > MAX_ITEM_CHARS:
                reason = "too long"
            elif suspicious(item):
                reason = "reads like an instruction, link or code"
            elif key == "trigger_words":
                if skeleton(item).lower() not in ev.listed:
                    reason = "not a trigger word the source or page lists"
            else:
                reason = _unsupported(item, ev)
            if reason:
                dropped.append(f"{key}: {item[:80]!r} ({reason})")
            elif item.lower() not in (k.lower() for k in kept) and len(kept) < MAX_ITEMS:
                kept.append(item)
        out[key] = kept
    summary = " ".join(str(raw.summary).split())
    reason = ("empty" if not summary else "too long" if len(summary) > MAX_SUMMARY_CHARS
              else "reads like an instruction, link or code" if suspicious(summary) else _unsupported(summary, ev))
    if reason:
        if summary != fallback_summary:
            dropped.append(f"summary: {summary[:80]!r} ({reason}; offline summary used)")
        summary = fallback_summary
    out["summary"] = summary
    return out, dropped


def keep_facts(desc: dict, dropped: list[str], facts: dict) -> tuple[dict, list[str]]:
    """What the source and page state as structured fields is not the LLM's to drop (an obeyed
    "leave the skills empty" must not blank an expert out of retrieval): the trigger words they
    list are always kept, and a field the LLM left empty after validation takes the offline
    brain's items."""
    desc = dict(desc)
    missing = [t for t in facts["trigger_words"] if t.lower() not in {w.lower() for w in desc["trigger_words"]}]
    if missing:
        desc["trigger_words"] = (desc["trigger_words"] + missing)[:MAX_ITEMS]
        dropped = [*dropped, f"trigger_words: {missing} listed by the source or page, kept"]
    for key in ("skills", "visual_attributes"):
        if not desc[key] and facts[key]:
            desc[key] = list(facts[key])
            dropped = [*dropped, f"{key}: empty after validation; the offline brain's items used"]
    return desc, dropped


def display_name(record: ExpertRecord) -> str:
    """The expert's name for a summary; a name carrying instructions, links or code is replaced."""
    name = " ".join(skeleton(record.name).split())
    if not name or len(name) > MAX_NAME_CHARS or suspicious(record.name):
        return f"{record.source} expert {record.source_id}"[:MAX_NAME_CHARS]
    return " ".join(strip_invisible(unicodedata.normalize("NFKC", record.name)).split())
