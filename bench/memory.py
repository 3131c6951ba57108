"""
Memory benchmark: resident memory each established association costs the
Key Distributor (``twistd perc-kd``) and each keyed endpoint costs the Media
Distributor (``twistd perc-md``), at 1,000 and 5,000 associations.

Set-up as ``bench/handshake.py`` (whose worker processes it uses): a
temporary development PKI, the two daemons as real processes, and worker
processes running client-role DTLS engines over UDP, one socket and one
self-signed certificate per endpoint (as many workers as the hard open-file
limit needs: two for 20,000 under a hard limit of 20,000; a count the
machine's limits cannot hold fails at once, with one line).  Endpoints are registered by writing the Key
Distributor's SQLite file before it starts (``--register sqlite``, the
default here: thousands of API calls would dominate the run; ``api`` and
``both`` work too), and the Media Distributor places them with
``--default-conference``.  It runs with ``--endpoint-timeout 3600`` so that
keyed endpoints that send no media stay for the whole measurement.

Registrations and associations are charged apart.  All registrations
(``--warmup`` + the largest count) are made before any endpoint joins; the
daemons' idle RSS (``VmRSS`` of ``/proc/PID/status``) before them and after
them gives the memory per registration: with ``api`` and ``both``, read in
the same processes before the worker registers; with ``sqlite``, whose
registrations the Key Distributor loads as it starts, "before" is the idle
RSS of a perc-kd and perc-md pair started the same way on an empty database
in the same run (and stopped).  The Media Distributor holds registrations
only with ``both`` (otherwise ``--default-conference`` places endpoints and
its figure per registration is left out).

Then ``--warmup`` associations (so that one-time allocations -- SSL
contexts, code paths run for the first time, caches -- are not charged to
the associations), then the daemons' RSS again (after both are idle); then
endpoints join (at most ``--concurrency`` handshakes in flight) until each
count of ``--counts`` is reached, and RSS is read again each time.  Every
endpoint must hold its keys (hop-by-hop keys and the EKTKey) and stay
connected; the associations are all still alive when RSS is read (the
worker keeps them until the end).  Figures per count: (RSS at that count -
RSS after warm-up) / (associations added), in KiB, for each daemon: what an
association costs on top of its registration.

Time budget: endpoints are started in chunks of ``--chunk``; once
``--budget`` seconds (default 40) have passed since the start, no more are
started, and a count that was not reached is reported for the number of
associations actually set up, with a NOTE line and ``"truncated"`` in the
JSON (a later count is then skipped: ``"skipped_counts"``).  On an idle
2-core machine the default 1,000 and 5,000 take about 25 s.

    python bench/memory.py [--counts 1000,5000] [--warmup 100] [--budget 40]
    perc bench memory --counts 1000            # quicker
    perc bench memory --large --budget 300     # also 10,000
    perc bench memory --counts 1000,5000,20000 --budget 300

Targets: <= 64 KiB per Key Distributor association, <= 32 KiB per Media
Distributor endpoint.  The last line printed is one JSON object with the
figures.  Exit status 1 (with a line starting ``FAILED``) if any endpoint
fails to join.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import handshake  # noqa: E402

KD_TARGET_KIB = 64
MD_TARGET_KIB = 32


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench memory",
        description="Resident memory per established association on perc-kd and per keyed "
                    "endpoint on perc-md.")
    parser.add_argument("--counts", default="1000,5000",
                        help="association counts at which RSS is read, ascending "
                             "(default 1000,5000)")
    parser.add_argument("--large", action="store_true",
                        help="add 10000 to --counts")
    parser.add_argument("--warmup", type=int, default=100,
                        help="associations set up before the first RSS reading (default 100)")
    parser.add_argument("--concurrency", "-c", type=int, default=200,
                        help="handshakes in flight at once (default 200)")
    parser.add_argument("--register", choices=("api", "both", "sqlite"), default="sqlite",
                        help="how endpoints are registered (default sqlite; see "
                             "bench/handshake.py)")
    parser.add_argument("--profile", "-p", default="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
                        help="SRTP protection profile the endpoints offer (default 0x0009)")
    parser.add_argument("--budget", type=float, default=40.0,
                        help="seconds from start after which no more endpoints are started; "
                             "a count not reached by then is reported as reached, and said so "
                             "(default 40, so that a default run ends within 60 s)")
    parser.add_argument("--chunk", type=int, default=250,
                        help="endpoints started per step between budget checks (default 250)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for each step's joins before the run fails (default 120)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKI, daemon logs)")
    args = parser.parse_args(argv)
    try:
        counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    except ValueError:
        parser.error("--counts: comma-separated integers expected")
    if args.large:
        counts = sorted(set(counts) | {10000})
    if not counts or counts[0] < 1:
        parser.error("--counts must hold positive integers")
    if args.budget <= 0 or args.chunk < 1:
        parser.error("--budget must be positive and --chunk at least 1")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    args.counts = counts
    # What the worker and distributor helpers of bench/handshake.py expect.
    args.endpoints = args.warmup + counts[-1]
    args.kd_profile = None
    handshake.check_common_options(parser, args)
    return args


def idle_rss(pids):
    for pid in pids:
        # The Media Distributor sweeps its endpoints every second: "idle"
        # allows a clock tick of CPU.
        handshake.wait_idle(pid, limit=5.0, tolerance=0.011)
    return [_common.rss_kib(pid) for pid in pids]


def empty_roster_rss(directory, args, extra_md):
    """
    Idle RSS (KiB) of a perc-kd and a perc-md started as
    :func:`handshake.start_run` starts them, on an empty database; stopped
    once read.
    """
    md_args, kd_args = handshake.distributor_args(args, extra_md)
    directory = os.path.join(directory, "empty-roster")
    os.mkdir(directory)
    distributors = _common.start_distributors(directory, md_args=md_args, kd_args=kd_args)
    try:
        return idle_rss((distributors.kd.pid, distributors.md.pid))
    finally:
        distributors.stop()


def run(args):
    directory = tempfile.mkdtemp(prefix="perc-bench-memory-")
    worker = distributors = None
    steps = []
    skipped = []
    started = time.monotonic()
    extra_md = ["--endpoint-timeout", "3600"]
    unregistered = []

    def before_registration(distributors):
        if args.register != "sqlite":
            unregistered.extend(idle_rss((distributors.kd.pid, distributors.md.pid)))

    try:
        # Before any daemon starts: a count the open-file limits cannot hold fails here.
        handshake.plan_workers(handshake.total_endpoints(args),
                               *handshake.machine_open_file_limits())
        if args.register == "sqlite":
            unregistered.extend(empty_roster_rss(directory, args, extra_md))
        worker, distributors, registration_s = handshake.start_run(
            directory, args, extra_md=extra_md, before_registration=before_registration)
        workers = len(worker.shares)
        pids = (distributors.kd.pid, distributors.md.pid)
        initial = idle_rss(pids)
        joined = 0

        def join_to(total, budgeted=True):
            """Join up to ``total`` in chunks; stop early once the budget is spent."""
            nonlocal joined
            t = time.monotonic()
            while joined < total:
                if budgeted and time.monotonic() - started > args.budget:
                    break
                end = min(total, joined + args.chunk)
                worker.send({"go": [joined, end]})
                result = worker.expect("joined", args.timeout + 60)
                handshake.check_joined(result)
                joined = end
            return time.monotonic() - t

        join_to(args.warmup, budgeted=False)
        base = idle_rss(pids)
        for count in args.counts:
            seconds = join_to(args.warmup + count)
            reached = joined - args.warmup
            if reached <= (steps[-1]["count"] if steps else 0):
                skipped.append(count)
                continue
            rss = idle_rss(pids)
            for daemon in (distributors.kd, distributors.md):
                if daemon.process.poll() is not None:
                    raise handshake.BenchFailure("{} exited during the run:\n{}".format(
                        daemon.log_path, daemon.output()[-2000:]))
            step = {"count": reached, "join_s": round(seconds, 2),
                    "kd_rss_kib": rss[0], "md_rss_kib": rss[1],
                    "kd_kib_per_assoc": round((rss[0] - base[0]) / reached, 2),
                    "md_kib_per_endpoint": round((rss[1] - base[1]) / reached, 2)}
            if reached < count:
                step["requested"] = count
                step["truncated"] = "time budget of {:g} s spent".format(args.budget)
            steps.append(step)
        status = _common.http_json("GET", distributors.md_api + "/v1/status",
                                   distributors.md_token)[1] or {}
        worker.stop()
        worker = None
    finally:
        if worker is not None:
            worker.stop()
        if distributors is not None:
            # Thousands of live associations can make an orderly shutdown
            # slow; the figures are taken, so do not wait long for it.
            distributors.md.stop(timeout=3.0)
            distributors.kd.stop(timeout=3.0)
        if args.keep:
            print("kept", directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    established = status.get("established")
    if established != args.warmup + (steps[-1]["count"] if steps else 0):
        raise handshake.BenchFailure(
            "the Media Distributor holds {} keyed endpoints at the end, not {}".format(
                established, args.warmup + (steps[-1]["count"] if steps else 0)))
    registrations = args.endpoints
    kd_per_registration = (initial[0] - unregistered[0]) / registrations
    md_per_registration = ((initial[1] - unregistered[1]) / registrations
                           if args.register == "both" else None)
    figures = {
        "benchmark": "memory",
        "warmup": args.warmup,
        "register": args.register,
        "registration_s": round(registration_s, 2),
        "registrations": registrations,
        "worker_processes": workers,
        "rss_before_registrations": (
            "the same processes before the API registrations" if args.register != "sqlite"
            else "a perc-kd and perc-md started the same way on an empty database, same run"),
        "kd_rss_before_registrations_kib": unregistered[0],
        "md_rss_before_registrations_kib": unregistered[1],
        "kd_kib_per_registration": round(kd_per_registration, 3),
        "md_kib_per_registration": (None if md_per_registration is None
                                    else round(md_per_registration, 3)),
        "kd_rss_start_kib": initial[0], "md_rss_start_kib": initial[1],
        "kd_rss_after_warmup_kib": base[0], "md_rss_after_warmup_kib": base[1],
        "steps": steps,
        "budget_s": args.budget,
        "elapsed_s": round(time.monotonic() - started, 1),
        "targets": {"kd_kib_per_assoc": KD_TARGET_KIB, "md_kib_per_endpoint": MD_TARGET_KIB},
    }
    figures["md_established_at_end"] = established
    if skipped:
        figures["skipped_counts"] = skipped
    figures["targets_met"] = all(s["kd_kib_per_assoc"] <= KD_TARGET_KIB
                                 and s["md_kib_per_endpoint"] <= MD_TARGET_KIB for s in steps)
    rows = [["(no registration{})".format(
                 ", empty database" if args.register == "sqlite" else ""), "",
             "{:,}".format(unregistered[0]), "", "{:,}".format(unregistered[1]), ""],
            ["({:,} registrations)".format(registrations), "", "{:,}".format(initial[0]),
             "{:.2f}/reg.".format(kd_per_registration), "{:,}".format(initial[1]),
             "-" if md_per_registration is None else "{:.2f}/reg.".format(md_per_registration)],
            ["(after {} warm-up)".format(args.warmup), "", "{:,}".format(base[0]), "",
             "{:,}".format(base[1]), ""]]
    for s in steps:
        label = "{:,}".format(s["count"])
        if s.get("truncated"):
            label += " (of {:,})".format(s["requested"])
        rows.append([label, "{:.1f}".format(s["join_s"]),
                     "{:,}".format(s["kd_rss_kib"]), "{:.1f}".format(s["kd_kib_per_assoc"]),
                     "{:,}".format(s["md_rss_kib"]), "{:.1f}".format(s["md_kib_per_endpoint"])])
    print(_common.format_table(["associations", "join s", "KD RSS KiB", "KD KiB/assoc",
                                "MD RSS KiB", "MD KiB/endpoint"], rows))
    for s in steps:
        if s.get("truncated"):
            print("NOTE: only {:,} of the {:,} associations asked for were set up: the {:g} s "
                  "time budget (--budget) was spent; figures are for {:,}.".format(
                      s["count"], s["requested"], args.budget, s["count"]))
    if skipped:
        print("NOTE: counts {} skipped: the time budget (--budget {:g} s) was spent.".format(
            ", ".join("{:,}".format(c) for c in skipped), args.budget))
    print("targets: <= {} KiB per KD association, <= {} KiB per MD endpoint: {}".format(
        KD_TARGET_KIB, MD_TARGET_KIB, "met" if figures["targets_met"] else "MISSED"))
    return figures


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return _common.bench_main("memory", run, args, (handshake.BenchFailure,))


if __name__ == "__main__":
    sys.exit(main())
