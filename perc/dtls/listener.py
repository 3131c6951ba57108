"""The stateless front door of the server role: cookie exchange (RFC 6347 section 4.2.1)."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional


from perc.dtls.association import ServerAssociation
from perc.dtls.bindings import ffi as _ffi
from perc.dtls.bindings import lib as _lib
from perc.dtls.callbacks import SslState, register, unregister
from perc.dtls.constants import (
    CONTENT_HANDSHAKE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_RETRANSMISSIONS,
    DEFAULT_MTU,
    HANDSHAKE_CLIENT_HELLO,
    HANDSHAKE_HEADER_LENGTH,
    RECORD_HEADER_LENGTH,
    SERVER,
)
from perc.dtls.contexts import (
    check_mtu,
    context_for,
    fill,
    new_connection,
    normalise_profiles,
)
from perc.dtls.extensions import server_ekt_ciphers, validate_tls_id
from perc.dtls.identity import Credentials, IdentityHook
from perc.dtls.mac import KeyedHmac
from perc.profiles import Profile

#: Cookies must survive across listeners of one process, not across restarts.
_PROCESS_COOKIE_SECRET = os.urandom(32)


class ServerListener:
    """
    Stateless front door of the server role (cookie exchange, RFC 6347
    section 4.2.1).

    ``listen`` answers a ClientHello without a valid cookie with a
    HelloVerifyRequest and keeps nothing; with a valid cookie (an HMAC,
    under a process secret, of the association id and the ClientHello
    fields RFC 6347 says the second ClientHello repeats) it returns a new
    :class:`ServerAssociation`.  Route datagrams of known associations to
    the association, not here.

    The HelloVerifyRequest is built here, not by OpenSSL: it is a pure
    function of the ClientHello and the cookie, and asking OpenSSL for it
    cost an SSL object and a ``DTLSv1_listen`` per ClientHello.  Only a
    ClientHello whose cookie checks out reaches OpenSSL, which checks the
    cookie again (``DTLSv1_listen`` with the cookie callbacks), because it
    is the only public way to start a server past the cookie exchange
    (expecting message_seq 1, answering with the ClientHello's record
    sequence number).

    ``identity_hook`` (default: accept everything) and ``tls_id`` (the
    server's default tls-id for the ServerHello) apply to every association
    unless ``listen`` overrides them.  So does ``ekt_ciphers``: the EKT
    ciphers the server supports, in its order of preference; when a
    ClientHello offers some of them in extension 39, the ServerHello
    selects the first of this list the client offered.  None (or ``()``)
    means no EKT: the ServerHello then carries no extension 39.

    ``compact`` (default True): as soon as an association is established
    with an AEAD cipher suite, it frees its OpenSSL connection and protects
    its later records itself (:mod:`perc.dtls.records`); it still answers a
    retransmitted Finished with the final flight.  This cuts what an idle
    association costs from about 80 KiB to a few.
    """

    def __init__(self, credentials: Credentials, profiles: Iterable[Profile], *,
                 identity_hook: Optional[IdentityHook] = None,
                 tls_id: Optional[bytes] = None,
                 ekt_ciphers: Optional[Iterable[int]] = None,
                 mtu: int = DEFAULT_MTU,
                 max_retransmissions: int = DEFAULT_MAX_RETRANSMISSIONS,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 cookie_secret: Optional[bytes] = None,
                 compact: bool = True) -> None:
        if credentials is None:
            raise ValueError("the server role needs credentials")
        self.credentials = credentials
        self.profiles = normalise_profiles(profiles)
        self.identity_hook = identity_hook
        self.tls_id = None if tls_id is None else validate_tls_id(tls_id)
        self.ekt_ciphers = server_ekt_ciphers(ekt_ciphers)
        self.mtu = check_mtu(mtu)
        if max_retransmissions < 0:
            raise ValueError("max_retransmissions must be >= 0")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.max_retransmissions = max_retransmissions
        self.handshake_timeout = handshake_timeout
        self._cookie_mac = KeyedHmac(hashlib.sha256, _PROCESS_COOKIE_SECRET
                                     if cookie_secret is None else bytes(cookie_secret))
        self.compact = compact
        # What every listen() with the listener's own profiles uses.
        self._profile_ids = frozenset(p.id for p in self.profiles)

    def cookie_for(self, association_id: bytes, datagram) -> Optional[bytes]:
        """
        The cookie a client must echo in the ClientHello that repeats the
        one in ``datagram`` for this association id; None if ``datagram``
        holds no ClientHello the listener answers.
        """
        hello = _parse_client_hello(datagram)
        return None if hello is None else self._cookie(association_id, hello[1])

    def hello_verify_request(self, association_id: bytes, datagram) -> Optional[bytes]:
        """
        The HelloVerifyRequest :meth:`listen` would answer ``datagram``
        with, or None when it would not answer with one (a ClientHello
        with this association's valid cookie, or no ClientHello).  Lets a
        caller skip what it prepares for :meth:`listen` (its ``profiles``,
        say) while no state is kept anyway.
        """
        hello = _parse_client_hello(datagram)
        if hello is None:
            return None
        record_sequence, parameters, cookie = hello
        expected = self._cookie(bytes(association_id), parameters)
        if hmac.compare_digest(cookie, expected):
            return None
        return hello_verify_request(record_sequence, expected)

    def _cookie(self, association_id: bytes, parameters: bytes) -> bytes:
        # RFC 6347 section 4.2.1: Cookie = HMAC(Secret, Client-IP,
        # Client-Parameters); the association id stands for the address.
        return self._cookie_mac.digest(len(association_id).to_bytes(2, "big")
                                       + association_id + parameters)

    def listen(self, association_id: bytes, datagram: bytes, now: float, *,
               profiles: Optional[Iterable[Profile]] = None,
               identity_hook: Optional[IdentityHook] = None,
               tls_id: Optional[bytes] = None,
               ekt_ciphers: Optional[Iterable[int]] = None):
        """
        Returns ``(reply_datagrams, association_or_None)``:
        ``(HelloVerifyRequest,), None`` for a ClientHello without a valid
        cookie; ``(), association`` for one with a valid cookie (call
        ``association.start(now)`` next); ``(), None`` for anything else.
        Never raises because of the datagram's content.

        ``profiles``, ``identity_hook``, ``tls_id`` and ``ekt_ciphers``
        override the listener's for this association when not None
        (``ekt_ciphers=()`` turns EKT off for it).
        """
        # The caller's arguments are checked whatever the datagram holds.
        profiles = self.profiles if profiles is None else normalise_profiles(profiles)
        if tls_id is not None:
            validate_tls_id(tls_id)
        ekt_ciphers = self.ekt_ciphers if ekt_ciphers is None else server_ekt_ciphers(ekt_ciphers)
        hello = _parse_client_hello(datagram)
        if hello is None:
            return (), None
        record_sequence, parameters, cookie = hello
        association_id = bytes(association_id)
        expected = self._cookie(association_id, parameters)
        if not hmac.compare_digest(cookie, expected):
            # No cookie, or not the one this ClientHello earns here (RFC
            # 6347 treats an invalid cookie as none): nothing is kept.
            return (hello_verify_request(record_sequence, expected),), None
        datagram = bytes(datagram)
        own_profiles = profiles is self.profiles
        context = context_for(SERVER, profiles, self.credentials)
        connection = new_connection(context, self.mtu)
        connection.set_accept_state()
        state = SslState(SERVER)
        state.association_id = association_id
        state.cookie = expected
        # Registered once, for DTLSv1_listen's cookie callbacks and then
        # for the association's life.
        token = register(connection, state)
        _lib.ERR_clear_error()
        # BIO_write and DTLSv1_listen themselves (what pyOpenSSL's
        # bio_write and DTLSv1_listen call, without their wrapping; the
        # cookie callbacks are ours, not pyOpenSSL's helpers).  Above 0:
        # the ClientHello's cookie checked out and the SSL object goes on.
        ssl = connection._ssl
        if not fill(connection, datagram) or _dtls_listen(ssl) <= 0:
            # OpenSSL refused what the checks above let through (its
            # own parse is stricter in places): nothing is kept.
            _lib.ERR_clear_error()
            unregister(token)
            return (), None
        state.identity_hook = identity_hook if identity_hook is not None else self.identity_hook
        state.default_tls_id = tls_id if tls_id is not None else self.tls_id
        state.allowed_profile_ids = self._profile_ids if own_profiles else \
            frozenset(p.id for p in profiles)
        state.ekt_ciphers = ekt_ciphers
        association = ServerAssociation(
            association_id=association_id, compact=self.compact,
            context=context, connection=connection,
            state=state, profiles=profiles, mtu=self.mtu,
            max_retransmissions=self.max_retransmissions,
            handshake_timeout=self.handshake_timeout, registration=token)
        association._mark_started(now)
        return (), association


def _dtls_listen(ssl) -> int:
    """DTLSv1_listen on ``ssl`` (an ``SSL *``) with a peer address it fills and we drop."""
    address = _lib.BIO_ADDR_new()
    if address == _ffi.NULL:
        return -1
    try:
        return _lib.DTLSv1_listen(ssl, address)
    finally:
        _lib.BIO_ADDR_free(address)


#: A ClientHello's fixed part: client_version and random.
_VERSION_AND_RANDOM = 2 + 32
_HANDSHAKE_HELLO_VERIFY_REQUEST = 3
#: RFC 6347 section 4.2.1: the HelloVerifyRequest's record and
#: server_version are DTLS 1.0 whatever is negotiated later (as OpenSSL).
_DTLS1_VERSION = b"\xfe\xff"
#: OpenSSL's DTLSv1_listen drops a ClientHello with a higher message_seq.
_MAX_HELLO_MESSAGE_SEQ = 2


def _parse_client_hello(datagram) -> Optional[tuple]:
    """
    ``(record sequence number, cookie parameters, cookie)`` of the
    ClientHello in the first record of ``datagram``, or None if that is
    not a ClientHello the cookie exchange answers.  The checks are
    DTLSv1_listen's: an epoch-0 DTLS handshake record within the datagram
    holding one ClientHello (or its first fragment, the fields up to the
    compression methods included) with message_seq at most 2.  The cookie
    parameters are the fields RFC 6347 section 4.2.1 says the second
    ClientHello repeats: client_version, random, session_id, cipher_suites
    and compression_methods, each with its length octets.
    """
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        return None
    data = bytes(datagram)
    total = len(data)
    if (total < RECORD_HEADER_LENGTH + HANDSHAKE_HEADER_LENGTH or data[0] != CONTENT_HANDSHAKE
            or data[1] != 0xFE or data[3] or data[4]
            or data[RECORD_HEADER_LENGTH] != HANDSHAKE_CLIENT_HELLO):
        return None
    record_end = RECORD_HEADER_LENGTH + ((data[11] << 8) | data[12])
    body = RECORD_HEADER_LENGTH + HANDSHAKE_HEADER_LENGTH
    fragment_end = body + int.from_bytes(data[body - 3:body], "big")
    if (record_end > total or fragment_end != record_end
            or data[body - 6:body - 3] != b"\x00\x00\x00"  # fragment_offset
            or fragment_end - body > int.from_bytes(data[14:17], "big")
            or ((data[17] << 8) | data[18]) > _MAX_HELLO_MESSAGE_SEQ):
        return None
    # client_version, random, session_id<0..32>, cookie<0..255>,
    # cipher_suites<2..2^16-2>, compression_methods<1..2^8-1>.
    position = body + _VERSION_AND_RANDOM
    if position >= fragment_end or data[position] > 32:
        return None
    cookie_at = position + 1 + data[position]
    if cookie_at >= fragment_end:
        return None
    suites_at = cookie_at + 1 + data[cookie_at]
    if suites_at + 2 > fragment_end:
        return None
    suites_length = (data[suites_at] << 8) | data[suites_at + 1]
    compression_at = suites_at + 2 + suites_length
    if suites_length < 2 or suites_length % 2 or compression_at >= fragment_end:
        return None
    end = compression_at + 1 + data[compression_at]
    if not data[compression_at] or end > fragment_end:
        return None
    return (data[5:11], data[body:cookie_at] + data[suites_at:end],
            data[cookie_at + 1:suites_at])


def hello_verify_request(record_sequence: bytes, cookie: bytes) -> bytes:
    """
    The HelloVerifyRequest datagram carrying ``cookie`` in answer to a
    ClientHello whose record had ``record_sequence`` (6 octets): RFC 6347
    section 4.2.1, as OpenSSL's DTLSv1_listen writes it (the ClientHello's
    record sequence number, message_seq 0, DTLS 1.0 versions).
    """
    length = 3 + len(cookie)
    message = (bytes((_HANDSHAKE_HELLO_VERIFY_REQUEST,)) + length.to_bytes(3, "big")
               + b"\x00\x00\x00\x00\x00" + length.to_bytes(3, "big")
               + _DTLS1_VERSION + bytes((len(cookie),)) + cookie)
    return (bytes((CONTENT_HANDSHAKE,)) + _DTLS1_VERSION + b"\x00\x00" + record_sequence
            + len(message).to_bytes(2, "big") + message)
