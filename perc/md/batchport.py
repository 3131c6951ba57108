"""
The Media Distributor's UDP port with batched I/O: a Twisted UDP port whose
read path (``doRead``, what the reactor calls when the socket is readable)
drains the socket with ``recvmmsg`` and hands each batch to the protocol's
``datagramsReceived``, and whose ``srtpBatch`` (:mod:`perc.md.srtpbatch`)
is where the protocol protects what it forwards, sent with ``sendmmsg``
(:mod:`perc.mmsg`) when the batch is handled.  Everything else (``write``, binding,
stopping, ``getHost``) is Twisted's own :class:`twisted.internet.udp.Port`.

:func:`listen_media_udp` picks this port where batched I/O is available
and the protocol takes batches, else the reactor's plain ``listenUDP``
(``recvfrom``/``sendto`` per datagram; ``PERC_UDP_BATCH=0`` forces it).
"""

from __future__ import annotations

import errno

from twisted.internet import udp
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from perc import mmsg
from perc.md import srtpbatch

__all__ = ["BatchedPort", "listen_media_udp"]

#: Read errors after which the reactor is simply asked again later
#: (nothing to read, or an ICMP error left on the socket by a send).
_READ_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EMSGSIZE,
                         errno.ECONNREFUSED, errno.ENOBUFS})


class BatchedPort(udp.Port):
    """
    A listening UDP port for a protocol with ``datagramsReceived(pairs)``.
    One ``doRead`` reads at most ``maxBatches`` batches of ``batchSize``
    datagrams, so that a flood cannot starve the reactor's other work.
    """

    log = Logger()
    batchSize = 64
    maxBatches = 16

    def _bindSocket(self):
        super()._bindSocket()
        self._batchSocket = mmsg.BatchSocket(
            self.socket.fileno(), self.addressFamily, self.batchSize, self.maxPacketSize,
            send_slot=self.maxPacketSize + srtpbatch.SLOT_EXTRA)
        #: Where the protocol queues SRTP/SRTCP it forwards (it flushes).
        self.srtpBatch = srtpbatch.SrtpSendBatch(self._batchSocket)

    def doRead(self):
        receive = self._batchSocket.receive
        for _ in range(self.maxBatches):
            try:
                batch = receive()
            except OSError as problem:
                if problem.errno in _READ_AGAIN:
                    return
                raise
            if not batch:
                return
            try:
                self.protocol.datagramsReceived(batch)
            except Exception:  # noqa: BLE001 (as Twisted's port: logged, reading goes on)
                self.log.failure("Unhandled error handling a batch of {count} datagrams",
                                 count=len(batch))

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self._batchSocket = self.srtpBatch = None


def listen_media_udp(reactor, port: int, protocol, interface: str = "",
                     maxPacketSize: int = 8192, batched: bool | None = None):
    """
    Listen on UDP ``port`` for ``protocol``: a :class:`BatchedPort` when
    ``batched`` (None: when :func:`perc.mmsg.available` and
    :func:`perc.md.srtpbatch.available`, the protocol has ``datagramsReceived``
    and the reactor watches file descriptors), else ``reactor.listenUDP``.
    """
    if batched is None:
        batched = (mmsg.available() and srtpbatch.available()
                   and hasattr(protocol, "datagramsReceived")
                   and IReactorFDSet.providedBy(reactor))
    if not batched:
        return reactor.listenUDP(port, protocol, interface=interface,
                                 maxPacketSize=maxPacketSize)
    listening = BatchedPort(port, protocol, interface, maxPacketSize, reactor)
    listening.startListening()
    return listening
