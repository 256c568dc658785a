"""The example shop's handlers against a billing database that fails under them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest

from examples.shop.billing import Billing
from examples.shop.settings import Shop
from trueup.retry import PermanentError
from trueup.workers import Delivery

pytestmark = pytest.mark.postgres

BILLING_SQL = Path(__file__).resolve().parents[2] / "examples" / "shop" / "billing.sql"


def _billing(new_db: Callable[[], str]) -> tuple[str, Billing]:
    dsn = new_db()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BILLING_SQL.read_bytes())
    return dsn, Billing(cast(Shop, SimpleNamespace(billing_dsn=dsn)))


def _order(order_id: int, version: int = 1) -> Delivery:
    body = {"id": order_id, "version": version, "status": "paid", "amount_cents": 1250}
    return Delivery(body=json.dumps(body).encode(), key=str(order_id).encode(), headers={},
                    source="orders.v1", attempt=1, message_id=f"orders.v1:0:{order_id}")


def _invoices(dsn: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT order_id FROM billing.invoices ORDER BY 1")]


def test_billing_handles_messages_again_once_its_database_is_back(
        new_db: Callable[[], str]) -> None:
    """The handler kept the one connection it opened: once the database dropped it (a
    restart), every later message failed ("the connection is closed") until each was
    dead-lettered, the database long back."""
    dsn, billing = _billing(new_db)
    billing(_order(1))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        billing(_order(2))  # the attempt that meets the dropped connection fails: retried
    billing(_order(2))
    billing(_order(3))
    assert _invoices(dsn) == [1, 2, 3]


def test_a_failed_read_of_the_features_is_not_left_to_fail_the_next_message(
        new_db: Callable[[], str]) -> None:
    """The flags were read outside a transaction block and committed only on success: a read
    that failed left the transaction aborted, and every later message failed with it."""
    dsn, billing = _billing(new_db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE billing.features RENAME TO features_gone")
    with pytest.raises(psycopg.errors.UndefinedTable):
        billing(_order(1))  # every event reads the flags (a bad release may be on)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE billing.features_gone RENAME TO features")
    billing.features.read_at = 0.0  # past the flags' cache
    billing(_order(1))
    assert _invoices(dsn) == [1]



@pytest.mark.parametrize("key", [b"order-7", b"\xff\xfe"])
def test_a_tombstone_with_an_unreadable_key_is_a_permanent_error(
        new_db: Callable[[], str], key: bytes) -> None:
    """The key was parsed outside the PermanentError wrapping: a ValueError, retried on every
    retry topic and dead-lettered as exhausted, when no attempt could ever succeed."""
    dsn, billing = _billing(new_db)
    billing(_order(1))
    tombstone = Delivery(body=None, key=key, headers={}, source="orders.v1", attempt=1,
                         message_id="orders.v1:0:99")
    with pytest.raises(PermanentError, match="not an order tombstone"):
        billing(tombstone)
    assert _invoices(dsn) == [1]
