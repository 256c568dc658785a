"""Dead letters through Dagster: the DLQ asset and its check, the depth sensor, the replay job."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pika
import psycopg
import pytest

from assets import dead_letters
from assets.dead_letters import dead_letter_definitions, dead_letters_key
from tests.integration.test_workers_support import Queues, write_config
from trueup import headers, metrics
from trueup.brokers import rabbitmq
from trueup.config import load_config
from trueup.dlq import inspect

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


def test_depth_sensor_refreshes_on_every_change_even_when_a_depth_comes_back(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq = unique("pay.dlq")
    queues.declare(dlq)
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    made = dead_letter_definitions(config)
    defs = dg.Definitions(assets=made.assets, jobs=made.jobs, sensors=made.sensors)
    sensor = defs.resolve_sensor_def("dead_letters_pay_dlq_depth")
    instance = dg.DagsterInstance.ephemeral()

    cursor, requests = "0", []
    for depth in (3, 0, 3, 0):  # a burst of dead letters replayed, twice
        for n in range(depth):
            queues.publish(dlq, b"{}", message_id=f"m{n}")
        if depth == 0:
            queues.drain(dlq)
        tick = sensor.evaluate_tick(dg.build_sensor_context(
            instance=instance, definitions=defs, cursor=cursor))
        assert len(tick.run_requests or []) == 1, f"no refresh when the depth became {depth}"
        requests.extend(tick.run_requests or [])
        cursor = tick.cursor or ""
    # Dagster launches a run key once per sensor: a repeated key is a refresh that never runs
    keys = [r.run_key for r in requests if r.run_key is not None]
    assert len(keys) == len(set(keys)), f"run keys repeat: {keys}"
    assert [r.tags["trueup/depth"] for r in requests] == ["3", "0", "3", "0"]


def test_dlq_asset_works_against_a_brand_new_state_database(
        amqp_url: str, kafka_bootstrap: str, empty_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq = unique("pay.dlq")
    queues.declare(dlq)
    queues.publish(dlq, b"{}", message_id="m1")
    config = load_config(write_config(
        tmp_path, state=empty_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    made = dead_letter_definitions(config)

    # the first thing to touch the state database is this check: it migrates the schema
    observed = dg.materialize(list(made.assets), raise_on_error=False)
    assert observed.success, "materializing on a new state database failed"
    with psycopg.connect(empty_db) as conn:
        stored = conn.execute("SELECT check_name, passed FROM trueup.check_results").fetchall()
    assert stored == [("within_limits", True)]


def test_dlq_asset_fails_a_queue_it_cannot_inspect_with_one_clear_line(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        tmp_path: Path) -> None:
    """A queue that does not exist failed the step with a traceback; the replay job and the
    CLI say the same in one line."""
    dlq = unique("pay.dlq")  # never declared
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    observed = dg.materialize(list(dead_letter_definitions(config).assets), raise_on_error=False)
    (event,) = observed.get_step_failure_events()
    user = event.step_failure_data.user_failure_data
    assert user is not None, f"expected a one-line failure, got {event.step_failure_data}"
    assert dlq in (user.description or "") and "\n" not in (user.description or "")


def _one_letter_replay_job(amqp_url: str, kafka_bootstrap: str, state_db: str,
                           unique: Callable[[str], str], queues: Queues,
                           tmp_path: Path) -> tuple[str, str, dg.JobDefinition]:
    """A RabbitMQ DLQ ``pay_dlq`` holding one letter, its origin queue, and its replay job."""
    dlq, target = unique("pay.dlq"), unique("pay")
    queues.declare(dlq, target)
    queues.publish(dlq, b"{}", message_id="m1", headers_={headers.ORIGIN: target})
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    jobs = dg.Definitions(jobs=dead_letter_definitions(config).jobs)
    return dlq, target, jobs.resolve_job_def("replay_pay_dlq")


def test_replay_job_refuses_a_non_positive_max_or_rate_with_one_clear_line(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    dlq, target, job = _one_letter_replay_job(amqp_url, kafka_bootstrap, state_db, unique,
                                              queues, tmp_path)
    for field, value, expected in [
            ("max", 0, "max: expected a positive integer (got 0)"),
            ("rate", 0.0, "rate: expected a positive number of dead letters per second "
                          "(got 0.0)"),
            ("rate", math.inf, "rate: expected a positive number of dead letters per second "
                               "(got inf)")]:
        result = job.execute_in_process(raise_on_error=False, run_config={"ops": {
            "replay_pay_dlq_op": {"config": {"dry_run": False, field: value}}}})
        (failure,) = result.get_step_failure_events()
        user = failure.step_failure_data.user_failure_data
        assert user is not None and user.description == expected, failure.step_failure_data
    assert queues.depth(dlq) == 1 and queues.depth(target) == 0


def test_replay_job_fails_a_bad_where_and_a_busy_queue_with_one_clear_line(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    """trueup's own errors fail the step with their message (no traceback), and the filter's
    message names the run config's ``where``, not the CLI's ``--where``."""
    dlq, target, job = _one_letter_replay_job(amqp_url, kafka_bootstrap, state_db, unique,
                                              queues, tmp_path)

    def failure(run_config: dict[str, object]) -> str | None:
        result = job.execute_in_process(raise_on_error=False, run_config={"ops": {
            "replay_pay_dlq_op": {"config": {"dry_run": False, **run_config}}}})
        (event,) = result.get_step_failure_events()
        user = event.step_failure_data.user_failure_data
        assert user is not None, f"expected a one-line failure, got {event.step_failure_data}"
        return user.description

    assert failure({"where": "bogus"}) == (
        "where: cannot read 'bogus' (expected FIELD=VALUE with a field among error, origin, "
        "key, attempts, since, until)")
    # another replay of the queue holds its lock: trueup's Conflict, as one line
    with psycopg.connect(state_db, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('trueup.replay:' || %s, 0))",
                      ("pay_dlq",))
        assert failure({}) == ("dead_letters.pay_dlq: another replay or dry run of this queue "
                               "is running; wait for it to finish")
    assert queues.depth(dlq) == 1 and queues.depth(target) == 0


class _Clock:
    """Stands in for the ``time`` module where only ``time.time()`` is read."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_depth_sensor_refreshes_a_standing_queue_so_its_age_check_can_fail(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged depth asked for nothing, so the check that passed while the letters were
    young stayed 'passed' as they grew old. Refreshed every quarter of the age limit.

    The sensor's clock is set by hand (ticks 0.1 s and 0.6 s after the materialization, not
    whenever a loaded machine gets to them); the letter ages in real time."""
    dlq = unique("pay.dlq")
    queues.declare(dlq)
    queues.publish(dlq, b"{}", message_id="old", headers_={
        headers.LAST_FAILURE: dt.datetime.now(dt.UTC).isoformat()})
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))
    made = dead_letter_definitions(config, max_age_seconds=2.0)  # refreshed every 0.5 s
    defs = dg.Definitions(assets=made.assets, jobs=made.jobs, sensors=made.sensors)
    sensor = defs.resolve_sensor_def("dead_letters_pay_dlq_depth")
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(made.assets), instance=instance).success
    event = instance.get_latest_materialization_event(dead_letters_key("pay_dlq"))
    assert event is not None
    clock = _Clock(event.timestamp + 0.1)
    monkeypatch.setattr(dead_letters, "time", clock)

    fresh = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                         cursor="1"))
    assert not fresh.run_requests, "refreshed again right after a refresh"
    clock.now += 0.5
    stale = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, definitions=defs,
                                                         cursor="1"))
    assert len(stale.run_requests or []) == 1 and stale.cursor == "1"
    time.sleep(2.1)  # the letter is now past 2 s old: the refresh it asks for fails the check
    refreshed = dg.materialize(list(made.assets), instance=instance)
    [check] = refreshed.get_asset_check_evaluations()
    assert not check.passed and "oldest" in (check.description or ""), check


def test_a_depth_only_inspection_drops_an_oldest_age_it_cannot_know(
        amqp_url: str, kafka_bootstrap: str, state_db: str, unique: Callable[[str], str],
        queues: Queues, tmp_path: Path) -> None:
    """The depth sensor's inspection reads no letter: an empty queue's age 0 stayed the
    gauge's value once letters came, and the age half of the DLQ alert could not fire."""
    dlq = unique("pay.dlq")
    queues.declare(dlq)
    config = load_config(write_config(
        tmp_path, state=state_db, bootstrap=kafka_bootstrap, amqp=amqp_url,
        dead_letters={"pay_dlq": {"connection": "amqp", "queue": dlq}}))

    def age() -> float | None:
        return metrics.REGISTRY.get_sample_value("trueup_dlq_oldest_age_seconds",
                                                 {"name": "pay_dlq"})

    inspect(config, "pay_dlq", breakdown=False)
    assert age() == 0
    queues.publish(dlq, b"{}", message_id="m1")
    assert inspect(config, "pay_dlq", breakdown=False).depth == 1
    assert age() is None
