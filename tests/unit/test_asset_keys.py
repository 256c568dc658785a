"""Asset keys of physical things: one node per thing, never one node for two things."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from assets.external import external_assets
from assets.keys import check_distinct
from trueup.config import Config, parse_config
from trueup.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trueup.yaml"
BASE: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())


def _config(mutate: Callable[[dict[str, Any]], None]) -> Config:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    return parse_config(yaml.safe_dump(raw), "trueup.yaml", {})


def _second_events(raw: dict[str, Any]) -> None:
    """A second reconciliation of the orders onto topic orders_v1 (the example's is orders.v1)."""
    again = copy.deepcopy(raw["reconciliations"]["orders_events"])
    again["target"]["topic"] = "orders_v1"
    raw["reconciliations"]["orders_events_again"] = again


def test_two_reconciliations_of_one_table_share_its_node() -> None:
    config = _config(lambda raw: None)
    check_distinct(config)
    keys = [a.key.to_user_string() for a in external_assets(config)]
    assert keys.count("postgres/shop/public/orders") == 1


@pytest.mark.parametrize(("mutate", "where", "other"), [
    (_second_events, "reconciliations.orders_events_again.target.topic",
     "topic 'orders.v1' of bus (reconciliations.orders_events.target.topic)"),
    (lambda raw: raw["reconciliations"]["orders_invoices"]["target"].update(
        table="public.orders$copy") or raw["reconciliations"]["orders_events"].update(
        source={**raw["reconciliations"]["orders_events"]["source"],
                "connection": "billing", "table": "public.orders_copy"}),
     "reconciliations.orders_invoices.target.table",
     "table 'public.orders_copy' of billing"),
    (lambda raw: raw["dead_letters"]["payments_dlq"].update(queue="exchange_payments"),
     "dead_letters.payments_dlq.replay_to.exchange",
     "queue 'exchange_payments' of amqp (dead_letters.payments_dlq.queue)"),
])
def test_names_that_differ_only_in_what_a_key_cannot_hold_are_refused(
        mutate: Callable[[dict[str, Any]], None], where: str, other: str) -> None:
    """``orders.v1`` and ``orders_v1`` both became kafka/bus/orders_v1: one node, whose
    metadata named the first and whose lineage mixed the two."""
    with pytest.raises(ConfigError) as raised:
        check_distinct(_config(mutate))
    message = str(raised.value)
    assert message.startswith(f"trueup.yaml: {where}: expected a name Dagster can tell"), message
    assert other in message, message
    assert "\n" not in message
