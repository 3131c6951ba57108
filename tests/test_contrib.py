"""
The deployment files under contrib/: the systemd units (checked with
``systemd-analyze verify`` where it is installed, their twistd command line
parsed by the daemons' own options) and the Grafana dashboard (valid JSON
whose queries name only the metrics the daemons export).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from perc import __version__
from perc.kd import tap as kd_tap
from perc.md import tap as md_tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")
UNITS = {"perc-kd": kd_tap.Options, "perc-md": md_tap.Options}
#: Where the units expect perc's virtual environment.
INSTALLED_TWISTD = "/opt/perc/bin/twistd"

HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictSUIDSGID": "yes",
}


def unit_text(name: str) -> str:
    with open(os.path.join(CONTRIB, "systemd", name + ".service"), encoding="utf-8") as f:
        return f.read()


def directives(text: str) -> dict:
    """``Key`` -> list of values, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found: dict = {}
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


class SystemdUnitTests(SynchronousTestCase):
    def test_units_verify(self):
        """``systemd-analyze verify`` accepts both units without a warning."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (apt-get install systemd)")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = []
        for name in UNITS:
            path = os.path.join(directory, name + ".service")
            # verify checks that ExecStart's program exists: this test's own.
            with open(path, "w", encoding="utf-8") as f:
                f.write(unit_text(name).replace(INSTALLED_TWISTD, twistd))
            paths.append(path)
        result = subprocess.run([analyze, "verify", *paths], check=False, capture_output=True, text=True,
                                timeout=120, cwd=directory)
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_units_run_twistd_in_the_foreground_as_perc_with_hardening(self):
        for name in UNITS:
            found = directives(unit_text(name))
            command = shlex.split(found["ExecStart"][0])
            self.assertEqual(command[:4], [INSTALLED_TWISTD, "-n", "--pidfile=", name])
            self.assertEqual(found["User"], ["perc"])
            self.assertEqual(found["Restart"], ["on-failure"])
            self.assertEqual(found["ExecReload"], ["/bin/kill -HUP $MAINPID"])
            self.assertEqual(found["StateDirectory"], [name])
            self.assertEqual(found["ConfigurationDirectory"], [name])
            for key, value in HARDENING.items():
                self.assertEqual(found.get(key), [value], (name, key))

    def test_unit_options_parse(self):
        """The daemon options in each ExecStart are ones the daemon accepts."""
        for name, options in UNITS.items():
            command = shlex.split(directives(unit_text(name))["ExecStart"][0])
            options().parseOptions(command[4:])

    def test_sysusers_creates_the_user(self):
        with open(os.path.join(CONTRIB, "systemd", "perc.sysusers.conf"), encoding="utf-8") as f:
            lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
        self.assertEqual([line[:2] for line in lines], [["u", "perc"]])


#: The metrics the daemons export at /metrics; histogram series get their suffixes.
METRICS = {
    "perc_md_forwarded_packets_total", "perc_md_dropped_packets_total", "perc_md_endpoints",
    "perc_md_tunnels_up", "perc_md_conferences",
    "perc_kd_associations", "perc_kd_handshakes_total", "perc_kd_tunnels_up",
    "perc_kd_rekeys_total",
}
HISTOGRAMS = {"perc_kd_handshake_seconds"}
SERIES = METRICS | {name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset"}


def metric_names(expression: str) -> set:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)   # strings
    text = re.sub(r"\{[^}]*\}", "", text)                  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                 # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group() in PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(match.group())
    return names


def expressions(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


class GrafanaDashboardTests(SynchronousTestCase):
    def dashboard(self):
        with open(os.path.join(CONTRIB, "grafana", "perc-dashboard.json"), encoding="utf-8") as f:
            return json.load(f)

    def test_expressions_name_only_exported_metrics(self):
        named = set()
        for expression in expressions(self.dashboard()):
            names = metric_names(expression)
            self.assertTrue(names, expression)
            self.assertLessEqual(names, SERIES, expression)
            named |= names
        # Every metric has a panel.
        self.assertEqual({name for name in named if name in METRICS} | (
            HISTOGRAMS if named & (SERIES - METRICS) else set()), METRICS | HISTOGRAMS)

    def test_metric_names_finds_a_stray_name(self):
        self.assertEqual(metric_names(
            'histogram_quantile(0.9, sum by (le) (rate(perc_kd_handshake_seconds_bucket'
            '{instance=~"$instance", result="a b"}[5m]))) / perc_md_tunnel_up'),
            {"perc_kd_handshake_seconds_bucket", "perc_md_tunnel_up"})

    def test_panels_have_unique_ids_and_a_datasource_variable(self):
        dashboard = self.dashboard()
        ids = [panel["id"] for panel in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        variables = {variable["name"] for variable in dashboard["templating"]["list"]}
        self.assertLessEqual({"datasource", "instance"}, variables)


class PackageFilesTests(SynchronousTestCase):
    def test_license_changelog_and_py_typed(self):
        with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
            license_text = f.read()
        self.assertTrue(license_text.startswith("MIT License\n\nCopyright (c) 2026 the perc developers"))
        with open(os.path.join(ROOT, "CHANGELOG.rst"), encoding="utf-8") as f:
            self.assertIn("0.1.0", f.read())
        self.assertTrue(os.path.isfile(os.path.join(ROOT, "perc", "py.typed")))

    def test_setup_single_sources_the_version_and_ships_py_typed(self):
        """setup.py's own metadata, as setuptools computes it."""
        script = textwrap.dedent("""
            import sys, setuptools
            captured = {}
            setuptools.setup = lambda **kwargs: captured.update(kwargs)
            sys.argv = ["setup.py"]
            exec(compile(open("setup.py").read(), "setup.py", "exec"))
            print(captured["version"], captured["package_data"]["perc"], captured["license"])
        """)
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False, capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), [__version__, "['py.typed']", "MIT"])
