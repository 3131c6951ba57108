"""
ffmpeg (from the ``imageio-ffmpeg`` package) around the RTP bridge: make a
test clip, stream it as RTP into ``--rtp-in``, decode what ``--rtp-out``
hands out.  Used by ``perc demo --media video`` and the bridge tests.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, protocol

__all__ = ["FfmpegMissing", "ffmpeg", "make_clip", "stream_args", "decode_args", "run",
           "spawn", "free_ports", "framemd5_hashes"]

#: RTP payload size ffmpeg is told to keep to (``pkt_size``): under
#: perc.rtpbridge.MAX_RTP_PACKET.
PACKET_SIZE = 1200


class FfmpegMissing(RuntimeError):
    """imageio-ffmpeg is not installed (``pip install -e '.[test]'`` brings it)."""


def ffmpeg() -> str:
    """The ffmpeg executable imageio-ffmpeg carries; FfmpegMissing without it."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise FfmpegMissing("imageio-ffmpeg is not installed") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def make_clip(path: str, seconds: float = 2.0, size: str = "160x120", rate: int = 25,
              audio: bool = True):
    """
    ffmpeg arguments for a test clip (Matroska): lavfi testsrc in H.264
    (libx264, no B-frames, parameter sets in band before every keyframe)
    and, with ``audio``, a sine in Opus.
    """
    args = ["-nostdin", "-y", "-loglevel", "error",
            "-f", "lavfi", "-i", "testsrc=size={}:rate={}:duration={}".format(size, rate, seconds)]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:duration={}".format(seconds)]
    args += ["-map", "0:v", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
             "-bf", "0", "-g", str(rate), "-x264-params", "repeat-headers=1"]
    if audio:
        args += ["-map", "1:a", "-c:a", "libopus", "-b:a", "32k"]
    return args + [path]


def stream_args(clip: str, host: str, port: int, video_pt: int = 96, audio_pt=None):
    """ffmpeg arguments streaming ``clip`` in real time as RTP to host:port (RTCP to port + 1)."""
    url = "rtp://{}:{}?pkt_size={}".format(host, port, PACKET_SIZE)
    args = ["-nostdin", "-loglevel", "error", "-re", "-i", clip,
            "-map", "0:v", "-c", "copy", "-payload_type", str(video_pt), "-f", "rtp", url]
    if audio_pt is not None:
        args += ["-map", "0:a", "-c", "copy", "-payload_type", str(audio_pt), "-f", "rtp", url]
    return args


def decode_args(source: str, outputs, sdp: bool = True):
    """
    ffmpeg arguments decoding ``source`` (an SDP file unless ``sdp`` is
    false) into ``outputs``: (stream, format, path) triples, e.g.
    ("v", "framemd5", "video.md5") or ("v", "image2", "last.png").
    """
    args = ["-nostdin", "-y", "-loglevel", "error"]
    if sdp:
        # Probe one second of the stream, not ffmpeg's default five, and
        # decode on one thread (frame threads hold frames back): a short
        # stream's frames then come out as it arrives, not only once the
        # decoder is stopped.  A 4 MiB socket receive buffer (what perc-md
        # asks for too) takes a relay's burst after it fell behind.
        args += ["-protocol_whitelist", "file,udp,rtp", "-reorder_queue_size", "0",
                 "-analyzeduration", "1000000", "-threads", "1",
                 "-buffer_size", str(4 << 20)]
    args += ["-i", source]
    for stream, kind, path in outputs:
        args += ["-map", "0:" + stream]
        if kind == "image2":
            args += ["-update", "1"]
        if sdp:
            # A live source: each frame reaches the file as it is decoded, so
            # that a caller can watch the decoder's progress there.
            args += ["-flush_packets", "1"]
        args += ["-f", kind, path]
    return args


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done):
        self.done = done
        self.err = b""

    def errReceived(self, data):
        self.err = (self.err + data)[-8192:]

    def processEnded(self, reason):
        self.done.callback((reason.value.exitCode, reason.value.signal,
                            self.err.decode(errors="replace")))


def spawn(reactor, args):
    """
    Start ffmpeg with ``args``; returns (process transport, Deferred firing
    with (exit code, signal, the end of stderr)).
    """
    done = defer.Deferred()
    transport = reactor.spawnProcess(_Collect(done), ffmpeg(), [ffmpeg()] + list(args),
                                     env=os.environ.copy())
    return transport, done


def run(reactor, args):
    """Run ffmpeg to the end: a Deferred firing as :func:`spawn`'s."""
    return spawn(reactor, args)[1]


def free_ports(count: int = 4) -> int:
    """An even UDP port P on 127.0.0.1 with P .. P + count - 1 free just now."""
    for _ in range(200):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1] & ~1
        probe.close()
        if base + count > 65535:
            continue
        if all(not port_bound(port) for port in range(base, base + count)):
            return base
    raise RuntimeError("no free UDP ports")


def port_bound(port: int) -> bool:
    """True if UDP 127.0.0.1:port is taken (someone listens there)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return True
    finally:
        probe.close()
    return False


def framemd5_frames(path: str) -> list:
    """
    The frames of an ffmpeg ``framemd5`` file, in order, as (presentation
    time in seconds, MD5 hash) pairs, each time in its own stream's time base.
    """
    frames = []
    time_bases: dict = {}
    with open(path) as lines:
        for line in lines:
            if line.startswith("#tb"):
                # "#tb 0: 1/25": stream 0's time base.
                stream, _, fraction = line[3:].partition(":")
                numerator, _, denominator = fraction.strip().partition("/")
                time_bases[int(stream)] = int(numerator) / int(denominator)
            if line.startswith("#") or not line.strip():
                continue
            # stream, dts, pts, duration, size, hash
            fields = [field.strip() for field in line.split(",")]
            frames.append((int(fields[2]) * time_bases.get(int(fields[0]), 1.0), fields[-1]))
    return frames


def framemd5_hashes(path: str) -> list:
    """The per-frame MD5 hashes of an ffmpeg ``framemd5`` file, in order."""
    return [md5 for _, md5 in framemd5_frames(path)]
