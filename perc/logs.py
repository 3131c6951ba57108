"""
Log observers for ``twistd --logger``.

``twistd --logger perc.logs.json perc-kd ...`` writes each log event as one
line of JSON on standard output, in twisted.logger's own JSON form
(:func:`twisted.logger.eventAsJSON`: ``log_level``, ``log_namespace``,
``log_time``, ``log_format`` and the event's named fields), so
``twisted.logger.eventsFromJSONLogFile`` reads it back.  The minimum level
is ``PERC_LOG_LEVEL`` (debug, info, warn, error or critical; default info).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
)

__all__ = ["json", "LEVEL_VARIABLE", "minimum_level"]

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
