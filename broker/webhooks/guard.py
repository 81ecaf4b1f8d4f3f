"""The address guard: a webhook may not reach the machine it runs on or its network.

A URL's host is resolved and every address it resolves to must be public (global)
unless the config allows the host name or a range it falls in
(``webhooks.allow_hosts``): loopback, private (10/8, 172.16/12, 192.168/16,
fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10),
shared (100.64/10), multicast and reserved addresses are refused. Redirects are
never followed (``delivery``), so a public URL cannot bounce a request inside.
The address is checked before each attempt; a DNS answer that changes between the
check and the connection (rebinding) is not caught.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = ["AddressRefused", "check_url", "ip_allowed"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(Exception):
    """The webhook URL is not one Laneway may call."""


def _allowed_networks(allow: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in allow:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name: matched by name
    return nets


def ip_allowed(ip: IpAddress, allow: Sequence[str] = ()) -> bool:
    """Whether ``ip`` may be called: public, or inside an allowed range."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in _allowed_networks(allow) if net.version == ip.version):
        return True
    return ip.is_global and not ip.is_multicast


async def check_url(url: str, allow: Sequence[str] = ()) -> None:
    """Raise AddressRefused unless ``url`` is http(s) and its host may be called."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise AddressRefused(f"not a valid URL: {url[:64]!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise AddressRefused("only http:// and https:// URLs with a host are allowed")
    if host.lower() in {a.lower() for a in allow}:
        return
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise AddressRefused(f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        if not ip_allowed(address, allow):
            raise AddressRefused(
                f"{host} resolves to {address}, a loopback, private, link-local or reserved address "
                "(allow it in webhooks.allow_hosts if it is meant)"
            )
