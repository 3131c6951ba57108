"""
Key Distributor failover benchmark (issue 14, "What must hold"): how long a
cluster of two Key Distributors on PostgreSQL takes to serve again the
associations of a member killed with SIGKILL, whether any endpoint notices
(handshakes again, packets failing verification, packets lost), and how
fast endpoints join through a Media Distributor with two Key Distributors
against one.

It needs a PostgreSQL server (``--db``, default ``$PERC_BENCH_POSTGRES`` or
``postgresql://postgres@127.0.0.1:5432/postgres``) on which the user may
create databases: each cluster gets a database of its own (``perc_bench_``
and random hex), dropped when it stops.

**Failover** (``--repeat`` times, each a fresh cluster on a fresh database:
the figures of one repeat never depend on what an earlier kill left in the
tables).  A development PKI, ``twistd -n perc-kd`` twice
(:func:`perc.daemons.start_key_distributors`: one database, sealing key, API
token and identity, node ids ``kd-1`` and ``kd-2``, ``--lease-seconds``
each) and one ``twistd -n perc-md`` with a ``--kd`` for each, then
``--endpoints`` reference endpoints (real UDP, real DTLS, this process's
reactor; ``bench/_deployment.py``) in ``--conferences`` conferences sending
``--rate`` packets per second.  Once the conferences are steady (every
member verifying every other, no join for 3 s), the associations each Key
Distributor holds are read from its ``/v1/status`` (both must hold some),
and the one holding the most (the first on a tie) is killed with SIGKILL.  Measured from the
kill:

- ``adopted_s``: until the survivor's ``adopted`` counter (its
  ``/v1/status``, polled every 0.1 s) has risen by every association the
  dead one held;
- ``served_s``: until a rekey of every conference, asked through the
  survivor's API as soon as the adoption is seen (and again every 0.2 s
  until it answers 200), has reached every endpoint (its count of new
  EKTKeys rose);
- then ``--observe`` seconds more, and over the whole time since the kill:
  ``handshakes_redone`` (handshakes the endpoints completed), ``failed``
  (packets failing verification), ``lost`` (not verified below a receiver's
  highest verified sequence number) and ``gap_s`` (the longest any member
  went without a verified packet from another; ``1 / --rate`` is no gap).

Verdict: every repeat ``served_s < 5``, ``handshakes_redone == 0`` and
``failed == 0``, else exit status 1.

**Handshake throughput, 2 Key Distributors against 1** (``--rounds`` rounds,
each a 1-KD then a 2-KD set-up, each fresh: database, PKI, daemons): the
handshake benchmark's worker process (``bench/handshake.py``: client-role
DTLS engines on UDP sockets of their own) registers
``--handshake-endpoints`` endpoints through the first Key Distributor's API,
and once every Key Distributor knows them starts ``--concurrency`` joins at
once (all of them by default).  A join lasts from the first ClientHello
until the endpoint holds its keys and the conference EKTKey.  Figures per
set-up: joins per second (joins / first ClientHello to last join), join
p50/p99, the joins each Key Distributor completed, and the CPU the daemons
and the worker used during the joins (``/proc``), in cores busy and in
milliseconds per join (all of them, and the Key Distributors alone).  ``throughput_2kd_vs_1kd``
is the 2-KD joins per second over the 1-KD ones.  The worker, the Media
Distributor and the Key Distributors share this machine's CPUs: with 2, a
second Key Distributor cannot add a core of its own (the output says how
many there are).

    perc bench failover [--db postgresql://USER@HOST:PORT/DB] [--repeat 3]
                        [--endpoints 12] [--conferences 3] [--lease-seconds 3]
                        [--handshake-endpoints 200] [--rounds 2]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from perc.errors import ConfigError  # noqa: E402
from perc.kd.store.database import describe_database  # noqa: E402
from _deployment import (  # noqa: E402
    BenchFailure,
    Deployment,
    Monitor,
    check_deployment_options,
    run_in_directory,
    sleep,
    steady,
    wait_until,
)

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The failover verdict: the survivor serves within this many seconds.
SERVED_TARGET_S = 5.0
#: Seconds with no join (and every pair verifying) before a kill.
STEADY_QUIET = 3.0
#: Key Distributors of the failover cluster.
CLUSTER_SIZE = 2
PARTS = ("failover", "throughput")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="perc bench failover",
        description="Seconds until a surviving Key Distributor serves the associations of one "
                    "killed with SIGKILL (handshakes redone, packets failed and lost), and "
                    "handshake throughput with 2 Key Distributors against 1. Needs "
                    "PostgreSQL.")
    parser.add_argument("--db", metavar="DSN",
                        default=os.environ.get("PERC_BENCH_POSTGRES") or DEFAULT_SERVER,
                        help="PostgreSQL server on which the user may create databases "
                             "(default $PERC_BENCH_POSTGRES, else {})".format(DEFAULT_SERVER))
    parser.add_argument("--only", choices=PARTS,
                        help="run only the failover or only the throughput measurement")
    group = parser.add_argument_group("failover")
    group.add_argument("--repeat", type=int, default=3,
                       help="kills, each of a fresh cluster (default 3)")
    group.add_argument("--endpoints", type=int, default=12,
                       help="reference endpoints (default 12)")
    group.add_argument("--conferences", type=int, default=3,
                       help="conferences the endpoints are spread over (default 3)")
    group.add_argument("--rate", type=float, default=20.0,
                       help="RTP packets per second per endpoint (default 20)")
    group.add_argument("--keepalive", type=float, default=5.0,
                       help="endpoint liveness probe interval, seconds (default 5, the "
                            "reference endpoint's)")
    group.add_argument("--keepalive-timeout", type=float, default=5.0,
                       help="endpoint liveness timeout, seconds (default 5, the reference "
                            "endpoint's)")
    group.add_argument("--lease-seconds", type=float, default=3.0,
                       help="perc-kd --lease-seconds (default 3)")
    group.add_argument("--observe", type=float, default=5.0,
                       help="seconds followed after the rekey reached every endpoint "
                            "(default 5)")
    group = parser.add_argument_group("handshake throughput")
    group.add_argument("--handshake-endpoints", type=int, default=200,
                       help="endpoints joining per set-up (default 200)")
    group.add_argument("--concurrency", type=int, default=None,
                       help="handshakes in flight at once (default: all of them)")
    group.add_argument("--rounds", type=int, default=2,
                       help="rounds, each a 1-KD then a 2-KD set-up (default 2)")
    group.add_argument("--timeout", type=float, default=45.0,
                       help="seconds for all joins of a set-up before the run fails "
                            "(default 45)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (PKIs, daemon logs, bench log)")
    args = parser.parse_args(argv)
    if urlsplit(args.db).scheme not in ("postgresql", "postgres"):
        parser.error("--db: a postgresql://USER@HOST:PORT/DB URL")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1 to 20")
    if not 0.5 <= args.lease_seconds <= 60:
        parser.error("--lease-seconds must be 0.5 to 60")
    if args.observe < 1:
        parser.error("--observe must be at least 1 second")
    # No ekt-ttl: only the rekey this benchmark asks for changes a key.
    args.ekt_ttl = None
    check_deployment_options(parser, args)
    if not 1 <= args.handshake_endpoints <= 5000:
        parser.error("--handshake-endpoints must be 1 to 5000")
    if args.concurrency is None:
        args.concurrency = args.handshake_endpoints
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1 to 20")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def check_server(server: str) -> None:
    """BenchFailure (one line: what is wrong, how to point the benchmark at a server) unless it answers."""
    how = ("start one, or point the benchmark at a server where the user may create databases "
           "with --db postgresql://USER@HOST:PORT/DB or PERC_BENCH_POSTGRES")
    try:
        import psycopg
    except ImportError:
        raise BenchFailure('psycopg is not installed (pip install ".[postgresql]"); it is '
                           'needed to reach PostgreSQL') from None
    from perc.kd.store.database import error_line

    try:
        with psycopg.connect(server, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        raise BenchFailure("PostgreSQL at {} does not answer ({}): {}".format(
            describe_database(server), error_line(error), how)) from None


class ScratchDatabase:
    """A database of its own on ``server`` for one cluster: ``url``; :meth:`drop` at the end."""

    def __init__(self, server: str):
        from perc.kd.store.postgresql import create_scratch_database

        self.server = server
        try:
            self.url = create_scratch_database(server, "perc_bench")
        except ConfigError as error:
            raise BenchFailure(str(error)) from None

    def drop(self) -> None:
        """Drop it; a failure is one line (the run's outcome matters more than its cleanup)."""
        from perc.kd.store.postgresql import drop_database

        try:
            drop_database(self.url, self.server)
        except ConfigError as error:
            print(error, flush=True)


def spread(values) -> dict:
    """min, median and max of ``values`` (rounded), Nones for none."""
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


# --------------------------------------------------------------------------
# Failover


async def established_per_kd(deployment) -> list:
    """Established associations each Key Distributor of the cluster holds (its /v1/status)."""
    counts = []
    for kd in deployment.cluster:
        status = await deployment.status(kd)
        if status is None:
            raise BenchFailure("{} does not answer /v1/status".format(kd.node_id))
        counts.append(status["established"])
    return counts


async def kill_one(reactor, deployment, args, run: int) -> dict:
    """Steady conferences, SIGKILL the busiest Key Distributor, measure until served and after."""
    await steady(reactor, deployment, STEADY_QUIET)
    held = await established_per_kd(deployment)
    md_status = await deployment.status("md") or {}
    md_held = [kd.get("associations") for kd in
               md_status.get("tunnels", {}).get("key_distributors", [])]
    figures = {"run": run, "established_per_kd": held, "md_associations_per_kd": md_held}
    if min(held) == 0:
        raise BenchFailure("the Media Distributor placed no association on a Key Distributor "
                           "(established per KD: {})".format(held), figures)
    victim_index = held.index(max(held))
    victim = deployment.cluster[victim_index]
    survivor = deployment.cluster[1 - victim_index]
    before = await deployment.status(survivor)
    adopted_before = before["counters"].get("adopted", 0)
    rekeys_before = {e.name: e.rekeys for e in deployment.endpoints}
    figures.update(killed=victim.node_id, killed_held=held[victim_index])

    monitor = Monitor(deployment)
    monitor.start()
    record = monitor.fault("kd-kill", reactor.seconds())
    killed_at = reactor.seconds()
    deployment.kill_key_distributor(victim)

    survivor_status = {"now": before}

    async def refresh():
        survivor_status["now"] = await deployment.status(survivor) or survivor_status["now"]

    def adopted() -> int:
        return survivor_status["now"]["counters"].get("adopted", 0) - adopted_before

    try:
        await wait_until(reactor, lambda: adopted() >= held[victim_index],
                         3 * args.lease_seconds + 15,
                         "adoption of the {} associations of {} by {}".format(
                             held[victim_index], victim.node_id, survivor.node_id),
                         poll=0.1, refresh=refresh)
        figures["adopted_s"] = round(reactor.seconds() - killed_at, 3)
        figures["adopted"] = adopted()

        spis = {}
        for conference in deployment.conferences:
            while True:
                answer = await deployment.rekey(conference, via=survivor)
                if answer is not None:
                    spis[conference] = answer["ekt_spi"]
                    break
                if reactor.seconds() - killed_at > 30:
                    raise BenchFailure("{} did not rekey {} within 30 s of the kill".format(
                        survivor.node_id, conference))
                await sleep(reactor, 0.2)
        figures["rekeyed_s"] = round(reactor.seconds() - killed_at, 3)
        figures["rekey_spis"] = spis
        await wait_until(reactor, lambda: all(e.rekeys > rekeys_before[e.name]
                                              for e in deployment.endpoints),
                         30, "the rekey through {} at every endpoint".format(survivor.node_id),
                         poll=0.02)
        figures["served_s"] = round(reactor.seconds() - killed_at, 3)
        await sleep(reactor, args.observe)
    except BenchFailure as error:
        figures.update({k: v for k, v in monitor.close(record).items()
                        if k in ("joins", "failed", "lost", "gap_s")})
        monitor.stop()
        raise BenchFailure(str(error), figures) from None
    followed = monitor.close(record)
    monitor.stop()
    figures.update(
        handshakes_redone=followed["joins"], failed=followed["failed"], lost=followed["lost"],
        undecryptable=followed["undecryptable"], sent=followed["sent"],
        verified=followed["verified"], gap_s=followed["gap_s"],
        recovered_s=followed["recovered_s"], observed_s=followed["observed_s"])
    return figures


async def failover(reactor, directory: str, args) -> dict:
    runs = []
    for run in range(1, args.repeat + 1):
        database = ScratchDatabase(args.db)
        where = os.path.join(directory, "failover-{}".format(run))
        os.makedirs(where)
        deployment = Deployment(
            reactor, where, endpoints=args.endpoints, conferences=args.conferences,
            rate=args.rate, keepalive=args.keepalive, keepalive_timeout=args.keepalive_timeout,
            db=database.url, key_distributors=CLUSTER_SIZE, lease_seconds=args.lease_seconds,
            conference_prefix="failover")
        try:
            await deployment.start()
            figures = await kill_one(reactor, deployment, args, run)
        except BenchFailure as error:
            raise BenchFailure("failover #{}: {}".format(run, error),
                               {"failover": {"runs": runs + [error.figures]}}) from None
        finally:
            await deployment.stop()
            database.drop()
        runs.append(figures)
        print("kill #{run}: {killed} held {killed_held} of {total} (per KD {held}); adopted "
              "after {adopted_s} s, rekey served after {served_s} s; {handshakes_redone} "
              "handshakes redone, {failed} failed, {lost} lost, longest gap {gap_s} s".format(
                  total=sum(figures["established_per_kd"]),
                  held=figures["established_per_kd"], **figures), flush=True)
    summary = {name: spread(r[name] for r in runs)
               for name in ("adopted_s", "served_s", "gap_s")}
    summary.update({name: sum(r[name] for r in runs)
                    for name in ("handshakes_redone", "failed", "lost", "undecryptable")})
    summary["runs"] = runs
    print()
    print(_common.format_table(
        ["kill", "killed", "held", "adopted s", "served s", "redone", "failed", "lost",
         "gap s"],
        [[r["run"], r["killed"], "{}/{}".format(r["killed_held"], sum(r["established_per_kd"])),
          r["adopted_s"], r["served_s"], r["handshakes_redone"], r["failed"], r["lost"],
          r["gap_s"]] for r in runs]))
    print("served_s min/median/max: {min} / {median} / {max} (target < {target:g})".format(
        target=SERVED_TARGET_S, **summary["served_s"]), flush=True)
    return summary


# --------------------------------------------------------------------------
# Handshake throughput, 1 Key Distributor against 2


def handshake_options(args) -> argparse.Namespace:
    """What bench/handshake.py's worker and daemon options read."""
    from perc.profiles import by_id

    return argparse.Namespace(
        endpoints=args.handshake_endpoints, concurrency=args.concurrency, register="api",
        profile_id=by_id(0x0009).id, timeout=args.timeout)


def cpu_of(pids: dict) -> dict:
    return {name: _common.cpu_seconds(pid) for name, pid in pids.items()}


async def joins_through(reactor, directory: str, args, kds: int) -> dict:
    """One set-up of ``kds`` Key Distributors: its fresh endpoints' joins, timed."""
    from twisted.internet import threads

    import handshake

    options = handshake_options(args)
    md_args, kd_args = handshake.distributor_args(options)
    database = ScratchDatabase(args.db)
    os.makedirs(directory)
    deployment = Deployment(reactor, directory, endpoints=0, db=database.url,
                            key_distributors=kds, md_args=md_args, kd_args=kd_args)
    # Its credentials are made while the daemons start.
    worker = handshake.WorkerProcess(directory, options, None)
    try:
        await threads.deferToThread(worker.expect, "credentials", 120)
        await deployment.start()
        worker.send({"media": ["127.0.0.1", deployment.media_port],
                     "kd_api": deployment.cluster[0].api_url, "kd_token": deployment.kd_token,
                     "md_api": "http://127.0.0.1:{}".format(deployment.md_api_port),
                     "md_token": deployment.md_token,
                     "kd_fingerprint": deployment.kd_fingerprint})
        await threads.deferToThread(worker.expect, "registered", 300)
        for kd in deployment.cluster[1:]:
            await deployment.registrations_known(kd, args.handshake_endpoints)
        pids = {kd.node_id: kd.daemon.pid for kd in deployment.cluster}
        pids.update(md=deployment.md.pid, worker=worker.pid)
        completed_before = [(await deployment.status(kd))["counters"].get(
            "handshake-completed", 0) for kd in deployment.cluster]
        cpu_before = cpu_of(pids)
        worker.send({"go": [0, args.handshake_endpoints]})
        result = await threads.deferToThread(worker.expect, "joined", args.timeout + 60)
        cpu_after = cpu_of(pids)
        handshake.check_joined(result)
        completed = [(await deployment.status(kd))["counters"].get("handshake-completed", 0)
                     - before for kd, before in zip(deployment.cluster, completed_before)]
    except handshake.BenchFailure as error:
        raise BenchFailure("{} KD: {}".format(kds, error)) from None
    finally:
        await threads.deferToThread(worker.stop)
        await deployment.stop()
        database.drop()
    times = result["times"]
    joins = [keyed - started for started, _, keyed in times]
    elapsed = max(t[2] for t in times) - min(t[0] for t in times)
    cpu = {name: round(cpu_after[name] - cpu_before[name], 3) for name in pids}
    return {
        "key_distributors": kds, "joins": len(times), "elapsed_s": round(elapsed, 4),
        "joins_per_s": round(len(times) / elapsed, 1), "join_times": joins,
        "completed_per_kd": completed, "cpu_s": cpu,
        # CPU used by the daemons and the worker over the joins, in cores busy.
        "cores_busy": round(sum(cpu.values()) / elapsed, 2),
        "retransmissions": result["retransmissions"], "ekt_requests": result["ekt_requests"],
    }


def join_figures(rounds: list) -> dict:
    joins = [j for r in rounds for j in r["join_times"]]
    elapsed = sum(r["elapsed_s"] for r in rounds)
    cpu = sum(sum(r["cpu_s"].values()) for r in rounds)
    kd_cpu = sum(v for r in rounds for name, v in r["cpu_s"].items() if name.startswith("kd-"))
    return {
        "joins": len(joins), "joins_per_s": round(len(joins) / elapsed, 1),
        "join_p50_s": round(_common.percentile(joins, 0.50), 4),
        "join_p99_s": round(_common.percentile(joins, 0.99), 4),
        "rounds_joins_per_s": [r["joins_per_s"] for r in rounds],
        "completed_per_kd": [r["completed_per_kd"] for r in rounds],
        "cores_busy": [r["cores_busy"] for r in rounds],
        # CPU per join of every process taking part, and of the Key Distributors alone.
        "cpu_ms_per_join": round(cpu / len(joins) * 1000, 2),
        "kd_cpu_ms_per_join": round(kd_cpu / len(joins) * 1000, 2),
    }


async def throughput(reactor, directory: str, args) -> dict:
    by_kds = {1: [], 2: []}
    for number in range(1, args.rounds + 1):
        # Alternated, so that both see the same (shared) machine.
        for kds in (1, 2):
            result = await joins_through(
                reactor, os.path.join(directory, "joins-{}-{}kd".format(number, kds)), args, kds)
            by_kds[kds].append(result)
            print("round {} with {} KD: {} joins in {:.3f} s ({} /s; per KD {}), {} cores "
                  "busy".format(number, kds, result["joins"], result["elapsed_s"],
                                result["joins_per_s"], result["completed_per_kd"],
                                result["cores_busy"]), flush=True)
    one, two = join_figures(by_kds[1]), join_figures(by_kds[2])
    ratio = round(two["joins_per_s"] / one["joins_per_s"], 3)
    ms = 1000.0
    print()
    print(_common.format_table(
        ["handshakes", "1 KD", "2 KDs"],
        [["joins per second", one["joins_per_s"], two["joins_per_s"]],
         ["join p50 ms", round(one["join_p50_s"] * ms, 1), round(two["join_p50_s"] * ms, 1)],
         ["join p99 ms", round(one["join_p99_s"] * ms, 1), round(two["join_p99_s"] * ms, 1)],
         ["joins per KD", one["completed_per_kd"], two["completed_per_kd"]],
         ["cores busy", one["cores_busy"], two["cores_busy"]],
         ["CPU ms per join (all)", one["cpu_ms_per_join"], two["cpu_ms_per_join"]],
         ["KD CPU ms per join", one["kd_cpu_ms_per_join"], two["kd_cpu_ms_per_join"]]]))
    print("throughput 2 KDs vs 1: {:.2f} ({} CPUs here, shared by the Key Distributors, the "
          "Media Distributor and the endpoints' worker)".format(ratio, os.cpu_count()),
          flush=True)
    return {"one_kd": one, "two_kd": two, "throughput_2kd_vs_1kd": ratio,
            "endpoints": args.handshake_endpoints, "concurrency": args.concurrency,
            "rounds": args.rounds}


# --------------------------------------------------------------------------


async def bench(reactor, directory: str, args) -> dict:
    print("perc bench failover: PostgreSQL at {}; {} CPUs (the daemons, the endpoints and this "
          "process share them), load average {:.2f}".format(
              describe_database(args.db), os.cpu_count(), os.getloadavg()[0]), flush=True)
    figures = {
        "benchmark": "failover",
        "parameters": {k: getattr(args, k) for k in (
            "repeat", "endpoints", "conferences", "rate", "keepalive", "keepalive_timeout",
            "lease_seconds", "observe", "handshake_endpoints", "concurrency", "rounds",
            "only")},
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    # Other work on the machine (it is shared) at the start.
                    "loadavg_1m_start": round(os.getloadavg()[0], 2)},
    }
    if args.only in (None, "failover"):
        print("failover: {} endpoints in {} conferences at {:g} packets/s across {} Key "
              "Distributors (lease {:g} s); {} kills, each of a fresh cluster".format(
                  args.endpoints, args.conferences, args.rate, CLUSTER_SIZE, args.lease_seconds,
                  args.repeat), flush=True)
        figures["failover"] = await failover(reactor, directory, args)
    if args.only in (None, "throughput"):
        print("\nhandshake throughput: {} endpoints ({} at once) per set-up, {} rounds of 1 KD "
              "then 2 KDs".format(args.handshake_endpoints, args.concurrency, args.rounds),
              flush=True)
        figures["throughput"] = await throughput(reactor, directory, args)
    figures["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    if "failover" in figures:
        runs = figures["failover"]["runs"]
        problems = ["kill #{run}: served after {served_s} s (target < {target:g})".format(
            target=SERVED_TARGET_S, **r) for r in runs if r["served_s"] >= SERVED_TARGET_S]
        problems += ["kill #{run}: {handshakes_redone} handshakes redone".format(**r)
                     for r in runs if r["handshakes_redone"]]
        problems += ["kill #{run}: {failed} packets failed verification".format(**r)
                     for r in runs if r["failed"]]
        if problems:
            raise BenchFailure("; ".join(problems), figures)
    return figures


def run(args):
    check_server(args.db)
    return run_in_directory("failover", bench, args)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return _common.bench_main("failover", run, args, (BenchFailure, RuntimeError))


if __name__ == "__main__":
    sys.exit(main())
