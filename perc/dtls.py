"""
DTLS 1.2 association engine for DTLS-SRTP, in the server role (the Key
Distributor, which terminates endpoints' DTLS arriving through the tunnel)
and the client role (the reference endpoint).

Sans-I/O: bytes in, datagrams and events out.  No reactor, no sockets and no
clock of its own: every call that needs time takes ``now`` (seconds on the
caller's monotonic clock).  Every call that can produce something returns an
:class:`Output` holding the datagrams to send and the events that happened,
so the caller chooses the order (the Key Distributor writes MediaKeys,
derived from :class:`HandshakeComplete`, before it forwards the datagrams of
the same Output, which carry the server's final flight).

One caveat the caller must know: OpenSSL runs its DTLS retransmission timer
on the process's wall clock and offers no way to drive it from outside
(``DTLS_set_timer_cb`` is not exposed by cryptography's bindings).  The
engine therefore converts OpenSSL's *remaining* time into the caller's clock
in :meth:`DtlsAssociation.next_timeout`, and a retransmission only happens
when real time has passed too.  The give-up bounds (retransmission count,
total handshake time) are kept on the caller's clock.

Identity (RFC 8842/8844/8122): certificates are self-signed; identity is the
leaf certificate's fingerprint plus the tls-id carried in the
``external_session_id`` extension (type 56).  The server role asks an
identity hook (:class:`IdentityQuery` -> :class:`Accept` / :class:`Reject`);
the client role checks an optional expected fingerprint and tls-id.

Memory: an OpenSSL DTLS connection keeps about 80 KiB for its whole life.
The server role frees it as soon as the association is established with an
AEAD suite and protects the few later records itself
(:mod:`perc.dtls_records`); see :class:`ServerListener`'s ``compact``.

Nothing here logs; key material only leaves through
:class:`HandshakeComplete`, whose repr hides it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from perc import dtls_records, pki
from perc.ekt import (
    EktCipher,
    EktError,
    decode_client_ekt_ciphers,
    decode_server_ekt_cipher,
    encode_client_ekt_ciphers,
    encode_server_ekt_cipher,
)
from perc.profiles import Profile, SrtpKeys, by_id, openssl_srtp_string

__all__ = [
    "ACCEPT_ALL",
    "Accept",
    "ApplicationData",
    "ClientAssociation",
    "Closed",
    "Credentials",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_RETRANSMISSIONS",
    "DEFAULT_MTU",
    "DtlsAssociation",
    "DtlsEvent",
    "DtlsStateError",
    "EXPORTER_LABEL",
    "EXTERNAL_SESSION_ID",
    "ExtensionError",
    "ExtensionSpec",
    "HandshakeComplete",
    "IdentityQuery",
    "Output",
    "Reject",
    "STAGE_CERTIFICATE",
    "STAGE_HELLO",
    "SUPPORTED_EKT_CIPHERS",
    "ServerAssociation",
    "ServerListener",
    "callback_registry_size",
    "decode_external_session_id",
    "encode_external_session_id",
    "pack_records",
    "split_records",
    "validate_tls_id",
]

#: DTLS 1.2 on the wire (pyOpenSSL has no constant for it).
DTLS1_2_VERSION = 0xFEFD
#: RFC 5764 section 4.2 exporter label; exported with no context.
EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"
DEFAULT_MTU = 1200
DEFAULT_MAX_RETRANSMISSIONS = 6
DEFAULT_HANDSHAKE_TIMEOUT = 30.0

#: OpenSSL refuses smaller MTUs for DTLS.
_MIN_MTU = 256
_RECORD_HEADER = 13
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_HANDSHAKE_FINISHED = 20
_ALERT_LEVEL_WARNING = 1
_ALERT_LEVEL_FATAL = 2

_CLIENT = "client"
_SERVER = "server"

# TLS alert descriptions used by the callbacks.
_ALERT_CLOSE_NOTIFY = 0
_ALERT_HANDSHAKE_FAILURE = 40
_ALERT_ILLEGAL_PARAMETER = 47
_ALERT_ACCESS_DENIED = 49
_ALERT_DECODE_ERROR = 50
_ALERT_INTERNAL_ERROR = 80

# Verification errors whose alerts (bad_certificate, handshake_failure) fit
# an identity rejection and a negotiation failure respectively.
_X509_V_OK = _lib.X509_V_OK
_X509_REJECTED = getattr(_lib, "X509_V_ERR_CERT_REJECTED", 28)
_X509_APPLICATION = getattr(_lib, "X509_V_ERR_APPLICATION_VERIFICATION", 50)

STAGE_HELLO = "hello"
STAGE_CERTIFICATE = "certificate"


class DtlsStateError(RuntimeError):
    """A method was called in a state that does not allow it (a caller bug)."""


class ExtensionError(ValueError):
    """A TLS extension value that is malformed or out of range."""


# --------------------------------------------------------------------------
# Events and output


class DtlsEvent:
    """Base class of everything an association reports."""

    __slots__ = ()


@dataclass(frozen=True)
class HandshakeComplete(DtlsEvent):
    """
    The handshake finished and the peer passed every identity check.

    ``keys`` is the exported keying material split as RFC 5764 says; its
    repr hides the values.  ``peer_fingerprint`` is the sha-256 fingerprint
    of the peer's leaf certificate in RFC 8122 form; ``peer_tls_id`` the
    tls-id the peer sent in extension 56 (None if it sent none).
    ``ekt_cipher`` is the EKT cipher the ServerHello selected in extension
    39 (supported_ekt_ciphers, RFC 8870 section 5.2.1): a
    :class:`perc.ekt.EktCipher` (a plain int for a value perc.ekt does not
    know), None when EKT was not negotiated.
    """

    profile: Profile
    keys: SrtpKeys
    peer_fingerprint: str
    peer_tls_id: Optional[bytes]
    ekt_cipher: Optional[int] = None


@dataclass(frozen=True)
class ApplicationData(DtlsEvent):
    """One application-data record from the peer (may hold secrets: repr hides it)."""

    data: bytes

    def __repr__(self) -> str:
        return "ApplicationData(<{} octets>)".format(len(self.data))


@dataclass(frozen=True)
class Closed(DtlsEvent):
    """
    The association ended; it emits nothing after this.

    ``rejected`` is True when an identity check refused the peer (hook,
    expected tls-id, expected fingerprint); ``reason`` then starts with
    ``"rejected: "``.
    """

    reason: str
    rejected: bool = False


@dataclass(frozen=True)
class Output:
    """What one call produced: datagrams to send (each at most the MTU) and events."""

    datagrams: tuple = ()
    events: tuple = ()


_EMPTY = Output()


# --------------------------------------------------------------------------
# Identity decisions (server role)


@dataclass(frozen=True)
class IdentityQuery:
    """
    What the server-role identity hook is asked.

    ``stage`` is :data:`STAGE_HELLO` (after the ClientHello: ``peer_tls_id``
    known, None when the client sent no extension 56;
    ``peer_fingerprint`` is None) or :data:`STAGE_CERTIFICATE` (after the
    client certificate: both known).  When the client sent no extension 56,
    OpenSSL gives no callback for the missing extension, so the hello stage
    then runs just before the certificate stage.  ``peer_certificate`` (the
    leaf, once known) lets the hook compute a fingerprint with another hash
    than sha-256, as a registration may use one.
    """

    association_id: bytes
    stage: str
    peer_tls_id: Optional[bytes]
    peer_fingerprint: Optional[str]
    peer_certificate: Optional[x509.Certificate] = None


@dataclass(frozen=True)
class Accept:
    """
    Let the handshake continue.  At the hello stage ``tls_id`` (if not None)
    is the server's tls-id to put in the ServerHello, overriding the
    listener's default; at the certificate stage it is ignored.
    """

    tls_id: Optional[bytes] = None


@dataclass(frozen=True)
class Reject:
    """Refuse the peer: the association ends with a fatal alert and Closed(rejected=True)."""

    reason: str


Decision = Union[Accept, Reject]
IdentityHook = Callable[[IdentityQuery], Decision]


def ACCEPT_ALL(query: IdentityQuery) -> Decision:
    """An identity hook for ordinary peers (tests, interop): accept anything."""
    return Accept()


# --------------------------------------------------------------------------
# Credentials


class Credentials:
    """
    A certificate and its private key, converted once for OpenSSL.
    ``fingerprint`` is the certificate's sha-256 fingerprint (RFC 8122).
    """

    def __init__(self, certificate: x509.Certificate, private_key) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.fingerprint = pki.fingerprint(certificate)
        # Contexts are cached per certificate; its DER identifies it.
        self.cache_key = hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()

    @classmethod
    def self_signed(cls, common_name: str = "perc") -> "Credentials":
        """New self-signed credentials (a fresh P-256 key)."""
        certificate, key = pki.self_signed_certificate(common_name)
        return cls(certificate, key)

    def __repr__(self) -> str:
        return "<Credentials {}>".format(self.fingerprint)


# --------------------------------------------------------------------------
# Record framing


def split_records(data: bytes) -> list:
    """
    Split concatenated DTLS records (13-octet header, length at offset 11)
    into a list of records.  A truncated tail is returned as a last, short
    element rather than dropped, so nothing disappears silently.
    """
    records = []
    offset = 0
    total = len(data)
    while offset < total:
        if total - offset < _RECORD_HEADER:
            records.append(data[offset:])
            break
        length = int.from_bytes(data[offset + 11 : offset + 13], "big")
        end = offset + _RECORD_HEADER + length
        records.append(data[offset:end])
        offset = end
    return records


def pack_records(records: Iterable[bytes], mtu: int) -> list:
    """
    Pack whole records, in order, into datagrams of at most ``mtu`` octets.
    A record larger than ``mtu`` travels alone.
    """
    datagrams = []
    current = bytearray()
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(bytes(current))
            current = bytearray()
        current += record
    if current:
        datagrams.append(bytes(current))
    return datagrams


# --------------------------------------------------------------------------
# Extension 56: external_session_id (RFC 8844)

_TLS_ID = re.compile(rb"^[A-Za-z0-9+/\-_]{20,255}$")


def validate_tls_id(tls_id: bytes) -> bytes:
    """Return ``tls_id`` if it is 20..255 characters of ``A-Za-z0-9+/-_``; else raise ExtensionError."""
    if not isinstance(tls_id, bytes):
        raise ExtensionError("tls-id must be bytes")
    if not _TLS_ID.match(tls_id):
        raise ExtensionError(
            "tls-id must be 20 to 255 characters from A-Za-z0-9+/-_ (got {} octets)".format(
                len(tls_id)
            )
        )
    return tls_id


def encode_external_session_id(tls_id: bytes) -> bytes:
    """
    extension_data of ``external_session_id``: RFC 8844 defines it as
    ``opaque session_id<20..255>``, i.e. one length octet, then the tls-id.
    """
    validate_tls_id(tls_id)
    return bytes([len(tls_id)]) + tls_id


def decode_external_session_id(data: bytes) -> bytes:
    """Inverse of :func:`encode_external_session_id`; raises ExtensionError."""
    if len(data) < 1 or data[0] != len(data) - 1:
        raise ExtensionError("external_session_id length prefix does not match its data")
    return validate_tls_id(bytes(data[1:]))


@dataclass(frozen=True)
class ExtensionSpec:
    """
    A ClientHello/ServerHello extension handled through OpenSSL's custom
    extension API.  Every spec in the registry is registered on every
    context; per association, ``_SslState.send[ext_type]`` holds the encoded
    value to send (absent = do not send) and ``_PARSERS[(role, ext_type)]``
    handles what the peer sent.
    """

    ext_type: int
    name: str


EXTERNAL_SESSION_ID = ExtensionSpec(56, "external_session_id")
SUPPORTED_EKT_CIPHERS = ExtensionSpec(39, "supported_ekt_ciphers")

_EXTENSIONS: tuple = (EXTERNAL_SESSION_ID, SUPPORTED_EKT_CIPHERS)


def _normalise_ekt_ciphers(ciphers) -> Optional[tuple]:
    """
    ``ekt_ciphers`` as given to the client or server role: None, or a
    non-empty sequence of cipher values 1..254 (order = preference),
    returned as a tuple of ints without duplicates.  EktError (a
    ValueError) otherwise.
    """
    if ciphers is None:
        return None
    if isinstance(ciphers, (str, bytes, bytearray)) or not isinstance(ciphers, Iterable):
        raise TypeError("ekt_ciphers must be a sequence of cipher values")
    given = list(ciphers)
    # Validates every value and the count.
    encode_client_ekt_ciphers(given)
    values = []
    for value in given:
        if value not in values:
            values.append(int(value))
    return tuple(values)


def _ekt_cipher_value(value: int):
    try:
        return EktCipher(value)
    except ValueError:
        return value


# --------------------------------------------------------------------------
# Per-SSL state and the registry the C callbacks consult


class _Refusal(Exception):
    """Raised inside callback helpers to refuse the handshake."""

    def __init__(self, reason: str, rejected: bool, alert: int, x509_error: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected = rejected
        self.alert = alert
        self.x509_error = x509_error


def _reject(reason: str) -> _Refusal:
    return _Refusal("rejected: " + reason, True, _ALERT_ACCESS_DENIED, _X509_REJECTED)


class _SslState:
    """
    What the module-level callbacks need for one SSL object.  It holds no
    reference to its association or connection, so the registry (which only
    holds weak references to these) never keeps an association alive.
    """

    __slots__ = (
        "role",
        "association_id",
        "cookie",
        "send",
        "received",
        "buffers",
        "identity_hook",
        "default_tls_id",
        "expected_peer_tls_id",
        "expected_peer_fingerprint",
        "allowed_profile_ids",
        "ekt_ciphers",
        "ekt_cipher",
        "hello_done",
        "peer_tls_id",
        "peer_fingerprint",
        "peer_certificate",
        "certificate_verdict",
        "failure",
        "__weakref__",
    )

    def __init__(self, role: str) -> None:
        self.role = role
        self.association_id = b""
        self.cookie = None
        self.send = {}
        self.received = {}
        # Buffers handed to OpenSSL by the add callback, kept alive until the
        # free callback runs.
        self.buffers = {}
        self.identity_hook = None
        self.default_tls_id = None
        self.expected_peer_tls_id = None
        self.expected_peer_fingerprint = None
        self.allowed_profile_ids = frozenset()
        # EKT ciphers offered (client) or supported (server), None = no EKT;
        # ekt_cipher is the one the ServerHello selected.
        self.ekt_ciphers = None
        self.ekt_cipher = None
        self.hello_done = False
        self.peer_tls_id = None
        self.peer_fingerprint = None
        self.peer_certificate = None
        self.certificate_verdict = None
        self.failure = None  # a _Refusal, once something refused the peer


#: ``SSL *`` address -> weak reference to its _SslState.
_registry: dict = {}


def _address(ssl) -> int:
    return int(_ffi.cast("uintptr_t", ssl))


def _register(ssl, state: _SslState):
    """Register ``state`` for ``ssl``; returns the token :func:`_unregister` needs."""
    token = weakref.ref(state)
    # An address can only be reused once the previous SSL is freed, so an
    # existing entry here is stale and may be replaced.
    _registry[_address(ssl)] = token
    return token


def _unregister(address: int, token) -> None:
    # Only remove our own entry: the address may already belong to a newer
    # SSL object whose association registered after ours was freed.
    if _registry.get(address) is token:
        del _registry[address]


def _lookup(ssl) -> Optional[_SslState]:
    token = _registry.get(_address(ssl))
    return None if token is None else token()


def callback_registry_size() -> int:
    """How many SSL objects the callbacks currently know (diagnostics, tests)."""
    return len(_registry)


def _callback_error(exc_type, exc_value, traceback) -> None:
    # Last line of defence: cffi returns the callback's declared error value.
    # The bodies below catch everything themselves, so this is not expected.
    return None


# --------------------------------------------------------------------------
# Identity stages (run inside callbacks; they raise _Refusal to refuse)


def _selected_profile_id(ssl) -> Optional[int]:
    selected = _lib.SSL_get_selected_srtp_profile(ssl)
    if selected == _ffi.NULL:
        return None
    return int(selected.id)


def _check_profile(ssl, state: _SslState) -> None:
    profile_id = _selected_profile_id(ssl)
    if profile_id is None or profile_id not in state.allowed_profile_ids:
        raise _Refusal(
            "no common SRTP protection profile",
            False,
            _ALERT_HANDSHAKE_FAILURE,
            _X509_APPLICATION,
        )


def _ask_hook(state: _SslState, stage: str) -> Decision:
    hook = state.identity_hook or ACCEPT_ALL
    query = IdentityQuery(
        association_id=state.association_id,
        stage=stage,
        peer_tls_id=state.peer_tls_id,
        peer_fingerprint=state.peer_fingerprint,
        peer_certificate=state.peer_certificate,
    )
    try:
        decision = hook(query)
    except Exception as e:
        raise _reject("identity hook failed at {} stage: {}: {}".format(
            stage, type(e).__name__, e))
    if isinstance(decision, Reject):
        raise _reject(str(decision.reason))
    if not isinstance(decision, Accept):
        raise _reject("identity hook returned {!r}, not Accept or Reject".format(
            type(decision).__name__))
    return decision


def _server_hello_stage(ssl, state: _SslState) -> None:
    """After the ClientHello: profile negotiated?  identity hook; server tls-id."""
    if state.hello_done:
        return
    state.hello_done = True
    _check_profile(ssl, state)
    decision = _ask_hook(state, STAGE_HELLO)
    tls_id = decision.tls_id if decision.tls_id is not None else state.default_tls_id
    if tls_id is not None:
        try:
            state.send[EXTERNAL_SESSION_ID.ext_type] = encode_external_session_id(tls_id)
        except ExtensionError as e:
            raise _Refusal("own tls-id unusable: {}".format(e), False,
                           _ALERT_INTERNAL_ERROR, _X509_APPLICATION)


def _client_hello_stage(ssl, state: _SslState) -> None:
    """After the ServerHello (checked when the server certificate arrives)."""
    if state.hello_done:
        return
    state.hello_done = True
    _check_profile(ssl, state)
    expected = state.expected_peer_tls_id
    if expected is not None and state.peer_tls_id != expected:
        if state.peer_tls_id is None:
            raise _reject("server sent no tls-id (external_session_id)")
        raise _reject("server tls-id does not match the expected one")


def _certificate_stage(ssl, state: _SslState, certificate: x509.Certificate) -> None:
    state.peer_fingerprint = pki.fingerprint(certificate)
    state.peer_certificate = certificate
    if state.role == _SERVER:
        _server_hello_stage(ssl, state)
        _ask_hook(state, STAGE_CERTIFICATE)
    else:
        _client_hello_stage(ssl, state)
        expected = state.expected_peer_fingerprint
        if expected is not None:
            hash_name = expected.split()[0]
            if pki.fingerprint(certificate, hash_name) != expected:
                raise _reject("server certificate fingerprint does not match the expected one")


def _decode_or_refuse(decode, data: bytes, name: str):
    """``decode(data)``; a malformed extension refuses the peer with decode_error."""
    try:
        return decode(data)
    except (ExtensionError, EktError) as e:
        raise _Refusal("malformed {} from peer: {}".format(name, e),
                       False, _ALERT_DECODE_ERROR, _X509_APPLICATION)


def _parse_external_session_id(ssl, state: _SslState, data: bytes) -> None:
    tls_id = _decode_or_refuse(decode_external_session_id, data, "external_session_id")
    state.peer_tls_id = tls_id
    if state.role == _SERVER:
        # Custom extensions are parsed after use_srtp, so the profile is
        # already chosen here and the hook can run as early as possible.
        _server_hello_stage(ssl, state)
    elif state.expected_peer_tls_id is not None and tls_id != state.expected_peer_tls_id:
        state.hello_done = True
        raise _reject("server tls-id does not match the expected one")


def _parse_client_ekt_ciphers(ssl, state: _SslState, data: bytes) -> None:
    """Server role: the ClientHello's offer; select the first of ours the client offered."""
    offered = _decode_or_refuse(decode_client_ekt_ciphers, data, "supported_ekt_ciphers")
    for cipher in state.ekt_ciphers or ():
        if cipher in offered:
            state.ekt_cipher = cipher
            state.send[SUPPORTED_EKT_CIPHERS.ext_type] = encode_server_ekt_cipher(cipher)
            return


def _parse_server_ekt_cipher(ssl, state: _SslState, data: bytes) -> None:
    """
    Client role: the ServerHello's selection.  (OpenSSL itself refuses a
    ServerHello extension the client did not send.)
    """
    selected = _decode_or_refuse(decode_server_ekt_cipher, data, "supported_ekt_ciphers")
    if selected not in (state.ekt_ciphers or ()):
        raise _Refusal("rejected: server selected EKT cipher {}, which was not offered".format(
            selected), True, _ALERT_ILLEGAL_PARAMETER, _X509_APPLICATION)
    state.ekt_cipher = selected


#: (role, extension type) -> handler(ssl, state, data); raises _Refusal.
_PARSERS = {
    (_SERVER, EXTERNAL_SESSION_ID.ext_type): _parse_external_session_id,
    (_CLIENT, EXTERNAL_SESSION_ID.ext_type): _parse_external_session_id,
    (_SERVER, SUPPORTED_EKT_CIPHERS.ext_type): _parse_client_ekt_ciphers,
    (_CLIENT, SUPPORTED_EKT_CIPHERS.ext_type): _parse_server_ekt_cipher,
}


# --------------------------------------------------------------------------
# Module-level C callbacks: created once, shared by every context and SSL.

_ADD_CB = _ffi.typeof(_lib.SSL_CTX_add_client_custom_ext).args[2]
_FREE_CB = _ffi.typeof(_lib.SSL_CTX_add_client_custom_ext).args[3]
_PARSE_CB = _ffi.typeof(_lib.SSL_CTX_add_client_custom_ext).args[5]
_VERIFY_CB = _ffi.typeof(_lib.SSL_CTX_set_verify).args[2]
_COOKIE_GEN_CB = _ffi.typeof(_lib.SSL_CTX_set_cookie_generate_cb).args[1]
_COOKIE_VERIFY_CB = _ffi.typeof(_lib.SSL_CTX_set_cookie_verify_cb).args[1]


def _record_failure(state: Optional[_SslState], failure: _Refusal) -> None:
    if state is not None and state.failure is None:
        state.failure = failure


def _internal(e: BaseException) -> _Refusal:
    return _Refusal("internal error in DTLS callback: {}: {}".format(type(e).__name__, e),
                    False, _ALERT_INTERNAL_ERROR, _X509_APPLICATION)


@_ffi.callback(_ADD_CB, error=-1, onerror=_callback_error)
def _ext_add(ssl, ext_type, out, outlen, al, add_arg):
    state = None
    try:
        state = _lookup(ssl)
        if state is None or state.failure is not None:
            return 0
        value = state.send.get(ext_type)
        if value is None:
            return 0
        buffer = _ffi.new("unsigned char[]", max(len(value), 1))
        _ffi.memmove(buffer, value, len(value))
        state.buffers[ext_type] = buffer
        out[0] = buffer
        outlen[0] = len(value)
        return 1
    except Exception as e:
        _record_failure(state, _internal(e))
        al[0] = _ALERT_INTERNAL_ERROR
        return -1


@_ffi.callback(_FREE_CB, onerror=_callback_error)
def _ext_free(ssl, ext_type, out, add_arg):
    try:
        state = _lookup(ssl)
        if state is not None:
            state.buffers.pop(ext_type, None)
    except Exception:
        pass


@_ffi.callback(_PARSE_CB, error=0, onerror=_callback_error)
def _ext_parse(ssl, ext_type, data, size, al, parse_arg):
    state = None
    try:
        state = _lookup(ssl)
        if state is None:
            al[0] = _ALERT_INTERNAL_ERROR
            return 0
        if state.failure is not None:
            al[0] = state.failure.alert
            return 0
        raw = bytes(_ffi.buffer(data, size)) if size else b""
        state.received[ext_type] = raw
        handler = _PARSERS.get((state.role, ext_type))
        if handler is not None:
            handler(ssl, state, raw)
        return 1
    except _Refusal as refusal:
        _record_failure(state, refusal)
        al[0] = refusal.alert
        return 0
    except Exception as e:
        _record_failure(state, _internal(e))
        al[0] = _ALERT_INTERNAL_ERROR
        return 0


@_ffi.callback(_VERIFY_CB, error=0, onerror=_callback_error)
def _verify(preverify_ok, store_ctx):
    state = None
    try:
        ssl = _lib.X509_STORE_CTX_get_ex_data(
            store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
        )
        state = _lookup(ssl)
        if state is None:
            return 0
        if _lib.X509_STORE_CTX_get_error_depth(store_ctx) != 0:
            # Identity is the leaf's fingerprint, not a CA chain: whatever
            # the chain above the leaf looks like is irrelevant.
            _lib.X509_STORE_CTX_set_error(store_ctx, _X509_V_OK)
            return 1
        if state.certificate_verdict is None:
            # OpenSSL may call us several times for the leaf (once per
            # error); decide once.
            state.certificate_verdict = False
            if state.failure is None:
                raw = _lib.X509_STORE_CTX_get_current_cert(store_ctx)
                _lib.X509_up_ref(raw)
                certificate = crypto.X509._from_raw_x509_ptr(raw).to_cryptography()
                ssl_ptr = _ffi.cast("SSL *", ssl)
                _certificate_stage(ssl_ptr, state, certificate)
                state.certificate_verdict = True
        if state.certificate_verdict and state.failure is None:
            _lib.X509_STORE_CTX_set_error(store_ctx, _X509_V_OK)
            return 1
        failure = state.failure
        _lib.X509_STORE_CTX_set_error(
            store_ctx, failure.x509_error if failure is not None else _X509_REJECTED
        )
        return 0
    except _Refusal as refusal:
        _record_failure(state, refusal)
        _lib.X509_STORE_CTX_set_error(store_ctx, refusal.x509_error)
        return 0
    except Exception as e:
        _record_failure(state, _internal(e))
        return 0


@_ffi.callback(_COOKIE_GEN_CB, error=0, onerror=_callback_error)
def _cookie_generate(ssl, out, outlen):
    try:
        state = _lookup(ssl)
        if state is None or state.cookie is None:
            return 0
        cookie = state.cookie
        _ffi.memmove(out, cookie, len(cookie))
        outlen[0] = len(cookie)
        return 1
    except Exception:
        return 0


@_ffi.callback(_COOKIE_VERIFY_CB, error=0, onerror=_callback_error)
def _cookie_verify(ssl, cookie, length):
    try:
        state = _lookup(ssl)
        if state is None or state.cookie is None:
            return 0
        received = bytes(_ffi.buffer(cookie, length))
        return 1 if hmac.compare_digest(received, state.cookie) else 0
    except Exception:
        return 0


# --------------------------------------------------------------------------
# SSL contexts, cached per (role, profile set, certificate)

_CONTEXT_CACHE_SIZE = 64
_contexts: "OrderedDict[tuple, SSL.Context]" = OrderedDict()


def _normalise_profiles(profiles: Iterable[Profile]) -> tuple:
    result = []
    for profile in profiles:
        if not isinstance(profile, Profile):
            raise TypeError("profiles must be perc.profiles.Profile objects")
        if profile not in result:
            result.append(profile)
    if not result:
        raise ValueError("at least one SRTP protection profile is needed")
    return tuple(result)


def _context(role: str, profiles: tuple, credentials: Optional[Credentials]) -> SSL.Context:
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
    options = SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET | _lib.SSL_OP_NO_RENEGOTIATION
    if role == _SERVER:
        options |= SSL.OP_COOKIE_EXCHANGE
    context.set_options(options)
    # Free OpenSSL's record buffers when they are empty rather than keeping
    # them for the association's lifetime: an established association
    # mostly sits idle, and the Key Distributor holds thousands of them.
    _lib.SSL_CTX_set_mode(context._context, _lib.SSL_MODE_RELEASE_BUFFERS)
    # Every handshake must be a full one: a resumed session would skip the
    # certificate, and with it the fingerprint check.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_tlsext_use_srtp(openssl_srtp_string(profiles))
    if credentials is not None:
        context.use_certificate(credentials.certificate)
        context.use_privatekey(credentials.private_key)
        context.check_privatekey()
    if role == _SERVER:
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        _lib.SSL_CTX_set_cookie_generate_cb(context._context, _cookie_generate)
        _lib.SSL_CTX_set_cookie_verify_cb(context._context, _cookie_verify)
        add_extension = _lib.SSL_CTX_add_server_custom_ext
    else:
        mode = SSL.VERIFY_PEER
        add_extension = _lib.SSL_CTX_add_client_custom_ext
    _lib.SSL_CTX_set_verify(context._context, mode, _verify)
    for spec in _EXTENSIONS:
        if add_extension(context._context, spec.ext_type, _ext_add, _ext_free,
                         _ffi.NULL, _ext_parse, _ffi.NULL) != 1:
            raise RuntimeError("OpenSSL refused custom extension {}".format(spec.ext_type))
    return context


def _new_connection(context: SSL.Context, mtu: int) -> SSL.Connection:
    connection = SSL.Connection(context, None)
    # With OP_NO_QUERY_MTU OpenSSL keeps this value and fragments handshake
    # messages so that every record fits.
    if not _lib.SSL_set_mtu(connection._ssl, mtu):
        raise ValueError("OpenSSL refused MTU {}".format(mtu))
    return connection


def _error_text(error: Exception) -> str:
    """Readable text of a pyOpenSSL error (the reasons from OpenSSL's queue)."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[-1]) for item in args[0] if item]
        if reasons:
            return "; ".join(reasons)
    text = str(error)
    return text or type(error).__name__


def _check_mtu(mtu: int) -> int:
    if not isinstance(mtu, int) or mtu < _MIN_MTU or mtu > 65535:
        raise ValueError("mtu must be an integer from {} to 65535".format(_MIN_MTU))
    return mtu


# --------------------------------------------------------------------------
# Associations

_HANDSHAKING = "handshaking"
_ESTABLISHED = "established"
_CLOSED = "closed"


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
    #: Leave OpenSSL for dtls_records once established (server role only).
    _compact_when_established = False

    def __init__(self, *, context: SSL.Context, connection: SSL.Connection,
                 state: _SslState, profiles: tuple, mtu: int,
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
        # Set once an established association has left OpenSSL (server role,
        # see _compact): its record protection and the final flight to
        # repeat if the peer shows it never got it.
        self._records: Optional[dtls_records.RecordProtection] = None
        self._final_flight: tuple = ()
        self._final_flight_resends = 0
        address = _address(connection._ssl)
        token = _register(connection._ssl, state)
        # Runs when the association is closed or garbage collected, whichever
        # comes first; it holds nothing that refers back to the association.
        self._finalizer = weakref.finalize(self, _unregister, address, token)

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
        return None if value is None else _ekt_cipher_value(value)

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
            return _EMPTY
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
            return _EMPTY
        if self._records is not None:
            return self._receive_compacted(datagram)
        self._started = True
        self._mark_started(now)
        try:
            _lib.ERR_clear_error()
            self._conn.bio_write(bytes(datagram))
            self._drive()
        except Exception as e:  # never let the peer's bytes raise out of here
            self._fail("internal error: {}: {}".format(type(e).__name__, e))
        output = self._collect()
        if self._phase == _ESTABLISHED and self._closing is None and self._conn is not None \
                and self._compact_when_established:
            self._compact(datagram, output)
        return output

    def next_timeout(self, now: float) -> Optional[float]:
        """
        Absolute time (caller's clock) at which :meth:`handle_timeout` should
        be called, or None if no timer is running.
        """
        if self.closed or self._records is not None:
            return None
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
        if self.closed or self._records is not None:
            return _EMPTY
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
            return _EMPTY
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
            return _EMPTY
        if self._phase != _ESTABLISHED:
            raise DtlsStateError("application data before the handshake completed")
        if self._records is not None:
            limit = self._records.max_plaintext(self._mtu)
            if len(data) > limit:
                raise ValueError("{} octets do not fit one record under MTU {} (limit {})".format(
                    len(data), self._mtu, limit))
            return self._send_compacted(dtls_records.CONTENT_APPLICATION_DATA, data) \
                if data else _EMPTY
        limit = self._conn.get_cleartext_mtu()
        if len(data) > limit:
            raise ValueError("{} octets do not fit one record under MTU {} (limit {})".format(
                len(data), self._mtu, limit))
        if not data:
            return _EMPTY
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
            return _EMPTY
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
        if self._phase == _ESTABLISHED and self._closing is None:
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
                raise _Refusal("negotiated {} instead of DTLS 1.2".format(
                    self._conn.get_protocol_version_name()), False, 0, 0)
            _check_profile(self._conn._ssl, state)
            profile = by_id(_selected_profile_id(self._conn._ssl))
            # Fail closed if, for any reason, the certificate never went
            # through our checks or is not the one OpenSSL kept.
            certificate = self._conn.get_peer_certificate(as_cryptography=True)
            if certificate is None or not state.certificate_verdict:
                raise _Refusal("peer certificate was not checked", False, 0, 0)
            if pki.fingerprint(certificate) != state.peer_fingerprint:
                raise _Refusal("peer certificate changed during the handshake", False, 0, 0)
            if state.role == _SERVER and not state.hello_done:
                raise _Refusal("identity was not checked", False, 0, 0)
            material = self._conn.export_keying_material(
                EXPORTER_LABEL, profile.keying_material_length)
            keys = profile.split(material)
        except _Refusal as refusal:
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
            ekt_cipher=None if state.ekt_cipher is None else _ekt_cipher_value(state.ekt_cipher),
        ))

    def _fail_from_error(self, error: Exception) -> None:
        failure = self._state.failure
        if failure is not None:
            self._end(Closed(failure.reason, failure.rejected))
            return
        text = _error_text(error)
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
        datagrams = tuple(pack_records(split_records(data), self._mtu)) if data else ()
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

    def _compact(self, datagram: bytes, output: Output) -> None:
        """
        Hand the just-established association to dtls_records and free the
        OpenSSL connection (about 80 KiB that would otherwise stay for the
        association's life).  Kept on OpenSSL: suites dtls_records does not
        handle, and anything unexpected about the final flight.
        """
        conn = self._conn
        suite = dtls_records.suite_for(conn.get_cipher_name())
        if suite is None:
            return
        # The final flight (ChangeCipherSpec, Finished) is in this output;
        # its Finished used the epoch's first sequence numbers.
        epoch = None
        next_sequence = 0
        for record in split_records(b"".join(output.datagrams)):
            header = dtls_records.record_epoch_and_sequence(record)
            if header is not None and header[0] > 0:
                epoch = header[0]
                next_sequence = max(next_sequence, header[1] + 1)
        if epoch is None:
            return
        try:
            records = dtls_records.RecordProtection.from_master_secret(
                suite, server=True, master_secret=conn.master_key(),
                client_random=conn.client_random(), server_random=conn.server_random(),
                epoch=epoch, next_write_sequence=next_sequence)
        except Exception:
            return
        # The peer's records OpenSSL just read (its Finished, perhaps data
        # after it) enter the replay window, so they cannot be replayed.
        for record in split_records(bytes(datagram)):
            records.open(record)
        self._records = records
        self._final_flight = output.datagrams
        state = self._state
        state.peer_certificate = None
        state.received = {}
        state.send = {}
        self._finalizer()
        self._conn = None
        self._context = None

    def _receive_compacted(self, datagram: bytes) -> Output:
        try:
            for record in split_records(bytes(datagram)):
                opened = self._records.open(record)
                if opened is None:
                    continue  # other epoch, forged, replayed: DTLS discards it
                content_type, plaintext = opened
                if content_type == dtls_records.CONTENT_APPLICATION_DATA:
                    if plaintext:
                        self._events.append(ApplicationData(plaintext))
                elif content_type == dtls_records.CONTENT_ALERT:
                    output = self._alert_received(plaintext)
                    if output is not None:
                        return output
                elif content_type == dtls_records.CONTENT_HANDSHAKE and plaintext[:1] == \
                        bytes((_HANDSHAKE_FINISHED,)):
                    # The peer's retransmitted Finished: it never got ours.
                    if self._final_flight_resends < self._max_retransmissions:
                        self._final_flight_resends += 1
                        return self._collect_with(self._final_flight)
                # Anything else (a renegotiation attempt) is ignored, as
                # OP_NO_RENEGOTIATION would have it.
        except Exception as e:  # never let the peer's bytes raise out of here
            return self._close_compacted(
                Closed("internal error: {}: {}".format(type(e).__name__, e), False),
                notify=False)
        return self._collect()

    def _alert_received(self, plaintext: bytes) -> Optional[Output]:
        if len(plaintext) != 2:
            return self._close_compacted(Closed("association failed: malformed alert", False),
                                         notify=False)
        level, description = plaintext
        if description == _ALERT_CLOSE_NOTIFY:
            # Answer close_notify with our own, as TLS asks.
            return self._close_compacted(
                Closed("peer closed the association (close_notify)", False))
        if level == _ALERT_LEVEL_FATAL:
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

    def _close_compacted(self, event: Closed, notify: bool = True) -> Output:
        datagrams = ()
        if notify:
            try:
                datagrams = (self._records.seal(dtls_records.CONTENT_ALERT,
                                                bytes((_ALERT_LEVEL_WARNING, _ALERT_CLOSE_NOTIFY))),)
            except OverflowError:
                pass
        self._end(event)
        self._records = None
        self._final_flight = ()
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

    Call :meth:`start` to get the first flight.
    """

    role = _CLIENT

    def __init__(self, credentials: Optional[Credentials], profiles: Iterable[Profile], *,
                 tls_id: Optional[bytes] = None,
                 expected_peer_tls_id: Optional[bytes] = None,
                 expected_peer_fingerprint: Optional[str] = None,
                 ekt_ciphers: Optional[Iterable[int]] = None,
                 mtu: int = DEFAULT_MTU,
                 max_retransmissions: int = DEFAULT_MAX_RETRANSMISSIONS,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        profiles = _normalise_profiles(profiles)
        _check_mtu(mtu)
        state = _SslState(_CLIENT)
        state.allowed_profile_ids = frozenset(p.id for p in profiles)
        if tls_id is not None:
            state.send[EXTERNAL_SESSION_ID.ext_type] = encode_external_session_id(tls_id)
        state.ekt_ciphers = _normalise_ekt_ciphers(ekt_ciphers)
        if state.ekt_ciphers is not None:
            state.send[SUPPORTED_EKT_CIPHERS.ext_type] = encode_client_ekt_ciphers(
                state.ekt_ciphers)
        if expected_peer_tls_id is not None:
            state.expected_peer_tls_id = validate_tls_id(expected_peer_tls_id)
        if expected_peer_fingerprint is not None:
            state.expected_peer_fingerprint = pki.normalise_fingerprint(expected_peer_fingerprint)
        context = _context(_CLIENT, profiles, credentials)
        connection = _new_connection(context, mtu)
        connection.set_connect_state()
        super().__init__(context=context, connection=connection, state=state,
                         profiles=profiles, mtu=mtu,
                         max_retransmissions=max_retransmissions,
                         handshake_timeout=handshake_timeout)


class ServerAssociation(DtlsAssociation):
    """
    The Key Distributor side of one association; made by
    :meth:`ServerListener.listen` once a ClientHello with a valid cookie
    arrived.  Call :meth:`start` to process that ClientHello (the identity
    hook's hello stage runs then) and get the server's flight.
    """

    role = _SERVER

    def __init__(self, *, association_id: bytes, compact: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.association_id = association_id
        self._compact_when_established = compact


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
    its later records itself (:mod:`perc.dtls_records`); it still answers a
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
        self.profiles = _normalise_profiles(profiles)
        self.identity_hook = identity_hook
        self.tls_id = None if tls_id is None else validate_tls_id(tls_id)
        self.ekt_ciphers = _server_ekt_ciphers(ekt_ciphers)
        self.mtu = _check_mtu(mtu)
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
        profiles = self.profiles if profiles is None else _normalise_profiles(profiles)
        if tls_id is not None:
            validate_tls_id(tls_id)
        ekt_ciphers = self.ekt_ciphers if ekt_ciphers is None else _server_ekt_ciphers(ekt_ciphers)
        context = _context(_SERVER, profiles, self.credentials)
        connection = _new_connection(context, self.mtu)
        connection.set_accept_state()
        state = _SslState(_SERVER)
        state.association_id = bytes(association_id)
        state.cookie = self.cookie_for(association_id)
        address = _address(connection._ssl)
        token = _register(connection._ssl, state)
        try:
            _lib.ERR_clear_error()
            connection.bio_write(bytes(datagram))
            try:
                connection.DTLSv1_listen()
            except SSL.WantReadError:
                # No valid cookie: OpenSSL wrote a HelloVerifyRequest (or
                # nothing, for junk).  Nothing of this attempt is kept.
                return tuple(pack_records(split_records(_drain(connection)), self.mtu)), None
            except Exception:
                return (), None
        finally:
            _unregister(address, token)
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


def _server_ekt_ciphers(ciphers) -> Optional[tuple]:
    """The server's supported EKT ciphers: None for None or an empty sequence."""
    if ciphers is not None and not isinstance(ciphers, (str, bytes, bytearray)) \
            and isinstance(ciphers, Iterable):
        ciphers = tuple(ciphers)
        if not ciphers:
            return None
    return _normalise_ekt_ciphers(ciphers)


def _looks_like_client_hello(datagram) -> bool:
    # Cheap filter before creating any OpenSSL object: an epoch-0 handshake
    # record whose message is a ClientHello.
    return (
        isinstance(datagram, (bytes, bytearray, memoryview))
        and len(datagram) >= _RECORD_HEADER + 12
        and datagram[0] == _CONTENT_HANDSHAKE
        and datagram[1] == 0xFE
        and datagram[3] == 0
        and datagram[4] == 0
        and datagram[_RECORD_HEADER] == _HANDSHAKE_CLIENT_HELLO
    )


def _drain(connection: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunk = connection.bio_read(65536)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
