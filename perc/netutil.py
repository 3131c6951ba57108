"""
Endpoint plumbing shared by the two daemons: parsing Twisted endpoint
descriptions into one-line errors, wrapping them in TLS, and a factory that
refuses connections until the service behind it is ready.
"""

from __future__ import annotations

import socket

from twisted.internet import endpoints, protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from perc.errors import ConfigError

__all__ = ["server_endpoint", "tls_client_endpoint", "tls_server_factory", "GatedFactory",
           "endpoint_host", "set_receive_buffer"]


def server_endpoint(reactor, description: str, option: str):
    """``serverFromString`` with a one-line ConfigError naming the option."""
    try:
        return endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError("{} {!r}: not a usable server endpoint description ({})".format(
            option, description, error))


def set_receive_buffer(sock, size: int) -> int:
    """
    Ask for a ``size``-octet receive buffer on ``sock`` and return what the
    kernel granted.  SO_RCVBUF is capped by net.core.rmem_max; a process
    allowed to (CAP_NET_ADMIN) gets past the cap with SO_RCVBUFFORCE.
    Linux reports twice the size asked for (its bookkeeping share), so the
    figure returned is halved to compare with ``size``.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if granted < size and force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            pass  # not allowed: keep the capped size
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    return granted


def endpoint_host(description: str) -> str | None:
    """The host of a ``tcp:HOST:PORT`` / ``tcp:host=HOST:port=PORT`` description."""
    parts = description.split(":")
    if len(parts) < 2 or parts[0] not in ("tcp", "tcp6"):
        return None
    for part in parts[1:]:
        if part.startswith("host="):
            return part[len("host="):]
    return parts[1] if "=" not in parts[1] else None


def tls_client_endpoint(reactor, description: str, credentials, option: str,
                        expected_name: str | None = None):
    """
    A client endpoint that opens mutually authenticated TLS, verifying the
    server against ``expected_name`` (default: the description's host).
    """
    try:
        plain = endpoints.clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError("{} {!r}: not a usable client endpoint description ({})".format(
            option, description, error))
    name = expected_name or endpoint_host(description)
    if not name:
        raise ConfigError("{} {!r}: cannot tell which identity to verify; give the "
                          "peer's certificate name explicitly".format(option, description))
    return endpoints.wrapClientTLS(credentials.client_options(name), plain)


def tls_server_factory(credentials, factory):
    """Wrap ``factory`` in server-side TLS that requires a client certificate."""
    return TLSMemoryBIOFactory(credentials.server_options(), False, factory)


class GatedFactory(protocol.Factory):
    """
    Refuses every connection (buildProtocol returns None) until ``open`` is
    given the real factory, so ports can be bound before the reactor runs
    (one clear error if they cannot) while state loads asynchronously.
    """

    noisy = False

    def __init__(self):
        self.inner = None

    def open(self, inner) -> None:
        self.inner = inner

    def buildProtocol(self, addr):
        if self.inner is None:
            return None
        return self.inner.buildProtocol(addr)
