"""
The Key Distributor's side of a tunnel (RFC 9185 sections 5.4, 5.5, 6).

One :class:`KeyDistributorTunnel` per TLS connection, whichever side opened
it.  It enforces the message rules of the tunnel and hands DTLS to the
:class:`perc.kd.associations.KeyDistributor`, which owns the associations.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from perc import wire
from perc.framing import TunnelFramingProtocol

__all__ = ["KeyDistributorTunnel", "KeyDistributorTunnelFactory"]


def _ssl_reason(error: SSL.Error) -> str:
    """OpenSSL's error queue as short text ('tlsv13 alert certificate required')."""
    try:
        return "; ".join(entry[2] for entry in error.args[0] if entry[2]) or str(error)
    except (IndexError, TypeError):
        return str(error)


@implementer(IHandshakeListener)
class KeyDistributorTunnel(TunnelFramingProtocol):
    """
    States: waiting for SupportedProfiles, then up.  The first message must
    be SupportedProfiles of version 0; another version gets
    UnsupportedVersion(0) and the connection is closed.  After that the Media
    Distributor may send TunneledDtls and EndpointDisconnect, and may repeat
    SupportedProfiles only with the same list.
    """

    log = Logger()

    #: (identity, transport, text) of the last peerDescription().
    _description = None

    def __init__(self, distributor, authorise=None):
        """
        ``distributor`` is the KeyDistributor.  ``authorise``, if given, is
        called with the TLS transport once the handshake is done and returns
        ``(authorised, identity, reason)``.
        """
        self.distributor = distributor
        self._authorise = authorise
        self.identity: str | None = None
        #: The profile ids the Media Distributor sent; None until it did.
        self.media_distributor_profiles: tuple[int, ...] | None = None
        self.associations: set = set()
        self._up = False
        self._firstMessageTimer = None

    # Connection life

    def connectionMade(self) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connections.add(self)
        clock = self.distributor.clock
        # A peer that never says SupportedProfiles must not hold a
        # connection (and a TLS session) for ever.
        self._firstMessageTimer = clock.callLater(
            self.distributor.first_message_timeout, self._firstMessageTimedOut)

    def handshakeCompleted(self) -> None:
        if self._authorise is None:
            return
        authorised, identity, reason = self._authorise(self.transport)
        self.identity = identity
        if not authorised:
            self.log.warn(
                "Refusing tunnel from {peer}: {reason}",
                peer=self.peerDescription(), reason=reason)
            self._failed = True
            self.transport.abortConnection()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connections.discard(self)
        self._cancelFirstMessageTimer()
        if self._up:
            self._up = False
            self.log.info(
                "Tunnel with {peer} closed ({associations} associations)",
                peer=self.peerDescription(), associations=len(self.associations))
            self.distributor.tunnelLost(self)
        elif not self._failed and reason is not None and reason.check(SSL.Error):
            # Refused during the TLS handshake (no client certificate, another
            # CA, an expired one): one line with OpenSSL's reason.
            self.log.warn("Refusing tunnel from {peer}: TLS handshake failed: {reason}",
                          peer=self.peerDescription(), reason=_ssl_reason(reason.value))

    def peerDescription(self) -> str:
        # Asked for by every association's log lines: the text is kept for
        # as long as the identity and the transport stay the same.
        cached = self._description
        if cached is not None and cached[0] is self.identity and cached[1] is self.transport:
            return cached[2]
        address = super().peerDescription()
        text = "{} ({})".format(self.identity, address) if self.identity else address
        if self.transport is not None:
            self._description = (self.identity, self.transport, text)
        return text

    @property
    def up(self) -> bool:
        """True between an accepted SupportedProfiles and the connection's end."""
        return self._up

    def _cancelFirstMessageTimer(self) -> None:
        if self._firstMessageTimer is not None and self._firstMessageTimer.active():
            self._firstMessageTimer.cancel()
        self._firstMessageTimer = None

    def _firstMessageTimedOut(self) -> None:
        self._firstMessageTimer = None
        self.protocolError("no SupportedProfiles within {} seconds".format(
            self.distributor.first_message_timeout))

    # Messages

    def messageReceived(self, message: wire.Message) -> None:
        if self.media_distributor_profiles is None:
            self._firstMessage(message)
        elif isinstance(message, wire.TunneledDtls):
            self.distributor.tunneledDtlsReceived(self, message.association_id, message.dtls_message)
        elif isinstance(message, wire.EndpointDisconnect):
            self.distributor.endpointDisconnectReceived(self, message.association_id)
        elif isinstance(message, wire.SupportedProfiles):
            if (message.version, message.profiles) != (wire.PROTOCOL_VERSION,
                                                       self.media_distributor_profiles):
                self.protocolError("SupportedProfiles changed the profile list or version "
                                   "during the connection")
        else:
            self.protocolError("{} is never sent by a Media Distributor".format(
                type(message).__name__))

    def _firstMessage(self, message: wire.Message) -> None:
        self._cancelFirstMessageTimer()
        if not isinstance(message, wire.SupportedProfiles):
            self.protocolError("first message must be SupportedProfiles, got {}".format(
                type(message).__name__))
            return
        if message.version != wire.PROTOCOL_VERSION:
            self.log.warn(
                "Tunnel with {peer} asked for version {version}; answering "
                "UnsupportedVersion({highest}) and closing",
                peer=self.peerDescription(), version=message.version,
                highest=wire.PROTOCOL_VERSION)
            self._failed = True
            self.sendMessage(wire.UnsupportedVersion(wire.PROTOCOL_VERSION))
            self.transport.loseConnection()
            return
        self.media_distributor_profiles = message.profiles
        self._up = True
        common = self.distributor.profilesFor(self)
        self.log.info(
            "Tunnel with {peer} up: Media Distributor profiles {offered}, usable {usable}",
            peer=self.peerDescription(),
            offered=", ".join("0x{:04X}".format(p) for p in message.profiles),
            usable=", ".join(p.name for p in common) or "none")
        if not common:
            self.log.warn(
                "Tunnel with {peer} shares no SRTP profile with this Key Distributor: "
                "every association through it will be refused",
                peer=self.peerDescription())
        self.distributor.tunnelUp(self)


class KeyDistributorTunnelFactory(protocol.Factory):
    """Builds tunnels for a listener or for ``--connect`` client services."""

    noisy = False

    def __init__(self, distributor, authorise=None):
        self.distributor = distributor
        self.authorise = authorise
        #: Every live connection, so that shutting down can close them.
        self.connections: set = set()

    def closeAll(self) -> None:
        """Close every tunnel (service shutdown)."""
        for tunnel in list(self.connections):
            tunnel.transport.loseConnection()

    def buildProtocol(self, addr):
        tunnel = KeyDistributorTunnel(self.distributor, self.authorise)
        tunnel.factory = self
        return tunnel
