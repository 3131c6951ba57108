"""
``perc demo``: a whole PERC conference on loopback in one process.

A temporary development PKI, a Key Distributor and a Media Distributor
(real TLS tunnel, real UDP), N reference endpoints registered through both
control APIs, media for a few seconds with one rekey midway, then a summary
and a proof that the Media Distributor could not read the media.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from twisted.internet import defer, task
from twisted.python import usage
from twisted.web.client import Agent

from perc import dtls, pki, profiles, rtp, wire
from perc.double import DoubleError, DoubleReceiver
from perc.endpoint import ReferenceEndpoint
from perc.errors import ConfigError
from perc.options import CommandOptions
from perc.scripts.register import (
    put_json,
    register_with_key_distributor,
    register_with_media_distributor,
)

__all__ = ["DemoOptions", "run_demo"]

CONFERENCE = "demo"


class DemoOptions(CommandOptions):
    synopsis = "[--endpoints N] [--seconds S] [--profile NAME] [--media video]"
    longdesc = ("Run a Key Distributor, a Media Distributor and N reference endpoints on "
                "loopback, rekey once midway, and show that every endpoint verified every "
                "other endpoint's media end to end while the Media Distributor could not "
                "read it. Exit status 0 only if that holds.")
    optParameters = [
        ["endpoints", "n", 3, "Number of endpoints (2 to 20).", int],
        ["seconds", "s", 4.0, "Seconds of media.", float],
        ["profile", "p", "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
         "Double protection profile to use."],
        ["media", None, None,
         "'video': the first endpoint bridges a real H.264 clip from ffmpeg (--rtp-in), the "
         "others hand what they verify to ffmpeg decoders (--rtp-out) that write one decoded "
         "frame each as a PNG (needs imageio-ffmpeg)."],
    ]

    def postOptions(self):
        if not 2 <= self["endpoints"] <= 20:
            raise usage.UsageError("--endpoints must be 2 to 20")
        if not 1 <= self["seconds"] <= 600:
            raise usage.UsageError("--seconds must be 1 to 600")
        try:
            [profile] = profiles.parse_profile_list(self["profile"])
        except (profiles.ProfileError, ValueError) as error:
            raise usage.UsageError("--profile: {}".format(error))
        if not profile.double:
            raise usage.UsageError("--profile: a PERC demo needs a double profile")
        self["profile"] = profile
        if self["media"] not in (None, "video"):
            raise usage.UsageError("--media: only 'video'")

    def run(self):
        from perc.scripts.register import run_in_reactor

        return run_in_reactor(lambda reactor: run_demo(
            reactor, self["endpoints"], self["seconds"], self["profile"],
            media=self["media"]))


class _KeyWatch:
    """Records every MediaKeys the Media Distributor receives, for the proof."""

    def __init__(self, relay):
        self.keys = []
        original = relay.mediaKeysReceived

        def watched(tunnel, message: wire.MediaKeys):
            self.keys.append(message)
            return original(tunnel, message)

        relay.mediaKeysReceived = watched


def _say(out, text=""):
    out.write(text + "\n")
    out.flush()


@defer.inlineCallbacks
def _start_distributors(reactor, directory):
    from perc.kd import tap as kd_tap
    from perc.kd.service import KeyDistributorService
    from perc.md import tap as md_tap
    from perc.md.service import MediaDistributorService

    dev = pki.create_dev_pki(os.path.join(directory, "pki"))
    kd_config = kd_tap.Options()
    kd_config.parseOptions([
        "--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
        "--api", "tcp:0:interface=127.0.0.1",
        "--api-token-file", os.path.join(directory, "kd.token"),
        "--db", os.path.join(directory, "kd.sqlite3")])
    kd = KeyDistributorService.fromOptions(kd_config, reactor)
    kd.privilegedStartService()
    kd.startService()
    yield kd.ready
    tunnel_port, kd_api_port = kd._ports
    md_config = md_tap.Options()
    md_config.parseOptions([
        "--pki", dev.directory, "--kd", "tcp:127.0.0.1:{}".format(tunnel_port.getHost().port),
        "--media-port", "0", "--media-interface", "127.0.0.1",
        "--api", "tcp:0:interface=127.0.0.1",
        "--api-token-file", os.path.join(directory, "md.token")])
    md = MediaDistributorService.fromOptions(md_config, reactor)
    md.privilegedStartService()
    md.startService()
    return dev, kd, md, kd_api_port.getHost().port, md.ports["api"].getHost().port


@defer.inlineCallbacks
def run_demo(reactor, endpoints=3, seconds=4.0, profile=None, out=None, media=None):
    """
    Run the demo; fires with the exit status (0 = everything verified).
    ``media="video"``: the first endpoint bridges an H.264 clip, the others
    decode it (see :class:`_VideoDemo`).
    """
    out = sys.stdout if out is None else out
    profile = profile or profiles.by_id(0x0009)
    directory = tempfile.mkdtemp(prefix="perc-demo-")
    kd = md = None
    ports = []
    try:
        _say(out, "perc demo: {} endpoints, {} s of media, {}".format(
            endpoints, seconds, profile.name))
        dev, kd, md, kd_api, md_api = yield _start_distributors(reactor, directory)
        watch = _KeyWatch(md.relay)
        _say(out, "  Key Distributor and Media Distributor up (PKI in {})".format(dev.directory))
        for _ in range(500):
            if md.pool.pick() is not None:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        else:
            raise ConfigError("the tunnel did not come up")
        _say(out, "  tunnel up: SupportedProfiles sent, Key Distributor accepted it")
        agent = Agent(reactor)
        kd_url = "http://127.0.0.1:{}".format(kd_api)
        md_url = "http://127.0.0.1:{}".format(md_api)
        kd_token = open(os.path.join(directory, "kd.token")).read().strip()
        md_token = open(os.path.join(directory, "md.token")).read().strip()
        kd_fingerprint = pki.fingerprint(kd.credentials.certificate)
        members = []
        for index in range(endpoints):
            name = "endpoint-{}".format(index + 1)
            credentials = dtls.Credentials.self_signed(name)
            tls_id = "{}-{}".format(name, os.urandom(12).hex())
            registration, _ = yield register_with_key_distributor(
                agent, kd_url, kd_token, CONFERENCE, tls_id, credentials.fingerprint,
                reactor=reactor)
            yield register_with_media_distributor(agent, md_url, md_token, CONFERENCE, tls_id,
                                                  reactor=reactor)
            endpoint = ReferenceEndpoint(
                name=name, credentials=credentials, tls_id=tls_id,
                server=("127.0.0.1", md.ports["media"].getHost().port), profile=profile,
                clock=reactor, expected_kd_tls_id=registration["kd_tls_id"],
                expected_kd_fingerprint=kd_fingerprint)
            ports.append(reactor.listenUDP(0, endpoint, interface="127.0.0.1"))
            members.append(endpoint)
        _say(out, "  {} endpoints registered with both distributors".format(endpoints))
        handshake_times = yield defer.gatherResults([m.joined for m in members], consumeErrors=True)
        for member, elapsed in zip(members, handshake_times):
            _say(out, "  {} joined in {:.1f} ms (hop-by-hop keys + EKTKey)".format(
                member.name, elapsed * 1000))
        captured = []
        first = members[0]
        original_write = first.transport.write
        video = None
        if media == "video":
            video = _VideoDemo(reactor, directory, members)
            yield video.start(seconds)
            ports += video.ports

        def capture(data, address=None):
            if len(captured) < 1 and rtp.classify(data) is rtp.Kind.RTP:
                captured.append(data)
            return original_write(data, address)

        first.transport.write = capture
        if video is None:
            for member in members:
                member.startSending()
        else:
            video.stream()
        yield task.deferLater(reactor, seconds / 2, lambda: None)
        code, answer = yield put_json(
            agent, "{}/v1/conferences/{}/rekey".format(kd_url, CONFERENCE).encode(), kd_token,
            {}, reactor=reactor, method=b"POST")
        _say(out, "  rekeyed midway: new EKTKey SPI {} sent to {} endpoints".format(
            answer.get("ekt_spi"), answer.get("endpoints")))
        yield task.deferLater(reactor, seconds / 2, lambda: None)
        for member in members:
            member.stopSending()
        if video is not None:
            yield video.finish()
        yield task.deferLater(reactor, 0.3, lambda: None)
        status = _report(out, members, md, watch, captured, profile, video)
        return status
    finally:
        for port in ports:
            yield port.stopListening()
        if md is not None:
            yield md.stopService()
        if kd is not None:
            yield kd.stopService()
        shutil.rmtree(directory, ignore_errors=True)


def _report(out, members, md, watch, captured, profile, video=None) -> int:
    ok = True
    _say(out)
    _say(out, "{:<12} {:>6} {:>8} {:>9} {:>7} {:>6} {:>6} {:>7}  {}".format(
        "endpoint", "sent", "received", "verified", "failed", "lost", "joins", "rekeys", "from"))
    by_ssrc = {m.ssrc: m.name for m in members}
    by_ssrc.update((ssrc, members[0].name) for ssrc in members[0].bridged_ssrcs)
    for member in members:
        received = sum(s.received for s in member.stats.values())
        verified = sum(s.verified for s in member.stats.values())
        failed = sum(s.failed for s in member.stats.values())
        lost = sum(s.lost for s in member.stats.values())
        senders = [by_ssrc.get(ssrc, hex(ssrc)) for ssrc, s in member.stats.items() if s.verified]
        expected = {m.name for m in members} - {member.name}
        if video is not None:
            expected = set() if member is members[0] else {members[0].name}
        if set(senders) != expected or failed:
            ok = False
        _say(out, "{:<12} {:>6} {:>8} {:>9} {:>7} {:>6} {:>6} {:>7}  {}".format(
            member.name, member.sent, received, verified, failed, lost, member.joins,
            member.rekeys,
            ", ".join(sorted(senders)) or "-"))
    counters = md.relay.counters
    _say(out)
    _say(out, "Media Distributor forwarded {} RTP packets; dropped: {}".format(
        counters.get("forwarded-rtp", 0),
        ", ".join("{} {}".format(v, k) for k, v in sorted(counters.items())
                  if k.startswith("dropped")) or "none"))
    # What the Media Distributor held: only hop-by-hop halves.
    hbh_length = profile.hbh_key_length
    only_hbh = all(len(k.client_key) == hbh_length and len(k.server_key) == hbh_length
                   for k in watch.keys) and len(watch.keys) == len(members)
    _say(out, "Media Distributor received {} MediaKeys, each with {}-octet hop-by-hop keys "
              "only; the EKTKey and the end-to-end keys travelled inside DTLS records it "
              "cannot decrypt: {}".format(len(watch.keys), hbh_length, "yes" if only_hbh else "NO"))
    ok = ok and only_hbh
    if video is not None:
        ok = video.report(out) and ok
    proof = _proof(captured, watch.keys, members[0], profile,
                   None if video is None else video.plain_payload)
    _say(out, proof[1])
    ok = ok and proof[0]
    _say(out, "RESULT: {}".format(
        "every endpoint verified every other endpoint's media end to end" if ok else "FAILED"))
    return 0 if ok else 1


def _proof(captured, media_keys, sender, profile, plain_payload=None):
    """
    Take one packet the first endpoint sent, remove the outer layer with the
    hop-by-hop key the Media Distributor has for it, and show that what is
    left holds no media plaintext and opens with none of its keys.
    """
    import pylibsrtp

    from perc.double import InnerAuthenticationError

    if not captured:
        return False, "proof: no packet captured"
    srtp, _ = rtp.split_ekt_field(captured[0])
    ssrc = int.from_bytes(srtp[8:12], "big")
    hbh = sender.hbh_keys
    inbound = pylibsrtp.Session(pylibsrtp.Policy(
        key=hbh.client_key + hbh.client_salt, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=profile.hbh_libsrtp_profile))
    as_held = inbound.unprotect(srtp)
    marker = b"PERC" + ssrc.to_bytes(4, "big") if plain_payload is None else plain_payload[:16]
    if marker in as_held:
        return False, "proof: FAILED, the media plaintext is visible after outer decryption"
    candidates = [(k.client_key, k.client_salt) for k in media_keys]
    candidates += [(k.server_key, k.server_salt) for k in media_keys]
    for key, salt in candidates:
        receiver = DoubleReceiver(profile, hbh.client_key, hbh.client_salt)
        receiver.add_sender_key(ssrc, key, salt)
        try:
            receiver.unprotect(srtp)
        except InnerAuthenticationError:
            continue
        except DoubleError as error:
            return False, "proof: inconclusive ({})".format(error.reason)
        return False, "proof: FAILED, the inner layer opened with a Media Distributor key"
    return True, ("proof: packet {} from {} as the Media Distributor holds it after outer "
                  "decryption is {}...; it does not contain the media plaintext, and its inner "
                  "layer failed to open with each of the {} keys the Media Distributor "
                  "has".format(int.from_bytes(srtp[2:4], "big"), sender.name,
                               as_held[:24].hex(), len(candidates)))


class _VideoDemo:
    """
    ``perc demo --media video``: ffmpeg streams an H.264 clip (lavfi
    testsrc, libx264, 160x120) into the first endpoint's --rtp-in; every
    other endpoint's --rtp-out goes into an ffmpeg that decodes it (from
    an SDP file written here), counts the frames (framemd5) and keeps the
    last one as a PNG in a directory that outlives the demo.
    """

    def __init__(self, reactor, directory, members):
        self.reactor = reactor
        self.directory = directory
        self.members = members
        self.frames_directory = tempfile.mkdtemp(prefix="perc-demo-frames-")
        self.ports = []
        self.decoders = []  # (member, process, Deferred, md5 path, png path)
        self.streamer = None
        self.plain_payload = None
        self.clip = os.path.join(directory, "clip.mkv")

    @defer.inlineCallbacks
    def start(self, seconds):
        from perc import mediatools, rtpbridge

        code, _, err = yield mediatools.run(self.reactor, mediatools.make_clip(
            self.clip, seconds=seconds, audio=False))
        if code != 0:
            raise ConfigError("ffmpeg could not make the clip: {}".format(err.strip()))
        sender, receivers = self.members[0], self.members[1:]
        self.rtp_in = mediatools.free_ports(2)
        self.ports += rtpbridge.listen(self.reactor, sender, rtp_in=("127.0.0.1", self.rtp_in))
        original = sender.sendRtp

        def remember(packet):
            if self.plain_payload is None:
                self.plain_payload = packet[12:]
            return original(packet)

        sender.sendRtp = remember
        for member in receivers:
            port = mediatools.free_ports(2)
            self.ports += rtpbridge.listen(self.reactor, member,
                                           rtp_out=[("127.0.0.1", port, None)])
            sdp = os.path.join(self.directory, member.name + ".sdp")
            with open(sdp, "w") as f:
                f.write(rtpbridge.receiver_sdp("127.0.0.1", video=(port, 96)))
            md5 = os.path.join(self.directory, member.name + ".md5")
            png = os.path.join(self.frames_directory, member.name + ".png")
            process, done = mediatools.spawn(self.reactor, mediatools.decode_args(
                sdp, [("v", "framemd5", md5), ("v", "image2", png)]))
            self.decoders.append((member, process, done, md5, png))
            for _ in range(500):
                if mediatools.port_bound(port):
                    break
                yield task.deferLater(self.reactor, 0.02, lambda: None)

    def stream(self):
        from perc import mediatools

        self.streamer = mediatools.run(self.reactor, mediatools.stream_args(
            self.clip, "127.0.0.1", self.rtp_in, video_pt=96))

    @defer.inlineCallbacks
    def finish(self):
        self.streamed = yield self.streamer
        yield task.deferLater(self.reactor, 0.5, lambda: None)
        for _, process, done, _, _ in self.decoders:
            if not done.called:
                process.signalProcess("INT")
        yield defer.gatherResults([d[2] for d in self.decoders])

    def report(self, out) -> bool:
        from perc import mediatools

        ok = self.streamed[0] == 0
        _say(out)
        _say(out, "{:<12} {:>14}  {}".format("receiver", "frames decoded", "last frame"))
        for member, _, _, md5, png in self.decoders:
            frames = len(mediatools.framemd5_hashes(md5)) if os.path.exists(md5) else 0
            ok = ok and frames > 0 and os.path.exists(png)
            _say(out, "{:<12} {:>14}  {}".format(
                member.name, frames, png if os.path.exists(png) else "(none)"))
        refused = self.members[0].refused
        _say(out, "{} refused {} bridged packets{}".format(
            self.members[0].name, sum(refused.values()),
            "" if not refused else " ({})".format(dict(refused))))
        return ok and not refused
