"""
A hop-by-hop-only test endpoint on a real UDP socket: the reference
endpoint's DTLS driver, then plain outer-layer SRTP with the exported keys
(what the Media Distributor tests need to check forwarding byte for byte).
"""

from __future__ import annotations

import struct

import pylibsrtp
from twisted.internet import defer, reactor

from perc import dtls
from perc.endpoint import DtlsClientProtocol


def rtp_packet(ssrc: int, sequence: int, payload: bytes, payload_type: int = 96) -> bytes:
    return struct.pack("!BBHII", 0x80, payload_type, sequence, sequence * 160, ssrc) + payload


class UdpEndpoint(DtlsClientProtocol):
    """One endpoint: handshakes with whatever answers at ``server``, then does SRTP."""

    def __init__(self, association: dtls.ClientAssociation, server):
        super().__init__(association, server, reactor)
        self.handshake = defer.Deferred()
        self.media = defer.DeferredQueue()
        self.outbound = self.inbound = None

    def handshakeComplete(self, event: dtls.HandshakeComplete):
        hbh = event.profile.hbh_keys(event.keys)
        srtp_profile = event.profile.hbh_libsrtp_profile
        self.outbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh.client_key + hbh.client_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=srtp_profile))
        self.inbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh.server_key + hbh.server_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=srtp_profile))
        if not self.handshake.called:
            self.handshake.callback(event)

    def closed(self, event: dtls.Closed):
        if not self.handshake.called:
            self.handshake.errback(AssertionError("association closed: " + event.reason))

    def mediaReceived(self, data: bytes, rtcp_packet: bool):
        self.media.put(data)

    def send_rtp(self, packet: bytes) -> bytes:
        protected = self.outbound.protect(packet)
        self.transport.write(protected, self.server)
        return protected

    def send_rtcp(self, packet: bytes) -> bytes:
        protected = self.outbound.protect_rtcp(packet)
        self.transport.write(protected, self.server)
        return protected
