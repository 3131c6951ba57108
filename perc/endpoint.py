"""
The reference PERC endpoint: a DTLS-SRTP client over UDP (extensions 56 and
39) that gets hop-by-hop keys by export and its conference's EKTKey from the
Key Distributor, sends double-encrypted synthetic media announcing its own
end-to-end key in EKT fields, and verifies everyone else's media end to end.

Usable as a library (tests, ``perc demo``) and as ``perc endpoint``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from perc import dtls, rtp
from perc.double import DoubleError, DoubleReceiver, DoubleSender, UnknownSenderError
from perc.ekt import EktCipher, EktError, EktKey, EktReceiver, EktSender

__all__ = ["DtlsClientProtocol", "ReferenceEndpoint", "SenderStats"]

#: Synthetic payload: magic, sender SSRC, sequence, send time (seconds).
_PAYLOAD = struct.Struct("!4sIId")
_MAGIC = b"PERC"


class DtlsClientProtocol(protocol.DatagramProtocol):
    """
    Drives a client-role :class:`perc.dtls.ClientAssociation` over UDP with
    timers on ``clock``.  Subclasses get ``handshakeComplete``,
    ``applicationData``, ``closed`` and ``mediaReceived`` (SRTP/SRTCP).
    """

    def __init__(self, association: dtls.ClientAssociation, server, clock):
        self.association = association
        self.server = server
        self.clock = clock
        self._timer = None

    def startProtocol(self):
        self._handle(self.association.start(self.clock.seconds()))

    def stopProtocol(self):
        self._cancelTimer()

    def datagramReceived(self, data, address):
        if address != self.server or not data:
            return
        kind = rtp.classify(data)
        if kind is rtp.Kind.DTLS:
            self._handle(self.association.receive(data, self.clock.seconds()))
        elif kind is rtp.Kind.RTP or kind is rtp.Kind.RTCP:
            self.mediaReceived(data, kind is rtp.Kind.RTCP)

    def sendApplicationData(self, data: bytes) -> None:
        self._handle(self.association.send_application_data(data))

    def _handle(self, output: dtls.Output) -> None:
        for datagram in output.datagrams:
            self.transport.write(datagram, self.server)
        for event in output.events:
            if isinstance(event, dtls.HandshakeComplete):
                self.handshakeComplete(event)
            elif isinstance(event, dtls.ApplicationData):
                self.applicationData(event.data)
            elif isinstance(event, dtls.Closed):
                self.closed(event)
        self._cancelTimer()
        due = self.association.next_timeout(self.clock.seconds())
        if due is not None:
            self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._fire)

    def _fire(self):
        self._timer = None
        self._handle(self.association.handle_timeout(self.clock.seconds()))

    def _cancelTimer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeComplete(self, event: dtls.HandshakeComplete) -> None:
        pass

    def applicationData(self, data: bytes) -> None:
        pass

    def closed(self, event: dtls.Closed) -> None:
        pass

    def mediaReceived(self, data: bytes, rtcp_packet: bool) -> None:
        pass


@dataclass
class SenderStats:
    """What one endpoint saw of one other sender (by SSRC)."""

    ssrc: int
    received: int = 0
    verified: int = 0
    failed: int = 0
    first_sequence: int | None = None
    highest_sequence: int | None = None
    jitter: float = 0.0
    _last_transit: float | None = field(default=None, repr=False)

    @property
    def lost(self) -> int:
        if self.first_sequence is None:
            return 0
        return max(0, self.highest_sequence - self.first_sequence + 1 - self.verified)

    def verifiedPacket(self, sequence: int, sent_at: float, now: float) -> None:
        self.verified += 1
        if self.first_sequence is None:
            self.first_sequence = self.highest_sequence = sequence
        else:
            self.highest_sequence = max(self.highest_sequence, sequence)
        # RFC 3550 section 6.4.1 interarrival jitter, in seconds.
        transit = now - sent_at
        if self._last_transit is not None:
            self.jitter += (abs(transit - self._last_transit) - self.jitter) / 16
        self._last_transit = transit


class ReferenceEndpoint(DtlsClientProtocol):
    """
    One PERC endpoint.  ``joined`` fires with the handshake time (seconds)
    once it has hop-by-hop keys and the EKTKey; ``failed`` (a Deferred) fires
    with the reason if the association ends before or while it runs.
    """

    log = Logger()

    def __init__(self, *, name: str, credentials: dtls.Credentials, tls_id: str, server,
                 profile, clock, expected_kd_tls_id: str | None = None,
                 expected_kd_fingerprint: str | None = None, rate: float = 50.0,
                 payload_size: int = 160, ssrc: int | None = None,
                 ekt_ciphers=(EktCipher.AESKW_128,)):
        association = dtls.ClientAssociation(
            credentials, [profile], tls_id=tls_id.encode("ascii"),
            expected_peer_tls_id=None if expected_kd_tls_id is None
            else expected_kd_tls_id.encode("ascii"),
            expected_peer_fingerprint=expected_kd_fingerprint,
            ekt_ciphers=tuple(int(c) for c in ekt_ciphers))
        super().__init__(association, server, clock)
        self.name = name
        self.profile = profile
        self.rate = rate
        self.payload_size = max(payload_size, _PAYLOAD.size)
        self.ssrc = ssrc if ssrc is not None else struct.unpack("!I", os.urandom(4))[0]
        self.joined = defer.Deferred()
        self.failed = defer.Deferred()
        self.stats: dict[int, SenderStats] = {}
        self.sent = 0
        self.undecodable = 0
        self.rekeys = 0
        self._sequence = 0
        self._started_at = None
        self._hbh = None
        self._cipher = None
        self._sender: DoubleSender | None = None
        self._ekt_sender: EktSender | None = None
        self._receiver: DoubleReceiver | None = None
        self._ekt_receiver: EktReceiver | None = None
        self._askForEktKey = None
        self._sending = task.LoopingCall(self.sendOne)
        self._sending.clock = clock

    # -- joining --------------------------------------------------------

    def startProtocol(self):
        self._started_at = self.clock.seconds()
        super().startProtocol()

    def handshakeComplete(self, event: dtls.HandshakeComplete) -> None:
        if event.ekt_cipher is None:
            self._fail("the Key Distributor did not negotiate EKT (extension 39)")
            return
        self._cipher = EktCipher(event.ekt_cipher)
        self._hbh = event.profile.hbh_keys(event.keys)
        self._receiver = DoubleReceiver(self.profile, self._hbh.server_key, self._hbh.server_salt)
        self._ekt_receiver = EktReceiver(self._cipher)
        self._askForEktKey = self.clock.callLater(self.EKT_KEY_RETRY, self._requestEktKey)

    #: The Key Distributor's EKTKey record is DTLS application data, which is
    #: never retransmitted: without it after this long, ask again.
    EKT_KEY_RETRY = 0.5
    EKT_KEY_REQUEST = b"\x01"

    def _requestEktKey(self) -> None:
        self._askForEktKey = None
        if self._ekt_sender is None and not self.failed.called:
            self.sendApplicationData(self.EKT_KEY_REQUEST)
            self._askForEktKey = self.clock.callLater(self.EKT_KEY_RETRY, self._requestEktKey)

    def applicationData(self, data: bytes) -> None:
        if self._cipher is None:
            return
        try:
            key = EktKey.decode(data, self._cipher)
        except EktError as error:
            self._fail("unusable EKTKey from the Key Distributor: {}".format(error.reason))
            return
        now = self.clock.seconds()
        if self._ekt_sender is not None and key.ekt_spi == self._ekt_sender.spi:
            # The same EKTKey again (we asked while it was on its way):
            # nothing changes.  A different key under the SPI in use would
            # break every receiver's view of us, so it is refused.
            if key != self._ekt_sender.ekt_key:
                self.log.warn("{name}: ignoring a different EKTKey under SPI {spi} in use",
                              name=self.name, spi=key.ekt_spi)
            return
        self._ekt_receiver.add_key(key, now)
        master_key = os.urandom(self.profile.key_length // 2)
        salt = key.srtp_master_salt[:self.profile.salt_length // 2]
        sequence_next = (self._sequence + 1) & 0xFFFF
        roc = 0 if self._sender is None else self._sender.roc(self.ssrc)
        if sequence_next == 0:
            roc += 1
        # A new EKTKey needs a new master key (RFC 8870 section 4.5); the new
        # sender continues the same sequence space.
        self._sender = DoubleSender(self.profile, master_key, salt, self._hbh.client_key,
                                    self._hbh.client_salt)
        self._sender.set_roc(self.ssrc, roc)
        if self._ekt_sender is None:
            self._stopAsking()
            self._ekt_sender = EktSender(key, self._cipher, self.ssrc, master_key,
                                         lambda: self._sender.roc(self.ssrc), received_at=now)
            if not self.joined.called:
                self.joined.callback(now - self._started_at)
        else:
            self._ekt_sender.rekey(key, master_key, now)
            self.rekeys += 1
        self.log.info("{name}: EKTKey SPI {spi} received", name=self.name, spi=key.ekt_spi)

    def closed(self, event: dtls.Closed) -> None:
        self._fail(event.reason)

    def stopProtocol(self):
        self._stopAsking()
        self.stopSending()
        super().stopProtocol()

    def _stopAsking(self) -> None:
        if self._askForEktKey is not None and self._askForEktKey.active():
            self._askForEktKey.cancel()
        self._askForEktKey = None

    def _fail(self, reason: str) -> None:
        self._stopAsking()
        self.stopSending()
        if not self.joined.called:
            self.joined.errback(RuntimeError(reason))
        if not self.failed.called:
            self.failed.callback(reason)

    # -- media ----------------------------------------------------------

    def startSending(self) -> None:
        if not self._sending.running:
            self._sending.start(1.0 / self.rate)

    def stopSending(self) -> None:
        if self._sending.running:
            self._sending.stop()

    def sendOne(self) -> None:
        now = self.clock.seconds()
        self._sequence = (self._sequence + 1) & 0xFFFF
        payload = _PAYLOAD.pack(_MAGIC, self.ssrc, self._sequence, now)
        payload += bytes(self.payload_size - len(payload))
        header = struct.pack("!BBHII", 0x80, 96, self._sequence,
                             (self._sequence * 160) & 0xFFFFFFFF, self.ssrc)
        wire = self._sender.protect(header + payload, ekt_field=self._ekt_sender.field(now))
        self.transport.write(wire, self.server)
        self.sent += 1

    def mediaReceived(self, data: bytes, rtcp_packet: bool) -> None:
        if rtcp_packet or self._receiver is None:
            return
        now = self.clock.seconds()
        try:
            srtp, ekt_field = rtp.split_ekt_field(data)
            ssrc = struct.unpack_from("!I", srtp, 8)[0]
        except (rtp.EktFieldError, struct.error):
            self.undecodable += 1
            return
        stats = self.stats.get(ssrc)
        if stats is None:
            stats = self.stats[ssrc] = SenderStats(ssrc)
        stats.received += 1
        # The EKT field first: it may carry the key this very packet needs.
        try:
            sender_key = self._ekt_receiver.process(ekt_field, ssrc, now)
        except EktError:
            sender_key = None
        if sender_key is not None:
            self._receiver.add_sender_key(
                ssrc, sender_key.master_key,
                sender_key.master_salt[:self.profile.salt_length // 2], roc=sender_key.roc)
        try:
            result = self._receiver.unprotect(srtp)
        except UnknownSenderError:
            # Not yet announced: a late joiner waits for the next FullEKTField.
            stats.received -= 1
            return
        except DoubleError:
            stats.failed += 1
            return
        try:
            magic, claimed_ssrc, sequence, sent_at = _PAYLOAD.unpack_from(result.media)
        except struct.error:
            magic = None
        if magic != _MAGIC or claimed_ssrc != ssrc or sequence != result.sequence:
            stats.failed += 1
            return
        stats.verifiedPacket(sequence, sent_at, now)

    @property
    def hbh_keys(self):
        """The hop-by-hop keys (what the Media Distributor also has); None before the handshake."""
        return self._hbh

    def summary(self) -> dict:
        return {
            "name": self.name, "ssrc": self.ssrc, "sent": self.sent, "rekeys": self.rekeys,
            "senders": {ssrc: {"received": s.received, "verified": s.verified,
                               "failed": s.failed, "lost": s.lost, "jitter_s": s.jitter}
                        for ssrc, s in self.stats.items()},
        }
