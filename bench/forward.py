"""
Forwarding benchmark: how many SRTP packets per second ``twistd perc-md``
forwards with zero loss, against a minimal Python relay doing the same
pylibsrtp work, measured the same way in the same run.

Set-up: a temporary development PKI, a real ``twistd -n perc-kd`` and a real
``twistd -n perc-md`` (subprocesses); K endpoints registered through both
control APIs join one conference through the Media Distributor with real
DTLS (extension 56 tls-id, EKT offered, the Key Distributor's identity
checked), so the Media Distributor holds the hop-by-hop keys it got through
the real tunnel.  The endpoints live in this (benchmark) process, driven by
plain non-blocking sockets; the Media Distributor and the baseline relay are
each a process of their own.  With two or more CPUs the relays are pinned to
the last one and this process to the first (``--no-pin`` to leave placement
to the scheduler), so the relay under test never shares a core with the load.
With ``--conferences C``, C such conferences of K endpoints go through the
one perc-md (and the baseline relay forwards within each), each with a
sender of its own; the senders take turns, and rates count all of them.

Media: endpoint 1 sends RTP packets with a ``--payload``-octet payload
(opaque bytes standing for inner ciphertext, inner tag and OHB), outer layer
protected with its exported hop-by-hop client key, each followed by a
ShortEKTField when EKT was negotiated (as a PERC endpoint sends).  The K-1
other endpoints count what arrives (their sockets have large buffers: loss
is never theirs; ``drops`` in the table shows where it happened) and keep
what arrives; after each trial's figures are taken, every packet kept is
checked (``--sample-every N``: every N-th): its outer layer with the
receiver's hop-by-hop server key, its header, payload and EKT field against
what was sent.  The search's time budget does not count that checking.

Baseline: a subprocess with one plain blocking UDP socket and, per endpoint,
the same pylibsrtp sessions the Media Distributor has (same exported keys):
per packet one unprotect, K-1 protects and K-1 sendto.  Same sender, same
receivers, and the same socket receive buffer as perc-md's default
(``--udp-receive-buffer``, 4 MiB), so that the ratio compares packet
handling, not buffering.

Measure: a full-speed run against each relay (30000 packets as fast as
this process sends them) gives its delivered rate and loss when flooded;
then paced trials (interleaved: perc-md, baseline, perc-md, ...) find for
each the highest offered rate with zero loss: a ramp up by 1.6 from 4000
packets/s until a rate loses packets, then ``--steps`` bisections.  A
lossy rate is tried once more (``--retries``) before it counts as too fast,
for both relays alike: a shared machine stalls a process now and then.  A
lossy trial in which this process fell behind its schedule while the relay
was not busy says nothing and is run again (a few times at most).  After
40 trial lengths (at least 30 s) the search stops where it is.

``forward_pps`` and ``baseline_pps`` are the offered rates of the best
loss-free trials, in packets per second *from the sender* (each is
forwarded to K-1 receivers); ``ratio`` = forward_pps / baseline_pps.  CPU
per forwarded packet is from ``/proc/PID/stat`` (utime + stime) of the relay
process over the trial; finally both relays run alternately at the same
rate (0.8 of the lower of the two) for ``cpu_ratio_same_rate``
(baseline CPU / perc-md CPU per forwarded packet), which is steadier than
the zero-loss ratio on a busy machine.

    python bench/forward.py [--endpoints 10] [--conferences 1] [--seconds 1] [--payload 200]
    perc bench forward --endpoints 4

The last line printed is one JSON object with the figures.  Exit status 1
(with a line starting ``FAILED`` on standard error) if an endpoint cannot
join, media is not delivered, a sample fails verification, perc-md drops
media it should forward or logs a traceback, or no rate is loss-free.
``--md-profile FILE`` runs perc-md under cProfile and prints its top
functions (the figures are then not representative).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from perc.md.tap import DEFAULT_UDP_RECEIVE_BUFFER  # noqa: E402
from perc.netutil import set_receive_buffer  # noqa: E402

CONFERENCE = "bench-forward"
#: Receive buffer of each endpoint socket: the receivers must never be where loss happens.
ENDPOINT_RCVBUF = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RTP_HEADER = struct.Struct("!BBHII")
#: Each trial sends with an SSRC of its own (these plus the trial number):
#: a trial starts a fresh SRTP stream at every relay and receiver, so heavy
#: loss in one trial (more than 32768 packets in a row lost would put a
#: receiver's rollover counter out of step) cannot spoil the next.
SSRC_MD = 0x4D440000
SSRC_BASELINE = 0x42410000
#: Packets of a full-speed trial: fewer than 32768, for the same reason.
FULL_SPEED_PACKETS = 30000


class BenchFailure(Exception):
    """Media not delivered, verification failed, or no loss-free rate: exit 1."""


# --------------------------------------------------------------------------
# Options


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench forward",
        description="Zero-loss forwarding rate of twistd perc-md against a minimal Python "
                    "relay doing the same pylibsrtp work (ratio = forward_pps / baseline_pps).")
    parser.add_argument("--endpoints", "-n", type=int, default=10,
                        help="endpoints in the conference: 1 sender, K-1 receivers (default 10)")
    parser.add_argument("--conferences", type=int, default=1,
                        help="conferences of --endpoints each, all through the one perc-md; "
                             "each has its own sender and the rate counts every sender "
                             "(default 1)")
    parser.add_argument("--seconds", "-s", type=float, default=1.0,
                        help="length of each paced trial in seconds (default 1.0)")
    parser.add_argument("--payload", type=int, default=200,
                        help="RTP payload octets per packet (default 200)")
    parser.add_argument("--profile", "-p", default="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
                        help="SRTP protection profile negotiated (default 0x0009, whose outer "
                             "layer is AES-128-GCM)")
    parser.add_argument("--steps", type=int, default=6,
                        help="bisection steps of the zero-loss search per relay, after the "
                             "ramp (default 6)")
    parser.add_argument("--retries", type=int, default=1,
                        help="times a rate that lost packets is tried again before it counts "
                             "as too fast (default 1)")
    parser.add_argument("--md-profile", metavar="FILE",
                        help="run perc-md under cProfile (twistd --profiler cprofile) and save "
                             "the statistics to FILE; the figures are then not representative")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the relay under test and the load generator to "
                             "different CPUs (pinned by default when there are two or more)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs)")
    parser.add_argument("--sample-every", type=int, default=1, metavar="N",
                        help="verify every N-th packet each receiver gets (default 1: every "
                             "forwarded packet, byte for byte, after each trial's figures)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="whole runs (fresh daemons each); the ratios are reported as "
                             "min, median and max over them (default 3)")
    parser.add_argument("--baseline-relay", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_relay or args.floor:
        return args
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1 to 20")
    if args.sample_every < 1:
        parser.error("--sample-every must be 1 or more")
    if not 2 <= args.endpoints <= 50:
        parser.error("--endpoints must be 2 to 50")
    if not 1 <= args.conferences <= 20:
        parser.error("--conferences must be 1 to 20")
    if not 0.2 <= args.seconds <= 10:
        parser.error("--seconds must be 0.2 to 10")
    if not 1 <= args.payload <= 1400:
        parser.error("--payload must be 1 to 1400 (pylibsrtp protects at most 1500 octets)")
    if not 1 <= args.steps <= 20:
        parser.error("--steps must be 1 to 20")
    if not 0 <= args.retries <= 5:
        parser.error("--retries must be 0 to 5")
    from perc import profiles

    try:
        chosen = profiles.parse_profile_list(args.profile)
    except (profiles.ProfileError, ValueError) as error:
        parser.error("--profile: {}".format(error))
    if len(chosen) != 1:
        parser.error("--profile: give exactly one profile")
    args.profile = chosen[0]
    return args


# --------------------------------------------------------------------------
# The baseline relay (a subprocess: --baseline-relay CONFIG)


def run_baseline_relay(config_path: str) -> int:
    """
    The minimal relay: a blocking socket, a dict from source address to the
    source's inbound session and the other endpoints' outbound sessions.
    """
    import pylibsrtp

    with open(config_path) as f:
        config = json.load(f)
    os.unlink(config_path)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    set_receive_buffer(sock, DEFAULT_UDP_RECEIVE_BUFFER)
    srtp_profile = config["srtp_profile"]

    def session(key_hex, direction):
        return pylibsrtp.Session(pylibsrtp.Policy(
            key=bytes.fromhex(key_hex), ssrc_type=direction, srtp_profile=srtp_profile))

    endpoints = [(tuple(e["address"]), e["conference"],
                  session(e["inbound"], pylibsrtp.Policy.SSRC_ANY_INBOUND),
                  session(e["outbound"], pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
                 for e in config["endpoints"]]
    table = {address: (inbound, [(outbound.protect, other)
                                 for other, in_conference, _, outbound in endpoints
                                 if in_conference == conference and other != address])
             for address, conference, inbound, _ in endpoints}
    ekt = config["ekt"]
    print(sock.getsockname()[1], sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
          flush=True)
    recvfrom, sendto, get = sock.recvfrom, sock.sendto, table.get
    srtp_error = pylibsrtp.Error
    while True:
        data, address = recvfrom(8192)
        entry = get(address)
        if entry is None or len(data) < 13:
            continue
        tail = b""
        if ekt:
            if data[-1] != 0:  # only ShortEKTFields in this benchmark
                continue
            data, tail = data[:-1], data[-1:]
        try:
            plain = entry[0].unprotect(data)
        except (srtp_error, ValueError):
            continue
        for protect, other in entry[1]:
            sendto(protect(plain) + tail, other)


def run_floor(config_path: str) -> int:
    """
    The physical floor under a relay's cost per forwarded packet, measured
    in a process of its own (pinned like the relays): the kernel's send
    path alone (``sendmmsg`` of prebuilt datagrams of the forwarded size to
    the receivers, no Python per datagram) and one pylibsrtp protect alone
    (distinct packets of the sent size, the receivers' profile).  Prints
    one JSON line: user and system CPU seconds per datagram of each.
    """
    import pylibsrtp

    from perc import mmsg

    with open(config_path) as f:
        config = json.load(f)
    os.unlink(config_path)
    seconds = config["seconds"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    receivers = [tuple(a) for a in config["receivers"]]
    batch = mmsg.BatchSocket(sock.fileno(), socket.AF_INET)
    wire = os.urandom(config["wire_length"])
    messages = [(wire, receivers[i % len(receivers)])
                for i in range(64 // len(receivers) * len(receivers))]
    batch.prepare(messages)
    send = batch.send_prepared
    figures = {}
    before, sent, start = os.times(), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            count = send()
            if count > 0:
                sent += count
    after = os.times()
    figures["send_user_s"] = (after.user - before.user) / max(1, sent)
    figures["send_system_s"] = (after.system - before.system) / max(1, sent)
    figures["sent"] = sent
    session = pylibsrtp.Session(pylibsrtp.Policy(
        key=bytes.fromhex(config["key"]), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=config["srtp_profile"]))
    payload = os.urandom(config["plain_length"] - RTP_HEADER.size)
    protect = session.protect
    protected = 0
    before, start = os.times(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        plains = [RTP_HEADER.pack(0x80, 96, s & 0xFFFF, s * 160, 0x5EED) + payload
                  for s in range(protected + 1, protected + 2001)]
        for plain in plains:
            protect(plain)
        protected += len(plains)
    after = os.times()
    # The packets' construction is charged too: a few percent of a
    # protect, so the floor is slightly high, never low.
    figures["protect_user_s"] = (after.user - before.user) / protected
    figures["protect_system_s"] = (after.system - before.system) / protected
    figures["protected"] = protected
    # For the record, not in the floor: libsrtp's protect in place (what
    # perc-md's batched path calls), without pylibsrtp's Python wrapper.
    from perc.md import srtpbatch

    if srtpbatch.available():
        from pylibsrtp import _binding

        ffi, lib = _binding.ffi, _binding.lib
        buffer, cell = ffi.new("char[]", 1500), ffi.new("int *")
        view = ffi.buffer(buffer)
        context, srtp_protect = srtpbatch.context(session), lib.srtp_protect
        done = 0
        before, start = os.times(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            plains = [RTP_HEADER.pack(0x80, 96, s & 0xFFFF, s * 160, 0x5EEE) + payload
                      for s in range(done + 1, done + 2001)]
            for plain in plains:
                view[0:len(plain)] = plain
                cell[0] = len(plain)
                srtp_protect(context, buffer, cell)
            done += len(plains)
        after = os.times()
        figures["protect_in_place_s"] = (after.user - before.user + after.system
                                         - before.system) / done
    print(json.dumps(figures), flush=True)
    return 0


def measure_floor(directory, load, srtp_profile, pin_cpu, seconds=1.0):
    """
    Run :func:`run_floor` in a subprocess while this process drains the
    receivers; returns its figures plus ``floor_s`` (send + protect, user +
    system) per forwarded packet.
    """
    config_path = os.path.join(directory, "floor.json")
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fan_out = load.conferences[0][1]
    receiver = fan_out[0]
    with os.fdopen(fd, "w") as f:
        json.dump({"seconds": seconds, "srtp_profile": srtp_profile,
                   "receivers": [list(r.address) for r in fan_out],
                   "wire_length": load.wire_length,
                   "plain_length": RTP_HEADER.size + len(load.payload),
                   "key": (receiver.hbh.server_key + receiver.hbh.server_salt).hex()}, f)
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--floor", config_path],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        if pin_cpu is not None:
            os.sched_setaffinity(process.pid, {pin_cpu})
        while process.poll() is None:
            load.drain(0.01)
        output = process.stdout.read()
    finally:
        process.stdout.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    load.discard()
    try:
        figures = json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchFailure("the floor measurement failed (exit status {})".format(
            process.returncode))
    figures["send_s"] = figures["send_user_s"] + figures["send_system_s"]
    figures["protect_s"] = figures["protect_user_s"] + figures["protect_system_s"]
    figures["floor_s"] = figures["send_s"] + figures["protect_s"]
    return figures


class BaselineRelay:
    """The baseline relay subprocess, given the endpoints' exported hop-by-hop keys."""

    def __init__(self, directory, endpoints, srtp_profile, ekt):
        config_path = os.path.join(directory, "baseline.json")
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"srtp_profile": srtp_profile, "ekt": ekt, "endpoints": [
                {"address": list(e.address), "conference": e.conference,
                 "inbound": (e.hbh.client_key + e.hbh.client_salt).hex(),
                 "outbound": (e.hbh.server_key + e.hbh.server_salt).hex()}
                for e in endpoints]}, f)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--baseline-relay", config_path],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline().split()
        if len(line) != 2 or not all(word.isdigit() for word in line):
            self.stop()
            raise BenchFailure("the baseline relay did not start (exit status {})".format(
                self.process.poll()))
        self.address = ("127.0.0.1", int(line[0]))
        self.receive_buffer = int(line[1])

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


# --------------------------------------------------------------------------
# Endpoints: DTLS through the Media Distributor, then plain SRTP


class BenchEndpoint:
    """One endpoint: a non-blocking UDP socket and a DTLS client association."""

    def __init__(self, index, credentials, tls_id, kd_tls_id, kd_fingerprint, profile,
                 conference=CONFERENCE):
        from perc import dtls
        from perc.ekt import EktCipher

        self.index = index
        self.tls_id = tls_id
        self.conference = conference
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ENDPOINT_RCVBUF)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ENDPOINT_RCVBUF)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.association = dtls.ClientAssociation(
            credentials, [profile], tls_id=tls_id.encode("ascii"),
            expected_peer_tls_id=kd_tls_id.encode("ascii"),
            expected_peer_fingerprint=kd_fingerprint, ekt_ciphers=(int(EktCipher.AESKW_128),))
        self.complete = None
        self.closed = None
        self.hbh = None
        self.inbound = self.outbound = None
        # Per trial.
        self.count = 0
        self.other = 0
        self.samples = []

    def handle(self, output, server):
        from perc import dtls

        for datagram in output.datagrams:
            self.sock.sendto(datagram, server)
        for event in output.events:
            if isinstance(event, dtls.HandshakeComplete):
                self.complete = event
            elif isinstance(event, dtls.Closed):
                self.closed = event.reason

    def keyed(self):
        import pylibsrtp

        profile = self.complete.profile
        self.hbh = profile.hbh_keys(self.complete.keys)
        self.outbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=self.hbh.client_key + self.hbh.client_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=profile.hbh_libsrtp_profile))
        self.inbound = pylibsrtp.Session(pylibsrtp.Policy(
            key=self.hbh.server_key + self.hbh.server_salt,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
            srtp_profile=profile.hbh_libsrtp_profile))


def handshake_all(endpoints, server, timeout=30.0):
    """Run every endpoint's DTLS handshake through ``server`` at once (sans-I/O driver)."""
    by_fd = {e.sock.fileno(): e for e in endpoints}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    now = time.monotonic()
    deadline = now + timeout
    for e in endpoints:
        e.handle(e.association.start(now), server)

    def pump(until, stop_when_keyed):
        while True:
            now = time.monotonic()
            if stop_when_keyed and all(e.complete for e in endpoints):
                return True
            if now >= until:
                return False
            dues = [d for d in (e.association.next_timeout(now) for e in endpoints)
                    if d is not None]
            wait = max(0.0, min([until, now + 0.05] + dues) - now)
            for fd, _ in poller.poll(wait):
                e = by_fd[fd]
                while True:
                    try:
                        data, source = e.sock.recvfrom(8192)
                    except BlockingIOError:
                        break
                    if source == server and data and 20 <= data[0] <= 63:
                        e.handle(e.association.receive(data, time.monotonic()), server)
            now = time.monotonic()
            for e in endpoints:
                due = e.association.next_timeout(now)
                if due is not None and due <= now:
                    e.handle(e.association.handle_timeout(now), server)
                if e.closed is not None and e.complete is None:
                    raise BenchFailure("endpoint {} could not join: {}".format(
                        e.index + 1, e.closed))

    try:
        if not pump(deadline, True):
            missing = [e.index + 1 for e in endpoints if not e.complete]
            raise BenchFailure("endpoints {} did not finish the handshake in {} s".format(
                missing, timeout))
        # The EKTKey follows the handshake as application data; take it in.
        pump(time.monotonic() + 0.3, False)
    finally:
        poller.close()
    for e in endpoints:
        e.keyed()


# --------------------------------------------------------------------------
# Trials


def equal_rate(load, relays, rate, seconds, rounds, log):
    """
    Every relay at the same paced ``rate``, alternately, ``rounds`` times:
    CPU seconds per forwarded packet when both do the same work.
    """
    totals = {name: [0.0, 0.0, 0] for name in relays}
    for _ in range(rounds):
        for name, (relay, ssrc) in relays.items():
            trial = load.trial(relay, ssrc, rate, seconds)
            log(name, "same rate", trial)
            totals[name][0] += trial["relay_user_s"]
            totals[name][1] += trial["relay_system_s"]
            totals[name][2] += trial["received"]
    return {name: {"cpu": (user + system) / max(1, received), "user": user / max(1, received),
                   "system": system / max(1, received)}
            for name, (user, system, received) in totals.items()}


def pin(relay_pids):
    """
    Relays on the last CPU we may use, this process (the load) on the first:
    neither relay ever shares a core with the load generator.  Returns a
    description, or None when there are fewer than two CPUs.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    for pid in relay_pids:
        os.sched_setaffinity(pid, {cpus[-1]})
    os.sched_setaffinity(0, {cpus[0]})
    return "relays on CPU {}, endpoints on CPU {}".format(cpus[-1], cpus[0])


def udp_receive_queue(port):
    """Octets waiting in the receive queue of the 127.0.0.1 UDP socket bound to ``port``."""
    wanted = "0100007F:{:04X}".format(port)
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[4].split(":")[1], 16)
    return 0


def udp_drops(ports):
    """``{port: drops}`` of the 127.0.0.1 UDP sockets bound to ``ports`` (/proc/net/udp)."""
    wanted = {"0100007F:{:04X}".format(p): p for p in ports}
    drops = {}
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            port = wanted.get(fields[1])
            if port is not None:
                drops[port] = drops.get(port, 0) + int(fields[-1])
    return drops


class Load:
    """
    Per conference, its sender (its first endpoint) and its receivers (the
    others), all driven from one loop.  The senders take turns, packet by
    packet, so the rate of a trial is the sum of theirs.
    """

    def __init__(self, endpoints, payload_size, ekt, sample_every=1):
        self.sample_every = sample_every
        #: Wall time spent verifying (after each trial's figures): the
        #: search's time budget does not count it (see clock()).
        self.verify_seconds = 0.0
        members = {}
        for e in endpoints:
            members.setdefault(e.conference, []).append(e)
        #: (sender, receivers) of each conference.
        self.conferences = [(group[0], group[1:]) for group in members.values()]
        self.receivers = [r for _, receivers in self.conferences for r in receivers]
        # Opaque bytes standing for inner ciphertext + inner tag; the last
        # octet is an empty OHB.
        self.payload = os.urandom(payload_size - 1) + b"\x00"
        self.ekt_tail = b"\x00" if ekt else b""
        self.trials = 0
        self.ssrc_tag = b""
        self.poller = select.epoll()
        self.by_fd = {}
        for r in self.receivers:
            self.poller.register(r.sock.fileno(), select.EPOLLIN)
            self.by_fd[r.sock.fileno()] = r
        self.buffer = bytearray(8192)
        self.verified = 0
        self.wire_length = len(self.packets(0x00000001, 1)[0][1])

    def packets(self, ssrc, count):
        """
        ``count`` protected packets from each sender, of a new stream
        ``ssrc`` from sequence number 1, as ``(sendto, packet)`` with the
        senders in turn.
        """
        pack = RTP_HEADER.pack
        payload, tail = self.payload, self.ekt_tail
        streams = []
        for sender, _ in self.conferences:
            protect, sendto = sender.outbound.protect, sender.sock.sendto
            streams.append([(sendto, protect(pack(0x80, 96, s & 0xFFFF, (s * 160) & 0xFFFFFFFF,
                                                  ssrc) + payload) + tail)
                            for s in range(1, 1 + count)])
        return [packet for turn in zip(*streams) for packet in turn]

    def drain(self, timeout=0.0):
        """Read whatever the receivers have; returns how many packets were read."""
        got = 0
        buffer = self.buffer
        length = self.wire_length
        tag = self.ssrc_tag
        every = self.sample_every
        for fd, _ in self.poller.poll(timeout):
            r = self.by_fd[fd]
            recv_into = r.sock.recv_into
            count = r.count
            start = count
            try:
                while True:
                    n = recv_into(buffer)
                    # Only this trial's stream counts (a relay that was held
                    # up may still deliver the end of the previous one).
                    if n == length and buffer[8:12] == tag:
                        count += 1
                        if not count % every:
                            r.samples.append(buffer[:n])
                    else:
                        r.other += 1
            except BlockingIOError:
                pass
            r.count = count
            got += count - start
        return got

    def discard(self):
        """Empty the receive queues (DTLS leftovers, late packets) before a trial."""
        while self.drain(0.0):
            pass
        for r in self.receivers:
            r.count = r.other = 0
            r.samples = []

    def clock(self):
        """time.monotonic() less the time spent verifying: the search's clock."""
        return time.monotonic() - self.verify_seconds

    def verify(self, ssrc):
        """Unprotect every kept sample with the receiver's hop-by-hop key; raise if one fails."""
        started = time.monotonic()
        try:
            self._verify(ssrc)
        finally:
            self.verify_seconds += time.monotonic() - started

    def _verify(self, ssrc):
        import pylibsrtp

        tail = len(self.ekt_tail)
        for r in self.receivers:
            for packet in r.samples:
                if tail and packet[-1] != 0:
                    raise BenchFailure("endpoint {}: the EKT field was not passed through".format(
                        r.index + 1))
                try:
                    plain = r.inbound.unprotect(bytes(packet[:len(packet) - tail]))
                except (pylibsrtp.Error, ValueError) as error:
                    raise BenchFailure("endpoint {}: outer layer failed verification: {}".format(
                        r.index + 1, error))
                first, pt, _, _, got_ssrc = RTP_HEADER.unpack_from(plain)
                if (first, pt, got_ssrc) != (0x80, 96, ssrc):
                    raise BenchFailure("endpoint {}: a forwarded packet's header differs from "
                                       "what was sent: {}".format(r.index + 1, plain[:12].hex()))
                if plain[12:] != self.payload:
                    raise BenchFailure("endpoint {}: a forwarded packet's payload differs from "
                                       "what was sent".format(r.index + 1))
                self.verified += 1
            r.samples = []

    def trial(self, relay, ssrc_base, rate, seconds, count=None):
        """
        Send to ``relay`` at ``rate`` packets/s for ``seconds`` (``rate`` None:
        ``count`` packets as fast as this loop can), then wait until nothing
        more arrives.  Returns the figures of the trial.
        """
        self.trials += 1
        ssrc = (ssrc_base + self.trials) & 0xFFFFFFFF
        self.ssrc_tag = struct.pack("!I", ssrc)
        senders = len(self.conferences)
        # Packets per sender; n is the trial's total.
        each = -(-count // senders) if rate is None else max(1, int(rate * seconds / senders))
        n = each * senders
        packets = self.packets(ssrc, each)
        self.discard()
        address = relay.address
        drain = self.drain
        drops_before = udp_drops([relay.address[1]] + [r.address[1] for r in self.receivers])
        user_before, system_before = _common.cpu_times(relay.pid)
        load_before = time.process_time()
        sent = 0
        start = last_arrival = time.perf_counter()
        if rate is None:
            while sent < n:
                for sendto, packet in packets[sent:sent + 32]:
                    sendto(packet, address)
                sent = min(n, sent + 32)
                if drain():
                    last_arrival = time.perf_counter()
        else:
            # Paced in ticks of about half a millisecond: send what is due,
            # read what arrived, sleep (reading every receiver socket after
            # every packet would cost this process more than the relay).
            # Never more than 4 ms worth of packets at once: if this process
            # was held up longer, the schedule slips instead of bursting (a
            # burst would overflow the relay's socket because of the load
            # generator); the offered rate then falls short of the target
            # (see _attempt()).
            burst = max(4, int(rate * 0.004))
            anchor, anchored = start, 0
            sleep = time.sleep
            while sent < n:
                now = time.perf_counter()
                due = anchored + int((now - anchor) * rate) + 1
                if due - sent > burst:
                    anchor, anchored = now, sent
                    due = sent + 1
                due = min(n, due)
                if due > sent:
                    for sendto, packet in packets[sent:due]:
                        sendto(packet, address)
                    sent = due
                if drain():
                    last_arrival = time.perf_counter()
                sleep(0.0005)
        send_end = time.perf_counter()
        # Whatever is still in flight: wait until the relay's socket is
        # empty and 50 ms pass with nothing new (at most 3 s).
        quiet_since = time.perf_counter()
        while time.perf_counter() - send_end < 3:
            if drain(0.01):
                quiet_since = last_arrival = time.perf_counter()
            elif (time.perf_counter() - quiet_since >= 0.05
                  and not udp_receive_queue(relay.address[1])):
                break
        load_cpu = time.process_time() - load_before
        user_after, system_after = _common.cpu_times(relay.pid)
        relay_user, relay_system = user_after - user_before, system_after - system_before
        relay_cpu = relay_user + relay_system
        wall = time.perf_counter() - start
        drops_after = udp_drops([relay.address[1]] + [r.address[1] for r in self.receivers])
        received = sum(r.count for r in self.receivers)
        expected = each * len(self.receivers)
        relay_drops = drops_after.get(relay.address[1], 0) - drops_before.get(relay.address[1], 0)
        receiver_drops = sum(drops_after.get(r.address[1], 0) - drops_before.get(r.address[1], 0)
                             for r in self.receivers)
        starved = [r.index + 1 for r in self.receivers if r.count == 0]
        strays = sum(r.other for r in self.receivers)
        self.verify(ssrc)
        send_seconds = max(send_end - start, 1e-9)
        return {
            "offered_pps": n / send_seconds,
            "target_pps": rate,
            "sent": n,
            "received": received,
            "expected": expected,
            "loss": 1.0 - received / expected,
            # Over the time the relay was delivering: a backlog in its
            # socket buffer is still forwarded after the sender stops.
            "delivered_in_pps": received * senders / len(self.receivers) / max(
                last_arrival - start, send_seconds),
            "relay_cpu_s": relay_cpu,
            "relay_user_s": relay_user,
            "relay_system_s": relay_system,
            "relay_cpu_share": relay_cpu / wall,
            "relay_cpu_s_per_packet": relay_cpu / received if received else None,
            "load_cpu_share": load_cpu / wall,
            "relay_socket_drops": relay_drops,
            "receiver_socket_drops": receiver_drops,
            "starved": starved,
            "strays": strays,
        }


#: First rate of the ramp, and the factor between its rates.
RAMP_START = 4000.0
RAMP_FACTOR = 1.6


def _attempt(load, state, relay, ssrc, rate, seconds, retries, deadline, label, log, max_slips):
    """
    Trials at ``rate`` until there is a verdict: ``(True, trial)`` for zero
    loss (at ``trial["offered_pps"]``, which a busy machine may hold a few
    percent under ``rate``), ``(False, trial)`` for loss in 1 + ``retries``
    trials, ``(None, trial)`` when this process kept slipping behind its
    schedule while packets were lost and the relay was not busy (the machine
    was too busy to tell).
    """
    attempt = 0
    while True:
        trial = load.trial(relay, ssrc, rate, seconds)
        state["trials"].append(trial)
        slipped = trial["offered_pps"] < 0.97 * rate
        log(state["name"], "{}{}".format(
            label, " slipped" if slipped else " again" if attempt else ""), trial)
        if trial["loss"] == 0:
            return True, trial
        late = load.clock() > deadline
        if slipped and trial["relay_cpu_share"] < 0.85:
            # This process could not keep the pace and the relay was not
            # busy all the time: something else held them up, the loss says
            # little.  (A relay that used its CPU and lost packets was too
            # slow, whatever this process did.)
            if state["slips"] < max_slips and not late:
                state["slips"] += 1
                continue
            return None, trial
        attempt += 1
        if attempt > retries or late:
            return False, trial


def _passed(state, trial):
    rate = min(trial["offered_pps"], trial["target_pps"])
    state["lo"] = max(state["lo"], rate)
    if state["best"] is None or trial["offered_pps"] > state["best"]["offered_pps"]:
        state["best"] = trial


def search(load, relays, seconds, steps, retries, log, deadline):
    """
    Per relay: a full-speed trial (for the record: delivered rate and loss
    when flooded), then paced trials, relays interleaved: a ramp from
    RAMP_START up by RAMP_FACTOR until a rate loses packets, then ``steps``
    bisections between the last loss-free rate and the first lossy one.  A
    rate that loses packets is tried again up to ``retries`` times before
    it counts as too fast (a shared machine stalls a relay now and then;
    the same rule holds for every relay).  After ``deadline``
    (time.monotonic()) nothing is tried again and the search stops where it
    is.  Returns per-relay results.
    """
    results = {}
    for relay, ssrc in relays.values():
        # Warm-up (sessions' streams created, caches warm), not reported.
        load.trial(relay, ssrc, None, seconds, count=3000)
    for name, (relay, ssrc) in relays.items():
        full = load.trial(relay, ssrc, None, seconds, count=FULL_SPEED_PACKETS)
        log(name, "full speed", full)
        if full["starved"]:
            raise BenchFailure("{}: endpoints {} received nothing".format(name, full["starved"]))
        results[name] = {"name": name, "full": full, "best": None, "trials": [full],
                         "slips": 0, "lo": 0.0, "hi": None, "ramp": RAMP_START}
    max_slips = steps + 4

    def run(state, rate, label):
        relay, ssrc = relays[state["name"]]
        return _attempt(load, state, relay, ssrc, rate, seconds, retries, deadline, label, log,
                        max_slips)

    ramping = list(results.values())
    while ramping and load.clock() <= deadline:
        for state in list(ramping):
            rate = state["ramp"]
            verdict, trial = run(state, rate, "ramp")
            if verdict:
                _passed(state, trial)
                state["ramp"] = rate * RAMP_FACTOR
            elif verdict is False:
                state["hi"] = rate
                ramping.remove(state)
    for step in range(steps):
        if load.clock() > deadline:
            print("  (time budget reached: search stopped after {} bisection steps)".format(step))
            break
        for state in results.values():
            if state["hi"] is None:
                continue
            rate = (state["lo"] + state["hi"]) / 2
            verdict, trial = run(state, rate, "step {}".format(step + 1))
            if verdict:
                _passed(state, trial)
            elif verdict is False:
                state["hi"] = rate
    for name, (relay, ssrc) in relays.items():
        state = results[name]
        rate = state["hi"] or RAMP_START
        while state["best"] is None and rate > 20 and load.clock() < deadline + 10:
            # Nothing was loss-free (a very busy machine?): go lower.
            rate /= 2
            trial = load.trial(relay, ssrc, rate, seconds)
            state["trials"].append(trial)
            log(name, "lower", trial)
            if trial["loss"] == 0:
                state["best"] = trial
        if state["best"] is None:
            raise BenchFailure("{}: no loss-free rate found (lowest tried {:.0f} pps)".format(
                name, rate))
    return results


# --------------------------------------------------------------------------
# Main


def _row(name, what, t):
    return "{:<18} {:<13} {:>9} {:>9.0f} {:>9.0f} {:>8.3%} {:>6.0%} {:>8.2f} {:>6.0%} {:>7}".format(
        name, what, "-" if t["target_pps"] is None else "{:.0f}".format(t["target_pps"]),
        t["offered_pps"], t["delivered_in_pps"], t["loss"],
        t["relay_cpu_share"],
        (t["relay_cpu_s_per_packet"] or 0) * 1e6, t["load_cpu_share"],
        "{}/{}".format(t["relay_socket_drops"], t["receiver_socket_drops"]))


def run(args):
    from perc import dtls

    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix="perc-bench-forward-")
    distributors = baseline = None
    endpoints = []
    try:
        md_args = ["--profiles", args.profile.name, "--endpoint-timeout", "3600",
                   "--handshake-timeout", "120", "--new-associations-per-second", "10000"]
        distributors = start_distributors(directory, md_args, ["--profiles", args.profile.name],
                                          args.md_profile)
        kd_fingerprint = distributors.kd_fingerprint
        total = args.endpoints * args.conferences
        for index in range(total):
            conference = (CONFERENCE if args.conferences == 1
                          else "{}-{}".format(CONFERENCE, index // args.endpoints + 1))
            credentials = dtls.Credentials.self_signed("bench-{}".format(index + 1))
            tls_id = "bench-{}-{}".format(index + 1, os.urandom(12).hex())
            kd_tls_id = _common.register_endpoint(distributors, conference, tls_id,
                                                  credentials.fingerprint)
            endpoints.append(BenchEndpoint(index, credentials, tls_id, kd_tls_id,
                                           kd_fingerprint, args.profile, conference))
        joined_at = time.monotonic()
        handshake_all(endpoints, distributors.media_address)
        join_seconds = time.monotonic() - joined_at
        status, document = _common.http_json("GET", distributors.md_api + "/v1/status",
                                             distributors.md_token)
        if status != 200 or document.get("established") != total:
            raise BenchFailure("the Media Distributor has {} keyed endpoints, not {}".format(
                document and document.get("established"), total))
        ekt = all(e.complete.ekt_cipher is not None for e in endpoints)
        baseline = BaselineRelay(directory, endpoints, args.profile.hbh_libsrtp_profile, ekt)
        placement = pin([distributors.md.pid, baseline.pid]) if args.pin else None

        class MdRelay:
            address = distributors.media_address
            pid = distributors.md.pid

        load = Load(endpoints, args.payload, ekt, args.sample_every)
        print("perc bench forward: {}{} endpoints (1 sender, {} receivers), {}-octet payload "
              "({}-octet SRTP packets{}), {}".format(
                  "{} conferences of ".format(args.conferences) if args.conferences > 1 else "",
                  args.endpoints, args.endpoints - 1, args.payload, load.wire_length,
                  " with a ShortEKTField" if ekt else "", args.profile.name))
        print("  perc-md pid {} and baseline relay pid {} in their own processes; endpoints "
              "in this process (pid {}); {} joined through the MD in {:.2f} s".format(
                  distributors.md.pid, baseline.pid, os.getpid(), total, join_seconds))
        print("  CPU placement: {}; relay socket receive buffers: perc-md's default "
              "--udp-receive-buffer ({} octets granted to the baseline)".format(
                  placement or "not pinned", baseline.receive_buffer // 2))
        print()
        print("{:<18} {:<13} {:>9} {:>9} {:>9} {:>8} {:>6} {:>8} {:>6} {:>7}".format(
            "relay", "trial", "target/s", "offered/s", "deliv./s", "loss", "cpu", "us/fwd",
            "load", "drops"))

        def log(name, what, trial):
            print(_row(name, what, trial), flush=True)

        relays = {"perc-md": (MdRelay, SSRC_MD), "baseline": (baseline, SSRC_BASELINE)}
        results = search(load, relays, args.seconds, args.steps, args.retries, log,
                         started + max(30.0, 40 * args.seconds))
        same_rate = 0.8 * min(r["best"]["offered_pps"] for r in results.values())
        same = equal_rate(load, relays, same_rate, args.seconds, 2, log)
        floor = measure_floor(directory, load, args.profile.hbh_libsrtp_profile,
                              sorted(os.sched_getaffinity(0))[-1] if placement else None,
                              args.seconds)
        md_same = same["perc-md"]
        floor_ratio = md_same["cpu"] / floor["floor_s"]
        status, md_status = _common.http_json("GET", distributors.md_api + "/v1/status",
                                              distributors.md_token)
        counters = (md_status or {}).get("counters", {})
        md_drops = {k: v for k, v in counters.items() if k.startswith("dropped")}
        bad = {k: v for k, v in md_drops.items() if "srtp" in k or "protect" in k or "ekt" in k}
        if bad:
            raise BenchFailure("perc-md dropped media it should have forwarded: {}".format(bad))
        if "Traceback" in distributors.md.output():
            raise BenchFailure("perc-md logged a traceback (see {})".format(
                distributors.md.log_path))
        if not load.verified:
            raise BenchFailure("no forwarded packet was verified")
        md_best, base_best = results["perc-md"]["best"], results["baseline"]["best"]
        forward_pps = md_best["offered_pps"]
        baseline_pps = base_best["offered_pps"]
        ratio = forward_pps / baseline_pps
        receivers = args.endpoints - 1
        saturated = [t for r in results.values() for t in r["trials"]
                     if t["receiver_socket_drops"] or t["load_cpu_share"] > 0.9]
        paced = [t for r in results.values() for t in r["trials"] if t["target_pps"]]
        slipped = [t for t in paced if t["offered_pps"] < 0.97 * t["target_pps"]]
        print()
        print("deliv./s: packets per second from the sender{} that reached every receiver (each "
              "forwarded {} times);".format("s" if args.conferences > 1 else "", receivers))
        print("cpu: relay process CPU / wall time; us/fwd: relay CPU microseconds per forwarded "
              "packet; load: this process's CPU share;")
        print("drops: kernel drops at the relay's socket / at the receivers' sockets "
              "(/proc/net/udp).")
        print()
        print("Highest loss-free rate (ramp, then {} bisection steps; trials of {:.1f} s, a "
              "lossy rate tried {} more time(s)):".format(args.steps, args.seconds, args.retries))
        print("  perc-md   {:>8.0f} packets/s in, {:>8.0f} forwarded/s, {:.2f} us CPU per "
              "forwarded packet".format(forward_pps, forward_pps * receivers,
                                        md_best["relay_cpu_s_per_packet"] * 1e6))
        print("  baseline  {:>8.0f} packets/s in, {:>8.0f} forwarded/s, {:.2f} us CPU per "
              "forwarded packet".format(baseline_pps, baseline_pps * receivers,
                                        base_best["relay_cpu_s_per_packet"] * 1e6))
        print("  ratio     {:.3f} (perc-md / baseline; loss 0 at both rates)".format(ratio))
        print("  both at {:.0f} packets/s: perc-md {:.2f} us, baseline {:.2f} us CPU per forwarded "
              "packet (baseline / perc-md = {:.3f})".format(
                  same_rate, md_same["cpu"] * 1e6, same["baseline"]["cpu"] * 1e6,
                  same["baseline"]["cpu"] / md_same["cpu"]))
        print("    user / system: perc-md {:.2f} / {:.2f} us, baseline {:.2f} / {:.2f} us".format(
            md_same["user"] * 1e6, md_same["system"] * 1e6, same["baseline"]["user"] * 1e6,
            same["baseline"]["system"] * 1e6))
        print("  floor {:.2f} us per forwarded packet = kernel send path {:.2f} us (user {:.2f}, "
              "system {:.2f}; sendmmsg of prebuilt datagrams) + pylibsrtp protect {:.2f} us "
              "(user {:.2f}, system {:.2f})".format(
                  floor["floor_s"] * 1e6, floor["send_s"] * 1e6, floor["send_user_s"] * 1e6,
                  floor["send_system_s"] * 1e6, floor["protect_s"] * 1e6,
                  floor["protect_user_s"] * 1e6, floor["protect_system_s"] * 1e6))
        print("  perc-md CPU per forwarded packet / floor = {:.3f} (at the same rate)".format(
            floor_ratio))
        if "protect_in_place_s" in floor:
            print("    (libsrtp protect in place, without pylibsrtp's wrapper: {:.2f} us; with it "
                  "in the floor instead, the ratio would be {:.3f})".format(
                      floor["protect_in_place_s"] * 1e6,
                      md_same["cpu"] / (floor["send_s"] + floor["protect_in_place_s"])))
        md_full, base_full = results["perc-md"]["full"], results["baseline"]["full"]
        print("  at full speed: perc-md delivered {:.0f}/s (loss {:.1%}), baseline {:.0f}/s "
              "(loss {:.1%})".format(md_full["delivered_in_pps"], md_full["loss"],
                                     base_full["delivered_in_pps"], base_full["loss"]))
        print("  {} forwarded packets verified (outer layer, payload, EKT field); perc-md "
              "drop counters: {}".format(load.verified, md_drops or "none"))
        if saturated:
            print("  WARNING: in {} trials the load generator was saturated or its sockets "
                  "dropped packets; rates are lower bounds".format(len(saturated)))
        if len(slipped) * 4 > len(paced):
            print("  WARNING: this process fell behind its schedule in {} of {} paced trials: "
                  "the machine is busy and the figures are noisy".format(
                      len(slipped), len(paced)))
        print("  total {:.1f} s".format(time.monotonic() - started))
        document = {
            "benchmark": "forward",
            "endpoints": args.endpoints,
            "conferences": args.conferences,
            "receivers": receivers,
            "payload": args.payload,
            "profile": args.profile.name,
            "ekt": ekt,
            "seconds_per_trial": args.seconds,
            "steps": args.steps,
            "retries": args.retries,
            "rate_unit": "packets per second sent into the relay (each forwarded to every "
                         "receiver) at which a paced trial had zero loss",
            "forward_pps": round(forward_pps, 1),
            "baseline_pps": round(baseline_pps, 1),
            "ratio": round(ratio, 4),
            "loss": md_best["loss"],
            "forward_out_pps": round(forward_pps * receivers, 1),
            "md_cpu_s_per_packet": md_best["relay_cpu_s_per_packet"],
            "same_rate_pps": round(same_rate, 1),
            "md_cpu_s_per_packet_same_rate": md_same["cpu"],
            "md_user_s_per_packet_same_rate": md_same["user"],
            "md_system_s_per_packet_same_rate": md_same["system"],
            "baseline_cpu_s_per_packet_same_rate": same["baseline"]["cpu"],
            "baseline_user_s_per_packet_same_rate": same["baseline"]["user"],
            "baseline_system_s_per_packet_same_rate": same["baseline"]["system"],
            "cpu_ratio_same_rate": round(same["baseline"]["cpu"] / md_same["cpu"], 4),
            "floor": {key: floor[key] for key in (
                "floor_s", "send_s", "send_user_s", "send_system_s", "protect_s",
                "protect_user_s", "protect_system_s", "protect_in_place_s") if key in floor},
            "md_cpu_per_packet_over_floor": round(floor_ratio, 4),
            "md_udp_io": "recvfrom/sendto" if os.environ.get("PERC_UDP_BATCH", "1").strip()
                         in ("0", "no", "false", "off") else "default (recvmmsg/sendmmsg "
                                                             "where available)",
            "relay_receive_buffer": baseline.receive_buffer,
            "baseline_cpu_s_per_packet": base_best["relay_cpu_s_per_packet"],
            "md_cpu_share": round(md_best["relay_cpu_share"], 3),
            "full_speed": {name: {"delivered_pps": round(r["full"]["delivered_in_pps"], 1),
                                  "offered_pps": round(r["full"]["offered_pps"], 1),
                                  "loss": round(r["full"]["loss"], 5)}
                           for name, r in results.items()},
            "verified_samples": load.verified,
            "md_drop_counters": md_drops,
            "load_saturated_trials": len(saturated),
            "paced_trials": len(paced),
            "slipped_trials": len(slipped),
            "join_seconds": round(join_seconds, 3),
            "total_seconds": round(time.monotonic() - started, 1),
            "load_placement": "endpoints in the benchmark process; perc-md, perc-kd and the "
                              "baseline relay in processes of their own",
            "cpu_pinning": placement,
            "ok": True,
        }
        return document
    finally:
        for e in endpoints:
            e.sock.close()
        if baseline is not None:
            baseline.stop()
        if distributors is not None:
            distributors.stop()
        if args.keep:
            print("  kept {}".format(directory))
        else:
            shutil.rmtree(directory, ignore_errors=True)


def start_distributors(directory, md_args, kd_args, md_profile):
    options = ()
    if md_profile:
        options = ("--profile", os.path.abspath(md_profile), "--profiler", "cprofile",
                   "--savestats")
    return _common.start_distributors(directory, md_args=md_args, kd_args=kd_args,
                                      md_twistd_options=options)


def _spread(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = (ordered[middle] if len(ordered) % 2
              else (ordered[middle - 1] + ordered[middle]) / 2)
    return {"min": round(ordered[0], 4), "median": round(median, 4),
            "max": round(ordered[-1], 4)}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.baseline_relay:
        return run_baseline_relay(args.baseline_relay)
    if args.floor:
        return run_floor(args.floor)
    runs = []
    try:
        for number in range(args.repeat):
            if args.repeat > 1:
                print("== run {} of {}".format(number + 1, args.repeat), flush=True)
            runs.append(run(args))
            print()
    except (BenchFailure, RuntimeError) as error:
        print("FAILED: {}".format(error), file=sys.stderr, flush=True)
        _common.print_json_last({"benchmark": "forward", "ok": False, "error": str(error)})
        return 1
    if args.md_profile:
        import pstats

        print()
        print("cProfile of perc-md (top 25 by own time; figures above are slowed by it):")
        try:
            pstats.Stats(args.md_profile).sort_stats("tottime").print_stats(25)
        except (OSError, TypeError, ValueError) as error:
            print("  cannot read {}: {}".format(args.md_profile, error))
    document = dict(runs[-1])
    document["repeat"] = args.repeat
    document["runs"] = [{key: run[key] for key in (
        "ratio", "cpu_ratio_same_rate", "md_cpu_per_packet_over_floor", "forward_pps",
        "baseline_pps", "md_cpu_s_per_packet_same_rate")} for run in runs]
    for key in ("ratio", "cpu_ratio_same_rate", "md_cpu_per_packet_over_floor"):
        document[key + "_spread"] = _spread([run[key] for run in runs])
    print("Over {} runs (min / median / max): ratio {ratio[min]} / {ratio[median]} / "
          "{ratio[max]}; same-rate CPU ratio {cpu[min]} / {cpu[median]} / {cpu[max]}; "
          "perc-md / floor {floor[min]} / {floor[median]} / {floor[max]}".format(
              len(runs), ratio=document["ratio_spread"],
              cpu=document["cpu_ratio_same_rate_spread"],
              floor=document["md_cpu_per_packet_over_floor_spread"]))
    _common.print_json_last(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
