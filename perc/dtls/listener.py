"""The stateless front door of the server role: cookie exchange (RFC 6347 section 4.2.1)."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Iterable, Optional

from OpenSSL import SSL

from perc.dtls.association import ServerAssociation
from perc.dtls.bindings import lib as _lib
from perc.dtls.callbacks import SslState, connection_address, register, unregister
from perc.dtls.constants import (
    CONTENT_HANDSHAKE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_RETRANSMISSIONS,
    DEFAULT_MTU,
    HANDSHAKE_CLIENT_HELLO,
    RECORD_HEADER_LENGTH,
    SERVER,
)
from perc.dtls.contexts import (
    check_mtu,
    context_for,
    drain,
    new_connection,
    normalise_profiles,
)
from perc.dtls.datagrams import pack_records, split_records
from perc.dtls.extensions import server_ekt_ciphers, validate_tls_id
from perc.dtls.identity import Credentials, IdentityHook
from perc.profiles import Profile

#: Cookies must survive across listeners of one process, not across restarts.
_PROCESS_COOKIE_SECRET = os.urandom(32)


class ServerListener:
    """
    Stateless front door of the server role (cookie exchange, RFC 6347
    section 4.2.1).

    ``listen`` answers a ClientHello without a valid cookie with a
    HelloVerifyRequest and keeps nothing; with a valid cookie (an HMAC of
    the association id under a process secret) it returns a new
    :class:`ServerAssociation`.  Route datagrams of known associations to
    the association, not here.

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
        self._secret = _PROCESS_COOKIE_SECRET if cookie_secret is None else bytes(cookie_secret)
        self.compact = compact

    def cookie_for(self, association_id: bytes) -> bytes:
        """The cookie a client must echo for this association id."""
        return hmac.new(self._secret, bytes(association_id), hashlib.sha256).digest()

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
        if not _looks_like_client_hello(datagram):
            return (), None
        profiles = self.profiles if profiles is None else normalise_profiles(profiles)
        if tls_id is not None:
            validate_tls_id(tls_id)
        ekt_ciphers = self.ekt_ciphers if ekt_ciphers is None else server_ekt_ciphers(ekt_ciphers)
        context = context_for(SERVER, profiles, self.credentials)
        connection = new_connection(context, self.mtu)
        connection.set_accept_state()
        state = SslState(SERVER)
        state.association_id = bytes(association_id)
        state.cookie = self.cookie_for(association_id)
        address = connection_address(connection)
        token = register(connection, state)
        try:
            _lib.ERR_clear_error()
            connection.bio_write(bytes(datagram))
            try:
                connection.DTLSv1_listen()
            except SSL.WantReadError:
                # No valid cookie: OpenSSL wrote a HelloVerifyRequest (or
                # nothing, for junk).  Nothing of this attempt is kept.
                return tuple(pack_records(split_records(drain(connection)), self.mtu)), None
            except Exception:
                return (), None
        finally:
            unregister(address, token)
        state.identity_hook = identity_hook if identity_hook is not None else self.identity_hook
        state.default_tls_id = tls_id if tls_id is not None else self.tls_id
        state.allowed_profile_ids = frozenset(p.id for p in profiles)
        state.ekt_ciphers = ekt_ciphers
        association = ServerAssociation(
            association_id=bytes(association_id), compact=self.compact,
            context=context, connection=connection,
            state=state, profiles=profiles, mtu=self.mtu,
            max_retransmissions=self.max_retransmissions,
            handshake_timeout=self.handshake_timeout)
        association._mark_started(now)
        return (), association


def _looks_like_client_hello(datagram) -> bool:
    # Cheap filter before creating any OpenSSL object: an epoch-0 handshake
    # record whose message is a ClientHello.
    return (
        isinstance(datagram, (bytes, bytearray, memoryview))
        and len(datagram) >= RECORD_HEADER_LENGTH + 12
        and datagram[0] == CONTENT_HANDSHAKE
        and datagram[1] == 0xFE
        and datagram[3] == 0
        and datagram[4] == 0
        and datagram[RECORD_HEADER_LENGTH] == HANDSHAKE_CLIENT_HELLO
    )

