"""
ClientHello flood benchmark: a flood of first ClientHellos from many
loopback source addresses at a real ``twistd perc-md``'s endpoint port, at
its per-address rate limit, while legitimate endpoints join.

Set-up: a temporary development PKI, ``twistd -n perc-kd`` and ``twistd -n
perc-md`` (subprocesses, via ``bench/_common.py``), both with their default
limits (the Media Distributor admits ``--new-associations-per-second`` 5 new
associations per source host per second and holds at most
``--max-associations`` 10,000).  With ``--placement default`` (the default)
the Media Distributor places every tls-id with ``--default-conference``, so
each admitted ClientHello becomes an association and goes through the
tunnel to the Key Distributor: the worst case.  With ``--placement
registered`` only registered tls-ids are placed (legitimate endpoints are
registered with both distributors) and the flood's random tls-ids are
refused at once.

The flood: a *flood process* (this script with ``--flood-worker``) sends
first ClientHellos (a real client engine's, each with a fresh client random
and a random tls-id: ``perc.testing.flood``) from ``--hosts`` loopback addresses
(127.64.0.1 upward), each datagram from a fresh socket (a fresh source
port), at ``--per-host-rate`` ClientHellos per host per second (default 5,
the Media Distributor's default limit) for ``--seconds``.  It never answers
a HelloVerifyRequest; it reads and counts those that reach its open
sockets (the last 2,048), to show that the Key Distributor answered.

Meanwhile this process joins one legitimate endpoint every ``--join-every``
seconds (a client-role DTLS engine on its own socket, extension 56 tls-id
registered through the Key Distributor's API, EKT; join = from the first
ClientHello until it holds the hop-by-hop keys and the EKTKey), samples
the daemons' ``VmRSS`` every 0.1 s and their ``GET /v1/status`` every
0.5 s.  One endpoint joins before the flood (idle latency) and one after.

Reported: datagrams sent, addresses and hosts used, HelloVerifyRequests the
flood received; peak RSS of both daemons (sampled ``VmRSS`` and the
kernel's ``VmHWM``) against their RSS before the flood; the Key
Distributor's associations (at most the one legitimate handshake in
progress may be unfinished: the flood must create none) and OpenSSL
objects; legitimate join latencies; the Media Distributor's drop, refusal
and eviction counters and the datagrams the kernel dropped at its socket.

    python bench/flood.py [--seconds 30] [--hosts 1000] [--per-host-rate 5]
    perc bench flood --hosts 4000 --seconds 60
    perc bench flood --placement registered

The last line printed is one JSON object with the figures.  Exit status 1
(with a line starting ``FAILED``) if a legitimate endpoint did not join,
the Key Distributor kept state for the flood, the flood was not answered
(``--placement default``), or a daemon died.  The machine's load matters:
the flood process, both daemons and the legitimate endpoints share its
CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import handshake  # noqa: E402

CONFERENCE = "bench-flood"
#: Seconds between two sends of the flood process.
TICK = 0.002


#: What the benchmark measures did not hold: exit 1.
BenchFailure = handshake.BenchFailure


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench flood",
        description="A ClientHello flood from many loopback addresses at perc-md's rate "
                    "limits: memory, Key Distributor state, legitimate joins.")
    parser.add_argument("--seconds", "-s", type=float, default=30.0,
                        help="how long the flood lasts (default %(default)s)")
    parser.add_argument("--hosts", type=int, default=1000,
                        help="loopback source hosts of the flood (default %(default)s)")
    parser.add_argument("--per-host-rate", type=float, default=5.0,
                        help="ClientHellos per host per second (default %(default)s: perc-md's "
                             "default --new-associations-per-second)")
    parser.add_argument("--join-every", type=float, default=2.0,
                        help="seconds between legitimate joins during the flood "
                             "(default %(default)s)")
    parser.add_argument("--join-timeout", type=float, default=15.0,
                        help="seconds a legitimate join may take before it counts as failed "
                             "(default %(default)s)")
    parser.add_argument("--placement", choices=("default", "registered"), default="default",
                        help="default: perc-md places every tls-id (--default-conference), the "
                             "worst case; registered: only registered tls-ids "
                             "(default %(default)s)")
    parser.add_argument("--md-arg", action="append", default=[], metavar="ARG",
                        help="one more perc-md option (repeatable), e.g. "
                             "--md-arg=--max-associations=2000")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs)")
    parser.add_argument("--flood-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood_worker:
        return args
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds must be 1 to 3600")
    if not 1 <= args.hosts <= 100000:
        parser.error("--hosts must be 1 to 100000")
    if not 0 < args.per_host_rate <= 1000:
        parser.error("--per-host-rate must be positive (at most 1000)")
    if args.hosts * args.per_host_rate > 200000:
        parser.error("--hosts x --per-host-rate must be at most 200000 ClientHellos/s")
    if args.join_every <= 0 or args.join_timeout <= 0:
        parser.error("--join-every and --join-timeout must be positive")
    return args


# --------------------------------------------------------------------------
# The flood process


def run_flood_worker(config_path):
    from perc.testing import flood

    with open(config_path) as f:
        config = json.load(f)
    flooder = flood.Flooder(tuple(config["target"]), flood.loopback_hosts(config["hosts"]))
    rate, seconds = config["rate"], config["seconds"]
    # At most 20 ms worth at once: if this process is held up, it sends
    # less rather than a burst (the figures say what was sent).
    burst = max(1, int(rate * 0.02))
    cpu = time.process_time()
    start = time.monotonic()
    print(json.dumps({"state": "started", "at": start}), flush=True)
    behind = 0
    while True:
        now = time.monotonic()
        elapsed = now - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate) - flooder.sent - behind
        if due > burst:
            behind += due - burst
            due = burst
        if due > 0:
            flooder.send(due)
        flooder.read()
        time.sleep(TICK)
    elapsed = time.monotonic() - start
    time.sleep(0.2)
    flooder.close()
    print(json.dumps({
        "state": "done", "sent": flooder.sent, "send_errors": flooder.send_errors,
        "skipped": behind, "seconds": elapsed, "rate": flooder.sent / elapsed,
        "addresses": len(flooder.addresses), "hosts_used": flooder.hosts_used,
        "replies": flooder.replies, "hello_verify_requests": flooder.hello_verify_requests,
        "cpu_s": time.process_time() - cpu}), flush=True)
    return 0


class FloodProcess:
    def __init__(self, directory, target, hosts, rate, seconds):
        path = os.path.join(directory, "flood.json")
        with open(path, "w") as f:
            json.dump({"target": list(target), "hosts": hosts, "rate": rate,
                       "seconds": seconds}, f)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--flood-worker", path],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.started = self._line("started")["at"]

    def _line(self, state):
        line = self.process.stdout.readline()
        if not line:
            raise BenchFailure("the flood process ended (exit status {}) before saying "
                               "{!r}".format(self.process.wait(), state))
        document = json.loads(line)
        if document.get("state") != state:
            raise BenchFailure("the flood process said {!r}, expected {!r}".format(
                document, state))
        return document

    def running(self):
        return self.process.poll() is None

    def result(self):
        document = self._line("done")
        self.process.wait(timeout=30)
        return document

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


# --------------------------------------------------------------------------
# Watching the daemons


class StatusPoller:
    """``GET /v1/status`` of both daemons every ``interval`` s in a thread; keeps peaks."""

    def __init__(self, distributors, interval=0.5):
        self.distributors = distributors
        self.interval = interval
        self.polls = 0
        self.kd_associations_peak = 0
        self.kd_unfinished_peak = 0
        self.kd_dtls_objects_peak = 0
        self.md_associations_peak = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def poll(self):
        kd = _common.status(self.distributors, "kd")
        md = _common.status(self.distributors, "md")
        if not kd or not md:
            self.failures += 1
            return
        self.polls += 1
        self.kd_associations_peak = max(self.kd_associations_peak, kd["associations"])
        self.kd_unfinished_peak = max(self.kd_unfinished_peak,
                                      kd["associations"] - kd["established"])
        self.kd_dtls_objects_peak = max(self.kd_dtls_objects_peak, kd["dtls_objects"])
        self.md_associations_peak = max(self.md_associations_peak, md["associations"])

    def _run(self):
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# Main


def run(args):
    directory = tempfile.mkdtemp(prefix="perc-bench-flood-")
    distributors = flood = sampler = poller = None
    legit = None
    rate = args.hosts * args.per_host_rate
    joins_during = max(1, int(args.seconds / args.join_every))
    try:
        md_args = ["--endpoint-timeout", "3600"]
        if args.placement == "default":
            md_args += ["--default-conference", CONFERENCE]
        distributors = _common.start_distributors(directory, md_args=md_args + args.md_arg)
        media = distributors.media_address
        legit = handshake.Worker({"endpoints": joins_during + 2, "profile_id": 0x0009,
                                  "register": "api"})
        legit.register_api({"kd_api": distributors.kd_api, "kd_token": distributors.kd_token,
                            "md_api": distributors.md_api, "md_token": distributors.md_token},
                           also_md=args.placement == "registered")
        legit.prepare(distributors.kd_fingerprint)
        joins = []

        def join(phase):
            e = legit.endpoints[len(joins)]
            result = legit.join(media, 1, args.join_timeout, [e])
            joins.append({"phase": phase, "at": e.started,
                          "latency_s": (e.keyed - e.started) if e.keyed else None,
                          "failure": None if e.keyed else (
                              result["failed"][0][1] if result["failed"] else
                              "no keys within {:g} s".format(args.join_timeout)),
                          "retransmissions": e.association.retransmissions})

        join("before")
        pids = {"perc-kd": distributors.kd.pid, "perc-md": distributors.md.pid}
        for pid in pids.values():
            handshake.wait_idle(pid, limit=5.0, tolerance=0.011)
        kd_before = _common.status(distributors, "kd")
        md_drops_before = _common.udp_drops(media[1])
        sampler = _common.MemorySampler(pids).start()
        time.sleep(0.3)
        poller = StatusPoller(distributors).start()
        flood = FloodProcess(directory, media, args.hosts, rate, args.seconds)
        print("perc bench flood: {:,} hosts x {:g} ClientHellos/s = {:,.0f}/s for {:g} s at "
              "perc-md {}:{} (placement: {}); a legitimate join every {:g} s".format(
                  args.hosts, args.per_host_rate, rate, args.seconds, media[0], media[1],
                  args.placement, args.join_every), flush=True)
        flood_cpu = {name: _common.cpu_seconds(pid) for name, pid in pids.items()}
        next_join = flood.started + args.join_every / 2
        while flood.running() and time.monotonic() < flood.started + args.seconds + 30:
            if time.monotonic() >= next_join and len(joins) < joins_during + 1:
                join("during")
                next_join += args.join_every
            else:
                time.sleep(0.05)
        flooded = flood.result()
        flood_cpu = {name: _common.cpu_seconds(pid) - flood_cpu[name]
                     for name, pid in pids.items()}
        flood_end = time.monotonic()
        poller.poll()
        join("after")
        poller.stop()
        memory = sampler.stop()
        kd_after = _common.status(distributors, "kd")
        md_after = _common.status(distributors, "md")
        md_socket_drops = _common.udp_drops(media[1]) - md_drops_before
        daemon_problems = distributors.problems()
        for name in pids:
            memory[name]["rss_before_kib"] = sampler.at(name, flood.started)
            memory[name]["rss_at_flood_end_kib"] = sampler.at(name, flood_end)
    finally:
        if poller is not None:
            poller._stop.set()
        if flood is not None:
            flood.stop()
        if legit is not None:
            legit.close()
        if distributors is not None:
            distributors.stop(timeout=5.0)
        if args.keep:
            print("kept", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    during = [j for j in joins if j["phase"] == "during"]
    latencies = [j["latency_s"] for j in during if j["latency_s"] is not None]
    failed = [j for j in joins if j["latency_s"] is None]
    joined = len(joins) - len(failed)
    md_counters = _common.md_drop_counters(md_after)
    # A flood ClientHello can never finish a handshake: any association the
    # Key Distributor kept for one stays unfinished.  At most one legitimate
    # handshake is under way when the status is read, and a legitimate join
    # that failed may have left one behind.
    kd_unfinished_end = kd_after.get("associations", 0) - kd_after.get("established", 0)
    kd_flood_associations = max(0, kd_unfinished_end - len(failed),
                                poller.kd_unfinished_peak - 1 - len(failed))
    figures = {
        "benchmark": "flood",
        "placement": args.placement,
        "md_options": args.md_arg,
        "flood": {
            "seconds": round(flooded["seconds"], 2),
            "hosts": args.hosts,
            "per_host_rate": args.per_host_rate,
            "target_rate": rate,
            "datagrams_sent": flooded["sent"],
            "rate": round(flooded["rate"], 1),
            "skipped_behind_schedule": flooded["skipped"],
            "send_errors": flooded["send_errors"],
            "source_addresses": flooded["addresses"],
            "source_hosts": flooded["hosts_used"],
            "hello_verify_requests_received": flooded["hello_verify_requests"],
            "flood_process_cpu_s": round(flooded["cpu_s"], 2),
        },
        "memory_kib": memory,
        "cpu_s_during_flood": {k: round(v, 2) for k, v in flood_cpu.items()},
        "kd": {
            "associations_before": kd_before.get("associations"),
            "associations_peak": poller.kd_associations_peak,
            "unfinished_handshakes_peak": poller.kd_unfinished_peak,
            "associations_end": kd_after.get("associations"),
            "established_end": kd_after.get("established"),
            "unfinished_handshakes_end": kd_unfinished_end,
            "associations_from_flood": kd_flood_associations,
            "dtls_objects_before": kd_before.get("dtls_objects"),
            "dtls_objects_peak": poller.kd_dtls_objects_peak,
            "counters": kd_after.get("counters", {}),
            "status_polls": poller.polls,
        },
        "md": {
            "associations_peak": poller.md_associations_peak,
            "associations_end": md_after.get("associations"),
            "established_end": md_after.get("established"),
            "counters": md_counters,
            "socket_drops": md_socket_drops,
        },
        "legitimate": {
            "joins": len(joins),
            "joined": joined,
            "during_flood": len(during),
            "during_flood_joined": len(latencies),
            "latency_before_s": joins[0]["latency_s"],
            "latency_after_s": joins[-1]["latency_s"],
            "latency_during_p50_s": _common.percentile(latencies, 0.5) if latencies else None,
            "latency_during_max_s": max(latencies) if latencies else None,
            "latencies_during_s": [round(x, 4) for x in latencies],
            "retransmissions": sum(j["retransmissions"] for j in joins),
            "failures": [j["failure"] for j in failed],
        },
    }
    print_table(figures)
    problems = list(daemon_problems)
    if failed:
        problems.append("{} of {} legitimate joins failed: {}".format(
            len(failed), len(joins), sorted({j["failure"] for j in failed})))
    if kd_flood_associations:
        problems.append("the Key Distributor kept state for the flood ({} unfinished "
                        "associations at the end, {} at the peak)".format(
                            kd_unfinished_end, poller.kd_unfinished_peak))
    if args.placement == "default" and not flooded["hello_verify_requests"]:
        problems.append("no HelloVerifyRequest reached the flood: it never reached the Key "
                        "Distributor")
    if problems:
        error = BenchFailure("; ".join(problems))
        error.figures = figures
        raise error
    return figures


def _kib(value):
    return "-" if value is None else "{:,}".format(value)


def _ms(value):
    return "-" if value is None else "{:.1f} ms".format(value * 1000)


def print_table(f):
    flood, legit, kd, md = f["flood"], f["legitimate"], f["kd"], f["md"]
    rows = [
        ["flood: ClientHellos sent", "{:,} in {:.1f} s ({:,.0f}/s; target {:,.0f}/s{})".format(
            flood["datagrams_sent"], flood["seconds"], flood["rate"], flood["target_rate"],
            ", {:,} skipped behind schedule".format(flood["skipped_behind_schedule"])
            if flood["skipped_behind_schedule"] else "")],
        ["flood: source addresses / hosts", "{:,} / {:,}".format(
            flood["source_addresses"], flood["source_hosts"])],
        ["flood: HelloVerifyRequests received", "{:,}".format(
            flood["hello_verify_requests_received"])],
    ]
    for name in ("perc-md", "perc-kd"):
        m = f["memory_kib"][name]
        rows.append(["{} RSS KiB before / peak / VmHWM / end".format(name),
                     "{} / {} / {} / {}".format(_kib(m["rss_before_kib"]), _kib(m["rss_peak_kib"]),
                                               _kib(m["vm_hwm_kib"]), _kib(m["rss_last_kib"]))])
        rows.append(["{} CPU during the flood".format(name),
                     "{:.1f} s".format(f["cpu_s_during_flood"][name])])
    rows += [
        ["perc-kd associations peak / unfinished peak / end",
         "{} / {} / {} (legitimate joined: {})".format(
             kd["associations_peak"], kd["unfinished_handshakes_peak"], kd["associations_end"],
             legit["joined"])],
        ["perc-kd associations from the flood (unfinished beyond one legitimate)",
         kd["associations_from_flood"]],
        ["perc-kd OpenSSL objects before / peak", "{} / {}".format(
            kd["dtls_objects_before"], kd["dtls_objects_peak"])],
        ["perc-md associations peak / end", "{} / {}".format(
            md["associations_peak"], md["associations_end"])],
        ["perc-md counters", ", ".join("{} {:,}".format(k, v)
                                       for k, v in md["counters"].items()) or "none"],
        ["perc-md socket drops (kernel)", "{:,}".format(md["socket_drops"])],
        ["legitimate joins during the flood", "{} of {}".format(
            legit["during_flood_joined"], legit["during_flood"])],
        ["join latency before / during p50 / max / after", "{} / {} / {} / {}".format(
            _ms(legit["latency_before_s"]), _ms(legit["latency_during_p50_s"]),
            _ms(legit["latency_during_max_s"]), _ms(legit["latency_after_s"]))],
        ["legitimate DTLS retransmissions", legit["retransmissions"]],
    ]
    print(_common.format_table(["flood", "value"], rows))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.flood_worker:
        return run_flood_worker(args.flood_worker)
    return _common.bench_main("flood", run, args, (BenchFailure, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
