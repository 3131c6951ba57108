"""
Write backpressure for a tunnel whose peer stops reading.

A tunnel cannot hold back what it writes: the messages come from endpoints
and from the distributor at the other end, not from a source it could stop.
So a tunnel registers itself with its transport as a streaming producer,
the way Twisted reports a full send buffer (64 KiB for TCP, on top of the
kernel's), and while the transport has paused it, it keeps writing but at
most ``maxPausedOctets`` octets and for at most ``maxPausedSeconds``
seconds.  Past either bound the peer is not reading, and the tunnel drops
the connection (:meth:`BoundedWrites.writeBoundExceeded`) rather than let
the buffer grow without limit.

Both tunnel protocols mix in :class:`BoundedWrites`.

A side whose writes answer what it reads can do better than count: while
paused it also stops reading (:meth:`BoundedWrites.holdsBackReading`).  The
Key Distributor answers each TunneledDtls with records of its own, so a
Media Distributor that reads slowly (a burst of a thousand handshakes on a
busy host) sees its own writes pause in turn and sheds new handshakes
(:mod:`perc.md.relay`), instead of the Key Distributor's buffer reaching the
bound and the tunnel, with every association on it, being dropped.  What the
Key Distributor writes unasked (retransmissions, rekeys) still counts.

Closing: a TLS transport (``TLSMemoryBIOProtocol``) with a registered
producer does not shut down on ``loseConnection()`` until the producer is
unregistered, so call :meth:`BoundedWrites.stopBoundingWrites` before
``loseConnection()``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["BoundedWrites", "DEFAULT_MAX_PAUSED_OCTETS", "DEFAULT_MAX_PAUSED_SECONDS"]

#: Octets a tunnel may write while its transport has asked it to pause (the
#: transport's own buffer comes on top).  Past this the tunnel is dropped.
DEFAULT_MAX_PAUSED_OCTETS = 1 << 20

#: Seconds a tunnel's transport may stay paused before the tunnel is
#: dropped.  A TLS transport also pauses its producer while it buffers
#: writes made before the handshake is done, so this bounds that too.
DEFAULT_MAX_PAUSED_SECONDS = 30.0


@implementer(IPushProducer)
class BoundedWrites:
    """
    Mixin for a ``Protocol``.  The class provides ``transport``, ``clock``
    (an ``IReactorTime``), ``maxPausedOctets``, ``maxPausedSeconds`` and
    :meth:`writeBoundExceeded`; :attr:`silentPeer` names the other side in
    the reasons.

    Call :meth:`startBoundingWrites` in ``connectionMade``,
    :meth:`countWrite` after every write, :meth:`stopBoundingWrites` before
    closing the connection and :meth:`boundingWritesLost` in
    ``connectionLost``.
    """

    #: Who is not reading, as the reasons name it.
    silentPeer = "the peer"

    _producerRegistered = False
    _paused = False
    _readingHeldBack = False
    _pausedOctets = 0
    _pausedTimer = None

    def startBoundingWrites(self) -> None:
        """Register with the transport as a streaming producer."""
        if not self._producerRegistered:
            self._producerRegistered = True
            self.transport.registerProducer(self, True)

    def stopBoundingWrites(self) -> None:
        """Forget any pause and unregister (before closing the connection)."""
        self._forgetPause()
        if self._producerRegistered:
            self._producerRegistered = False
            self.transport.unregisterProducer()

    def boundingWritesLost(self) -> None:
        """The connection has ended: its transport has dropped the producer already."""
        self._forgetPause()
        self._producerRegistered = False

    @property
    def writesPaused(self) -> bool:
        """True while the transport has asked this protocol to pause."""
        return self._paused

    def countWrite(self, octets: int) -> bool:
        """
        Account for ``octets`` just written.  False, after calling
        :meth:`writeBoundExceeded`, when that passes the bound.
        """
        if not self._paused:
            return True
        self._pausedOctets += octets
        if self._pausedOctets <= self.maxPausedOctets:
            return True
        self.writeBoundExceeded("{} octets written while {} was not reading (bound {})".format(
            self._pausedOctets, self.silentPeer, self.maxPausedOctets))
        return False

    def writeBoundExceeded(self, reason: str) -> None:
        """Drop the connection, logging ``reason`` (one line).  Subclasses implement this."""
        raise NotImplementedError(self.__class__.__name__ + ".writeBoundExceeded")

    def holdsBackReading(self) -> bool:
        """
        Whether to stop reading while paused (see the module's docstring);
        False unless a subclass says otherwise.  Only once the transport's
        TLS handshake is done: not reading would stall it.
        """
        return False

    # IPushProducer: called by the transport

    def pauseProducing(self) -> None:
        if self._paused or not self._producerRegistered:
            return
        self._paused = True
        self._pausedOctets = 0
        self._pausedTimer = self.clock.callLater(self.maxPausedSeconds, self._pausedTooLong)
        if self.holdsBackReading():
            self._readingHeldBack = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._forgetPause()

    def stopProducing(self) -> None:
        # The connection is ending; connectionLost follows.
        self._forgetPause()

    def _forgetPause(self) -> None:
        self._paused = False
        self._pausedOctets = 0
        timer, self._pausedTimer = self._pausedTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._readingHeldBack:
            self._readingHeldBack = False
            self.transport.resumeProducing()

    def _pausedTooLong(self) -> None:
        self._pausedTimer = None
        self.writeBoundExceeded("{} has not read from the tunnel for {} seconds".format(
            self.silentPeer, self.maxPausedSeconds))
