"""
perc bench fuzz: run the fuzz targets of perc.testing.fuzz (a live Key Distributor,
a live Media Distributor) with coverage guidance, then measure the line
coverage their inputs reached.

Per target, one process fuzzes: atheris (libFuzzer, ``pip install
perc[fuzz]``) when it imports, else this file's own loop, which keeps
inputs that reach new lines (a ``sys.settrace`` tracer on perc's modules).
Inputs that found new coverage are kept in a corpus directory; a second
process replays that corpus under ``coverage`` to give the line coverage of
perc/kd/associations.py, the perc/dtls/ package (per module) and
perc/md/relay.py.  The coverage of the fixture alone (its real handshakes,
no input) is given beside it.

Prints a table per target and, as its last line, a JSON object.  Exits
non-zero at the first finding, with the input that found it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
#: Files whose line coverage is reported (paths under the perc package).
MEASURED = ["kd/associations.py", "md/relay.py", "dtls/"]


def _perc_directory():
    import perc
    return os.path.dirname(os.path.abspath(perc.__file__))


def _measured_files():
    root = _perc_directory()
    files = [os.path.join(root, "kd", "associations.py"), os.path.join(root, "md", "relay.py")]
    files += sorted(glob.glob(os.path.join(root, "dtls", "*.py")))
    return files


# -- the fuzzing process ------------------------------------------------------


def _stop_after(executions, seconds, stats_path, counter, engine):
    start = time.monotonic()

    def check(target):
        counter[0] += 1
        if counter[0] % 256 and counter[0] < executions:
            return
        elapsed = time.monotonic() - start
        if counter[0] >= executions or elapsed >= seconds:
            with open(stats_path, "w") as f:
                json.dump({"executions": counter[0], "seconds": elapsed, "engine": engine,
                           "stats": target.stats}, f)
            sys.stdout.flush()
            os._exit(0)
    return check


def _write_finding(corpus, data, error):
    path = os.path.join(corpus, "..", "finding-" + hashlib.sha1(data).hexdigest())
    with open(path, "wb") as f:
        f.write(data)
    print("FINDING: {}\ninput (hex): {}\nsaved as {}".format(error, data.hex(), path), flush=True)


def worker(args):
    try:
        if args.engine == "own":
            raise ImportError("own loop asked for")
        import atheris
    except ImportError:
        atheris = None
    if atheris is not None:
        with atheris.instrument_imports(include=["perc"]):
            for module in ("perc.kd.associations", "perc.kd.tunnel", "perc.md.relay",
                           "perc.md.tunnel", "perc.dtls", "perc.wire", "perc.hello"):
                importlib.import_module(module)
            from perc.testing import fuzz
    else:
        from perc.testing import fuzz
    target = fuzz.TARGETS[args.worker]()
    counter = [0]
    check = _stop_after(args.executions, args.seconds, args.stats, counter,
                        "atheris" if atheris else "own")
    for n, seed in enumerate(fuzz.seed_inputs(seed=args.seed)):
        with open(os.path.join(args.corpus, "seed-{:03d}".format(n)), "wb") as f:
            f.write(seed)

    def one(data):
        try:
            target.run(data)
        except Exception as error:
            _write_finding(args.corpus, data, error)
            raise
        check(target)

    if atheris is not None:
        atheris.Setup([sys.argv[0], args.corpus, "-max_len=512", "-seed={}".format(args.seed),
                       "-print_final_stats=0", "-print_pcs=0"], one)
        atheris.Fuzz()
    else:
        _own_loop(one, args, fuzz)


def _own_loop(one, args, fuzz):
    """Mutate kept inputs; keep those that reach lines of perc not reached before."""
    rng = random.Random(args.seed)
    root = _perc_directory()
    seen: set = set()
    lines: set = set()

    def local(frame, event, arg):
        if event == "line":
            lines.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(root) else None

    corpus = []
    for path in sorted(glob.glob(os.path.join(args.corpus, "*"))):
        with open(path, "rb") as f:
            corpus.append(f.read())
    sys.settrace(tracer)
    while True:
        data = bytearray(rng.choice(corpus)) if corpus and rng.random() < 0.9 else \
            bytearray(rng.randbytes(rng.randrange(1, 64)))
        for _ in range(1 + rng.randrange(4)):
            kind = rng.randrange(4)
            if kind == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 1:
                data[rng.randrange(len(data) + 1):0] = rng.randbytes(1 + rng.randrange(8))
            elif kind == 2 and len(data) > 1:
                del data[rng.randrange(len(data))]
            elif corpus:
                other = rng.choice(corpus)
                data[rng.randrange(len(data) + 1):] = other[rng.randrange(len(other) + 1):]
        data = bytes(data[:512])
        before = len(lines)
        one(data)
        if len(lines) > before:
            key = hashlib.sha1(data).hexdigest()
            if key not in seen:
                seen.add(key)
                corpus.append(data)
                with open(os.path.join(args.corpus, key), "wb") as f:
                    f.write(data)


# -- the coverage process -----------------------------------------------------


def replay(args):
    import coverage
    measured = _measured_files()
    cov = coverage.Coverage(include=measured, data_file=None)
    cov.start()
    from perc.testing import fuzz
    target = fuzz.TARGETS[args.replay]()
    inputs = sorted(glob.glob(os.path.join(args.corpus, "*"))) if not args.fixture_only else []
    for path in inputs:
        with open(path, "rb") as f:
            target.run(f.read())
    cov.stop()
    root = _perc_directory()
    result = {}
    for path in measured:
        _, statements, _, missing, _ = cov.analysis2(path)
        result[os.path.relpath(path, root)] = [len(statements) - len(missing), len(statements)]
    print(json.dumps({"inputs": len(inputs), "coverage": result, "stats": target.stats}))


# -- the parent ---------------------------------------------------------------


def _run(command):
    done = subprocess.run([sys.executable, HERE] + command, capture_output=True, text=True,
                          check=False)
    return done


def _percent(pair):
    return 100.0 * pair[0] / pair[1] if pair[1] else 0.0


def _summarise(coverage):
    dtls = [0, 0]
    rows = {}
    for name, pair in coverage.items():
        rows[name] = pair
        if name.startswith("dtls/"):
            dtls[0] += pair[0]
            dtls[1] += pair[1]
    rows["dtls/ (total)"] = dtls
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="at most this long per target (default 600)")
    parser.add_argument("--executions", type=int, default=10**6,
                        help="stop a target after this many executions (default 10^6)")
    parser.add_argument("--target", choices=("kd", "md", "all"), default="all")
    parser.add_argument("--engine", choices=("auto", "atheris", "own"), default="auto",
                        help="auto: atheris if it imports, else the own loop")
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--corpus", default=None,
                        help="directory for the corpora (default: a temporary one)")
    parser.add_argument("--worker", choices=("kd", "md"), help=argparse.SUPPRESS)
    parser.add_argument("--replay", choices=("kd", "md"), help=argparse.SUPPRESS)
    parser.add_argument("--fixture-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.replay:
        replay(args)
        return 0
    if args.engine == "atheris" and importlib.util.find_spec("atheris") is None:
        parser.error("atheris is not installed (pip install perc[fuzz])")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    base = args.corpus or tempfile.mkdtemp(prefix="perc-fuzz-")
    targets = ("kd", "md") if args.target == "all" else (args.target,)
    report = {"ok": True, "seed": seed, "corpus": base, "targets": {}}
    for name in targets:
        corpus = os.path.join(base, name)
        os.makedirs(corpus, exist_ok=True)
        stats = os.path.join(base, name + "-stats.json")
        done = _run(["--worker", name, "--corpus", corpus, "--stats", stats,
                     "--seconds", str(args.seconds), "--executions", str(args.executions),
                     "--seed", str(seed), "--engine", args.engine])
        if done.returncode != 0 or not os.path.exists(stats):
            print("{} target: FINDING or crash (exit {})".format(name, done.returncode))
            print(done.stdout[-4000:])
            print(done.stderr[-4000:])
            report["ok"] = False
            report["targets"][name] = {"finding": True, "exit": done.returncode}
            print(json.dumps(report))
            return 1
        with open(stats) as f:
            run = json.load(f)
        covered = json.loads(_run(["--replay", name, "--corpus", corpus]).stdout.splitlines()[-1])
        fixture = json.loads(_run(["--replay", name, "--corpus", corpus, "--fixture-only"])
                             .stdout.splitlines()[-1])
        rows, base_rows = _summarise(covered["coverage"]), _summarise(fixture["coverage"])
        rate = run["executions"] / run["seconds"] if run["seconds"] else 0.0
        print("target {} ({}): {:,} executions in {:.1f} s ({:,.0f}/s), corpus {} inputs".format(
            name, run["engine"], run["executions"], run["seconds"], rate, covered["inputs"]))
        print("  {:<28} {:>18} {:>18}".format("line coverage", "fuzzed", "fixture alone"))
        for file, pair in rows.items():
            print("  {:<28} {:>7.1f}% {:>4}/{:<4} {:>7.1f}% {:>4}/{:<4}".format(
                file, _percent(pair), pair[0], pair[1], _percent(base_rows[file]),
                base_rows[file][0], base_rows[file][1]))
        print("  reached: {}".format(", ".join("{} {:,}".format(k, v)
                                               for k, v in run["stats"].items())))
        report["targets"][name] = {
            "engine": run["engine"], "executions": run["executions"],
            "seconds": round(run["seconds"], 1), "per_second": round(rate),
            "corpus": covered["inputs"], "reached": run["stats"],
            "coverage": {k: {"lines": v[0], "of": v[1], "percent": round(_percent(v), 1)}
                         for k, v in rows.items()},
            "coverage_fixture_alone": {k: round(_percent(v), 1) for k, v in base_rows.items()}}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
