"""A differences asset per reconciliation, with one asset check per difference class.

Materializing it runs ``trueup diff`` (the partition launched when the reconciliation is
partitioned; launched without one, the whole table, as the CLI without ``--partition``) and
reports the counts as metadata; each class becomes a check: ERROR for missing, orphan,
stale, ahead, mismatch and unreadable, WARN for in_flight. Check results are also stored in
trueup's state, so their history outlives the Dagster instance.
"""


import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from croniter import croniter
from dagster import AssetExecutionContext, ScheduleEvaluationContext

from assets.keys import reconciliation_tags, table_key, topic_key
from assets.lineage import mirror_key
from trueup.checks import record_check_results
from trueup.config import Config, ReconciliationConfig
from trueup.diff import diff
from trueup.errors import TrueupError
from trueup.runs import RunSummary
from trueup.statuses import CheckSeverity, DifferenceClass

CHECK_SEVERITY = {c: CheckSeverity.ERROR for c in DifferenceClass} | {
    DifferenceClass.IN_FLIGHT: CheckSeverity.WARN}
CHECK_DESCRIPTIONS = {
    DifferenceClass.MISSING: "Rows in the source that the target lacks.",
    DifferenceClass.ORPHAN: "Rows in the target whose key the source lacks.",
    DifferenceClass.STALE: "Target rows with an older version than the source.",
    DifferenceClass.AHEAD: "Target rows with a newer version than the source.",
    DifferenceClass.MISMATCH: "Same (or no) version, different values.",
    DifferenceClass.IN_FLIGHT: "Differences still within grace or consumer lag (warning only).",
    DifferenceClass.UNREADABLE: "Target messages that are not JSON or lack the key.",
}


def differences_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["trueup", name, "differences"])


def source_key(config: Config, rec: ReconciliationConfig) -> dg.AssetKey:
    return table_key(rec.source.connection, rec.source.table)


def target_key(config: Config, rec: ReconciliationConfig) -> dg.AssetKey:
    if rec.target.topic is not None:
        return topic_key(rec.target.connection, rec.target.topic)
    assert rec.target.table is not None
    return table_key(rec.target.connection, rec.target.table)


def partitions_of(rec: ReconciliationConfig) -> dg.DailyPartitionsDefinition | None:
    if rec.partitions is None:
        return None
    # end_offset=1: today's partition exists, so a schedule can check the day as it goes
    return dg.DailyPartitionsDefinition(start_date=rec.partitions.daily.start.isoformat(),
                                        end_offset=1)


@dataclass(frozen=True, kw_only=True)
class ReconciliationDefinitions:
    asset: dg.AssetsDefinition
    job: Any  # what dg.define_asset_job returns (its class is not public API)
    schedules: Sequence[dg.ScheduleDefinition]


def summary_metadata(summary: RunSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id, "source_rows": summary.source_rows,
        "target_rows": summary.target_rows, "seconds": summary.seconds,
        **{c.value: getattr(summary, c.value) for c in DifferenceClass},
        "consistent": summary.consistent,
    }


def differences_asset(config: Config, name: str) -> ReconciliationDefinitions:
    rec = config.reconciliations[name]
    key = differences_key(name)
    partitions = partitions_of(rec)
    checks = [dg.AssetCheckSpec(name=c.value, asset=key, description=CHECK_DESCRIPTIONS[c])
              for c in DifferenceClass]

    @dg.asset(
        key=key,
        # a topic is read through its mirror table (assets/lineage.py), a table directly
        deps=[source_key(config, rec),
              mirror_key(name) if rec.target.topic is not None else target_key(config, rec)],
        partitions_def=partitions,
        check_specs=checks,
        group_name="reconciliations",
        kinds={"trueup"},
        description=f"Differences between {rec.source.table} and "
                    f"{rec.target.topic or rec.target.table} (reconciliation {name}).",
        metadata={"reconciliation": name, "repair": rec.repair.value},
    )
    def _differences(context: AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        # launched without a partition, a partitioned reconciliation diffs the whole table,
        # as `trueup diff NAME` without --partition does
        partition = context.partition_key if context.has_partition_key else None
        try:
            summary = diff(config, name, partition=partition,
                           progress=lambda phase, done, total: context.log.debug(
                               f"{phase}: {done}/{total}"))
        except TrueupError as exc:  # one line in the UI (the run is recorded failed)
            raise dg.Failure(description=str(exc)) from exc
        context.log.info(
            f"run {summary.run_id}: " + ", ".join(
                f"{c.value} {getattr(summary, c.value)}" for c in DifferenceClass))
        results = list(_check_results(summary))
        record_check_results(config.state, key.to_user_string(), name, summary.run_id, [
            (r.check_name or "", r.passed, CheckSeverity(r.severity.value),
             {"count": getattr(summary, r.check_name or "")}) for r in results])
        return dg.MaterializeResult(metadata=summary_metadata(summary), check_results=results)

    # the job's partitions come from the asset's
    job = dg.define_asset_job(f"reconcile_{name}", selection=dg.AssetSelection.assets(key),
                              description=f"Run reconciliation {name}.",
                              tags=reconciliation_tags(name))
    schedules: list[dg.ScheduleDefinition] = []
    if rec.schedule:
        schedules.append(_schedule(name, rec.schedule, job, start=rec.partitions.daily.start
                                   if rec.partitions is not None else None))
    return ReconciliationDefinitions(asset=_differences, job=job, schedules=schedules)


def _check_results(summary: RunSummary) -> Iterator[dg.AssetCheckResult]:
    for cls in DifferenceClass:
        count = getattr(summary, cls.value)
        yield dg.AssetCheckResult(
            check_name=cls.value, passed=count == 0,
            severity=dg.AssetCheckSeverity(CHECK_SEVERITY[cls].value),
            metadata={"count": count, "run_id": summary.run_id},
            description=f"{count} {cls.value} in run {summary.run_id}",
        )


def _schedule(name: str, cron: str, job: Any,
              *, start: dt.date | None) -> dg.ScheduleDefinition:
    if start is None:
        return dg.ScheduleDefinition(name=f"reconcile_{name}_schedule", job=job,
                                     cron_schedule=cron, execution_timezone="UTC")

    @dg.schedule(name=f"reconcile_{name}_schedule", job=job, cron_schedule=cron,
                 execution_timezone="UTC")
    def _days(context: ScheduleEvaluationContext) -> list[dg.RunRequest] | dg.SkipReason:
        moment = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
        days = scheduled_days(cron, moment, start)
        if not days:
            return dg.SkipReason(f"{name}: its daily partitions start on {start.isoformat()}; "
                                 f"nothing to check at {moment.isoformat()}")
        return [dg.RunRequest(run_key=f"{name}-{day}-{moment.isoformat()}", partition_key=day)
                for day in days]

    return _days


def scheduled_days(cron: str, moment: dt.datetime, start: dt.date) -> list[str]:
    """The daily partitions a tick of ``cron`` at ``moment`` checks: the day it falls in (UTC),
    the partition still being written, and, at the first tick of a day, the day before too.

    Without the day before, rows updated after a day's last tick would never be checked by
    the schedule (``0 2 * * *`` would miss 02:00-24:00 of every day). Before ``start`` there
    is no partition yet: no days.
    """
    utc = moment.astimezone(dt.UTC)
    day = utc.date()
    if day < start:
        return []
    days = [day]
    previous_tick: dt.datetime = croniter(cron, utc).get_prev(dt.datetime)
    if previous_tick.astimezone(dt.UTC).date() != day and day - dt.timedelta(days=1) >= start:
        days.insert(0, day - dt.timedelta(days=1))
    return [d.isoformat() for d in days]


def reconciliation_definitions(config: Config) -> list[ReconciliationDefinitions]:
    return [differences_asset(config, name) for name in config.reconciliations]
