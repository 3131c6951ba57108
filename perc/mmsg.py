"""
Batched UDP I/O: ``recvmmsg(2)`` and ``sendmmsg(2)`` through cffi in ABI
mode (libc opened with ``dlopen(None)``, no compiler), so that one system
call moves a batch of datagrams and no Python object is made per datagram
that can be avoided.

:func:`available` says whether this libc has both calls (Linux glibc and
musl do); callers keep the portable path (``recvfrom``/``sendto``) for
when it has not.  Setting the environment variable ``PERC_UDP_BATCH=0``
makes :func:`available` false (the portable path, forced).

Buffers are allocated once per :class:`BatchSocket`: receive slots of
``max_packet`` octets, send slots of ``max_packet`` octets, and one
``sockaddr`` slot per message.  Addresses are given and returned as the
``(host, port)`` tuples Twisted's UDP port uses.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys

__all__ = ["BatchSocket", "SendResult", "available"]

_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
struct timespec { long tv_sec; long tv_nsec; };
int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags,
             struct timespec *timeout);
int sendmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags);
"""

#: Room for a sockaddr_in6 (the larger of the two families).
_NAME_SIZE = 28
_PORT = struct.Struct("!H")
#: Decoded source addresses kept (raw sockaddr -> tuple); cleared when full.
_MAX_CACHED_ADDRESSES = 65536
#: Errors after which the rest of a batch is not tried now: the socket's
#: send buffer is full (non-blocking socket) or the kernel is out of memory.
_SEND_BUFFER_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})

_ffi = None
_libc = None


def _load():
    """(ffi, libc) with recvmmsg/sendmmsg, or (None, None); loaded once."""
    global _ffi, _libc
    if _ffi is None:
        try:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef(_CDEF)
            libc = ffi.dlopen(None)
            libc.recvmmsg, libc.sendmmsg  # noqa: B018 (AttributeError if missing)
        except (ImportError, OSError, AttributeError, NotImplementedError):
            _ffi = _libc = False
        else:
            _ffi, _libc = ffi, libc
    return (_ffi, _libc) if _ffi else (None, None)


def available() -> bool:
    """True if batched I/O can be used here (and ``PERC_UDP_BATCH`` is not ``0``)."""
    if os.environ.get("PERC_UDP_BATCH", "1").strip() in ("0", "no", "false", "off"):
        return False
    return _load()[0] is not None


class SendResult:
    """What :meth:`BatchSocket.send` did: messages sent, and not sent by errno."""

    __slots__ = ("failed", "sent")

    def __init__(self):
        self.sent = 0
        #: errno -> messages not sent because of it.
        self.failed: dict[int, int] = {}

    def _fail(self, number: int, count: int) -> None:
        self.failed[number] = self.failed.get(number, 0) + count


class BatchSocket:
    """
    ``recvmmsg``/``sendmmsg`` on one non-blocking UDP socket of ``family``,
    ``batch`` messages a call, datagrams received up to ``max_packet``
    octets and sent up to ``send_slot``.  Not thread-safe; one per socket.

    Two ways to send: :meth:`send` copies ``(data, address)`` pairs into
    the send slots; a producer that writes datagrams straight into the
    slots (``send_view``, slot ``i`` at ``i * send_slot``) sets
    ``send_lengths[i]`` and ``send_names[i]`` (:meth:`name`) and calls
    :meth:`send_queued`.
    """

    def __init__(self, fileno: int, family: int, batch: int = 64, max_packet: int = 8192,
                 send_slot: int = 2048):
        ffi, libc = _load()
        if ffi is None:
            raise OSError("recvmmsg/sendmmsg are not available")
        self._fd = fileno
        self._family = family
        self._batch = batch
        self._slot = max_packet
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self._ffi = ffi
        self._addresses: dict[bytes, tuple] = {}
        #: address -> its sockaddr as an int for ``send_names`` (:meth:`name`
        #: fills it; a hit here saves the call).
        self.names: dict[tuple, int] = {}
        # Receive side: fixed slots; the kernel writes lengths and names.
        self._rbuf = ffi.new("char[]", batch * max_packet)
        self._rnames = ffi.new("char[]", batch * _NAME_SIZE)
        self._rhdrs = self._headers(self._rbuf, self._rnames)
        self._rdata = ffi.buffer(self._rbuf)
        self._rname_bytes = ffi.buffer(self._rnames)
        stride = ffi.sizeof("struct mmsghdr") // 4
        offset = ffi.offsetof("struct mmsghdr", "msg_len") // 4
        self._lengths = memoryview(ffi.buffer(self._rhdrs)).cast("I")
        self._length_slice = (offset, stride)
        # Send side: fixed data slots of ``send_slot`` octets; per message its
        # length and name are written as machine words (``send_lengths[i]``,
        # ``send_names[i]``: strided memoryviews over the iovecs and headers,
        # cheaper than a cffi attribute each).
        self.batch = batch
        self.send_slot = send_slot
        self._sbuf = ffi.new("char[]", batch * send_slot)
        self._siov = ffi.new("struct iovec[]", batch)
        self._shdrs = ffi.new("struct mmsghdr[]", batch)
        for i in range(batch):
            self._siov[i].iov_base = self._sbuf + i * send_slot
            hdr = self._shdrs[i].msg_hdr
            hdr.msg_iov = self._siov + i
            hdr.msg_iovlen = 1
            hdr.msg_namelen = _NAME_SIZE
        word = ffi.sizeof("size_t")
        #: The send slots' octets, and the address of the first as an int.
        self.send_view = memoryview(ffi.buffer(self._sbuf))
        self.send_address = int(ffi.cast("uintptr_t", self._sbuf))
        # "N" (size_t) is a valid format that typeshed's overloads do not list.
        self.send_lengths = memoryview(ffi.buffer(self._siov)).cast("N")[  # type: ignore[call-overload]
            ffi.offsetof("struct iovec", "iov_len") // word::ffi.sizeof("struct iovec") // word]
        self.send_names = memoryview(ffi.buffer(self._shdrs)).cast("N")[  # type: ignore[call-overload]
            ffi.offsetof("struct mmsghdr", "msg_hdr") // word
            + ffi.offsetof("struct msghdr", "msg_name") // word::
            ffi.sizeof("struct mmsghdr") // word]
        #: address -> the sockaddr's cdata, kept alive while it is named.
        self._name_cdata: dict[tuple, object] = {}
        self._prepared = 0

    def _headers(self, buf, names):
        ffi = self._ffi
        self._riov = iov = ffi.new("struct iovec[]", self._batch)
        hdrs = ffi.new("struct mmsghdr[]", self._batch)
        for i in range(self._batch):
            iov[i].iov_base = buf + i * self._slot
            iov[i].iov_len = self._slot
            hdr = hdrs[i].msg_hdr
            hdr.msg_name = names + i * _NAME_SIZE
            hdr.msg_namelen = _NAME_SIZE
            hdr.msg_iov = iov + i
            hdr.msg_iovlen = 1
        return hdrs

    # -- receiving --------------------------------------------------------

    def receive(self) -> list:
        """
        Up to ``batch`` waiting datagrams as ``(data, (host, port))``; an
        empty list when none waits.  Raises OSError for any other error
        than EAGAIN (and EINTR, retried).
        """
        ffi = self._ffi
        while True:
            count = self._recvmmsg(self._fd, self._rhdrs, self._batch, 0, ffi.NULL)
            if count >= 0:
                break
            number = ffi.errno
            if number == errno.EINTR:
                continue
            if number in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            raise OSError(number, os.strerror(number))
        offset, stride = self._length_slice
        lengths = self._lengths[offset:offset + count * stride:stride].tolist()
        data, names, addresses = self._rdata, self._rname_bytes, self._addresses
        slot = self._slot
        out = []
        append = out.append
        start = 0
        name = 0
        for length in lengths:
            raw = names[name:name + _NAME_SIZE]
            address = addresses.get(raw)
            if address is None:
                address = self._decode(raw)
            append((data[start:start + length], address))
            start += slot
            name += _NAME_SIZE
        return out

    def _decode(self, raw: bytes) -> tuple:
        """The (host, port) of a raw sockaddr, remembered (bounded)."""
        family = int.from_bytes(raw[0:2], sys.byteorder)
        port = _PORT.unpack_from(raw, 2)[0]
        if family == socket.AF_INET:
            address = (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        elif family == socket.AF_INET6:
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            scope = int.from_bytes(raw[24:28], sys.byteorder)
            if scope:
                try:
                    host = "{}%{}".format(host, socket.if_indextoname(scope))
                except OSError:
                    host = "{}%{}".format(host, scope)
            address = (host, port)
        else:
            return ("", 0)  # no address (not for a UDP socket of either family)
        if len(self._addresses) >= _MAX_CACHED_ADDRESSES:
            self._addresses.clear()
        self._addresses[raw] = address
        return address

    # -- sending ----------------------------------------------------------

    def name(self, address: tuple) -> int:
        """
        The sockaddr for ``address`` (a (host, port) tuple) as an int for
        ``send_names``, remembered (bounded).  Raises ValueError if it is
        not a numeric address of the socket's family.
        """
        name = self.names.get(address)
        if name is not None:
            return name
        try:
            return self._name(address)
        except (OSError, ValueError, TypeError, IndexError, OverflowError) as problem:
            raise ValueError("not a numeric address: {!r} ({})".format(address, problem))

    def _name(self, address: tuple) -> int:
        ffi = self._ffi
        host, port = address[0], address[1]
        if self._family == socket.AF_INET6:
            if ":" not in host:
                host = "::ffff:" + host
            packed = (socket.AF_INET6.to_bytes(2, sys.byteorder)
                      + _PORT.pack(port) + bytes(4) + socket.inet_pton(socket.AF_INET6,
                                                                      host.split("%")[0])
                      + bytes(4))
            if "%" in host:
                scope = socket.if_nametoindex(host.split("%", 1)[1])
                packed = packed[:24] + scope.to_bytes(4, sys.byteorder)
        else:
            packed = (socket.AF_INET.to_bytes(2, sys.byteorder)
                      + _PORT.pack(port) + socket.inet_pton(socket.AF_INET, host) + bytes(8))
        if len(self.names) >= _MAX_CACHED_ADDRESSES:
            self.names.clear()
            self._name_cdata.clear()
        cdata = self._name_cdata[address] = ffi.new("char[]", packed.ljust(_NAME_SIZE, b"\0"))
        name = self.names[address] = int(ffi.cast("uintptr_t", cdata))
        return name

    def send(self, messages: list, result: SendResult | None = None) -> SendResult:
        """
        Send ``messages`` (``(data, (host, port))`` pairs) in order, ``batch``
        a call.  A message longer than a slot (EMSGSIZE), or to an address
        that is not a numeric one of the socket's family (EINVAL), is
        skipped and counted; the rest as :meth:`send_queued` says.
        """
        if result is None:
            result = SendResult()
        batch = self.batch
        for done in range(0, len(messages), batch):
            filled = self._fill(messages[done:done + batch], result)
            if not self.send_queued(filled, result):
                result._fail(errno.EAGAIN, max(0, len(messages) - done - batch))
                break
        return result

    def send_queued(self, count: int, result: SendResult) -> bool:
        """
        Send slots 0 to ``count`` - 1 in order (as many ``sendmmsg`` calls as
        the kernel needs).  A message the kernel refuses is skipped and
        counted under its errno; when the send buffer is full (EAGAIN,
        ENOBUFS) the rest is not sent, counted, and False is returned: a
        datagram socket does not queue.
        """
        index = 0
        while index < count:
            sent = self._sendmmsg(self._fd, self._shdrs + index, count - index, 0)
            if sent > 0:
                result.sent += sent
                index += sent
                continue
            number = self._ffi.errno
            if sent == 0 or number == errno.EINTR:
                continue
            if number in _SEND_BUFFER_FULL:
                result._fail(number, count - index)
                return False
            result._fail(number, 1)  # this message only
            index += 1
        return True

    def prepare(self, messages: list) -> int:
        """
        Fill the send slots with up to ``batch`` messages once, for
        :meth:`send_prepared` (the benchmark's floor: the kernel's send path
        with no Python per datagram).  Returns how many were prepared.
        """
        result = SendResult()
        self._prepared = self._fill(messages[:self.batch], result)
        if result.failed:
            raise ValueError("cannot prepare these messages: {}".format(result.failed))
        return self._prepared

    def send_prepared(self) -> int:
        """One ``sendmmsg`` of the prepared messages; returns how many went (-1: error)."""
        return self._sendmmsg(self._fd, self._shdrs, self._prepared, 0)

    def _fill(self, chunk: list, result: SendResult) -> int:
        """Copy ``chunk`` into the send slots; returns how many messages it holds."""
        data, lengths, names = self.send_view, self.send_lengths, self.send_names
        known = self.names
        slot = self.send_slot
        index = 0
        for payload, address in chunk:
            length = len(payload)
            if length > slot:
                result._fail(errno.EMSGSIZE, 1)
                continue
            name = known.get(address)
            if name is None:
                try:
                    name = self.name(address)
                except ValueError:
                    result._fail(errno.EINVAL, 1)
                    continue
            start = index * slot
            data[start:start + length] = payload
            lengths[index] = length
            names[index] = name
            index += 1
        return index
