"""
Log observers for ``twistd --logger``.

``twistd --logger perc.logs.json perc-kd ...`` writes each log event as one
line of JSON on standard output, in twisted.logger's own JSON form
(:func:`twisted.logger.eventAsJSON`: ``log_level``, ``log_namespace``,
``log_time``, ``log_format`` and the event's named fields), so
``twisted.logger.eventsFromJSONLogFile`` reads it back.  The minimum level
is ``PERC_LOG_LEVEL`` (debug, info, warn, error or critical; default info).

``twistd --logger perc.logs.text perc-kd ...`` writes the same lines as
twistd's default text log (``textFileLogObserver``), with the same minimum
level, through :func:`classic_text`: Twisted's formatter costs tens of
microseconds an event (``string.Formatter``, ``strftime``), a good part of
what a join costs the Key Distributor, while the project's events only use
plain ``{name}`` fields, which are filled in directly.
"""

from __future__ import annotations

import os
import string
import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from twisted.python.compat import ioType
from zope.interface import implementer

__all__ = ["classic_text", "json", "LEVEL_VARIABLE", "minimum_level", "text"]

#: Environment variable holding the lowest level written.
LEVEL_VARIABLE = "PERC_LOG_LEVEL"


def minimum_level(environ=None) -> LogLevel:
    """The level named by ``PERC_LOG_LEVEL`` (default info); SystemExit (one line) if it names none."""
    environ = os.environ if environ is None else environ
    name = environ.get(LEVEL_VARIABLE, "").strip().lower() or "info"
    try:
        return LogLevel.levelWithName(name)
    except InvalidLogLevelError:
        raise SystemExit("perc.logs: {}={!r} is not a log level (one of: {})".format(
            LEVEL_VARIABLE, name, ", ".join(level.name for level in LogLevel.iterconstants())))


def json(out=None, environ=None) -> ILogObserver:
    """
    The ``--logger`` factory: JSON lines on ``out`` (default: standard
    output as it is when twistd calls this, before it redirects
    ``sys.stdout`` into the log), events below :func:`minimum_level` dropped.
    """
    level = minimum_level(environ)
    observer = jsonFileLogObserver(sys.stdout if out is None else out, recordSeparator="")
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def text(out=None, environ=None) -> ILogObserver:
    """
    The ``--logger`` factory of twistd's own text lines, made by
    :func:`classic_text`, on ``out`` (default: standard output as twistd
    leaves it), events below :func:`minimum_level` dropped.
    """
    return _TextObserver(sys.stdout if out is None else out, minimum_level(environ))


@implementer(ILogObserver)
class _TextObserver:
    """
    What ``FilteringLogObserver(FileLogObserver(out, classic_text),
    [LogLevelFilterPredicate(level)])`` does, in one call: an event without
    a level or a namespace, or below ``level``, is dropped; the others are
    written and flushed at once.  The three of Twisted's cost the Key
    Distributor as much per join as the formatting itself (a predicate that
    splits the namespace for levels nobody sets per namespace, and two more
    calls), run cold between two handshakes.
    """

    def __init__(self, out, level: LogLevel) -> None:
        self._levels = frozenset(
            candidate for candidate in LogLevel.iterconstants() if not candidate < level)
        self._out = out
        # As FileLogObserver: a file opened for bytes gets UTF-8.
        self._encoding = None if ioType(out) is str else "utf-8"

    def __call__(self, event: dict) -> None:
        if event.get("log_level") not in self._levels or not event.get("log_namespace"):
            return
        line = classic_text(event)
        if line:
            out = self._out
            out.write(line if self._encoding is None else line.encode(self._encoding))
            out.flush()


_parser = string.Formatter()
#: log_format -> its pieces, (literal text, field name or None), when every
#: field is a plain name; None when one is not (Twisted formats the event).
_templates: dict[str, tuple | None] = {}
_TEMPLATES_LIMIT = 1024
#: (log_namespace, log_level) -> "[namespace#level] ".
_systems: dict = {}
#: The timestamp of the latest second an event was formatted in.
_second: list = [None, ""]


def _template(log_format: str):
    try:
        return _templates[log_format]
    except KeyError:
        pass
    pieces: tuple | None
    try:
        parsed = list(_parser.parse(log_format))
    except ValueError:
        parsed = None
    if parsed is None or any(name is not None and (not name.isidentifier() or spec or conversion)
                             for _, name, spec, conversion in parsed):
        pieces = None  # attributes, indexes, calls, specs, !r: Twisted's job
    else:
        pieces = tuple((literal, name) for literal, name, _, _ in parsed)
    if len(_templates) < _TEMPLATES_LIMIT:
        _templates[log_format] = pieces
    return pieces


def _timestamp(when: float) -> str:
    second = int(when)
    if when - second >= 0.999999:
        # fromtimestamp() may round this one up to the next second.
        return formatTime(when)
    if _second[0] != second:
        _second[0], _second[1] = second, formatTime(second)
    return _second[1]


def classic_text(event: dict) -> str | None:
    """
    What :func:`twisted.logger.formatEventAsClassicLogText` makes of
    ``event`` (with its RFC 3339 timestamps), the same text: filled in here
    when it has a ``log_format`` whose fields are all plain names it holds
    and no failure, ``log_system`` or flattened fields; by Twisted
    otherwise.
    """
    log_format = event.get("log_format")
    when = event.get("log_time")
    if (not isinstance(log_format, str) or not isinstance(when, float) or when < 0
            or "log_failure" in event or "log_system" in event or "log_flattened" in event):
        return formatEventAsClassicLogText(event)
    pieces = _template(log_format)
    if pieces is None:
        return formatEventAsClassicLogText(event)
    try:
        parts = []
        for literal, name in pieces:
            parts.append(literal)
            if name is not None:
                parts.append(format(event[name], ""))
        message = "".join(parts)
    except Exception:
        # A missing field or a value that does not format: Twisted's text.
        return formatEventAsClassicLogText(event)
    if not message:
        return None
    key = (event.get("log_namespace", "-"), event.get("log_level"))
    system = _systems.get(key)
    if system is None:
        level = key[1]
        system = "[{}#{}] ".format(key[0], "-" if level is None else level.name)
        if len(_systems) < _TEMPLATES_LIMIT:
            _systems[key] = system
    return (_timestamp(when) + " " + system + message).replace("\n", "\n\t") + "\n"
