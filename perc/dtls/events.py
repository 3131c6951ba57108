"""What an association reports: events and the Output of each call (h11-style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from perc.profiles import Profile, SrtpKeys


class DtlsStateError(RuntimeError):
    """A method was called in a state that does not allow it (a caller bug)."""


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
class EktKeyReceived(DtlsEvent):
    """
    Client role: the server's ``ekt_key`` handshake message (RFC 8870
    section 5.2.2), decoded and acknowledged.  ``key`` is a
    :class:`perc.ekt.EktKey` (its repr hides the key).  ``repeated`` is True
    when the message's message_seq was processed before (a retransmission,
    or the answer to a request): ``key`` is then the one processed last,
    reported only so the caller knows the server is reachable.
    """

    key: object
    message_seq: int
    repeated: bool = False


@dataclass(frozen=True)
class Closed(DtlsEvent):
    """
    The association ended; it emits nothing after this.

    ``rejected`` is True when an identity check refused the peer (hook,
    expected tls-id, expected fingerprint; ``reason`` then starts with
    ``"rejected: "``) or the peer sent an ekt_key message this side
    cannot use: trying again with the same peer cannot help.
    ``timed_out`` is True when the handshake gave up waiting: not complete
    within the handshake timeout, or no answer after the last
    retransmission.
    """

    reason: str
    rejected: bool = False
    timed_out: bool = False


@dataclass(frozen=True)
class Output:
    """What one call produced: datagrams to send (each at most the MTU) and events."""

    datagrams: tuple = ()
    events: tuple = ()


EMPTY = Output()
