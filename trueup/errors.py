"""trueup's error hierarchy.

Driver errors (psycopg, confluent-kafka, pika) are translated at the edge into these, raised
``from`` the original, with a message a user can act on. The CLI prints ``str(error)`` as one
line and exits with status 2; it never shows a traceback for a :class:`TrueupError`.
"""

from __future__ import annotations


class TrueupError(Exception):
    """Base class of every error trueup reports to a user."""

    exit_status = 2


class ConfigError(TrueupError):
    """A bad value in the config file: names the file, the field path and what is expected."""

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file = file
        self.path = path
        self.message = message
        super().__init__(f"{file}: {path}: {message}" if path else f"{file}: {message}")


class ConfigErrors(TrueupError):
    """Several :class:`ConfigError` found in one pass; each prints on its own line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class UsageError(TrueupError):
    """A bad command-line argument."""


class ConnectionFailed(TrueupError):
    """A service named in the config could not be reached."""


class StateError(TrueupError):
    """trueup's own state database is unreachable or in an unexpected shape."""


class NotFound(TrueupError):
    """A run, backfill, replay or name given by the user does not exist."""


class Conflict(TrueupError):
    """The requested work clashes with work already running (for example an active backfill)."""


class KeysRefused(TrueupError):
    """A target holds a key value its source's key type cannot hold (a text key ``'abc'``
    against a bigint source), so the two cannot be compared in one key order."""
