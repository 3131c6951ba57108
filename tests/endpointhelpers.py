"""
A test endpoint on a real UDP socket: a client-role DTLS engine driven by
the real reactor, then hop-by-hop SRTP with the keys it exported.
"""

from __future__ import annotations

import struct

import pylibsrtp
from twisted.internet import defer, protocol, reactor

from perc import dtls


def rtp_packet(ssrc: int, sequence: int, payload: bytes, payload_type: int = 96) -> bytes:
    return struct.pack("!BBHII", 0x80, payload_type, sequence, sequence * 160, ssrc) + payload


class UdpEndpoint(protocol.DatagramProtocol):
    """One endpoint: handshakes with whatever answers at ``server``, then does SRTP."""

    def __init__(self, association: dtls.ClientAssociation, server):
        self.association = association
        self.server = server
        self.handshake = defer.Deferred()
        self.media = defer.DeferredQueue()
        self.events = []
        self.outbound = self.inbound = None
        self._timer = None

    def startProtocol(self):
        self._handle(self.association.start(reactor.seconds()))

    def datagramReceived(self, data, address):
        if 20 <= data[0] <= 63:
            self._handle(self.association.receive(data, reactor.seconds()))
        elif 128 <= data[0] <= 191:
            self.media.put(data)

    def _handle(self, output):
        for datagram in output.datagrams:
            self.transport.write(datagram, self.server)
        for event in output.events:
            self.events.append(event)
            if isinstance(event, dtls.HandshakeComplete) and not self.handshake.called:
                self._keyed(event)
                self.handshake.callback(event)
            elif isinstance(event, dtls.Closed) and not self.handshake.called:
                self.handshake.errback(AssertionError("association closed: " + event.reason))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        due = self.association.next_timeout(reactor.seconds())
        if due is not None:
            self._timer = reactor.callLater(max(0.0, due - reactor.seconds()), self._fire)

    def _fire(self):
        self._timer = None
        self._handle(self.association.handle_timeout(reactor.seconds()))

    def _keyed(self, event: dtls.HandshakeComplete):
        hbh = event.profile.hbh_keys(event.keys)
        srtp_profile = event.profile.hbh_libsrtp_profile
        self.outbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh.client_key + hbh.client_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=srtp_profile))
        self.inbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh.server_key + hbh.server_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=srtp_profile))

    def send_rtp(self, packet: bytes) -> bytes:
        protected = self.outbound.protect(packet)
        self.transport.write(protected, self.server)
        return protected

    def send_rtcp(self, packet: bytes) -> bytes:
        protected = self.outbound.protect_rtcp(packet)
        self.transport.write(protected, self.server)
        return protected

    def stopProtocol(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
