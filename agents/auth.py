"""Who may do what on a served DiffGraph: API keys with two roles.

DIFFGRAPH_API_KEYS is a comma-separated list of ``KEY`` (role ``generate``: render images, read
recipes, models and status) and ``KEY:admin`` (also add experts, start or stop graph updates and
name paths on the server's disk). The HTTP API takes a key as OpenAI clients send it,
``Authorization: Bearer KEY``; the web UI's login takes the role as user name and the key as
password. Keys are compared in constant time, and never printed or logged.

Without keys a server is for its own machine: ``diffgraph serve`` refuses to bind anything but
loopback unless told ``--insecure-no-auth``, and then every visitor has the ``generate`` role
only. On loopback without keys the UI is the local user's own, with the admin role, like the CLI.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

ROLES = ("generate", "admin")
MIN_KEY_CHARS = 16  # a shorter key is guessable over a network in a day of tries


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
