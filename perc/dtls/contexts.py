"""SSL contexts, built once per (role, profile set, certificate), and connections."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from OpenSSL import SSL

from perc.dtls.bindings import ffi as _ffi
from perc.dtls.bindings import lib as _lib
from perc.dtls.callbacks import install_callbacks
from perc.dtls.constants import DTLS1_2_VERSION, MIN_MTU, SERVER
from perc.dtls.identity import Credentials
from perc.profiles import Profile, openssl_srtp_string

_CONTEXT_CACHE_SIZE = 64
_contexts: "OrderedDict[tuple, SSL.Context]" = OrderedDict()


def normalise_profiles(profiles: Iterable[Profile]) -> tuple:
    result = []
    for profile in profiles:
        if not isinstance(profile, Profile):
            raise TypeError("profiles must be perc.profiles.Profile objects")
        if profile not in result:
            result.append(profile)
    if not result:
        raise ValueError("at least one SRTP protection profile is needed")
    return tuple(result)


def context_for(role: str, profiles: tuple, credentials: Optional[Credentials]) -> SSL.Context:
    key = (role, tuple(p.id for p in profiles),
           None if credentials is None else credentials.cache_key)
    context = _contexts.get(key)
    if context is not None:
        _contexts.move_to_end(key)
        return context
    context = _build_context(role, profiles, credentials)
    _contexts[key] = context
    if len(_contexts) > _CONTEXT_CACHE_SIZE:
        # Connections keep their own reference, so eviction is safe.
        _contexts.popitem(last=False)
    return context


def _build_context(role: str, profiles: tuple, credentials: Optional[Credentials]) -> SSL.Context:
    context = SSL.Context(SSL.DTLS_METHOD)
    # DTLS 1.3 would hide the ServerHello extensions from the Media
    # Distributor, and the custom-extension calls are the TLS <= 1.2 ones.
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    options = SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION
    if role == SERVER:
        options |= SSL.OP_COOKIE_EXCHANGE
    context.set_options(options)
    # Free OpenSSL's record buffers when they are empty rather than keeping
    # them for the association's lifetime: an established association
    # mostly sits idle, and the Key Distributor holds thousands of them.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # Every handshake must be a full one: a resumed session would skip the
    # certificate, and with it the fingerprint check.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_tlsext_use_srtp(openssl_srtp_string(profiles))
    if credentials is not None:
        context.use_certificate(credentials.certificate)
        context.use_privatekey(credentials.private_key)
        context.check_privatekey()
    install_callbacks(context, role)
    return context


def new_connection(context: SSL.Context, mtu: int) -> SSL.Connection:
    connection = SSL.Connection(context, None)
    # With OP_NO_QUERY_MTU OpenSSL keeps this value and fragments handshake
    # messages so that every record fits (check_mtu keeps it above
    # OpenSSL's minimum, under which OpenSSL would ignore it).
    connection.set_ciphertext_mtu(check_mtu(mtu))
    return connection


def error_text(error: Exception) -> str:
    """Readable text of a pyOpenSSL error (the reasons from OpenSSL's queue)."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[-1]) for item in args[0] if item]
        if reasons:
            return "; ".join(reasons)
    text = str(error)
    return text or type(error).__name__


def check_mtu(mtu: int) -> int:
    if not isinstance(mtu, int) or mtu < MIN_MTU or mtu > 65535:
        raise ValueError("mtu must be an integer from {} to 65535".format(MIN_MTU))
    return mtu


def fill(connection: SSL.Connection, data: bytes) -> bool:
    """
    Write ``data`` into the connection's incoming memory BIO; False if
    OpenSSL did not take all of it (a memory BIO fails only when out of
    memory).  BIO_write itself: pyOpenSSL's bio_write adds a buffer
    protocol round trip and its error mapping to every handshake step.
    """
    return _BIO_write(connection._into_ssl, data, len(data)) == len(data)


def drain(connection: SSL.Connection) -> bytes:
    """Everything OpenSSL has written to the connection's memory BIO; never raises."""
    # One BIO_read of what the memory BIO holds (BIO_get_mem_data with no
    # pointer gives its length), rather than pyOpenSSL's bio_read until it
    # raises WantReadError: this runs after every handshake step.
    try:
        bio = connection._from_ssl
        pending = _BIO_get_mem_data(bio, _ffi.NULL)
        if pending <= 0:
            return b""
        buffer = uninitialised("char[]", pending)
        length = _BIO_read(bio, buffer, pending)
        return _ffi.buffer(buffer, length)[:] if length > 0 else b""
    except Exception:  # nothing usable
        return b""


_BIO_get_mem_data = _lib.BIO_get_mem_data
_BIO_read = _lib.BIO_read
_BIO_write = _lib.BIO_write
#: For buffers OpenSSL fills at once (BIO_read, the randoms, the master
#: secret): clearing them first is wasted.
uninitialised = _ffi.new_allocator(should_clear_after_alloc=False)
