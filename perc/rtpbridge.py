"""
The RTP bridge of ``perc endpoint``: plain RTP and RTCP from a local
application into the conference (``--rtp-in``), and every packet that
verifies end to end out to local applications (``--rtp-out``).

The protection itself is the endpoint's (:meth:`ReferenceEndpoint.sendRtp`,
:meth:`ReferenceEndpoint.sendRtcp`, ``media_sink``/``rtcp_sink``); this
module only moves plain datagrams between UDP ports and the endpoint.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.logger import Logger

from perc import rtp

__all__ = ["MAX_RTP_PACKET", "RtpInput", "RtpOutput", "listen", "parse_output", "receiver_sdp"]

#: The largest RTP packet (header, CSRCs, extensions and payload) the sending
#: endpoint accepts, with either double profile and with or without a
#: FullEKTField.  pylibsrtp protects and unprotects in a 1500-octet buffer
#: and refuses a packet when it plus libsrtp's largest trailer (144 octets)
#: would not fit: the sender's outer protection fails from 1340 octets of
#: RTP (inner tag and empty OHB added), and a Media Distributor that records
#: PT, SEQ and M in the OHB (3 more octets) cannot re-protect from 1337.
#: The EKT field is appended after SRTP protection and split off before
#: unprotection, so it does not count.  Measured with pylibsrtp for
#: DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM and _256_ alike
#: (tests.test_rtpbridge.PacketSizeTests).
MAX_RTP_PACKET = 1336

#: Media from at most this many local destinations.
MAX_OUTPUTS = 16
#: RTP sources whose destination RtpOutput remembers for their RTCP; past
#: this the one learned first is forgotten.
MAX_ROUTED_SOURCES = 256


class RtpInput(protocol.DatagramProtocol):
    """
    A UDP port the local application sends plain RTP to (and RTCP, if it
    multiplexes per RFC 5761: second octet 192-223), or only RTCP
    (``rtcp=True``, the port above the RTP one).  Each datagram goes to the
    endpoint's ``sendRtp`` or ``sendRtcp``; anything else is counted in its
    ``refused`` counter as ``not-rtp``.
    """

    def __init__(self, endpoint, rtcp: bool = False):
        self.endpoint = endpoint
        self.rtcp = rtcp

    def datagramReceived(self, data, address):
        kind = rtp.classify(data)
        if kind is rtp.Kind.RTCP:
            self.endpoint.sendRtcp(data)
        elif kind is rtp.Kind.RTP and not self.rtcp:
            self.endpoint.sendRtp(data)
        else:
            self.endpoint.refused["not-rtp"] += 1


def parse_output(text: str):
    """
    ``HOST:PORT`` or ``HOST:PORT/PT,PT...`` as (host, port, payload types or
    None for "every other"); ValueError otherwise.
    """
    address, _, types = text.partition("/")
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
        payload_types = (None if not types
                         else frozenset(int(t) for t in types.split(",")))
    except ValueError:
        number, payload_types = -1, None
    if not host or not 0 < number < 65535 or (
            payload_types is not None and not all(0 <= t <= 127 for t in payload_types)):
        raise ValueError("expected HOST:PORT or HOST:PORT/PT,... (PT 0-127; RTCP goes to PORT+1)")
    return host.strip("[]"), number, payload_types


class RtpOutput(protocol.DatagramProtocol):
    """
    Hands verified RTP to local destinations, from a UDP port of its own:
    a packet to the destination listing its payload type, else to the one
    listing none (no such destination: counted in ``unrouted``).  ``outputs``
    are :func:`parse_output` triples.

    RTCP goes to PORT+1 of the destination its sender's RTP goes to (the
    sender SSRC of its first packet, as learned from the RTP), else to the
    destination listing no payload type, else nowhere (counted in
    ``rtcp_unrouted``): each destination is an RTP session of its own, and
    a receiver that took another session's sender report for its own (as
    ffmpeg's RTP input does, whatever its SSRC) maps that session's RTP
    timestamps onto its streams and shifts them by hours.
    """

    log = Logger()

    def __init__(self, outputs):
        if not 0 < len(outputs) <= MAX_OUTPUTS:
            raise ValueError("1 to {} --rtp-out destinations".format(MAX_OUTPUTS))
        self._by_type = {}
        self._default = None
        for host, port, types in outputs:
            if types is None:
                self._default = (host, port)
            else:
                for payload_type in types:
                    self._by_type[payload_type] = (host, port)
        # Sender SSRC (its four octets) -> the destination its RTP went to,
        # oldest first (MAX_ROUTED_SOURCES at most).
        self._by_source: dict[bytes, tuple] = {}
        self.sent = 0
        self.unrouted = 0
        self.rtcp_unrouted = 0
        self.errors = 0

    def rtp(self, packet: bytes) -> None:
        destination = self._by_type.get(packet[1] & 0x7F, self._default)
        if destination is None:
            self.unrouted += 1
            return
        source = packet[8:12]
        if self._by_source.get(source) != destination:
            self._by_source.pop(source, None)
            if len(self._by_source) >= MAX_ROUTED_SOURCES:
                del self._by_source[next(iter(self._by_source))]
            self._by_source[source] = destination
        self._write(packet, destination)

    def rtcp(self, packet: bytes) -> None:
        # RFC 3550 section 6.4: every RTCP packet (SR, RR, SDES, BYE, and
        # RFC 4585 feedback) carries its sender's SSRC in octets 4-7.
        destination = self._by_source.get(packet[4:8], self._default) \
            if len(packet) >= 8 else None
        if destination is None:
            self.rtcp_unrouted += 1
            return
        host, port = destination
        self._write(packet, (host, port + 1))

    def _write(self, packet: bytes, destination) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(packet, destination)
        except OSError as problem:
            # Nobody listening yet (ICMP port unreachable) and the like: the
            # application comes and goes, the conference does not.
            self.errors += 1
            if self.errors == 1:
                self.log.warn("--rtp-out: {problem}", problem=problem)
            return
        self.sent += 1


def listen(reactor, endpoint, rtp_in=None, rtp_out=()):
    """
    Start the bridge of ``endpoint``: ``rtp_in`` (host, port) listens for RTP
    (and multiplexed RTCP) there and for RTCP on port + 1; ``rtp_out`` is a
    list of :func:`parse_output` triples.  Returns the listening ports (stop
    them when done).
    """
    ports = []
    if rtp_in is not None:
        host, port = rtp_in
        ports.append(reactor.listenUDP(port, RtpInput(endpoint), interface=host))
        ports.append(reactor.listenUDP(port + 1, RtpInput(endpoint, rtcp=True), interface=host))
    if rtp_out:
        output = RtpOutput(rtp_out)
        ports.append(reactor.listenUDP(0, output, interface="127.0.0.1"
                                       if all(h in ("127.0.0.1", "localhost")
                                              for h, _, _ in rtp_out) else ""))
        endpoint.media_sink = output.rtp
        endpoint.rtcp_sink = output.rtcp
    return ports


def receiver_sdp(host: str, video=None, audio=None) -> str:
    """
    The SDP a receiving application needs for what ``--rtp-out`` hands it:
    ``video`` (port, PT) as H.264, ``audio`` (port, PT) as Opus, plain
    RTP/AVP on ``host`` (RTCP on port + 1).  H.264 parameter sets are
    expected in band (as ``x264 repeat-headers=1`` sends them).
    """
    lines = ["v=0", "o=- 0 0 IN IP4 {}".format(host), "s=perc endpoint --rtp-out",
             "c=IN IP4 {}".format(host), "t=0 0"]
    if video is not None:
        lines += ["m=video {} RTP/AVP {}".format(*video),
                  "a=rtpmap:{} H264/90000".format(video[1]),
                  "a=fmtp:{} packetization-mode=1".format(video[1])]
    if audio is not None:
        lines += ["m=audio {} RTP/AVP {}".format(*audio),
                  "a=rtpmap:{} opus/48000/2".format(audio[1])]
    return "\r\n".join(lines) + "\r\n"
