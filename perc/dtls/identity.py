"""
Who the peer is: the server role's identity hook (query and decisions) and
the credentials (certificate and key) each side presents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from perc import pki

STAGE_HELLO = "hello"
STAGE_CERTIFICATE = "certificate"

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
    """
    Refuse the peer: the association ends with a fatal alert and
    Closed(rejected=True).  ``alert`` is the alert description (RFC 5246
    section 7.2); None means the stage's own: ``handshake_failure`` (40) at
    the hello stage (RFC 8844: a tls-id that does not match signalling),
    ``bad_certificate`` (42) at the certificate stage.  At the certificate
    stage OpenSSL chooses the alert from a verification error, so only 40,
    42 and 80 (internal_error) can be sent there.
    """

    reason: str
    alert: Optional[int] = None


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
