"""Where the shop's services find their databases, topics and queues: all from a trueup config.

The shop reads the same config file trueup does (``--config``, else ``$TRUEUP_CONFIG``, else
``examples/trueup.yaml``), so a test can run a whole shop on databases, topics and queues of its
own by writing another config. Names the config does not hold directly follow from it:

- orders topic: the target topic of reconciliation ``orders_events``; its dead-letter topic and
  parking lot: dead letters ``orders_dlq``; the billing consumer group: ``billing.<topic>``.
- payments: dead letters ``payments_dlq`` name the exchange and routing key (``replay_to``) and
  the dead-letter queue; the work queue is the dead-letter queue without ``.dlq``, and RabbitMQ's
  own dead-letter exchange is ``<exchange>.dlx``.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from trueup.config import CONFIG_ENV, Config, load_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLE_CONFIG = HERE.parent / "trueup.yaml"
RUN_DIR_ENV = "SHOP_RUN_DIR"
DEFAULT_RUN_DIR = REPO / ".stack" / "demo"


def config_path(given: str | None = None) -> str:
    return given or os.environ.get(CONFIG_ENV) or str(EXAMPLE_CONFIG)


def run_dir(given: str | None = None) -> Path:
    """Where the demo keeps its workers' pid files and logs."""
    return Path(given or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


@dataclass(frozen=True, kw_only=True)
class Shop:
    """Every address and name the shop's services use."""

    config: Config
    shop_dsn: str
    billing_dsn: str
    state_dsn: str
    kafka: dict[str, Any]
    orders_topic: str
    orders_dlq: str
    orders_parked: str
    billing_group: str
    amqp_url: str
    exchange: str
    routing_key: str
    payments_queue: str
    payments_dlq: str
    payments_dlx: str

    @property
    def config_path(self) -> str:
        return self.config.path


def load_shop(path: str | None = None) -> Shop:
    return shop_of(load_config(config_path(path)))


def shop_of(config: Config) -> Shop:
    shop = config.connections["shop"].postgres
    billing = config.connections["billing"].postgres
    kafka = config.connections["bus"].kafka
    amqp = config.connections["amqp"].rabbitmq
    topic = config.reconciliations["orders_events"].target.topic
    orders_dlq = config.dead_letters["orders_dlq"]
    payments_dlq = config.dead_letters["payments_dlq"]
    replay_to = payments_dlq.replay_to
    assert shop and billing and kafka and amqp and topic and orders_dlq.topic
    assert payments_dlq.queue and replay_to and replay_to.exchange
    return Shop(
        config=config, shop_dsn=shop, billing_dsn=billing, state_dsn=config.state,
        kafka=dict(kafka), orders_topic=topic, orders_dlq=orders_dlq.topic,
        orders_parked=orders_dlq.parking or f"{topic}.parked",
        billing_group=f"billing.{topic}", amqp_url=amqp, exchange=replay_to.exchange,
        routing_key=replay_to.routing_key,
        payments_queue=payments_dlq.queue.removesuffix(".dlq"),
        payments_dlq=payments_dlq.queue, payments_dlx=f"{replay_to.exchange}.dlx")


class _Runnable(Protocol):
    def run(self, stop: threading.Event) -> None: ...


def run_worker(description: str, build: Callable[[Shop, int | None], _Runnable]) -> int:
    """The command line of a shop worker: ``--config``, ``--metrics-port``; runs until
    SIGTERM or SIGINT."""
    from trueup.log import configure
    from trueup.workers import install_stop_signals

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve /metrics, /healthz and /readyz on 127.0.0.1:PORT")
    args = parser.parse_args()
    configure()
    stop = threading.Event()
    install_stop_signals(stop)
    build(load_shop(args.config), args.metrics_port).run(stop)
    return 0
