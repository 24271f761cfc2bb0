"""`diffgraph serve`: one FastAPI server with the Gradio chat UI at / and an HTTP API under /v1.

    POST /v1/images/generations       the OpenAI Images API (prompt, n, size, response_format
                                      b64_json|url, and seed as an extension); OpenAI-style errors
    GET  /v1/images/{id}              an image (PNG with its recipe in the metadata)
    GET  /v1/images/{id}/recipe       its MergeRecipe and why each expert was picked (JSON)
    GET  /v1/graph/status             what the universal graph holds (JSON)
    GET  /v1/models                   the base models this server renders with (a request's ``model``)

With DIFFGRAPH_API_KEYS set, every /v1 request needs ``Authorization: Bearer KEY`` (agents/auth.py)
and the web UI a login, and each key may make DIFFGRAPH_RATE_LIMIT requests a minute (each UI login
and address as many chat turns); a request body is read up to MAX_BODY bytes. Every request, UI
included, must name this server in its Host header and, from a browser, come from its own pages
(auth.HostCheck: no DNS rebinding, no cross-site requests). Refusals are one-line OpenAI-style
errors (400 for a Host, 401, 403 for a cross-site Origin, 413, 429 with Retry-After).

Image requests are served one at a time in arrival order (GenerationQueue: they wait on the
event loop, holding no thread, and a full queue is refused with 503 and Retry-After), so
concurrent clients all get an answer, none is overtaken by a later one, and only one request's
working memory is live at a time; the engine's byte-bounded caches keep the rest flat. Everything is served from this
process: Gradio's analytics are off and its fonts and scripts are its own bundled files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from pathlib import Path

# Before gradio is imported anywhere: no analytics, no update check, no telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi import Path as PathParam  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse  # noqa: E402

from diffgraph.errors import DiffGraphError, describe, one_line, reason  # noqa: E402
from diffgraph.families import label  # noqa: E402
from diffgraph.files import atomic_write_bytes  # noqa: E402
from diffgraph.graph_store.status import graph_status
from diffgraph.merger.png import RECIPE_KEY
from diffgraph.settings import Settings, get_settings  # noqa: E402
from diffgraph.tools import bases  # noqa: E402

from .auth import ApiKeys, HostCheck, is_loopback  # noqa: E402
from .chat import ChatAgent, ChatError, ChatServices  # noqa: E402
from .generate import ROW_HEADERS, expert_rows  # noqa: E402

MAX_N = 10
MAX_BODY = 64 * 1024  # an image request is a few hundred bytes; a larger body is refused, not buffered
MAX_API_PROMPT = 4000  # as OpenAI's; the renderer reads the first 400 characters (see chat.MAX_PROMPT_CHARS)
MAX_SIDE = 1024
# OpenAI's own image models, which OpenAI clients send by default: they mean "the server's base"
# OpenAI's image request as this server reads it (the OpenAPI schema at /v1/openapi.json): the
# bounds are checked by _validate, which answers one-line 400s for anything outside them.
IMAGE_REQUEST = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_API_PROMPT},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1},
        "size": {"type": "string", "pattern": r"^(auto|\d{2,4}x\d{2,4})$", "example": "256x256",
                 "description": f"WIDTHxHEIGHT, sides from 16 to {MAX_SIDE}; rendered at the base's size, then scaled"},
        "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "model": {"type": "string", "description": "a base model /v1/models lists (OpenAI's model names: the default)"},
    },
}
OPENAI_IMAGE_MODELS = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"})
MAX_WAITING = 32  # image requests queued behind the one being served; more are refused with 503
INDEX_SIZE = 4096  # image ids -> paths remembered; older ones are found on disk again
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
IMAGE_ID = PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,84}$", description="an image id (.png may follow)")

CSS = """
#last-image img, #gallery img, #chat img { image-rendering: pixelated; }
#last-image img { width: 256px; height: 256px; object-fit: contain; }
#chat img { width: 96px; height: 96px; }
#experts table { font-size: 0.85em; }
#experts th, #experts td { padding: 3px 6px !important; }
#experts th, #experts td:nth-child(2), #experts td:nth-child(3), #experts td:nth-child(4) { white-space: nowrap; }
#gallery .grid-container { grid-template-columns: repeat(auto-fill, 112px) !important; grid-auto-rows: 112px !important; }
#gallery .thumbnail-item { width: 112px; height: 112px; }
"""


class APIError(Exception):
    """An OpenAI-shaped error answer. Its message is one bounded line, whatever value of the
    request it quotes."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        message = one_line(message)
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class GenerationQueue:
    """Image requests served first come, first served, ``max_active`` at a time (default one).

    Renders share one device (the engine's lock), but a threading.Lock hands itself to whoever
    asks first when it is free, not to whoever waited longest: a request for n=3 images lost
    the device between its images to five later single-image requests and finished last, and
    later requests overtook earlier ones under load (benchmarks/RESULTS.md). Here a request
    waits on the event loop in a FIFO of futures and a freed slot is handed straight to the
    oldest waiter, so no newcomer barges in; only then does it take a worker thread. A waiting
    request holds no thread and little memory, and past ``max_waiting`` new ones are refused at
    once. With ``max_active=1`` answers come back in arrival order; 2 lets the next request
    select its experts while one renders (more throughput on the mini world, where selection is
    a large share of a request) at the price of one more request's working memory and of order:
    requests in progress side by side can finish out of order (a long one, n > 1, can be passed
    by short ones admitted while it runs). (The web UI's chat turns do not pass through here;
    they take the engine's lock.)"""

    def __init__(self, max_waiting: int = MAX_WAITING, max_active: int = 1):
        if max_active < 1:
            raise ValueError("max_active must be at least 1")
        self.max_waiting, self.max_active = max_waiting, max_active
        self._waiters: deque[asyncio.Future] = deque()
        self.active = 0
        self.served = 0
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def turn(self):
        """Runs on the event loop (the counters need no lock there)."""
        if self.active < self.max_active and not self._waiters:
            self.active += 1
        else:
            if len(self._waiters) >= self.max_waiting:
                self.refused += 1
                raise APIError(503, f"the server is busy: {len(self._waiters)} image requests are already waiting; "
                               "retry shortly", kind="server_error", code="queue_full", headers={"Retry-After": "5"})
            slot = asyncio.get_running_loop().create_future()
            self._waiters.append(slot)
            try:
                await slot  # resolved by _release, which has already counted this request as active
            except asyncio.CancelledError:
                if slot.done() and not slot.cancelled():  # given a slot, then cancelled: pass it on
                    self._release()
                elif slot in self._waiters:
                    self._waiters.remove(slot)
                raise
        try:
            yield
        finally:
            self.served += 1
            self._release()

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot goes to the oldest waiter directly; active stays the same
                return
        self.active -= 1

    def status(self) -> dict:
        return {"active": self.active, "waiting": self.waiting, "served": self.served, "refused": self.refused,
                "max_active": self.max_active, "max_waiting": self.max_waiting}


class RateLimiter:
    """At most ``per_minute`` requests a minute for each caller: a token bucket per key (or client
    address) refilled continuously, so a burst up to the limit passes and a flood waits. Callers
    are forgotten once their bucket is full again, so the table stays as small as the active set."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, caller: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        if self.capacity <= 0:
            return 0.0  # DIFFGRAPH_RATE_LIMIT=0: no limit
        now = time.monotonic()
        with self._lock:
            for stale in [c for c, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.capacity]:
                del self._buckets[stale]
            tokens, when = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.rate)
            if tokens < 1:
                self._buckets[caller] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[caller] = (tokens - 1, now)
            return 0.0

    def refusal(self, wait: float) -> str:
        """What a caller over the limit is told, in one line (the API's 429, the UI's chat)."""
        return f"too many requests: at most {self.per_minute} a minute; retry in {max(1, round(wait))} s"


async def _read_body(request: Request) -> bytes:
    """The request body, read only up to MAX_BODY bytes (413 beyond, whatever Content-Length says)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"the request body is {int(length):,} bytes; the maximum is {MAX_BODY:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY:,} bytes")
    return bytes(body)


def _parse_size(size) -> tuple[int, int] | None:
    if size in (None, "", "auto"):
        return None
    m = re.fullmatch(r"(\d{1,4})x(\d{1,4})", str(size).strip())
    if not m or not all(16 <= int(v) <= MAX_SIDE for v in m.groups()):
        raise APIError(400, f"size must be WIDTHxHEIGHT with sides from 16 to {MAX_SIDE} (e.g. 256x256), not {size!r}",
                       "size")
    return int(m.group(1)), int(m.group(2))


def _validate(body) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise APIError(400, "prompt is required: a non-empty string saying what the image should show", "prompt")
    if len(prompt) > MAX_API_PROMPT:
        raise APIError(400, f"prompt is {len(prompt):,} characters long; the maximum is {MAX_API_PROMPT:,}", "prompt")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be an integer from 1 to {MAX_N}", "n")
    fmt = body.get("response_format") or "url"
    if fmt not in ("url", "b64_json"):
        raise APIError(400, f"response_format must be 'url' or 'b64_json', not {fmt!r}", "response_format")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise APIError(400, "seed must be an integer from 0 to 2**32-1", "seed")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string: a base model /v1/models lists", "model")
    return {"prompt": prompt, "n": n, "response_format": fmt, "seed": seed, "size": _parse_size(body.get("size")),
            "model": None if model in OPENAI_IMAGE_MODELS else model}


def _png_bytes(path: Path, size: tuple[int, int] | None) -> bytes:
    """The PNG as stored, or upscaled (nearest neighbour) to ``size`` with its text chunks kept."""
    data = Path(path).read_bytes()
    if size is None:
        return data
    from PIL import Image, PngImagePlugin

    with Image.open(io.BytesIO(data)) as im:
        if im.size == size:
            return data
        info = PngImagePlugin.PngInfo()
        for key, value in im.info.items():
            if isinstance(value, str):
                info.add_text(key, value)
        out = io.BytesIO()
        im.convert("RGB").resize(size, Image.NEAREST).save(out, format="PNG", pnginfo=info)
        return out.getvalue()


def resize_in_place(path: Path, size: tuple[int, int]) -> Path:
    """Replace the PNG at ``path`` by its resized copy, atomically: a reader (``find``, a
    download in progress, the next process after a crash) sees the old PNG or the new one,
    never half of one."""
    return atomic_write_bytes(path, _png_bytes(path, size))


class ImageAPI:
    """What the HTTP API does: generate through the chat services, find images by id."""

    def __init__(self, services: ChatServices, index_size: int = INDEX_SIZE):
        self.services = services
        self.index_size = index_size
        self._index: OrderedDict[str, Path] = OrderedDict()  # recent ids only: a long-running server stays flat
        self._lock = threading.Lock()

    def _remember(self, image_id: str, path: Path) -> None:
        with self._lock:
            self._index[image_id] = path
            self._index.move_to_end(image_id)
            while len(self._index) > self.index_size:
                self._index.popitem(last=False)

    @property
    def root(self) -> Path:
        return self.services.settings.artifacts_dir

    def base_for(self, model: str | None) -> str:
        """The base a request renders with: its ``model`` when that names one, else the
        server's (``--base-model``, DIFFGRAPH_BASE, or the graph's only base); 400 otherwise."""
        try:
            return bases.choose_base(model or self.services.requested_base, self.services.store.catalog.base_models())
        except KeyError as exc:
            raise APIError(400, reason(exc), "model") from None

    def model_cards(self) -> list[dict]:
        """/v1/models' entries: each base's family name (what ``model`` takes), how people read
        it, and how many active experts the graph holds of it."""
        active = {}
        for base, _kind, status, n in self.services.store.catalog.expert_counts():
            if status == "active":
                active[base] = active.get(base, 0) + n
        return [{"id": name, "object": "model", "owned_by": "diffgraph",
                 "diffgraph": {"label": label(name), "active_experts": active.get(name, 0)}} for name in self.models()]

    def models(self) -> list[str]:
        """The bases the graph holds experts of (the one it would use when it holds none)."""
        held = self.services.store.catalog.base_models()
        if held:
            return held
        try:
            return [bases.choose_base(self.services.requested_base, [])]
        except KeyError:
            return []

    def generate(self, prompt: str, n: int, seed: int | None, size, base_model: str | None = None) -> list[dict]:
        base_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") % 1_000_000
        out = []
        for i in range(n):
            image = self.services.generate(prompt, seed=base_seed + i, folder="api", n="img", base_model=base_model,
                                           size=size)
            path = Path(image["path"])
            if size is not None:  # rendered as near the request as the base allows; the answer has the size asked for
                resize_in_place(path, size)
            self._remember(image["id"], path)
            out.append(image)
        return out

    def find(self, image_id: str) -> Path | None:
        image_id = image_id[:-4] if image_id.endswith(".png") else image_id
        if not _ID.match(image_id):
            return None
        with self._lock:
            if image_id in self._index and self._index[image_id].is_file():
                return self._index[image_id]
        for candidate in [self.root / "api" / f"{image_id}.png", *self.root.glob(f"chat/*/{image_id}.png")]:
            if candidate.is_file() and candidate.resolve().is_relative_to(self.root.resolve()):
                self._remember(image_id, candidate)
                return candidate
        return None


def create_app(settings: Settings | None = None, *, agent: ChatAgent | None = None, ui: bool = True,
               max_waiting: int = MAX_WAITING, max_active: int = 1, base_model: str | None = None,
               host: str = "127.0.0.1") -> FastAPI:
    """The server's ASGI app (API routes first, then the Gradio UI mounted at /). ``host``: the
    address it is bound to. On loopback without keys the UI's user is this machine's, with the
    admin role; beyond it, ``generate``. The Host headers it answers follow from it (HostCheck)."""
    settings = settings or get_settings()
    keys = ApiKeys.parse(settings.api_keys)
    hosts = HostCheck.for_server(host, settings.server_hosts, keys)
    limiter = RateLimiter(settings.rate_limit)
    agent = agent or ChatAgent(settings, base_model=base_model)
    api = ImageAPI(agent.services)
    queue = GenerationQueue(max_waiting, max_active)
    app = FastAPI(title="DiffGraph", version="1", docs_url="/v1/docs", openapi_url="/v1/openapi.json",
                  redoc_url=None)
    app.state.agent, app.state.api, app.state.queue = agent, api, queue

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Host and Origin for every request, the UI's included; then keys and rates for the API
        (its schema and /healthz stay open to any request naming this server)."""
        refused = hosts.refusal(request.headers.get("host"), request.headers.get("origin"))
        if refused:
            status, message = refused
            return APIError(status, message, code="invalid_host" if status == 400 else "cross_site_request").response()
        path = request.url.path
        if not path.startswith("/v1/") or path in ("/v1/openapi.json", "/v1/docs"):
            return await call_next(request)
        if keys:
            role = keys.bearer_role(request.headers.get("authorization"))
            if role is None:
                return APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY' "
                                "(DIFFGRAPH_API_KEYS on the server)", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"}).response()
            wait = limiter.take(request.headers["authorization"].partition(" ")[2].strip())  # per key
        else:
            wait = 0.0  # no keys: this machine's own use (or --insecure-no-auth), not rate-limited
        if wait:
            return APIError(429, limiter.refusal(wait), kind="rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(max(1, round(wait)))}).response()
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        if param == "image_id":  # a name no image can have: not here, as for any other unknown id
            return APIError(404, f"no image {first.get('input')!r} on this server", param, code="not_found").response()
        return APIError(400, f"invalid request: {first.get('msg', 'malformed')}", param).response()

    @app.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": IMAGE_REQUEST}}}})
    async def images_generations(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            body = json.loads(await _read_body(request) or b"null")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        req = _validate(body)
        base_model = api.base_for(req["model"])
        async with queue.turn():  # first come, first served; then the work runs in a worker thread
            try:
                images = await run_in_threadpool(api.generate, req["prompt"], req["n"], req["seed"], req["size"],
                                                 base_model)
            except ChatError as exc:
                raise APIError(400, str(exc), "prompt") from None
            except Exception as exc:  # a server fault, reported the way OpenAI reports them
                raise APIError(500, f"the image could not be made: {describe(exc)}",
                               kind="server_error") from None
        base = str(request.base_url).rstrip("/")
        data = []
        for image in images:
            item = {"revised_prompt": image["recipe"]["prompt"]}  # as rendered: with the LoRAs' trigger words
            if req["response_format"] == "b64_json":
                item["b64_json"] = base64.b64encode(Path(image["path"]).read_bytes()).decode()
            else:
                item["url"] = f"{base}/v1/images/{image['id']}.png"
            item["diffgraph"] = {"id": image["id"], "seed": image["seed"], "recipe_url": f"{base}/v1/images/{image['id']}/recipe",
                                 "experts": [{"id": e["id"], "name": e.get("name"), "kind": e["kind"],
                                              "coefficient": e["coefficient"], "weight": e["weight"]}
                                             for e in image["experts"]],
                                 "notes": image["notes"]}
            data.append(item)
        return {"created": int(time.time()), "data": data}

    @app.get("/v1/images/{image_id}/recipe")
    def image_recipe(request: Request, image_id: str = IMAGE_ID):
        path = api.find(image_id)
        if path is None:
            raise APIError(404, f"no image {image_id!r} on this server", "image_id", code="not_found")
        from PIL import Image

        with Image.open(path) as im:
            chunk, parameters = im.info.get(RECIPE_KEY), im.info.get("parameters")
        if chunk is None:
            raise APIError(404, f"image {image_id!r} carries no DiffGraph recipe", "image_id", code="not_found")
        data = json.loads(chunk)
        stem = path.stem
        return {"id": stem, "image_url": f"{str(request.base_url).rstrip('/')}/v1/images/{stem}.png",
                "recipe": data.get("recipe"), "explanation": data.get("explanation"), "parameters": parameters}

    @app.get("/v1/images/{image_id}")
    def image_file(image_id: str = IMAGE_ID):
        path = api.find(image_id)
        if path is None:
            raise APIError(404, f"no image {image_id!r} on this server", "image_id", code="not_found")
        return FileResponse(path, media_type="image/png", filename=path.name)

    @app.get("/v1/graph/status")
    def status():
        data = graph_status(agent.services.store)
        data["background_gca"] = agent.services.gca.status()
        return JSONResponse(json.loads(json.dumps(data, default=str)))

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": api.model_cards()}

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "brain": agent.brain, "queue": queue.status()}

    if ui:
        import gradio as gr

        blocks = build_ui(agent, keys, "admin" if is_loopback(host) else "generate", limiter)
        app = gr.mount_gradio_app(app, blocks, path="/", allowed_paths=[str(settings.artifacts_dir)], css=CSS,
                                  footer_links=[], ssr_mode=False, theme=_theme(), auth=keys.login if keys else None,
                                  auth_message="Log in as 'generate' or 'admin' with your DiffGraph API key as the password.")
    return app


def _theme():
    """Gradio's default look with system fonts only (nothing fetched from a font service)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


# ---------------------------------------------------------------------------- the web UI


def experts_markdown(image: dict | None) -> str:
    if not image:
        return "*No image yet.*"
    lines = [f"**Image {image['n']}** · seed {image['seed']} · `{Path(image['path']).name}`  ",
             f"prompt: *{image['prompt'][:200]}*"]
    if image.get("change"):
        lines.append(f"  \nchanged from image {image['parent']}: **{image['change']}**")
    if not image["experts"]:
        lines.append("\n\nNo experts: the base model alone.")
    else:
        lines += ["", "| " + " | ".join(ROW_HEADERS) + " |", "|---|---|---|---|---|"]
        for row in expert_rows(image["experts"], digits=2):
            lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)


def build_ui(agent: ChatAgent, keys: ApiKeys, role_without_keys: str, limiter: RateLimiter):
    """The chat UI. A session's role is its login's (agents/auth.py), else ``role_without_keys``;
    only an admin session is offered the tools that change the graph. With keys, each login and
    client address may take as many chat turns a minute as an API key may make requests (the
    API's limiter): a turn over it is not sent to the agent, and the chat says when to retry."""
    import gradio as gr

    def role_of(request: gr.Request | None) -> str:
        return (getattr(request, "username", None) or "generate") if keys else role_without_keys

    def over_limit(request: gr.Request) -> str | None:
        """The refusal when this session is over the limit; never without keys (as for the API)."""
        if not keys:
            return None
        wait = limiter.take(f"ui:{role_of(request)}@{request.client.host if request.client else ''}")
        return limiter.refusal(wait) if wait else None

    def respond(message, history, thread, images, request: gr.Request):
        thread = thread or f"web-{uuid.uuid4().hex[:10]}"
        history = list(history or [])
        images = list(images or [])
        refused = over_limit(request)
        if refused:  # the message stays in the box for when the wait is over; the rest as it was
            return (message, history + [{"role": "assistant", "content": refused}], thread, images,
                    *[gr.skip()] * 5)
        reply = agent.send(message or "", thread, role=role_of(request))
        history.append({"role": "user", "content": message or ""})
        history.append({"role": "assistant", "content": reply.text})
        for image in reply.images:
            history.append({"role": "assistant", "content": {"path": image["path"], "alt_text": f"image {image['n']}"}})
        images.extend(reply.images)
        last = images[-1] if images else None
        return ("", history, thread, images, last["path"] if last else None, experts_markdown(last),
                last["path"] if last else None, last["recipe"] if last else None,
                [(im["path"], f"{im['n']}: {im['prompt'][:40]}") for im in images])

    def pick_base(choice, history, thread, request: gr.Request):
        """The base picker: "/base CHOICE" for this conversation, answered in it."""
        thread = thread or f"web-{uuid.uuid4().hex[:10]}"
        answer = None
        if choice:
            answer = over_limit(request) or agent.send(f"/base {choice}", thread, role=role_of(request)).text
        history = list(history or []) + ([{"role": "assistant", "content": answer}] if answer else [])
        return history, thread

    for handler in (respond, pick_base):  # the annotation as a class, not this module's postponed string, so
        handler.__annotations__["request"] = gr.Request  # Gradio sees it and passes the session's request in
    held = agent.services.store.catalog.base_models()
    brain = ("an LLM at " + str(agent.settings.llm_base_url)) if agent.brain == "llm" else \
        "the offline brain (no LLM configured)"
    with gr.Blocks(title="DiffGraph") as blocks:
        thread = gr.State(None)
        images = gr.State([])
        gr.Markdown(f"### DiffGraph\nDescribe an image; then refine it (*warmer*, *less of Pink Pop*, *use only two "
                    f"experts*, *a square instead of a circle*) or ask *explain*. Answering: {brain}.")
        with gr.Row():
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chat")
                with gr.Row():
                    box = gr.Textbox(placeholder="a pink circle on a striped white background, warm light",
                                     show_label=False, scale=5, elem_id="prompt", lines=1, max_lines=4)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Column(scale=4):
                last_image = gr.Image(label="Last image", type="filepath", elem_id="last-image", height=256,
                                      interactive=False)
                base = gr.Dropdown(choices=held, value=held[0] if len(held) == 1 else None,
                                   label="Base model (of the experts the graph holds)",
                                   elem_id="base", interactive=len(held) > 1, allow_custom_value=False)
                experts = gr.Markdown("*No image yet.*", elem_id="experts")
                download = gr.File(label="PNG with its recipe", elem_id="download", interactive=False)
                with gr.Accordion("Recipe", open=False):
                    recipe = gr.JSON(elem_id="recipe")
        gallery = gr.Gallery(label="This session's images", columns=10, height=170, object_fit="contain",
                             elem_id="gallery", interactive=False)
        outputs = [box, chatbot, thread, images, last_image, experts, download, recipe, gallery]
        inputs = [box, chatbot, thread, images]
        base.change(pick_base, [base, chatbot, thread], [chatbot, thread])
        send.click(respond, inputs, outputs, concurrency_limit=4)
        box.submit(respond, inputs, outputs, concurrency_limit=4)
    return blocks


class ServeRefused(DiffGraphError):
    """A bind the server will not make as configured (one line saying what to do)."""


def check_bind(host: str, keys: ApiKeys, insecure_no_auth: bool) -> None:
    """Anything but loopback needs API keys, or the user's explicit ``--insecure-no-auth``."""
    if not is_loopback(host) and not keys and not insecure_no_auth:
        raise ServeRefused(f"refusing to serve on {host} without API keys: anyone who reaches the port could use it; "
                           "set DIFFGRAPH_API_KEYS (KEY, KEY:admin), or pass --insecure-no-auth")


def serve(host: str = "127.0.0.1", port: int = 7860, settings: Settings | None = None, console=None,
          max_active: int = 1, base_model: str | None = None, insecure_no_auth: bool = False) -> None:
    import uvicorn

    from diffgraph.malloc import limit_arenas

    settings = settings or get_settings()
    check_bind(host, ApiKeys.parse(settings.api_keys), insecure_no_auth)
    limit_arenas()  # before any worker thread: a long-running server's RSS stays flat (diffgraph/malloc.py)
    app = create_app(settings, max_active=max_active, base_model=base_model, host=host)
    if console is not None:
        agent = app.state.agent if hasattr(app, "state") and hasattr(app.state, "agent") else None
        console.print(f"DiffGraph on http://{host}:{port}/  (web UI)  ·  API: POST http://{host}:{port}/v1/images/generations"
                      + (f"  ·  brain: {agent.brain}" if agent else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")
