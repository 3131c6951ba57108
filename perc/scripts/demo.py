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

from twisted.internet import defer, task, threads
from twisted.python import usage
from twisted.web.client import Agent

from perc import dtls, pki, profiles, rtp, wire
from perc.double import DoubleError, DoubleReceiver
from perc.endpoint import ReferenceEndpoint
from perc.errors import ConfigError
from perc.kd.store.database import describe_database
from perc.options import CommandOptions
from perc.scripts.register import (
    put_json,
    register_with_key_distributor,
    register_with_media_distributor,
)

__all__ = ["DemoOptions", "run_demo"]

CONFERENCE = "demo"


class DemoOptions(CommandOptions):
    synopsis = ("[--endpoints N] [--seconds S] [--profile NAME] [--media video] "
                "[--key-distributors N --db postgresql://... [--kill-key-distributor-at S]]")
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
        ["key-distributors", "k", 1,
         "Number of Key Distributors (1 to 4). More than one, or --db, runs them as "
         "'twistd perc-kd' processes sharing --db; the Media Distributor has a tunnel to "
         "each.", int],
        ["db", None, None,
         "postgresql://USER@HOST:PORT/DB of a PostgreSQL server (needed for more than one "
         "Key Distributor): the demo creates a database of its own there (the user needs "
         "CREATEDB), which its Key Distributors share, and drops it at the end. Default: an "
         "SQLite file in a temporary directory."],
        ["kill-key-distributor-at", None, None,
         "Seconds into the media at which the Key Distributor holding the most associations "
         "is killed (SIGKILL); a survivor adopts them and the rekey goes through it. Needs "
         "--key-distributors 2 or more.", float],
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
        if not 1 <= self["key-distributors"] <= 4:
            raise usage.UsageError("--key-distributors must be 1 to 4")
        if self["db"] is not None and not self["db"].startswith(("postgresql://",
                                                                 "postgres://")):
            raise usage.UsageError("--db: a postgresql://USER@HOST:PORT/DB URL")
        if self["key-distributors"] > 1 and self["db"] is None:
            raise usage.UsageError("--key-distributors {}: the Key Distributors of a cluster "
                                   "share a PostgreSQL database; give --db postgresql://"
                                   "USER@HOST:PORT/DB".format(self["key-distributors"]))
        kill_at = self["kill-key-distributor-at"]
        if kill_at is not None:
            if self["key-distributors"] < 2:
                raise usage.UsageError("--kill-key-distributor-at needs --key-distributors 2 "
                                       "or more (a survivor must adopt the associations)")
            if not 0 < kill_at < self["seconds"]:
                raise usage.UsageError("--kill-key-distributor-at must be above 0 and below "
                                       "--seconds")

    def run(self):
        from perc.scripts.register import run_in_reactor

        return run_in_reactor(lambda reactor: run_demo(
            reactor, self["endpoints"], self["seconds"], self["profile"],
            media=self["media"], key_distributors=self["key-distributors"], db=self["db"],
            kill_at=self["kill-key-distributor-at"]))


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


#: Lease of each demo Key Distributor in the database: a killed one's
#: associations are adopted about this long after its last renewal.
DEMO_LEASE_SECONDS = 3.0


class _KeyDistributor:
    """One of the demo's Key Distributors: in this process, or a ``twistd perc-kd``."""

    def __init__(self, name, api_port, tunnel_port, service=None, process=None):
        self.name = name
        self.api_url = "http://127.0.0.1:{}".format(api_port)
        self.tunnel_endpoint = "tcp:127.0.0.1:{}".format(tunnel_port)
        self.service = service
        self.process = process
        self.killed = False


@defer.inlineCallbacks
def _start_key_distributors(reactor, directory, dev, count, db):
    """The demo's Key Distributors: one in this process on SQLite, or processes sharing ``db``."""
    from perc.daemons import start_key_distributors
    from perc.kd import tap as kd_tap
    from perc.kd.service import KeyDistributorService

    if count == 1 and db is None:
        kd_config = kd_tap.Options()
        kd_config.parseOptions([
            "--pki", dev.directory, "--tunnel-listen", "tcp:0:interface=127.0.0.1",
            "--api", "tcp:0:interface=127.0.0.1",
            "--api-token-file", os.path.join(directory, "perc-kd-api.token"),
            "--db", os.path.join(directory, "kd.sqlite3")])
        kd = KeyDistributorService.fromOptions(kd_config, reactor)
        kd.privilegedStartService()
        kd.startService()
        yield kd.ready
        tunnel_port, api_port = kd._ports
        return [_KeyDistributor("kd", api_port.getHost().port, tunnel_port.getHost().port,
                                service=kd)]
    processes = yield defer.ensureDeferred(start_key_distributors(
        reactor, directory, count, pki_directory=dev.directory, db=db,
        lease_seconds=DEMO_LEASE_SECONDS))
    return [_KeyDistributor(p.node_id, p.api_port, p.tunnel_port, process=p.daemon)
            for p in processes]


def _start_media_distributor(reactor, directory, dev, key_distributors):
    from perc.md import tap as md_tap
    from perc.md.service import MediaDistributorService

    md_config = md_tap.Options()
    arguments = ["--pki", dev.directory, "--media-port", "0", "--media-interface", "127.0.0.1",
                 "--api", "tcp:0:interface=127.0.0.1",
                 "--api-token-file", os.path.join(directory, "md.token")]
    for kd in key_distributors:
        arguments += ["--kd", kd.tunnel_endpoint]
    md_config.parseOptions(arguments)
    md = MediaDistributorService.fromOptions(md_config, reactor)
    md.privilegedStartService()
    md.startService()
    return md


def _associations_by_key_distributor(md) -> dict:
    """Tunnel endpoint description (``--kd``) to the associations its tunnel carries now."""
    return {manager.name: manager.status()["associations"] for manager in md.pool.managers}


@defer.inlineCallbacks
def _stop_key_distributors(key_distributors):
    for kd in key_distributors:
        if kd.service is not None:
            yield kd.service.stopService()
        elif kd.process is not None:
            kd.process.stop()


@defer.inlineCallbacks
def run_demo(reactor, endpoints=3, seconds=4.0, profile=None, out=None, media=None,
             key_distributors=1, db=None, kill_at=None, members_out=None):
    """
    Run the demo; fires with the exit status (0 = everything verified).
    ``media="video"``: the first endpoint bridges an H.264 clip, the others
    decode it (see :class:`_VideoDemo`).  ``key_distributors`` > 1 or
    ``db`` (a PostgreSQL URL): ``twistd perc-kd`` processes sharing ``db``;
    ``kill_at``: seconds into the media at which the busiest is killed.
    ``members_out``: a list the endpoints are appended to (for tests).
    """
    from cryptography import x509

    out = sys.stdout if out is None else out
    profile = profile or profiles.by_id(0x0009)
    directory = tempfile.mkdtemp(prefix="perc-demo-")
    conference = CONFERENCE
    database = None  # the demo's own database on the PostgreSQL server ``db``
    kds = []
    md = None
    ports = []
    members = []
    try:
        _say(out, "perc demo: {} endpoints, {} s of media, {}".format(
            endpoints, seconds, profile.name))
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        if db is not None:
            from perc.kd.store.postgresql import create_scratch_database

            database = yield threads.deferToThread(create_scratch_database, db, "perc_demo")
        kds = yield _start_key_distributors(reactor, directory, dev, key_distributors, database)
        md = _start_media_distributor(reactor, directory, dev, kds)
        watch = _KeyWatch(md.relay)
        if len(kds) == 1:
            _say(out, "  Key Distributor and Media Distributor up (PKI in {})".format(
                dev.directory))
        else:
            _say(out, "  {} Key Distributors ({}; processes {}) on {} and a Media Distributor "
                      "up (PKI in {})".format(len(kds), ", ".join(kd.name for kd in kds),
                                              ", ".join(str(kd.process.pid) for kd in kds),
                                              describe_database(database), dev.directory))
        for _ in range(500):
            if len(md.pool.tunnels) == len(kds):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        else:
            raise ConfigError("the tunnels did not come up")
        _say(out, "  {}: SupportedProfiles sent, Key Distributor accepted it".format(
            "tunnel up" if len(kds) == 1 else "{} tunnels up".format(len(kds))))
        agent = Agent(reactor)
        md_url = "http://127.0.0.1:{}".format(md.ports["api"].getHost().port)
        kd_token = open(os.path.join(directory, "perc-kd-api.token")).read().strip()
        md_token = open(os.path.join(directory, "md.token")).read().strip()
        with open(dev.kd_certificate, "rb") as f:
            kd_fingerprint = pki.fingerprint(x509.load_pem_x509_certificate(f.read()))
        for index in range(endpoints):
            name = "endpoint-{}".format(index + 1)
            credentials = dtls.Credentials.self_signed(name)
            tls_id = "{}-{}".format(name, os.urandom(12).hex())
            # Any Key Distributor of a cluster registers for all of them.
            registration, _ = yield register_with_key_distributor(
                agent, kds[index % len(kds)].api_url, kd_token, conference, tls_id,
                credentials.fingerprint, reactor=reactor)
            yield register_with_media_distributor(agent, md_url, md_token, conference, tls_id,
                                                  reactor=reactor)
            endpoint = ReferenceEndpoint(
                name=name, credentials=credentials, tls_id=tls_id,
                server=("127.0.0.1", md.ports["media"].getHost().port), profile=profile,
                clock=reactor, expected_kd_tls_id=registration["kd_tls_id"],
                expected_kd_fingerprint=kd_fingerprint)
            ports.append(reactor.listenUDP(0, endpoint, interface="127.0.0.1"))
            members.append(endpoint)
            if members_out is not None:
                members_out.append(endpoint)
        _say(out, "  {} endpoints registered with both distributors".format(endpoints))
        handshake_times = yield defer.gatherResults([m.joined for m in members], consumeErrors=True)
        for member, elapsed in zip(members, handshake_times):
            _say(out, "  {} joined in {:.1f} ms (hop-by-hop keys + EKTKey)".format(
                member.name, elapsed * 1000))
        if len(kds) > 1:
            carried = _associations_by_key_distributor(md)
            _say(out, "  associations per Key Distributor: {}".format(", ".join(
                "{} {}".format(kd.name, carried.get(kd.tunnel_endpoint, 0)) for kd in kds)))
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
        started = reactor.seconds()
        if kill_at is None:
            yield task.deferLater(reactor, seconds / 2, lambda: None)
            rekey_through = kds[0]
        else:
            yield task.deferLater(reactor, kill_at, lambda: None)
            rekey_through = yield _kill_busiest(reactor, out, md, kds)
        code, answer = yield put_json(
            agent, "{}/v1/conferences/{}/rekey".format(
                rekey_through.api_url, conference).encode(), kd_token,
            {}, reactor=reactor, method=b"POST")
        if code != 200:
            raise ConfigError("the rekey through {} was refused: {} {}".format(
                rekey_through.name, code, answer))
        _say(out, "  rekeyed {}: new EKTKey SPI {} sent{}".format(
            "midway" if kill_at is None else "through " + rekey_through.name,
            answer.get("ekt_spi"),
            "" if len(kds) > 1 else " to {} endpoints".format(answer.get("endpoints"))))
        # Media under the new key for the rest of --seconds, two seconds at least.
        remaining = seconds - (reactor.seconds() - started)
        yield task.deferLater(reactor, max(remaining, 2.0 if kill_at is not None else 0.0),
                              lambda: None)
        for member in members:
            member.stopSending()
        if video is not None:
            yield video.finish()
        yield task.deferLater(reactor, 0.3, lambda: None)
        status = _report(out, members, md, watch, captured, profile, video,
                         failover=kill_at is not None)
        return status
    finally:
        for port in ports:
            yield port.stopListening()
        if md is not None:
            yield md.stopService()
        yield _stop_key_distributors(kds)
        if database is not None:
            from perc.kd.store.postgresql import drop_database

            yield threads.deferToThread(drop_database, database, db)
        shutil.rmtree(directory, ignore_errors=True)


@defer.inlineCallbacks
def _kill_busiest(reactor, out, md, kds):
    """
    SIGKILL the Key Distributor whose tunnel carries the most associations;
    fires with a survivor once it has adopted them (the dead one's lease
    expires first).
    """
    carried = _associations_by_key_distributor(md)
    victim = max(kds, key=lambda kd: carried.get(kd.tunnel_endpoint, 0))
    survivors = [kd for kd in kds if kd is not victim]
    killed_at = reactor.seconds()
    victim.process.kill()
    victim.killed = True
    _say(out, "  killed {} (SIGKILL, process {}) holding {} associations".format(
        victim.name, victim.process.pid, carried.get(victim.tunnel_endpoint, 0)))
    if not carried.get(victim.tunnel_endpoint, 0):
        return survivors[0]
    adopted = [defer.ensureDeferred(kd.process.said(
        reactor, "orphaned associations (of dead nodes", timeout=DEMO_LEASE_SECONDS * 3 + 20))
        for kd in survivors]
    adopter = yield defer.DeferredList(adopted, fireOnOneCallback=True, consumeErrors=True)
    if not isinstance(adopter, tuple):
        raise ConfigError("no surviving Key Distributor adopted the associations of {}".format(
            victim.name))
    survivor = survivors[adopter[1]]
    for waiting in adopted:
        waiting.cancel()  # the other survivors' log need not be read any more
    _say(out, "  {} adopted them {:.1f} s after the kill (its lease is {} s)".format(
        survivor.name, reactor.seconds() - killed_at, DEMO_LEASE_SECONDS))
    return survivor


def _report(out, members, md, watch, captured, profile, video=None, failover=False) -> int:
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
        # Every endpoint saw the rekey, and handshook once: a failover is not noticed.
        if set(senders) != expected or failed or member.joins != 1 or member.rekeys < 1:
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
    if failover:
        _say(out, "Key Distributor killed mid-conference: every endpoint {} (joins 1, rekeys "
                  "seen)".format("carried on without a new handshake" if all(
                      m.joins == 1 and m.rekeys >= 1 for m in members) else "did NOT"))
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
