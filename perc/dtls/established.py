"""
An established association once it has left OpenSSL: record protection by
:mod:`perc.dtls.records`, the final flight resent when the peer shows it
never got it, RFC 8870's ``ekt_key`` message (sent and retransmitted until
ACKed by the server role, read and ACKed by the client role), alerts and
close_notify.

:class:`OwnRecordLayer` is a mixin of
:class:`perc.dtls.association.DtlsAssociation`: it uses the association's
``_collect``/``_end`` bookkeeping and owns the state that begins at the
hand-off (``_records`` and what follows it).

Write sequence numbers are used in reserved blocks (see
:mod:`perc.dtls.records`): when a block is used up the association asks its
``reserve(start, end)`` callback (:meth:`OwnRecordLayer.use_write_reservation`)
for the next ``sequence_block`` numbers; without a callback it grants itself
the block.  Refused, nothing is sealed: the ekt_key message waits for its
retransmission timer, application data and alerts are not sent, and
:attr:`OwnRecordLayer.needs_write_sequences` is True until
:meth:`OwnRecordLayer.grant_write_sequences`.  :meth:`OwnRecordLayer.export_state`
gives the state another process continues from (:mod:`perc.dtls.state`).
"""

from __future__ import annotations

from typing import Callable, Optional

from perc.dtls import records
from perc.dtls.constants import (
    ALERT_CLOSE_NOTIFY,
    ALERT_DECODE_ERROR,
    ALERT_ILLEGAL_PARAMETER,
    ALERT_LEVEL_FATAL,
    ALERT_LEVEL_WARNING,
    ALERT_UNEXPECTED_MESSAGE,
    CONTENT_ACK,
    HANDSHAKE_EKT_KEY,
    HANDSHAKE_FINISHED,
    HANDSHAKE_HEADER_LENGTH,
    RECORD_HEADER_LENGTH,
    SERVER,
)
from perc.dtls.datagrams import split_records
from perc.dtls.events import (
    EMPTY,
    ApplicationData,
    Closed,
    DtlsStateError,
    EktKeyReceived,
    Output,
)
from perc.dtls.extensions import ekt_cipher_value
from perc.dtls.state import AssociationState
from perc.dtls.post_handshake import (
    decode_ack,
    decode_handshake,
    encode_ack,
    encode_handshake,
)
from perc.ekt import EktError, EktKey

__all__ = ["DEFAULT_SEQUENCE_BLOCK", "OwnRecordLayer", "joined", "last_message_seq"]

#: Write sequence numbers reserved at a time (see the module docstring).
DEFAULT_SEQUENCE_BLOCK = 1024

#: Peer records of a later epoch kept while OpenSSL runs the handshake, to
#: prime the own record layer's replay window (a Finished is ~60 octets).
_EARLY_RECORDS = 16
_EARLY_RECORD_OCTETS = 512
#: RFC 6347 section 4.2.4: the retransmission timer starts at 1 s and
#: doubles, up to 60 s.
RETRANSMIT_INITIAL = 1.0
_RETRANSMIT_MAX = 60.0
#: Record numbers remembered for the ekt_key message awaiting its ACK.
_EKT_RECORDS_KEPT = 32


class OwnRecordLayer:
    """What an association does once it has left OpenSSL (see the module docstring)."""

    _records: Optional[records.RecordProtection] = None
    #: reserve(start, end) -> bool: may [start, end) be used (see the module docstring).
    _reserve_sequences: Optional[Callable[[int, int], bool]] = None
    _sequence_block = DEFAULT_SEQUENCE_BLOCK
    #: Records not sealed because no write sequence numbers were reserved.
    reservation_refusals = 0
    #: Set by each ``_collect``: the records OpenSSL just wrote include a
    #: handshake record of a later epoch than 0 (our Finished).
    _flight_carries_finished = False
    #: Set by ``_export_keying_material`` for ``_compact``, which takes it:
    #: (suite, master secret, keyed PRF, client random, server random).
    _handshake_secrets: Optional[tuple] = None
    #: The peer's records of a later epoch than 0 given to OpenSSL (whether
    #: or not they are among the early records kept).
    _early_record_count = 0

    def use_write_reservation(self, reserve: Optional[Callable[[int, int], bool]],
                              block: int = DEFAULT_SEQUENCE_BLOCK) -> None:
        """
        Reserve write sequence numbers through ``reserve(start, end)``, which
        returns True once ``[start, end)`` is this holder's (durably, if
        others may continue the association), ``block`` at a time.  None:
        the association grants itself each block.
        """
        if block < 1:
            raise ValueError("the sequence block must hold at least one number")
        self._reserve_sequences = reserve
        self._sequence_block = block

    @property
    def write_sequence_limit(self) -> Optional[int]:
        """The end of the reserved block of write sequence numbers (None before the hand-off)."""
        return None if self._records is None else self._records.write_limit

    @property
    def needs_write_sequences(self) -> bool:
        """True when the reserved block is used up and the callback refused the next."""
        return self._records is not None and self._records.needs_reservation

    def grant_write_sequences(self, limit: int) -> None:
        """
        Sequence numbers below ``limit`` may be used (reserved by the caller
        outside the callback); a waiting ekt_key message goes at its next
        retransmission.  ValueError if ``limit`` is behind the current one.
        """
        if self._records is not None:
            self._records.reserve(limit)

    def export_state(self) -> AssociationState:
        """
        The state another process continues this association from (see
        :mod:`perc.dtls.state`): only for an established association on the
        own record layer (DtlsStateError otherwise).  Secret: seal it.
        """
        if not self.established or self._records is None:
            raise DtlsStateError("only an established association on the own record layer "
                                 "can be exported")
        server = self.role == SERVER
        cipher = self._state.ekt_cipher
        return AssociationState(
            role=self.role,
            association_id=bytes(getattr(self, "association_id", b"")),
            profile_id=self.profile.id,
            peer_tls_id=self._state.peer_tls_id,
            peer_fingerprint=self._state.peer_fingerprint,
            ekt_cipher=None if cipher is None else int(cipher),
            mtu=self._mtu,
            max_retransmissions=self._max_retransmissions,
            records=self._records.export_secrets(),
            next_message_seq=self._next_message_seq if server else None,
            ekt_message=self._ekt_message,
            ekt_records=tuple(self._ekt_records),
            ekt_awaiting_ack=self._ekt_due is not None,
            ekt_tries=self._ekt_tries,
            ekt_timeout=self._ekt_timeout,
            ekt_key=None if self._ekt_key is None else self._ekt_key.encode(),
            ekt_message_seq=self._ekt_message_seq,
            final_flight=tuple(self._final_flight),
            final_flight_resends=self._final_flight_resends,
        )

    def _restore_ekt_state(self, state: AssociationState, ekt_key: Optional[EktKey],
                           now: float) -> None:
        """The ekt_key message state of :meth:`export_state`; one awaiting its ACK is due now."""
        self._ekt_message = state.ekt_message
        self._ekt_records = list(state.ekt_records)[-_EKT_RECORDS_KEPT:]
        self._ekt_due = now if state.ekt_awaiting_ack and state.ekt_message else None
        self._ekt_timeout = max(RETRANSMIT_INITIAL, min(state.ekt_timeout, _RETRANSMIT_MAX))
        self._ekt_tries = max(0, state.ekt_tries)
        self._ekt_key = ekt_key
        self._ekt_message_seq = state.ekt_message_seq

    def _seal(self, content_type: int, plaintext: bytes) -> Optional[bytes]:
        """
        One record, or None (nothing sealed) when the reserved write
        sequence numbers are used up and no more can be had.
        """
        protection = self._records
        if protection.needs_reservation and not self._reserve_block():
            self.reservation_refusals += 1
            return None
        return protection.seal(content_type, plaintext)

    def _reserve_block(self) -> bool:
        protection = self._records
        start = protection.write_limit
        end = min(start + self._sequence_block, records.SEQUENCE_LIMIT)
        if end <= start:
            return True  # the epoch's numbers are exhausted: seal() says so
        reserve = self._reserve_sequences
        if reserve is not None:
            try:
                granted = reserve(start, end)
            except Exception:
                granted = False  # the caller's store failed: as a refusal
            if not granted:
                return False
        protection.reserve(end)
        return True

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
        if not self.established or self.role != SERVER:
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
        self._ekt_timeout = RETRANSMIT_INITIAL
        self._ekt_tries = 0
        self._ekt_due = now + self._ekt_timeout
        return self._send_ekt_message()

    @property
    def ekt_key_sent(self) -> Optional[EktKey]:
        """Server role: the EKTKey of the latest ekt_key message, or None before the first."""
        if self._ekt_message is None:
            return None
        try:
            return EktKey.decode(self._ekt_message[12:])
        except EktError:
            return None

    @property
    def ekt_key_acknowledged(self) -> bool:
        """Server role: True when no ekt_key message awaits the client's ACK."""
        return self._ekt_due is None

    def _remember_early_record(self, record: bytes) -> None:
        header = records.record_epoch_and_sequence(record)
        if header is not None and header[0] > 0:
            self._early_record_count += 1
            if len(record) <= _EARLY_RECORD_OCTETS and len(self._early_records) < _EARLY_RECORDS:
                self._early_records.append(bytes(record))

    def _compact(self, output: Output) -> None:
        """
        Hand the just-established association to perc.dtls.records and free the
        OpenSSL connection (about 80 KiB that would otherwise stay for the
        association's life).  Kept on OpenSSL: suites perc.dtls.records does not
        handle, and anything unexpected about the final flight.  ``output``
        is what the last ``_collect`` returned (the one that saw the
        handshake complete).
        """
        secrets, self._handshake_secrets = self._handshake_secrets, None
        if secrets is None or self._write_epoch is None:
            return  # a suite perc.dtls.records does not handle
        suite, master_secret, prf, client_random, server_random = secrets
        server = self.role == SERVER
        if server:
            # The ekt_key message continues this side's message_seq, which
            # counts every handshake message it sent (RFC 6347 section
            # 4.2.2): our Finished, in this output, took the one after our
            # last epoch-0 message.
            if self._plain_message_seq < 0 or not self._flight_carries_finished:
                return
            self._next_message_seq = self._plain_message_seq + 2
        try:
            protection = records.RecordProtection.from_master_secret(
                suite, server=server, next_write_sequence=self._next_write_sequence,
                master_secret=master_secret, client_random=client_random,
                server_random=server_random, epoch=self._write_epoch, prf=prf,
                # OpenSSL's records used the numbers below; nothing is reserved yet.
                write_limit=self._next_write_sequence)
        except Exception:
            return
        # Every peer record of this epoch seen so far (its Finished, perhaps
        # an earlier copy of it) enters the replay window.
        # When OpenSSL was given a single record of a later epoch, and is done
        # with the handshake, that record was the peer's Finished, which
        # OpenSSL authenticated: it need not be decrypted again here.
        protection.prime(self._early_records, authenticated=self._early_record_count == 1)
        self._early_records = []
        self._records = protection
        self._reserve_block()  # the first block, before anything is sealed here
        if server:
            self._final_flight = output.datagrams
        state = self._state
        state.peer_certificate = None
        state.peer_der = None
        state.peer_x509 = None
        state.send = {}
        self._unregister()
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
                        return joined(Output(tuple(replies)), outcome)
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

    def _ack(self, record: bytes) -> Optional[bytes]:
        """An ACK record (RFC 9147 section 7) for the record carrying a handshake message."""
        return self._seal(CONTENT_ACK, encode_ack(
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
            record = self._seal(records.CONTENT_HANDSHAKE, self._ekt_message)
        except OverflowError as e:
            return self._close_compacted(Closed("association failed: {}".format(e), False),
                                         notify=False)
        if record is None:
            return self._collect_with(())  # waits: the retransmission timer tries again
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
            record = self._seal(content_type, plaintext)
        except OverflowError as e:
            return self._close_compacted(Closed("association failed: {}".format(e), False),
                                         notify=False)
        return self._collect_with(() if record is None else (record,))

    def _close_compacted(self, event: Closed, notify: bool = True,
                         alert: tuple = (ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY)) -> Output:
        datagrams: tuple = ()
        if notify:
            try:
                record = self._seal(records.CONTENT_ALERT, bytes(alert))
            except OverflowError:
                record = None
            if record is not None:
                datagrams = (record,)
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


def joined(first: Output, second: Output) -> Output:
    """Two outputs as one, in order."""
    return Output(first.datagrams + second.datagrams, first.events + second.events)


def last_message_seq(record: bytes) -> int:
    """
    The highest message_seq of the handshake messages (or fragments) in an
    epoch-0 handshake record, or -1 for any other record.
    """
    highest = -1
    if len(record) < RECORD_HEADER_LENGTH or record[0] != records.CONTENT_HANDSHAKE or \
            record[3] or record[4]:
        return highest
    position, end = RECORD_HEADER_LENGTH, len(record)
    while position + HANDSHAKE_HEADER_LENGTH <= end:
        highest = max(highest, (record[position + 4] << 8) | record[position + 5])
        position += HANDSHAKE_HEADER_LENGTH + int.from_bytes(
            record[position + 9:position + 12], "big")
    return highest
