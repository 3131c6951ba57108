"""
What both ends of a tunnel share: the framing, bounded writes, and the
three ways this side ends a tunnel connection -- :meth:`close` (clean, TLS
close_notify), :meth:`abort` (at once: the peer is not reading, or was
refused) and :meth:`protocolError` (the framing's single error path).
"""

from __future__ import annotations

from perc.backpressure import BoundedWrites
from perc.framing import TunnelFramingProtocol

__all__ = ["TunnelConnection"]


class TunnelConnection(BoundedWrites, TunnelFramingProtocol):
    """
    Base of the Key Distributor's and the Media Distributor's tunnel
    protocols.  Subclasses name :attr:`closedLocally` and call
    :meth:`connectionStarted` / :meth:`connectionEnded` from
    ``connectionMade`` / ``connectionLost``.
    """

    #: The reason :meth:`close` records when given none.
    closedLocally = "closed locally"
    #: Why this side ended the connection; None if it did not.
    closeReason: str | None = None
    _connected = False
    _closing = False
    _aborted = False

    def connectionStarted(self) -> None:
        self._connected = True
        self.startBoundingWrites()

    def connectionEnded(self) -> None:
        self._connected = False
        self._closing = True
        self.boundingWritesLost()

    def close(self, reason: str | None = None) -> None:
        """
        Close the connection cleanly (TLS close_notify); nothing more is
        sent or delivered.
        """
        if self._closing or not self._connected:
            return
        self._ending(reason or self.closedLocally)
        self.transport.loseConnection()

    def abort(self, reason: str, log: bool = True) -> None:
        """
        Drop the connection at once (also when a clean close is under way),
        logging ``reason`` unless ``log`` is false.
        """
        if not self._connected or self._aborted:
            return
        if log:
            self.log.warn("Dropping tunnel with {peer}: {reason}",
                          peer=self.peerDescription(), reason=reason)
        self._aborted = True
        self._ending(reason)
        self.transport.abortConnection()

    def writeBoundExceeded(self, reason: str) -> None:
        self.abort(reason)

    def protocolError(self, reason: str) -> None:
        if self._failed or self._closing:
            return
        self._closing = True
        if self.closeReason is None:
            self.closeReason = "protocol error: " + reason
        # A TLS transport with a registered producer would not close.
        self.stopBoundingWrites()
        super().protocolError(reason)

    def _ending(self, reason: str) -> None:
        self._closing = True
        self._failed = True  # the framing delivers nothing more
        if self.closeReason is None:
            self.closeReason = reason
        self.stopBoundingWrites()
