"""
``perc.logs.json``: twisted.logger's JSON, one event a line, with a minimum
level; no key material in it after a real handshake, EKT and rekey; and
``twistd --logger perc.logs.json perc-kd`` end to end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import uuid

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from perc import dtls, logs, pki, wire
from perc.dtls import records
from tests import test_kd
from tests.daemonhelpers import TWISTD, DaemonOutput
from tests.kdhelpers import MediaDistributorStandIn, relay_handshake


def encodings(secret: bytes) -> list[str]:
    """Every way a secret could be written into a JSON log line."""
    forms = [secret.hex(), secret.hex().upper(), repr(secret),
             base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode(),
             base64.b64encode(secret).decode().rstrip("="),
             base64.urlsafe_b64encode(secret).decode().rstrip("="),
             json.dumps(secret.decode("latin-1"))[1:-1]]
    return forms + [json.dumps(form)[1:-1] for form in forms]


class JsonObserverTests(SynchronousTestCase):
    def test_one_json_object_per_line_with_named_fields(self):
        out = io.StringIO()
        observer = logs.json(out, environ={})
        log = Logger(namespace="perc.test", observer=observer)
        log.info("Tunnel with {peer} up", peer="md.test")
        log.debug("not at info")
        [line] = out.getvalue().splitlines()
        event = json.loads(line)
        self.assertEqual(event["log_level"]["name"], "info")
        self.assertEqual(event["log_namespace"], "perc.test")
        self.assertEqual(event["peer"], "md.test")
        self.assertIsInstance(event["log_time"], float)

    def test_minimum_level_from_the_environment(self):
        out = io.StringIO()
        log = Logger(namespace="perc.test",
                     observer=logs.json(out, environ={"PERC_LOG_LEVEL": "WARN"}))
        log.info("quiet")
        log.warn("loud")
        log.error("louder")
        self.assertEqual([json.loads(line)["log_format"] for line in out.getvalue().splitlines()],
                         ["loud", "louder"])
        self.assertEqual(logs.minimum_level({"PERC_LOG_LEVEL": "debug"}), LogLevel.debug)
        error = self.assertRaises(SystemExit, logs.json, io.StringIO(),
                                  {"PERC_LOG_LEVEL": "verbose"})
        self.assertIn("PERC_LOG_LEVEL='verbose' is not a log level", str(error))


class NoKeyMaterialTests(test_kd.KeyDistributorTestCase):
    """A real KD handshake, EKTKey, request, rekey and tunnel loss, logged at debug."""

    ekt = True
    ekt_client = test_kd.EktTests.ekt_client
    keys_in = test_kd.EktTests.keys_in
    deliver = test_kd.EktTests.deliver

    def test_no_key_material_in_json_logs(self):
        out = io.StringIO()
        observer = logs.json(out, environ={"PERC_LOG_LEVEL": "debug"})
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        master_secrets = []
        original = records.RecordProtection.from_master_secret.__func__

        def recording(cls, suite, **secrets):
            master_secrets.append(secrets["master_secret"])
            return original(cls, suite, **secrets)
        self.patch(records.RecordProtection, "from_master_secret", classmethod(recording))

        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        client = self.ekt_client()
        events = relay_handshake(md, client, aid, self.clock)
        [done] = [e for e in events if isinstance(e, dtls.HandshakeComplete)]
        [first] = self.keys_in(events)
        for datagram in client.send_application_data(b"\x01").datagrams:
            md.send(wire.TunneledDtls(aid, datagram))
        self.deliver(md, client, aid)
        second, _ = self.successResultOf(self.kd.rekey(test_kd.CONFERENCE))
        self.assertEqual(self.keys_in(self.deliver(md, client, aid)), [second])
        [media_keys] = [m for m in md.log if isinstance(m, wire.MediaKeys)]
        md.close()
        self.clock.advance(3600)

        secrets = [done.keys.client_key, done.keys.server_key, done.keys.client_salt,
                   done.keys.server_salt, media_keys.client_key, media_keys.server_key,
                   media_keys.client_salt, media_keys.server_salt]
        for key in (first, second):
            secrets += [key.ekt_key_value, key.srtp_master_salt]
        secrets += master_secrets
        self.assertTrue(master_secrets)
        self.assertTrue(all(len(secret) >= 8 for secret in secrets))
        text = out.getvalue()
        lines = text.splitlines()
        self.assertGreater(len(lines), 3)
        formats = " ".join(json.loads(line).get("log_format", "") for line in lines)
        self.assertIn("Tunnel", formats)  # the tunnel, handshake and rekey were logged
        for secret in secrets:
            for form in encodings(secret):
                self.assertNotIn(form, text, "a secret appears in the JSON log")


class TwistdJsonLoggerTests(SynchronousTestCase):
    """``twistd --logger perc.logs.json perc-kd``: a real daemon's standard output."""

    def run_daemon(self, *extra_env):
        directory = os.path.abspath(self.mktemp())
        dev = pki.create_dev_pki(os.path.join(directory, "pki"))
        env = dict(os.environ, **dict(extra_env))
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "--logger", "perc.logs.json", "perc-kd",
                      "--pki", dev.directory, "--api", "none", "--allow-missing-tls-id",
                      "--tunnel-listen", "tcp:0:interface=127.0.0.1"],
            cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        output = DaemonOutput(process)
        self.addCleanup(output.stop)
        return process, output

    def stop(self, process, output) -> list:
        process.send_signal(signal.SIGTERM)
        lines = output.rest()
        process.wait(timeout=30)
        self.assertEqual(process.stderr.read(), b"")
        process.stderr.close()
        return [json.loads(line) for line in lines]

    def test_json_lines_on_standard_output(self):
        process, output = self.run_daemon()
        output.wait_for("Key Distributor ready")
        events = self.stop(process, output)
        for event in events:
            self.assertIn("log_namespace", event)
            self.assertIn("log_time", event)
            self.assertIn(event["log_level"]["name"], ("debug", "info", "warn", "error", "critical"))
        [ready] = [e for e in events if e.get("log_format", "").startswith("Key Distributor ready")]
        self.assertEqual(ready["log_namespace"], "perc.kd.service.KeyDistributorService")
        self.assertEqual(ready["profiles"].split(",")[0], "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM")

    def test_minimum_level(self):
        process, output = self.run_daemon(("PERC_LOG_LEVEL", "warn"))
        output.wait_for("--allow-missing-tls-id is on")
        events = self.stop(process, output)
        self.assertTrue(events)
        self.assertEqual({event["log_level"]["name"] for event in events}, {"warn"})


class ClassicTextTests(test_kd.KeyDistributorTestCase):
    """
    perc.logs.classic_text: the text of Twisted's formatEventAsClassicLogText,
    character for character, for the Key Distributor's own events and for
    events it leaves to Twisted.
    """

    ekt = True
    ekt_client = test_kd.EktTests.ekt_client

    def assertSameText(self, event):
        self.assertEqual(logs.classic_text(event), formatEventAsClassicLogText(event))

    def test_key_distributor_events(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        md = MediaDistributorStandIn(self.kd)
        aid = uuid.uuid4()
        relay_handshake(md, self.ekt_client(), aid, self.clock)
        md.send(wire.EndpointDisconnect(aid))
        md.close()
        formats = {event["log_format"] for event in events}
        self.assertTrue(any(f.startswith("Association {association_id} accepted") for f in formats))
        self.assertTrue(any(f.startswith("Tunnel with {peer} up") for f in formats))
        for event in events:
            self.assertSameText(event)
        [accepted] = [e for e in events if e["log_format"].startswith("Association {association_id} acc")]
        self.assertIsNotNone(logs._template(accepted["log_format"]))

    def test_fields_twisted_formats_itself(self):
        log = Logger(namespace="perc.test", observer=self.assertSameText)
        log.info("repr {value!r} spec {value:>8} attribute {value.real} call {call()}",
                 value=3, call=lambda: "called")
        log.info("index {mapping[key]} positional {} and {0}", mapping={"key": 1})
        log.info("missing {nowhere}")
        log.info("newline {text}", text="one\ntwo")
        log.info("")
        log.info("unbalanced {")
        log.info("plain {n} {n}", n=uuid.UUID(int=7), log_system="system")
        log.failure("failed {n}", Failure(ValueError("x")), n=1)
        self.assertSameText({"log_format": b"bytes {n}", "n": 1, "log_time": 1.5})
        self.assertSameText({"log_format": "no time {n}", "n": 1})
        self.assertSameText({"log_format": "no level {n}", "n": 1, "log_time": 2.25})

    def test_timestamps_at_second_boundaries(self):
        for when in (1700000000.0, 1700000000.4999999, 1700000000.9999994,
                     1700000000.9999996, 1700000000.99999999, 1700000001.0000001, 0.0):
            self.assertSameText({"log_format": "at {when}", "when": when, "log_time": when,
                                 "log_level": LogLevel.info, "log_namespace": "perc.test"})

    def test_text_observer_level(self):
        out = io.StringIO()
        log = Logger(namespace="perc.test",
                     observer=logs.text(out, environ={"PERC_LOG_LEVEL": "warn"}))
        log.info("quiet {n}", n=1)
        log.warn("loud {n}", n=2)
        [line] = out.getvalue().splitlines()
        self.assertTrue(line.endswith(" [perc.test#warn] loud 2"), line)

    def test_text_observer_is_twisteds_filter_and_file_observer(self):
        """
        logs.text writes what FilteringLogObserver(FileLogObserver(out,
        classic_text), [LogLevelFilterPredicate(level)]) writes, to text and
        to bytes files: events without a level or a namespace, and below the
        level, dropped; the rest one line each.
        """
        events = [
            {"log_format": "plain {n}", "n": 1, "log_time": 1700000000.25,
             "log_level": level, "log_namespace": "perc.test"}
            for level in LogLevel.iterconstants()
        ] + [
            {"log_format": "no level {n}", "n": 1, "log_time": 1.5, "log_namespace": "perc.t"},
            {"log_format": "no namespace {n}", "n": 1, "log_time": 1.5,
             "log_level": LogLevel.error},
            {"log_format": "empty namespace", "log_time": 1.5, "log_level": LogLevel.error,
             "log_namespace": ""},
            {"log_format": "", "log_time": 1.5, "log_level": LogLevel.error,
             "log_namespace": "perc.test"},
            {"log_format": "unicode {n}", "n": "\u00e9\n\u2603", "log_time": 1.5,
             "log_level": LogLevel.critical, "log_namespace": "a.b.c"},
        ]
        for name in ("debug", "info", "warn", "error", "critical"):
            environ = {"PERC_LOG_LEVEL": name}
            for make in (io.StringIO, io.BytesIO):
                ours, theirs = make(), make()
                observer = logs.text(ours, environ=environ)
                reference = FilteringLogObserver(
                    FileLogObserver(theirs, logs.classic_text),
                    [LogLevelFilterPredicate(defaultLogLevel=logs.minimum_level(environ))])
                for event in events:
                    observer(dict(event))
                    reference(dict(event))
                self.assertEqual(ours.getvalue(), theirs.getvalue())
                self.assertTrue(ours.getvalue())
