"""
Load benchmark: many concurrent endpoints join through a real ``twistd
perc-md`` and ``twistd perc-kd`` and send media at a steady rate for a
while (by default 1,000 endpoints, 50 packets/s each, 60 s).

Set-up: a temporary development PKI, the two daemons as real processes
(via ``bench/_common.py``, default limits except ``--endpoint-timeout``,
raised so that endpoints waiting for the others to join are not timed
out), and ``--workers`` *worker processes* (this script with
``--worker``), each running its share of the endpoints with the client
DTLS engine of ``bench/handshake.py`` (extension 56 tls-id, EKT offered,
the Key Distributor's identity checked, one self-signed certificate and
one UDP socket per endpoint).  Each endpoint binds its own loopback
address (127.80.0.1 upward), so the Media Distributor's per-address rate
limit applies as it would to real endpoints.  Endpoints are put in
conferences of ``--conference-size`` (by number) and registered with both
distributors through their APIs (``--register both``, what ``perc register
--md-api`` does) or with the Key Distributor through its SQLite file
before it starts and with the Media Distributor through its API
(``--register sqlite``).

Joining: every worker starts its joins at the same moment, at most
``--concurrency`` handshakes in flight per worker; an endpoint has joined
when it holds its hop-by-hop keys and the EKTKey (it asks again after 0.5 s
without it).  Endpoints that have not joined after ``--join-timeout``
seconds count as failed and send nothing.

Media: once every worker is done joining, all joined endpoints start
together and each sends RTP at ``--rate`` packets/s for ``--seconds``
(sequence numbers from 1, a ``--payload``-octet payload standing for inner
ciphertext, tag and OHB, outer layer protected with its hop-by-hop key,
followed by a ShortEKTField when EKT was negotiated).  A worker that falls
behind its schedule skips what it could not send (counted, never sent
late in a burst).  Every endpoint counts what it receives; every 64th
packet is checked with its hop-by-hop key (outer layer, SSRC, payload).
Expected deliveries: each packet sent, times the joined members of its
conference less one.  Loss = 1 - received / expected; where it happened:
the kernel at the Media Distributor's socket (``/proc/net/udp`` drops),
the Media Distributor's own drop counters, the kernel at the endpoints'
sockets.

Reported: join success rate and time, packets sent / forwarded (the Media
Distributor's ``forwarded-rtp`` counter) / received, loss, peak memory of
both daemons (sampled ``VmRSS`` and ``VmHWM``), their CPU, the Media
Distributor's counters.

Why a conference of 4 by default: PERC is for multi-party conferences, so
one of 2 would understate the fan-out; every packet is forwarded to the
K-1 other members, so 1,000 endpoints at 50 packets/s in conferences of 4
are 50,000 packets/s in and 150,000 out of the Media Distributor, already
far more than one Python process forwards on one core (see
``bench/forward.py``), and every larger K multiplies the output and only
measures the machine.  The figures are honest: on 2 shared cores, where
the workers, the Media Distributor and the Key Distributor compete for the
CPU, expect heavy loss at the default load; scale it with ``--endpoints``,
``--rate``, ``--seconds``.

    python bench/load.py [--endpoints 1000] [--rate 50] [--seconds 60]
    perc bench load --endpoints 200 --seconds 20 --conference-size 5

The last line printed is one JSON object with the figures.  Exit status 1
(with a line starting ``FAILED``) if no endpoint joined, nothing was
forwarded, a sample failed verification, or a daemon died; otherwise 0,
whatever the loss (it is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import handshake  # noqa: E402

#: Every SAMPLE_EVERY-th packet an endpoint receives is verified.
SAMPLE_EVERY = 64
RTP_HEADER = struct.Struct("!BBHII")
SSRC_BASE = 0x50000000
#: Loopback addresses of the endpoints: 127.80.0.1 upward.
FIRST_HOST = 0x7F500001
#: Seconds between two sending steps of a worker.
TICK = 0.002
#: Endpoint sockets' receive buffer (SO_RCVBUFFORCE as root).
ENDPOINT_RCVBUF = 1 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


#: Nothing joined, nothing forwarded, or a verification failed: exit 1.
BenchFailure = handshake.BenchFailure


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench load",
        description="Many endpoints joining through real perc-md and perc-kd and sending "
                    "media: join rate, forwarding, loss, peak memory.")
    parser.add_argument("--endpoints", "-n", type=int, default=1000,
                        help="endpoints (default %(default)s)")
    parser.add_argument("--seconds", "-s", type=float, default=60.0,
                        help="seconds of media (default %(default)s)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="RTP packets per second per endpoint (default %(default)s)")
    parser.add_argument("--conference-size", "-k", type=int, default=4,
                        help="endpoints per conference (default %(default)s; see the module "
                             "help for why)")
    parser.add_argument("--workers", "-w", type=int, default=2,
                        help="worker processes running the endpoints (default %(default)s)")
    parser.add_argument("--concurrency", "-c", type=int, default=100,
                        help="handshakes in flight per worker (default %(default)s)")
    parser.add_argument("--payload", type=int, default=160,
                        help="RTP payload octets (default %(default)s)")
    parser.add_argument("--register", choices=("both", "sqlite"), default="both",
                        help="how endpoints are registered (default %(default)s; see the "
                             "module help)")
    parser.add_argument("--join-timeout", type=float, default=120.0,
                        help="seconds for all joins (default %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs)")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if not 2 <= args.endpoints <= 10000:
        parser.error("--endpoints must be 2 to 10000")
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds must be 1 to 3600")
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be positive (at most 1000)")
    if not 2 <= args.conference_size <= args.endpoints:
        parser.error("--conference-size must be 2 to --endpoints")
    if not 1 <= args.workers <= 16:
        parser.error("--workers must be 1 to 16")
    if args.concurrency < 1 or args.join_timeout <= 0:
        parser.error("--concurrency must be at least 1 and --join-timeout positive")
    if not 1 <= args.payload <= 1200:
        parser.error("--payload must be 1 to 1200")
    return args


# --------------------------------------------------------------------------
# The worker: handshake.Worker's endpoints, then media


class Media:
    """The media phase of one worker's joined endpoints, from one loop."""

    def __init__(self, worker, server, payload):
        import pylibsrtp

        self.server = server
        self.endpoints = [e for e in worker.endpoints if e.keyed is not None]
        srtp_profile = worker.profile.hbh_libsrtp_profile
        self.protect, self.inbound, self.ssrc, self.tail = {}, {}, {}, {}
        for e in self.endpoints:
            try:
                e.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ENDPOINT_RCVBUF)
            except OSError:
                pass
            self.protect[e.index] = pylibsrtp.Session(pylibsrtp.Policy(
                key=e.hbh.client_key + e.hbh.client_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=srtp_profile)).protect
            self.inbound[e.index] = pylibsrtp.Session(pylibsrtp.Policy(
                key=e.hbh.server_key + e.hbh.server_salt,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=srtp_profile))
            self.ssrc[e.index] = SSRC_BASE + e.index
            self.tail[e.index] = b"\x00" if e.ekt_cipher is not None else b""
        # Opaque bytes standing for inner ciphertext and tag; the last octet
        # is an empty OHB.
        self.payload = os.urandom(payload - 1) + b"\x00"
        self.sent = {e.index: 0 for e in self.endpoints}
        self.received = {e.index: 0 for e in self.endpoints}
        self.samples = {e.index: [] for e in self.endpoints}
        self.strays = 0
        self.verified = 0
        self.verify_failures = []

    def run(self, start_at, seconds, rate):
        endpoints = self.endpoints
        n = len(endpoints)
        poller = select.epoll(max(1, n))
        by_fd = {}
        for e in endpoints:
            poller.register(e.sock.fileno(), select.EPOLLIN)
            by_fd[e.sock.fileno()] = e
        total_rate = rate * n
        burst = max(1, int(total_rate * 0.02))
        order = [(e, e.sock.sendto, self.protect[e.index], self.ssrc[e.index],
                  self.tail[e.index]) for e in endpoints]
        pack, payload, server, sent = RTP_HEADER.pack, self.payload, self.server, self.sent
        buffer = bytearray(2048)
        done = skipped = send_errors = 0
        cpu = time.process_time()
        while time.monotonic() < start_at:
            time.sleep(0.001)
        start = time.monotonic()
        end = start + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * total_rate) - done - skipped
            if due > burst:
                skipped += due - burst
                due = burst
            for _ in range(max(0, due)):
                e, sendto, protect, ssrc, tail = order[done % n] if n else (None,) * 5
                sequence = sent[e.index] + 1
                packet = protect(pack(0x80, 96, sequence, sequence * 160, ssrc) + payload) + tail
                try:
                    sendto(packet, server)
                except OSError:
                    send_errors += 1
                sent[e.index] = sequence
                done += 1
            self._drain(poller, by_fd, buffer, 0.0)
            time.sleep(TICK)
        send_seconds = time.monotonic() - start
        # What is still on its way: until 0.5 s pass with nothing new (at most 5 s).
        quiet = time.monotonic()
        while time.monotonic() - quiet < 0.5 and time.monotonic() - start < seconds + 5:
            if self._drain(poller, by_fd, buffer, 0.05):
                quiet = time.monotonic()
        poller.close()
        self._verify()
        return {
            "state": "media",
            "sent": {str(k): v for k, v in self.sent.items()},
            "received": {str(k): v for k, v in self.received.items()},
            "skipped": skipped,
            "send_errors": send_errors,
            "send_seconds": send_seconds,
            "strays": self.strays,
            "verified": self.verified,
            "verify_failures": self.verify_failures[:10],
            "cpu_s": time.process_time() - cpu,
            "socket_drops": _common.loopback_ports_drops(
                [e.sock.getsockname() for e in endpoints]),
        }

    def _drain(self, poller, by_fd, buffer, timeout):
        got = 0
        received, samples = self.received, self.samples
        for fd, _ in poller.poll(timeout):
            e = by_fd[fd]
            recv_into = e.sock.recv_into
            index = e.index
            count = received[index]
            while True:
                try:
                    size = recv_into(buffer)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if size < 12 or not 128 <= buffer[0] <= 191:
                    self.strays += 1  # DTLS leftovers
                    continue
                count += 1
                if not count % SAMPLE_EVERY:
                    samples[index].append(bytes(buffer[:size]))
            got += count - received[index]
            received[index] = count
        return got

    def _verify(self):
        import pylibsrtp

        for index, packets in self.samples.items():
            session = self.inbound[index]
            tail = len(self.tail[index])
            for packet in packets:
                try:
                    plain = session.unprotect(packet[:len(packet) - tail] if tail else packet)
                except (pylibsrtp.Error, ValueError) as error:
                    self.verify_failures.append("endpoint {}: {}".format(index, error))
                    continue
                first, pt, _, _, ssrc = RTP_HEADER.unpack_from(plain)
                if (first, pt) != (0x80, 96) or not SSRC_BASE <= ssrc < SSRC_BASE + 0x10000 \
                        or plain[12:] != self.payload:
                    self.verify_failures.append("endpoint {}: forwarded packet differs from what "
                                                "was sent".format(index))
                    continue
                self.verified += 1


def run_worker(config_path):
    from perc.testing import flood

    with open(config_path) as f:
        config = json.load(f)
    say = handshake._say
    try:
        config["hosts"] = flood.loopback_hosts(config["endpoints"],
                                               FIRST_HOST + config["first_index"])
        worker = handshake.Worker(config)
        if config["register"] == "sqlite":
            worker.write_sqlite(config["db"])
        say({"state": "credentials"})
        info = json.loads(sys.stdin.readline())
        worker.register_api(info, also_md=True, kd=config["register"] == "both")
        worker.prepare(info["kd_fingerprint"])
        say({"state": "registered"})
        sys.stdin.readline()  # go
        server = tuple(info["media"])
        result = worker.join(server, config["concurrency"], config["join_timeout"])
        result["joined_indexes"] = [e.index for e in worker.endpoints if e.keyed is not None]
        say(result)
        go = json.loads(sys.stdin.readline())
        media = Media(worker, server, config["payload"])
        say(media.run(go["start_at"], go["seconds"], go["rate"]))
        sys.stdin.readline()  # end of input: close
        worker.close()
    except handshake.BenchFailure as error:
        say({"state": "failed", "reason": str(error)})
        return 1
    return 0


class WorkerProcess(handshake.WorkerProcess):
    """One worker process of this benchmark (the protocol of handshake.WorkerProcess)."""

    def __init__(self, directory, number, config):
        path = os.path.join(directory, "load-worker-{}.json".format(number))
        with open(path, "w") as f:
            json.dump(config, f)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------
# Main


def run(args):
    directory = tempfile.mkdtemp(prefix="perc-bench-load-")
    db_path = os.path.join(directory, "perc-kd.sqlite3")
    workers, distributors, sampler = [], None, None
    started = time.monotonic()
    try:
        # Workers one after the other: with --register sqlite each writes
        # the Key Distributor's database before it starts.
        bounds = [args.endpoints * w // args.workers for w in range(args.workers + 1)]
        for number in range(args.workers):
            first, end = bounds[number], bounds[number + 1]
            worker = WorkerProcess(directory, number, {
                "endpoints": end - first, "first_index": first,
                "conference_size": args.conference_size, "profile_id": 0x0009,
                "register": args.register, "db": db_path, "concurrency": args.concurrency,
                "join_timeout": args.join_timeout, "payload": args.payload})
            workers.append(worker)
            worker.expect("credentials", 300)
        credentials_s = time.monotonic() - started
        distributors = _common.start_distributors(
            directory, md_args=["--endpoint-timeout", "600", "--handshake-timeout", "120"])
        pids = {"perc-kd": distributors.kd.pid, "perc-md": distributors.md.pid}
        media_port = distributors.media_address[1]
        info = {"media": list(distributors.media_address),
                "kd_api": distributors.kd_api, "kd_token": distributors.kd_token,
                "md_api": distributors.md_api, "md_token": distributors.md_token,
                "kd_fingerprint": distributors.kd_fingerprint}
        t = time.monotonic()
        for worker in workers:
            worker.send(info)
        for worker in workers:
            worker.expect("registered", 600)
        registration_s = time.monotonic() - t
        rss_idle = {name: _common.rss_kib(pid) for name, pid in pids.items()}
        sampler = _common.MemorySampler(pids, interval=0.25).start()
        cpu = {name: _common.cpu_seconds(pid) for name, pid in pids.items()}
        print("perc bench load: {:,} endpoints in conferences of {} ({} worker processes), "
              "{:g} packets/s each for {:g} s".format(
                  args.endpoints, args.conference_size, args.workers, args.rate, args.seconds),
              flush=True)
        t = time.monotonic()
        for worker in workers:
            worker.send({"go": True})
        joins = [worker.expect("joined", args.join_timeout + 120) for worker in workers]
        join_s = time.monotonic() - t
        joined = sorted(i for j in joins for i in j["joined_indexes"])
        join_cpu = {name: _common.cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
        rss_joined = {name: _common.rss_kib(pid) for name, pid in pids.items()}
        print("  joined {:,} of {:,} in {:.1f} s".format(len(joined), args.endpoints, join_s),
              flush=True)
        if not joined:
            raise BenchFailure("no endpoint joined: {}".format(
                [j["failed"][:3] for j in joins]))
        md_before = _common.status(distributors, "md")
        drops_before = _common.udp_drops(media_port)
        cpu = {name: _common.cpu_seconds(pid) for name, pid in pids.items()}
        start_at = time.monotonic() + 0.5
        for worker in workers:
            worker.send({"start_at": start_at, "seconds": args.seconds, "rate": args.rate})
        media = [worker.expect("media", args.seconds + 120) for worker in workers]
        media_cpu = {name: _common.cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
        md_drops = _common.udp_drops(media_port) - drops_before
        md_after = _common.status(distributors, "md")
        kd_after = _common.status(distributors, "kd")
        memory = sampler.stop()
        sampler = None
        daemon_problems = distributors.problems()
    finally:
        if sampler is not None:
            sampler.stop()
        for worker in workers:
            worker.stop()
        if distributors is not None:
            # Thousands of live associations make an orderly shutdown slow.
            distributors.stop(timeout=5.0)
        if args.keep:
            print("kept", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return report(args, joins, joined, media, memory, rss_idle, rss_joined, md_before, md_after,
                  kd_after, md_drops, join_s, join_cpu, media_cpu, credentials_s,
                  registration_s, daemon_problems, time.monotonic() - started)


def report(args, joins, joined, media, memory, rss_idle, rss_joined, md_before, md_after,
           kd_after, md_socket_drops, join_s, join_cpu, media_cpu, credentials_s,
           registration_s, daemon_problems, total_s):
    k = args.conference_size

    members = {}
    for index in joined:
        members[index // k] = members.get(index // k, 0) + 1
    sent = {int(i): v for m in media for i, v in m["sent"].items()}
    received = {int(i): v for m in media for i, v in m["received"].items()}
    total_sent = sum(sent.values())
    expected = sum(v * (members[i // k] - 1) for i, v in sent.items())
    total_received = sum(received.values())
    counters_before = md_before.get("counters", {})
    counters = md_after.get("counters", {})
    forwarded = counters.get("forwarded-rtp", 0) - counters_before.get("forwarded-rtp", 0)
    md_counters = {name: value - counters_before.get(name, 0)
                   for name, value in _common.md_drop_counters(md_after).items()
                   if value - counters_before.get(name, 0)}
    send_seconds = max(m["send_seconds"] for m in media)
    skipped = sum(m["skipped"] for m in media)
    verified = sum(m["verified"] for m in media)
    failures = [f for m in media for f in m["verify_failures"]]
    receiver_drops = sum(m["socket_drops"] for m in media)
    join_times = [t[2] - t[0] for j in joins for t in j["times"]]
    loss = 1.0 - total_received / expected if expected else None
    figures = {
        "benchmark": "load",
        "endpoints": args.endpoints,
        "conference_size": k,
        "conferences": -(-args.endpoints // k),
        "rate_per_endpoint": args.rate,
        "seconds": args.seconds,
        "workers": args.workers,
        "payload": args.payload,
        "register": args.register,
        "credentials_s": round(credentials_s, 1),
        "registration_s": round(registration_s, 1),
        "joined": len(joined),
        "join_success_rate": round(len(joined) / args.endpoints, 4),
        "join_failed": sum(j["failed_count"] for j in joins),
        "join_missing": sum(j["missing_count"] for j in joins),
        "join_failures": [f for j in joins for f in j["failed"]][:5],
        "join_s": round(join_s, 2),
        "join_p50_s": round(_common.percentile(join_times, 0.5), 4) if join_times else None,
        "join_p99_s": round(_common.percentile(join_times, 0.99), 4) if join_times else None,
        "client_retransmissions": sum(j["retransmissions"] for j in joins),
        "packets_sent": total_sent,
        "packets_skipped_behind_schedule": skipped,
        "send_errors": sum(m["send_errors"] for m in media),
        "offered_pps": round(total_sent / send_seconds, 1),
        "target_pps": args.rate * len(joined),
        "md_socket_drops": md_socket_drops,
        "md_counters": md_counters,
        "forwarded": forwarded,
        "expected_deliveries": expected,
        "received": total_received,
        "receiver_socket_drops": receiver_drops,
        "loss": None if loss is None else round(loss, 5),
        "forwarded_pps": round(forwarded / send_seconds, 1),
        "received_pps": round(total_received / send_seconds, 1),
        "verified_samples": verified,
        "verify_failures": failures[:5],
        "strays": sum(m["strays"] for m in media),
        "worker_cpu_s": [round(m["cpu_s"], 1) for m in media],
        "memory_kib": memory,
        "rss_idle_kib": rss_idle,
        "rss_joined_kib": rss_joined,
        "cpu_s_join": {n: round(v, 2) for n, v in join_cpu.items()},
        "cpu_s_media": {n: round(v, 2) for n, v in media_cpu.items()},
        "md_established_end": md_after.get("established"),
        "kd_associations_end": kd_after.get("associations"),
        "daemon_problems": daemon_problems,
        "total_s": round(total_s, 1),
    }
    print_table(figures)
    problems = []
    if not total_sent:
        problems.append("nothing was sent")
    elif not forwarded or not total_received:
        problems.append("nothing was forwarded")
    if failures:
        problems.append("forwarded packets failed verification: {}".format(failures[:3]))
    problems += daemon_problems
    if problems:
        error = BenchFailure("; ".join(problems))
        error.figures = figures
        raise error
    return figures


def print_table(f):
    def kib(v):
        return "-" if v is None else "{:,}".format(v)

    memory = f["memory_kib"]
    rows = [
        ["endpoints joined", "{:,} of {:,} ({:.1%}) in {:.1f} s; join p50 / p99 {} / {} ms".format(
            f["joined"], f["endpoints"], f["join_success_rate"], f["join_s"],
            "-" if f["join_p50_s"] is None else "{:.0f}".format(f["join_p50_s"] * 1000),
            "-" if f["join_p99_s"] is None else "{:.0f}".format(f["join_p99_s"] * 1000))],
        ["join failures / still handshaking", "{} / {}{}".format(
            f["join_failed"], f["join_missing"],
            " (first: {})".format(f["join_failures"][:2]) if f["join_failures"] else "")],
        ["packets sent", "{:,} ({:,.0f}/s offered; target {:,.0f}/s; {:,} skipped behind "
                         "schedule)".format(f["packets_sent"], f["offered_pps"],
                                            f["target_pps"],
                                            f["packets_skipped_behind_schedule"])],
        ["dropped at perc-md's socket (kernel)", "{:,}".format(f["md_socket_drops"])],
        ["perc-md counters", ", ".join("{} {:,}".format(k, v)
                                       for k, v in f["md_counters"].items()) or "none"],
        ["forwarded by perc-md", "{:,} ({:,.0f}/s)".format(f["forwarded"], f["forwarded_pps"])],
        ["expected deliveries", "{:,}".format(f["expected_deliveries"])],
        ["received by endpoints", "{:,} ({:,.0f}/s); endpoint socket drops {:,}".format(
            f["received"], f["received_pps"], f["receiver_socket_drops"])],
        ["loss", "-" if f["loss"] is None else "{:.2%}".format(f["loss"])],
        ["samples verified", "{:,} ({} failed)".format(f["verified_samples"],
                                                      len(f["verify_failures"]))],
    ]
    for name in ("perc-md", "perc-kd"):
        m = memory[name]
        rows.append(["{} RSS KiB idle / joined / peak / VmHWM".format(name), "{} / {} / {} / {}".format(
            kib(f["rss_idle_kib"][name]), kib(f["rss_joined_kib"][name]), kib(m["rss_peak_kib"]),
            kib(m["vm_hwm_kib"]))])
        rows.append(["{} CPU s joining / media".format(name), "{:.1f} / {:.1f}".format(
            f["cpu_s_join"][name], f["cpu_s_media"][name])])
    rows.append(["worker CPU s (media)", ", ".join("{:.1f}".format(c) for c in f["worker_cpu_s"])])
    print(_common.format_table(["load", "value"], rows))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return run_worker(args.worker)
    return _common.bench_main("load", run, args, (BenchFailure, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
