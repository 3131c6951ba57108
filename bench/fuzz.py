"""
perc bench fuzz: run the tunnel fuzz targets (perc.fuzz) for a while.

Prints executions per target and, as its last line, a JSON object.  Exits
non-zero, printing the input's seed, at the first failure.
"""

import argparse
import json
import random
import sys
import time

from perc import fuzz


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    counts = {"key_distributor": 0, "media_distributor": 0}
    targets = {"key_distributor": fuzz.key_distributor_target,
               "media_distributor": fuzz.media_distributor_target}
    start = time.monotonic()
    first_seed = seed
    while time.monotonic() - start < args.seconds:
        rng = random.Random(seed)
        data = fuzz.random_stream(rng) if seed % 4 else rng.randbytes(rng.randrange(600))
        for name, target in targets.items():
            try:
                target(data, seed)
            except Exception as error:  # any escape is the finding
                print("FAILURE in {} target, seed {}: {!r}".format(name, seed, error))
                print(json.dumps({"ok": False, "target": name, "seed": seed}))
                return 1
            counts[name] += 1
        seed += 1
    elapsed = time.monotonic() - start
    print("{:<20} {:>12} {:>10}".format("target", "executions", "per s"))
    for name, count in counts.items():
        print("{:<20} {:>12} {:>10.0f}".format(name, count, count / elapsed))
    print(json.dumps({"ok": True, "seconds": round(elapsed, 1), "first_seed": first_seed,
                      "executions": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
