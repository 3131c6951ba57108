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
Both roles free it as soon as the association is established with an
AEAD suite and protect the few later records themselves
(:mod:`perc.dtls.records`); see :class:`ServerListener`'s ``compact``.
That layer also carries RFC 8870's ``ekt_key`` message (server to client,
retransmitted until the client's ACK) which OpenSSL knows nothing of.

Nothing here logs; key material only leaves through
:class:`HandshakeComplete`, whose repr hides it.

The package, by job:

- :mod:`~perc.dtls.constants`: numbers from the specifications, defaults.
- :mod:`~perc.dtls.events`: :class:`Output` and the events it carries.
- :mod:`~perc.dtls.identity`: :class:`Credentials`, the identity hook's
  :class:`IdentityQuery` and its :class:`Accept` / :class:`Reject`.
- :mod:`~perc.dtls.extensions`: codecs of extensions 56 and 39.
- :mod:`~perc.dtls.bindings`: the private OpenSSL bindings still needed,
  checked at import.
- :mod:`~perc.dtls.callbacks`: OpenSSL's C callbacks and their registry.
- :mod:`~perc.dtls.contexts`: SSL contexts and connections.
- :mod:`~perc.dtls.datagrams`: records in and out of datagrams.
- :mod:`~perc.dtls.mac`: HMAC keyed once (cookies, the key-block PRF).
- :mod:`~perc.dtls.records`: the own post-handshake record protection.
- :mod:`~perc.dtls.post_handshake`: codecs of handshake messages and ACKs
  after the handshake (RFC 8870's ``ekt_key``).
- :mod:`~perc.dtls.established`: an association once it left OpenSSL.
- :mod:`~perc.dtls.state`: an established association's exported state, to
  continue it elsewhere (:meth:`DtlsAssociation.restore`) with no handshake.
- :mod:`~perc.dtls.association`: the association state machine (both roles).
- :mod:`~perc.dtls.listener`: the server role's stateless cookie exchange.
"""

from perc.dtls.association import ClientAssociation, DtlsAssociation, ServerAssociation
from perc.dtls.callbacks import callback_registry_size
from perc.dtls.constants import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_RETRANSMISSIONS,
    DEFAULT_MTU,
    EXPORTER_LABEL,
)
from perc.dtls.datagrams import pack_records, split_records
from perc.dtls.events import (
    ApplicationData,
    Closed,
    DtlsEvent,
    DtlsStateError,
    EktKeyReceived,
    HandshakeComplete,
    Output,
)
from perc.dtls.extensions import (
    EXTERNAL_SESSION_ID,
    SUPPORTED_EKT_CIPHERS,
    ExtensionError,
    ExtensionSpec,
    decode_external_session_id,
    encode_external_session_id,
    validate_tls_id,
)
from perc.dtls.identity import (
    ACCEPT_ALL,
    STAGE_CERTIFICATE,
    STAGE_HELLO,
    Accept,
    Credentials,
    IdentityQuery,
    Reject,
)
from perc.dtls.listener import ServerListener
from perc.dtls.state import AssociationState

__all__ = [
    "ACCEPT_ALL",
    "Accept",
    "ApplicationData",
    "AssociationState",
    "ClientAssociation",
    "Closed",
    "Credentials",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_RETRANSMISSIONS",
    "DEFAULT_MTU",
    "DtlsAssociation",
    "DtlsEvent",
    "DtlsStateError",
    "EktKeyReceived",
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
