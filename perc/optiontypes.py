"""Coercers for ``usage.Options`` parameters shared by the daemons' options."""

from twisted.python import usage


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


def udp_port(value: str) -> int:
    """Twisted's ``portCoerce``, with a message that says what was expected."""
    try:
        return usage.portCoerce(value)
    except ValueError:
        raise ValueError("must be a UDP port number 0..65535") from None


udp_port.coerceDoc = usage.portCoerce.coerceDoc  # type: ignore[attr-defined]
