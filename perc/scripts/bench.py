"""
``perc bench NAME [ARGS...]``: run one of the benchmarks kept in the
checkout's ``bench/`` directory (they are not installed; they measure the
installed code).
"""

from __future__ import annotations

import os
import subprocess
import sys


import perc
from perc.errors import ConfigError
from perc.options import CommandOptions

__all__ = ["BenchOptions", "bench_directory"]


def bench_directory() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(perc.__file__))),
                        "bench")


def available() -> list[str]:
    directory = bench_directory()
    if not os.path.isdir(directory):
        return []
    return sorted(name[:-3] for name in os.listdir(directory)
                  if name.endswith(".py") and not name.startswith("_"))


class BenchOptions(CommandOptions):
    synopsis = "NAME [ARGS...]"

    @property
    def longdesc(self):
        names = available()
        return ("Run a benchmark from bench/ (each prints a table and, as its last line, one "
                "JSON object with the figures). Available: {}. 'perc bench NAME --help' shows "
                "a benchmark's own options.".format(", ".join(names) or "none found"))

    def parseArgs(self, name, *args):
        self["name"] = name
        self["args"] = list(args)

    def parseOptions(self, options=None):
        # Everything after NAME belongs to the benchmark, including --help.
        if options and options[0] not in ("--help", "-h", "--version"):
            self.parseArgs(*options)
            return
        super().parseOptions(options)

    def run(self):
        names = available()
        if self["name"] not in names:
            if not names:
                raise ConfigError("unknown benchmark {!r}: no benchmarks found in {} (they live "
                                  "in the bench/ directory of a source checkout)".format(
                                      self["name"], bench_directory()))
            raise ConfigError("unknown benchmark {!r}; available: {}".format(
                self["name"], ", ".join(names)))
        script = os.path.join(bench_directory(), self["name"] + ".py")
        return subprocess.call([sys.executable, script] + self["args"])
