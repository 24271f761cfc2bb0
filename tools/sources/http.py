"""HTTP for the source clients: one httpx client per source, bounded retries with backoff.

Civitai and the Hub both rate-limit (429, often with Retry-After) and have transient 5xx and
dropped connections, so every API call and every download attempt runs under the same
:class:`RetryPolicy`; anything that is not transient fails at once. Errors leave here as
one-line :class:`~.errors.ApiError` messages naming the source, the request and the reason.

API answers are read only from the API's own origin (a redirect elsewhere is refused) and only
up to MAX_JSON_BYTES. Downloads may be redirected to another host (Civitai hands files out from
a CDN): the published sha256 decides what is kept, and the token is never sent there.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import urljoin

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from diffgraph.graph_store.records import ExpertRecord, UsePolicy
from diffgraph.settings import get_settings

from .destinations import guarded_client_hooks, host_of
from .errors import ApiError

T = TypeVar("T")
USER_AGENT = "diffgraph/0.1 (+https://github.com/diffgraph)"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
MAX_JSON_BYTES = 64 << 20  # an API page is kilobytes; anything near this is hostile or broken
MAX_API_REDIRECTS = 5


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, waiting a random time up to an exponentially
    growing bound (``initial_wait`` doubling, at most ``max_wait`` seconds) between them.
    A Retry-After is obeyed instead; one longer than ``max_wait`` is not waited out: the
    call fails, saying how long the server asked for."""

    attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 60.0


class TransientStatus(Exception):
    """An HTTP answer worth retrying (429 or 5xx); carries what the error message needs."""

    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        self.retry_after = _retry_after(response.headers.get("Retry-After"))
        super().__init__(describe_status(response))


def describe_status(response: httpx.Response) -> str:
    """``HTTP 404 Not Found: <the server's own error message, if any>``."""
    text = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    detail = response.headers.get("X-Error-Message") or _json_error(response)
    return f"{text}: {detail[:200]}" if detail and detail != response.reason_phrase else text


def _json_error(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except (ValueError, httpx.ResponseNotRead):
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def is_transient(exc: BaseException, policy: RetryPolicy) -> bool:
    if isinstance(exc, TransientStatus):
        return exc.retry_after is None or exc.retry_after <= policy.max_wait
    # a URL we cannot fetch (file://, ftp:// ...) stays unfetchable: not worth a retry
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol)


def check_status(response: httpx.Response) -> None:
    """Raise TransientStatus for 429/5xx so the retry loop sees them; leave others to the caller."""
    if response.status_code == 429 or response.status_code >= 500:
        raise TransientStatus(response)


def retry_call(fn: Callable[[], T], policy: RetryPolicy) -> T:
    """Run ``fn`` until it returns or fails with something not transient, at most
    ``policy.attempts`` times. The last exception is re-raised unchanged."""
    backoff = wait_random_exponential(multiplier=policy.initial_wait, max=policy.max_wait)  # "full jitter"

    def wait(state) -> float:
        after = getattr(state.outcome.exception(), "retry_after", None)
        return after if after is not None else backoff(state)

    return Retrying(stop=stop_after_attempt(policy.attempts), wait=wait, reraise=True,
                    retry=retry_if_exception(lambda e: is_transient(e, policy)))(fn)


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    url = httpx.URL(url)
    return url.scheme, url.host, url.port  # httpx drops default ports, so :443 == no port


class _BearerForOrigin(httpx.Auth):
    """Send the token only to the API's own origin: not to a CDN a download redirects to,
    nor to any other host an API response points at."""

    def __init__(self, token: str, origin: tuple[str, str, int | None]):
        self.token, self.origin = token, origin

    def auth_flow(self, request: httpx.Request):
        if _origin(request.url) == self.origin:
            request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class Api:
    """One source's HTTP session: its base URL, optional token and retry policy. Every request
    it sends, redirects and downloads included, goes only where destinations.py allows: its own
    host (the user configured it) and DIFFGRAPH_ALLOWED_HOSTS may be inside the network, nothing
    else may."""

    def __init__(self, name: str, base_url: str, *, token: str | None = None,
                 retry: RetryPolicy | None = None, allowed_hosts: Iterable[str] | None = None):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        auth = _BearerForOrigin(token, _origin(self.base_url)) if token else None
        listed = get_settings().allowed_hosts if allowed_hosts is None else allowed_hosts
        allowed = {host_of(self.base_url), *listed}
        self.client = httpx.Client(auth=auth, timeout=TIMEOUT, follow_redirects=True,
                                   headers={"User-Agent": USER_AGENT}, event_hooks=guarded_client_hooks(allowed))

    def url(self, path_or_url: str) -> str:
        return urljoin(self.base_url + "/", path_or_url.lstrip("/")) if "://" not in path_or_url else path_or_url

    def same_origin(self, url: str) -> bool:
        return _origin(url) == _origin(self.base_url)

    def get_json(self, path_or_url: str, params: dict | list | None = None) -> tuple[object, httpx.Response]:
        """GET and decode JSON, retrying transient failures; any failure is an ApiError."""
        url = self.url(path_or_url)

        def attempt() -> httpx.Response:
            response = self._get_same_origin(url, params)
            check_status(response)
            return response

        where = f"{self.name}: GET {url}"
        try:
            response = retry_call(attempt, self.retry)
        except TransientStatus as exc:
            if not is_transient(exc, self.retry):
                raise ApiError(f"{where} refused: {exc} (server asks to wait {exc.retry_after:.0f} s, "
                               f"more than the {self.retry.max_wait:.0f} s allowed)") from exc
            raise ApiError(f"{where} failed after {self.retry.attempts} attempts: {exc}") from exc
        except httpx.TransportError as exc:
            raise ApiError(f"{where} failed after {self.retry.attempts} attempts: "
                           f"{type(exc).__name__}: {exc}") from exc
        if response.is_error:
            raise ApiError(f"{where} failed: {describe_status(response)}")
        try:
            return json.loads(response.content), response
        except ValueError as exc:
            raise ApiError(f"{where} answered invalid JSON: {exc}") from exc

    def _get_same_origin(self, url: str, params) -> httpx.Response:
        """GET an API answer: redirects are followed only within the API's own origin (an open
        redirect must not make us read a listing from another host), and the body is read up to
        MAX_JSON_BYTES (an endless answer is cut off, not buffered)."""
        for _ in range(MAX_API_REDIRECTS + 1):
            request = self.client.build_request("GET", url, params=params)
            response = self.client.send(request, stream=True, follow_redirects=False)
            try:
                if response.is_redirect:
                    target = str(response.next_request.url) if response.next_request is not None else ""
                    if not self.same_origin(target):
                        raise ApiError(f"{self.name}: GET {url} redirected to another host "
                                       f"({httpx.URL(target).host or target[:80]}); API answers are read from "
                                       f"{_origin(self.base_url)[1]} only")
                    url, params = target, None
                    continue
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BYTES:
                        raise ApiError(f"{self.name}: GET {url} answered more than {MAX_JSON_BYTES:,} bytes; "
                                       "refusing an oversized API answer")
                headers = [(k, v) for k, v in response.headers.multi_items()  # the body is decoded already
                           if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
                return httpx.Response(response.status_code, headers=headers, content=bytes(body),
                                      request=response.request)
            finally:
                response.close()
        raise ApiError(f"{self.name}: GET {url} redirected more than {MAX_API_REDIRECTS} times")

    def close(self) -> None:
        self.client.close()


class HubSource:
    """What the Civitai and Hugging Face clients share: one ``Api`` at ``base_url`` (the
    public site by default) and a token, ``token`` or the ``token_env`` variable when None
    ("" sends none), sent as a Bearer header to that host only."""

    name = ""
    default_url = ""
    token_env = ""

    def __init__(self, base_url: str | None = None, *, token: str | None = None,
                 retry: RetryPolicy | None = None, scope: Mapping[str, str] | None = None,
                 allowed_hosts: Iterable[str] | None = None):
        token = os.environ.get(self.token_env) if token is None else token
        self.api = Api(self.name, base_url or self.default_url, token=token, retry=retry, allowed_hosts=allowed_hosts)
        self.scope = dict(scope or {})  # what to list, in the site's own query words (see spec.SCOPES)
        self._notes: list[str] = []
        self.refused: Counter[str] = Counter()  # experts the scope's use policy left out, by reason

    PUBLIC_LIMIT = 100  # experts a listing of the public site yields unless the scope says otherwise

    def listing_limit(self, limit: int | None) -> int | None:
        """``limit``, or on the public site (100,000+ models) PUBLIC_LIMIT with a note saying so:
        nothing downloads the whole of Civitai or the Hub by accident."""
        if limit is None and self.base_url.rstrip("/") == self.default_url.rstrip("/"):
            self._notes.append(f"{self.name}: listing at most {self.PUBLIC_LIMIT} experts of the public site "
                              "(set ?limit= in the source or --limit; --dry-run shows what a pass would fetch)")
            return self.PUBLIC_LIMIT
        return limit

    def policy(self) -> UsePolicy:
        """The scope's ``licence`` and ``nsfw`` words as a UsePolicy (SFW only by default)."""
        return UsePolicy.parse(self.scope.get("licence"), self.scope.get("nsfw"))

    def admitted(self, record: ExpertRecord, policy: UsePolicy) -> bool:
        """Whether ``policy`` admits a listed record; the ones it does not are counted by reason."""
        why = policy.refuses(record.nsfw_level, record.license)
        if why is not None:
            self.refused[why] += 1
        return why is None

    @property
    def notes(self) -> list[str]:
        """What the agent should tell the user about this listing, one line each."""
        return [*self._notes, *(f"{self.name}: {n} listed experts left out: {why}" for why, n in sorted(self.refused.items()))]

    @property
    def base_url(self) -> str:
        return self.api.base_url
