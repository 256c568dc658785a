"""Postgres connections, with driver errors translated into trueup's errors at the edge."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
from typing import Any

import psycopg
from psycopg.adapt import Dumper, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.rows import dict_row, tuple_row

from trueup.errors import ConnectionFailed

CONNECT_TIMEOUT_SECONDS = 10
#: Session settings every trueup connection runs with. Canonical renderings depend on
#: extra_float_digits (shortest round-trip float text) and TimeZone (a timestamp without time
#: zone reads as UTC wherever it meets a timestamptz, whatever the server's own zone); JIT
#: compiling costs more than it saves on trueup's one-pass scans (measured: a 5M-row checksum
#: pass, 6.9 s with JIT, 4.7 s without). Backfills pipe COPY text from the source server into
#: the target and the state: in UTF-8, dates in ISO, it reads back the same whatever each
#: server's encoding and DateStyle.
SESSION_OPTIONS = ("-c extra_float_digits=1 -c jit=off -c TimeZone=UTC -c DateStyle=ISO "
                   "-c client_encoding=UTF8")
#: A URL's password (``scheme://user:PASSWORD@``, the user possibly empty).
#: A URL's password: from the user's colon to the last ``@`` before the host (an ``@`` written
#: into the password unencoded, which libpq then reads as the host's, is the password's too).
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")
#: A ``password=`` parameter, of a URL's query (``?password=...&``) or of ``key=value`` text
#: (``password='a b'``).
_PARAM_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact(dsn: str) -> str:
    """The DSN (a URL, or anything else a user may have written for one) with its passwords
    replaced by ``***``, safe to print and log."""
    return _PARAM_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", dsn))


def scrubbed(text: str, dsn: str) -> str:
    """``text`` (a driver's message about ``dsn``) without ``dsn``'s password, which libpq
    quotes back in some of its complaints (``unexpected spaces found in "..."``)."""
    passwords: set[str] = set()
    with contextlib.suppress(psycopg.Error):
        passwords.add(str(conninfo_to_dict(dsn).get("password") or ""))
    # as written, too (percent-encoded; or where a DSN libpq cannot parse puts it)
    for pattern in (_URL_PASSWORD, _PARAM_PASSWORD):
        for found in pattern.finditer(dsn):
            written = found.group(0)[len(found.group(1)):].removesuffix("@").strip("'")
            # libpq splits one holding an unencoded @ and quotes the rest as the host's name
            passwords.update([written, *(p for p in written.split("@")[1:] if p)])
    for password in sorted(passwords - {""}, key=len, reverse=True):
        # as a word of its own: a password "x" leaves "unexpected" alone
        text = re.sub(rf"(?<![^\W_]){re.escape(password)}(?![^\W_])", "***", text)
    return text


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connect(dsn: str, *, what: str, autocommit: bool = False,
            application_name: str = "trueup") -> psycopg.Connection[dict[str, Any]]:
    """Open a connection returning dict rows; ``what`` names it in errors (a config path).
    Infinite dates and timestamps load as :class:`Endless`.

    Options the DSN gives (``options=-c statement_timeout=...``) are kept, before trueup's own
    :data:`SESSION_OPTIONS`, which win where both set one."""
    try:
        given = conninfo_to_dict(dsn).get("options")
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            options=f"{given} {SESSION_OPTIONS}" if given else SESSION_OPTIONS,
        )
    except psycopg.Error as exc:
        raise ConnectionFailed(
            f"{what}: cannot connect to {redact(dsn)}: {scrubbed(first_line(exc), dsn)}"
        ) from exc
    for name in ("date", "timestamp", "timestamptz"):
        oid = conn.adapters.types[name].oid
        conn.adapters.register_loader(oid, _endless_loader(conn.adapters.get_loader(
            oid, Format.TEXT)))
    conn.adapters.register_dumper(Endless, _EndlessDumper)
    return conn


@functools.total_ordering
class Endless:
    """An infinite date or timestamp (``infinity``, ``-infinity``), which Python's datetime
    cannot hold: a version, time or key later (earlier) than every finite one, printed as
    Postgres spells it. Without it, one such value failed the whole run."""

    __slots__ = ("later",)

    def __init__(self, later: bool) -> None:
        self.later = later

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endless) and other.later == self.later

    def __hash__(self) -> int:
        return hash((Endless, self.later))

    def __lt__(self, other: object) -> bool:
        if isinstance(other, Endless):
            return other.later and not self.later
        if isinstance(other, dt.date):  # datetimes too
            return not self.later
        return NotImplemented

    def __str__(self) -> str:
        return "infinity" if self.later else "-infinity"

    def __repr__(self) -> str:
        return f"Endless({str(self)!r})"


_ENDLESS = {b"infinity": Endless(later=True), b"-infinity": Endless(later=False)}


def sendable(values: list[Any]) -> list[Any]:
    """``values`` (keys, key bounds) as a list parameter: as they are or, when one is an
    :class:`Endless`, all as their text, which the query's cast reads back (psycopg sends a
    list of one type only, and an ``Endless`` stands for a date or either timestamp)."""
    if not any(isinstance(v, Endless) for v in values):
        return values
    return [None if v is None else str(v) for v in values]


class _EndlessDumper(Dumper):
    """An :class:`Endless` parameter (a key range's bound) as the timestamptz it stands for,
    which compares with, and casts to, a date or timestamp too."""

    oid = psycopg.adapters.types["timestamptz"].oid

    def dump(self, obj: Any) -> bytes:
        return str(obj).encode()


@functools.cache  # one class per type, not per connection
def _endless_loader(finite: type[psycopg.abc.Loader] | None) -> type[Loader]:
    """A text loader of a date or timestamp type: ``finite`` for finite values (psycopg's own,
    which refuses the infinities), :class:`Endless` for the infinite ones."""
    assert finite is not None
    finite_type = finite

    class EndlessLoader(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._finite = finite_type(oid, context).load

        def load(self, data: Any) -> Any:
            if len(data) < 10:  # every finite value is longer: 'YYYY-MM-DD'
                endless = _ENDLESS.get(bytes(data))
                if endless is not None:
                    return endless
            return self._finite(data)

    return EndlessLoader


def sqlalchemy_url(dsn: str) -> str:
    """The SQLAlchemy URL of a ``postgresql://`` or ``postgres://`` DSN (the forms a config
    takes), on the psycopg 3 driver."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a postgresql:// URL (got {redact(dsn)})")
    return f"postgresql+psycopg://{rest}"


def same_server(a: psycopg.Connection[Any], b: psycopg.Connection[Any]) -> bool:
    """True when two connections reach the same Postgres cluster (any database of it); False
    when either may not ask (a managed server can deny ``pg_control_system()``)."""
    first, second = _cluster(a), _cluster(b)
    return first is not None and first == second


def _cluster(conn: psycopg.Connection[Any]) -> int | None:
    try:
        # a savepoint inside a transaction: a refusal leaves the transaction usable
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else int(row[0])
