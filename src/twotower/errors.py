"""The exceptions twotower raises for problems a user can fix.

Each message names the file, line, column, field or key at fault and what was
expected, so that the command line can print it instead of a traceback.
"""


class TwoTowerError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(TwoTowerError, ValueError):
    """A configuration key or value is unknown or of the wrong type."""


class DataError(TwoTowerError, ValueError):
    """A data file or table is missing, malformed or inconsistent."""
