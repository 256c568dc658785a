"""Dead letters through Dagster: the DLQ asset and its check, the depth sensor, the replay job."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pika
import pytest

from assets.dead_letters import dead_letter_definitions, dead_letters_key
from tests.integration.test_workers_support import Queues, write_config
from trueup import headers
from trueup.brokers import rabbitmq
from trueup.config import load_config

pytestmark = [pytest.mark.dagster, pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
def queues(amqp_url: str) -> Iterator[Queues]:
    made = Queues(amqp_url)
    yield made
    made.delete()


def test_dlq_asset_check_sensor_and_replay_job_work_from_dagster(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq, target = unique("pay.dlq"), unique("pay")
    queues.declare(dlq, target)
    channel = rabbitmq.confirmed_channel(queues.connection)
    for n in range(3):
        rabbitmq.publish(channel, exchange="", routing_key=dlq, body=json.dumps({"id": n}).encode(),
                         properties=pika.BasicProperties(message_id=f"p{n}", headers={
                             headers.ORIGIN: target, headers.ATTEMPTS: "1",
                             headers.ERROR_CLASS: "TimeoutError"}), what="test")
    channel.close()
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    made = dead_letter_definitions(config, max_depth=2)
    defs = dg.Definitions(assets=made.assets, jobs=made.jobs, sensors=made.sensors)
    instance = dg.DagsterInstance.ephemeral()

    observed = dg.materialize(list(made.assets), instance=instance)
    assert observed.success
    [event] = observed.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["depth"].value == 3
    assert metadata["by_error"].value == {"TimeoutError": 3}
    [check] = observed.get_asset_check_evaluations()
    assert check.asset_key == dead_letters_key("pay_dlq") and not check.passed, check
    assert queues.depth(dlq) == 3, "inspecting from Dagster took letters"

    sensor = defs.resolve_sensor_def("dead_letters_pay_dlq_depth")
    first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs))
    assert len(first.run_requests or []) == 1 and first.cursor == "3"
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                         cursor="3"))
    assert not again.run_requests, "the sensor asked again for an unchanged depth"

    job = defs.resolve_job_def("replay_pay_dlq")
    dry = job.execute_in_process(instance=instance, run_config={
        "ops": {"replay_pay_dlq_op": {"config": {}}}})
    assert dry.success and queues.depth(dlq) == 3, "the default launch must be a dry run"
    done = job.execute_in_process(instance=instance, run_config={
        "ops": {"replay_pay_dlq_op": {"config": {"dry_run": False, "max": 2}}}})
    assert done.success
    assert queues.depth(dlq) == 1 and queues.depth(target) == 2

    refreshed = dg.materialize(list(made.assets), instance=instance)
    [check] = refreshed.get_asset_check_evaluations()
    assert check.passed, check
