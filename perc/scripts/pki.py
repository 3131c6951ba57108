"""
``perc pki``: the development PKI from the command line.

``perc pki init DIR`` makes a CA and certificates for a Key Distributor and a
Media Distributor; ``perc pki endpoint DIR`` makes a self-signed endpoint
certificate and prints its fingerprint.  The work is done by
:mod:`perc.pki`; this module only parses options and reports.
"""

from __future__ import annotations

import getopt
import os
import sys

from twisted.python import usage

from perc import pki
from perc.options import CommandOptions


def _days(value: str) -> int:
    days = int(value)
    if days < 1:
        raise ValueError("must be at least 1")
    return days


_days.coerceDoc = "A whole number of days, at least 1."  # type: ignore[attr-defined]


class _InterspersedOptions(CommandOptions):
    """
    Options that may also follow the positional arguments, as in
    ``perc pki init DIR --force``.  ``usage.Options`` stops at the first
    positional argument (POSIX getopt); this puts the options first.
    """

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        if "--_shell-completion" in options:
            return super().parseOptions(options)
        try:
            opts, args = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as error:
            raise usage.UsageError(str(error))
        ordered = []
        for opt, value in opts:
            if opt.startswith("--"):
                # gnu_getopt has expanded abbreviations to the full name.
                ordered.append(opt + "=" + value if opt[2:] + "=" in self.longOpt else opt)
            else:
                ordered.append(opt)
                if opt[1] + ":" in self.shortOpt:
                    ordered.append(value)
        return super().parseOptions(ordered + ["--"] + args)


class InitOptions(_InterspersedOptions):
    synopsis = "DIR [--kd-name NAME ...] [--md-name NAME ...] [--days N] [--force]"
    longdesc = (
        "Create a development PKI in DIR (created if missing): ca.pem/ca.key "
        "(the CA), kd.pem/kd.key (Key Distributor) and md.pem/md.key (Media "
        "Distributor).  ECDSA P-256; each distributor certificate names "
        "localhost and 127.0.0.1 plus the names given, and may serve as TLS "
        "server or client.  Private keys are created with mode 0600.  Existing "
        "files are never replaced without --force."
    )

    optFlags = [
        ["force", "f", "Replace existing files."],
    ]
    optParameters = [
        ["days", None, pki.DEFAULT_DEV_DAYS, "Validity of every certificate, in days.", _days],
    ]

    def __init__(self):
        super().__init__()
        self["kd_names"] = []
        self["md_names"] = []

    def opt_kd_name(self, name):
        """Another DNS name or IP address for the Key Distributor certificate (repeatable)."""
        self["kd_names"].append(name)

    def opt_md_name(self, name):
        """Another DNS name or IP address for the Media Distributor certificate (repeatable)."""
        self["md_names"].append(name)

    def parseArgs(self, directory):
        self["directory"] = directory

    def run(self) -> int:
        paths = pki.create_dev_pki(
            self["directory"],
            kd_names=self["kd_names"],
            md_names=self["md_names"],
            days=self["days"],
            force=self["force"],
        )
        kd = ", ".join(self["kd_names"] + list(pki.DEFAULT_SUBJECT_ALT_NAMES))
        md = ", ".join(self["md_names"] + list(pki.DEFAULT_SUBJECT_ALT_NAMES))
        print("Created a development PKI in {} (valid {} days):".format(
            os.path.abspath(paths.directory), self["days"]))
        for path, what in [
            (paths.ca_certificate, "CA certificate (the trust anchor for --ca)"),
            (paths.ca_key, "CA private key (only needed to issue more certificates)"),
            (paths.kd_certificate, "Key Distributor certificate: " + kd),
            (paths.kd_key, "Key Distributor private key"),
            (paths.md_certificate, "Media Distributor certificate: " + md),
            (paths.md_key, "Media Distributor private key"),
        ]:
            print("  {}  {}".format(path, what))
        return 0


class EndpointOptions(_InterspersedOptions):
    synopsis = "DIR [--name NAME] [--days N] [--force]"
    longdesc = (
        "Create a self-signed endpoint certificate DIR/NAME.pem and its key "
        "DIR/NAME.key (NAME defaults to 'endpoint'; it is also the common "
        "name).  Endpoints are identified by fingerprint, not by a CA.  The "
        "last line printed is the certificate's fingerprint alone, in "
        "'sha-256 AB:CD:...' form, e.g. for "
        "fp=\"$(perc pki endpoint DIR | tail -n 1)\"."
    )

    optFlags = [
        ["force", "f", "Replace existing files."],
    ]
    optParameters = [
        ["name", "n", pki.DEFAULT_ENDPOINT_NAME, "File-name stem and common name."],
        ["days", None, pki.DEFAULT_ENDPOINT_DAYS, "Validity in days.", _days],
    ]

    def parseArgs(self, directory):
        self["directory"] = directory

    def run(self) -> int:
        files = pki.create_endpoint_certificate(
            self["directory"], name=self["name"], days=self["days"], force=self["force"])
        print("Created {} (self-signed certificate, valid {} days)".format(
            files.certificate, self["days"]))
        print("Created {} (private key)".format(files.key))
        # Last, and alone on its line: scripts take it with tail -n 1.
        print(files.fingerprint)
        return 0


class PkiOptions(CommandOptions):
    synopsis = "<init|endpoint> [options]"
    longdesc = "Development PKI: a CA, distributor certificates, endpoint certificates."

    subCommands = [
        ["init", None, InitOptions,
         "Create a CA and Key/Media Distributor certificates in a directory"],
        ["endpoint", None, EndpointOptions,
         "Create a self-signed endpoint certificate and print its fingerprint"],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("a pki command is required: init or endpoint")

    def run(self) -> int:
        return self.subOptions.run()
