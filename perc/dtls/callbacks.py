"""
OpenSSL's C callbacks (custom extensions, certificate verification,
cookies) and the registry they consult.

The callbacks are created once and shared by every context and SSL object;
each finds the per-association :class:`SslState` by the ``SSL *`` address
it is given.  The registry holds only weak references, so it never keeps an
association alive.  The identity stages run inside these callbacks and
raise :class:`Refusal` to refuse the peer.
"""

from __future__ import annotations

import hmac
import weakref
from typing import Optional

from cryptography import x509
from OpenSSL import SSL

from perc import pki
from perc.dtls.bindings import ffi as _ffi
from perc.dtls.bindings import lib as _lib
from perc.dtls.constants import (
    ALERT_BAD_CERTIFICATE,
    ALERT_DECODE_ERROR,
    ALERT_HANDSHAKE_FAILURE,
    ALERT_ILLEGAL_PARAMETER,
    ALERT_INTERNAL_ERROR,
    CLIENT,
    SERVER,
)
from perc.dtls.extensions import (
    EXTENSIONS,
    EXTERNAL_SESSION_ID,
    SUPPORTED_EKT_CIPHERS,
    ExtensionError,
    decode_external_session_id,
    encode_external_session_id,
)
from perc.dtls.identity import (
    ACCEPT_ALL,
    STAGE_CERTIFICATE,
    STAGE_HELLO,
    Accept,
    Decision,
    IdentityQuery,
    Reject,
)
from perc.ekt import (
    EktError,
    decode_client_ekt_ciphers,
    decode_server_ekt_cipher,
    encode_server_ekt_cipher,
)

# A refusal inside the verify callback cannot name its alert: OpenSSL maps
# the verification error to one.  These three map to bad_certificate,
# handshake_failure and internal_error.
_X509_V_OK = _lib.X509_V_OK
_X509_REJECTED = getattr(_lib, "X509_V_ERR_CERT_REJECTED", 28)
_X509_APPLICATION = getattr(_lib, "X509_V_ERR_APPLICATION_VERIFICATION", 50)
_X509_OUT_OF_MEM = getattr(_lib, "X509_V_ERR_OUT_OF_MEM", 17)

#: alert description -> the verification error OpenSSL turns into it.
_X509_ERROR_FOR_ALERT = {
    ALERT_BAD_CERTIFICATE: _X509_REJECTED,
    ALERT_HANDSHAKE_FAILURE: _X509_APPLICATION,
    ALERT_INTERNAL_ERROR: _X509_OUT_OF_MEM,
}


# --------------------------------------------------------------------------
# Per-SSL state and the registry the C callbacks consult


class Refusal(Exception):
    """Raised inside callback helpers to refuse the handshake."""

    def __init__(self, reason: str, rejected: bool, alert: int, x509_error: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected = rejected
        self.alert = alert
        self.x509_error = x509_error


def _reject(reason: str, alert: int = ALERT_HANDSHAKE_FAILURE) -> Refusal:
    """
    The peer is refused (Closed.rejected).  The alert table (README, Key
    Distributor): handshake_failure for a tls-id that is missing or does
    not match (RFC 8844), bad_certificate for a certificate that is not the
    signalled one (RFC 8122 fingerprint), internal_error for our own failure.
    """
    return Refusal("rejected: " + reason, True, alert,
                   _X509_ERROR_FOR_ALERT.get(alert, _X509_APPLICATION))


class SslState:
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
        "peer_der",
        "peer_x509",
        "certificate_verdict",
        "failure",
        "__weakref__",
    )

    def __init__(self, role: str) -> None:
        self.role = role
        self.association_id = b""
        self.cookie = None
        self.send = {}
        # Buffers handed to OpenSSL by the add callback (see _ext_add).
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
        # The DER of the certificate the verify callback checked.
        self.peer_der = None
        # The X509 the verify callback checked, one reference held: as
        # long as it is held no other certificate can have its address.
        self.peer_x509 = None
        self.certificate_verdict = None
        self.failure = None  # a Refusal, once something refused the peer


#: ``SSL *`` -> weak reference (a :class:`Registration`) to its SslState.
#: Keyed by a non-owning pointer: cffi hashes and compares pointers by
#: address, so the ``SSL *`` a C callback is given finds its entry as it
#: is, with no conversion to an integer (the owning pointer of the
#: connection would keep the SSL object alive).
_registry: dict = {}


class Registration(weakref.ref):
    """The registry's weak reference to an SslState; its key goes with it."""

    __slots__ = ("key",)


def _forget(token: Registration) -> None:
    # The state is gone (its association with it): forget the entry.
    unregister(token)


def register(connection: SSL.Connection, state: SslState) -> Registration:
    """Register ``state`` for ``connection``; returns the token :func:`unregister` needs."""
    token = Registration(state, _forget)
    key = token.key = _ffi.cast("SSL *", connection._ssl)
    # An address can only be reused once the previous SSL is freed, so an
    # existing entry here is stale and may be replaced.
    _registry[key] = token
    return token


def unregister(token: Registration) -> None:
    # Only remove our own entry: the address may already belong to a newer
    # SSL object whose association registered after ours was freed.
    key = token.key
    if _registry.get(key) is token:
        del _registry[key]


def lookup(ssl) -> Optional[SslState]:
    token = _registry.get(ssl)
    return None if token is None else token()


def callback_registry_size() -> int:
    """How many SSL objects the callbacks currently know (diagnostics, tests)."""
    return len(_registry)


def _callback_error(exc_type, exc_value, traceback) -> None:
    # Last line of defence: cffi returns the callback's declared error value.
    # The bodies below catch everything themselves, so this is not expected.
    return None


# --------------------------------------------------------------------------
# Identity stages (run inside callbacks; they raise Refusal to refuse)


def selected_profile_id(ssl) -> Optional[int]:
    """The id (RFC 5764) of the SRTP profile negotiated on ``ssl`` (an ``SSL *``), or None."""
    # Straight from OpenSSL's SRTP_PROTECTION_PROFILE: its id is the RFC's.
    profile = _lib.SSL_get_selected_srtp_profile(ssl)
    return profile.id if profile else None


def check_profile(ssl, state: SslState) -> int:
    """The negotiated SRTP profile's id; Refusal if none or one this side does not allow."""
    profile_id = selected_profile_id(ssl)
    if profile_id is None or profile_id not in state.allowed_profile_ids:
        raise Refusal(
            "no common SRTP protection profile",
            False,
            ALERT_HANDSHAKE_FAILURE,
            _X509_APPLICATION,
        )
    return profile_id


def _ask_hook(state: SslState, stage: str) -> Decision:
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
            stage, type(e).__name__, e), ALERT_INTERNAL_ERROR)
    if isinstance(decision, Reject):
        alert = decision.alert
        if alert is None:
            alert = ALERT_BAD_CERTIFICATE if stage == STAGE_CERTIFICATE \
                else ALERT_HANDSHAKE_FAILURE
        raise _reject(str(decision.reason), alert)
    if not isinstance(decision, Accept):
        raise _reject("identity hook returned {!r}, not Accept or Reject".format(
            type(decision).__name__), ALERT_INTERNAL_ERROR)
    return decision


def _server_hello_stage(ssl, state: SslState) -> None:
    """After the ClientHello: profile negotiated?  identity hook; server tls-id."""
    if state.hello_done:
        return
    state.hello_done = True
    check_profile(ssl, state)
    decision = _ask_hook(state, STAGE_HELLO)
    tls_id = decision.tls_id if decision.tls_id is not None else state.default_tls_id
    if tls_id is not None:
        try:
            state.send[EXTERNAL_SESSION_ID.ext_type] = encode_external_session_id(tls_id)
        except ExtensionError as e:
            raise Refusal("own tls-id unusable: {}".format(e), False,
                           ALERT_INTERNAL_ERROR, _X509_OUT_OF_MEM)


def _client_hello_stage(ssl, state: SslState) -> None:
    """After the ServerHello (checked when the server certificate arrives)."""
    if state.hello_done:
        return
    state.hello_done = True
    check_profile(ssl, state)
    expected = state.expected_peer_tls_id
    if expected is not None and state.peer_tls_id != expected:
        if state.peer_tls_id is None:
            raise _reject("server sent no tls-id (external_session_id)")
        raise _reject("server tls-id does not match the expected one")


def _certificate_stage(ssl, state: SslState, certificate: x509.Certificate) -> None:
    """``certificate`` is the one whose DER is ``state.peer_der``."""
    state.peer_fingerprint = pki.der_fingerprint(state.peer_der)
    state.peer_certificate = certificate
    if state.role == SERVER:
        _server_hello_stage(ssl, state)
        _ask_hook(state, STAGE_CERTIFICATE)
    else:
        _client_hello_stage(ssl, state)
        expected = state.expected_peer_fingerprint
        if expected is not None:
            hash_name = expected.split()[0]
            if pki.der_fingerprint(state.peer_der, hash_name) != expected:
                raise _reject("server certificate fingerprint does not match the expected one",
                              ALERT_BAD_CERTIFICATE)


def _decode_or_refuse(decode, data: bytes, name: str):
    """``decode(data)``; a malformed extension refuses the peer with decode_error."""
    try:
        return decode(data)
    except (ExtensionError, EktError) as e:
        raise Refusal("malformed {} from peer: {}".format(name, e),
                       False, ALERT_DECODE_ERROR, _X509_APPLICATION)


def _parse_external_session_id(ssl, state: SslState, data: bytes) -> None:
    tls_id = _decode_or_refuse(decode_external_session_id, data, "external_session_id")
    state.peer_tls_id = tls_id
    if state.role == SERVER:
        # Custom extensions are parsed after use_srtp, so the profile is
        # already chosen here and the hook can run as early as possible.
        _server_hello_stage(ssl, state)
    elif state.expected_peer_tls_id is not None and tls_id != state.expected_peer_tls_id:
        state.hello_done = True
        raise _reject("server tls-id does not match the expected one")


def _parse_client_ekt_ciphers(ssl, state: SslState, data: bytes) -> None:
    """Server role: the ClientHello's offer; select the first of ours the client offered."""
    offered = _decode_or_refuse(decode_client_ekt_ciphers, data, "supported_ekt_ciphers")
    for cipher in state.ekt_ciphers or ():
        if cipher in offered:
            state.ekt_cipher = cipher
            state.send[SUPPORTED_EKT_CIPHERS.ext_type] = encode_server_ekt_cipher(cipher)
            return


def _parse_server_ekt_cipher(ssl, state: SslState, data: bytes) -> None:
    """
    Client role: the ServerHello's selection.  (OpenSSL itself refuses a
    ServerHello extension the client did not send.)
    """
    selected = _decode_or_refuse(decode_server_ekt_cipher, data, "supported_ekt_ciphers")
    if selected not in (state.ekt_ciphers or ()):
        raise Refusal("rejected: server selected EKT cipher {}, which was not offered".format(
            selected), True, ALERT_ILLEGAL_PARAMETER, _X509_APPLICATION)
    state.ekt_cipher = selected


#: (role, extension type) -> handler(ssl, state, data); raises Refusal.
_PARSERS = {
    (SERVER, EXTERNAL_SESSION_ID.ext_type): _parse_external_session_id,
    (CLIENT, EXTERNAL_SESSION_ID.ext_type): _parse_external_session_id,
    (SERVER, SUPPORTED_EKT_CIPHERS.ext_type): _parse_client_ekt_ciphers,
    (CLIENT, SUPPORTED_EKT_CIPHERS.ext_type): _parse_server_ekt_cipher,
}


# --------------------------------------------------------------------------
# Module-level C callbacks: created once, shared by every context and SSL.

_ADD_CB = _ffi.typeof(_lib.SSL_CTX_add_client_custom_ext).args[2]
_PARSE_CB = _ffi.typeof(_lib.SSL_CTX_add_client_custom_ext).args[5]
_VERIFY_CB = _ffi.typeof(_lib.SSL_CTX_set_verify).args[2]


def _record_failure(state: Optional[SslState], failure: Refusal) -> None:
    if state is not None and state.failure is None:
        state.failure = failure


def _internal(e: BaseException) -> Refusal:
    return Refusal("internal error in DTLS callback: {}: {}".format(type(e).__name__, e),
                    False, ALERT_INTERNAL_ERROR, _X509_OUT_OF_MEM)


def certificate_der(x509_pointer) -> bytes:
    """The DER of an ``X509 *``: pyOpenSSL's dump_certificate without the wrapper object."""
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    if bio == _ffi.NULL:
        raise MemoryError("BIO_new")
    try:
        if _lib.i2d_X509_bio(bio, x509_pointer) != 1:
            raise ValueError("i2d_X509_bio failed")
        data = _ffi.new("char **")
        length = _lib.BIO_get_mem_data(bio, data)
        return _ffi.buffer(data[0], length)[:]
    finally:
        _lib.BIO_free(bio)


@_ffi.callback(_ADD_CB, error=-1, onerror=_callback_error)
def _ext_add(ssl, ext_type, out, outlen, al, add_arg):
    state = None
    try:
        state = lookup(ssl)
        if state is None or state.failure is not None:
            return 0
        value = state.send.get(ext_type)
        if value is None:
            return 0
        # OpenSSL copies the extension into the message as soon as this
        # returns, so the buffer only has to outlive this call; it is kept
        # in the state (until the next one of this type) so that no free
        # callback is needed.
        buffer = _ffi.from_buffer("unsigned char[]", value)
        state.buffers[ext_type] = buffer
        out[0] = buffer
        outlen[0] = len(value)
        return 1
    except Exception as e:
        _record_failure(state, _internal(e))
        al[0] = ALERT_INTERNAL_ERROR
        return -1


@_ffi.callback(_PARSE_CB, error=0, onerror=_callback_error)
def _ext_parse(ssl, ext_type, data, size, al, parse_arg):
    state = None
    try:
        state = lookup(ssl)
        if state is None:
            al[0] = ALERT_INTERNAL_ERROR
            return 0
        if state.failure is not None:
            al[0] = state.failure.alert
            return 0
        raw = _ffi.buffer(data, size)[:] if size else b""
        handler = _PARSERS.get((state.role, ext_type))
        if handler is not None:
            handler(ssl, state, raw)
        return 1
    except Refusal as refusal:
        _record_failure(state, refusal)
        al[0] = refusal.alert
        return 0
    except Exception as e:
        _record_failure(state, _internal(e))
        al[0] = ALERT_INTERNAL_ERROR
        return 0


#: The ex_data index of the SSL in an X509_STORE_CTX: fixed for the process
#: once allocated, which this first call does.
_SSL_INDEX = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
_X509_STORE_CTX_get_ex_data = _lib.X509_STORE_CTX_get_ex_data
_X509_STORE_CTX_set_error = _lib.X509_STORE_CTX_set_error


@_ffi.callback(_VERIFY_CB, error=0, onerror=_callback_error)
def _verify(preverify_ok, store_ctx):
    state = None
    try:
        ssl = _X509_STORE_CTX_get_ex_data(store_ctx, _SSL_INDEX)
        state = lookup(ssl)
        if state is None:
            return 0
        if state.certificate_verdict and state.failure is None:
            # The leaf was checked and accepted: OpenSSL's later calls (its
            # last one with the chain verified, whatever the depth) need
            # nothing more (see the depth rule below).
            _X509_STORE_CTX_set_error(store_ctx, _X509_V_OK)
            return 1
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
                state.peer_x509 = _ffi.gc(raw, _lib.X509_free)
                # What to_cryptography() does, keeping the DER for the
                # check once the handshake is done (peer_der).
                state.peer_der = certificate_der(raw)
                certificate = x509.load_der_x509_certificate(state.peer_der)
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
    except Refusal as refusal:
        _record_failure(state, refusal)
        _lib.X509_STORE_CTX_set_error(store_ctx, refusal.x509_error)
        return 0
    except Exception as e:
        _record_failure(state, _internal(e))
        return 0


# The cookie callbacks are C callbacks like the others (pyOpenSSL's own
# would find the Connection through its reverse mapping and wrap each call;
# OpenSSL calls the verify one twice per association, in DTLSv1_listen and
# again for the ClientHello the handshake re-reads).  They never raise, so
# that one connection's trouble cannot surface in another's DTLSv1_listen.

#: Generated when a connection has no cookie: the verify callback refuses
#: every cookie then, so this one is never accepted.
_NO_COOKIE = b"\x00"
_COOKIE_GENERATE_CB = _ffi.typeof(_lib.SSL_CTX_set_cookie_generate_cb).args[1]
_COOKIE_VERIFY_CB = _ffi.typeof(_lib.SSL_CTX_set_cookie_verify_cb).args[1]


@_ffi.callback(_COOKIE_GENERATE_CB, error=0, onerror=_callback_error)
def _cookie_generate(ssl, out, outlen):
    try:
        state = lookup(ssl)
        cookie = _NO_COOKIE if state is None or state.cookie is None else state.cookie
        # A cookie is an HMAC-SHA256 (32 octets), within OpenSSL's 255.
        _ffi.memmove(out, cookie, len(cookie))
        outlen[0] = len(cookie)
        return 1
    except Exception:
        return 0  # aborts the handshake


@_ffi.callback(_COOKIE_VERIFY_CB, error=0, onerror=_callback_error)
def _cookie_verify(ssl, cookie, length):
    try:
        state = lookup(ssl)
        if state is None or state.cookie is None:
            return 0
        return 1 if hmac.compare_digest(_ffi.buffer(cookie, length)[:], state.cookie) else 0
    except Exception:
        return 0


def install_callbacks(context: SSL.Context, role: str) -> None:
    """
    Put the shared callbacks on a new context: certificate verification
    (the peer must present one; its fingerprint is the identity), the
    custom extensions, and, for the server role, the cookie exchange.
    """
    raw = context._context
    if role == SERVER:
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        _lib.SSL_CTX_set_cookie_generate_cb(raw, _cookie_generate)
        _lib.SSL_CTX_set_cookie_verify_cb(raw, _cookie_verify)
        add_extension = _lib.SSL_CTX_add_server_custom_ext
    else:
        mode = SSL.VERIFY_PEER
        add_extension = _lib.SSL_CTX_add_client_custom_ext
    _lib.SSL_CTX_set_verify(raw, mode, _verify)
    for spec in EXTENSIONS:
        if add_extension(raw, spec.ext_type, _ext_add, _ffi.NULL,
                         _ffi.NULL, _ext_parse, _ffi.NULL) != 1:
            raise RuntimeError("OpenSSL refused custom extension {}".format(spec.ext_type))
