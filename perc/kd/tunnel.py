"""
The Key Distributor's side of a tunnel (RFC 9185 sections 5.4, 5.5, 6).

One :class:`KeyDistributorTunnel` per TLS connection, whichever side opened
it.  It enforces the message rules of the tunnel and hands DTLS to the
:class:`perc.kd.associations.KeyDistributor`, which owns the associations.

A tunnel registers itself with its transport as a streaming producer, to
bound what it buffers for a Media Distributor that stops reading
(:mod:`perc.backpressure`).  A TLS transport with a registered producer
holds back ``loseConnection()`` until the producer is unregistered, so close
a tunnel with :meth:`KeyDistributorTunnel.close` or
:meth:`KeyDistributorTunnel.abort`, never through its transport.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

from perc import tls, wire
from perc.tunnelconnection import TunnelConnection

__all__ = ["KeyDistributorTunnel", "KeyDistributorTunnelFactory"]


@implementer(IHandshakeListener)
class KeyDistributorTunnel(TunnelConnection):
    """
    States: waiting for SupportedProfiles, then up.  The first message must
    be SupportedProfiles of version 0; another version gets
    UnsupportedVersion(0) and the connection is closed, whatever its body
    holds (:class:`perc.wire.NewerSupportedProfiles`).  After that the Media
    Distributor may send TunneledDtls and EndpointDisconnect, and may repeat
    SupportedProfiles only with the same list.

    Backpressure (:class:`perc.backpressure.BoundedWrites`): while the
    transport has paused this producer, the tunnel stops reading (what it
    writes answers what it reads), at most ``maxPausedOctets`` may be
    written and the pause may last at most ``maxPausedSeconds``; past either
    the tunnel is aborted, and its associations are handled as for any lost
    tunnel (:meth:`perc.kd.associations.KeyDistributor.tunnelLost`).
    """

    closedLocally = "closed by the Key Distributor"
    log = Logger()
    silentPeer = "the Media Distributor"

    #: (identity, transport, text) of the last peerDescription().
    _description = None

    def __init__(self, distributor, authorise=None, *, maxPausedOctets: int | None = None,
                 maxPausedSeconds: float | None = None):
        """
        ``distributor`` is the KeyDistributor; its ``clock`` drives the
        timers and its ``limits`` give the backpressure bounds unless
        ``maxPausedOctets`` / ``maxPausedSeconds`` are given.  ``authorise``,
        if given, is called with the TLS transport once the handshake is done
        and returns ``(authorised, identity, reason)``.
        """
        self.distributor = distributor
        self._authorise = authorise
        self.clock = distributor.clock
        limits = distributor.limits
        self.maxPausedOctets = (limits.tunnel_max_paused_octets if maxPausedOctets is None
                                else maxPausedOctets)
        self.maxPausedSeconds = (limits.tunnel_max_paused_seconds if maxPausedSeconds is None
                                 else maxPausedSeconds)
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
        self.connectionStarted()
        # A peer that never says SupportedProfiles must not hold a
        # connection (and a TLS session) for ever.
        self._firstMessageTimer = self.clock.callLater(
            self.distributor.first_message_timeout, self._firstMessageTimedOut)

    def handshakeCompleted(self) -> None:
        if self._authorise is None or self._closing:
            return
        authorised, identity, reason = self._authorise(self.transport)
        self.identity = identity
        if not authorised:
            self.log.warn(
                "Refusing tunnel from {peer}: {reason}",
                peer=self.peerDescription(), reason=reason)
            self.abort("not authorised: " + reason, log=False)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connections.discard(self)
        self._cancelFirstMessageTimer()
        self.connectionEnded()
        if self._up:
            self._up = False
            why = self.closeReason
            if why is None and reason is not None and reason.check(SSL.Error):
                why = "TLS: " + tls.handshake_failure_reason(self.transport, reason.value)
            elif why is None:
                why = reason.getErrorMessage() if reason is not None else "connection lost"
            self.log.info(
                "Tunnel with {peer} closed: {why} ({associations} associations)",
                peer=self.peerDescription(), why=why, associations=len(self.associations))
            self.distributor.tunnelLost(self)
        elif not self._failed and reason is not None and reason.check(SSL.Error):
            # Refused during the TLS handshake (no client certificate, another
            # CA, an expired one): one line with OpenSSL's reason.
            self.log.warn("Refusing tunnel from {peer}: TLS handshake failed: {reason}",
                          peer=self.peerDescription(),
                          reason=tls.handshake_failure_reason(self.transport, reason.value))

    def holdsBackReading(self) -> bool:
        # Up means SupportedProfiles arrived: TLS is done.
        return self._up and not self._closing

    def sendMessage(self, message: wire.Message) -> bool:
        """
        Write one message; False (nothing written) once the tunnel is
        closing.  Aborts the tunnel when the backpressure bound is passed.
        """
        if self._closing:
            return False
        data = message.encode()
        self.transport.write(data)
        self.countWrite(len(data))
        return True

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
        elif isinstance(message, (wire.SupportedProfiles, wire.NewerSupportedProfiles)):
            if getattr(message, "profiles", None) != self.media_distributor_profiles:
                self.protocolError("SupportedProfiles changed the profile list or version "
                                   "during the connection")
        else:
            self.protocolError("{} is never sent by a Media Distributor".format(
                type(message).__name__))

    def _firstMessage(self, message: wire.Message) -> None:
        self._cancelFirstMessageTimer()
        if isinstance(message, wire.NewerSupportedProfiles):
            self.log.warn(
                "Tunnel with {peer} asked for version {version}; answering "
                "UnsupportedVersion({highest}) and closing",
                peer=self.peerDescription(), version=message.version,
                highest=wire.PROTOCOL_VERSION)
            self.sendMessage(wire.UnsupportedVersion(wire.PROTOCOL_VERSION))
            self.close("the Media Distributor asked for version {}".format(message.version))
            return
        if not isinstance(message, wire.SupportedProfiles):
            self.protocolError("first message must be SupportedProfiles, got {}".format(
                type(message).__name__))
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
            tunnel.close("Key Distributor stopping")

    def buildProtocol(self, addr):
        tunnel = KeyDistributorTunnel(self.distributor, self.authorise)
        tunnel.factory = self
        return tunnel
