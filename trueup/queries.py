"""Named SQL queries and migrations, loaded from the ``sql/`` folder.

A query file holds blocks that start with ``-- name: some_name``; :func:`query` returns one
block's text, ready for psycopg parameters (``%(name)s``). Dynamic identifiers never go into
these files: code that needs a user's table composes with :mod:`psycopg.sql`.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

SQL_DIR = Path(os.environ.get("TRUEUP_SQL_DIR", Path(__file__).resolve().parent.parent / "sql"))

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, kw_only=True)
class Migration:
    version: int
    name: str
    text: str


@functools.cache
def _named_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted((SQL_DIR / "queries").glob("*.sql")):
        text = path.read_text(encoding="utf-8")
        names = list(_NAME_LINE.finditer(text))
        for i, match in enumerate(names):
            end = names[i + 1].start() if i + 1 < len(names) else len(text)
            name = match.group(1)
            if name in queries:
                raise ValueError(f"{path}: query {name!r} is defined twice")
            queries[name] = text[match.end():end].strip()
    return queries


def query(name: str) -> sql.SQL:
    """The named query ``name`` from ``sql/queries/*.sql``."""
    # The text comes from the project's own files, never from user input.
    return sql.SQL(_named_queries()[name])


def migrations() -> list[Migration]:
    """Every numbered migration in ``sql/migrations``, in order; numbers must be 1, 2, 3, ..."""
    found = []
    for path in sorted((SQL_DIR / "migrations").glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise ValueError(f"{path}: expected a name like 0001_initial.sql")
        found.append(Migration(version=int(match.group(1)), name=match.group(2),
                               text=path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.version:04d} out of sequence "
                             f"(expected {expected:04d})")
    return found


def schema_text() -> str:
    return (SQL_DIR / "schema.sql").read_text(encoding="utf-8")
