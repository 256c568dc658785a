"""Freshness: a check per scheduled reconciliation that fails when no run succeeded since the
second-to-last tick of its schedule, a whole tick missed (from ``trueup.runs``, so it survives
a reset of the Dagster instance; rule in :class:`trueup.checks.Freshness`).

The check ``fresh`` sits on the differences asset, so every reconciliation run re-evaluates it;
the sensor ``freshness_<name>`` looks at ``trueup.runs`` every minute and runs the check (job
``freshness_<name>``) whenever the answer changes, so a schedule that stopped shows as failing
without anyone asking.
"""
# No ``from __future__ import annotations``: Dagster reads the context annotations at runtime.

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster import AssetCheckExecutionContext, SensorEvaluationContext

from assets.differences import differences_key
from assets.keys import reconciliation_tags
from trueup.checks import freshness, record_check_results
from trueup.config import Config
from trueup.statuses import CheckSeverity

CHECK_NAME = "fresh"
SENSOR_INTERVAL_SECONDS = 60


@dataclass(frozen=True, kw_only=True)
class FreshnessDefinitions:
    checks: Sequence[dg.AssetChecksDefinition]
    jobs: Sequence[Any]               # what dg.define_asset_job returns
    sensors: Sequence[dg.SensorDefinition]


def freshness_check_key(name: str) -> dg.AssetCheckKey:
    return dg.AssetCheckKey(differences_key(name), CHECK_NAME)


def _definitions(config: Config, name: str, cron: str
                 ) -> tuple[dg.AssetChecksDefinition, Any, dg.SensorDefinition]:
    key = differences_key(name)

    @dg.asset_check(asset=key, name=CHECK_NAME,
                    description=f"{name} succeeded since the second-to-last tick of "
                                f"its schedule ({cron}, UTC).")
    def _fresh(context: AssetCheckExecutionContext) -> dg.AssetCheckResult:
        state = freshness(config.state, name, cron)
        context.log.info(f"{name}: {state.describe()}")
        record_check_results(config.state, key.to_user_string(), name, None, [
            (CHECK_NAME, state.fresh, CheckSeverity.ERROR, state.metadata())])
        return dg.AssetCheckResult(
            passed=state.fresh, severity=dg.AssetCheckSeverity.ERROR,
            metadata={k: v for k, v in state.metadata().items() if v is not None},
            description=state.describe())

    job = dg.define_asset_job(f"freshness_{name}",
                              selection=dg.AssetSelection.checks(freshness_check_key(name)),
                              description=f"Check that reconciliation {name} ran recently.")

    @dg.sensor(name=f"freshness_{name}", job=job,
               minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Re-checks the freshness of {name} when it changes.")
    def _sensor(context: SensorEvaluationContext) -> dg.SensorResult:
        state = "fresh" if freshness(config.state, name, cron).fresh else "stale"
        if context.cursor == state:
            return dg.SensorResult(skip_reason=f"{name} still {state}", cursor=state)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(tags={**reconciliation_tags(name),
                                              "trueup/freshness": state})],
            cursor=state)

    return _fresh, job, _sensor


def freshness_definitions(config: Config) -> FreshnessDefinitions:
    """A freshness check, job and sensor per reconciliation with a ``schedule``."""
    checks, jobs, sensors = [], [], []
    for name, rec in config.reconciliations.items():
        if rec.schedule:
            check, job, sensor = _definitions(config, name, rec.schedule)
            checks.append(check)
            jobs.append(job)
            sensors.append(sensor)
    return FreshnessDefinitions(checks=checks, jobs=jobs, sensors=sensors)
