"""The orders service: every change of an order and its outbox row commit in ONE transaction.

The outbox row holds the event the relay (:mod:`examples.shop.relay`) publishes to the orders
topic; nothing else ever publishes an order event, so an order and its event cannot disagree
unless something goes wrong (which :mod:`examples.shop.faults` arranges).

Usage: python -m examples.shop.orders [--create 100] [--update 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from examples.shop.settings import Shop, load_shop

STATUSES = ("new", "paid", "shipped", "delivered", "cancelled")
#: the order of a normal life; refunds come from the fault injector's poison messages
NEXT_STATUS = {"new": "paid", "paid": "shipped", "shipped": "delivered"}
CURRENCIES = ("EUR", "USD")


@dataclass(frozen=True, kw_only=True)
class Order:
    id: int
    customer_id: int
    status: str
    amount_cents: int
    currency: str
    version: int

    def event(self) -> dict[str, Any]:
        """The event published for this version of the order."""
        return {"id": self.id, "version": self.version, "status": self.status,
                "amount_cents": self.amount_cents, "currency": self.currency}


def _order(row: dict[str, Any]) -> Order:
    return Order(id=row["id"], customer_id=row["customer_id"], status=row["status"],
                 amount_cents=row["amount_cents"], currency=row["currency"],
                 version=row["version"])


def connect(shop: Shop) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(shop.shop_dsn, row_factory=dict_row)


def _outbox(conn: psycopg.Connection[dict[str, Any]], shop: Shop, order: Order) -> None:
    conn.execute("INSERT INTO public.outbox (topic, key, payload) VALUES (%s, %s, %s)",
                 (shop.orders_topic, str(order.id), Jsonb(order.event())))


def create_orders(shop: Shop, count: int, rng: random.Random, *,
                  outbox: bool = True) -> list[Order]:
    """Create ``count`` new orders (ids after the highest so far), each with its outbox row."""
    made = []
    with connect(shop) as conn, conn.transaction():
        conn.execute("LOCK TABLE public.orders IN SHARE ROW EXCLUSIVE MODE")  # ids in sequence
        row = conn.execute("SELECT coalesce(max(id), 0) AS top FROM public.orders").fetchone()
        top = int(row["top"]) if row else 0
        for n in range(1, count + 1):
            created = conn.execute(
                "INSERT INTO public.orders (id, customer_id, status, amount_cents, currency) "
                "VALUES (%s, %s, 'new', %s, %s) RETURNING *",
                (top + n, rng.randint(1, 500), rng.randint(100, 100_000),
                 rng.choice(CURRENCIES))).fetchone()
            assert created is not None
            order = _order(created)
            if outbox:
                _outbox(conn, shop, order)
            made.append(order)
    return made


def update_orders(shop: Shop, changes: Iterable[tuple[int, dict[str, Any]]], *,
                  outbox: bool = True) -> list[Order]:
    """Apply ``(order id, {column: value})`` changes: version + 1, ``updated_at`` now, and (unless
    ``outbox`` is false, which only a fault does) the new event in the same transaction."""
    done = []
    with connect(shop) as conn:
        for order_id, values in changes:
            with conn.transaction():
                assignments = sql.SQL(", ").join(
                    sql.SQL("{} = {}").format(sql.Identifier(column),
                                                      sql.Placeholder(column))
                    for column in values)
                row = conn.execute(sql.SQL(
                    "UPDATE public.orders SET {}, version = version + 1, updated_at = now() "
                    "WHERE id = %(id)s RETURNING *").format(assignments),
                    {**values, "id": order_id}).fetchone()
                if row is None:
                    continue
                order = _order(row)
                if outbox:
                    _outbox(conn, shop, order)
                done.append(order)
    return done


def advance(shop: Shop, count: int, rng: random.Random) -> list[Order]:
    """Move ``count`` random orders one step along new -> paid -> shipped -> delivered."""
    with connect(shop) as conn:
        rows = conn.execute("SELECT id, status FROM public.orders WHERE status = ANY(%s)",
                            (list(NEXT_STATUS),)).fetchall()
    picked = rng.sample(rows, min(count, len(rows)))
    return update_orders(shop, ((r["id"], {"status": NEXT_STATUS[r["status"]]})
                                for r in sorted(picked, key=lambda r: r["id"])))


def orders_with_status(shop: Shop, status: str, limit: int) -> list[Order]:
    with connect(shop) as conn:
        rows = conn.execute("SELECT * FROM public.orders WHERE status = %s ORDER BY id LIMIT %s",
                            (status, limit)).fetchall()
    return [_order(r) for r in rows]


def pick_orders(shop: Shop, count: int, rng: random.Random,
                exclude: Sequence[str] = ("refunded",),
                exclude_ids: Collection[int] = ()) -> list[Order]:
    """``count`` random existing orders (not in the ``exclude`` statuses nor ``exclude_ids``),
    sorted by id."""
    with connect(shop) as conn:
        rows = conn.execute("SELECT * FROM public.orders WHERE status <> ALL(%s) "
                            "AND id <> ALL(%s) ORDER BY id",
                            (list(exclude), list(exclude_ids))).fetchall()
    return sorted((_order(r) for r in rng.sample(rows, min(count, len(rows)))),
                  key=lambda o: o.id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config")
    parser.add_argument("--create", type=int, default=100, help="new orders")
    parser.add_argument("--update", type=int, default=50, help="orders moved one status on")
    parser.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    args = parser.parse_args()
    shop = load_shop(args.config)
    rng = random.Random(args.seed)
    created = create_orders(shop, args.create, rng)
    updated = advance(shop, args.update, rng)
    print(f"orders: created {len(created)}, updated {len(updated)} "
          f"(each with its outbox row, in one transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
