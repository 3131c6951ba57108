"""
The exported state of an established association on the own record layer,
so that another process can continue it with no new handshake (a Key
Distributor taking over a dead one's associations).

Format (version 1): :meth:`AssociationState.to_bytes` is a JSON object of
primitives, octet strings as lowercase hex::

    version               1
    role                  "server" or "client"
    association_id        hex (server role: the tunnel's association id)
    profile_id            the SRTP profile negotiated (RFC 5764 id)
    peer_tls_id           hex or null;  peer_fingerprint  "sha-256 AB:..." or null
    ekt_cipher            the EKT cipher selected (RFC 8870) or null
    mtu, max_retransmissions
    records               suite (OpenSSL name), epoch, read_key, read_iv,
                          write_key, write_iv (secret), write_limit,
                          replay_highest, replay_bitmap (RFC 6347 4.1.2.6)
    next_message_seq      server role: the next handshake message_seq, or null
    ekt_message           server role: the current ekt_key message (secret) or null
    ekt_records           sequence numbers of the records that carried it (an
                          ACK naming one of them acknowledges it)
    ekt_awaiting_ack, ekt_tries, ekt_timeout   its retransmission state
    ekt_key, ekt_message_seq   client role: the last EKTKey read (secret)
    final_flight          server role: the final flight datagrams, resent when
                          the peer's Finished shows it never got them
    final_flight_resends

The reservation rule: ``records.write_limit`` is the end of the block of
write sequence numbers the exporter had reserved, *not* its next sequence
number.  The association it is restored into starts sealing at that limit,
once it is given a block after it (see :mod:`perc.dtls.records`): whatever
the exporter sealed after exporting (up to its limit) is never sealed again
with the same nonce.

The keys, IVs and EKT messages are secret: the caller seals the bytes
before storing them; the repr shows none of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Optional

__all__ = ["AssociationState", "STATE_VERSION"]

STATE_VERSION = 1

_SECRET_RECORD_FIELDS = ("read_key", "read_iv", "write_key", "write_iv")
_MAX_STATE_OCTETS = 1 << 16


@dataclass(frozen=True, repr=False)
class AssociationState:
    """One association's state as exported (see the module docstring)."""

    role: str
    association_id: bytes
    profile_id: int
    peer_tls_id: Optional[bytes]
    peer_fingerprint: Optional[str]
    ekt_cipher: Optional[int]
    mtu: int
    max_retransmissions: int
    records: dict
    next_message_seq: Optional[int]
    ekt_message: Optional[bytes]
    ekt_records: tuple
    ekt_awaiting_ack: bool
    ekt_tries: int
    ekt_timeout: float
    ekt_key: Optional[bytes]
    ekt_message_seq: int
    final_flight: tuple
    final_flight_resends: int

    def __repr__(self) -> str:
        return "<AssociationState {} {} epoch {} write limit {}>".format(
            self.role, self.records.get("suite"), self.records.get("epoch"),
            self.records.get("write_limit"))

    @property
    def write_limit(self) -> int:
        """Where whoever continues the association must start sealing."""
        return self.records["write_limit"]

    def to_bytes(self) -> bytes:
        """The versioned serialisation (secret: seal it before storing)."""
        # Shallow: dataclasses.asdict deep-copies every value, which cost
        # more than the JSON encoding (this runs for every ownership row).
        fields = {field.name: getattr(self, field.name) for field in _FIELDS}
        fields["records"] = {name: value.hex() if isinstance(value, bytes) else value
                             for name, value in self.records.items()}
        for name in ("association_id", "peer_tls_id", "ekt_message", "ekt_key"):
            if fields[name] is not None:
                fields[name] = fields[name].hex()
        fields["ekt_records"] = list(self.ekt_records)
        fields["final_flight"] = [datagram.hex() for datagram in self.final_flight]
        fields["version"] = STATE_VERSION
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> "AssociationState":
        """What :meth:`to_bytes` made; ValueError for anything else (or another version)."""
        if len(data) > _MAX_STATE_OCTETS:
            raise ValueError("association state too large")
        try:
            fields = json.loads(bytes(data).decode("ascii"))
            if not isinstance(fields, dict) or fields.pop("version", None) != STATE_VERSION:
                raise ValueError("not association state of version {}".format(STATE_VERSION))
            stored = fields["records"]
            records = {name: stored[name] for name in (
                "suite", "epoch", "write_limit", "replay_highest", "replay_bitmap")}
            for name in _SECRET_RECORD_FIELDS:
                records[name] = bytes.fromhex(stored[name])
            return cls(
                role=_choice(fields["role"], ("server", "client")),
                association_id=bytes.fromhex(fields["association_id"]),
                profile_id=_integer(fields["profile_id"]),
                peer_tls_id=_octets(fields["peer_tls_id"]),
                peer_fingerprint=_optional(fields["peer_fingerprint"], str),
                ekt_cipher=_optional(fields["ekt_cipher"], int),
                mtu=_integer(fields["mtu"]),
                max_retransmissions=_integer(fields["max_retransmissions"]),
                records=records,
                next_message_seq=_optional(fields["next_message_seq"], int),
                ekt_message=_octets(fields["ekt_message"]),
                ekt_records=tuple(_integer(n) for n in fields["ekt_records"]),
                ekt_awaiting_ack=bool(fields["ekt_awaiting_ack"]),
                ekt_tries=_integer(fields["ekt_tries"]),
                ekt_timeout=float(fields["ekt_timeout"]),
                ekt_key=_octets(fields["ekt_key"]),
                ekt_message_seq=_integer(fields["ekt_message_seq"]),
                final_flight=tuple(bytes.fromhex(d) for d in fields["final_flight"]),
                final_flight_resends=_integer(fields["final_flight_resends"]),
            )
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError("malformed association state ({})".format(type(e).__name__))


_FIELDS = dataclass_fields(AssociationState)


def _integer(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("an integer was expected")
    return value


def _optional(value, kind):
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError("{} or null was expected".format(kind.__name__))
    return value


def _octets(value) -> Optional[bytes]:
    return None if value is None else bytes.fromhex(value)


def _choice(value, choices: tuple):
    if value not in choices:
        raise ValueError("one of {} was expected".format(choices))
    return value
