"""The association state machine, in the client role and the server role."""

from __future__ import annotations

from typing import Iterable, Optional

from OpenSSL import SSL

from perc import pki
from perc.dtls import records
from perc.dtls.bindings import ffi as _ffi
from perc.dtls.bindings import lib as _lib
from perc.dtls.callbacks import (
    Refusal,
    Registration,
    SslState,
    certificate_der,
    check_profile,
    register,
    unregister,
)
from perc.dtls.constants import (
    CLIENT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_RETRANSMISSIONS,
    DEFAULT_MTU,
    DTLS1_2_VERSION,
    EXPORTER_LABEL,
    RECORD_HEADER_LENGTH,
    SERVER,
)
from perc.dtls.contexts import (
    check_mtu,
    context_for,
    drain,
    error_text,
    fill,
    new_connection,
    normalise_profiles,
    uninitialised,
)
from perc.dtls.datagrams import pack_records, split_records
from perc.dtls.established import (
    DEFAULT_SEQUENCE_BLOCK,
    RETRANSMIT_INITIAL,
    OwnRecordLayer,
    joined,
    last_message_seq,
)
from perc.dtls.events import (
    EMPTY,
    ApplicationData,
    Closed,
    DtlsStateError,
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
from perc.dtls.state import AssociationState
from perc.ekt import EktKey, encode_client_ekt_ciphers
from perc.profiles import Profile, by_id

_HANDSHAKING = "handshaking"
_ESTABLISHED = "established"
_CLOSED = "closed"

class DtlsAssociation(OwnRecordLayer):
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
                 max_retransmissions: int, handshake_timeout: float,
                 registration: Optional[Registration] = None) -> None:
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
        self._plain_message_seq = -1  # the highest in the epoch-0 records we wrote
        self._ekt_message: Optional[bytes] = None
        self._ekt_records: list = []  # sequence numbers of the records carrying it
        self._ekt_due: Optional[float] = None  # None: nothing awaits an ACK
        self._ekt_timeout = RETRANSMIT_INITIAL
        self._ekt_tries = 0
        # Client role: the last ekt_key message processed.
        self._ekt_key: Optional[EktKey] = None
        self._ekt_message_seq = -1
        # Undone when the association is closed or compacted, or else when
        # its state is garbage collected (see callbacks.register).
        self._registration: Optional[Registration] = (
            registration if registration is not None else register(connection, state))

    @classmethod
    def restore(cls, state: AssociationState, now: float, *, reserve=None,
                sequence_block: int = DEFAULT_SEQUENCE_BLOCK):
        """
        An established association continuing where ``state`` (from
        :meth:`export_state`, perhaps in another process) left off, on the
        own record layer, with no OpenSSL and no handshake: it reads the
        peer's next records, refuses what the exporter had seen, and seals
        from the exporter's write limit on, once ``reserve(start, end)``
        (see :meth:`use_write_reservation`) grants a block after it.  An
        ekt_key message that awaited its ACK is retransmitted at ``now``.
        ValueError if ``state`` is not usable for this role.
        """
        if state.role != cls.role:
            raise ValueError("state of a {} association, not {}".format(state.role, cls.role))
        profile = by_id(state.profile_id)
        if profile is None:
            raise ValueError("unknown SRTP profile {:#06x}".format(state.profile_id))
        check_mtu(state.mtu)
        if state.max_retransmissions < 0:
            raise ValueError("max_retransmissions must be >= 0")
        try:
            protection = records.RecordProtection.from_secrets(state.records)
            ekt_key = None if state.ekt_key is None else EktKey.decode(state.ekt_key)
        except (KeyError, TypeError) as e:
            raise ValueError("malformed record state ({})".format(type(e).__name__))
        if cls.role == SERVER and (state.next_message_seq is None or
                                   not 0 <= state.next_message_seq <= 0x10000):
            raise ValueError("message_seq out of range")
        self = cls.__new__(cls)
        ssl_state = SslState(cls.role)
        ssl_state.peer_tls_id = state.peer_tls_id
        ssl_state.peer_fingerprint = state.peer_fingerprint
        ssl_state.ekt_cipher = state.ekt_cipher
        self._context = None
        self._conn = None
        self._state = ssl_state
        self._profiles = (profile,)
        self._mtu = state.mtu
        self._max_retransmissions = state.max_retransmissions
        self._handshake_timeout = float(DEFAULT_HANDSHAKE_TIMEOUT)
        self._phase = _ESTABLISHED
        self._started = True
        self._started_at = now
        self._retransmissions = 0
        self._events = []
        self._closing = None
        self.profile = profile
        self._records = protection
        self._final_flight = tuple(state.final_flight)
        self._final_flight_resends = state.final_flight_resends
        self._write_epoch = protection.epoch
        self._next_write_sequence = protection.next_write_sequence
        self._early_records = []
        self._next_message_seq = state.next_message_seq
        self._plain_message_seq = -1
        self._restore_ekt_state(state, ekt_key, now)
        self._compact_when_established = False
        self._registration = None  # no OpenSSL object to unregister
        self.use_write_reservation(reserve, sequence_block)
        if cls.role == SERVER:
            self.association_id = state.association_id
        return self

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
        # Only a record of a later epoch (the Finished) can complete it, so
        # the epoch-0 records and the first record after them go in together.
        pieces = _pieces(bytes(datagram))
        for index, (piece, last) in enumerate(pieces):
            self._remember_early_record(last)
            self._feed(piece)
            if self.closed:
                break
            if self._phase == _ESTABLISHED:
                self._compact_when_established = False
                output = self._collect()
                self._compact(output)
                if self._records is None:  # kept on OpenSSL
                    self._read_application_data()
                    output = joined(output, self._collect())
                rest = b"".join(later for later, _ in pieces[index + 1:])
                return joined(output, self.receive(rest, now)) if rest else output
        return self._collect()

    def _feed(self, data: bytes) -> None:
        try:
            _lib.ERR_clear_error()
            if not fill(self._conn, bytes(data)):
                raise MemoryError("BIO_write to the memory BIO failed")
            self._drive()
        except Exception as e:  # never let the peer's bytes raise out of here
            self._fail("internal error: {}: {}".format(type(e).__name__, e))

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
            self._give_up("handshake gave up: not complete after {:g} s ({} retransmissions)"
                          .format(self._handshake_timeout, self._retransmissions))
            return self._collect()
        try:
            remaining = self._conn.DTLSv1_get_timeout()
        except Exception:
            remaining = None
        if remaining is None or remaining > 0:
            return EMPTY
        if handshaking and self._retransmissions >= self._max_retransmissions:
            self._give_up("handshake gave up: no answer after {} retransmissions".format(
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
            # SSL_do_handshake and SSL_get_error themselves: on a handshake
            # that waits for the peer (every call but the last), pyOpenSSL's
            # do_handshake raises and we catch a WantReadError.  Anything
            # else goes through pyOpenSSL's own error mapping, as before.
            connection = self._conn
            ssl = connection._ssl
            result = _SSL_do_handshake(ssl)
            if result != 1:
                if _SSL_get_error(ssl, result) == _SSL_ERROR_WANT_READ:
                    return
                try:
                    connection._raise_ssl_error(ssl, result)
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
            connection = self._conn
            ssl = connection._ssl
            if connection.get_protocol_version() != DTLS1_2_VERSION:
                raise Refusal("negotiated {} instead of DTLS 1.2".format(
                    connection.get_protocol_version_name()), False, 0, 0)
            profile = by_id(check_profile(ssl, state))
            # Fail closed if, for any reason, the certificate never went
            # through our checks or is not the one OpenSSL kept.
            problem = _peer_certificate_problem(ssl, state)
            if problem is not None:
                raise Refusal(problem, False, 0, 0)
            if state.role == SERVER and not state.hello_done:
                raise Refusal("identity was not checked", False, 0, 0)
            keys = profile.split(self._export_keying_material(profile.keying_material_length))
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

    def _export_keying_material(self, length: int) -> bytes:
        """
        RFC 5705's exporter with RFC 5764's label.  For the suites the own
        record layer handles it is the TLS 1.2 PRF over the master secret
        and both randoms, computed here, keyed once for the key block too
        (kept for _compact when the association will compact): OpenSSL's
        SSL_export_keying_material fetches and sets up a KDF on every
        call, which cost more than the rest of the handshake's end.
        """
        connection = self._conn
        ssl = connection._ssl
        suite = _SUITES_BY_CIPHER[_SSL_get_current_cipher(ssl)]
        master_secret = _session_master_key(ssl) if suite is not None else None
        if not master_secret:
            return connection.export_keying_material(EXPORTER_LABEL, length)
        # pyOpenSSL's client_random and server_random each look the
        # session up and ask OpenSSL for the length first: both are 32.
        randoms = uninitialised("unsigned char[]", 64)
        if _SSL_get_client_random(ssl, randoms, 32) != 32 or \
                _SSL_get_server_random(ssl, randoms + 32, 32) != 32:
            return connection.export_keying_material(EXPORTER_LABEL, length)
        client_random = _ffi.buffer(randoms, 32)[:]
        server_random = _ffi.buffer(randoms + 32, 32)[:]
        prf = records.Prf(suite.prf_hash, master_secret)
        if self._compact_when_established:
            self._handshake_secrets = (suite, master_secret, prf, client_random, server_random)
        return prf(EXPORTER_LABEL, client_random + server_random, length)

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

    def _give_up(self, reason: str) -> None:
        self._end(Closed(reason, False, timed_out=True))

    def _end(self, event: Closed) -> None:
        if self._closing is None:
            self._closing = event

    def _discard_output(self) -> None:
        drain(self._conn)

    def _collect(self) -> Output:
        data = drain(self._conn) if self._conn is not None else b""
        datagrams: tuple = ()
        finished = False
        if data:
            # One pass over the headers of the records OpenSSL wrote, for
            # what the hand-off to the own record layer needs (see
            # _compact): the write epoch and next sequence number there,
            # whether this flight carries a handshake record of that epoch
            # (our Finished), and the message_seq of our epoch-0 handshake
            # messages.
            total = len(data)
            offset = 0
            plain = self._compact_when_established
            while offset + RECORD_HEADER_LENGTH <= total:
                end = offset + RECORD_HEADER_LENGTH + ((data[offset + 11] << 8)
                                                       | data[offset + 12])
                if data[offset + 3] or data[offset + 4]:
                    self._write_epoch = (data[offset + 3] << 8) | data[offset + 4]
                    sequence = int.from_bytes(data[offset + 5:offset + 11], "big")
                    if sequence >= self._next_write_sequence:
                        self._next_write_sequence = sequence + 1
                    finished = finished or data[offset] == records.CONTENT_HANDSHAKE
                elif plain:
                    self._plain_message_seq = max(self._plain_message_seq,
                                                  last_message_seq(data[offset:end]))
                offset = end
            # Records packed whole into datagrams of at most the MTU: what
            # fits one datagram is the records as OpenSSL wrote them.
            datagrams = (data,) if total <= self._mtu else \
                tuple(pack_records(split_records(data), self._mtu))
        self._flight_carries_finished = finished
        events = self._events
        self._events = []
        if self._closing is not None and self._phase != _CLOSED:
            events.append(self._closing)
            self._release()
        return Output(datagrams, tuple(events))

    def _unregister(self) -> None:
        registration = self._registration
        if registration is not None:
            self._registration = None
            unregister(registration)

    def _release(self) -> None:
        self._phase = _CLOSED
        self._unregister()
        # Dropping the connection frees the SSL object (and its keys) now
        # rather than whenever the association itself goes away.
        self._conn = None
        self._context = None

#: Called on the hot path of every handshake (see _drive and _feed).
_SSL_do_handshake = _lib.SSL_do_handshake
_SSL_get_error = _lib.SSL_get_error
_SSL_ERROR_WANT_READ = _lib.SSL_ERROR_WANT_READ
_SSL_get_current_cipher = _lib.SSL_get_current_cipher
_SSL_get_client_random = _lib.SSL_get_client_random
_SSL_get_server_random = _lib.SSL_get_server_random


class _SuitesByCipher(dict):
    """
    ``SSL_CIPHER *`` -> the records.Suite of that cipher, or None: OpenSSL's
    cipher objects are static tables, so a pointer names one cipher for the
    process's life and its name is looked up once.
    """

    def __missing__(self, cipher):
        suite = None
        if cipher != _ffi.NULL:
            suite = records.suite_for(_ffi.string(_lib.SSL_CIPHER_get_name(cipher)).decode(
                "ascii", "replace"))
            self[cipher] = suite
        return suite


_SUITES_BY_CIPHER = _SuitesByCipher()


def _session_master_key(ssl) -> Optional[bytes]:
    """The session's master secret (what pyOpenSSL's master_key gives), or None."""
    session = _lib.SSL_get_session(ssl)
    if session == _ffi.NULL:
        return None
    buffer = uninitialised("unsigned char[]", 48)
    length = _lib.SSL_SESSION_get_master_key(session, buffer, 48)
    return _ffi.buffer(buffer, length)[:] if length > 0 else None


def _peer_certificate_problem(ssl, state: SslState) -> Optional[str]:
    """
    Why the certificate OpenSSL kept for the peer is not the one the
    verify callback checked, or None when it is.
    """
    peer = _lib.SSL_get_peer_certificate(ssl)  # a new reference
    if peer == _ffi.NULL:
        return "peer certificate was not checked"
    try:
        if not state.certificate_verdict or state.peer_der is None:
            return "peer certificate was not checked"
        # The callback's X509 is still referenced (state.peer_x509), so no
        # other certificate can have its address: the same address is the
        # same certificate, and only another one needs its DER compared.
        if peer == state.peer_x509 or certificate_der(peer) == state.peer_der:
            return None
        return "peer certificate changed during the handshake"
    finally:
        _lib.X509_free(peer)


def _pieces(data: bytes) -> list:
    """
    ``data`` (one datagram) as the pieces to feed OpenSSL in one go each,
    ``(octets, last record)``: the run of epoch-0 records at the start and
    the record that follows it together (one call instead of one per
    record; only that last one, of a later epoch, can complete a
    handshake), then one record at a time.  A flight ending in its
    Finished, as usual, is one piece: the datagram as it came, found in
    one pass over the headers with no record copied but the last.
    """
    total = len(data)
    offset = end = 0
    while offset < total:
        end = total if total - offset < RECORD_HEADER_LENGTH else min(
            total, offset + RECORD_HEADER_LENGTH + ((data[offset + 11] << 8) | data[offset + 12]))
        if end - offset < RECORD_HEADER_LENGTH or data[offset + 3] or data[offset + 4]:
            break
        offset = end
    else:
        return [(data, data[offset:])] if total else []
    if end == total:
        return [(data, data[offset:])]
    return [(data[:end], data[offset:end])] + [(record, record)
                                                for record in split_records(data[end:])]


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

