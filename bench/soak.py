"""
Soak benchmark: a long conference through tunnel resets, Key Distributor
restarts and rekeys, with memory and file descriptors watched.

Set-up: a temporary development PKI, ``twistd -n perc-kd`` and ``twistd -n
perc-md`` as real processes on loopback, the Media Distributor's tunnel
going through an in-process TCP relay (:class:`perc.testing.tcprelay.TcpRelay`)
to the Key Distributor, and ``--endpoints`` reference endpoints (real UDP,
real DTLS, in this process) in ``--conferences`` conferences, registered
through both control APIs, each sending ``--rate`` RTP packets per second.

Faults, each on its own schedule: every ``--tunnel-reset-every`` seconds
the relay resets both TCP connections (the Media Distributor dials again
through it); every ``--kd-restart-every`` seconds the Key Distributor gets
SIGTERM and starts again on the same ports with the same roster database;
every ``--rekey-every`` seconds each conference is rekeyed through the Key
Distributor's API.  ``--ekt-ttl N`` is passed to ``perc-kd`` (``none``: not
passed, the Key Distributor's default applies).

Every ``--interval`` seconds one line: packets sent, verified, failed
verification, lost (gaps in what was verified) and undecryptable (sent under
an EKTKey the receiver did not hold yet), joins (handshakes completed),
rekeys (answered by the API), EKTKeys the endpoints moved to, and each
daemon's RSS and open file descriptors (``/proc``).  For each fault: seconds
until every endpoint had verified a packet every other member sent after
it.  At the end: each daemon's RSS slope (KiB per hour, least squares over
the per-interval samples after ``--warmup`` minutes; the Key Distributor's
within each of its lives, since a restart starts it afresh) and a verdict:
no packet failed verification, media flowed after every fault, every
endpoint still verifies every other member, and each slope is under
``--slope-bound``.  The last line is one JSON object.

Bounded: it stops after ``--minutes``; its daemons are stopped on exit,
on SIGINT/SIGTERM, and (Linux) by the kernel if this process dies.

    perc bench soak --minutes 30
    perc bench soak --minutes 1 --interval 10 --tunnel-reset-every 20 \\
        --kd-restart-every 30 --keepalive 1 --keepalive-timeout 1 --ekt-ttl none
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _deployment import (  # noqa: E402
    SEQUENCE_SPACE,
    BenchFailure,
    Deployment,
    Monitor,
    check_deployment_options,
    parse_ekt_ttl,
    process_figures,
    run_on_reactor,
    sleep,
    slope_kib_per_hour,
)

#: Default bound on a daemon's RSS growth for the verdict.
SLOPE_BOUND_KIB_PER_HOUR = 1024.0

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench soak",
        description="A long conference through tunnel resets, Key Distributor restarts and "
                    "rekeys: packets, joins, memory and file descriptors per interval.")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="length of the run in minutes (default 30)")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds per printed line (default 60)")
    parser.add_argument("--tunnel-reset-every", type=float, default=60.0,
                        help="seconds between tunnel resets (default 60; 0: none)")
    parser.add_argument("--kd-restart-every", type=float, default=300.0,
                        help="seconds between Key Distributor restarts (default 300; 0: none)")
    parser.add_argument("--rekey-every", type=float, default=30.0,
                        help="seconds between rekeys of every conference (default 30; 0: none)")
    parser.add_argument("--ekt-ttl", default="120",
                        help="perc-kd --ekt-ttl, seconds (default 120); 'none' passes no "
                             "--ekt-ttl")
    parser.add_argument("--endpoints", type=int, default=10,
                        help="reference endpoints (default 10)")
    parser.add_argument("--conferences", type=int, default=2,
                        help="conferences the endpoints are spread over (default 2)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="RTP packets per second per endpoint (default 20)")
    parser.add_argument("--keepalive", type=float, default=5.0,
                        help="endpoint liveness probe interval, seconds (default 5)")
    parser.add_argument("--keepalive-timeout", type=float, default=5.0,
                        help="endpoint liveness timeout, seconds (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="minutes of samples left out of the RSS slope (default 2)")
    parser.add_argument("--slope-bound", type=float, default=SLOPE_BOUND_KIB_PER_HOUR,
                        help="largest RSS slope in KiB per hour the verdict accepts "
                             "(default {:.0f})".format(SLOPE_BOUND_KIB_PER_HOUR))
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs, bench log)")
    args = parser.parse_args(argv)
    args.ekt_ttl = parse_ekt_ttl(parser, args.ekt_ttl)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most 1440")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if min(args.tunnel_reset_every, args.kd_restart_every, args.rekey_every) < 0:
        parser.error("fault intervals must be 0 (none) or positive")
    check_deployment_options(parser, args)
    if args.rate * args.minutes * 60 >= SEQUENCE_SPACE - 1000:
        parser.error("--rate x --minutes: at most {} packets per sender (the reference "
                     "endpoint's loss count does not follow a sequence number wrap)".format(
                         SEQUENCE_SPACE - 1000))
    return args


def pair_verified(deployment) -> dict:
    """Packets each receiver verified of each other member, by (receiver, sender) name."""
    return {(r.name, s.name): (r.stats[s.ssrc].verified if s.ssrc in r.stats else 0)
            for r, s in deployment.pairs()}


HEADER = ["min", "sent", "verified", "failed", "lost", "undecr", "joins", "rekeys",
          "new keys", "kd KiB", "kd fds", "md KiB", "md fds", "faults"]


def _cell(value):
    return "-" if value is None else value


async def soak(reactor, deployment: Deployment, args) -> dict:
    monitor = Monitor(deployment)
    monitor.start()
    started = reactor.seconds()
    end = started + args.minutes * 60

    def every(period):
        return started + period if period else float("inf")

    next_interval = started + args.interval
    next_reset = every(args.tunnel_reset_every)
    next_restart = every(args.kd_restart_every)
    next_rekey = every(args.rekey_every)
    previous, previous_verified = deployment.totals(), pair_verified(deployment)
    rekeys = rekey_errors = 0
    faults_now, rows, faults, samples = [], [], [], {"kd": [], "md": []}
    open_faults = []
    print("perc bench soak: {} endpoints in {} conferences at {:g} packets/s, {:g} min; "
          "tunnel reset every {:g} s, perc-kd restart every {:g} s, rekey every {:g} s, "
          "--ekt-ttl {}".format(
              args.endpoints, args.conferences, args.rate, args.minutes,
              args.tunnel_reset_every, args.kd_restart_every, args.rekey_every,
              "not passed" if args.ekt_ttl is None else args.ekt_ttl), flush=True)
    print("joins: {}".format(deployment.joins_source), flush=True)
    print(_common.format_table(HEADER, []).splitlines()[0], flush=True)

    def fault(kind):
        for record in open_faults:
            faults.append(monitor.close(record))
        open_faults[:] = [monitor.fault(kind, started)]
        faults_now.append(kind)

    while True:
        now = reactor.seconds()
        if now >= next_interval - 1e-6:
            totals = deployment.totals()
            verified = pair_verified(deployment)
            kd_rss, kd_fds = process_figures(deployment.kd)
            md_rss, md_fds = process_figures(deployment.md)
            elapsed = now - started
            samples["kd"].append((elapsed, kd_rss, deployment.kd_lives))
            samples["md"].append((elapsed, md_rss, deployment.md_lives))
            row = {"minutes": round(elapsed / 60, 2)}
            row.update({k: totals[k] - previous[k] for k in totals})
            row.update(rekeys=rekeys, rekey_errors=rekey_errors, kd_rss_kib=kd_rss,
                       kd_fds=kd_fds, md_rss_kib=md_rss, md_fds=md_fds,
                       faults=list(faults_now),
                       verifying_pairs=sum(1 for k, v in verified.items()
                                           if v > previous_verified.get(k, 0)))
            previous, previous_verified = totals, verified
            rows.append(row)
            print(_common.format_table(HEADER, [[
                "{:.1f}".format(row["minutes"]), row["sent"], row["verified"], row["failed"],
                row["lost"], row["undecryptable"], row["joins"], row["rekeys"],
                row["new_keys"], _cell(kd_rss), _cell(kd_fds), _cell(md_rss), _cell(md_fds),
                " ".join(faults_now) or "-"]]).splitlines()[-1], flush=True)
            faults_now.clear()
            rekeys = rekey_errors = 0
            next_interval += args.interval
            if now >= end - 1e-6:
                break
        elif now >= end - 1e-6:
            next_interval = now  # the last line, now
        elif now >= next_restart:
            fault("kd-restart")
            await deployment.restart_kd()
            next_restart += args.kd_restart_every
            while next_reset <= reactor.seconds():
                next_reset += args.tunnel_reset_every  # the restart dropped the tunnel
        elif now >= next_reset:
            fault("tunnel-reset")
            deployment.reset_tunnel()
            next_reset += args.tunnel_reset_every
        elif now >= next_rekey:
            for conference in deployment.conferences:
                if await deployment.rekey(conference):
                    rekeys += 1
                else:
                    rekey_errors += 1
            next_rekey += args.rekey_every
        else:
            await sleep(reactor, min(next_interval, next_reset, next_restart, next_rekey,
                                     end) - now)
    for record in open_faults:
        faults.append(monitor.close(record))
    monitor.stop()
    return verdict(args, deployment, rows, faults, samples)


def verdict(args, deployment, rows, faults, samples) -> dict:
    warmup = args.warmup * 60
    slopes = {name: slope_kib_per_hour([s for s in points if s[0] >= warmup])
              for name, points in samples.items()}
    totals = deployment.totals()
    pairs = len(deployment.pairs())
    checks = {
        "no_failed_verification": totals["failed"] == 0,
        "media_after_every_fault": all(f["recovered_s"] is not None for f in faults),
        "every_endpoint_verifying": bool(rows) and rows[-1]["verifying_pairs"] == pairs,
        "rss_slope_under_bound": (None if None in slopes.values() else
                                  all(s < args.slope_bound for s in slopes.values())),
    }
    ok = all(v is not False for v in checks.values())
    print()
    print("totals: {}".format(", ".join("{} {}".format(k, v) for k, v in totals.items())))
    for fault in faults:
        print("fault {kind} at {at_s} s: every member verified again after {recovered}, "
              "longest gap {gap_s} s, {joins} joins, {lost} lost, {undecryptable} "
              "undecryptable, {failed} failed".format(
                  recovered="-" if fault["recovered_s"] is None
                  else "{} s".format(fault["recovered_s"]), **fault))
    for name, slope in slopes.items():
        print("perc-{} RSS slope: {} (after {:g} min of warm-up{})".format(
            name, "not measured (too few samples)" if slope is None
            else "{:+.0f} KiB/hour".format(slope), args.warmup,
            "; within each life of the process" if name == "kd" else ""))
    print("verdict: {} ({}; slope bound {:g} KiB/hour)".format(
        "PASS" if ok else "FAIL",
        ", ".join("{} {}".format(k, {True: "yes", False: "NO", None: "not measured"}[v])
                  for k, v in checks.items()), args.slope_bound))
    figures = {
        "benchmark": "soak",
        "parameters": {k: getattr(args, k) for k in (
            "minutes", "interval", "tunnel_reset_every", "kd_restart_every", "rekey_every",
            "ekt_ttl", "endpoints", "conferences", "rate", "keepalive", "keepalive_timeout",
            "warmup", "slope_bound")},
        "joins_source": deployment.joins_source,
        "intervals": rows, "faults": faults, "totals": totals,
        "rss_slope_kib_per_hour": slopes, "checks": checks, "verdict": ok,
        "kd_lives": deployment.kd_lives,
    }
    if not ok:
        raise BenchFailure("verdict: {}".format(", ".join(
            k for k, v in checks.items() if v is False)), figures)
    return figures


def run(args):
    return run_on_reactor("soak", soak, args)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return _common.bench_main("soak", run, args, (BenchFailure, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
