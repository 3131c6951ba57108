"""
Forwarded SRTP and SRTCP protected straight into the send slots of a
:class:`perc.mmsg.BatchSocket`: per receiver the plain packet is copied
into a slot and libsrtp protects it there, in place, so that forwarding
makes no Python object per output datagram (pylibsrtp's ``protect`` makes
a length cell and a bytes object per call).

This calls libsrtp through pylibsrtp's own cffi binding with a session's
``srtp_t`` (``Session._srtp``), which pylibsrtp does not document:
:func:`available` checks at first use, on real sessions, that protecting
this way gives exactly what ``Session.protect`` and ``protect_rtcp``
give, and callers keep the portable path when it does not.
"""

from __future__ import annotations

import errno
import os

import pylibsrtp

from perc.mmsg import BatchSocket, SendResult

__all__ = ["SrtpSendBatch", "available", "context"]

#: What pylibsrtp's ``protect``/``protect_rtcp`` accept: its 1500-octet
#: buffer less the largest trailer.  Longer packets fail, as there.
_MAX_RTP = 1500 - pylibsrtp.SRTP_MAX_TRAILER_LEN
_MAX_RTCP = 1500 - pylibsrtp.SRTP_MAX_SRTCP_TRAILER_LEN
#: Room a send slot needs past a received datagram's length.
SLOT_EXTRA = max(pylibsrtp.SRTP_MAX_TRAILER_LEN, pylibsrtp.SRTP_MAX_SRTCP_TRAILER_LEN)

_checked: bool | None = None


def _binding():
    from pylibsrtp import _binding as binding

    return binding.ffi, binding.lib


def context(session: pylibsrtp.Session):
    """The libsrtp context of ``session`` (valid while the session lives), or None."""
    try:
        return session._srtp[0]
    except (AttributeError, TypeError, IndexError):
        return None


def available() -> bool:
    """True if in-place protection here gives what pylibsrtp gives (checked once)."""
    global _checked
    if _checked is None:
        _checked = _self_check()
    return _checked


def _self_check() -> bool:
    try:
        ffi, lib = _binding()
        key = os.urandom(30)
        packets = {"rtp": b"\x80\x60\x00\x01\x00\x00\x00\xa0\x12\x34\x56\x78" + os.urandom(50),
                   "rtcp": b"\x80\xc8\x00\x06\x12\x34\x56\x78" + os.urandom(20)}
        for kind, function in (("rtp", lib.srtp_protect), ("rtcp", lib.srtp_protect_rtcp)):
            sessions = [pylibsrtp.Session(pylibsrtp.Policy(
                key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)) for _ in range(2)]
            packet = packets[kind]
            expected = (sessions[0].protect if kind == "rtp" else sessions[0].protect_rtcp)(packet)
            buffer = ffi.new("char[]", 1500)
            length = ffi.new("int *", len(packet))
            ffi.memmove(buffer, packet, len(packet))
            if function(context(sessions[1]), buffer, length) != lib.srtp_err_status_ok:
                return False
            if ffi.buffer(buffer, length[0])[:] != expected:
                return False
        return True
    except Exception:  # noqa: BLE001 (any surprise in pylibsrtp's internals: portable path)
        return False


class SrtpSendBatch:
    """
    Datagrams queued in ``sock``'s send slots, sent with :meth:`flush`
    (and whenever the slots are full).  ``sock``'s slots must be at least
    the largest datagram plus :data:`SLOT_EXTRA` octets.
    """

    def __init__(self, sock: BatchSocket):
        ffi, lib = _binding()
        self._protect = lib.srtp_protect
        self._protect_rtcp = lib.srtp_protect_rtcp
        self._socket = sock
        self._batch = sock.batch
        self._slot = sock.send_slot
        self._view = sock.send_view
        self._lengths = sock.send_lengths
        self._names = sock.send_names
        self._known = sock.names
        self._pointers = [ffi.cast("char *", sock.send_address + i * sock.send_slot)
                          for i in range(sock.batch)]
        self._length = ffi.new("int *")
        self._count = 0
        self._result = SendResult()

    def rtp(self, plain: bytes, members, source, tail: bytes) -> tuple[int, int]:
        """
        Queue ``plain`` protected for every member but ``source``
        (``members``: the relay's RTP fan-out, ``(endpoint, address, protect,
        ekt, context)``), ``tail`` (an EKT field) appended for those with
        ``ekt``.  Returns (queued, protect failures).
        """
        n = len(plain)
        if n > _MAX_RTP:
            return 0, sum(1 for member in members if member[0] is not source)
        view, lengths, names, known = self._view, self._lengths, self._names, self._known
        pointers, slot, length_cell, protect = self._pointers, self._slot, self._length, \
            self._protect
        tail_length = len(tail)
        index = self._count
        batch = self._batch
        queued = failed = 0
        for other, address, _, other_ekt, ctx in members:
            if other is source:
                continue
            if index == batch:
                self._count = index
                self._send()
                index = 0
            name = known.get(address)
            if name is None:
                name = self._name(address)
                if name is None:
                    continue
            start = index * slot
            view[start:start + n] = plain
            length_cell[0] = n
            if protect(ctx, pointers[index], length_cell):
                failed += 1
                continue
            length = length_cell[0]
            if tail_length and other_ekt:
                view[start + length:start + length + tail_length] = tail
                length += tail_length
            lengths[index] = length
            names[index] = name
            index += 1
            queued += 1
        self._count = index
        return queued, failed

    def rtcp(self, plain: bytes, ctx, address) -> bool:
        """Queue ``plain`` protected as SRTCP with ``ctx`` to ``address``; False if it failed."""
        n = len(plain)
        if n > _MAX_RTCP:
            return False
        name = self._known.get(address)
        if name is None:
            name = self._name(address)
            if name is None:
                return True  # counted as a send failure, not a protect failure
        if self._count == self._batch:
            self._send()
        index = self._count
        start = index * self._slot
        self._view[start:start + n] = plain
        self._length[0] = n
        if self._protect_rtcp(ctx, self._pointers[index], self._length):
            return False
        self._lengths[index] = self._length[0]
        self._names[index] = name
        self._count = index + 1
        return True

    def flush(self) -> SendResult:
        """Send what is queued; returns what was sent and failed since the last flush."""
        if self._count:
            self._send()
        result, self._result = self._result, SendResult()
        return result

    def _send(self) -> None:
        self._socket.send_queued(self._count, self._result)
        self._count = 0

    def _name(self, address):
        try:
            return self._socket.name(address)
        except ValueError:
            self._result._fail(errno.EINVAL, 1)
            return None
