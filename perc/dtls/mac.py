"""
HMAC (RFC 2104) keyed once, over :mod:`hashlib`.

With OpenSSL 3 and later behind it, every ``hmac.new`` or ``hmac.digest``
fetches and sets up an EVP_MAC: about 10 us per MAC here, against 1.5 us
for the two hash computations HMAC is made of, with both padded keys
hashed once (what :mod:`hmac` itself does when OpenSSL's HMAC is missing).
The handshake path computes a few: the cookie of each ClientHello, the
TLS 1.2 PRF steps of each key block.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["KeyedHmac"]

_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


class KeyedHmac:
    """``KeyedHmac(hashlib.sha256, key).digest(message)`` is ``hmac.digest(key, message, "sha256")``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, hash_function: Callable, key: bytes) -> None:
        inner = hash_function()
        block = inner.block_size
        key = bytes(key)
        if len(key) > block:
            key = hash_function(key).digest()
        key = key.ljust(block, b"\x00")
        inner.update(key.translate(_INNER))
        outer = hash_function()
        outer.update(key.translate(_OUTER))
        self._inner = inner
        self._outer = outer

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
