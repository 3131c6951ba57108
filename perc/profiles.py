"""
SRTP protection profiles: the one table every component consults.

Sans-I/O: nothing here touches the network or the reactor.  The table holds,
per profile, the lengths RFC 5764 needs to split exported DTLS-SRTP keying
material, whether the profile is a PERC double profile (RFC 8723), and which
pylibsrtp profile protects the hop-by-hop (outer) layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pylibsrtp

__all__ = [
    "Profile",
    "ProfileError",
    "SrtpKeys",
    "PROFILES",
    "DEFAULT_PROFILES",
    "by_id",
    "parse_profile_list",
    "format_profile_list",
    "openssl_srtp_string",
]


class ProfileError(ValueError):
    """
    A profile name, id or list that this project does not know or accept.
    The message is meant to be shown to a user as is.
    """


@dataclass(frozen=True)
class SrtpKeys:
    """
    The four SRTP secrets of one DTLS-SRTP association, in RFC 5764 order.

    ``repr`` never shows the values, so an instance may end up in a log event
    without leaking keys.
    """

    client_key: bytes
    server_key: bytes
    client_salt: bytes
    server_salt: bytes

    def __repr__(self) -> str:
        return "<SrtpKeys key={} salt={} octets (values hidden)>".format(
            len(self.client_key), len(self.client_salt)
        )


@dataclass(frozen=True)
class Profile:
    """
    One SRTP protection profile.

    ``key_length`` and ``salt_length`` are the master key and salt lengths
    that DTLS-SRTP exports for the profile.  For a double profile they cover
    both layers: the first half is the inner (end-to-end) part and the second
    half the outer (hop-by-hop) part (RFC 8723 section 5.1).
    """

    id: int
    name: str
    openssl_name: str
    key_length: int
    salt_length: int
    double: bool
    hbh_libsrtp_profile: int

    @property
    def keying_material_length(self) -> int:
        """How many octets to export with label EXTRACTOR-dtls_srtp."""
        return 2 * (self.key_length + self.salt_length)

    @property
    def hbh_key_length(self) -> int:
        """Length of the hop-by-hop master key, as MediaKeys carries it."""
        return self.key_length // 2 if self.double else self.key_length

    @property
    def hbh_salt_length(self) -> int:
        """Length of the hop-by-hop master salt, as MediaKeys carries it."""
        return self.salt_length // 2 if self.double else self.salt_length

    def split(self, material: bytes) -> SrtpKeys:
        """
        Split exported keying material as RFC 5764 section 4.2 lays it out:
        client key, server key, client salt, server salt.
        """
        if len(material) != self.keying_material_length:
            raise ProfileError(
                "{} needs {} octets of keying material, got {}".format(
                    self.name, self.keying_material_length, len(material)
                )
            )
        k, s = self.key_length, self.salt_length
        return SrtpKeys(
            client_key=material[0:k],
            server_key=material[k : 2 * k],
            client_salt=material[2 * k : 2 * k + s],
            server_salt=material[2 * k + s : 2 * k + 2 * s],
        )

    def hbh_keys(self, keys: SrtpKeys) -> SrtpKeys:
        """
        The part of ``keys`` a Media Distributor may hold: the outer halves of
        a double profile, or everything for a non-double profile (which offers
        no end-to-end protection).
        """
        if not self.double:
            return keys
        return SrtpKeys(*(_second_half(value) for value in _fields(keys)))

    def inner_keys(self, keys: SrtpKeys) -> SrtpKeys:
        """The end-to-end (first) halves of a double profile's keys."""
        if not self.double:
            raise ProfileError("{} has no inner layer".format(self.name))
        return SrtpKeys(*(_first_half(value) for value in _fields(keys)))

    def __str__(self) -> str:
        return self.name


def _fields(keys: SrtpKeys) -> tuple[bytes, bytes, bytes, bytes]:
    return (keys.client_key, keys.server_key, keys.client_salt, keys.server_salt)


def _first_half(value: bytes) -> bytes:
    return value[: len(value) // 2]


def _second_half(value: bytes) -> bytes:
    return value[len(value) // 2 :]


_P = pylibsrtp.Policy

PROFILES: tuple[Profile, ...] = (
    Profile(0x0001, "SRTP_AES128_CM_HMAC_SHA1_80", "SRTP_AES128_CM_SHA1_80",
            16, 14, False, _P.SRTP_PROFILE_AES128_CM_SHA1_80),
    Profile(0x0002, "SRTP_AES128_CM_HMAC_SHA1_32", "SRTP_AES128_CM_SHA1_32",
            16, 14, False, _P.SRTP_PROFILE_AES128_CM_SHA1_32),
    Profile(0x0007, "SRTP_AEAD_AES_128_GCM", "SRTP_AEAD_AES_128_GCM",
            16, 12, False, _P.SRTP_PROFILE_AEAD_AES_128_GCM),
    Profile(0x0008, "SRTP_AEAD_AES_256_GCM", "SRTP_AEAD_AES_256_GCM",
            32, 12, False, _P.SRTP_PROFILE_AEAD_AES_256_GCM),
    Profile(0x0009, "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
            "SRTP_DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
            32, 24, True, _P.SRTP_PROFILE_AEAD_AES_128_GCM),
    Profile(0x000A, "DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM",
            "SRTP_DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM",
            64, 24, True, _P.SRTP_PROFILE_AEAD_AES_256_GCM),
)

_BY_ID = {profile.id: profile for profile in PROFILES}
_BY_NAME: dict[str, Profile] = {}
for _profile in PROFILES:
    _BY_NAME[_profile.name.upper()] = _profile
    _BY_NAME[_profile.openssl_name.upper()] = _profile
del _profile

#: What both distributors offer unless an operator lists profiles explicitly:
#: only the double profiles keep media opaque to the Media Distributor.
DEFAULT_PROFILES: tuple[Profile, ...] = (_BY_ID[0x0009], _BY_ID[0x000A])


def by_id(profile_id: int) -> Profile | None:
    """The profile with this 16-bit id, or None if the table lacks it."""
    return _BY_ID.get(profile_id)


def _parse_one(word: str) -> Profile:
    text = word.strip()
    profile = _BY_NAME.get(text.upper())
    if profile is None and text.lower().startswith("0x"):
        try:
            profile = _BY_ID.get(int(text, 16))
        except ValueError:
            profile = None
    if profile is None:
        raise ProfileError(
            "unknown SRTP protection profile {!r}; valid: {}".format(
                text, ", ".join(p.name for p in PROFILES)
            )
        )
    return profile


def parse_profile_list(text: str) -> tuple[Profile, ...]:
    """
    Parse a comma-separated list as users type it in options: the names of
    the table above, OpenSSL's spellings, or hex ids such as ``0x0007``.
    Case and surrounding spaces do not matter; duplicates are dropped and the
    order is kept (it is the order of preference).
    """
    words = [word for word in text.split(",") if word.strip()]
    if not words:
        raise ProfileError("empty SRTP protection profile list")
    result: list[Profile] = []
    for word in words:
        profile = _parse_one(word)
        if profile not in result:
            result.append(profile)
    return tuple(result)


def format_profile_list(profiles: Iterable[Profile]) -> str:
    """The inverse of :func:`parse_profile_list`, using the table's names."""
    return ",".join(profile.name for profile in profiles)


def openssl_srtp_string(profiles: Iterable[Profile]) -> bytes:
    """The colon-separated list ``SSL_CTX_set_tlsext_use_srtp`` takes."""
    return ":".join(profile.openssl_name for profile in profiles).encode("ascii")
