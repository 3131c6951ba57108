"""
Test helpers for the Media Distributor's tunnel: an owner that records
events, transports that behave a little more like real ones than
StringTransport does, a client endpoint the test completes by hand, and a
TLS server standing in for a Key Distributor.
"""

from __future__ import annotations

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from perc.md.tunnel import ITunnelOwner

from tests.kdhelpers import split_messages  # noqa: F401 (re-exported for the tests)




@implementer(ITunnelOwner)
class RecordingOwner:
    """Records every owner call as a tuple ``(method, *args)``."""

    def __init__(self):
        self.events: list[tuple] = []

    def names(self) -> list[str]:
        return [event[0] for event in self.events]

    def of(self, name: str) -> list[tuple]:
        return [event[1:] for event in self.events if event[0] == name]

    def tunnelUp(self, tunnel):
        self.events.append(("tunnelUp", tunnel))

    def tunnelDown(self, tunnel, reason):
        self.events.append(("tunnelDown", tunnel, reason))

    def versionRejected(self, tunnel, version):
        self.events.append(("versionRejected", tunnel, version))

    def mediaKeysReceived(self, tunnel, message):
        self.events.append(("mediaKeysReceived", tunnel, message))

    def tunneledDtlsReceived(self, tunnel, association_id, data):
        self.events.append(("tunneledDtlsReceived", tunnel, association_id, data))

    def endpointDisconnectReceived(self, tunnel, association_id):
        self.events.append(("endpointDisconnectReceived", tunnel, association_id))


class ClosingTransport(StringTransport):
    """
    A StringTransport that, like a real one, reports the end of the
    connection to its protocol later (on ``clock``), once, after
    loseConnection or abortConnection.
    """

    def __init__(self, clock, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock
        self.aborted = False
        self._lostScheduled = False

    def loseConnection(self):
        super().loseConnection()
        self._scheduleLost(error.ConnectionDone("closed cleanly"))

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()
        self._scheduleLost(error.ConnectionAborted("aborted"))

    def _scheduleLost(self, reason):
        if self._lostScheduled:
            return
        self._lostScheduled = True
        self.clock.callLater(0, self.protocol.connectionLost, Failure(reason))

    def peerCloses(self, reason=None):
        """The peer ends the connection now."""
        if self._lostScheduled:
            return
        self._lostScheduled = True
        self.disconnecting = True
        self.protocol.connectionLost(Failure(reason or error.ConnectionDone("peer closed")))


class FakeTlsTransport(ClosingTransport):
    """A transport the tunnel takes for TLS: it has getPeerCertificate."""

    def getPeerCertificate(self):
        return None


def connect(protocol_, transport):
    """Connect ``protocol_`` to ``transport`` as a reactor would."""
    transport.protocol = protocol_
    protocol_.makeConnection(transport)
    return transport


@implementer(IStreamClientEndpoint)
class ManualEndpoint:
    """
    A client endpoint whose connection attempts the test completes or fails
    by hand, on ClosingTransports driven by ``clock``.
    """

    def __init__(self, clock):
        self.clock = clock
        self.attempts: list[tuple] = []  # (factory, deferred)

    def connect(self, factory):
        attempt = defer.Deferred()
        self.attempts.append((factory, attempt))
        return attempt

    @property
    def pending(self) -> bool:
        return bool(self.attempts) and not self.attempts[-1][1].called

    def succeed(self) -> ClosingTransport:
        """Complete the latest attempt; returns the new connection's transport."""
        factory, attempt = self.attempts[-1]
        built = factory.buildProtocol(None)
        transport = connect(built, ClosingTransport(self.clock))
        attempt.callback(built)
        return transport

    def fail(self, reason=None) -> None:
        factory, attempt = self.attempts[-1]
        attempt.errback(reason or error.ConnectionRefusedError("refused"))


class RecordingServerProtocol(protocol.Protocol):
    """
    A Key Distributor stand-in behind TLS: records what it receives,
    optionally answers the first bytes with ``reply`` and closes.
    """

    def connectionMade(self):
        self.received = b""
        self.factory.connections.append(self)
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        self.factory.receivedSomething(self)
        reply = self.factory.replies.get(self.factory.connections.index(self))
        if reply is not None and not self.transport.disconnecting:
            self.transport.write(reply)
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost.callback(None)


class RecordingServerFactory(protocol.Factory):
    protocol = RecordingServerProtocol

    def __init__(self, expected: int, replies: dict[int, bytes] | None = None):
        """
        ``expected``: octets each connection should receive;
        ``replies``: what connection N answers (then it closes).
        """
        self.replies = dict(replies or {})
        self.expected = expected
        self.connections: list[RecordingServerProtocol] = []
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def whenReceived(self, connection_index: int) -> defer.Deferred:
        """Fires with the connection once it has received ``expected`` octets."""
        waiter = defer.Deferred()
        self._waiting.append((connection_index, waiter))
        self._check()
        return waiter

    def receivedSomething(self, connection):
        self._check()

    def _check(self):
        ready = [(index, waiter) for index, waiter in self._waiting
                 if index < len(self.connections)
                 and len(self.connections[index].received) >= self.expected]
        # Remove before firing: a callback may wait again at once.
        self._waiting = [entry for entry in self._waiting if entry not in ready]
        for index, waiter in ready:
            waiter.callback(self.connections[index])
