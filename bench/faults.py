"""
Fault benchmark: what a tunnel flap, a Key Distributor restart and a Media
Distributor restart each do to a running conference.

Set-up as ``bench/soak.py`` (``bench/_deployment.py``): ``twistd -n
perc-kd`` and ``twistd -n perc-md`` as real processes on loopback, the
tunnel through an in-process TCP relay, ``--endpoints`` reference endpoints
(real UDP, real DTLS, the endpoint's default timers unless told otherwise)
in ``--conferences`` conferences sending ``--rate`` packets per second.

Each fault in ``--faults`` is made ``--repeat`` times, each time from a
steady conference (every endpoint keyed, every member verifying every
other, no join for ``keepalive + keepalive-timeout + 1`` seconds), and
followed for ``--observe`` seconds:

- ``tunnel-flap``: the relay resets both TCP connections of the tunnel; the
  Media Distributor dials again through it;
- ``kd-restart``: SIGTERM to ``perc-kd``, started again on the same ports
  with the same roster database;
- ``md-restart``: SIGTERM to ``perc-md``, started again on the same ports,
  the memberships put again through its API (they live in its memory).

Figures per fault: seconds from the fault until every endpoint had verified
a packet every other member sent after the fault and after the last join it
caused (``recovered``), the longest any member went without a verified
packet from another (``gap``), the last join after the fault, joins
(handshakes completed), and the packets lost (not verified: undecryptable
ones included, also counted on their own) and failed over the observation.

    perc bench faults [--repeat 2] [--observe 30] [--faults tunnel-flap,kd-restart,md-restart]

The last line is one JSON object; exit status 1 if a fault was not
recovered from within ``--observe`` seconds or a packet failed verification.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _deployment import (  # noqa: E402
    BenchFailure,
    Monitor,
    check_deployment_options,
    parse_ekt_ttl,
    run_on_reactor,
    sleep,
    steady,
)

FAULTS = ("tunnel-flap", "kd-restart", "md-restart")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench faults",
        description="Seconds of disruption, packets lost and joins caused by a tunnel flap, a "
                    "Key Distributor restart and a Media Distributor restart.")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="comma-separated, in order (default {})".format(",".join(FAULTS)))
    parser.add_argument("--repeat", type=int, default=2,
                        help="times each fault is made (default 2)")
    parser.add_argument("--observe", type=float, default=30.0,
                        help="seconds each fault is followed (default 30)")
    parser.add_argument("--endpoints", type=int, default=10,
                        help="reference endpoints (default 10)")
    parser.add_argument("--conferences", type=int, default=2,
                        help="conferences the endpoints are spread over (default 2)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="RTP packets per second per endpoint (default 20)")
    parser.add_argument("--keepalive", type=float, default=5.0,
                        help="endpoint liveness probe interval, seconds (default 5, the "
                             "reference endpoint's)")
    parser.add_argument("--keepalive-timeout", type=float, default=5.0,
                        help="endpoint liveness timeout, seconds (default 5, the reference "
                             "endpoint's)")
    parser.add_argument("--ekt-ttl", default="none",
                        help="perc-kd --ekt-ttl, seconds; 'none' (default) passes none")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs, bench log)")
    args = parser.parse_args(argv)
    args.ekt_ttl = parse_ekt_ttl(parser, args.ekt_ttl)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(args.faults) - set(FAULTS)
    if unknown or not args.faults:
        parser.error("--faults: choose from {}".format(", ".join(FAULTS)))
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1 to 20")
    if args.observe < 5:
        parser.error("--observe must be at least 5 seconds")
    check_deployment_options(parser, args)
    return args


async def faults(reactor, deployment, args) -> dict:
    monitor = Monitor(deployment)
    monitor.start()
    started = reactor.seconds()
    quiet = args.keepalive + args.keepalive_timeout + 1
    make = {
        "tunnel-flap": deployment.reset_tunnel,
        "kd-restart": deployment.restart_kd,
        "md-restart": deployment.restart_md,
    }
    print("perc bench faults: {} endpoints in {} conferences at {:g} packets/s, endpoint "
          "keepalive {:g} s / timeout {:g} s; each fault {} times, followed {:g} s".format(
              args.endpoints, args.conferences, args.rate, args.keepalive,
              args.keepalive_timeout, args.repeat, args.observe), flush=True)
    results = []
    for run in range(1, args.repeat + 1):
        for kind in args.faults:
            await steady(reactor, deployment, quiet)
            record = monitor.fault(kind, started)
            made = make[kind]()
            if hasattr(made, "__await__"):
                await made
            await sleep(reactor, record["_at"] + args.observe - reactor.seconds())
            result = monitor.close(record)
            result["run"] = run
            results.append(result)
            print("{kind} #{run}: recovered after {recovered} s, longest gap {gap_s} s, "
                  "last join at {last_join_s} s, {joins} joins, {lost} lost".format(
                      recovered=result["recovered_s"], **result), flush=True)
    monitor.stop()
    rows = [[r["kind"], r["run"], "-" if r["recovered_s"] is None else r["recovered_s"],
             r["gap_s"], "-" if r["last_join_s"] is None else r["last_join_s"], r["joins"],
             r["sent"], r["lost"], r["undecryptable"], r["failed"]] for r in results]
    print()
    print(_common.format_table(
        ["fault", "run", "recovered s", "gap s", "last join s", "joins", "sent", "lost",
         "undecr", "failed"], rows))
    figures = {
        "benchmark": "faults",
        "parameters": {k: getattr(args, k) for k in (
            "faults", "repeat", "observe", "endpoints", "conferences", "rate", "keepalive",
            "keepalive_timeout", "ekt_ttl")},
        "joins_source": deployment.joins_source, "faults": results,
    }
    problems = ["{kind} #{run} not recovered within {observe:g} s".format(
        observe=args.observe, **r) for r in results if r["recovered_s"] is None]
    problems += ["{kind} #{run}: {failed} packets failed verification".format(**r)
                 for r in results if r["failed"]]
    if problems:
        raise BenchFailure("; ".join(problems), figures)
    return figures


def run(args):
    return run_on_reactor("faults", faults, args)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return _common.bench_main("faults", run, args, (BenchFailure, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
