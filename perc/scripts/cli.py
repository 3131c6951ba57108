"""
The ``perc`` command: everything that is not a daemon (development PKI,
registration, reference endpoint, demo, benchmarks).

Each subcommand is a ``usage.Options`` subclass with a ``run()`` method that
returns the process exit status.  Errors a user can act on are raised as
:class:`perc.errors.ConfigError` and shown as one line.
"""

import sys

from twisted.python import usage

from perc.errors import ConfigError
from perc.options import CommandOptions


class PercOptions(CommandOptions):
    synopsis = "Usage: perc <command> [options]"
    longdesc = "Tools for the PERC key-exchange tunnel. Run 'perc <command> --help' for details."

    # Filled from the modules that implement the commands, so that this file
    # only dispatches.
    subCommands: list = []

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


def _load_subcommands():
    from perc.scripts.bench import BenchOptions
    from perc.scripts.demo import DemoOptions
    from perc.scripts.endpoint import EndpointOptions
    from perc.scripts.pki import PkiOptions
    from perc.scripts.register import RegisterOptions

    return [
        ["bench", None, BenchOptions, "Run a benchmark from bench/ (forward, handshake, ...)"],
        ["demo", None, DemoOptions, "Run a whole PERC conference on loopback and prove it works"],
        ["endpoint", None, EndpointOptions, "Run a reference endpoint through a Media Distributor"],
        ["pki", None, PkiOptions, "Development PKI: CA, distributor and endpoint certificates"],
        ["register", None, RegisterOptions, "Register an endpoint (tls-id, fingerprint) in a conference"],
    ]


def main(argv=None):
    """Entry point of the ``perc`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    PercOptions.subCommands = _load_subcommands()
    config = PercOptions()
    try:
        config.parseOptions(argv)
    except usage.UsageError as error:
        sub = config.subOptions if getattr(config, "subOptions", None) else config
        print(sub, file=sys.stderr)
        print("perc: error: {}".format(error), file=sys.stderr)
        return 2
    try:
        return config.subOptions.run() or 0
    except ConfigError as error:
        print("perc {}: {}".format(config.subCommand, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
