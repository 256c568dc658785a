"""Releases of billing, as feature flags the running billing consumer and ledger read.

``refunds``: billing and the ledger know refunds (without it, a refund is a poison message).
``amounts_in_euros``: the bug of a bad release: invoices get euros where cents belong.

Usage: python -m examples.shop.deploy FEATURE [--off] [--config PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import psycopg

from examples.shop.settings import Shop, load_shop

FEATURES = {
    "refunds": "billing consumer and ledger accept refunds",
    "amounts_in_euros": "billing consumer writes invoice totals in euros, not cents (a bug)",
}
CACHE_SECONDS = 0.5  # how long a worker trusts the flags it read


def set_feature(shop: Shop, name: str, enabled: bool) -> None:
    if name not in FEATURES:
        raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
    with psycopg.connect(shop.billing_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO billing.features (name, enabled) VALUES (%s, %s) "
                     "ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled",
                     (name, enabled))


class Database:
    """A worker's connection to its database (billing's; the shop's, for the outbox relay),
    opened when first needed and again after a failure left it closed or broken (the database
    restarted, the network dropped): the message (or outbox batch) that met the failure is
    retried, and its next attempt finds a fresh connection."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    @property
    def conn(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.dsn)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Features:
    """The flags as a worker sees them: read from billing.features, cached briefly."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.read_at = 0.0
        self.enabled: set[str] = set()

    def __contains__(self, name: str) -> bool:
        if time.monotonic() - self.read_at > CACHE_SECONDS:
            conn = self.database.conn
            with conn.transaction():  # a failed read is rolled back, not left to the next
                rows = conn.execute("SELECT name FROM billing.features WHERE enabled")
                self.enabled = {str(r[0]) for r in rows.fetchall()}
            self.read_at = time.monotonic()
        return name in self.enabled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("feature", choices=sorted(FEATURES))
    parser.add_argument("--off", action="store_true", help="roll the feature back")
    parser.add_argument("--config")
    args = parser.parse_args()
    set_feature(load_shop(args.config), args.feature, not args.off)
    state = "rolled back" if args.off else "deployed"
    print(f"{state}: {args.feature} ({FEATURES[args.feature]}); the running workers pick it up "
          f"within {CACHE_SECONDS:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
