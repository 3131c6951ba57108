"""
Endpoint plumbing shared by the two daemons: parsing Twisted endpoint
descriptions into one-line errors, wrapping them in TLS, tunnel liveness
(TCP keepalive and ``TCP_USER_TIMEOUT`` on every tunnel socket), and a
factory that refuses connections until the service behind it is ready.
"""

from __future__ import annotations

import math
import socket
import struct

from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from perc import tls
from perc.errors import ConfigError

__all__ = ["server_endpoint", "tls_client_endpoint", "tls_server_factory", "GatedFactory",
           "endpoint_host", "set_receive_buffer", "DEFAULT_TUNNEL_TIMEOUT",
           "MIN_TUNNEL_TIMEOUT", "MAX_TUNNEL_TIMEOUT", "tunnel_timeout", "keepalive_schedule",
           "set_tunnel_liveness", "PeerUnresponsive"]

log = Logger()


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
    """
    The host of a ``tcp`` endpoint description (``tcp:HOST:PORT``,
    ``tcp:host=\\:\\:1:port=PORT``), unescaped; None for other kinds or a
    description without one.
    """
    try:
        # Twisted's own description grammar (colons escaped with a
        # backslash); it has no public name, but clientFromString parses
        # with it, so the host read here is the one that is dialled.
        args, kwargs = endpoints._parse(description)
    except (ValueError, IndexError, RuntimeError):  # RuntimeError: a trailing backslash
        return None
    if not args or args[0] != "tcp":
        return None
    host = kwargs.get("host", args[1] if len(args) > 1 else None)
    return host or None


def tls_client_endpoint(reactor, description: str, credentials, option: str,
                        expected_name: str | None = None,
                        tunnel_timeout: float | None = None):
    """
    A client endpoint that opens mutually authenticated TLS, verifying the
    server against ``expected_name`` (default: the description's host).
    With ``tunnel_timeout`` (seconds), the TCP socket gets
    :func:`set_tunnel_liveness` and a connection attempt is given up after
    that long.
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
    return _TunnelClientEndpoint(reactor, credentials.client_options(name), plain,
                                 tunnel_timeout)


def tls_server_factory(credentials, factory, tunnel_timeout: float | None = None):
    """
    Wrap ``factory`` in server-side TLS that requires a client certificate;
    with ``tunnel_timeout`` (seconds), every accepted TCP socket gets
    :func:`set_tunnel_liveness`.
    """
    return TunnelTLSFactory(credentials.server_options(), False, factory,
                            tunnel_timeout=tunnel_timeout)


# Tunnel liveness: a peer that vanished without FIN or RST (a partition, a
# dead host) is noticed by the kernel within the tunnel timeout, whether the
# tunnel is idle (keepalive probes go unanswered) or has data in flight
# (TCP_USER_TIMEOUT: unacknowledged data for that long).  The socket then
# fails with ETIMEDOUT, the tunnel ends like any lost connection, and the
# side that dialled dials again.

#: Seconds of ``--tunnel-timeout`` when none is given.
DEFAULT_TUNNEL_TIMEOUT = 30.0
#: Keepalive counts whole seconds and needs one of idle, interval and count each.
MIN_TUNNEL_TIMEOUT = 2.0
#: Linux refuses a keepalive idle time or interval above 32767 seconds.
MAX_TUNNEL_TIMEOUT = 32767.0
#: Keepalive probes sent before an idle peer counts as dead (fewer if the timeout is short).
KEEPALIVE_PROBES = 3


def tunnel_timeout(value: str) -> float:
    """The ``--tunnel-timeout`` coercer: seconds, a number from 2 to 32767."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not MIN_TUNNEL_TIMEOUT <= seconds <= MAX_TUNNEL_TIMEOUT:
        raise ValueError("--tunnel-timeout {!r}: must be a number of seconds from {:g} to {:g}".format(
            value, MIN_TUNNEL_TIMEOUT, MAX_TUNNEL_TIMEOUT))
    return seconds


def keepalive_schedule(timeout: float) -> tuple[int, int, int]:
    """
    ``(idle, interval, count)`` in whole seconds for a tunnel timeout of
    ``timeout`` seconds (at least 2): keepalive starts after half the
    timeout without traffic and gives up after ``count`` unanswered probes,
    so that ``idle + interval * count <= timeout``.
    """
    whole = int(timeout)
    idle = max(1, whole // 2)
    count = max(1, min(KEEPALIVE_PROBES, whole - idle))
    interval = max(1, (whole - idle) // count)
    return idle, interval, count


def _liveness_options(timeout: float) -> list[tuple[str, int, int]]:
    """The (name, level, value) of every option :func:`set_tunnel_liveness` sets."""
    idle, interval, count = keepalive_schedule(timeout)
    return [("SO_KEEPALIVE", socket.SOL_SOCKET, 1),
            ("TCP_KEEPIDLE", socket.IPPROTO_TCP, idle),
            ("TCP_KEEPINTVL", socket.IPPROTO_TCP, interval),
            ("TCP_KEEPCNT", socket.IPPROTO_TCP, count),
            ("TCP_USER_TIMEOUT", socket.IPPROTO_TCP, max(1, round(timeout * 1000)))]


_unsupportedLogged = False


def set_tunnel_liveness(sock, timeout: float) -> list[str]:
    """
    Set TCP keepalive (:func:`keepalive_schedule`) and ``TCP_USER_TIMEOUT``
    (``timeout`` in milliseconds) on the TCP socket ``sock``.  Returns the
    names of the options this platform lacks or refused; those are left
    alone, and the first time any is, one line says so.  On a socket that
    is not TCP nothing is set.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return []
    missing = []
    for name, level, value in _liveness_options(timeout):
        number = getattr(socket, name, None)
        try:
            if number is None:
                raise OSError(name)
            sock.setsockopt(level, number, value)
        except OSError:
            missing.append(name)
    global _unsupportedLogged
    if missing and not _unsupportedLogged:
        _unsupportedLogged = True
        log.info("Tunnel liveness: this platform lacks {options}; a dead tunnel peer may be "
                 "noticed later than --tunnel-timeout", options=", ".join(missing))
    return missing


class PeerUnresponsive(error.ConnectionLost):
    """The tunnel's peer stopped acknowledging: the kernel gave the connection up."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "the peer stopped acknowledging"


#: struct tcp_info up to tcpi_last_ack_recv: 8 octets, 13 32-bit fields.
_TCP_INFO = struct.Struct("8B13I")
_TCP_CLOSE = 7


def _unresponsive(probe, timeout: float) -> str | None:
    """
    Why the kernel gave up a connection (``probe`` is a duplicate of its
    socket, read right after the connection was lost), or None if it did
    not: a connection reset or closed by its peer is not unresponsive.
    """
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return None
    try:
        raw = probe.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO.size:
        return None
    fields = _TCP_INFO.unpack(raw)
    state, retransmits, probes, last_ack_ms = fields[0], fields[2], fields[3], fields[20]
    idle, interval, _ = keepalive_schedule(timeout)
    # A live peer answers a keepalive probe at least every idle + interval
    # seconds; a reset does not count as an acknowledgement either, so only
    # a long silence tells a dead peer from a reset one.
    if state != _TCP_CLOSE or last_ack_ms < (idle + interval) * 1000:
        return None
    return ("no acknowledgement from the peer for {:.1f} s ({} keepalive probes, {} "
            "retransmissions unanswered; --tunnel-timeout {:g})".format(
                last_ack_ms / 1000, probes, retransmits, timeout))


def _tcp_socket(transport):
    """The socket under ``transport`` (a TCP transport), or None."""
    sock = getattr(transport, "socket", None)
    return sock if isinstance(sock, socket.socket) else None


class _TunnelTLSProtocol(BufferingTLSTransport):
    """
    TLS over a tunnel socket with liveness: the options are set when the
    connection is made, and a connection the kernel gave up because the
    peer stopped answering is logged once and reported to the tunnel as
    :class:`PeerUnresponsive`.
    """

    _probe = None

    def makeConnection(self, transport):
        timeout = self.factory.tunnelTimeout
        sock = _tcp_socket(transport) if timeout is not None else None
        if sock is not None:
            set_tunnel_liveness(sock, timeout)
        super().makeConnection(transport)
        if sock is not None and sock.fileno() >= 0:
            try:
                # Twisted closes the socket before connectionLost: a
                # duplicate keeps its TCP_INFO readable until then.
                self._probe = sock.dup()
            except OSError:
                self._probe = None

    def connectionLost(self, reason):
        probe, self._probe = self._probe, None
        if probe is not None:
            with probe:
                cause = (_unresponsive(probe, self.factory.tunnelTimeout)
                         if reason.check(error.ConnectionLost) else None)
            if cause is not None:
                log.warn("Tunnel with {peer} dropped as dead: {cause}",
                         peer=self._peerDescription(), cause=cause)
                reason = Failure(PeerUnresponsive(cause))
                # The TLS layer reports its own reason first when it has one
                # (an EOF from the BIO flushed below): this one is the truth.
                self._reason = reason
        super().connectionLost(reason)

    def _peerDescription(self) -> str:
        try:
            address = self.transport.getPeer()
            where = "{}:{}".format(address.host, address.port)
        except Exception:
            where = "(unknown address)"
        try:
            identity = tls.peer_identity(self)
        except Exception:
            identity = "(no certificate)"
        return "{} ({})".format(identity, where)


class TunnelTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose connections get tunnel liveness (``tunnelTimeout`` seconds; None: none)."""

    protocol = _TunnelTLSProtocol

    def __init__(self, contextFactory, isClient: bool, wrappedFactory, *,
                 tunnel_timeout: float | None = None):
        super().__init__(contextFactory, isClient, wrappedFactory)
        self.tunnelTimeout = tunnel_timeout

    def buildProtocol(self, addr):
        """None (the connection is closed) when the wrapped factory refuses it, as a closed
        :class:`GatedFactory` does while a daemon starts: there is nothing to wrap."""
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)


@implementer(IStreamClientEndpoint)
class _TunnelClientEndpoint:
    """TLS over ``plain`` with tunnel liveness; a connection attempt lasts at most the tunnel timeout."""

    def __init__(self, reactor, creator, plain, tunnel_timeout: float | None):
        self._reactor = reactor
        self._creator = creator
        self._plain = plain
        self._timeout = tunnel_timeout

    def connect(self, factory):
        connecting = self._plain.connect(TunnelTLSFactory(
            self._creator, True, factory, tunnel_timeout=self._timeout))
        if self._timeout is not None:
            # A SYN into a dead link would otherwise wait for the
            # endpoint's own timeout (30 s by default) or the kernel's.
            timer = self._reactor.callLater(self._timeout, connecting.cancel)
            connecting.addBoth(self._timedOut, timer)
        return connecting.addCallback(lambda wrapper: wrapper.wrappedProtocol)

    def _timedOut(self, result, timer):
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and result.check(
                defer.CancelledError, error.ConnectingCancelledError):
            return Failure(error.TimeoutError(
                "no answer within {:g} s (--tunnel-timeout)".format(self._timeout)))
        return result

    def __repr__(self) -> str:
        return "<TLS tunnel over {!r}>".format(self._plain)


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
