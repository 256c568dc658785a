"""Dead letters in Dagster: per dead-letter queue an asset, a check, a replay job and a sensor.

- The asset ``trueup/<name>/dead_letters`` (downstream of the topic or queue itself) runs
  ``trueup dlq``: depth, oldest age and the breakdown by error and origin become metadata.
- Its check ``within_limits`` fails when the depth or the oldest age passes a threshold; the
  result is also stored in trueup's state.
- The job ``replay_<name>`` runs ``trueup replay`` with the CLI's options as run config, so it
  can be launched from the UI (dry run first, then for real).
- The sensor ``dead_letters_<name>_depth`` asks for the depth only (cheap: nothing is read) and
  refreshes the asset, with its check, whenever the depth changed.
"""
# No ``from __future__ import annotations``: Dagster reads the context annotations at runtime.

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster import AssetExecutionContext, OpExecutionContext, SensorEvaluationContext
from pydantic import Field

from assets.keys import dead_letters_tags, held_key, held_kind
from trueup.checks import record_check_results
from trueup.config import Config
from trueup.dlq import DlqReport, inspect
from trueup.errors import TrueupError, UsageError
from trueup.letters import LetterFilter
from trueup.pacing import valid_rate
from trueup.replay import ReplayOptions, replay
from trueup.statuses import CheckSeverity

MAX_DEPTH = 100                  # dead letters waiting, beyond which the check fails
MAX_AGE_SECONDS = 24 * 3600      # age of the oldest dead letter, beyond which it fails
SENSOR_INTERVAL_SECONDS = 60
#: An unchanged, non-empty queue is refreshed this often (a quarter of the age limit, at most
#: hourly), so its check fails once its oldest letter grows past the limit.
AGE_RECHECK_MAX_SECONDS = 3600
CHECK_NAME = "within_limits"


def dead_letters_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["trueup", name, "dead_letters"])


@dataclass(frozen=True, kw_only=True)
class DeadLetterDefinitions:
    """Everything the code location needs for the config's dead-letter queues."""

    assets: Sequence[dg.AssetsDefinition]
    jobs: Sequence[Any]           # asset jobs and op jobs (their classes are not public API)
    sensors: Sequence[dg.SensorDefinition]


class ReplayRunConfig(dg.Config):
    """The options of ``trueup replay``, as run config of a replay job."""

    # bounds are checked when the run starts (_replay), like the CLI's: Dagster's launchpad
    # does not know pydantic's, and a pydantic error reaches the user as a traceback
    max: int | None = Field(default=None, description="dead letters to move at most (> 0)")
    rate: float | None = Field(default=None, description="dead letters per second (> 0)")
    dry_run: bool = True          # launching from the UI is a dry run unless asked otherwise
    where: str | None = None

    def check(self) -> None:
        """Fail the run with one clear line on a value ``trueup replay`` would refuse."""
        if self.max is not None and self.max <= 0:
            raise dg.Failure(f"max: expected a positive integer (got {self.max})")
        if not valid_rate(self.rate):
            raise dg.Failure(f"rate: expected a positive number of dead letters per second "
                             f"(got {self.rate})")
        try:
            LetterFilter.parse(self.where)
        except UsageError as exc:  # its message names the CLI's --where; here it is where
            raise dg.Failure(f"where: {str(exc).removeprefix('--where: ')}") from exc


def check_result(report: DlqReport, *, max_depth: int = MAX_DEPTH,
                 max_age_seconds: float = MAX_AGE_SECONDS) -> dg.AssetCheckResult:
    age = report.oldest_age_seconds
    too_deep = report.depth > max_depth
    too_old = age is not None and age > max_age_seconds
    reasons = ([f"depth {report.depth} > {max_depth}"] if too_deep else []) + (
        [f"oldest {age:.0f}s > {max_age_seconds:.0f}s"] if too_old and age is not None else [])
    return dg.AssetCheckResult(
        check_name=CHECK_NAME, passed=not (too_deep or too_old),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"depth": report.depth, "oldest_age_seconds": age, "max_depth": max_depth,
                  "max_age_seconds": max_age_seconds},
        description="; ".join(reasons) or f"depth {report.depth} within limits")


def _refreshed_before(context: SensorEvaluationContext, key: dg.AssetKey,
                      seconds: float) -> bool:
    """True when the asset was last materialized more than ``seconds`` ago (or never)."""
    try:
        instance = context.instance
    except dg.DagsterInvariantViolationError:  # a context built without one (tests)
        return False
    event = instance.get_latest_materialization_event(key)
    return event is None or time.time() - event.timestamp >= seconds


def _definitions(config: Config, name: str, *, max_depth: int,
                 max_age_seconds: float) -> tuple[dg.AssetsDefinition, Any, Any,
                                                  dg.SensorDefinition]:
    dlq = config.dead_letters[name]
    recheck_seconds = min(AGE_RECHECK_MAX_SECONDS, max_age_seconds / 4)
    upstream, (_, where) = held_key(dlq), held_kind(dlq)
    key = dead_letters_key(name)
    trueup_config = config  # the ops' own parameter must be called config

    @dg.asset(
        key=key, deps=[upstream], group_name="dead_letters", kinds={"trueup"},
        check_specs=[dg.AssetCheckSpec(
            name=CHECK_NAME, asset=key,
            description=f"At most {max_depth} dead letters, none older than "
                        f"{max_age_seconds:.0f}s.")],
        description=f"Dead letters waiting in {where} (dead letters {name}): depth, oldest "
                    f"age, counts by error and origin.",
        metadata={"dead_letters": name, "max_attempts": dlq.max_attempts},
    )
    def _dead_letters(context: AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        try:
            report = inspect(config, name)
            context.log.info(f"{name}: depth {report.depth}, by error {report.by_error}")
            result = check_result(report, max_depth=max_depth, max_age_seconds=max_age_seconds)
            record_check_results(config.state, key.to_user_string(), None, None, [
                (CHECK_NAME, result.passed, CheckSeverity.ERROR,
                 {"depth": report.depth, "oldest_age_seconds": report.oldest_age_seconds})])
        except TrueupError as exc:  # one line, as the replay job and the CLI say it
            raise dg.Failure(description=str(exc)) from exc
        return dg.MaterializeResult(metadata={
            "depth": report.depth,
            "oldest_age_seconds": report.oldest_age_seconds,
            "by_error": dg.MetadataValue.json(report.by_error),
            "by_origin": dg.MetadataValue.json(report.by_origin),
            "inspected": report.inspected,
        }, check_results=[result])

    observe = dg.define_asset_job(f"dead_letters_{name}", selection=dg.AssetSelection.assets(key),
                                  description=f"Inspect dead letters {name}.",
                                  tags=dead_letters_tags(name))

    @dg.op(name=f"replay_{name}_op", description=f"trueup replay {name}")
    def _replay(context: OpExecutionContext, config: ReplayRunConfig) -> None:
        config.check()
        try:
            summary = replay(trueup_config, name, ReplayOptions(
                max_messages=config.max, rate=config.rate, dry_run=config.dry_run,
                where=config.where))
        except TrueupError as exc:  # one line for the user, as the CLI prints, no traceback
            raise dg.Failure(description=str(exc)) from exc
        context.log.info(f"replay {summary.replay_id}: {summary.as_json()}")
        context.add_output_metadata(summary.as_json())

    @dg.job(name=f"replay_{name}",
            description=f"Replay dead letters {name} (run config: max, rate, dry_run, where).",
            tags=dead_letters_tags(name))
    def _replay_job() -> None:
        _replay()

    @dg.sensor(name=f"dead_letters_{name}_depth", job=observe,
               minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
               description=f"Refreshes dead letters {name} when its depth changes, and "
                           f"every {recheck_seconds:.0f}s while letters wait (their age).")
    def _depth(context: SensorEvaluationContext) -> dg.SensorResult:
        depth = inspect(config, name, breakdown=False).depth
        if context.cursor is not None and int(context.cursor) == depth:
            if depth and _refreshed_before(context, key, recheck_seconds):
                # letters age while the depth stands still: the check must see them again
                bucket = int(time.time() // recheck_seconds)
                return dg.SensorResult(run_requests=[dg.RunRequest(
                    run_key=f"age-{depth}-{bucket}",
                    tags={**dead_letters_tags(name), "trueup/depth": str(depth)})],
                    cursor=str(depth))
            return dg.SensorResult(skip_reason=f"depth still {depth}", cursor=str(depth))
        # no run key: the cursor already asks once per change, and a key made of depths
        # repeats when the depth swings back and forth (120, 0, 120, 0), so Dagster would
        # skip the refresh and leave the asset showing the old depth
        return dg.SensorResult(
            run_requests=[dg.RunRequest(tags={**dead_letters_tags(name),
                                              "trueup/depth": str(depth)})],
            cursor=str(depth))

    return _dead_letters, observe, _replay_job, _depth


def dead_letter_definitions(config: Config, *, max_depth: int = MAX_DEPTH,
                            max_age_seconds: float = MAX_AGE_SECONDS) -> DeadLetterDefinitions:
    """Assets (with checks), jobs and sensors of every dead-letter queue of ``config``."""
    assets, jobs, sensors = [], [], []
    for name in config.dead_letters:
        asset, observe, replay_job, sensor = _definitions(
            config, name, max_depth=max_depth, max_age_seconds=max_age_seconds)
        assets.append(asset)
        jobs.extend([observe, replay_job])
        sensors.append(sensor)
    return DeadLetterDefinitions(assets=assets, jobs=jobs, sensors=sensors)
