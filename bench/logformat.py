"""
Log-format benchmark: what one text log line costs, through twistd's default
text observer (``twisted.logger.textFileLogObserver``, which formats with
``formatEventAsClassicLogText``) and through ``perc.logs.text`` (the same
lines: ``--logger perc.logs.text``, what the project's own launchers use).

The events are the daemons' own, made by their loggers with the fields they
log: the Key Distributor's "Association ... accepted" line (one per join)
and the Media Distributor's "New association" and "keyed" lines (two per
join).  Both observers write to an in-memory text file (no system call), so
the figure is the formatting and the observer's own work, per event:

``twisted_us``
    ``textFileLogObserver(out)(event)``
``perc_us``
    ``perc.logs.text(out)(event)`` (which also drops events below
    ``PERC_LOG_LEVEL``, as twistd's observer does not)

Each figure is the best of ``--repeat`` runs of ``--events`` events, the
two interleaved.  ``ratio`` = perc_us / twisted_us.  Before timing, every
event is checked to give the same text both ways (exit status 1 with a
line starting ``FAILED`` if not).

    python bench/logformat.py [--events 20000] [--repeat 5]
    perc bench logformat

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


class BenchFailure(Exception):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench logformat",
        description="One text log line through twistd's default observer and through "
                    "perc.logs.text.")
    parser.add_argument("--events", type=int, default=20000,
                        help="events per timed run (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per figure; the best is kept (default %(default)s)")
    args = parser.parse_args(argv)
    if not 100 <= args.events <= 10_000_000:
        parser.error("--events must be 100 to 10000000")
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be 1 to 50")
    return args


def daemon_events():
    """``[(name, event)]``: the per-join lines of perc-kd and perc-md, as their loggers make them."""
    from twisted.logger import Logger

    events = []

    def capture(namespace):
        return Logger(namespace=namespace, observer=events.append)

    association_id = uuid.uuid4()
    capture("perc.kd.associations.KeyDistributor").info(
        "Association {association_id} accepted: tls-id {tls_id} in conference "
        "{conference}, profile {profile}; hop-by-hop keys sent to {peer}; "
        "EKTKey SPI {spi} sent", association_id=association_id,
        tls_id="Bench-e08896fb2248-000001-TlsId", conference="bench-handshake",
        profile="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM", peer="localhost (127.0.0.1:47808)",
        spi=11150)
    md = capture("perc.md.relay.MediaRelay")
    md.info("New association {association_id} from {source} (tls-id {tls_id}, conference "
            "{conference}) through {kd}: past the waiting room",
            association_id=association_id, source=("127.0.0.1", 34091),
            tls_id="Bench-e08896fb2248-000001-TlsId", conference="bench-handshake",
            kd="localhost (127.0.0.1:43121)")
    md.info("Association {association_id} keyed ({profile}, EKT {ekt}): forwarding media in "
            "conference {conference}", association_id=association_id,
            profile="DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM", ekt=True,
            conference="bench-handshake")
    names = ("kd accepted", "md new association", "md keyed")
    return list(zip(names, events))


def per_event_us(observer, event, count):
    start = time.perf_counter()
    for _ in range(count):
        observer(event)
    return (time.perf_counter() - start) / count * 1e6


def run(args):
    from twisted.logger import formatEventAsClassicLogText, textFileLogObserver

    from perc import logs

    results = []
    for name, event in daemon_events():
        expected = formatEventAsClassicLogText(event)
        if logs.classic_text(event) != expected:
            raise BenchFailure("perc.logs.classic_text differs from Twisted's text for the "
                               "{} event".format(name))
        out_twisted, out_perc = io.StringIO(), io.StringIO()
        twisted_observer = textFileLogObserver(out_twisted)
        perc_observer = logs.text(out_perc, environ={})
        twisted_us, perc_us = [], []
        for _ in range(args.repeat):
            twisted_us.append(per_event_us(twisted_observer, event, args.events))
            perc_us.append(per_event_us(perc_observer, event, args.events))
            for out in (out_twisted, out_perc):
                out.seek(0)
                out.truncate()
        results.append({"event": name, "twisted_us": round(min(twisted_us), 2),
                        "perc_us": round(min(perc_us), 2),
                        "ratio": round(min(perc_us) / min(twisted_us), 3)})
    rows = [(r["event"], "{:.2f}".format(r["twisted_us"]), "{:.2f}".format(r["perc_us"]),
             "{:.3f}".format(r["ratio"])) for r in results]
    print(_common.format_table(("event", "twistd text (us)", "perc.logs.text (us)", "ratio"),
                               rows))
    _common.print_json_last({"benchmark": "logformat", "events": args.events,
                             "repeat": args.repeat, "results": results, "ok": True})


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except BenchFailure as e:
        print("FAILED: {}".format(e), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
