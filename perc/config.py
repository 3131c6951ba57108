"""
``--config FILE``: a TOML file of a daemon's options, for ``usage.Options``.

Mix :class:`ConfigFileOptions` into an ``Options`` class (before
``usage.Options``) and every long option it has, now or later, can be set
in the file under its own name: parameters as a string or number
(``tunnel-listen = "tcp:4740"``, ``media-port = 5004``), flags as booleans,
options with an ``opt_`` method that takes a value as a string or an array
of strings (``kd = ["tcp:kd1:4740", "tcp:kd2:4740"]``).  Each value goes
through the same coercer or ``opt_`` method as on the command line.

The command line wins: an option given there replaces the file's value
(for a repeatable option, all of the file's values).  A file that cannot
be read or parsed, an unknown key and a bad value each raise one
:class:`ConfigFileError` line naming the file and the key.  Relative paths
inside the file are taken from the current directory, as on the command
line.
"""

from __future__ import annotations

import getopt
import sys
import tomllib

from twisted.python import reflect, usage

__all__ = ["ConfigFileError", "ConfigFileOptions", "load_config_file"]

#: Options that act on the command line itself, not settings a file can hold.
_NOT_SETTINGS = frozenset({"config", "help", "version"})


class ConfigFileError(usage.UsageError):
    """One line naming the ``--config`` file and, where there is one, the key."""


def load_config_file(path: str) -> dict:
    """The TOML table in ``path``; ConfigFileError (one line) if unreadable or invalid."""
    try:
        with open(path, "rb") as source:
            return tomllib.load(source)
    except FileNotFoundError:
        raise ConfigFileError("--config {}: no such file".format(path)) from None
    except OSError as error:
        raise ConfigFileError("--config {}: cannot read: {}".format(
            path, error.strerror or error)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError("--config {}: not valid TOML: {}".format(
            path, str(error).splitlines()[0])) from None
    except UnicodeDecodeError:
        raise ConfigFileError("--config {}: not valid TOML: not UTF-8 text".format(path)) from None


class ConfigFileOptions:
    """
    ``usage.Options`` mixin adding ``--config FILE`` (see the module
    docstring).  The file is applied before the command line is parsed.
    """

    optParameters = [
        ["config", None, None,
         "TOML file of options, by their long names (e.g. tunnel-listen = \"tcp:4740\"; "
         "flags as true/false, repeatable options as arrays); the command line overrides it."],
    ]

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        given = self._commandLineOptions(options)
        path = given.get("config")
        if path is not None:
            self._applyConfigFile(path, load_config_file(path), set(given))
        super().parseOptions(options)

    def _commandLineOptions(self, options) -> dict:
        """Canonical name -> last value of each option given in ``options``."""
        try:
            parsed, _ = getopt.getopt(list(options), self.shortOpt, self.longOpt)
        except getopt.error:
            return {}  # the real parse reports it
        given = {}
        for option, value in parsed:
            name = option[2:] if option.startswith("--") else option[1:]
            name = self.synonyms.get(name, self.synonyms.get(name.replace("-", "_"), name))
            given[name] = value
        return given

    def _applyConfigFile(self, path: str, table: dict, overridden: set) -> None:
        for key, value in table.items():
            name = self.synonyms.get(key) if isinstance(key, str) else None
            if key in _NOT_SETTINGS:
                raise ConfigFileError("--config {}: {!r} is not a setting a file can hold".format(
                    path, key))
            if name is None or name != key:
                # Only long names: a short option or alias in a file is a typo waiting to happen.
                raise ConfigFileError("--config {}: unknown key {!r} (no such option --{})".format(
                    path, key, key))
            if name in overridden:
                continue
            for item in self._configValues(path, key, value):
                try:
                    dispatch = self._dispatch[name]
                    if isinstance(dispatch, usage.CoerceParameter):
                        dispatch.dispatch(name, item)
                    else:
                        dispatch(name, item)
                except (usage.UsageError, ValueError, TypeError) as error:
                    message = str(error).removeprefix("Parameter type enforcement failed: ")
                    raise ConfigFileError("--config {}: {} = {}: {}".format(
                        path, key, _toml(value), message)) from None

    def _configValues(self, path: str, key: str, value) -> list:
        """The command-line argument(s) ``value`` stands for (None for a flag that is on)."""
        def bad(expected):
            return ConfigFileError("--config {}: {} = {}: must be {}".format(
                path, key, _toml(value), expected))

        if key in self._flagNames():
            if not isinstance(value, bool):
                raise bad("true or false")
            return [None] if value else []
        repeatable = not isinstance(self._dispatch[key], usage.CoerceParameter)
        items = value if repeatable and isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise bad("a string or an array of strings" if repeatable else "a string or a number")
        return [str(item) for item in items]

    def _flagNames(self) -> set:
        """Long names of the options that take no value."""
        flags: list = []
        reflect.accumulateClassList(self.__class__, "optFlags", flags)
        names = {flag[0] for flag in flags}
        methods: dict = {}
        reflect.addMethodNamesToDict(self.__class__, methods, "opt_")
        names.update(name.replace("_", "-") for name in methods
                     if usage.flagFunction(getattr(self, "opt_" + name)))
        return names


def _toml(value) -> str:
    """``value`` as the file wrote it, near enough for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"{}"'.format(value)
    if isinstance(value, list):
        return "[{}]".format(", ".join(_toml(item) for item in value))
    return str(value)
