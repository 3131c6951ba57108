"""
The reference PERC endpoint: a DTLS-SRTP client over UDP (extensions 56 and
39) that gets hop-by-hop keys by export and its conference's EKTKey from the
Key Distributor, sends double-encrypted synthetic media announcing its own
end-to-end key in EKT fields (or bridges a local application's RTP: see
perc.rtpbridge), and verifies everyone else's media end to end.

Usable as a library (tests, ``perc demo``) and as ``perc endpoint``.

Faults (README, "The reference endpoint under faults"): a handshake that
times out is retried with a fresh ClientHello after an exponential backoff;
a refusal (the endpoint's own identity checks of the Key Distributor, or a
fatal alert from it) is final.  Once joined, the endpoint asks the Key
Distributor for the EKTKey every ``keepalive`` seconds; when no answer comes
back within ``keepalive_timeout`` (a restarted Media Distributor has
forgotten the association, a restarted Key Distributor no longer knows it)
it joins again, and keeps sending with its old keys until the new
association has its own.
"""

from __future__ import annotations

import collections
import os
import random
import struct
from dataclasses import dataclass, field

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from perc import dtls, rtp
from perc.rtpbridge import MAX_RTP_PACKET
from perc.double import (
    DoubleError,
    DoubleReceiver,
    DoubleSender,
    OuterAuthenticationError,
    ReplayError,
    SequenceReuseError,
    UnknownSenderError,
)
from perc.ekt import (
    EktCipher,
    EktError,
    EktFieldRejected,
    EktKey,
    EktReceiver,
    EktSender,
)

__all__ = ["DtlsClientProtocol", "ReferenceEndpoint", "SenderStats", "backoff"]

#: DTLS record content type of alerts (RFC 5246 section 6.2.1).
_CONTENT_ALERT = 21


def _holds_alert(datagram: bytes) -> bool:
    """True if any DTLS record in ``datagram`` is an alert (plaintext or not)."""
    return any(len(record) > 13 and record[0] == _CONTENT_ALERT
               for record in dtls.split_records(datagram))


def backoff(initial: float = 1.0, maximum: float = 30.0, factor: float = 2.0,
            rng: random.Random | None = None):
    """
    Seconds to wait before handshake attempt ``n + 1`` after ``n`` failed
    ones in a row: ``initial * factor ** n`` capped at ``maximum``, plus up
    to ``initial`` of jitter so that endpoints that lost the same server do
    not come back in step.  (Twisted's ``backoffPolicy``, as ClientService
    uses.)
    """
    uniform = (rng or random).uniform
    return backoffPolicy(initialDelay=initial, maxDelay=maximum, factor=factor,
                         jitter=lambda: uniform(0, initial))

#: Synthetic payload: magic, sender SSRC, sequence, send time (seconds).
_PAYLOAD = struct.Struct("!4sIId")
_MAGIC = b"PERC"


class DtlsClientProtocol(protocol.DatagramProtocol):
    """
    Drives a client-role :class:`perc.dtls.ClientAssociation` over UDP with
    timers on ``clock``.  Subclasses get ``handshakeComplete``,
    ``applicationData``, ``ektKeyReceived``, ``closed`` and ``mediaReceived``
    (SRTP/SRTCP).

    When ``closed`` runs, ``closedByAlert`` tells whether the datagram that
    ended the association held an alert record (the peer refused or closed
    it) rather than the association giving up on its own timer.
    """

    closedByAlert = False

    def __init__(self, association: dtls.ClientAssociation, server, clock):
        self.association = association
        self.server = server
        self.clock = clock
        self._timer = None

    def startProtocol(self):
        self._handle(self.association.start(self.clock.seconds()))

    def stopProtocol(self):
        self._cancelTimer()

    def startAssociation(self, association: dtls.ClientAssociation) -> None:
        """Abandon the current association (see :meth:`abandonAssociation`) and start this one."""
        self.abandonAssociation()
        self.association = association
        self._handle(association.start(self.clock.seconds()))

    def abandonAssociation(self) -> None:
        """
        End the current association here without a word to the peer (no
        close_notify): a path believed dead, or one being replaced while the
        old keys are still in use, must not be torn down from this side.
        """
        self._cancelTimer()
        self.association.close(self.clock.seconds(), "abandoned")

    def datagramReceived(self, data, address):
        if address != self.server or not data:
            return
        kind = rtp.classify(data)
        if kind is rtp.Kind.DTLS:
            self._handle(self.association.receive(data, self.clock.seconds()), data)
        elif kind is rtp.Kind.RTP or kind is rtp.Kind.RTCP:
            self.mediaReceived(data, kind is rtp.Kind.RTCP)

    def sendApplicationData(self, data: bytes) -> None:
        self._handle(self.association.send_application_data(data))

    def _handle(self, output: dtls.Output, received: bytes | None = None) -> None:
        association = self.association
        for datagram in output.datagrams:
            self.transport.write(datagram, self.server)
        for event in output.events:
            if isinstance(event, dtls.HandshakeComplete):
                self.handshakeComplete(event)
            elif isinstance(event, dtls.ApplicationData):
                self.applicationData(event.data)
            elif isinstance(event, dtls.EktKeyReceived):
                self.ektKeyReceived(event)
            elif isinstance(event, dtls.Closed):
                self.closedByAlert = received is not None and _holds_alert(received)
                self.closed(event)
        if self.association is not association:
            return  # a handler started another association, with its own timer
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

    def ektKeyReceived(self, event: dtls.EktKeyReceived) -> None:
        pass

    def closed(self, event: dtls.Closed) -> None:
        pass

    def mediaReceived(self, data: bytes, rtcp_packet: bool) -> None:
        pass


@dataclass
class SenderStats:
    """
    What one endpoint saw of one other sender (by SSRC).  ``received``
    counts packets that passed the hop-by-hop layer from a sender whose key
    was known; of those, ``verified`` passed the end-to-end layer,
    ``failed`` did not, and ``undecryptable`` did not while the sender was
    announcing an EKTKey this endpoint does not hold (yet): a new one after
    a Key Distributor restart, until this endpoint has joined again.
    """

    ssrc: int
    received: int = 0
    verified: int = 0
    failed: int = 0
    undecryptable: int = 0
    first_sequence: int | None = None
    highest_sequence: int | None = None
    jitter: float = 0.0
    _last_transit: float | None = field(default=None, repr=False)
    #: The sender's latest FullEKTField was under an EKTKey not held.
    awaiting_key: bool = field(default=False, repr=False)

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
    once it has hop-by-hop keys and the EKTKey for the first time;
    ``failed`` (a Deferred) fires with the reason when it gives up for good
    (``joined`` errbacks if that happens first).

    A handshake that does not complete within ``handshake_timeout`` is
    retried with a new ClientHello after ``retry_policy(n)`` seconds (``n``
    failed attempts in a row so far; default :func:`backoff`), for as
    long as the endpoint runs.  A refusal is final: the Key Distributor
    failing this endpoint's checks (wrong tls-id or certificate fingerprint,
    no EKT) or answering with a fatal alert.

    Liveness: every ``keepalive`` seconds (0 turns it off) the endpoint asks
    the Key Distributor for the EKTKey (application data 0x01, which the Key
    Distributor answers at a bounded rate), again every ``EKT_KEY_RETRY``
    seconds until an ekt_key message arrives; none within
    ``keepalive_timeout`` means the association is lost, and the endpoint
    joins again.  It does the same right after each handshake (the ekt_key
    message that follows the final flight may be lost more often than the
    Key Distributor retransmits it) and at once when a
    sender announces an EKTKey it does not hold.  During a rejoin, media
    keeps going out with the old keys; the new association's hop-by-hop keys
    replace them when its handshake completes, and the end-to-end key stays
    unless the EKTKey changed (a new one means a new master key, as for a
    rekey).

    EKTKey lifetime (RFC 8870 sections 4.5 and 5.2.2): a new EKTKey (new
    SPI) is usable for receiving at once, next to the previous one, each
    until its own TTL runs out (counted from its arrival).  The endpoint
    keeps protecting with the old key and master key until
    ``key_switch_delay`` seconds after the new key arrived, or until the old
    key expires, whichever comes first (the switch rule: every member gets
    the Key Distributor's new key at about the same time, so by then they
    all can read the new SPI).  It never protects with a key past its TTL:
    holding none, it sends nothing (``unsent_key_expired``), asks the Key
    Distributor for the key, and resumes when one arrives.
    """

    log = Logger()

    #: After the handshake, or after a liveness probe, ask again this often
    #: until an ekt_key message arrives.
    EKT_KEY_RETRY = 0.5
    EKT_KEY_REQUEST = b"\x01"
    #: Seconds a new EKTKey is held before this endpoint protects with it.
    KEY_SWITCH_DELAY = 0.5
    #: SSRCs one endpoint bridges from local applications (sendRtp).
    MAX_BRIDGED_SSRCS = 32

    def __init__(self, *, name: str, credentials: dtls.Credentials, tls_id: str, server,
                 profile, clock, expected_kd_tls_id: str | None = None,
                 expected_kd_fingerprint: str | None = None, rate: float = 50.0,
                 payload_size: int = 160, ssrc: int | None = None,
                 ekt_ciphers=(EktCipher.AESKW_128,), handshake_timeout: float = 10.0,
                 retry_policy=None, keepalive: float = 5.0,
                 keepalive_timeout: float = 5.0, key_switch_delay: float = KEY_SWITCH_DELAY):
        self._credentials = credentials
        self._tls_id = tls_id.encode("ascii")
        self._expected_kd_tls_id = (None if expected_kd_tls_id is None
                                    else expected_kd_tls_id.encode("ascii"))
        self._expected_kd_fingerprint = expected_kd_fingerprint
        self._ekt_ciphers = tuple(int(c) for c in ekt_ciphers)
        self.profile = profile
        self.handshake_timeout = handshake_timeout
        super().__init__(self._newAssociation(), server, clock)
        self.name = name
        self.rate = rate
        self.payload_size = max(payload_size, _PAYLOAD.size)
        self.ssrc = ssrc if ssrc is not None else struct.unpack("!I", os.urandom(4))[0]
        self.retry_policy = retry_policy if retry_policy is not None else backoff()
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.key_switch_delay = key_switch_delay
        self.joined = defer.Deferred()
        self.failed = defer.Deferred()
        self.stats: dict[int, SenderStats] = {}
        self.sent = 0
        self.undecodable = 0
        #: Packets that failed the hop-by-hop layer (not from our Media
        #: Distributor's current keys for us: stale around a rejoin, or forged).
        self.hop_failed = 0
        #: New EKTKeys (new SPI) received after the first one.
        self.rekeys = 0
        #: Handshakes completed (the first join and every rejoin).
        self.joins = 0
        #: FullEKTFields refused (RFC 8870 section 4.3.2), by
        #: :attr:`perc.ekt.EktFieldRejected.kind`; all but ``ssrc-mismatch``
        #: discarded their packet, as did ``unusable-key``.
        self.ekt_discarded: collections.Counter = collections.Counter()
        #: EKTKeys with TTL 0 received: expired on arrival, never used.
        self.expired_ekt_keys = 0
        #: Packets not sent because the EKTKey's TTL had run out.
        self.unsent_key_expired = 0
        #: Bridged packets (:meth:`sendRtp`, :meth:`sendRtcp`) not sent, by reason.
        self.refused: collections.Counter = collections.Counter()
        #: RTCP packets sent (hop-by-hop protected) and received (verified hop by hop).
        self.rtcp_sent = 0
        self.rtcp_received = 0
        #: Where verified media goes as plain RTP (the sender's header), and
        #: received RTCP after hop-by-hop unprotection; None: media is checked
        #: as this endpoint's synthetic payload, RTCP is dropped.
        self.media_sink = None
        self.rtcp_sink = None
        #: Handshakes started, retries included.
        self.attempts = 0
        #: Associations found lost by the liveness check.
        self.lost = 0
        #: Handshakes completed after the first one.
        self.rejoins = 0
        self._failures = 0  # failed attempts in a row
        self._retry = None
        self._keyed = False  # the current association has delivered an EKTKey
        self._handshaken = False  # the current association completed its handshake
        self._sequence = 0
        self._started_at = None
        self._hbh = None
        self._cipher = None
        self._sender: DoubleSender | None = None
        self._ekt_sender: EktSender | None = None
        #: The master key and EKTKey arrival the senders of bridged SSRCs use.
        self._master_key: bytes | None = None
        self._key_received_at: float | None = None
        #: EktSenders of the SSRCs bridged through :meth:`sendRtp` (RFC 8870
        #: ties a FullEKTField to one SSRC), bounded by MAX_BRIDGED_SSRCS.
        self._bridged: dict[int, EktSender] = {}
        self._oversize_logged: set[int] = set()
        self._receiver: DoubleReceiver | None = None
        self._ekt_receiver: EktReceiver | None = None
        #: A new EKTKey not yet protected with, when it arrived, and when
        #: the sender moves to it (see the class docstring).
        self._pending_key: tuple[EktKey, float] | None = None
        self._switch_at: float | None = None
        self._liveness = None  # the next probe or request
        self._asking_until = None  # asking for the EKTKey; lost at this time
        self._last_key_wanted = None
        self._sending = task.LoopingCall(self.sendOne)
        self._sending.clock = clock

    def _newAssociation(self) -> dtls.ClientAssociation:
        return dtls.ClientAssociation(
            self._credentials, [self.profile], tls_id=self._tls_id,
            expected_peer_tls_id=self._expected_kd_tls_id,
            expected_peer_fingerprint=self._expected_kd_fingerprint,
            ekt_ciphers=self._ekt_ciphers, handshake_timeout=self.handshake_timeout)

    # -- joining --------------------------------------------------------

    @property
    def keyed(self) -> bool:
        """True while the current association has its keys and has delivered an EKTKey."""
        return self._keyed

    def startProtocol(self):
        self._started_at = self.clock.seconds()
        self.attempts += 1
        super().startProtocol()

    def handshakeComplete(self, event: dtls.HandshakeComplete) -> None:
        if event.ekt_cipher is None:
            self._fail("the Key Distributor did not negotiate EKT (extension 39)")
            return
        self._failures = 0
        self._handshaken = True
        self.joins += 1
        cipher = EktCipher(event.ekt_cipher)
        hbh = event.profile.hbh_keys(event.keys)
        if self._hbh is not None:
            self.rejoins += 1
            self.log.info("{name}: joined again (attempt {attempt})", name=self.name,
                          attempt=self.attempts)
        self._hbh = hbh
        if self._receiver is None:
            self._receiver = DoubleReceiver(self.profile, hbh.server_key, hbh.server_salt)
        else:
            self._receiver.set_hop_by_hop(hbh.server_key, hbh.server_salt)
        if self._sender is not None:
            self._sender.set_hop_by_hop(hbh.client_key, hbh.client_salt)
        if cipher != self._cipher:
            # First join, or another EKT cipher: the EKT state starts afresh.
            self._cipher = cipher
            self._ekt_receiver = EktReceiver(
                cipher, master_key_length=self.profile.key_length // 2)
            self._ekt_sender = None
            self._bridged.clear()
            self._pending_key = self._switch_at = None
        self._startAsking(at_once=False)

    def _startAsking(self, at_once: bool) -> None:
        """
        Ask for the EKTKey (now if ``at_once``, else after EKT_KEY_RETRY)
        and every EKT_KEY_RETRY after that; without an ekt_key message within
        ``keepalive_timeout`` the association is lost.
        """
        self._stopLiveness()
        self._asking_until = self.clock.seconds() + self.keepalive_timeout
        if at_once:
            self._ask()
        else:
            self._liveness = self.clock.callLater(
                min(self.EKT_KEY_RETRY, self.keepalive_timeout), self._ask)

    def _ask(self) -> None:
        self._liveness = None
        now = self.clock.seconds()
        if now >= self._asking_until:
            self._associationLost("no ekt_key message from the Key Distributor within {} s".format(
                self.keepalive_timeout))
            return
        self.sendApplicationData(self.EKT_KEY_REQUEST)
        if not self.association.established:
            return  # the request ended it: closed() has taken over
        self._liveness = self.clock.callLater(
            min(self.EKT_KEY_RETRY, self._asking_until - now), self._ask)

    def _probeLater(self) -> None:
        self._stopLiveness()
        if self.keepalive > 0:
            self._liveness = self.clock.callLater(self.keepalive, self._startAsking, True)

    def _stopLiveness(self) -> None:
        if self._liveness is not None and self._liveness.active():
            self._liveness.cancel()
        self._liveness = None
        self._asking_until = None

    def _associationLost(self, reason: str) -> None:
        self.lost += 1
        self._keyed = False
        self.abandonAssociation()
        self._retryLater("association lost: " + reason)

    def ektKeyReceived(self, event: dtls.EktKeyReceived) -> None:
        """
        The Key Distributor's ekt_key message, already checked against the
        negotiated cipher and acknowledged by the engine (an unusable one
        ends the association with an alert and Closed(rejected=True)).
        """
        if self._cipher is None:
            return
        key = event.key
        if self._expiredOnArrival(key):
            return
        # An answer, new or repeated: the association reaches the Key
        # Distributor.
        self._keyed = True
        self._probeLater()
        if event.repeated:
            return  # a message_seq already processed: nothing new
        now = self.clock.seconds()
        known = self._heldKey(key.ekt_spi)
        if known is not None:
            # The same EKTKey again (an answer with the TTL it has left, or
            # a rejoin through a Key Distributor that kept it): nothing
            # changes.  A different key under an SPI in use would break
            # every receiver's view of us, so it is refused.
            if not known.same_key(key):
                self.log.warn("{name}: ignoring a different EKTKey under SPI {spi} in use",
                              name=self.name, spi=key.ekt_spi)
            return
        try:
            self._ekt_receiver.add_key(key, now)
        except EktError as error:
            # The previous key again, or another key under its SPI: never
            # taken back.
            self.log.warn("{name}: ignoring EKTKey SPI {spi}: {reason}", name=self.name,
                          spi=key.ekt_spi, reason=error.reason)
            return
        self.log.info("{name}: EKTKey SPI {spi} received", name=self.name, spi=key.ekt_spi)
        if self._ekt_sender is None:
            master_key = self._newSender(key)
            self._key_received_at = now
            self._ekt_sender = EktSender(key, self._cipher, self.ssrc, master_key,
                                         lambda: self._sender.roc(self.ssrc), received_at=now)
            if not self.joined.called:
                self.joined.callback(now - self._started_at)
            return
        self.rekeys += 1
        if self._pending_key is None:
            self._switch_at = min(now + self.key_switch_delay, self._ekt_sender.expires_at)
        # A newer key while one is pending replaces it (receivers keep only
        # one previous key), at the switch time already set.
        self._pending_key = (key, now)

    def _heldKey(self, spi: int) -> EktKey | None:
        """The EKTKey under ``spi`` this endpoint protects with or is about to, or None."""
        if self._ekt_sender is not None and spi == self._ekt_sender.spi:
            return self._ekt_sender.ekt_key
        if self._pending_key is not None and spi == self._pending_key[0].ekt_spi:
            return self._pending_key[0]
        return None

    def _newSender(self, key: EktKey) -> bytes:
        """
        A new end-to-end master key under ``key`` (RFC 8870 section 4.5: a
        new EKTKey needs one) and the DoubleSender for it, continuing the
        same sequence space; returns the master key.
        """
        master_key = os.urandom(self.profile.key_length // 2)
        salt = key.srtp_master_salt[:self.profile.salt_length // 2]
        sequence_next = (self._sequence + 1) & 0xFFFF
        old = self._sender
        roc = 0 if old is None else old.roc(self.ssrc)
        if sequence_next == 0:
            roc += 1
        self._sender = DoubleSender(self.profile, master_key, salt, self._hbh.client_key,
                                    self._hbh.client_salt)
        self._sender.set_roc(self.ssrc, roc)
        for ssrc in self._bridged:
            # Each bridged stream goes on with its ROC (announced with the
            # new master key; sender and receivers count on from it alike).
            self._sender.set_roc(ssrc, old.roc(ssrc))
        self._master_key = master_key
        return master_key

    def _switchKey(self) -> None:
        """Protect with the pending EKTKey from now on (its TTL counts from its arrival)."""
        key, received_at = self._pending_key
        self._pending_key = self._switch_at = None
        master_key = self._newSender(key)
        self._key_received_at = received_at
        self._ekt_sender.rekey(key, master_key, received_at)
        for ekt_sender in self._bridged.values():
            ekt_sender.rekey(key, master_key, received_at)
        self.log.info("{name}: now protecting under EKTKey SPI {spi}", name=self.name,
                      spi=key.ekt_spi)

    def _expiredOnArrival(self, key: EktKey) -> bool:
        """
        True for an EKTKey with TTL 0, which RFC 8870 makes expired on
        arrival (Linphone means "no limit" by it): counted, logged once, and
        not an answer, so the endpoint keeps asking for a usable key (and,
        none coming, joins again) while it protects with the one it has.
        """
        if key.ekt_ttl:
            return False
        self.expired_ekt_keys += 1
        if self.expired_ekt_keys == 1:
            self.log.warn("{name}: ignoring EKTKey SPI {spi} with TTL 0 (expired on arrival, "
                          "RFC 8870); asking for a usable one", name=self.name, spi=key.ekt_spi)
        return True

    def closed(self, event: dtls.Closed) -> None:
        self._stopLiveness()
        was_keyed, self._keyed = self._keyed, False
        if event.rejected or (self.closedByAlert and not self._handshaken):
            # Our own checks refused the Key Distributor, or it refused us
            # (a fatal alert during the handshake): trying again cannot help.
            self._fail(event.reason)
            return
        self._retryLater(("association ended: " if was_keyed else "") + event.reason)

    def _retryLater(self, reason: str) -> None:
        if self.failed.called or (self._retry is not None and self._retry.active()):
            return
        delay = self.retry_policy(self._failures)
        self._failures += 1
        self.log.warn("{name}: {reason}; new handshake in {delay:.2f} s (attempt {attempt})",
                      name=self.name, reason=reason, delay=delay, attempt=self.attempts + 1)
        self._retry = self.clock.callLater(delay, self._attempt)

    def _attempt(self) -> None:
        self._retry = None
        self.attempts += 1
        self._handshaken = False
        self.startAssociation(self._newAssociation())

    def stopProtocol(self):
        self._stopLiveness()
        self._cancelRetry()
        self.stopSending()
        super().stopProtocol()

    def _cancelRetry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _fail(self, reason: str) -> None:
        self._stopLiveness()
        self._cancelRetry()
        self.stopSending()
        self._keyed = False
        self.log.warn("{name}: giving up: {reason}", name=self.name, reason=reason)
        if not self.association.closed:
            self.abandonAssociation()
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
        if self._ekt_sender is None:
            return  # no EKTKey since the EKT cipher changed: nothing to announce with
        now = self.clock.seconds()
        if self._pending_key is not None and now >= self._switch_at:
            self._switchKey()
        if self._ekt_sender.expired(now):
            # Never protect under an EKTKey past its TTL (RFC 8870 5.2.2);
            # ask for the current one and go on when it comes.
            self.unsent_key_expired += 1
            self._keyWanted(now)
            return
        self._sequence = (self._sequence + 1) & 0xFFFF
        payload = _PAYLOAD.pack(_MAGIC, self.ssrc, self._sequence, now)
        payload += bytes(self.payload_size - len(payload))
        header = struct.pack("!BBHII", 0x80, 96, self._sequence,
                             (self._sequence * 160) & 0xFFFFFFFF, self.ssrc)
        wire = self._sender.protect(header + payload, ekt_field=self._ekt_sender.field(now))
        self.transport.write(wire, self.server)
        self.sent += 1

    def sendRtp(self, packet: bytes) -> bool:
        """
        Send a local application's RTP packet into the conference, its
        header as the application made it, double-encrypted with an EKT
        field for its SSRC (each SSRC announces the endpoint's master key
        in its own FullEKTFields).  True if sent; otherwise the reason is
        counted in ``refused`` (``oversize`` over :data:`MAX_RTP_PACKET`,
        logged once per SSRC; ``not-joined``, ``key-expired``,
        ``too-many-ssrcs``, ``malformed``, ``sequence-reuse``).
        """
        try:
            header = rtp.parse_rtp_header(packet)
        except rtp.RtpError:
            self.refused["malformed"] += 1
            return False
        ssrc = header.ssrc
        if len(packet) > MAX_RTP_PACKET:
            self.refused["oversize"] += 1
            if ssrc not in self._oversize_logged and \
                    len(self._oversize_logged) < self.MAX_BRIDGED_SSRCS:
                self._oversize_logged.add(ssrc)
                self.log.warn("{name}: refusing RTP packets over {limit} octets from SSRC "
                              "{ssrc:#010x} ({length} octets): the SRTP layers cannot carry "
                              "them (lower the application's packet size)", name=self.name,
                              limit=MAX_RTP_PACKET, ssrc=ssrc, length=len(packet))
            return False
        if self._ekt_sender is None or self.transport is None:
            self.refused["not-joined"] += 1
            return False
        now = self.clock.seconds()
        if self._pending_key is not None and now >= self._switch_at:
            self._switchKey()
        if self._ekt_sender.expired(now):
            self.refused["key-expired"] += 1
            self._keyWanted(now)
            return False
        ekt_sender = self._bridgedSender(ssrc)
        if ekt_sender is None:
            self.refused["too-many-ssrcs"] += 1
            return False
        try:
            wire = self._sender.protect(packet, ekt_field=ekt_sender.field(now))
        except SequenceReuseError:
            self.refused["sequence-reuse"] += 1
            return False
        except DoubleError:
            self.refused["malformed"] += 1
            return False
        self.transport.write(wire, self.server)
        self.sent += 1
        return True

    def _bridgedSender(self, ssrc: int) -> EktSender | None:
        """The EktSender of bridged ``ssrc`` (made on its first packet), or None when too many."""
        ekt_sender = self._bridged.get(ssrc)
        if ekt_sender is None:
            if len(self._bridged) >= self.MAX_BRIDGED_SSRCS:
                return None
            ekt_sender = self._bridged[ssrc] = EktSender(
                self._ekt_sender.ekt_key, self._cipher, ssrc, self._master_key,
                lambda: self._sender.roc(ssrc), received_at=self._key_received_at)
        return ekt_sender

    def sendRtcp(self, packet: bytes) -> bool:
        """
        Send a local application's RTCP compound packet, protected hop by
        hop only (SRTCP with the hop-by-hop key: RTCP is never end-to-end
        protected in PERC).  True if sent, else counted in ``refused``.
        """
        if self._sender is None or self.transport is None:
            self.refused["not-joined"] += 1
            return False
        if len(packet) > MAX_RTP_PACKET:
            self.refused["oversize"] += 1
            return False
        try:
            wire = self._sender.protect_rtcp(packet)
        except DoubleError:
            self.refused["malformed"] += 1
            return False
        self.transport.write(wire, self.server)
        self.rtcp_sent += 1
        return True

    def mediaReceived(self, data: bytes, rtcp_packet: bool) -> None:
        if rtcp_packet:
            self._rtcpReceived(data)
            return
        if self._receiver is None or self._ekt_receiver is None:
            return
        now = self.clock.seconds()
        try:
            srtp, ekt_field = rtp.split_ekt_field(data)
            ssrc = struct.unpack_from("!I", srtp, 8)[0]
        except (rtp.EktFieldError, struct.error):
            self.undecodable += 1
            return
        # The EKT field first (RFC 8870 section 4.3.2): it may carry the key
        # this very packet needs, and its failures may discard the packet.
        awaiting = None
        try:
            sender_key = self._ekt_receiver.process(ekt_field, ssrc, now)
        except EktFieldRejected as rejected:
            self.ekt_discarded[rejected.kind] += 1
            if rejected.kind == "unknown-spi":
                self._unheldSpi(ssrc, now)
            if rejected.discard_packet:
                return
            sender_key = None
        if sender_key is not None:
            try:
                self._receiver.add_sender_key(
                    ssrc, sender_key.master_key,
                    sender_key.master_salt[:self.profile.salt_length // 2], roc=sender_key.roc)
            except ValueError:
                # A salt the profile cannot use (the EKTKey's): abort EKT too.
                self.ekt_discarded["unusable-key"] += 1
                return
            awaiting = False
        try:
            result = self._receiver.unprotect(srtp)
        except UnknownSenderError:
            # Not yet announced: a late joiner waits for the next FullEKTField.
            return
        except OuterAuthenticationError:
            self.hop_failed += 1
            return
        except ReplayError as error:
            if error.layer == "outer":
                self.hop_failed += 1
                return
            result = None
        except DoubleError:
            result = None
        stats = self.stats.get(ssrc)
        if stats is None:
            stats = self.stats[ssrc] = SenderStats(ssrc)
        if awaiting is not None:
            stats.awaiting_key = awaiting
        stats.received += 1
        if result is None:
            if stats.awaiting_key:
                stats.undecryptable += 1
            else:
                stats.failed += 1
            return
        if self.media_sink is not None:
            # The inner tag authenticated the sender's header and payload.
            stats.verifiedPacket(result.sequence, now, now)
            self.media_sink(result.packet)
            return
        try:
            magic, claimed_ssrc, sequence, sent_at = _PAYLOAD.unpack_from(result.media)
        except struct.error:
            magic = None
        if magic != _MAGIC or claimed_ssrc != ssrc or sequence != result.sequence:
            stats.failed += 1
            return
        stats.verifiedPacket(sequence, sent_at, now)

    def _rtcpReceived(self, data: bytes) -> None:
        """RTCP from the Media Distributor: verified hop by hop, handed to ``rtcp_sink``."""
        if self.rtcp_sink is None or self._receiver is None:
            return
        try:
            packet = self._receiver.unprotect_rtcp(data)
        except DoubleError:
            self.hop_failed += 1
            return
        self.rtcp_received += 1
        self.rtcp_sink(packet)

    def _unheldSpi(self, ssrc: int, now: float) -> None:
        """
        ``ssrc`` announced its key under an EKTKey this endpoint does not
        hold.  Its packet is gone; what it sends meanwhile under that key
        counts as ``undecryptable``, not ``failed`` (for a sender already
        seen: no state for SSRCs never authenticated), and the endpoint asks
        for the EKTKey.
        """
        stats = self.stats.get(ssrc)
        if stats is not None:
            stats.awaiting_key = True
        self._keyWanted(now)

    def _keyWanted(self, now: float) -> None:
        """
        A sender announces an EKTKey this endpoint does not hold: a rekey
        whose record was lost, or a Key Distributor that restarted with a new
        one.  Ask now (the answer is the current EKTKey; no answer means the
        association is lost), at most once per ``keepalive_timeout`` so that
        forged fields cannot make it ask faster.
        """
        if not self._keyed or self._asking_until is not None:
            return
        if self._last_key_wanted is not None and \
                now - self._last_key_wanted < max(self.keepalive_timeout, self.EKT_KEY_RETRY):
            return
        self._last_key_wanted = now
        self._startAsking(at_once=True)

    @property
    def bridged_ssrcs(self) -> frozenset:
        """The SSRCs sent through :meth:`sendRtp` under the current EKT cipher."""
        return frozenset(self._bridged)

    @property
    def hbh_keys(self):
        """The hop-by-hop keys (what the Media Distributor also has); None before the handshake."""
        return self._hbh

    def summary(self) -> dict:
        return {
            "name": self.name, "ssrc": self.ssrc, "sent": self.sent, "joins": self.joins,
            "rekeys": self.rekeys,
            "attempts": self.attempts, "rejoins": self.rejoins, "lost": self.lost,
            "hop_failed": self.hop_failed,
            "ekt_discarded": dict(self.ekt_discarded),
            "ekt_ignored": 0 if self._ekt_receiver is None else self._ekt_receiver.ignored,
            "expired_ekt_keys": self.expired_ekt_keys,
            "unsent_key_expired": self.unsent_key_expired,
            "refused": dict(self.refused), "rtcp_sent": self.rtcp_sent,
            "rtcp_received": self.rtcp_received,
            "senders": {ssrc: {"received": s.received, "verified": s.verified,
                               "failed": s.failed, "undecryptable": s.undecryptable,
                               "lost": s.lost, "jitter_s": s.jitter}
                        for ssrc, s in self.stats.items()},
        }
