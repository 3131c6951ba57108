"""
The one door to pyOpenSSL's private OpenSSL bindings, checked when
:mod:`perc.dtls` is imported.

What pyOpenSSL exposes publicly is used through its API elsewhere; what it
does not (custom extensions, the certificate verification callback's
internals, the error queue) comes from ``OpenSSL._util`` through this
module.  So do the few OpenSSL calls the handshake's hot path makes
itself rather than through pyOpenSSL's wrappers (stepping the handshake,
the memory BIOs, the peer certificate), on a connection's own ``SSL *``
and BIOs (:data:`CONNECTION_ATTRIBUTES`).  A build of pyOpenSSL or
cryptography that lacks one of those symbols fails here, naming every
missing one in one line, rather than in the middle of a handshake.
"""

from __future__ import annotations

import OpenSSL
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from perc.errors import ConfigError

__all__ = ["MissingBindings", "check", "ffi", "lib", "missing"]

#: OpenSSL functions and constants used through ``lib``.
PRIVATE_SYMBOLS = (
    "SSL_CTX_add_client_custom_ext",
    "SSL_CTX_add_server_custom_ext",
    "SSL_CTX_set_verify",
    "SSL_CTX_set_cookie_generate_cb",
    "SSL_CTX_set_cookie_verify_cb",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "X509_STORE_CTX_get_ex_data",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_set_error",
    "X509_up_ref",
    "X509_V_OK",
    "X509_free",
    "ERR_clear_error",
    "SSL_do_handshake",
    "SSL_get_error",
    "SSL_ERROR_WANT_READ",
    "SSL_get_peer_certificate",
    "SSL_get_selected_srtp_profile",
    "BIO_new",
    "BIO_s_mem",
    "BIO_free",
    "BIO_read",
    "BIO_write",
    "BIO_get_mem_data",
    "i2d_X509_bio",
    "SSL_get_current_cipher",
    "SSL_CIPHER_get_name",
    "SSL_get_client_random",
    "SSL_get_server_random",
    "SSL_get_session",
    "SSL_SESSION_get_master_key",
    "DTLSv1_listen",
    "BIO_ADDR_new",
    "BIO_ADDR_free",
)

#: The public pyOpenSSL API perc.dtls needs (some of it depends on the
#: OpenSSL pyOpenSSL was built against), and the private method used:
#: the mapping of a failed SSL_do_handshake to pyOpenSSL's exceptions.
PUBLIC_API = (
    (SSL, "OP_NO_RENEGOTIATION"),
    (SSL, "MODE_RELEASE_BUFFERS"),
    (SSL.Context, "set_mode"),
    (SSL.Connection, "set_ciphertext_mtu"),
    (SSL.Connection, "get_protocol_version"),
    (SSL.Connection, "_raise_ssl_error"),
)

#: What a Connection on memory BIOs holds that perc.dtls reads: its
#: ``SSL *`` and the BIOs into and out of it.
CONNECTION_ATTRIBUTES = ("_ssl", "_into_ssl", "_from_ssl")


class MissingBindings(ConfigError, ImportError):
    """This pyOpenSSL / cryptography build lacks something perc.dtls calls."""


def _name(owner) -> str:
    return getattr(owner, "__qualname__", None) or owner.__name__


def missing(private=lib, public=PUBLIC_API,
            connection_attributes=CONNECTION_ATTRIBUTES) -> list[str]:
    """
    The names of the symbols ``private`` lacks, of the ``public``
    attributes that are absent, and of the ``connection_attributes`` a
    Connection on memory BIOs lacks.
    """
    absent = [name for name in PRIVATE_SYMBOLS if not hasattr(private, name)]
    absent += [f"{_name(owner)}.{attribute}" for owner, attribute in public
               if not hasattr(owner, attribute)]
    connection = SSL.Connection(SSL.Context(SSL.DTLS_METHOD), None)
    absent += [f"Connection().{attribute}" for attribute in connection_attributes
               if not hasattr(connection, attribute)]
    return absent


def check(private=lib, public=PUBLIC_API,
          connection_attributes=CONNECTION_ATTRIBUTES) -> None:
    """Raise :class:`MissingBindings` naming every missing symbol in one line."""
    absent = missing(private, public, connection_attributes)
    if absent:
        raise MissingBindings(
            "perc.dtls cannot run on this pyOpenSSL {} / {}: missing {}".format(
                OpenSSL.__version__,
                SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
                ", ".join(absent)))


check()
