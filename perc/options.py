"""
The base of every ``perc`` command's and daemon's options: ``--version``
prints perc's version (``usage.Options`` prints Twisted's), help texts read
as one paragraph however their source is indented, and a subcommand's usage
line names the command as it is typed (``perc pki init DIR``).
"""

from __future__ import annotations

import sys

from twisted.python import usage

from perc import __version__

__all__ = ["CommandOptions"]


class CommandOptions(usage.Options):
    """``usage.Options`` for perc: the root command, its subcommands and the twistd plugins."""

    #: The command's name when it has no parent (the root ``perc`` command).
    command = "perc"

    def __init__(self):
        super().__init__()
        # A multi-line docstring (opt_* methods) keeps its source indentation,
        # which --help would print inside the wrapped paragraph.
        self.docs = {name: " ".join(doc.split()) if isinstance(doc, str) else doc
                     for name, doc in self.docs.items()}

    def opt_version(self):
        """Print perc's version and exit."""
        print("perc", __version__)
        sys.exit(0)

    def commandPath(self) -> str:
        """How the command is typed: ``perc``, ``perc pki``, ``perc pki init``."""
        parent = self.parent
        if isinstance(parent, CommandOptions) and parent.subCommand is not None:
            return f"{parent.commandPath()} {parent.subCommand}"
        return self.command

    def getSynopsis(self) -> str:
        if not isinstance(self.parent, CommandOptions):
            # The root command, or a twistd plugin under twistd's own options.
            return super().getSynopsis()
        synopsis = getattr(self, "synopsis", None) or "[options]"
        return f"Usage: {self.commandPath()} {synopsis.strip()}"
