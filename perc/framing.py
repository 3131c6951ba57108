"""
Tunnel framing: ``msg_type (1) · length (uint16) · body`` over a stream, in
the style of ``twisted.protocols.basic.Int16StringReceiver``.

The Media Distributor and Key Distributor tunnel protocols subclass
:class:`TunnelFramingProtocol` and implement :meth:`messageReceived`.
"""

from __future__ import annotations

import struct

from twisted.internet import protocol
from twisted.logger import Logger

from perc import wire

__all__ = ["TunnelFramingProtocol"]

_HEADER = struct.Struct("!BH")
_KNOWN_TYPES = frozenset(int(t) for t in wire.MessageType)


class TunnelFramingProtocol(protocol.Protocol):
    """
    Splits the byte stream into whole tunnel messages, decodes each one, and
    hands it to :meth:`messageReceived`.

    Any violation -- an unknown or reserved type (detected as soon as the
    header arrives, before any body is buffered), a body longer than
    ``maxBodyLength``, or a body the codec rejects -- goes to the one error
    path, :meth:`protocolError`, which logs the peer and the reason and closes
    the connection.  Nothing further is delivered after that.
    """

    log = Logger()

    #: Largest body accepted.  The 16-bit length field allows 65535; a
    #: subclass or instance may lower it.
    maxBodyLength = wire.MAX_BODY_LENGTH

    _failed = False

    def makeConnection(self, transport) -> None:
        # A bytearray grows in amortised constant time, so a peer that sends
        # one octet per segment costs linear, not quadratic, work.
        self._buffer = bytearray()
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= wire.HEADER_LENGTH:
            msg_type, length = _HEADER.unpack_from(buffer, offset)
            if msg_type not in _KNOWN_TYPES:
                self.protocolError("unknown or reserved message type 0x{:02X}".format(msg_type))
                return
            if length > self.maxBodyLength:
                self.protocolError("message body of {} octets exceeds the maximum of {}".format(
                    length, self.maxBodyLength))
                return
            body_start = offset + wire.HEADER_LENGTH
            if len(buffer) - body_start < length:
                break
            offset = body_start + length
            try:
                message = wire.decode(msg_type, bytes(buffer[body_start:offset]))
            except wire.WireError as error:
                self.protocolError(error.reason)
                return
            self.messageReceived(message)
            if self._failed or getattr(self.transport, "disconnecting", False):
                # The handler closed the connection: deliver nothing more.
                del buffer[:]
                return
        del buffer[:offset]

    def messageReceived(self, message: wire.Message) -> None:
        """Handle one decoded tunnel message.  Subclasses override this."""
        raise NotImplementedError(self.__class__.__name__ + ".messageReceived")

    def sendMessage(self, message: wire.Message) -> bool:
        """Encode and write one tunnel message; True (subclasses may refuse: False)."""
        self.transport.write(message.encode())
        return True

    def peerDescription(self) -> str:
        """
        Who is at the other end, for log lines.  Subclasses that know the
        authenticated identity (from the TLS certificate) override this.
        """
        transport = self.transport
        if transport is None:
            return "unknown peer"
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        return "{}:{}".format(host, port) if host is not None else str(peer)

    def protocolError(self, reason: str) -> None:
        """
        The single error path: log the peer and the reason, stop delivering,
        and close this connection (and only this one).
        """
        if self._failed:
            return
        self._failed = True
        del self._buffer[:]
        self.log.warn(
            "Closing tunnel with {peer}: {reason}",
            peer=self.peerDescription(),
            reason=reason,
        )
        self.transport.loseConnection()
