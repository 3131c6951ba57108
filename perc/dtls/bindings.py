"""
The one door to pyOpenSSL's private OpenSSL bindings, checked when
:mod:`perc.dtls` is imported.

What pyOpenSSL exposes publicly is used through its API elsewhere; what it
does not (custom extensions, the certificate verification callback's
internals, the error queue) comes from ``OpenSSL._util`` through this
module.  A build of pyOpenSSL or cryptography that lacks one of those
symbols fails here, naming every missing one in one line, rather than in
the middle of a handshake.
"""

from __future__ import annotations

import OpenSSL
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from perc.errors import ConfigError

__all__ = ["MissingBindings", "check", "ffi", "lib", "missing"]

#: OpenSSL functions and constants used through ``lib``.
PRIVATE_SYMBOLS = (
    "SSL_CTX_add_client_custom_ext",
    "SSL_CTX_add_server_custom_ext",
    "SSL_CTX_set_verify",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "X509_STORE_CTX_get_ex_data",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_set_error",
    "X509_up_ref",
    "X509_V_OK",
    "ERR_clear_error",
)

#: The public pyOpenSSL API perc.dtls needs (some of it depends on the
#: OpenSSL pyOpenSSL was built against), and the one private method used.
PUBLIC_API = (
    (SSL, "OP_NO_RENEGOTIATION"),
    (SSL, "MODE_RELEASE_BUFFERS"),
    (SSL.Context, "set_mode"),
    (SSL.Context, "set_cookie_generate_callback"),
    (SSL.Context, "set_cookie_verify_callback"),
    (SSL.Connection, "set_ciphertext_mtu"),
    (SSL.Connection, "get_selected_srtp_profile"),
    (SSL.Connection, "DTLSv1_listen"),
    (crypto.X509, "_from_raw_x509_ptr"),
)


class MissingBindings(ConfigError, ImportError):
    """This pyOpenSSL / cryptography build lacks something perc.dtls calls."""


def _name(owner) -> str:
    return getattr(owner, "__qualname__", None) or owner.__name__


def missing(private=lib, public=PUBLIC_API) -> list[str]:
    """The names of the symbols ``private`` lacks and of the ``public`` attributes that are absent."""
    absent = [name for name in PRIVATE_SYMBOLS if not hasattr(private, name)]
    absent += [f"{_name(owner)}.{attribute}" for owner, attribute in public
               if not hasattr(owner, attribute)]
    return absent


def check(private=lib, public=PUBLIC_API) -> None:
    """Raise :class:`MissingBindings` naming every missing symbol in one line."""
    absent = missing(private, public)
    if absent:
        raise MissingBindings(
            "perc.dtls cannot run on this pyOpenSSL {} / {}: missing {}".format(
                OpenSSL.__version__,
                SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace"),
                ", ".join(absent)))


check()
