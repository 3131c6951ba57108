"""
A ClientHello flood, as a hostile network would send it at the Media
Distributor's endpoint port: first ClientHellos (no cookie) from many
loopback source addresses, each one different (client random, tls-id),
none of them ever answering the HelloVerifyRequest.

Used briefly by the test suite (``tests/test_flood.py``) and at length by
``perc bench flood``.  Sans-I/O except :class:`Flooder`, which owns plain
non-blocking UDP sockets and is driven by whoever holds it (no reactor).

On Linux every 127.x.y.z address can be bound on the loopback interface,
so a flood from thousands of source hosts needs no privileges.
"""

from __future__ import annotations

import os
import select
import socket
from collections import deque

from perc import dtls, hello
from perc.ekt import EktCipher
from perc.profiles import DEFAULT_PROFILES

__all__ = ["HelloMaker", "loopback_hosts", "Flooder"]

#: The characters a tls-id may hold (RFC 8842).
_TLS_ID_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_RECORD_HEADER = 13
_HANDSHAKE_HEADER = 12
_HELLO_VERIFY_REQUEST = 3


class HelloMaker:
    """
    Distinct first ClientHellos built from one real one (the client-role
    engine's, with the default profiles, extension 56 and EKT offered):
    each has a fresh client random and, unless ``tls_id`` is given, a
    fresh random tls-id of ``tls_id_length`` characters.
    """

    def __init__(self, tls_id_length: int = 32):
        if not 20 <= tls_id_length <= 255:
            raise ValueError("a tls-id has 20 to 255 characters")
        marker = bytes(_TLS_ID_ALPHABET[i % 26] for i in range(tls_id_length))
        client = dtls.ClientAssociation(None, DEFAULT_PROFILES, tls_id=marker,
                                        ekt_ciphers=(int(EktCipher.AESKW_128),))
        [template] = client.start(0.0).datagrams
        client.close(0.0)
        parsed = hello.parse_client_hello(template)
        if parsed is None or parsed.tls_id != marker or not parsed.cookie_empty:
            raise RuntimeError("the client engine's first flight is not one whole ClientHello")
        self.tls_id_length = tls_id_length
        self._random_at = _RECORD_HEADER + _HANDSHAKE_HEADER + 2
        self._tls_id_at = template.index(marker)
        self._template = template

    def hello(self, tls_id: bytes | None = None) -> bytes:
        """A new first ClientHello (with ``tls_id`` if given: same length as the maker's)."""
        if tls_id is None:
            tls_id = bytes(_TLS_ID_ALPHABET[b % 64] for b in os.urandom(self.tls_id_length))
        elif len(tls_id) != self.tls_id_length:
            raise ValueError("tls_id must have {} characters".format(self.tls_id_length))
        data = bytearray(self._template)
        data[self._random_at:self._random_at + 32] = os.urandom(32)
        data[self._tls_id_at:self._tls_id_at + self.tls_id_length] = tls_id
        return bytes(data)


def loopback_hosts(count: int, first: int = 0x7F400001):
    """
    ``count`` distinct loopback IPv4 addresses from ``first`` (127.64.0.1 by
    default) upward, skipping those ending in .0 and .255.
    """
    hosts = []
    value = first
    while len(hosts) < count:
        if value >> 24 != 127:
            raise ValueError("not enough loopback addresses from the one asked for")
        if value & 0xFF not in (0, 255):
            hosts.append(socket.inet_ntoa(value.to_bytes(4, "big")))
        value += 1
    return hosts


def is_hello_verify_request(datagram: bytes) -> bool:
    """An epoch-0 handshake record holding a HelloVerifyRequest."""
    return (len(datagram) > _RECORD_HEADER and datagram[0] == 22 and datagram[3:5] == b"\0\0"
            and datagram[_RECORD_HEADER] == _HELLO_VERIFY_REQUEST)


class Flooder:
    """
    Sends first ClientHellos to ``target`` from ``hosts`` in turn, each one
    from a fresh socket (a new source port: a new association for the
    Media Distributor), and counts what comes back.  The last ``keep``
    sockets stay open, so that HelloVerifyRequests sent to them are read
    (and counted) rather than bounced; the oldest is read one last time and
    closed when a new one would exceed that.

    ``maker`` is a :class:`HelloMaker`; ``tls_ids``, if given, is a list of
    tls-ids used in turn (else every ClientHello has a random one).
    """

    def __init__(self, target, hosts, maker: HelloMaker | None = None, tls_ids=None,
                 keep: int = 2048):
        if not hosts:
            raise ValueError("at least one source host is needed")
        self.target = tuple(target)
        self.hosts = list(hosts)
        self.maker = maker or HelloMaker()
        self.tls_ids = list(tls_ids) if tls_ids else None
        self.keep = keep
        self.sent = 0
        self.send_errors = 0
        self.replies = 0
        self.hello_verify_requests = 0
        self.addresses: set = set()
        self._open: deque = deque()
        self._by_fd: dict = {}
        self._poller = select.epoll()
        self._next = 0

    def send(self, count: int) -> int:
        """Send ``count`` ClientHellos (the next hosts in turn); returns how many went out."""
        sent = 0
        for _ in range(count):
            host = self.hosts[self._next % len(self.hosts)]
            tls_id = None
            if self.tls_ids:
                tls_id = self.tls_ids[self._next % len(self.tls_ids)]
            self._next += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((host, 0))
                sock.sendto(self.maker.hello(tls_id), self.target)
            except OSError:
                self.send_errors += 1
                sock.close()
                continue
            self.addresses.add(sock.getsockname())
            sent += 1
            self._open.append(sock)
            self._by_fd[sock.fileno()] = sock
            self._poller.register(sock.fileno(), select.EPOLLIN)
            while len(self._open) > self.keep:
                self._close(self._open.popleft())
        self.sent += sent
        return sent

    def read(self) -> None:
        """Read whatever came back to the open sockets."""
        for fd, _ in self._poller.poll(0):
            sock = self._by_fd.get(fd)
            if sock is not None:
                self._read(sock)

    def _close(self, sock) -> None:
        self._read(sock)
        del self._by_fd[sock.fileno()]
        self._poller.unregister(sock.fileno())
        sock.close()

    def _read(self, sock) -> None:
        while True:
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.replies += 1
            if is_hello_verify_request(data):
                self.hello_verify_requests += 1

    def close(self) -> None:
        while self._open:
            self._close(self._open.popleft())
        self._poller.close()

    @property
    def hosts_used(self) -> int:
        return len({address[0] for address in self.addresses})
