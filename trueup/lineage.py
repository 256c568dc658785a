"""``trueup lineage NAME KEY``: a key's history, every run that found it different and every
repair of it, read from trueup's state (row-level lineage)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal
from typing import Any

import psycopg

from trueup.backfill.keyspace import repairs_text
from trueup.cli import to_json
from trueup.config import Config
from trueup.errors import UsageError
from trueup.fingerprint import jsonb_text
from trueup.queries import query
from trueup.runs import time_text
from trueup.state import open_state
from trueup.statuses import ChunkStatus


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(number: str) -> Decimal:
    """A JSON number with a fraction or an exponent, exactly (a float would keep only a
    double's digits of ``0.30000000000000001``, and repairs rows hold every digit); one past
    a double's range (1e400) is no key trueup stores as a number."""
    return Decimal(number) if math.isfinite(float(number)) else _not_json(number)


#: At most this many stored forms of one KEY are looked up (each is one more probe of every
#: chunk's repairs): the fewest alternatives first, see :func:`_fair_product`.
MAX_FORMS = 64


#: The deepest JSON a KEY is read as (arrays and objects within each other); one deeper is its
#: text. Python's json reads about a thousand levels, and what takes the key on (a check, the
#: lookup, --json) recurses a level at a time.
MAX_DEPTH = 100


def _json(text: str) -> Any:
    # NaN and Infinity (and 1e400) are JSON to Python, not to Postgres: such a key is its text
    value = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    if _deeper_than(value, MAX_DEPTH):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` holds arrays or objects nested more than ``limit`` deep (a walk
    without recursion, which a deep value would run out of)."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, list | dict):
            if depth > limit:
                return True
            todo += [(v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return False


#: Text Postgres reads as an integer (int2in/int4in/int8in: blanks around, a sign, leading
#: zeros: '007'::bigint is 7) and as a number (numeric_in: also ``5.``, ``.5``, ``1e2``).
#: Postgres 16's ``1_000`` and ``0x1F`` are not read: 15 refuses them.
_PG_BLANK = r"[ \t\n\r\v\f]*"
_PG_INTEGER = re.compile(rf"{_PG_BLANK}([+-]?[0-9]+){_PG_BLANK}")
_PG_NUMBER = re.compile(
    rf"{_PG_BLANK}([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?){_PG_BLANK}")


def _pg_number(text: str) -> int | Decimal:
    """``text`` as the number Postgres reads it as (a ValueError when it reads none): JSON's
    numbers, and ``007``, ``+5``, `` 5 ``, ``.5`` that JSON has not."""
    if (integer := _PG_INTEGER.fullmatch(text)) is not None:
        return int(integer.group(1))  # past 4,300 digits a ValueError, as json.loads gives
    if (number := _PG_NUMBER.fullmatch(text)) is not None:
        return _finite(number.group(1))
    raise ValueError(f"{text!r} is no number to Postgres")


def parse_key(text: str, parts: int) -> list[list[Any]]:
    """The stored forms a command-line KEY may have: ``42`` is ``[42]`` or ``["42"]``.

    A single key is its value (a number, a string, or a JSON value); a composite key must be a
    JSON array of ``parts`` values. The types of the key's columns are not known here, so each
    value is looked up in every form it may be stored as (:func:`_alternatives`), and a single
    key written as JSON (``["x"]``) also as that text.
    """
    try:
        parsed = _json(text)
    except (ValueError, RecursionError):  # not JSON, or nested past what Python reads
        parsed = None if parts > 1 else text
    if parts > 1:
        if not isinstance(parsed, list) or len(parsed) != parts:
            raise UsageError(f"lineage: KEY: expected a JSON array of {parts} values for a "
                             f"composite key (got {text!r})")
        values = parsed
    elif isinstance(parsed, list):
        # ["x"] is the key x; another array is the text of a single key (a text key may
        # hold "[1,2]"), as cli.md has it
        values = parsed if len(parsed) == 1 else [text]
    else:
        values = [parsed]
    forms = _fair_product([_alternatives(v) for v in values], MAX_FORMS)
    if parts == 1 and [text] not in forms:
        forms.append([text])  # a text key that reads as JSON (or a number) is also its text
    return _storable(forms, text)


def _alternatives(value: Any) -> list[Any]:
    """A key value as each type may store it: a number as itself and as text (a text column
    holding digits), text of a number as that number, a uuid in its canonical form (lower
    case, no braces) as Postgres prints it."""
    found = [value]
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        found.append(jsonb_text(value))  # 1e2 as Postgres writes it: 100
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            found.append(_pg_number(value))  # '007' of a bigint column is 7
        with contextlib.suppress(ValueError):
            found.append(str(uuid.UUID(value)))
        found += _times(value)
    unique: dict[str, Any] = {}  # by JSON text: 1 and 1.0 are one stored form, 1 and "1" two
    for form in found:
        unique.setdefault(jsonb_text(form), form)
    return list(unique.values())


def _fair_product(choices: list[list[Any]], limit: int) -> list[list[Any]]:
    """The first ``limit`` combinations of one value of each of ``choices``, those with the
    fewest later values (alternatives) first: every value of every part is in one of the
    first ``1 + sum(len(c) - 1)``. (``itertools.product`` varies the last part first: cut at
    ``limit``, the forms of a key of seven parts never held its first part's second value.)

    A breadth-first walk from the first values, each combination reached once: from its
    parent, the one with its last later value one less."""
    picks: list[tuple[int, ...]] = [(0,) * len(choices)]
    at = 0
    while at < len(picks) and len(picks) < limit:
        pick = picks[at]
        at += 1
        last = max((i for i, n in enumerate(pick) if n), default=0)
        for i in range(last, len(pick)):
            if pick[i] + 1 < len(choices[i]) and len(picks) < limit:
                picks.append((*pick[:i], pick[i] + 1, *pick[i + 1:]))
    return [[c[n] for c, n in zip(choices, pick, strict=True)] for pick in picks]


def _times(value: str) -> list[str]:
    """A time as runs and repairs store it: ISO with a T, a zoned one in UTC (+00:00), so that
    2025-12-31T23:00:00+01:00 or ...22:00:00Z find 2025-12-31T22:00:00+00:00; its fraction as
    Postgres writes it (``.5``, :func:`~trueup.runs.time_text`), and as runs stored it before
    (``.500000``, ``isoformat``'s)."""
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return []
    at = moment.astimezone(dt.UTC) if moment.tzinfo else moment
    return [time_text(at), at.isoformat()]


def _storable(forms: list[list[Any]], text: str) -> list[list[Any]]:
    """``forms``, refused in one line when no stored key can hold them: Postgres's JSON has no
    NUL character, and text not valid UTF-8 (a lone surrogate, or bytes a shell passed on)
    is no key's."""
    def refused(value: Any) -> bool:
        if isinstance(value, str):
            return "\x00" in value or _not_utf8(value)
        return isinstance(value, list) and any(refused(v) for v in value)

    if refused(forms[0]):
        raise UsageError(f"lineage: KEY: {text!r} cannot be a stored key (a NUL character, or "
                         f"text that is not UTF-8)")
    return forms


def _not_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lineage(conn: psycopg.Connection[Any], name: str,
            forms: list[list[Any]]) -> dict[str, Any]:
    params = {"reconciliation": name, "keys": [jsonb_text(f) for f in forms],
              "repairs_keys": [repairs_text(f) for f in forms]}
    runs = conn.execute(query("key_runs"), params).fetchall()
    repairs = conn.execute(query("key_repairs"), params).fetchall()
    # the key as found: a repairs row's text (one per key), else a run's; KEY as read (its
    # first form) when nothing holds it
    stored = [row.pop("stored_key") for row in (*repairs, *runs)]
    key = json.loads(stored[0], parse_float=Decimal) if stored else forms[0]
    return {"reconciliation": name, "key": key, "runs": runs, "repairs": repairs}


def _unconfirmed(chunk_status: str) -> str:
    """A note for a repair its chunk never confirmed: the intent of a chunk that failed (or is
    still running), which the target may or may not hold."""
    if chunk_status == ChunkStatus.DONE:
        return ""
    return f"  (intent only: chunk {chunk_status}, not confirmed)"


def _shown(value: Any, prefix: str = "") -> str:
    """A version (``prefix`` v) or a fingerprint, ``-`` where there is none (no row, no
    version column; no row before an insert, after a delete)."""
    return "-" if value is None else f"{prefix}{value}"


def cmd_lineage(config: Config, args: argparse.Namespace) -> int:
    rec = config.reconciliation(args.name)
    forms = parse_key(args.key, len(rec.source.key))
    with open_state(config.state) as conn:
        document = lineage(conn, args.name, forms)
    if args.json:
        print(to_json(document))
        return 0
    print(f"{args.name} key {jsonb_text(document['key'])}: {len(document['runs'])} runs, "
          f"{len(document['repairs'])} repairs")
    for run in document["runs"]:
        print(f"  run {run['run_id']}  {run['started_at']:%Y-%m-%d %H:%M:%S}  {run['class']}  "
              f"source {_shown(run['source_version'], 'v')} "
              f"target {_shown(run['target_version'], 'v')}")
    for rep in document["repairs"]:
        print(f"  backfill {rep['backfill_id']} chunk {rep['chunk']}  "
              f"{rep['at']:%Y-%m-%d %H:%M:%S}  {rep['action']}  "
              f"{_shown(rep['fingerprint_before'])} -> {_shown(rep['fingerprint_after'])}"
              f"{_unconfirmed(rep['chunk_status'])}")
    return 0
