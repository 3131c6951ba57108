"""
An in-process TCP relay: it listens on one port and joins every connection
it accepts to a new connection to a fixed target, copying bytes both ways
untouched (a TLS tunnel passes through it end to end).  :meth:`TcpRelay.reset`
breaks every joined pair at once with a TCP reset on both sides, the way a
NAT or firewall dropping its state does; the relay keeps listening, so the
client can dial again.  Used to flap the tunnel between a Media Distributor
and a Key Distributor (``bench/soak.py``, ``bench/faults.py``).
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import protocol
from twisted.logger import Logger

__all__ = ["TcpRelay"]

#: Octets held from the accepted side while the target connection is being made.
PENDING_BOUND = 1 << 20


def _abort_with_reset(transport) -> None:
    """Close ``transport`` at once, with a RST rather than a FIN (SO_LINGER 0)."""
    try:
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass  # already gone, or no socket: abortConnection still closes it
    transport.abortConnection()


class _Outbound(protocol.Protocol):
    """The relay's connection to the target, paired with one accepted connection."""

    def __init__(self, inbound: "_Inbound"):
        self.inbound = inbound

    def connectionMade(self):
        self.inbound.outboundMade(self)

    def dataReceived(self, data):
        self.inbound.transport.write(data)

    def connectionLost(self, reason):
        self.inbound.outboundLost()


class _Inbound(protocol.Protocol):
    """One accepted connection; bytes wait (bounded) until the target answers."""

    def __init__(self, relay: "TcpRelay"):
        self.relay = relay
        self.outbound: _Outbound | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.closed = False

    def connectionMade(self):
        self.relay._pairs.add(self)
        self.relay.accepted += 1
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _Outbound(self)
        factory.clientConnectionFailed = lambda connector, reason: self.outboundLost()
        host, port = self.relay.target
        self.relay.reactor.connectTCP(host, port, factory, timeout=10)

    def outboundMade(self, outbound: _Outbound) -> None:
        if self.closed:
            outbound.transport.loseConnection()
            return
        self.outbound = outbound
        outbound.transport.write(b"".join(self.pending))
        self.pending, self.pending_size = [], 0

    def dataReceived(self, data):
        if self.outbound is not None:
            self.outbound.transport.write(data)
            return
        self.pending_size += len(data)
        if self.pending_size > PENDING_BOUND:
            self.relay.log.warn("TCP relay: {size} octets before the target answered; dropped",
                                size=self.pending_size)
            self.transport.abortConnection()
            return
        self.pending.append(data)

    def outboundLost(self) -> None:
        # The target closed, refused or was reset: so is the accepted side.
        if not self.closed:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed = True
        self.pending, self.pending_size = [], 0
        self.relay._pairs.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()

    def reset(self) -> None:
        if self.outbound is not None:
            _abort_with_reset(self.outbound.transport)
        _abort_with_reset(self.transport)


class TcpRelay(protocol.ServerFactory):
    """
    Relay connections accepted by the port :meth:`listen` opens to
    ``target`` (host, port).  ``accepted`` and ``resets`` count connections
    accepted and pairs broken by :meth:`reset`.
    """

    log = Logger()

    def __init__(self, reactor, target):
        self.reactor = reactor
        self.target = target
        self.accepted = 0
        self.resets = 0
        self._pairs: set[_Inbound] = set()
        self.port = None

    def buildProtocol(self, addr):
        return _Inbound(self)

    def listen(self, port: int = 0, interface: str = "127.0.0.1"):
        """Start listening; returns the listening port (``getHost().port``)."""
        self.port = self.reactor.listenTCP(port, self, interface=interface)
        return self.port

    @property
    def connections(self) -> int:
        """Accepted connections open now."""
        return len(self._pairs)

    def reset(self) -> int:
        """Break every relayed connection, both sides, with a TCP reset; returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.reset()
        self.resets += len(pairs)
        return len(pairs)

    def stop(self):
        """Reset every connection and stop listening; returns a Deferred."""
        self.reset()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
