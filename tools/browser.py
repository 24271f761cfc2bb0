"""Read expert homepages with a real browser: Playwright driving Debian's Chromium.

    with HomepageReader(allowed_hosts={"civitai.com"}) as reader:
        for url in urls:
            reading = reader.read(url, {"civitai.com"})   # PageReading, or raises PageError

    reading = read_homepage(url, {"127.0.0.1"})          # one page, one browser

What a person sees is what comes back: the page is rendered (its JavaScript runs), then the
visible text is taken from the rendered DOM, leaving out anything a person cannot see
(display:none, visibility:hidden, opacity 0, zero size, off-screen, clipped, tiny font, text
the colour of its background, aria-hidden, HTML comments, <noscript>/<template>, JSON-LD and
other scripts, iframes). Alt text is returned apart, in ``image_alts``. All of it is untrusted:
see ``tools.page_text`` for sanitising and for the structured fields.

Network boundary (no request may leave for a host the caller did not allow):

- ``--host-resolver-rules`` answers NOTFOUND for every name and IP literal except loopback and
  the reader's allowed hosts: redirect hops, preconnects and WebSockets to other hosts die here.
- A context-wide route aborts every request whose host is not allowed for *this* read, and all
  fonts, media and images (the text is what we want).
- Playwright's route never sees redirect hops, so the page's responses are also intercepted
  through CDP (Fetch, response stage): a 3xx whose Location is not allowed is failed before
  Chromium follows it, and a read redirected elsewhere fails. Failing it there matters: a hop
  left to die at the resolver makes a DNS error page, and Chrome then runs its DNS-error probe,
  which queries public DNS (google.com via 8.8.8.8) with a resolver that ignores the rules.
- Popups never load; service workers are blocked; every read gets a fresh browser context (no
  cookies, storage or cache shared between pages), inside a browser launched with Playwright's
  own fresh temporary profile (a new --user-data-dir under $TMPDIR, deleted when it closes).
- A Chromium net-log of the test suite shows no DNS query and no connection beyond loopback.

Bounds: the whole read (navigation, settling, extraction) has a deadline; a document larger
than ``max_bytes`` (by Content-Length or by bytes received) or a page pulling in more than
``TOTAL_BYTES_FACTOR * max_bytes`` fails; visible text beyond ``max_chars`` is truncated.

The extraction script runs in an isolated JavaScript world (as browser extensions do), so a
page cannot fool it by redefining getComputedStyle, getBoundingClientRect or innerText, and it
never changes the page's DOM (removing nodes could change which CSS rules match).

Playwright lives in a private thread with its own event loop: ``HomepageReader`` may be used
from any thread, including code running inside an asyncio loop (LangGraph nodes), and one
browser serves every read (reads are serialised: one page at a time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from . import page_text

CHROMIUM = "/usr/bin/chromium"
BASE_RESOLVER_RULES = "MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage", "--mute-audio",
    "--disable-extensions", "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
)
BLOCKED_RESOURCE_TYPES = frozenset({"font", "media", "image", "manifest", "texttrack", "eventsource"})
TOTAL_BYTES_FACTOR = 8  # all responses of one page together may reach this many times max_bytes
VIEWPORT = {"width": 1280, "height": 900}
SETTLE_QUIET_MS = 250  # the DOM must be still this long ...
SETTLE_CAP_S = 3.0  # ... but a page that never stops changing is read after this long
MAX_ALTS, MAX_ALT_CHARS = 64, 300
_LOOPBACK = {"localhost", "127.0.0.1"}
_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")


class PageError(Exception):
    """A homepage that could not be read, as one line: ``<url>: <reason>``. ``kind`` is one of
    bad_url, disallowed_host, http_status (``status`` set), timeout, too_large,
    unsupported_content, network (DNS, refused connection ...), browser."""

    def __init__(self, url: str, kind: str, reason: str, status: int | None = None):
        self.url, self.kind, self.reason, self.status = _one_line(url, 200), kind, _one_line(reason, 300), status
        super().__init__(f"{self.url}: {self.reason}")


@dataclass
class PageReading:
    """What a person sees on an expert's homepage. Every string is untrusted data written by
    the page's author: pass it to an LLM only delimited as data, never as instructions.

    ``visible_text`` is the sanitised innerText of the rendered page without hidden content;
    ``image_alts`` is alt text of visible images, which a person does not see as text, kept
    apart and even less trusted; the structured fields are all taken from visible text.
    ``text_sha256`` hashes the whole normalised visible text (before truncation), so a change
    anywhere on the page changes it; ``truncated`` says visible_text was cut to max_chars."""

    url: str
    final_url: str
    title: str
    visible_text: str
    trigger_words: list[str] = field(default_factory=list)
    example_prompts: list[str] = field(default_factory=list)
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    image_alts: list[str] = field(default_factory=list)
    text_sha256: str = ""
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PageReading:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# ----------------------------------------------------------------------------- hosts

@dataclass(frozen=True)
class HostPolicy:
    """Which hosts a read may touch. Entries: ``host`` (any port), ``host:port``, ``*.domain``
    (its subdomains, not the domain itself) and IPv6 literals in brackets."""

    entries: tuple[tuple[str, int | None], ...]

    @classmethod
    def of(cls, hosts: Iterable[str]) -> HostPolicy:
        if isinstance(hosts, str):
            hosts = [hosts]
        entries = []
        for raw in hosts:
            host, port = _split_entry(str(raw))
            entries.append((host, port))
        return cls(tuple(sorted(set(entries), key=str)))

    def allows_host(self, host: str, port: int | None) -> bool:
        host = _norm_host(host)
        for pattern, want_port in self.entries:
            if want_port is not None and port != want_port:
                continue
            if pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False

    def allows(self, url: str) -> bool:
        try:
            scheme, host, port = _url_parts(url)
        except ValueError:
            return False
        return scheme in ("http", "https") and self.allows_host(host, port)

    def resolver_hosts(self) -> frozenset[str]:
        """Host patterns the browser's resolver must answer for (loopback always does)."""
        return frozenset(h for h, _ in self.entries if h not in _LOOPBACK)


def _split_entry(raw: str) -> tuple[str, int | None]:
    raw = raw.strip().lower().rstrip(".")
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?", raw)
    if not m or not _HOST_PATTERN.fullmatch(m.group(1)):
        raise ValueError(f"not a host name: {raw!r}")
    return _norm_host(m.group(1)), int(m.group(2)) if m.group(2) else None


def _norm_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host.startswith("*."):
        return "*." + _idna(host[2:])
    return _idna(host)


def _idna(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _url_parts(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("no host")
    port = parts.port  # raises ValueError on a bad port
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, _norm_host(parts.hostname), port if port is not None else default


def resolver_rules(hosts: Iterable[str]) -> str:
    """``--host-resolver-rules``: nothing resolves but loopback and these host patterns."""
    extra = []
    for host in sorted(set(hosts)):
        if host in _LOOPBACK:
            continue
        if not _HOST_PATTERN.fullmatch(host if ":" not in host else f"[{host}]"):
            raise ValueError(f"not a host name: {host!r}")
        extra.append(f"EXCLUDE {host}" if ":" not in host else f"EXCLUDE [{host}]")
    return ", ".join([BASE_RESOLVER_RULES, *extra])


def _one_line(text: str, limit: int) -> str:
    text = page_text.clean_line(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe_host(url: str) -> str:
    try:
        host = urlsplit(url).hostname or "?"
    except ValueError:
        host = "?"
    return re.sub(r"[^a-z0-9.:\[\]-]", "", host.lower())[:80] or "?"


# ----------------------------------------------------------------------------- page scripts

# Resolves true once the DOM has been still for QUIET ms, false if it is still changing at CAP.
_SETTLE_JS = """
new Promise((resolve) => {
  let timer = null, cap = null, done = false;
  const finish = (quiet) => {
    if (done) return; done = true; obs.disconnect(); clearTimeout(timer); clearTimeout(cap); resolve(quiet);
  };
  const obs = new MutationObserver(() => { clearTimeout(timer); timer = setTimeout(() => finish(true), %(quiet)d); });
  obs.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
  timer = setTimeout(() => finish(true), %(quiet)d);
  cap = setTimeout(() => finish(false), %(cap)d);
})
"""

# Walks the rendered DOM once, deciding for every element and text node whether a person can
# see it; returns the visible text, a tree of the visible elements, visible images' alt text
# and statistics of what was hidden. Read-only: the DOM is never modified.
_EXTRACT_JS = r"""
(() => {
const O = __OPTS__;
const doc = document, html = doc.documentElement, body = doc.body || html;
const sx = window.scrollX, sy = window.scrollY, vw = window.innerWidth;
const clipsX = (el) => el && ['hidden', 'clip'].includes(getComputedStyle(el).overflowX);
const maxX = (clipsX(html) || (doc.body && clipsX(doc.body))) ? vw : Math.max(vw, O.farX);
const rootDark = /dark/.test(getComputedStyle(html).colorScheme || '');
const SKIP = new Set(['script', 'style', 'noscript', 'template', 'head', 'meta', 'link', 'title', 'base',
  'iframe', 'frame', 'frameset', 'object', 'embed', 'audio', 'video', 'source', 'track', 'canvas', 'map',
  'area', 'slot', 'datalist']);
const hidden = {};
const note = (reason, chars) => { const h = hidden[reason] || (hidden[reason] = [0, 0]); h[0] += 1; h[1] += chars; };
const info = new Map(), shown = new Set(), alts = [];
let elements = 0, chars = 0, capped = false, ariaKept = 0, shadowRoots = 0;
const bodyTextLen = (body.textContent || '').length;

const parseColor = (s) => {
  const m = /^rgba?\(([^)]*)\)$/.exec(s || '');
  if (!m) return null;
  const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(Number);
  if (p.length < 3 || p.some(Number.isNaN)) return null;
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
};
const blend = (c, under) => [0, 1, 2].map((i) => c[i] * c[3] + under[i] * (1 - c[3])).concat([1]);
const lum = (c) => {
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
};
const bgCache = new Map();
function background(el) {  // the opaque colour behind el's text, or null when unknown (images, gradients)
  if (bgCache.has(el)) return bgCache.get(el);
  let out = null;
  const st = getComputedStyle(el);
  if (!st.backgroundImage || st.backgroundImage === 'none') {
    const c = parseColor(st.backgroundColor);
    if (c) {
      const parent = el.parentElement;
      const under = c[3] >= 0.99 ? null : (parent ? background(parent) : (rootDark ? null : [255, 255, 255, 1]));
      out = c[3] >= 0.99 ? c : (under ? (c[3] <= 0.01 ? under : blend(c, under)) : null);
    }
  }
  bgCache.set(el, out);
  return out;
}

function elementReason(el, st, opacity) {
  if (st.display === 'none') return 'display:none';
  if (opacity < O.minOpacity) return 'opacity 0';
  if (/opacity\(\s*0*(\.0*)?\s*%?\s*\)/.test(st.filter || '')) return 'opacity 0';
  if ((st.position === 'absolute' || st.position === 'fixed') && /^rect\(/.test(st.clip || '')) {
    const n = (st.clip.match(/-?[\d.]+(?=px)/g) || []).map(Number);
    if (n.length === 4 && (n[1] - n[3] < 2 || n[2] - n[0] < 2)) return 'clipped';
  }
  const cp = st.clipPath || 'none';
  if (cp !== 'none' && /inset\(\s*(4[5-9]|[5-9]\d|100)(\.\d+)?%|circle\(\s*0(px|%)?[\s)]|polygon\(\s*0px 0px\s*\)/.test(cp)) return 'clipped';
  return null;
}

function textReason(t, el, st, clip) {
  if (st.visibility !== 'visible') return 'visibility:hidden';
  if (el.checkVisibility && !el.checkVisibility()) return 'not rendered';
  if (st.contentVisibility === 'hidden') return 'collapsed';
  if (!(parseFloat(st.fontSize) >= O.minFont)) return 'tiny font';
  const decorated = (st.textShadow && st.textShadow !== 'none') || parseFloat(st.webkitTextStrokeWidth) > 0;
  const clipText = st.backgroundClip === 'text' || st.webkitBackgroundClip === 'text';
  const paint = parseColor(st.webkitTextFillColor) || parseColor(st.color);
  if (paint && !decorated && !clipText) {
    if (paint[3] < 0.1) return 'transparent text';
    const bg = background(el);
    if (bg) {
      const a = lum(blend(paint, bg)), b = lum(bg);
      if ((Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05) < O.minContrast) return 'same colour as background';
    }
  }
  const range = doc.createRange();
  range.selectNodeContents(t);
  const rects = Array.from(range.getClientRects()).filter((r) => r.width >= 1 && r.height >= 1);
  if (!rects.length) return 'zero size';
  const onPage = rects.filter((r) => r.right + sx > 0 && r.bottom + sy > 0 && r.left + sx < maxX);
  if (!onPage.length) return 'off-screen';
  if (clip && !onPage.some((r) => Math.min(r.right, clip.right) - Math.max(r.left, clip.left) >= 2 &&
                                  Math.min(r.bottom, clip.bottom) - Math.max(r.top, clip.top) >= 2)) return 'clipped';
  return null;
}

function hintOf(el, tag) {
  let h = '';
  const add = (v) => { if (v) h += ' ' + String(v).slice(0, 80); };
  add(el.getAttribute('class')); add(el.id); add(el.getAttribute('role')); add(el.getAttribute('itemprop'));
  for (const a of el.attributes) {
    if (a.name.startsWith('data-') && a.name.length < 40) { add(a.name.slice(5)); if (a.value.length < 60) add(a.value); }
  }
  if (tag === 'a') add((el.getAttribute('href') || '').slice(0, 80));
  return h.toLowerCase().trim().slice(0, 240);
}

function walk(el, opacity, clip, depth) {
  const tag = el.localName;
  if (capped) return null;
  if (SKIP.has(tag)) {
    // Never read; but if it renders text (fallback content, a styled <style>), innerText of an
    // ancestor would show it unchecked, so the ancestor assembles its text itself.
    const text = (el.textContent || '').trim().length;
    return {node: null, vis: false, dirty: text > 0 && getComputedStyle(el).display !== 'none'};
  }
  if (++elements > O.maxElements || depth > 400) { capped = true; return null; }
  const st = getComputedStyle(el);
  const alpha = opacity * (Number.isNaN(parseFloat(st.opacity)) ? 1 : parseFloat(st.opacity));
  let reason = elementReason(el, st, alpha);
  if (!reason && el.getAttribute('aria-hidden') === 'true' && el !== html && el !== doc.body) {
    const len = (el.textContent || '').trim().length;
    if (len > 200 && len > 0.5 * bodyTextLen) ariaKept += 1; else reason = 'aria-hidden';
  }
  if (reason) {
    const n = (el.textContent || '').trim().length;
    if (n) note(reason, n);
    return {node: null, vis: false, dirty: n > 0 && reason !== 'display:none'};
  }
  const display = st.display || '';
  const block = /^(block|flex|grid|list-item|table|flow-root)/.test(display) && display !== 'table-cell';
  const cell = display === 'table-cell';
  const chip = /^inline-(block|flex|grid|table)/.test(display);
  const pre = /^(pre|break-spaces)/.test(st.whiteSpace || '');
  if (tag === 'img' || (tag === 'input' && (el.getAttribute('type') || '').toLowerCase() === 'image')) {
    const alt = (el.getAttribute('alt') || '').trim();
    const r = el.getBoundingClientRect();
    if (alt && st.visibility === 'visible' && r.width >= 2 && r.height >= 2 && r.right + sx > 0 &&
        r.bottom + sy > 0 && r.left + sx < maxX && alts.length < O.maxAlts) alts.push(alt.slice(0, 2000));
    return {node: null, vis: false, dirty: false};
  }
  let childClip = st.position === 'fixed' ? null : clip;
  if (el !== html && el !== doc.body) {
    const ox = ['hidden', 'clip'].includes(st.overflowX), oy = ['hidden', 'clip'].includes(st.overflowY);
    const scrolls = ['auto', 'scroll'].includes(st.overflowX) || ['auto', 'scroll'].includes(st.overflowY);
    if (ox || oy || scrolls) {
      const r = el.getBoundingClientRect();
      const c = {left: -Infinity, top: -Infinity, right: Infinity, bottom: Infinity};
      if (ox || (scrolls && r.width < 2)) { c.left = r.left; c.right = r.right; }
      if (oy || (scrolls && r.height < 2)) { c.top = r.top; c.bottom = r.bottom; }
      childClip = childClip ? {left: Math.max(c.left, childClip.left), right: Math.min(c.right, childClip.right),
                               top: Math.max(c.top, childClip.top), bottom: Math.min(c.bottom, childClip.bottom)} : c;
    }
  }
  const node = {t: tag, c: []};
  const hint = hintOf(el, tag);
  if (hint) node.h = hint;
  if (block) node.b = 1;
  if (chip) node.i = 1;
  if (pre) node.p = 1;
  let vis = false, dirty = false;  // dirty: assemble the text here, innerText would differ
  if (el.shadowRoot) { shadowRoots += 1; dirty = true; }
  if (tag.includes('-')) dirty = true;  // a custom element may hide a closed shadow root: light DOM only
  // A closed <details> shows its <summary> only.
  const summary = tag === 'details' && !el.open ? Array.from(el.children).find((c) => c.localName === 'summary') : undefined;
  for (const child of el.childNodes) {
    if (summary !== undefined && child !== summary) {
      const n = (child.textContent || '').trim().length;
      if (n) { note('collapsed', n); dirty = true; }
      continue;
    }
    if (child.nodeType === 3) {
      const data = child.data;
      if (!data.trim()) { if (node.c.length) node.c.push(' '); continue; }
      const why = textReason(child, el, st, childClip);
      if (why) { note(why, data.trim().length); if (why !== 'visibility:hidden') dirty = true; continue; }
      if (chars + data.length > O.maxChars) { capped = true; dirty = true; continue; }
      chars += data.length;
      shown.add(child);
      node.c.push(data);
      vis = true;
    } else if (child.nodeType === 1) {
      if (child.localName === 'br') { node.c.push({t: 'br'}); continue; }
      const res = walk(child, alpha, childClip, depth + 1);
      if (!res) { if (capped) dirty = true; continue; }
      if (res.dirty) dirty = true;
      if (res.vis) { vis = true; node.c.push(res.node); if (info.get(child).chip) dirty = true; }
    }
  }
  info.set(el, {vis, dirty, block, cell, chip, pre});
  return {node, vis, dirty};
}

function assemble(el, out) {
  const inf = info.get(el);
  if (!inf || !inf.vis) return;
  const end = inf.block ? '\n' : (inf.cell ? '\t' : (inf.chip ? ' ' : ''));
  if (!inf.dirty && el instanceof HTMLElement && el.getClientRects().length) {
    out.push(inf.block ? '\n' : '', el.innerText, end);
    return;
  }
  out.push(inf.block ? '\n' : (inf.chip ? ' ' : ''));
  for (const child of el.childNodes) {
    if (child.nodeType === 3) { if (shown.has(child)) out.push(inf.pre ? child.data : child.data.replace(/\s+/g, ' ')); }
    else if (child.nodeType === 1) { if (child.localName === 'br') out.push('\n'); else assemble(child, out); }
  }
  out.push(end);
}

const root = walk(body, 1, null, 0);
const out = [];
assemble(body, out);
let comments = 0;
const tw = doc.createTreeWalker(doc, NodeFilter.SHOW_COMMENT);
while (tw.nextNode()) { if (tw.currentNode.data.trim()) comments += 1; }
return {title: doc.title || '', url: location.href, contentType: doc.contentType || '', text: out.join(''),
        tree: root && root.node, alts, hidden, comments, capped, elements, ariaKept, shadowRoots};
})()
"""

_EXTRACT_OPTS = {"minOpacity": 0.1, "minFont": 4, "minContrast": 1.2, "farX": 5000, "maxAlts": MAX_ALTS,
                 "maxElements": 50_000}


# ----------------------------------------------------------------------------- one read

class _Read:
    """Book-keeping for one page read: network events, limits and the first violation."""

    def __init__(self, url: str, policy: HostPolicy, max_bytes: int):
        self.url, self.policy, self.max_bytes = url, policy, max_bytes
        self.violation: PageError | None = None
        self.blocked_hosts: Counter = Counter()
        self.blocked_navigations: list[str] = []
        self.received: Counter = Counter()  # CDP requestId -> decoded bytes
        self.documents: set[str] = set()
        self.inflight: set[str] = set()
        self.page = None
        self.main_frame: str | None = None
        self.loaded = False

    def fail(self, kind: str, reason: str) -> None:
        if self.violation is None:
            self.violation = PageError(self.url, kind, reason)
            if self.page is not None:  # stop the page now rather than at the deadline
                asyncio.get_running_loop().create_task(_quietly(self.page.close()))

    def check(self) -> None:
        if self.violation is not None:
            raise self.violation

    # Playwright events
    async def route(self, route) -> None:
        request = route.request
        allowed = self.policy.allows(request.url)
        try:  # popups never load anything: only our page is watched for redirects
            if self.page is not None and request.frame.page != self.page:
                await route.abort("blockedbyclient")
                return
        except Exception:
            pass
        top_navigation = False
        if not allowed:
            self.blocked_hosts[_safe_host(request.url)] += 1
            try:
                top_navigation = request.is_navigation_request() and request.frame.parent_frame is None
            except Exception:
                pass
        try:
            if top_navigation:
                # The page tries to leave for another host (script, meta refresh, link). While it
                # is still loading, that is a redirect: the read fails. Once it has loaded,
                # answering 204 No Content cancels the navigation and keeps the page we read.
                self.blocked_navigations.append(_safe_host(request.url))
                if not self.loaded:
                    self.fail("disallowed_host",
                              f"the page redirected to a host not allowed: {_safe_host(request.url)}")
                    await route.abort("blockedbyclient")
                else:
                    await route.fulfill(status=204, body="")
            elif not allowed or request.resource_type in BLOCKED_RESOURCE_TYPES:
                await route.abort("blockedbyclient")
            else:
                await route.continue_()
        except Exception:  # the page or context closed under the handler
            pass

    async def route_websocket(self, ws) -> None:
        if self.policy.allows(ws.url.replace("ws", "http", 1)):
            ws.connect_to_server()
        else:
            self.blocked_hosts[_safe_host(ws.url)] += 1
            await _quietly(ws.close())

    def on_request(self, request) -> None:
        # Redirect hops bypass routing; check each as it is issued.
        if request.redirected_from is not None and not self.policy.allows(request.url):
            self.blocked_hosts[_safe_host(request.url)] += 1
            if request.is_navigation_request() and not self.loaded:
                self.fail("disallowed_host", f"redirected to a host not allowed: {_safe_host(request.url)}")

    async def on_paused(self, cdp, event: dict) -> None:
        """CDP Fetch, response stage: stop redirects to hosts not allowed before they are followed."""
        try:
            status = int(event.get("responseStatusCode") or 0)
            location = next((h.get("value", "") for h in event.get("responseHeaders") or []
                             if h.get("name", "").lower() == "location"), None)
            if 300 <= status < 400 and location:
                target = urljoin(event["request"]["url"], location)
                if not self.policy.allows(target):
                    self.blocked_hosts[_safe_host(target)] += 1
                    if event.get("resourceType") == "Document" and event.get("frameId") == self.main_frame \
                            and not self.loaded:
                        self.fail("disallowed_host", f"redirected to a host not allowed: {_safe_host(target)}")
                    await cdp.send("Fetch.failRequest",
                                   {"requestId": event["requestId"], "errorReason": "BlockedByClient"})
                    return
            await cdp.send("Fetch.continueRequest", {"requestId": event["requestId"]})
        except Exception:  # the page closed under us
            pass

    # CDP Network events (bytes and in-flight requests)
    def on_request_sent(self, event: dict) -> None:
        if event.get("type") in ("Document", "XHR", "Fetch", "Script", "Stylesheet"):
            self.inflight.add(event["requestId"])

    def on_request_done(self, event: dict) -> None:
        self.inflight.discard(event.get("requestId"))

    def on_response(self, event: dict) -> None:
        if event.get("type") != "Document":
            return
        self.documents.add(event["requestId"])
        headers = {k.lower(): v for k, v in (event.get("response", {}).get("headers") or {}).items()}
        try:
            length = int(str(headers.get("content-length", "")).split(",")[0])
        except ValueError:
            return
        if length > self.max_bytes:
            self.fail("too_large", f"page too large: {length:,} bytes declared, limit {self.max_bytes:,}")

    def on_data(self, event: dict) -> None:
        rid = event.get("requestId")
        self.received[rid] += int(event.get("dataLength") or 0) or int(event.get("encodedDataLength") or 0)
        if rid in self.documents and self.received[rid] > self.max_bytes:
            self.fail("too_large", f"page too large: over {self.max_bytes:,} bytes")
        total = sum(self.received.values())
        if total > TOTAL_BYTES_FACTOR * self.max_bytes:
            self.fail("too_large", f"page and its resources too large: over {total:,} bytes")


async def _quietly(awaitable, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout)
    except Exception:
        pass


def _navigation_error(url: str, exc: Exception) -> PageError:
    first = str(exc).strip().split("\n", 1)[0]
    m = re.search(r"net::(ERR_[A-Z_]+)", first)
    if "Timeout" in type(exc).__name__ or ("Timeout" in first and "exceeded" in first):
        return PageError(url, "timeout", "navigation timed out")
    if m and m.group(1) == "ERR_BLOCKED_BY_CLIENT":
        return PageError(url, "disallowed_host", "navigation blocked: host not allowed")
    if m and re.match(r"ERR_(NAME_|CONNECTION_|ADDRESS_|INTERNET_|NETWORK_|TIMED_OUT|EMPTY_RESPONSE|SSL|CERT)",
                      m.group(1)):
        return PageError(url, "network", f"network error: {m.group(1)}")
    if "Download is starting" in first:
        return PageError(url, "unsupported_content", "the URL is a download, not a page")
    return PageError(url, "browser", f"navigation failed: {m.group(1) if m else first[:120]}")


# ----------------------------------------------------------------------------- the reader

class HomepageReader:
    """One headless Chromium reused for many reads. Use as a context manager (or call
    ``close``). ``allowed_hosts`` given here are resolvable from the start; a read that allows
    other hosts relaunches the browser once with the union (the resolver rules are fixed at
    launch). Each ``read`` still enforces its own ``allowed_hosts``."""

    def __init__(self, allowed_hosts: Iterable[str] = (), *, executable_path: str = CHROMIUM,
                 extra_args: Iterable[str] = (), user_agent: str | None = None):
        self.allowed_hosts = tuple([allowed_hosts] if isinstance(allowed_hosts, str) else allowed_hosts)
        self.executable_path = executable_path
        self.extra_args = tuple(extra_args)
        self.user_agent = user_agent
        self._resolver_hosts = set(HostPolicy.of(self.allowed_hosts).resolver_hosts())
        self._launched_hosts: frozenset[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pw = None
        self._browser = None
        self._lock: asyncio.Lock | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    # lifecycle
    def __enter__(self) -> HomepageReader:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the private thread and launch the browser (``read`` does it when needed)."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError("this HomepageReader is closed")
            if self._thread is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="diffgraph-browser", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
        self._call(self._ensure_browser(frozenset()), timeout=60)

    def close(self) -> None:
        with self._start_lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    # reading
    def read(self, url: str, allowed_hosts: Iterable[str] | None = None, *, timeout_s: float = 15,
             max_bytes: int = 2_000_000, max_chars: int = 20_000) -> PageReading:
        """Render ``url`` and return what a person sees on it; raises PageError (one line) on
        a bad URL, a host not allowed (redirects included), HTTP 4xx/5xx, a timeout, a page
        over ``max_bytes`` or content that is not a page. ``allowed_hosts`` defaults to the
        reader's own."""
        policy = HostPolicy.of(self.allowed_hosts if allowed_hosts is None else allowed_hosts)
        try:
            scheme, host, port = _url_parts(url)
        except ValueError as exc:
            raise PageError(url, "bad_url", f"not a URL ({exc})") from None
        if scheme not in ("http", "https"):
            raise PageError(url, "bad_url", f"scheme {scheme!r} not allowed (http and https only)")
        if not policy.allows_host(host, port):
            raise PageError(url, "disallowed_host", f"host not allowed: {_safe_host(url)}")
        if self._thread is None:
            self.start()
        return self._call(self._read(url, policy, timeout_s, max_bytes, max_chars), timeout=timeout_s + 30)

    def _call(self, coro, timeout: float):
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("this HomepageReader is closed")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            asyncio.run_coroutine_threadsafe(self._drop_browser(), loop)
            raise PageError("browser", "timeout", "the browser stopped answering; it will be restarted") from None

    # inside the private thread
    async def _ensure_browser(self, hosts: frozenset[str]):
        if self._lock is None:
            self._lock = asyncio.Lock()
        wanted = frozenset(self._resolver_hosts | hosts)
        if self._browser is not None and self._browser.is_connected() and wanted <= (self._launched_hosts or set()):
            return self._browser
        await self._drop_browser()
        if self._pw is None:
            from playwright.async_api import async_playwright

            self._pw = await async_playwright().start()
        args = [*CHROMIUM_ARGS, f"--host-resolver-rules={resolver_rules(wanted)}", *self.extra_args]
        self._browser = await self._pw.chromium.launch(
            executable_path=self.executable_path, headless=True, args=args, timeout=60_000,
            handle_sigint=False, handle_sigterm=False, handle_sighup=False)
        self._launched_hosts = wanted
        self._resolver_hosts |= wanted
        return self._browser

    async def _drop_browser(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            await _quietly(browser.close(), 15)

    async def _shutdown(self) -> None:
        await self._drop_browser()
        if self._pw is not None:
            pw, self._pw = self._pw, None
            await _quietly(pw.stop(), 15)

    async def _read(self, url: str, policy: HostPolicy, timeout_s: float, max_bytes: int,
                    max_chars: int) -> PageReading:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            started = time.monotonic()
            try:
                browser = await asyncio.wait_for(self._ensure_browser(policy.resolver_hosts()), 60)
                context = await browser.new_context(
                    viewport=VIEWPORT, service_workers="block", accept_downloads=False, locale="en-US",
                    user_agent=self.user_agent, java_script_enabled=True)
            except Exception as exc:
                await self._drop_browser()
                raise PageError(url, "browser", f"browser unavailable: {_one_line(exc, 120)}") from None
            state = _Read(url, policy, max_bytes)
            try:
                budget = max(0.5, timeout_s - (time.monotonic() - started))
                raw = await asyncio.wait_for(self._visit(context, state, started + timeout_s, max_chars), budget)
            except asyncio.TimeoutError:
                state.check()
                raise PageError(url, "timeout", f"timed out after {timeout_s:g}s") from None
            except PageError:
                raise
            except Exception as exc:  # the page closed under us, the renderer crashed ...
                state.check()
                first = str(exc).strip().split("\n", 1)[0]
                raise PageError(url, "browser", f"browser error: {first[:120]}") from None
            finally:
                await _quietly(context.close(), 10)
            if not policy.allows(raw.get("url") or ""):
                where = state.blocked_navigations[-1] if state.blocked_navigations else _safe_host(raw.get("url") or "")
                raise PageError(url, "disallowed_host", f"the page moved to a host not allowed: {where}")
            return _reading(url, raw, state, max_chars)

    async def _visit(self, context, state: _Read, deadline: float, max_chars: int) -> dict:
        from playwright.async_api import Error as PlaywrightError

        await context.route("**/*", state.route)
        await context.route_web_socket(re.compile(".*"), state.route_websocket)
        context.on("request", state.on_request)
        page = await context.new_page()
        state.page = page
        page.on("popup", lambda popup: asyncio.get_running_loop().create_task(_quietly(popup.close())))
        cdp = await context.new_cdp_session(page)
        cdp.on("Network.requestWillBeSent", state.on_request_sent)
        cdp.on("Network.loadingFinished", state.on_request_done)
        cdp.on("Network.loadingFailed", state.on_request_done)
        cdp.on("Network.responseReceived", state.on_response)
        cdp.on("Network.dataReceived", state.on_data)
        loop = asyncio.get_running_loop()
        cdp.on("Fetch.requestPaused", lambda event: loop.create_task(state.on_paused(cdp, event)))
        state.main_frame = (await cdp.send("Page.getFrameTree"))["frameTree"]["frame"]["id"]
        await cdp.send("Network.enable")
        await cdp.send("Fetch.enable", {"patterns": [{"urlPattern": "*", "requestStage": "Response"}]})
        remaining_ms = max(500, (deadline - time.monotonic()) * 1000)
        try:
            response = await page.goto(state.url, wait_until="load", timeout=remaining_ms)
        except PlaywrightError as exc:
            state.check()
            raise _navigation_error(state.url, exc) from None
        state.check()
        state.loaded = True
        if response is not None:
            if response.status >= 400:
                raise PageError(state.url, "http_status", f"HTTP {response.status}", response.status)
            ctype = (await response.header_value("content-type") or "text/html").split(";")[0].strip().lower()
            if not (ctype.startswith("text/") or ctype in ("application/xhtml+xml", "application/xml")):
                raise PageError(state.url, "unsupported_content", f"not a page: {ctype[:60]}")
        settled = await self._settle(cdp, state, deadline)
        state.check()
        opts = dict(_EXTRACT_OPTS, maxChars=max(4 * max_chars, 400_000))
        raw = await self._evaluate(cdp, state, _EXTRACT_JS.replace("__OPTS__", json.dumps(opts)))
        state.check()
        raw["settled"] = settled
        raw["finalUrl"] = page.url
        return raw

    async def _settle(self, cdp, state: _Read, deadline: float) -> bool:
        """Wait until the DOM is still and no script/XHR is loading, up to SETTLE_CAP_S."""
        until = min(time.monotonic() + SETTLE_CAP_S, deadline - 1.0)
        while True:
            cap_ms = int(max(0.0, until - time.monotonic()) * 1000)
            if cap_ms <= 0:
                return False
            quiet = await self._evaluate(cdp, state, _SETTLE_JS % {"quiet": SETTLE_QUIET_MS, "cap": cap_ms})
            if quiet and not state.inflight:
                return True
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.1)

    async def _evaluate(self, cdp, state: _Read, expression: str):
        """Evaluate in a fresh isolated world of the main frame: the page's own scripts cannot
        see or patch the functions the expression uses."""
        tree = await cdp.send("Page.getFrameTree")
        world = await cdp.send("Page.createIsolatedWorld", {
            "frameId": tree["frameTree"]["frame"]["id"], "worldName": "diffgraph-reader", "grantUniveralAccess": False})
        result = await cdp.send("Runtime.evaluate", {
            "expression": expression, "contextId": world["executionContextId"], "returnByValue": True,
            "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            detail = details.get("exception", {}).get("description") or details.get("text")
            raise PageError(state.url, "browser", f"page script failed: {_one_line(detail or '?', 120)}")
        return result["result"].get("value")


def _reading(url: str, raw: dict, state: _Read, max_chars: int) -> PageReading:
    """Sanitise what the page script returned and pull out the structured fields."""
    removed: Counter = Counter()
    text = page_text.clean_text(raw.get("text") or "", removed)
    title = page_text.clean_line(raw.get("title") or "", removed)
    alts: list[str] = []
    for alt in raw.get("alts") or []:
        alt = page_text.clean_line(alt, removed)[:MAX_ALT_CHARS]
        if alt and alt not in alts:
            alts.append(alt)
    tree = page_text.Node.from_json(raw["tree"]) if raw.get("tree") else None
    fields = page_text.extract_fields(tree, text, (raw.get("contentType") or "text/html").lower())

    warnings = []
    if (line := page_text.describe_removed(removed)) is not None:
        warnings.append(line)
    hidden = raw.get("hidden") or {}
    if hidden:
        parts = ", ".join(f"{reason} {n_chars} chars in {n}" for reason, (n, n_chars)
                          in sorted(hidden.items(), key=lambda kv: -kv[1][1]))
        warnings.append(f"hidden text not read: {parts}")
    if raw.get("comments"):
        warnings.append(f"{raw['comments']} HTML comments not read")
    if raw.get("ariaKept"):
        warnings.append("aria-hidden ignored on a container holding most of the page (a modal is probably open)")
    if raw.get("shadowRoots"):
        warnings.append(f"text inside {raw['shadowRoots']} shadow roots not read")
    if state.blocked_hosts:
        hosts = ", ".join(h for h, _ in state.blocked_hosts.most_common(3))
        warnings.append(f"blocked {sum(state.blocked_hosts.values())} requests to hosts not allowed ({hosts}); "
                        "the page may look different to a person")
    if state.blocked_navigations:
        warnings.append(f"blocked the page's navigation to a host not allowed ({state.blocked_navigations[0]})")
    if not raw.get("settled", True):
        warnings.append(f"the page was still changing after {SETTLE_CAP_S:g}s; read as it was then")
    full_length = len(text)
    truncated = bool(raw.get("capped")) or full_length > max_chars
    if raw.get("capped"):
        warnings.append("page too large to read whole: extraction stopped early")
    sha = page_text.text_sha256(text)
    if full_length > max_chars:
        text = page_text.truncate(text, max_chars)
        warnings.append(f"visible text truncated from {full_length:,} to {len(text):,} characters")

    return PageReading(
        url=url, final_url=str(raw.get("finalUrl") or raw.get("url") or url), title=title, visible_text=text,
        trigger_words=fields.trigger_words, example_prompts=fields.example_prompts, base_model=fields.base_model,
        tags=fields.tags, image_alts=alts, text_sha256=sha, truncated=truncated, warnings=warnings)


def read_homepage(url: str, allowed_hosts: set[str], timeout_s: float = 15, max_bytes: int = 2_000_000,
                  max_chars: int = 20_000) -> PageReading:
    """Read one homepage with a browser of its own (use HomepageReader for many)."""
    policy_hosts = HostPolicy.of(allowed_hosts).resolver_hosts()
    with HomepageReader(policy_hosts) as reader:
        return reader.read(url, allowed_hosts, timeout_s=timeout_s, max_bytes=max_bytes, max_chars=max_chars)
