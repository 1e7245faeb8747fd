"""SSRF guard: refuses URLs whose host is, or resolves to, a private, loopback or otherwise internal address."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import weakref
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from engine.errors import VsearchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_HINT = (
    "Use a public https URL; to fetch from a trusted private host add it to the allowed hosts "
    "(and allow http if it has no https)."
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GUARDED: weakref.WeakSet[aiohttp.BaseConnector] = weakref.WeakSet()


class FetchRefused(VsearchError):
    """A URL the guard will not fetch; `reason` says why in a sentence."""

    def __init__(self, reason: str, hint: str = ALLOW_HINT) -> None:
        super().__init__(reason, hint)
        self.reason = reason


def normalize_allow_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """Lower-case host names, strip IPv6 brackets and trailing dots; entries may be names, IPs or CIDRs."""
    out = set()
    for host in hosts:
        host = host.strip().lower().rstrip(".")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        with contextlib.suppress(ValueError):
            host = str(ipaddress.ip_address(host))  # one spelling per address, e.g. "0::1" -> "::1"
        if host:
            out.add(host)
    return frozenset(out)


def address_problem(ip: IPAddress) -> str | None:
    """What makes `ip` internal ("loopback", "private", ...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return f"{problem} (it embeds {embedded})"
    for test, kind in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not public"),
    ):
        if test:
            return kind
    return None


def check_url(url: str, *, allow_http: bool = False, allow_hosts: frozenset[str] = frozenset()) -> None:
    """Refuse a URL without any network access: scheme, host presence, IP-literal hosts, `localhost`.

    Host names are resolved and checked by `resolve_and_check` and by `GuardedResolver` at connect time.
    `allow_hosts` holds trusted host names, IP addresses or CIDR networks (e.g. "127.0.0.1" in tests).
    """
    host = _host_of(url, allow_http)
    allowed = normalize_allow_hosts(allow_hosts)
    if _host_allowed(host, allowed):
        return
    ip = _ip_literal(host)
    if ip is not None:
        problem = address_problem(ip)
        if problem:
            raise FetchRefused(f"refusing {_short(url)}: the address {ip} is {problem}")
    elif host == "localhost" or host.endswith(".localhost"):
        raise FetchRefused(f"refusing {_short(url)}: {host} is this machine")


async def resolve_and_check(
    url: str, *, allow_http: bool = False, allow_hosts: frozenset[str] = frozenset()
) -> list[IPAddress]:
    """`check_url`, then resolve the host and refuse if any of its addresses is internal.

    Returns the addresses. Prefer a session with `guarded_connector`, which checks the address that is
    actually connected to; this function alone leaves a gap between the check and the connection.
    """
    check_url(url, allow_http=allow_http, allow_hosts=allow_hosts)
    host = _host_of(url, allow_http)
    ip = _ip_literal(host)
    if ip is not None:
        return [ip]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchRefused(f"cannot resolve the host {host}: {exc.strerror}", "Check the URL.") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    _check_addresses(host, addresses, normalize_allow_hosts(allow_hosts))
    return addresses


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses host names resolving to internal addresses.

    aiohttp does not call the resolver for IP-literal hosts, so `check_url` must still be applied to every
    URL (and every redirect hop); together they cover names and literals.
    """

    def __init__(self, allow_hosts: Iterable[str] = frozenset()) -> None:
        self._allowed = normalize_allow_hosts(allow_hosts)
        self._inner: ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        name = host.lower().rstrip(".")
        if not _host_allowed(name, self._allowed):
            addresses = [ipaddress.ip_address(r["host"].split("%", 1)[0]) for r in results]
            _check_addresses(name, addresses, self._allowed)
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def guarded_connector(allow_hosts: Iterable[str] = frozenset(), **kwargs: Any) -> aiohttp.TCPConnector:
    """A TCPConnector whose DNS answers pass through `GuardedResolver`; kwargs go to TCPConnector."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_hosts), **kwargs)
    _GUARDED.add(connector)
    return connector


def is_guarded(connector: aiohttp.BaseConnector | None) -> bool:
    """Whether `connector` was made by `guarded_connector` (its DNS answers are checked)."""
    return connector is not None and connector in _GUARDED


def _host_of(url: str, allow_http: bool) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise FetchRefused(f"refusing {_short(url)}: not a valid URL", "Check the URL.") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and not allow_http:
        raise FetchRefused(f"refusing {_short(url)}: only https URLs are fetched", ALLOW_HINT)
    if scheme not in ("http", "https"):
        raise FetchRefused(f"refusing {_short(url)}: only http(s) URLs are fetched", "Use an https URL.")
    if not host:
        raise FetchRefused(f"refusing {_short(url)}: it has no host name", "Check the URL.")
    return host.rstrip(".")


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    # Legacy IPv4 forms such as 2130706433, 0x7f.1 or 127.1 that the C resolver would accept.
    if host and all(c in "0123456789abcdefx." for c in host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    if not allowed:
        return False
    if host in allowed:
        return True
    ip = _ip_literal(host)
    return ip is not None and _ip_allowed(ip, allowed)


def _ip_allowed(ip: IPAddress, allowed: frozenset[str]) -> bool:
    if str(ip) in allowed:
        return True
    for entry in allowed:
        if "/" in entry:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _check_addresses(host: str, addresses: list[IPAddress], allowed: frozenset[str]) -> None:
    if not addresses:
        raise FetchRefused(f"the host {host} has no addresses", "Check the URL.")
    for ip in addresses:
        if _ip_allowed(ip, allowed):
            continue
        problem = address_problem(ip)
        if problem:
            raise FetchRefused(f"refusing the host {host}: it resolves to {ip}, which is {problem}")


def _short(url: str, limit: int = 100) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
