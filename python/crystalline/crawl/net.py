"""The crawler's connections: only to public addresses unless allowed.

A page, a redirect or a robots.txt redirect may point at a host that
resolves to this machine or its private network (the router's admin page,
a cloud metadata service). Every new connection therefore resolves its host
itself, drops the addresses that are not public (`forbidden`), and connects
to one of the addresses it checked, never to a second lookup's answer: a
DNS server that answers a public address to the check and a private one to
the connect (DNS rebinding) gains nothing. Redirects are followed by the
crawler one request at a time, so every hop goes through this check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpcore
import httpx


class PrivateAddress(httpcore.ConnectError):
    """A host whose addresses are all refused; httpx raises it as the cause
    of an httpx.ConnectError."""


def forbidden(address: str) -> bool:
    """Whether the crawler refuses `address`: loopback, private, link-local,
    multicast, unspecified, reserved and every other range that is not
    globally reachable unicast (IANA's special-purpose registries)."""
    ip = ipaddress.ip_address(address)
    return ip.is_multicast or not ip.is_global


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connections are opened by `_GuardedBackend`."""

    def __init__(self, allow_private: bool, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        # httpx has no public way to give its connection pool a network
        # backend; the pool reads this attribute for each new connection.
        if not hasattr(self._pool, "_network_backend"):
            raise RuntimeError("this httpcore has no pool._network_backend; crawl cannot check addresses")
        self._pool._network_backend = _GuardedBackend(allow_private)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:  # socket.gaierror: the cause tells a DNS failure
            raise httpcore.ConnectError(f"cannot resolve {host}: {err}") from err
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        allowed = [a for a in addresses if self.allow_private or not forbidden(a)]
        if not allowed:
            raise PrivateAddress(f"{host} resolves to {', '.join(addresses)}, not a public address")
        for address in allowed[:-1]:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return await self.inner.connect_tcp(allowed[-1], port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
