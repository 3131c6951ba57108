"""The association state machine, in the client role and the server role."""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from perc import pki
from perc.dtls import records
from perc.dtls.callbacks import (
    Refusal,
    SslState,
    check_profile,
    register,
    selected_profile_id,
    ssl_address,
    unregister,
)
from perc.dtls.constants import (
    ALERT_CLOSE_NOTIFY,
    ALERT_DECODE_ERROR,
    ALERT_ILLEGAL_PARAMETER,
    ALERT_LEVEL_FATAL,
    ALERT_LEVEL_WARNING,
    ALERT_UNEXPECTED_MESSAGE,
    CLIENT,
    CONTENT_ACK,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_RETRANSMISSIONS,
    DEFAULT_MTU,
    EXPORTER_LABEL,
    HANDSHAKE_EKT_KEY,
    HANDSHAKE_FINISHED,
    SERVER,
)
from perc.dtls.contexts import (
    check_mtu,
    context_for,
    error_text,
    new_connection,
    normalise_profiles,
)
from perc.dtls.datagrams import pack_records, split_records
from perc.dtls.events import (
    EMPTY,
    ApplicationData,
    Closed,
    DtlsStateError,
    EktKeyReceived,
    HandshakeComplete,
    Output,
)
from perc.dtls.extensions import (
    EXTERNAL_SESSION_ID,
    SUPPORTED_EKT_CIPHERS,
    ekt_cipher_value,
    encode_external_session_id,
    normalise_ekt_ciphers,
    validate_tls_id,
)
from perc.dtls.identity import Credentials
from perc.dtls.post_handshake import decode_ack, decode_handshake, encode_ack, encode_handshake
from perc.ekt import EktError, EktKey, encode_client_ekt_ciphers
from perc.profiles import Profile, by_id

_HANDSHAKING = "handshaking"
_ESTABLISHED = "established"
_CLOSED = "closed"

#: Peer records of a later epoch kept while OpenSSL runs the handshake, to
#: prime the own record layer's replay window (a Finished is ~60 octets).
_EARLY_RECORDS = 16
_EARLY_RECORD_OCTETS = 512
#: RFC 6347 section 4.2.4: the retransmission timer starts at 1 s and
#: doubles, up to 60 s.
_RETRANSMIT_INITIAL = 1.0
_RETRANSMIT_MAX = 60.0
#: Record numbers remembered for the ekt_key message awaiting its ACK.
_EKT_RECORDS_KEPT = 32


class DtlsAssociation:
    """
    One DTLS association; use :class:`ClientAssociation` or get a
    :class:`ServerAssociation` from :meth:`ServerListener.listen`.

    Every method returns an :class:`Output` (or a plain value) and never
    raises because of what the peer sent.  After :class:`Closed` has been
    emitted every method is a harmless no-op returning an empty Output.
    Not thread-safe: drive an association from one thread (the reactor).
    """

    role: str = ""
    #: Leave OpenSSL for perc.dtls.records once established (cleared once tried).
    _compact_when_established = False

    def __init__(self, *, context: SSL.Context, connection: SSL.Connection,
                 state: SslState, profiles: tuple, mtu: int,
                 max_retransmissions: int, handshake_timeout: float) -> None:
        if max_retransmissions < 0:
            raise ValueError("max_retransmissions must be >= 0")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self._context = context
        self._conn = connection
        self._state = state
        self._profiles = profiles
        self._mtu = mtu
        self._max_retransmissions = max_retransmissions
        self._handshake_timeout = float(handshake_timeout)
        self._phase = _HANDSHAKING
        self._started = False
        self._started_at: Optional[float] = None
        self._retransmissions = 0
        self._events: list = []
        self._closing: Optional[Closed] = None
        self.profile: Optional[Profile] = None
        # Set once an established association has left OpenSSL (see
        # _compact): its record protection and the final flight to
        # repeat if the peer shows it never got it.
        self._records: Optional[records.RecordProtection] = None
        self._final_flight: tuple = ()
        self._final_flight_resends = 0
        # While on OpenSSL: this side's latest epoch and next sequence number
        # there (a retransmitted Finished flight uses several), and the
        # peer's records of a later epoch (see records.RecordProtection.prime).
        self._write_epoch: Optional[int] = None
        self._next_write_sequence = 0
        self._early_records: list = []
        # Server role, on the own record layer: the ekt_key message (RFC 8870
        # section 5.2.2) and its retransmission until the ACK.
        self._next_message_seq: Optional[int] = None
        self._ekt_message: Optional[bytes] = None
        self._ekt_records: list = []  # sequence numbers of the records carrying it
        self._ekt_due: Optional[float] = None  # None: nothing awaits an ACK
        self._ekt_timeout = _RETRANSMIT_INITIAL
        self._ekt_tries = 0
        # Client role: the last ekt_key message processed.
        self._ekt_key: Optional[EktKey] = None
        self._ekt_message_seq = -1
        address = ssl_address(connection._ssl)
        token = register(connection._ssl, state)
        # Runs when the association is closed or garbage collected, whichever
        # comes first; it holds nothing that refers back to the association.
        self._finalizer = weakref.finalize(self, unregister, address, token)

    # -- public state ------------------------------------------------------

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def closed(self) -> bool:
        """True once Closed has been emitted (or is being emitted)."""
        return self._phase == _CLOSED or self._closing is not None

    @property
    def established(self) -> bool:
        """True between HandshakeComplete and Closed."""
        return self._phase == _ESTABLISHED and self._closing is None

    @property
    def peer_tls_id(self) -> Optional[bytes]:
        return self._state.peer_tls_id

    @property
    def peer_fingerprint(self) -> Optional[str]:
        return self._state.peer_fingerprint

    @property
    def ekt_cipher(self) -> Optional[int]:
        """The EKT cipher the ServerHello selected (as in HandshakeComplete), or None."""
        value = self._state.ekt_cipher
        return None if value is None else ekt_cipher_value(value)

    @property
    def retransmissions(self) -> int:
        """Handshake flights retransmitted because of timeouts so far."""
        return self._retransmissions

    @property
    def compacted(self) -> bool:
        """True once the association runs on its own record layer, without OpenSSL."""
        return self._records is not None

    # -- driving -----------------------------------------------------------

    def start(self, now: float) -> Output:
        """
        Client role: returns the ClientHello.  Server role: processes the
        ClientHello that listen() accepted (the identity hook's hello stage
        runs here) and returns the server's flight.  Later calls, and calls
        after receive(), do nothing.
        """
        if self._started or self.closed:
            return EMPTY
        self._started = True
        self._mark_started(now)
        try:
            _lib.ERR_clear_error()
            self._drive()
        except Exception as e:
            self._fail("internal error: {}: {}".format(type(e).__name__, e))
        return self._collect()

    def receive(self, datagram: bytes, now: float) -> Output:
        """
        Feed one datagram (one or more DTLS records).  Junk that DTLS
        discards is ignored; a fatal condition ends in Closed.
        """
        if self.closed or not datagram:
            return EMPTY
        if self._records is not None:
            return self._receive_compacted(datagram)
        self._started = True
        self._mark_started(now)
        if not self._compact_when_established or self._phase == _ESTABLISHED:
            self._feed(datagram)
            return self._collect()
        # One record at a time: the records after the one that completes the
        # handshake (an ekt_key message, say) are for the own record layer.
        pieces = split_records(bytes(datagram))
        for index, piece in enumerate(pieces):
            self._remember_early_record(piece)
            self._feed(piece)
            if self.closed:
                break
            if self._phase == _ESTABLISHED:
                self._compact_when_established = False
                output = self._collect()
                self._compact(output)
                if self._records is None:  # kept on OpenSSL
                    self._read_application_data()
                    output = _joined(output, self._collect())
                rest = b"".join(pieces[index + 1:])
                return _joined(output, self.receive(rest, now)) if rest else output
        return self._collect()

    def _feed(self, data: bytes) -> None:
        try:
            _lib.ERR_clear_error()
            self._conn.bio_write(bytes(data))
            self._drive()
        except Exception as e:  # never let the peer's bytes raise out of here
            self._fail("internal error: {}: {}".format(type(e).__name__, e))

    def _remember_early_record(self, record: bytes) -> None:
        header = records.record_epoch_and_sequence(record)
        if header is not None and header[0] > 0 and len(record) <= _EARLY_RECORD_OCTETS \
                and len(self._early_records) < _EARLY_RECORDS:
            self._early_records.append(bytes(record))

    def next_timeout(self, now: float) -> Optional[float]:
        """
        Absolute time (caller's clock) at which :meth:`handle_timeout` should
        be called, or None if no timer is running.
        """
        if self.closed:
            return None
        if self._records is not None:
            return self._ekt_due
        deadline = None
        if self._phase == _HANDSHAKING and self._started_at is not None:
            deadline = self._started_at + self._handshake_timeout
        try:
            remaining = self._conn.DTLSv1_get_timeout()
        except Exception:
            remaining = None
        if remaining is not None:
            at = now + max(0.0, remaining)
            deadline = at if deadline is None else min(deadline, at)
        return deadline

    def handle_timeout(self, now: float) -> Output:
        """
        Retransmit if OpenSSL's timer expired; give up (Closed) once the
        retransmission or total-time bound is exceeded.  Calling it early
        does nothing.
        """
        if self.closed:
            return EMPTY
        if self._records is not None:
            return self._retransmit_ekt_key(now)
        handshaking = self._phase == _HANDSHAKING
        if handshaking and self._started_at is not None and \
                now - self._started_at >= self._handshake_timeout:
            self._fail("handshake gave up: not complete after {:g} s ({} retransmissions)".format(
                self._handshake_timeout, self._retransmissions))
            return self._collect()
        try:
            remaining = self._conn.DTLSv1_get_timeout()
        except Exception:
            remaining = None
        if remaining is None or remaining > 0:
            return EMPTY
        if handshaking and self._retransmissions >= self._max_retransmissions:
            self._fail("handshake gave up: no answer after {} retransmissions".format(
                self._retransmissions))
            return self._collect()
        try:
            _lib.ERR_clear_error()
            if self._conn.DTLSv1_handle_timeout() and handshaking:
                self._retransmissions += 1
        except SSL.Error as e:
            self._fail_from_error(e)
        except Exception as e:
            self._fail("internal error: {}: {}".format(type(e).__name__, e))
        return self._collect()

    def send_application_data(self, data: bytes) -> Output:
        """
        Send ``data`` as one application-data record.  Only after
        HandshakeComplete (DtlsStateError before); a no-op after Closed.
        Raises ValueError if the record would not fit the MTU.
        """
        if self.closed:
            return EMPTY
        if self._phase != _ESTABLISHED:
            raise DtlsStateError("application data before the handshake completed")
        if self._records is not None:
            limit = self._records.max_plaintext(self._mtu)  # 2^14 at most
            if len(data) > limit:
                raise ValueError("{} octets do not fit one record under MTU {} (limit {})".format(
                    len(data), self._mtu, limit))
            return self._send_compacted(records.CONTENT_APPLICATION_DATA, data) \
                if data else EMPTY
        limit = min(self._conn.get_cleartext_mtu(), records.MAX_PLAINTEXT)
        if len(data) > limit:
            raise ValueError("{} octets do not fit one record under MTU {} (limit {})".format(
                len(data), self._mtu, limit))
        if not data:
            return EMPTY
        try:
            _lib.ERR_clear_error()
            self._conn.send(bytes(data))
        except SSL.Error as e:
            self._fail_from_error(e)
        return self._collect()

    def send_ekt_key(self, key: EktKey, now: float) -> Output:
        """
        Server role: send ``key`` as RFC 8870's ``ekt_key`` handshake message
        (type 26, epoch 1) and retransmit it from :meth:`handle_timeout`
        (RFC 6347 section 4.2.4: after 1 s, doubling, at most
        ``max_retransmissions`` times) until the client's ACK or an alert
        arrives.  The same key as the last message sends that message again
        (same message_seq, new record); another key is a new message.  Needs
        the own record layer (an AEAD suite): without it the association is
        closed.  Only after HandshakeComplete (DtlsStateError before); a
        no-op after Closed.
        """
        if self.closed:
            return EMPTY
        if self._phase != _ESTABLISHED or self.role != SERVER:
            raise DtlsStateError("ekt_key is sent by an established server association")
        if self._records is None:
            return self.close(now, "cannot send the ekt_key message: the association "
                                   "is not on the own record layer (no AEAD cipher suite)")
        body = key.encode()
        if self._ekt_message is None or self._ekt_message[12:] != body:
            if self._next_message_seq > 0xFFFF:
                return self._close_compacted(Closed(
                    "association failed: handshake message_seq exhausted", False))
            self._ekt_message = encode_handshake(HANDSHAKE_EKT_KEY, self._next_message_seq,
                                                 body)
            self._next_message_seq += 1
            self._ekt_records = []
        self._ekt_timeout = _RETRANSMIT_INITIAL
        self._ekt_tries = 0
        self._ekt_due = now + self._ekt_timeout
        return self._send_ekt_message()

    @property
    def ekt_key_acknowledged(self) -> bool:
        """Server role: True when no ekt_key message awaits the client's ACK."""
        return self._ekt_due is None

    def close(self, now: float, reason: str = "closed locally") -> Output:
        """
        End the association: send close_notify if the handshake completed
        (OpenSSL cannot send one mid-handshake) and emit Closed(reason).
        """
        if self.closed:
            return EMPTY
        if self._records is not None:
            return self._close_compacted(Closed(reason, False))
        if self._phase == _ESTABLISHED:
            try:
                _lib.ERR_clear_error()
                self._conn.shutdown()
            except Exception:
                pass
        self._end(Closed(reason, False))
        return self._collect()

    # -- internals ---------------------------------------------------------

    def _mark_started(self, now: float) -> None:
        if self._started_at is None:
            self._started_at = now

    def _drive(self) -> None:
        if self._phase == _HANDSHAKING:
            try:
                self._conn.do_handshake()
            except SSL.WantReadError:
                return
            except SSL.Error as e:
                self._fail_from_error(e)
                return
            self._handshake_done()
        if self._phase == _ESTABLISHED and self._closing is None and \
                not self._compact_when_established:
            self._read_application_data()

    def _read_application_data(self) -> None:
        while True:
            try:
                data = self._conn.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                try:
                    # Answer close_notify with our own, as TLS asks.
                    self._conn.shutdown()
                except Exception:
                    pass
                self._end(Closed("peer closed the association (close_notify)", False))
                return
            except SSL.Error as e:
                self._fail_from_error(e)
                return
            if data:
                self._events.append(ApplicationData(data))

    def _handshake_done(self) -> None:
        state = self._state
        try:
            if state.failure is not None:
                raise state.failure
            if self._conn.get_protocol_version_name() != "DTLSv1.2":
                raise Refusal("negotiated {} instead of DTLS 1.2".format(
                    self._conn.get_protocol_version_name()), False, 0, 0)
            check_profile(self._conn._ssl, state)
            profile = by_id(selected_profile_id(self._conn._ssl))
            # Fail closed if, for any reason, the certificate never went
            # through our checks or is not the one OpenSSL kept.
            certificate = self._conn.get_peer_certificate(as_cryptography=True)
            if certificate is None or not state.certificate_verdict:
                raise Refusal("peer certificate was not checked", False, 0, 0)
            if pki.fingerprint(certificate) != state.peer_fingerprint:
                raise Refusal("peer certificate changed during the handshake", False, 0, 0)
            if state.role == SERVER and not state.hello_done:
                raise Refusal("identity was not checked", False, 0, 0)
            material = self._conn.export_keying_material(
                EXPORTER_LABEL, profile.keying_material_length)
            keys = profile.split(material)
        except Refusal as refusal:
            # Withhold whatever OpenSSL just wrote (for the server: its final
            # flight), so the peer never completes; tell it we are done.
            self._discard_output()
            try:
                self._conn.shutdown()
            except Exception:
                pass
            self._end(Closed(refusal.reason, refusal.rejected))
            return
        self.profile = profile
        self._phase = _ESTABLISHED
        self._events.append(HandshakeComplete(
            profile=profile,
            keys=keys,
            peer_fingerprint=state.peer_fingerprint,
            peer_tls_id=state.peer_tls_id,
            ekt_cipher=None if state.ekt_cipher is None else ekt_cipher_value(state.ekt_cipher),
        ))

    def _fail_from_error(self, error: Exception) -> None:
        failure = self._state.failure
        if failure is not None:
            self._end(Closed(failure.reason, failure.rejected))
            return
        text = error_text(error)
        prefix = "handshake failed" if self._phase == _HANDSHAKING else "association failed"
        self._end(Closed("{}: {}".format(prefix, text), False))

    def _fail(self, reason: str) -> None:
        self._end(Closed(reason, False))

    def _end(self, event: Closed) -> None:
        if self._closing is None:
            self._closing = event

    def _discard_output(self) -> None:
        self._read_bio()

    def _read_bio(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self._conn.bio_read(65536)
            except SSL.WantReadError:
                break
            except Exception:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _collect(self) -> Output:
        data = self._read_bio() if self._conn is not None else b""
        written = split_records(data) if data else ()
        for record in written:
            header = records.record_epoch_and_sequence(record)
            if header is not None and header[0] > 0:
                self._write_epoch = header[0]
                self._next_write_sequence = max(self._next_write_sequence, header[1] + 1)
        datagrams = tuple(pack_records(written, self._mtu)) if written else ()
        events = self._events
        self._events = []
        if self._closing is not None and self._phase != _CLOSED:
            events.append(self._closing)
            self._release()
        return Output(datagrams, tuple(events))

    def _release(self) -> None:
        self._phase = _CLOSED
        self._finalizer()
        # Dropping the connection frees the SSL object (and its keys) now
        # rather than whenever the association itself goes away.
        self._conn = None
        self._context = None

    # -- after the handshake, without OpenSSL (server role) ----------------

    def _compact(self, output: Output) -> None:
        """
        Hand the just-established association to perc.dtls.records and free the
        OpenSSL connection (about 80 KiB that would otherwise stay for the
        association's life).  Kept on OpenSSL: suites perc.dtls.records does not
        handle, and anything unexpected about the final flight.
        """
        conn = self._conn
        suite = records.suite_for(conn.get_cipher_name())
        if suite is None or self._write_epoch is None:
            return
        server = self.role == SERVER
        secrets = dict(master_secret=conn.master_key(), client_random=conn.client_random(),
                       server_random=conn.server_random(), epoch=self._write_epoch)
        try:
            protection = records.RecordProtection.from_master_secret(
                suite, server=server, next_write_sequence=self._next_write_sequence, **secrets)
            if server:
                # The ekt_key message continues this side's message_seq:
                # read it back from our Finished, with the client's keys.
                mirror = records.RecordProtection.from_master_secret(
                    suite, server=False, next_write_sequence=0, **secrets)
                finished = _finished_message_seq(mirror, output.datagrams)
                if finished is None:
                    return
                self._next_message_seq = finished + 1
        except Exception:
            return
        # Every peer record of this epoch seen so far (its Finished, perhaps
        # an earlier copy of it) enters the replay window.
        protection.prime(self._early_records)
        self._early_records = []
        self._records = protection
        if server:
            self._final_flight = output.datagrams
        state = self._state
        state.peer_certificate = None
        state.received = {}
        state.send = {}
        self._finalizer()
        self._conn = None
        self._context = None

    def _receive_compacted(self, datagram: bytes) -> Output:
        replies: list = []
        try:
            for record in split_records(bytes(datagram)):
                opened = self._records.open(record)
                if opened is None:
                    continue  # other epoch, forged, replayed: DTLS discards it
                content_type, plaintext = opened
                if content_type == records.CONTENT_APPLICATION_DATA:
                    if plaintext:
                        self._events.append(ApplicationData(plaintext))
                elif content_type == records.CONTENT_ALERT:
                    self._ekt_due = None  # an alert also ends the ekt_key's retransmission
                    output = self._alert_received(plaintext)
                    if output is not None:
                        return output
                elif content_type == CONTENT_ACK and self.role == SERVER:
                    self._ack_received(plaintext)
                elif content_type == records.CONTENT_HANDSHAKE and self.role == SERVER:
                    if plaintext[:1] == bytes((HANDSHAKE_FINISHED,)) and \
                            self._final_flight_resends < self._max_retransmissions:
                        # The peer's retransmitted Finished: it never got ours.
                        self._final_flight_resends += 1
                        replies.extend(self._final_flight)
                elif content_type == records.CONTENT_HANDSHAKE:
                    outcome = self._handshake_message_received(record, plaintext)
                    if isinstance(outcome, Output):
                        return _joined(Output(tuple(replies)), outcome)
                    if outcome is not None:
                        replies.append(outcome)
                # Anything else (a renegotiation attempt) is ignored, as
                # OP_NO_RENEGOTIATION would have it.
        except Exception as e:  # never let the peer's bytes raise out of here
            return self._close_compacted(
                Closed("internal error: {}: {}".format(type(e).__name__, e), False),
                notify=False)
        return self._collect_with(tuple(replies))

    def _handshake_message_received(self, record: bytes, plaintext: bytes):
        """
        Client role: an ekt_key message gets an ACK record (returned) and
        an EktKeyReceived event, a repeated one (message_seq already
        processed) the ACK only, one that cannot be processed a fatal alert
        (an Output: the association ends).  Other messages (the server's
        Finished again, a HelloRequest) are ignored.
        """
        decoded = decode_handshake(plaintext)
        if decoded is None or decoded[0] != HANDSHAKE_EKT_KEY:
            return None
        _, message_seq, message = decoded
        cipher = self._state.ekt_cipher
        if cipher is None:
            return self._refuse_ekt_key(ALERT_UNEXPECTED_MESSAGE, "EKT was not negotiated")
        if self._ekt_key is not None and message_seq <= self._ekt_message_seq:
            self._events.append(EktKeyReceived(self._ekt_key, message_seq, repeated=True))
            return self._ack(record)
        if message is None:
            return self._refuse_ekt_key(ALERT_DECODE_ERROR, "fragmented or padded message")
        try:
            key = EktKey.decode(message.body)
        except EktError as error:
            return self._refuse_ekt_key(ALERT_DECODE_ERROR, error.reason)
        try:
            key.check_cipher(ekt_cipher_value(cipher))
        except (EktError, ValueError) as error:
            return self._refuse_ekt_key(ALERT_ILLEGAL_PARAMETER, getattr(error, "reason", error))
        self._ekt_key = key
        self._ekt_message_seq = message_seq
        self._events.append(EktKeyReceived(key, message_seq))
        return self._ack(record)

    def _ack(self, record: bytes) -> bytes:
        """An ACK record (RFC 9147 section 7) for the record carrying a handshake message."""
        return self._records.seal(CONTENT_ACK, encode_ack(
            (records.record_epoch_and_sequence(record),)))

    def _refuse_ekt_key(self, description: int, why) -> Output:
        """RFC 8870 section 5.2.2: an EKTKey that cannot be processed gets an alert."""
        return self._close_compacted(
            Closed("unusable ekt_key message from the peer: {}".format(why), True),
            alert=(ALERT_LEVEL_FATAL, description))

    def _ack_received(self, plaintext: bytes) -> None:
        numbers = decode_ack(plaintext)
        if numbers and self._ekt_due is not None and any(
                epoch == self._records.epoch and sequence in self._ekt_records
                for epoch, sequence in numbers):
            self._ekt_due = None

    def _send_ekt_message(self) -> Output:
        try:
            record = self._records.seal(records.CONTENT_HANDSHAKE, self._ekt_message)
        except OverflowError as e:
            return self._close_compacted(Closed("association failed: {}".format(e), False),
                                         notify=False)
        if len(self._ekt_records) >= _EKT_RECORDS_KEPT:
            del self._ekt_records[0]
        self._ekt_records.append(records.record_epoch_and_sequence(record)[1])
        return self._collect_with((record,))

    def _retransmit_ekt_key(self, now: float) -> Output:
        if self._ekt_due is None or now < self._ekt_due:
            return EMPTY
        if self._ekt_tries >= self._max_retransmissions:
            # Given up; the client can still ask for it (application data).
            self._ekt_due = None
            return EMPTY
        self._ekt_tries += 1
        self._ekt_timeout = min(2 * self._ekt_timeout, _RETRANSMIT_MAX)
        self._ekt_due = now + self._ekt_timeout
        return self._send_ekt_message()

    def _alert_received(self, plaintext: bytes) -> Optional[Output]:
        if len(plaintext) != 2:
            return self._close_compacted(Closed("association failed: malformed alert", False),
                                         notify=False)
        level, description = plaintext
        if description == ALERT_CLOSE_NOTIFY:
            # Answer close_notify with our own, as TLS asks.
            return self._close_compacted(
                Closed("peer closed the association (close_notify)", False))
        if level == ALERT_LEVEL_FATAL:
            return self._close_compacted(Closed(
                "association failed: peer sent fatal alert {}".format(description), False),
                notify=False)
        return None

    def _send_compacted(self, content_type: int, plaintext: bytes) -> Output:
        try:
            record = self._records.seal(content_type, plaintext)
        except OverflowError as e:
            return self._close_compacted(Closed("association failed: {}".format(e), False),
                                         notify=False)
        return self._collect_with((record,))

    def _close_compacted(self, event: Closed, notify: bool = True,
                         alert: tuple = (ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY)) -> Output:
        datagrams = ()
        if notify:
            try:
                datagrams = (self._records.seal(records.CONTENT_ALERT, bytes(alert)),)
            except OverflowError:
                pass
        self._end(event)
        self._records = None
        self._final_flight = ()
        self._ekt_message = None
        self._ekt_due = None
        return self._collect_with(datagrams)

    def _collect_with(self, datagrams: tuple) -> Output:
        """:meth:`_collect`, after ``datagrams`` sealed here rather than by OpenSSL."""
        output = self._collect()
        return Output(tuple(datagrams) + output.datagrams, output.events)


class ClientAssociation(DtlsAssociation):
    """
    The endpoint side: a DTLS client offering ``profiles`` (in order of
    preference), sending ``tls_id`` in extension 56 if given, and checking
    the server against ``expected_peer_fingerprint`` (``"sha-256 AB:..."``,
    RFC 5763/8122) and ``expected_peer_tls_id`` when they are not None.
    ``credentials`` may be None only to test a server's refusal.

    ``ekt_ciphers`` (EKT cipher values, most preferred first) is offered
    in extension 39 (supported_ekt_ciphers); None offers no EKT.  A server
    selecting a cipher that was not offered is rejected
    (Closed(rejected=True)); HandshakeComplete.ekt_cipher tells what it
    selected.

    ``compact`` (default True): once established with an AEAD suite, leave
    OpenSSL for the own record layer, as the server role does; only then
    can the association read RFC 8870's ``ekt_key`` message
    (:class:`EktKeyReceived`), which it acknowledges.

    Call :meth:`start` to get the first flight.
    """

    role = CLIENT

    def __init__(self, credentials: Optional[Credentials], profiles: Iterable[Profile], *,
                 tls_id: Optional[bytes] = None,
                 expected_peer_tls_id: Optional[bytes] = None,
                 expected_peer_fingerprint: Optional[str] = None,
                 ekt_ciphers: Optional[Iterable[int]] = None,
                 mtu: int = DEFAULT_MTU,
                 max_retransmissions: int = DEFAULT_MAX_RETRANSMISSIONS,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 compact: bool = True) -> None:
        profiles = normalise_profiles(profiles)
        check_mtu(mtu)
        state = SslState(CLIENT)
        state.allowed_profile_ids = frozenset(p.id for p in profiles)
        if tls_id is not None:
            state.send[EXTERNAL_SESSION_ID.ext_type] = encode_external_session_id(tls_id)
        state.ekt_ciphers = normalise_ekt_ciphers(ekt_ciphers)
        if state.ekt_ciphers is not None:
            state.send[SUPPORTED_EKT_CIPHERS.ext_type] = encode_client_ekt_ciphers(
                state.ekt_ciphers)
        if expected_peer_tls_id is not None:
            state.expected_peer_tls_id = validate_tls_id(expected_peer_tls_id)
        if expected_peer_fingerprint is not None:
            state.expected_peer_fingerprint = pki.normalise_fingerprint(expected_peer_fingerprint)
        context = context_for(CLIENT, profiles, credentials)
        connection = new_connection(context, mtu)
        connection.set_connect_state()
        super().__init__(context=context, connection=connection, state=state,
                         profiles=profiles, mtu=mtu,
                         max_retransmissions=max_retransmissions,
                         handshake_timeout=handshake_timeout)
        self._compact_when_established = compact


class ServerAssociation(DtlsAssociation):
    """
    The Key Distributor side of one association; made by
    :meth:`ServerListener.listen` once a ClientHello with a valid cookie
    arrived.  Call :meth:`start` to process that ClientHello (the identity
    hook's hello stage runs then) and get the server's flight.
    """

    role = SERVER

    def __init__(self, *, association_id: bytes, compact: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.association_id = association_id
        self._compact_when_established = compact


def _joined(first: Output, second: Output) -> Output:
    return Output(first.datagrams + second.datagrams, first.events + second.events)


def _finished_message_seq(mirror: records.RecordProtection, datagrams) -> Optional[int]:
    """The message_seq of the Finished among ``datagrams``, opened with ``mirror``."""
    for record in split_records(b"".join(datagrams)):
        opened = mirror.open(record)
        if opened is not None and opened[0] == records.CONTENT_HANDSHAKE:
            decoded = decode_handshake(opened[1])
            if decoded is not None and decoded[0] == HANDSHAKE_FINISHED:
                return decoded[1]
    return None
