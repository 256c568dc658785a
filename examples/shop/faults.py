"""The fault injector: named things that go wrong in real systems, done to the running shop.

Each fault does one thing and prints what it did. Some leave drift that trueup finds (and
repairs); some show what the shop shrugs off (duplicates, a crash, a stall): at-least-once
delivery with version guards loses nothing and applies nothing twice.

Usage: python -m examples.shop.faults NAME [NAME ...] [--count N] [--seed S] [--config PATH]
       python -m examples.shop.faults --list
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from examples.shop import procs
from examples.shop.deploy import CACHE_SECONDS, set_feature
from examples.shop.orders import NEXT_STATUS, Order, pick_orders, update_orders
from examples.shop.payments import publish_payments, refund
from examples.shop.settings import Shop, load_shop, run_dir
from examples.shop.watch import invoices_behind, wait_quiet, wait_until
from trueup.brokers import kafka


@dataclass(frozen=True, kw_only=True)
class Context:
    shop: Shop
    run: Path                 # where the workers' pid files are
    rng: random.Random
    count: int | None         # how many orders/messages (None: the fault's default)
    taken: set[int] = field(default_factory=set)  # orders earlier faults touched

    def pick(self, default: int, *, claim: bool = True) -> list[Order]:
        """Orders no earlier fault of this run claimed: each fault's drift stays its own."""
        orders = pick_orders(self.shop, self.n(default), self.rng, exclude_ids=self.taken)
        if claim:
            self.taken.update(o.id for o in orders)
        return orders

    def n(self, default: int) -> int:
        return default if self.count is None else self.count


def _ids(orders: list[Order]) -> str:
    shown = ", ".join(str(o.id) for o in orders[:8])
    return shown + (f" and {len(orders) - 8} more" if len(orders) > 8 else "")


def _step(order: Order) -> dict[str, object]:
    return {"status": NEXT_STATUS.get(order.status, order.status)}


def _billing_pid(ctx: Context) -> int:
    pid = procs.pid_of(ctx.run, "billing")
    if pid is None:
        raise SystemExit(f"the billing consumer is not running (no live pid in {ctx.run}); "
                         f"start the demo first: python -m examples.shop.demo")
    return pid


def dropped_events(ctx: Context) -> str:
    """Orders change without outbox rows: stale events and invoices."""
    orders = ctx.pick(6)
    changed = update_orders(ctx.shop, ((o.id, _step(o)) for o in orders), outbox=False)
    return (f"updated {len(changed)} orders ({_ids(changed)}) through a code path that skipped "
            f"the outbox: their new versions never reach {ctx.shop.orders_topic}, and billing "
            f"never hears of them (stale events and stale invoices)")


def duplicated_events(ctx: Context) -> str:
    """The relay sends events again (harmless: version guards)."""
    count = ctx.n(40)
    with psycopg.connect(ctx.shop.shop_dsn) as conn:
        rows = conn.execute(
            "UPDATE public.outbox SET published_at = NULL WHERE id IN (SELECT id FROM "
            "public.outbox WHERE published_at IS NOT NULL ORDER BY id DESC LIMIT %s) "
            "RETURNING id", (count,)).fetchall()
    wait_quiet(ctx.shop)
    return (f"the relay crashed after Kafka confirmed {len(rows)} events but before it marked "
            f"them published: it sent them again. Harmless: billing's version guard ignores "
            f"the copies, and the latest event per order is unchanged")


def corrupted_field(ctx: Context) -> str:
    """Events re-sent with a corrupted currency: mismatch on the topic."""
    orders = ctx.pick(4)
    producer = kafka.create_producer(ctx.shop.kafka, what="corrupted-field")
    deliveries = kafka.Deliveries()
    for order in orders:
        event = {**order.event(), "currency": order.currency.lower()}
        kafka.produce(producer, deliveries, ctx.shop.orders_topic,
                      value=json.dumps(event).encode(), key=str(order.id))
    kafka.confirm(producer, deliveries, what="corrupted-field")
    return (f"a buggy producer re-sent {len(orders)} events ({_ids(orders)}) with the currency "
            f"lower-cased (EUR -> eur), same version: {ctx.shop.orders_topic} now disagrees "
            f"with the orders table (mismatch); billing ignored them (not a newer version)")


def stalled_consumer(ctx: Context) -> str:
    """The billing consumer stalls (SIGSTOP) for 5 s, then catches up."""
    seconds = 5.0
    pid = _billing_pid(ctx)
    os.kill(pid, signal.SIGSTOP)
    try:
        orders = ctx.pick(50, claim=False)
        changed = update_orders(ctx.shop, ((o.id, _step(o)) for o in orders))
        time.sleep(seconds)
        behind = invoices_behind(ctx.shop, {o.id: o.version for o in changed})
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_quiet(ctx.shop)
    return (f"stalled the billing consumer (pid {pid}) for {seconds:.0f} s while {len(changed)} "
            f"orders changed: {behind} invoices fell behind; resumed, it caught up "
            f"({invoices_behind(ctx.shop, {o.id: o.version for o in changed})} behind now)")


def consumer_crash(ctx: Context) -> str:
    """The billing consumer is killed -9 mid-batch and restarted: no loss."""
    pid = _billing_pid(ctx)
    wait_quiet(ctx.shop)
    orders = ctx.pick(1000, claim=False)
    changed = update_orders(ctx.shop, ((o.id, _step(o)) for o in orders))
    versions = {o.id: o.version for o in changed}
    wait_until("billing to start on the batch",
               lambda: invoices_behind(ctx.shop, versions) < len(versions), 60)
    os.kill(pid, signal.SIGKILL)
    applied = len(versions) - invoices_behind(ctx.shop, versions)
    new_pid = procs.start("billing", ctx.shop.config_path, ctx.run)
    wait_quiet(ctx.shop)
    return (f"killed the billing consumer (pid {pid}, kill -9) after it had applied {applied} "
            f"of {len(versions)} updates, before it committed its offsets; restarted it (pid "
            f"{new_pid}): it read them again from the last commit, and "
            f"{invoices_behind(ctx.shop, versions)} invoices are behind now")


def poison_messages(ctx: Context) -> str:
    """Refunds billing cannot handle yet: both dead-letter queues fill."""
    orders = ctx.pick(120)
    refunded = update_orders(ctx.shop, ((o.id, {"status": "refunded"}) for o in orders))
    published = publish_payments(ctx.shop, map(refund, refunded))
    return (f"refunded {len(refunded)} orders ({_ids(refunded)}) and published {published} refund "
            f"payments: this billing release knows no refunds, so their events go to "
            f"{ctx.shop.orders_dlq} and the payments to {ctx.shop.payments_dlq}. The fix: "
            f"python -m examples.shop.deploy refunds, then replay both")


def bad_deploy(ctx: Context) -> str:
    """A billing release writes euros as cents, then is rolled back: mismatch."""
    set_feature(ctx.shop, "amounts_in_euros", True)
    try:
        time.sleep(CACHE_SECONDS * 2)  # the workers' flags cache
        orders = ctx.pick(25)
        changed = update_orders(ctx.shop, ((o.id, _step(o)) for o in orders))
        versions = {o.id: o.version for o in changed}
        wait_until("billing to apply the orders", lambda: invoices_behind(ctx.shop,
                                                                          versions) == 0)
    finally:
        set_feature(ctx.shop, "amounts_in_euros", False)
        time.sleep(CACHE_SECONDS * 2)
    return (f"deployed a billing release that wrote euros where cents belong while "
            f"{len(changed)} orders changed ({_ids(changed)}), then rolled it back: those "
            f"invoices have wrong totals (mismatch)")


def deleted_rows(ctx: Context) -> str:
    """Invoices deleted by hand: missing in billing.invoices."""
    orders = ctx.pick(7)
    with psycopg.connect(ctx.shop.billing_dsn) as conn:
        gone = conn.execute("DELETE FROM billing.invoices WHERE order_id = ANY(%s) "
                            "RETURNING order_id", ([o.id for o in orders],)).fetchall()
    return (f"an operator's cleanup script deleted {len(gone)} invoices "
            f"({', '.join(str(r[0]) for r in sorted(gone))}): missing in billing.invoices")


FAULTS: dict[str, Callable[[Context], str]] = {
    "dropped-events": dropped_events,
    "duplicated-events": duplicated_events,
    "corrupted-field": corrupted_field,
    "stalled-consumer": stalled_consumer,
    "consumer-crash": consumer_crash,
    "poison-messages": poison_messages,
    "bad-deploy": bad_deploy,
    "deleted-rows": deleted_rows,
}


def inject(shop: Shop, names: list[str], *, run: Path, seed: int | None = None,
           count: int | None = None) -> list[str]:
    """Inject the faults ``names`` in order; return what each did."""
    rng = random.Random(seed)
    taken: set[int] = set()
    said = []
    for name in names:
        message = FAULTS[name](Context(shop=shop, run=run, rng=rng, count=count, taken=taken))
        print(f"{name}: {message}", flush=True)
        said.append(message)
    return said


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(FAULTS))
    parser.add_argument("--list", action="store_true", help="list the faults")
    parser.add_argument("--count", type=int, help="orders or messages affected")
    parser.add_argument("--seed", type=int, help="random seed (repeatable runs)")
    parser.add_argument("--config")
    parser.add_argument("--run-dir", help="where the demo's pid files are (.stack/demo)")
    args = parser.parse_args()
    if args.list or not args.names:
        for name, fault in FAULTS.items():
            print(f"{name:18} {(fault.__doc__ or '').strip()}")
        return 0
    unknown = [n for n in args.names if n not in FAULTS]
    if unknown:
        print(f"unknown fault {unknown[0]!r}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    inject(load_shop(args.config), args.names, run=run_dir(args.run_dir), seed=args.seed,
           count=args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
