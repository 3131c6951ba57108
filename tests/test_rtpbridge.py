"""
The RTP bridge: a local application's RTP into the conference through
``sendRtp``/``--rtp-in`` and verified media out through ``--rtp-out``, with
real ffmpeg, real Key and Media Distributor services and real UDP.
"""

from __future__ import annotations

import io
import os
import re
import struct

import pylibsrtp
from twisted.internet import defer, protocol, reactor
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, TestCase

from perc import mediatools, rtpbridge
from perc.scripts.demo import run_demo
from perc.double import DoubleError, DoubleReceiver, DoubleSender, relay_rewrite
from perc.scripts.endpoint import EndpointOptions
from perc.profiles import by_id

from tests.test_endpoint import MembersMixin, sleep
from tests.test_md_e2e import WAIT, eventually


def _through(profile, length: int) -> bool:
    """
    Whether an RTP packet of ``length`` octets survives the sender, a Media
    Distributor that records PT, SEQ and M in the OHB, and a receiver.
    """
    k, s = profile.key_length // 2, profile.salt_length // 2
    inner, salt, hbh, hbh_salt, out, out_salt = (
        os.urandom(n) for n in (k, s, k, s, k, s))
    packet = struct.pack("!BBHII", 0x80, 96, 5, 0, 1234) + bytes(length - 12)
    try:
        wire = DoubleSender(profile, inner, salt, hbh, hbh_salt).protect(packet)
        md_in = pylibsrtp.Session(pylibsrtp.Policy(
            key=hbh + hbh_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile.hbh_libsrtp_profile))
        md_out = pylibsrtp.Session(pylibsrtp.Policy(
            key=out + out_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile.hbh_libsrtp_profile))
        relayed = md_out.protect(relay_rewrite(md_in.unprotect(wire), 97, 9, True))
        receiver = DoubleReceiver(profile, out, out_salt)
        receiver.add_sender_key(1234, inner, salt)
        return receiver.unprotect(relayed).packet == packet
    except (DoubleError, ValueError, pylibsrtp.Error):
        return False


class PacketSizeTests(TestCase):
    def test_largest_packet_measured_per_profile(self):
        """MAX_RTP_PACKET is exactly the largest packet pylibsrtp carries end to end."""
        for profile_id in (0x0009, 0x000A):
            profile = by_id(profile_id)
            self.assertTrue(_through(profile, rtpbridge.MAX_RTP_PACKET), profile.name)
            self.assertFalse(_through(profile, rtpbridge.MAX_RTP_PACKET + 1), profile.name)


class BridgeTests(MembersMixin, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_oversize_refused_at_the_sender_with_the_reason_counted(self):
        alice = yield self.member("alice")
        bob = yield self.member("bob")
        yield defer.gatherResults([alice.joined, bob.joined]).addTimeout(WAIT, reactor)
        received = []
        bob.media_sink = received.append
        header = struct.pack("!BBHII", 0x80, 96, 1, 0, 0xABCD)
        self.assertFalse(alice.sendRtp(header + bytes(rtpbridge.MAX_RTP_PACKET - 11)))
        self.assertFalse(alice.sendRtp(struct.pack("!BBHII", 0x80, 96, 2, 0, 0xABCD)
                                       + bytes(2000)))
        self.assertEqual(alice.refused["oversize"], 2)
        self.assertEqual(alice.sent, 0)
        largest = header + bytes(rtpbridge.MAX_RTP_PACKET - 12)
        self.assertTrue(alice.sendRtp(largest))
        yield eventually(lambda: received)
        self.assertEqual(received, [largest])
        self.assertFalse({k: v for k, v in self.md.relay.counters.items()
                          if k.startswith("dropped")})

    @defer.inlineCallbacks
    def test_header_kept_for_several_ssrcs_and_rtcp_hop_by_hop(self):
        """CSRCs, RFC 8285 extensions, PT, M, timestamps of two SSRCs arrive as sent; RTCP too."""
        alice = yield self.member("alice")
        bob = yield self.member("bob")
        yield defer.gatherResults([alice.joined, bob.joined]).addTimeout(WAIT, reactor)
        media, rtcp = [], []
        bob.media_sink, bob.rtcp_sink = media.append, rtcp.append
        sent = []
        for sequence in range(65530, 65536):
            for ssrc, pt in ((0x1111, 96), (0x2222, 111)):
                packet = (struct.pack("!BBHIII", 0x91, 0x80 | pt, sequence, sequence * 3000,
                                      ssrc, 0xC5C5C5C5)
                          + b"\xbe\xde\x00\x01\x10\x2a\x00\x00" + os.urandom(40))
                self.assertTrue(alice.sendRtp(packet))
                sent.append(packet)
        report = struct.pack("!BBHI", 0x80, 201, 1, 0x1111)
        self.assertTrue(alice.sendRtcp(report))
        yield eventually(lambda: len(media) == len(sent) and rtcp)
        self.assertEqual(sorted(media), sorted(sent))
        self.assertEqual(rtcp, [report])
        self.assertEqual(set(bob.stats), {0x1111, 0x2222})


class _Capture(protocol.DatagramProtocol):
    def __init__(self):
        self.received = []

    def datagramReceived(self, data, address):
        self.received.append(data)


def _report(ssrc: int, rtp_timestamp: int) -> bytes:
    """An RTCP sender report (no report blocks) from ``ssrc``."""
    return struct.pack("!BBHIQIII", 0x80, 200, 6, ssrc, 0xE000000000000000, rtp_timestamp,
                       1, 100)


class RtpOutputTests(TestCase):
    """Where RtpOutput sends RTCP, over real UDP ports."""

    def listen(self, outputs, ports):
        captures = {}
        for port in ports:
            captures[port] = _Capture()
            self.addCleanup(reactor.listenUDP(port, captures[port],
                                              interface="127.0.0.1").stopListening)
        output = rtpbridge.RtpOutput(outputs)
        self.addCleanup(reactor.listenUDP(0, output, interface="127.0.0.1").stopListening)
        return output, captures

    @defer.inlineCallbacks
    def test_rtcp_goes_to_the_session_of_its_sender(self):
        """A sender report reaches only the RTCP port of the destination its SSRC's RTP goes to."""
        base = mediatools.free_ports(4)
        output, captures = self.listen(
            [("127.0.0.1", base, frozenset({96})), ("127.0.0.1", base + 2, frozenset({97}))],
            range(base, base + 4))
        video, audio = 0x1111, 0x2222
        # Before any RTP of its sender a report has nowhere to go (ffmpeg
        # sends its first one just before its first RTP packet).
        output.rtcp(_report(video, 1))
        output.rtcp(b"\x80\xc8\x00")
        self.assertEqual(output.rtcp_unrouted, 2)
        for ssrc, pt in ((video, 96), (audio, 97)):
            output.rtp(struct.pack("!BBHII", 0x80, pt, 1, 1000, ssrc) + b"media")
        output.rtcp(_report(video, 2))
        output.rtcp(_report(audio, 3))
        output.rtcp(_report(0x3333, 4))  # a receiver's, or a source not seen yet
        yield eventually(lambda: all(captures[p].received for p in captures))
        yield sleep(0.1)
        self.assertEqual(captures[base + 1].received, [_report(video, 2)])
        self.assertEqual(captures[base + 3].received, [_report(audio, 3)])
        self.assertEqual([len(captures[p].received) for p in (base, base + 2)], [1, 1])
        self.assertEqual((output.rtcp_unrouted, output.unrouted, output.sent), (3, 0, 4))

    @defer.inlineCallbacks
    def test_unknown_sources_rtcp_to_the_destination_taking_every_type(self):
        base = mediatools.free_ports(4)
        output, captures = self.listen(
            [("127.0.0.1", base, None), ("127.0.0.1", base + 2, frozenset({97}))],
            (base + 1, base + 3))
        output.rtp(struct.pack("!BBHII", 0x80, 97, 1, 1000, 0x2222) + b"audio")
        output.rtcp(_report(0x2222, 1))
        output.rtcp(_report(0x4444, 2))
        yield eventually(lambda: captures[base + 1].received and captures[base + 3].received)
        yield sleep(0.1)
        self.assertEqual(captures[base + 1].received, [_report(0x4444, 2)])
        self.assertEqual(captures[base + 3].received, [_report(0x2222, 1)])
        self.assertEqual(output.rtcp_unrouted, 0)

    def test_sources_remembered_are_bounded(self):
        base = mediatools.free_ports(2)
        output = rtpbridge.RtpOutput([("127.0.0.1", base, frozenset({96}))])
        # Not listening: nothing is sent, the routes are still learned.
        for ssrc in range(rtpbridge.MAX_ROUTED_SOURCES + 1):
            output.rtp(struct.pack("!BBHII", 0x80, 96, 1, 1000, ssrc))
        output.rtcp(_report(0, 1))  # the first source learned: forgotten
        self.assertEqual(output.rtcp_unrouted, 1)
        output.rtcp(_report(rtpbridge.MAX_ROUTED_SOURCES, 1))
        output.rtcp(_report(1, 1))
        self.assertEqual(output.rtcp_unrouted, 1)


class FfmpegBridgeTests(MembersMixin, TestCase):
    """H.264 and Opus from one ffmpeg, through the bridge, into a second ffmpeg."""

    timeout = 120

    def setUp(self):
        try:
            mediatools.ffmpeg()
        except mediatools.FfmpegMissing as missing:
            raise SkipTest("{}: pip install imageio-ffmpeg".format(missing))
        return super().setUp()

    @defer.inlineCallbacks
    def test_video_bit_exact_and_audio_decoded(self):
        directory = self.mktemp()
        os.makedirs(directory)
        clip = os.path.join(directory, "clip.mkv")
        code, _, err = yield mediatools.run(reactor, mediatools.make_clip(clip))
        self.assertEqual(code, 0, err)
        local = os.path.join(directory, "local.md5")
        code, _, err = yield mediatools.run(reactor, mediatools.decode_args(
            clip, [("v", "framemd5", local)], sdp=False))
        self.assertEqual(code, 0, err)
        reference = mediatools.framemd5_hashes(local)
        self.assertEqual(len(reference), 50)

        sender = yield self.member("sender")
        receiver = yield self.member("receiver")
        yield defer.gatherResults([sender.joined, receiver.joined]).addTimeout(WAIT, reactor)
        rtp_in = mediatools.free_ports(2)
        out = mediatools.free_ports(4)
        ports = rtpbridge.listen(reactor, sender, rtp_in=("127.0.0.1", rtp_in))
        ports += rtpbridge.listen(reactor, receiver, rtp_out=[
            ("127.0.0.1", out, frozenset({96})), ("127.0.0.1", out + 2, frozenset({97}))])
        for port in ports:
            self.addCleanup(port.stopListening)
        sdp = os.path.join(directory, "receiver.sdp")
        with open(sdp, "w") as f:
            f.write(rtpbridge.receiver_sdp("127.0.0.1", video=(out, 96), audio=(out + 2, 97)))
        video, audio = (os.path.join(directory, n) for n in ("video.md5", "audio.md5"))
        decoder, decoded = mediatools.spawn(reactor, mediatools.decode_args(
            sdp, [("v", "framemd5", video), ("a", "framemd5", audio)]))
        self.addCleanup(lambda: None if decoded.called else decoder.signalProcess("KILL"))
        yield eventually(lambda: all(mediatools.port_bound(p) for p in (out, out + 2)))
        code, _, err = yield mediatools.run(reactor, mediatools.stream_args(
            clip, "127.0.0.1", rtp_in, video_pt=96, audio_pt=97))
        self.assertEqual(code, 0, err)
        # Every packet the sender sent has been verified and handed to the
        # decoder's sockets (on a loaded machine the relay lags behind
        # ffmpeg's real-time pace).
        yield eventually(lambda: sum(s.verified for s in receiver.stats.values())
                         >= sender.sent)

        # Then the decoder has decoded what it has been handed (its output
        # is flushed per frame; it holds back the last frame or two until it
        # is stopped): its count has reached most of the clip and settled,
        # however long a loaded machine makes that take.
        def distinct_frames():
            return len(set(mediatools.framemd5_hashes(video))) if os.path.exists(video) else 0

        last, since, deadline = -1, reactor.seconds(), reactor.seconds() + WAIT
        progress = []  # (seconds since the packets were handed over, frames)
        while reactor.seconds() < deadline:
            count = distinct_frames()
            if count != last:
                last, since = count, reactor.seconds()
                progress.append((round(since - deadline + WAIT, 2), count))
            elif count >= 0.9 * len(reference) and reactor.seconds() - since >= 0.5:
                break
            yield sleep(0.05)
        decoder.signalProcess("INT")
        code, _, err = yield decoded
        self.assertIn(code, (0, 255), err)
        frames = mediatools.framemd5_hashes(video)
        # Every decoded frame is bit-exact with one of the clip decoded locally.
        self.assertEqual([h for h in frames if h not in reference], [])
        self.assertGreaterEqual(len(set(frames)), 0.95 * len(reference),
                                "distinct frames decoded over time {}; RTP out: {}; decoder "
                                "said {!r}".format(progress, {
                                    name: getattr(ports[-1].protocol, name)
                                    for name in ("sent", "unrouted", "errors")}, err))
        self.assertGreater(len(mediatools.framemd5_hashes(audio)), 50)
        # Each stream's times run from its start through the 2 s clip: a
        # sender report of the other stream on a stream's RTCP port made
        # ffmpeg shift them by hours (and drop the video frames behind).
        for path in (video, audio):
            times = [t for t, _ in mediatools.framemd5_frames(path)]
            self.assertTrue(0 <= min(times) and max(times) < 3.0, (path, times[:3], times[-3:]))
        self.assertNotIn("rror", err)
        self.assertEqual(sender.refused, {})
        self.assertGreater(sender.rtcp_sent, 0)
        self.assertEqual(receiver.stats[next(iter(receiver.stats))].failed, 0)

    @defer.inlineCallbacks
    def test_demo_media_video(self):
        out = io.StringIO()
        status = yield run_demo(reactor, endpoints=3, seconds=2.0, out=out, media="video")
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        pngs = re.findall(r"(\S+\.png)", text)
        self.assertEqual(len(pngs), 2, text)
        for png in pngs:
            with open(png, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertEqual(len(re.findall(r"endpoint-\d +(\d+)  \S+\.png", text)), 2, text)


class FramemdTests(TestCase):
    def test_each_frame_in_its_own_streams_time_base(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("#format: frame checksums\n#version: 2\n#hash: MD5\n"
                    "#tb 0: 1/25\n#media_type 0: video\n"
                    "#tb 1: 1/48000\n#media_type 1: audio\n"
                    "#stream#, dts,        pts, duration,     size, hash\n"
                    "0,          0,          0,        1,    28800, aa\n"
                    "1,          0,          0,      960,     3840, bb\n"
                    "0,          1,          1,        1,    28800, cc\n"
                    "1,        960,        960,      960,     3840, dd\n")
        self.assertEqual(mediatools.framemd5_frames(path),
                         [(0.0, "aa"), (0.0, "bb"), (0.04, "cc"), (0.02, "dd")])
        self.assertEqual(mediatools.framemd5_hashes(path), ["aa", "bb", "cc", "dd"])


class OptionsTests(TestCase):
    def test_rtp_out_destinations(self):
        options = EndpointOptions()
        options.parseOptions([
            "--media", "127.0.0.1:1", "--cert", "c", "--key", "k", "--tls-id", "t",
            "--rtp-in", "127.0.0.1:5004", "--rtp-out", "127.0.0.1:6000/96,97",
            "--rtp-out", "127.0.0.1:6002"])
        self.assertEqual(options["rtp-in"], ("127.0.0.1", 5004))
        self.assertEqual(options["rtp-out"], [("127.0.0.1", 6000, frozenset({96, 97})),
                                              ("127.0.0.1", 6002, None)])
        for bad in ("127.0.0.1", "127.0.0.1:6000/200", "127.0.0.1:x"):
            with self.assertRaises(UsageError):
                EndpointOptions().parseOptions([
                    "--media", "127.0.0.1:1", "--cert", "c", "--key", "k", "--tls-id", "t",
                    "--rtp-out", bad])
