"""
Scale curves: sweeps of the existing benchmarks, drawn as PNG plots.

This script measures nothing itself.  It runs ``bench/forward.py``,
``bench/handshake.py`` and ``bench/memory.py`` as subprocesses (each with
its own real daemons and its own same-run baseline), takes the JSON object
each prints last, and draws:

``forward_conference_size.png``
    perc-md's zero-loss forwarding rate against the number of members of
    one conference (``--sizes``), beside the per-packet Python relay of the
    same run; and CPU per forwarded packet at the same rate, beside the
    relay's and the physical floor (kernel send path + one protect).
``forward_conferences.png``
    the same against the number of conferences (``--conferences``) of
    ``--conference-size`` members each, all through one perc-md.
``handshake_concurrency.png``
    associations per second, join latency p50 / p99 and Key Distributor CPU
    per association against the handshakes in flight (``--concurrency``),
    beside the in-process DTLS engine and a bare pyOpenSSL handshake of the
    same run (as handshakes per CPU-second of one core, and as CPU per
    handshake).
``memory_associations.png``
    Key and Media Distributor resident memory against established
    associations (``--associations``, one run of bench/memory.py), with the
    idle memory before any registration and after the registrations and
    warm-up; and memory per association and per registration.

Every point, with the command that measured it and the machine, goes into
``scale.json`` beside the PNGs (``--out``, default ``bench/plots``), so
that the figures in bench/RESULTS.rst can be traced; ``--plot-only`` draws
the PNGs again from such a file.  A point whose benchmark fails is kept in
the JSON with its error, left out of the plots, and makes the exit status 1.

    python bench/scale.py [--only forward,handshake,memory] [--out DIR]
    perc bench scale --quick                  # a smoke run of a few minutes
    perc bench scale --plot-only bench/plots/scale.json

Needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
SWEEPS = ("forward", "handshake", "memory")
#: Small enough to commit: about 100 KB each.
DPI = 80

#: Points of a full run (the issue's) and of --quick.
DEFAULTS = {
    "sizes": [2, 5, 10, 20, 50],
    "conferences": [1, 2, 5, 10],
    "conference_size": 5,
    "concurrency": [50, 200, 1000],
    "handshake_endpoints": 1000,
    # The 1k, 5k and 20k (bench/memory.py splits the endpoints, one
    # UDP socket each, over as many worker processes as the open-file limit needs).
    "associations": [1000, 5000, 20000],
}
QUICK = {
    "sizes": [2, 3],
    "conferences": [1, 2],
    "conference_size": 2,
    "concurrency": [10, 40],
    "handshake_endpoints": 40,
    "associations": [100, 200],
}


def _counts(text):
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated integers expected: {!r}".format(text))
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("positive integers expected: {!r}".format(text))
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench scale",
        description="Sweeps of bench/forward.py, bench/handshake.py and bench/memory.py, "
                    "drawn as PNG plots with their same-run baselines.")
    parser.add_argument("--only", default=",".join(SWEEPS),
                        help="sweeps to run, comma-separated (default: all of {})".format(
                            ", ".join(SWEEPS)))
    parser.add_argument("--out", default=os.path.join(BENCH, "plots"),
                        help="directory of the PNGs and scale.json (default bench/plots)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few, small points and short trials (the figures "
                             "mean little)")
    parser.add_argument("--sizes", type=_counts,
                        help="members of the one conference, forward sweep (default {})".format(
                            ",".join(map(str, DEFAULTS["sizes"]))))
    parser.add_argument("--conferences", type=_counts,
                        help="conferences, forward sweep (default {})".format(
                            ",".join(map(str, DEFAULTS["conferences"]))))
    parser.add_argument("--conference-size", type=int,
                        help="members of each conference in the --conferences sweep "
                             "(default {}; a run of --sizes with it stands for 1 "
                             "conference)".format(DEFAULTS["conference_size"]))
    parser.add_argument("--forward-repeat", type=int, default=1,
                        help="runs of bench/forward.py per point (its --repeat); the plots "
                             "show the median and the min-max range (default 1)")
    parser.add_argument("--forward-seconds", type=float,
                        help="length of each forward trial (its --seconds; default 1, "
                             "--quick 0.3)")
    parser.add_argument("--concurrency", type=_counts,
                        help="handshakes in flight, handshake sweep (default {})".format(
                            ",".join(map(str, DEFAULTS["concurrency"]))))
    parser.add_argument("--handshake-endpoints", type=int,
                        help="endpoints joining per point (default {}; at least the largest "
                             "--concurrency)".format(DEFAULTS["handshake_endpoints"]))
    parser.add_argument("--handshake-rounds", type=int, default=1,
                        help="rounds per point (bench/handshake.py --rounds; default 1)")
    parser.add_argument("--associations", type=_counts,
                        help="associations at which memory is read, one bench/memory.py run "
                             "(default {})".format(",".join(map(str, DEFAULTS["associations"]))))
    parser.add_argument("--plot-only", metavar="JSON",
                        help="run nothing: draw the PNGs again from a scale.json (into --out)")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SWEEPS))
    if unknown or not only:
        parser.error("--only: choose among {} (got {})".format(", ".join(SWEEPS), args.only))
    args.only = [name for name in SWEEPS if name in only]
    defaults = QUICK if args.quick else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if args.forward_seconds is None:
        args.forward_seconds = 0.3 if args.quick else 1.0
    if not 2 <= args.conference_size <= 50:
        parser.error("--conference-size must be 2 to 50")
    if args.sizes[0] < 2 or args.sizes[-1] > 50:
        parser.error("--sizes must be 2 to 50 (bench/forward.py --endpoints)")
    if args.conferences[-1] > 20:
        parser.error("--conferences must be 1 to 20 (bench/forward.py --conferences)")
    if not 1 <= args.forward_repeat <= 20:
        parser.error("--forward-repeat must be 1 to 20")
    if args.handshake_endpoints < args.concurrency[-1]:
        parser.error("--handshake-endpoints ({}) must be at least the largest --concurrency "
                     "({})".format(args.handshake_endpoints, args.concurrency[-1]))
    if not 1 <= args.handshake_rounds <= 50:
        parser.error("--handshake-rounds must be 1 to 50")
    return args


# --------------------------------------------------------------------------
# Running the benchmarks


def run_benchmark(name, options):
    """
    Run ``bench/NAME.py OPTIONS`` (its output passed through, indented) and
    return ``(document, command)``: the JSON object it printed last, or
    ``{"ok": False, "error": ...}`` when there is none.
    """
    command = [sys.executable, os.path.join(BENCH, name + ".py")] + [str(o) for o in options]
    shown = "python bench/{}.py {}".format(name, " ".join(str(o) for o in options))
    print("== {}".format(shown), flush=True)
    started = time.monotonic()
    last = ""
    # Its standard error too (FAILED lines), in order with the rest.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True) as process:
        for line in process.stdout:
            print("   " + line.rstrip("\n"), flush=True)
            if line.strip():
                last = line
    try:
        document = json.loads(last)
        if not isinstance(document, dict):
            raise ValueError(last)
    except ValueError:
        document = {"ok": False, "error": "bench/{}.py exited with status {} without a JSON "
                                          "line".format(name, process.returncode)}
    if process.returncode and document.get("ok", True):
        document = {"ok": False, "error": "exit status {}".format(process.returncode)}
    document["command"] = shown
    document["wall_s"] = round(time.monotonic() - started, 1)
    return document


def _spread(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = (ordered[middle] if len(ordered) % 2
              else (ordered[middle - 1] + ordered[middle]) / 2)
    return {"min": ordered[0], "median": median, "max": ordered[-1]}


def forward_point(document, members, conferences):
    """The figures a forward plot needs, from one bench/forward.py document."""
    point = {"members": members, "conferences": conferences, "ok": bool(document.get("ok")),
             "command": document["command"], "wall_s": document["wall_s"]}
    if not point["ok"]:
        point["error"] = document.get("error")
        return point
    runs = document.get("runs") or [document]
    for key in ("forward_pps", "baseline_pps", "md_cpu_s_per_packet_same_rate"):
        point[key] = _spread([run[key] for run in runs])
    point["ratio"] = _spread([run["ratio"] for run in runs])
    point["baseline_cpu_s_per_packet_same_rate"] = document[
        "baseline_cpu_s_per_packet_same_rate"]
    point["floor_s"] = document["floor"]["floor_s"]
    point["md_cpu_per_packet_over_floor"] = document["md_cpu_per_packet_over_floor"]
    point["receivers_per_conference"] = document["receivers"]
    point["repeat"] = len(runs)
    return point


def sweep_forward(args):
    def forward(members, conferences):
        document = run_benchmark("forward", [
            "--endpoints", members, "--conferences", conferences,
            "--repeat", args.forward_repeat, "--seconds", args.forward_seconds])
        return forward_point(document, members, conferences)

    sizes = [forward(members, 1) for members in args.sizes]
    by_conferences = []
    for conferences in args.conferences:
        same = [p for p in sizes if conferences == 1 and p["members"] == args.conference_size]
        by_conferences.append(same[0] if same else forward(args.conference_size, conferences))
    return {"conference_size": sizes, "conferences": by_conferences}


def sweep_handshake(args):
    points = []
    for concurrency in args.concurrency:
        document = run_benchmark("handshake", [
            "--endpoints", args.handshake_endpoints, "--concurrency", concurrency,
            "--rounds", args.handshake_rounds, "--register", "sqlite", "--timeout", "300"])
        point = {"concurrency": concurrency, "ok": bool(document.get("ok")),
                 "command": document["command"], "wall_s": document["wall_s"]}
        if point["ok"]:
            point.update({key: document[key] for key in (
                "associations", "assoc_per_s", "join_p50_s", "join_p99_s", "kd_cpu_per_assoc",
                "md_cpu_per_assoc", "baseline_cpu_per_assoc", "bare_openssl_cpu_per_assoc",
                "ratio", "ratio_vs_bare_openssl", "client_retransmissions")})
        else:
            point["error"] = document.get("error")
        points.append(point)
    return points


def sweep_memory(args):
    document = run_benchmark("memory", [
        "--counts", ",".join(map(str, args.associations)),
        # Every count, whatever it takes; a join step may take long at 20k.
        "--budget", "100000", "--timeout", "600"])
    if not document.get("ok"):
        return {"ok": False, "error": document.get("error"), "command": document["command"]}
    keep = ("command", "wall_s", "warmup", "register", "registrations", "worker_processes",
            "kd_rss_before_registrations_kib", "md_rss_before_registrations_kib",
            "kd_kib_per_registration", "md_kib_per_registration", "rss_before_registrations",
            "kd_rss_start_kib", "md_rss_start_kib", "kd_rss_after_warmup_kib",
            "md_rss_after_warmup_kib", "steps", "targets")
    point = {key: document[key] for key in keep if key in document}
    point["ok"] = True
    return point


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"kernel": platform.release(), "python": "{} {}".format(
                platform.python_implementation(), platform.python_version()),
            "cpus": len(os.sched_getaffinity(0)), "cpu_model": model}


# --------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _good(points):
    return [p for p in points if p.get("ok")]


def _series(axes, xs, spreads, scale, **style):
    """
    A median line with min-max error bars (none when every run agrees);
    ``spreads`` may hold plain numbers (one run).  Every line of a panel
    goes through here, so that its legend keeps the order they were drawn.
    """
    spreads = [s if isinstance(s, dict) else {"min": s, "median": s, "max": s}
               for s in spreads]
    medians = [s["median"] * scale for s in spreads]
    low = [(s["median"] - s["min"]) * scale for s in spreads]
    high = [(s["max"] - s["median"]) * scale for s in spreads]
    axes.errorbar(xs, medians, yerr=[low, high] if any(low) or any(high) else None,
                  capsize=3, **style)


def _failed(axes, xs):
    """Mark the x values whose benchmark failed (no figure there)."""
    for x in xs:
        axes.axvline(x, color="tab:red", linestyle=":", alpha=0.6)
        axes.text(x, 0.5, " run failed", color="tab:red", rotation=90, ha="right",
                  va="center", transform=axes.get_xaxis_transform())


def _log_y(axes):
    """A log y axis labelled at 1, 2 and 5 times powers of ten (short ranges too)."""
    from matplotlib import ticker

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: "{:g}".format(value)))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())


def _log_x(axes, xs, label):
    axes.set_xscale("log")
    axes.set_xticks(xs)
    axes.set_xticklabels([str(x) for x in xs])
    axes.minorticks_off()
    axes.set_xlabel(label)
    axes.grid(True, alpha=0.3)


def plot_forward(points, x_key, x_label, title, path):
    """Zero-loss rate and CPU per forwarded packet against ``x_key``; False if no point."""
    failed = [p[x_key] for p in points if not p.get("ok")]
    points = sorted(_good(points), key=lambda p: p[x_key])
    if not points:
        return False
    pyplot = _pyplot()
    xs = [p[x_key] for p in points]
    figure, (rate, cpu) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    _series(rate, xs, [p["forward_pps"] for p in points], 1.0, marker="o", label="perc-md")
    _series(rate, xs, [p["baseline_pps"] for p in points], 1.0, marker="s", linestyle="--",
            label="baseline: per-packet Python relay")
    _log_y(rate)
    rate.set_ylabel("packets/s into the relay, zero loss")
    rate.set_title("Highest loss-free input rate")
    _log_x(rate, sorted(xs + failed), x_label)
    _failed(rate, failed)
    rate.legend(fontsize="small")
    _series(cpu, xs, [p["md_cpu_s_per_packet_same_rate"] for p in points], 1e6, marker="o",
            label="perc-md")
    _series(cpu, xs, [p["baseline_cpu_s_per_packet_same_rate"] for p in points], 1e6,
            marker="s", linestyle="--", label="baseline: per-packet Python relay")
    _series(cpu, xs, [p["floor_s"] for p in points], 1e6, marker="v", linestyle=":",
            label="floor: kernel send + one protect")
    cpu.set_ylim(bottom=0)
    cpu.set_ylabel("CPU per forwarded packet (µs)")
    cpu.set_title("CPU per forwarded packet, both relays at one rate")
    _log_x(cpu, sorted(xs + failed), x_label)
    _failed(cpu, failed)
    cpu.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return True


def plot_handshake(points, path):
    """Associations/s, join latency and CPU per association against concurrency."""
    failed = [p["concurrency"] for p in points if not p.get("ok")]
    points = sorted(_good(points), key=lambda p: p["concurrency"])
    if not points:
        return False
    pyplot = _pyplot()
    xs = [p["concurrency"] for p in points]
    ticks = sorted(xs + failed)
    figure, (rate, latency, cpu) = pyplot.subplots(1, 3, figsize=(14, 4.2))
    rate.plot(xs, [p["assoc_per_s"] for p in points], marker="o",
              label="perc-kd + perc-md (measured)")
    rate.plot(xs, [1 / p["baseline_cpu_per_assoc"] for p in points], marker="s",
              linestyle="--", label="in-process DTLS engine, one core")
    rate.plot(xs, [1 / p["bare_openssl_cpu_per_assoc"] for p in points], marker="v",
              linestyle=":", label="bare pyOpenSSL handshake, one core")
    _log_y(rate)
    rate.set_ylabel("associations per second")
    rate.set_title("Join rate (baselines: 1 / server CPU)")
    _log_x(rate, ticks, "handshakes in flight")
    _failed(rate, failed)
    rate.legend(fontsize="small")
    latency.plot(xs, [p["join_p50_s"] * 1e3 for p in points], marker="o", label="join p50")
    latency.plot(xs, [p["join_p99_s"] * 1e3 for p in points], marker="^", label="join p99")
    latency.axhline(250, color="grey", linestyle=":", label="p99 target (200 in flight)")
    _log_y(latency)
    latency.set_ylabel("join latency (ms, first ClientHello to EKTKey)")
    latency.set_title("Join latency")
    _log_x(latency, ticks, "handshakes in flight")
    _failed(latency, failed)
    latency.legend(fontsize="small")
    cpu.plot(xs, [p["kd_cpu_per_assoc"] * 1e3 for p in points], marker="o",
             label="perc-kd per association")
    cpu.plot(xs, [p["baseline_cpu_per_assoc"] * 1e3 for p in points], marker="s",
             linestyle="--", label="in-process DTLS engine (server)")
    cpu.plot(xs, [p["bare_openssl_cpu_per_assoc"] * 1e3 for p in points], marker="v",
             linestyle=":", label="bare pyOpenSSL (server)")
    cpu.set_ylim(bottom=0)
    cpu.set_ylabel("CPU per association (ms)")
    cpu.set_title("Key Distributor CPU per association")
    _log_x(cpu, ticks, "handshakes in flight")
    _failed(cpu, failed)
    cpu.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return True


def plot_memory(document, path):
    """RSS and memory per association against associations (one bench/memory.py run)."""
    if not document.get("ok") or not document.get("steps"):
        return False
    pyplot = _pyplot()
    steps = document["steps"]
    xs = [s["count"] for s in steps]
    mib = 1 / 1024
    figure, (rss, each) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for daemon, marker, colour in (("kd", "o", "tab:blue"), ("md", "s", "tab:orange")):
        name = "perc-{}".format(daemon)
        rss.plot(xs, [s["{}_rss_kib".format(daemon)] * mib for s in steps], marker=marker,
                 color=colour, label=name)
        rss.axhline(document["{}_rss_after_warmup_kib".format(daemon)] * mib, color=colour,
                    linestyle="--", label="{} idle, registrations and {} warm-up".format(
                        name, document["warmup"]))
        rss.axhline(document["{}_rss_before_registrations_kib".format(daemon)] * mib,
                    color=colour, linestyle=":", label="{} idle, no registration".format(name))
    rss.set_ylim(bottom=0)
    rss.set_ylabel("resident memory (MiB)")
    rss.set_title("RSS with every association alive ({:,} registrations)".format(
        document["registrations"]))
    _log_x(rss, xs, "established associations")
    rss.legend(fontsize="small")
    each.plot(xs, [s["kd_kib_per_assoc"] for s in steps], marker="o", color="tab:blue",
              label="perc-kd per association")
    each.plot(xs, [s["md_kib_per_endpoint"] for s in steps], marker="s", color="tab:orange",
              label="perc-md per association")
    each.axhline(document["kd_kib_per_registration"], color="tab:blue", linestyle=":",
                 label="perc-kd per registration")
    if document.get("md_kib_per_registration") is not None:
        each.axhline(document["md_kib_per_registration"], color="tab:orange", linestyle=":",
                     label="perc-md per registration")
    each.set_ylim(bottom=0)
    each.set_ylabel("KiB (idle RSS difference / count)")
    each.set_title("Memory per association and per registration")
    _log_x(each, xs, "established associations")
    each.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return True


def draw(document, directory):
    """Every PNG ``document`` (a scale.json) has points for; returns their paths."""
    drawn = []

    def target(name):
        return os.path.join(directory, name + ".png")

    forward = document.get("forward")
    if forward:
        size = forward["conferences"][0]["members"] if forward["conferences"] else None
        if plot_forward(forward["conference_size"], "members", "members of the conference",
                        "perc-md forwarding, one conference (1 sender, members - 1 receivers)",
                        target("forward_conference_size")):
            drawn.append(target("forward_conference_size"))
        if plot_forward(forward["conferences"], "conferences", "conferences",
                        "perc-md forwarding, conferences of {} members (a sender each)".format(
                            size), target("forward_conferences")):
            drawn.append(target("forward_conferences"))
    if document.get("handshake") and plot_handshake(document["handshake"],
                                                    target("handshake_concurrency")):
        drawn.append(target("handshake_concurrency"))
    if document.get("memory") and plot_memory(document["memory"], target("memory_associations")):
        drawn.append(target("memory_associations"))
    return drawn


# --------------------------------------------------------------------------
# Tables (reStructuredText, for bench/RESULTS.rst)


def rst_table(header, rows):
    """A reStructuredText simple table of ``header`` and ``rows`` (cells str())."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule]
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append(rule)
    lines.append(rule)
    return "\n".join(lines)


def _range(spread_, scale=1.0, digits=0):
    """``median (min–max)``, or the one value when the runs agree."""
    low, median, high = (spread_[k] * scale for k in ("min", "median", "max"))
    text = "{:,.{d}f}".format(median, d=digits)
    if (low, high) != (median, median):
        text += " ({:,.{d}f}–{:,.{d}f})".format(low, high, d=digits)
    return text


def tables(document):
    """The points of ``document`` (a scale.json) as reStructuredText tables."""
    out = []
    forward = document.get("forward") or {}
    for key, title in (("conference_size", "Forwarding, one conference"),
                       ("conferences", "Forwarding, several conferences")):
        points = _good(forward.get(key) or ())
        if not points:
            continue
        rows = [["{} x {}".format(p["conferences"], p["members"]),
                 _range(p["forward_pps"]), _range(p["baseline_pps"]),
                 _range(p["ratio"], digits=2),
                 _range(p["md_cpu_s_per_packet_same_rate"], 1e6, 2),
                 "{:.2f}".format(p["baseline_cpu_s_per_packet_same_rate"] * 1e6),
                 "{:.2f}".format(p["floor_s"] * 1e6),
                 "{:.2f}".format(p["md_cpu_per_packet_over_floor"])] for p in points]
        out.append("{} (median and range of {} runs; µs per forwarded packet; the last "
                   "three columns from the last run)\n\n{}".format(
                       title, points[0]["repeat"], rst_table(
                           ["conf. x members", "perc-md pkt/s", "baseline pkt/s", "ratio",
                            "perc-md µs", "baseline µs", "floor µs", "md/floor"], rows)))
    points = _good(document.get("handshake") or ())
    if points:
        ms = 1e3
        rows = [[p["concurrency"], p["associations"], "{:.0f}".format(p["assoc_per_s"]),
                 "{:.0f}".format(p["join_p50_s"] * ms), "{:.0f}".format(p["join_p99_s"] * ms),
                 "{:.3f}".format(p["kd_cpu_per_assoc"] * ms),
                 "{:.3f}".format(p["baseline_cpu_per_assoc"] * ms),
                 "{:.3f}".format(p["bare_openssl_cpu_per_assoc"] * ms),
                 "{:.2f}".format(p["ratio_vs_bare_openssl"])] for p in points]
        out.append("Handshakes (ms; CPU per association)\n\n" + rst_table(
            ["in flight", "joins", "assoc/s", "p50 ms", "p99 ms", "perc-kd", "engine",
             "bare OpenSSL", "KD/bare"], rows))
    memory = document.get("memory")
    if memory and memory.get("ok"):
        md_reg = memory.get("md_kib_per_registration")
        rows = [["none (no registration)", "{:,}".format(memory["kd_rss_before_registrations_kib"]),
                 "", "{:,}".format(memory["md_rss_before_registrations_kib"]), ""],
                ["none ({:,} registrations)".format(memory["registrations"]),
                 "{:,}".format(memory["kd_rss_start_kib"]),
                 "{:.2f} per registration".format(memory["kd_kib_per_registration"]),
                 "{:,}".format(memory["md_rss_start_kib"]),
                 "(none held)" if md_reg is None else "{:.2f} per registration".format(md_reg)],
                ["{} (warm-up)".format(memory["warmup"]),
                 "{:,}".format(memory["kd_rss_after_warmup_kib"]), "",
                 "{:,}".format(memory["md_rss_after_warmup_kib"]), ""]]
        rows += [["{:,}".format(s["count"]), "{:,}".format(s["kd_rss_kib"]),
                  "{:.1f} per association".format(s["kd_kib_per_assoc"]),
                  "{:,}".format(s["md_rss_kib"]),
                  "{:.1f} per association".format(s["md_kib_per_endpoint"])]
                 for s in memory["steps"]]
        out.append("Memory (RSS in KiB, idle)\n\n" + rst_table(
            ["associations", "perc-kd RSS", "perc-kd KiB", "perc-md RSS", "perc-md KiB"],
            rows))
    return "\n\n".join(out)


# --------------------------------------------------------------------------
# Main


def failures(document):
    """The errors of the points that failed."""
    found = []
    forward = document.get("forward") or {}
    for points in forward.values():
        found += ["forward {} x {}: {}".format(p["conferences"], p["members"], p.get("error"))
                  for p in points if not p.get("ok")]
    found += ["handshake at {}: {}".format(p["concurrency"], p.get("error"))
              for p in document.get("handshake") or () if not p.get("ok")]
    memory = document.get("memory")
    if memory and not memory.get("ok"):
        found.append("memory: {}".format(memory.get("error")))
    return found


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _pyplot()
    except ImportError:
        print("perc bench scale needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    if args.plot_only:
        with open(args.plot_only) as f:
            document = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        for path in draw(document, args.out):
            print("drew", path)
        print(tables(document))
        return 0
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    document = {
        "benchmark": "scale",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
    }
    sweeps = {"forward": sweep_forward, "handshake": sweep_handshake, "memory": sweep_memory}
    for name in args.only:
        document[name] = sweeps[name](args)
    document["total_s"] = round(time.monotonic() - started, 1)
    path = os.path.join(args.out, "scale.json")
    with open(path, "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote", path)
    for drawn in draw(document, args.out):
        print("drew", drawn)
    print(tables(document))
    failed = failures(document)
    for line in failed:
        print("FAILED: {}".format(line), file=sys.stderr)
    _common.print_json_last({"benchmark": "scale", "ok": not failed, "json": path,
                             "failed": failed, "total_s": document["total_s"]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
