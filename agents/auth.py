"""Who may do what on a served DiffGraph: API keys with two roles.

DIFFGRAPH_API_KEYS is a comma-separated list of ``KEY`` (role ``generate``: render images, read
recipes, models and status) and ``KEY:admin`` (also add experts, start or stop graph updates and
name paths on the server's disk). The HTTP API takes a key as OpenAI clients send it,
``Authorization: Bearer KEY``; the web UI's login takes the role as user name and the key as
password. Keys are compared in constant time, and never printed or logged.

Without keys a server is for its own machine: ``diffgraph serve`` refuses to bind anything but
loopback unless told ``--insecure-no-auth``, and then every visitor has the ``generate`` role
only. On loopback without keys the UI is the local user's own, with the admin role, like the CLI;
HostCheck keeps the web pages that user visits from driving it.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

ROLES = ("generate", "admin")
MIN_KEY_CHARS = 16  # a shorter key is guessable over a network in a day of tries
_HOST = re.compile(r"\[(?P<v6>[0-9a-f:.]+)\](?::\d{1,5})?|(?P<name>[a-z0-9._-]+)(?::\d{1,5})?")


class AuthConfigError(ValueError):
    """DIFFGRAPH_API_KEYS is malformed (the message says where, never the key)."""


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys and their roles; empty when none are configured."""

    roles: tuple[tuple[str, str], ...] = ()  # (key, role)

    @classmethod
    def parse(cls, text: str | None) -> "ApiKeys":
        entries = []
        for n, item in enumerate((text or "").split(","), start=1):
            item = item.strip()
            if not item:
                continue
            key, _, role = item.rpartition(":") if item.endswith(":admin") else (item, "", "generate")
            if len(key) < MIN_KEY_CHARS or any(c.isspace() or c == ":" for c in key):
                raise AuthConfigError(f"DIFFGRAPH_API_KEYS entry {n}: a key needs at least {MIN_KEY_CHARS} characters, "
                                      "no spaces or ':' (KEY for generate, KEY:admin for admin)")
            entries.append((key, role))
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.roles)

    def role(self, key: str | None) -> str | None:
        """The role of ``key``, or None. Every configured key is compared, in constant time."""
        found = None
        for known, role in self.roles:
            if hmac.compare_digest((key or "").encode(), known.encode()) and found != "admin":
                found = role
        return found

    def bearer_role(self, authorization: str | None) -> str | None:
        """The role of an ``Authorization: Bearer KEY`` header's key, or None."""
        scheme, _, key = (authorization or "").partition(" ")
        return self.role(key.strip()) if scheme.lower() == "bearer" else None

    def login(self, username: str, password: str) -> bool:
        """The web UI's login: user name ``admin`` or ``generate``, the key as password; an admin
        key may log in as either."""
        role = self.role(password)
        return username in ROLES and role is not None and (role == "admin" or username == "generate")


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """The host a Host header or an Origin's authority names (``name``, ``name:port``, ``[v6]``,
    ``[v6]:port``, or a bare address as a settings list writes it): lower-case, an address in its
    canonical form. None for anything else (user info, a path, a space): no allowed name is that."""
    value = value.strip().lower()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    m = _HOST.fullmatch(value)
    if m is None:
        return None
    try:
        return str(ipaddress.ip_address(m["v6"] or m["name"]))
    except ValueError:
        return None if m["v6"] else m["name"]


@dataclass(frozen=True)
class HostCheck:
    """Which requests a served DiffGraph answers, by their Host and Origin headers: the defence
    against DNS rebinding and cross-site requests. On loopback without keys the UI's user is an
    admin, so no web page that user visits may drive the server, neither by pointing its own name
    at 127.0.0.1 (the browser then sends ``Host: evil.example``) nor by posting to
    http://127.0.0.1:7860/ from its own site (``Origin: https://evil.example``).

    - Host must name this server: loopback (localhost, 127.0.0.0/8, [::1]) at any port, the bind
      address, or a name DIFFGRAPH_SERVER_HOSTS lists; else 400. Bound to every interface (0.0.0.0,
      ::) with keys and no such list, any Host passes: the keys are the gate there, and users reach
      a GPU box by whatever name or address they have for it. Without keys the check always applies.
    - Origin, which browsers send with every POST and every script's cross-site request, must be
      the request's own Host or one of those names, whatever the first rule let through; else 403.
      Requests without one (curl, OpenAI SDKs) are no page's, and pass; so does a cross-site GET a
      link or an image tag sends without one, which changes nothing here and whose answer the
      page cannot read.

    (Starlette's TrustedHostMiddleware would match names and ``*.suffix`` only: not 127.0.0.0/8 nor
    bracketed IPv6, not Origin, and its refusal is plain text rather than the API's error.)"""

    names: frozenset[str] = frozenset()  # besides loopback: host_name() of the bind address and each listed name
    any_host: bool = False

    @classmethod
    def for_server(cls, bind: str, server_hosts: Iterable[str], keys: ApiKeys) -> "HostCheck":
        server_hosts = tuple(server_hosts)
        names = frozenset(name for name in map(host_name, (bind, *server_hosts)) if name)
        return cls(names, any_host=bool(keys) and not server_hosts and host_name(bind) in ("0.0.0.0", "::"))

    def names_this_server(self, host: str) -> bool:
        name = host_name(host)
        return name is not None and (name in self.names or is_loopback(name))

    def refusal(self, host: str | None, origin: str | None) -> tuple[int, str] | None:
        """None when a request with these headers may go on, else its status and one-line reason
        (the header's value last, so a long one is what gets cut)."""
        host = host or ""
        if not self.any_host and not self.names_this_server(host):
            return 400, ("the Host header must name this server (loopback, its bind address or a name "
                         f"DIFFGRAPH_SERVER_HOSTS lists: a defence against DNS rebinding), not {host!r}")
        if origin is not None:
            scheme, sep, authority = origin.partition("://")
            if not (sep and scheme.lower() in ("http", "https")
                    and ((host and authority.lower() == host.lower()) or self.names_this_server(authority))):
                return 403, ("cross-site request refused: the Origin must be this server (loopback, its bind "
                             f"address or a name DIFFGRAPH_SERVER_HOSTS lists), not {origin!r}")
        return None
