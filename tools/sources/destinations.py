"""Where the source clients' requests may go: nowhere inside the network unless the user says so.

An API answer chooses URLs (download links, ``nextPage``, redirects), and a chat user types
them, so every request a source client sends, redirects included, is checked here first: a host
that is or resolves to an address that is not globally routable (loopback, private, link-local,
carrier-grade NAT, reserved, unspecified), a multicast one or a cloud metadata endpoint
(169.254.169.254 and its kin) is refused unless the user
listed it: the host of a source they configured themselves (``civitai:http://127.0.0.1:8765``
names its host) or one in DIFFGRAPH_ALLOWED_HOSTS. Hosts are compared without the port: a
listed machine is trusted as a whole.

A name that does not resolve is let through (the connection fails anyway). The check resolves
the name itself, so a DNS server answering differently a moment later (rebinding) is not
covered; a deployment that needs that runs the GCA behind an egress proxy.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import httpx

from .errors import UnsafeFileError

# cloud metadata services that are not in a private range (169.254.169.254 is link-local anyway)
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")}


class ForbiddenDestination(UnsafeFileError):
    """A request would go to an address inside the network that nobody listed."""


def host_of(url: str | httpx.URL) -> str:
    return (httpx.URL(url).host or "").lower().strip("[]")


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    # not is_global: private, loopback, link-local, shared (100.64/10), reserved, unspecified, documentation
    return address in METADATA or not address.is_global or address.is_multicast


def _addresses(host: str) -> list:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []  # unresolvable: nothing to connect to
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def check_destination(url: str | httpx.URL, allowed: Iterable[str] = ()) -> None:
    """Raise ForbiddenDestination (one line) when ``url``'s host is inside the network and not in
    ``allowed`` (host names or addresses, lower-case)."""
    host = host_of(url)
    if not host or host in {h.lower().strip("[]") for h in allowed}:
        return
    if any(_internal(a) for a in _addresses(host)):
        raise ForbiddenDestination(f"refusing to fetch {str(url)[:120]}: {host} is not a public address (loopback, "
                                   "private, link-local, multicast or metadata); list it in DIFFGRAPH_ALLOWED_HOSTS to allow it")


def guarded_client_hooks(allowed: Iterable[str]) -> dict:
    """httpx event hooks that check every request a client sends, redirects included."""
    allowed = frozenset(h.lower().strip("[]") for h in allowed)

    def check(request: httpx.Request) -> None:
        check_destination(request.url, allowed)

    return {"request": [check]}
