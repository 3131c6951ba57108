"""
Bearer tokens for the distributors' HTTP control APIs.

A token is a random URL-safe string kept in a file readable by its owner only.
The daemon that serves an API calls :func:`load_or_create_token` (creating the
file on first start); a client such as ``perc register`` calls
:func:`read_token`, which never creates anything.  Requests are checked with
:func:`bearer_token_matches`, which compares in constant time.

Nothing here is specific to one distributor.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

from perc.errors import ConfigError

__all__ = [
    "TOKEN_BYTES",
    "generate_token",
    "load_or_create_token",
    "read_token",
    "tokens_equal",
    "bearer_token_from_header",
    "bearer_token_matches",
]

#: Entropy of a generated token, in octets (it is written as 43 characters).
TOKEN_BYTES = 32

#: What a token may contain: RFC 6750 ``b64token``, so that it fits in an
#: ``Authorization: Bearer`` header as is.
_B64TOKEN = re.compile(r"\A[A-Za-z0-9._~+/-]+=*\Z")

#: A token file larger than this is not a token file.
_MAX_TOKEN_FILE = 4096


def generate_token() -> str:
    """A new random URL-safe token with :data:`TOKEN_BYTES` octets of entropy."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def read_token(path: str) -> str:
    """
    The token stored in the file at ``path`` (surrounding whitespace removed).

    Raises :class:`ConfigError` (one line naming the path and the reason) when
    the file is missing, unreadable, empty, or does not hold a token.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_TOKEN_FILE + 1)
    except OSError as error:
        raise ConfigError(
            "cannot read token file {}: {}".format(path, _reason(error))
        ) from None
    if len(data) > _MAX_TOKEN_FILE:
        raise ConfigError(
            "token file {} is too large to hold a token ({} octets at most)".format(
                path, _MAX_TOKEN_FILE
            )
        )
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(
            "token file {} does not hold a token: it is not ASCII text".format(path)
        ) from None
    if not token:
        raise ConfigError("token file {} is empty".format(path))
    if not _B64TOKEN.match(token):
        raise ConfigError(
            "token file {} does not hold a token: one word of letters, digits "
            "and -._~+/ expected".format(path)
        )
    return token


def load_or_create_token(path: str) -> str:
    """
    The API token kept at ``path``; on first use, a new one written there.

    A new file is created with mode 0600 from the start (never readable by
    others, not even for a moment); its directory must already exist.  An
    existing file is read as :func:`read_token` does.  Problems raise
    :class:`ConfigError` naming the path and the operating system's reason.
    """
    token = generate_token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path)
    except OSError as error:
        raise ConfigError(
            "cannot create token file {}: {}".format(path, _reason(error))
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
    except OSError as error:
        # Leave no empty or partial file behind: the next start would refuse it.
        try:
            os.unlink(path)
        except OSError:
            pass
        raise ConfigError(
            "cannot write token file {}: {}".format(path, _reason(error))
        ) from None
    return token


def tokens_equal(presented: str | bytes, expected: str | bytes) -> bool:
    """
    Whether two tokens are equal, in time independent of their contents and
    of their lengths (both are hashed first, then compared in constant time).
    """
    if isinstance(presented, str):
        presented = presented.encode("utf-8", "surrogatepass")
    if isinstance(expected, str):
        expected = expected.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(
        hashlib.sha256(presented).digest(), hashlib.sha256(expected).digest()
    )


def bearer_token_from_header(value: bytes | str | None) -> bytes | None:
    """
    The token of an ``Authorization: Bearer <token>`` header value, or None
    when the header is absent or uses another scheme.  The scheme name is
    case-insensitive (RFC 9110).
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    parts = value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"bearer":
        return None
    token = parts[1].strip()
    return token or None


def bearer_token_matches(header_values: list | None, expected: str | bytes) -> bool:
    """
    Whether the ``Authorization`` header values of a request (as
    ``Headers.getRawHeaders`` returns them) carry exactly one bearer token equal
    to ``expected``.  Absent, repeated, or other-scheme headers do not match.
    """
    if not header_values or len(header_values) != 1:
        return False
    presented = bearer_token_from_header(header_values[0])
    if presented is None:
        return False
    return tokens_equal(presented, expected)
