"""Repairs in Dagster: a repairs asset per reconciliation (downstream of its differences), the
backfill job that materializes it, and an auto-repair sensor with a circuit breaker.

Materializing ``trueup/<name>/repairs`` runs a backfill (:mod:`trueup.backfill`) with the
launchpad's config (scope, run_id, partition, dry_run, chunk_size, rate, workers); on a
partitioned reconciliation, materializing a partition backfills that day. Progress (chunks
done of total, rows per second) is logged while it runs; the result and a sample of the
row-level lineage become the materialization's metadata.

A partitioned reconciliation has two: ``backfill_<name>``, launched for a partition, records
its materialization under that day, so what it backfills covers the day: the day (scope auto
or partition), a run of that day, or the whole table (scope all, as the demo repairs the
events topic), never another day or another day's run. ``backfill_<name>_unpartitioned``
(asset ``trueup/<name>/repairs_unpartitioned``) backfills what the launchpad asks of no one
day: a run of the whole table, a day given as ``partition``, the whole table. (Dagster runs a
partitioned asset without a partition only until its partitioned upstream, the differences,
has a materialization.) A backfill the
run was serving when it was stopped (terminated in the UI, SIGTERM) is cancelled, as ``trueup
backfill --cancel`` does: nobody serves it any more, and ``trueup backfill --resume`` repairs
what it left.

The sensor watches the differences asset: for every run since its last tick (one per
partition, say) that finds between 1 and ``auto_repair.max_differences`` repairable
differences it launches a backfill of that run; above that it only reports (large drift needs
a person to look). The circuit breaker also holds back:

- the tick's other runs of the partition in which a run found too many differences (all runs
  of a reconciliation without partitions; the skip reason says which run tripped it); runs
  of other partitions go on as usual. The cursor is one storage id: when the tick launches
  another partition's backfill whose run came between the tripping run and a newer one it
  held, the newer one is decided again alone on the next tick (and launched);
- every run while the reconciliation's latest backfill failed (a new one would most likely
  fail the same way) or a backfill is still planning or running (a second one would fail
  with a conflict): the skip reason names that backfill and what to do about it.
"""

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import dagster as dg
import psycopg
from dagster import AssetExecutionContext, SensorEvaluationContext
from pydantic import Field

from assets.differences import differences_key, partitions_of, source_key
from assets.keys import reconciliation_tags, repairs_pool
from trueup.backfill import (
    BackfillOptions,
    BackfillSummary,
    WorkerOptions,
    cancel_backfill,
    lease_seconds,
    resume_backfill,
    start_backfill,
)
from trueup.backfill.model import DEFAULT_CHUNK_ROWS, MAX_WORKERS
from trueup.checks import failed_blocking_checks
from trueup.config import Config, RepairMode
from trueup.db import connect, first_line
from trueup.errors import TrueupError, UsageError
from trueup.queries import query
from trueup.statuses import BackfillScope, BackfillStatus, DifferenceClass

#: Classes a backfill can fix; ahead and unreadable need a person, in_flight heals itself.
REPAIRABLE = (DifferenceClass.MISSING, DifferenceClass.ORPHAN, DifferenceClass.STALE,
              DifferenceClass.MISMATCH)
#: Repairs rows shown in the materialization's lineage sample.
LINEAGE_SAMPLE_ROWS = 20
SCOPES = ("auto", "run", "partition", "all")
#: Materializations the auto-repair sensor decides on per tick; the rest wait for the next.
AUTO_REPAIR_BATCH = 100
#: Characters of a failed backfill's error quoted in the sensor's skip reason.
ERROR_EXCERPT_CHARS = 200


def repairs_key(name: str, *, by_day: bool = True) -> dg.AssetKey:
    """The repairs asset of a reconciliation; ``by_day=False``: a partitioned reconciliation's
    second, unpartitioned one (see :func:`repair_definitions`)."""
    return dg.AssetKey(["trueup", name, "repairs" if by_day else "repairs_unpartitioned"])


def repairs_op_name(name: str, *, by_day: bool = True) -> str:
    """The op behind the repairs asset: where the launchpad's config goes."""
    return "__".join(repairs_key(name, by_day=by_day).path)


#: What a partitioned reconciliation's repairs asset and backfill job of each kind repair.
_SCOPES = {True: ", a day (its partition) at a time",
           False: ", of no one day: a run, a day given in the form, or the whole table"}


def backfill_job_name(name: str, *, by_day: bool = True) -> str:
    return f"backfill_{name}" if by_day else f"backfill_{name}_unpartitioned"


class BackfillRunConfig(dg.Config):
    """The launchpad form of a backfill job."""

    scope: str = Field(
        default="auto",
        description="auto (the partition being materialized, else partition if given, else "
                    "run_id if given, else all), run, partition or all")
    run_id: int | None = Field(default=None, description="the run whose differences scope "
                                                         "run repairs (only with scope run; "
                                                         "a run of the partition launched)")
    partition: str | None = Field(default=None, description="the day scope partition "
                                                            "repairs (launched for a "
                                                            "partition: that one)")
    dry_run: bool = False
    # bounds are checked when the run starts (_options), not by pydantic: Dagster's launchpad
    # does not know them, and a pydantic error reaches the user as a traceback
    chunk_size: int = Field(default=DEFAULT_CHUNK_ROWS, description="rows per chunk (> 0)")
    rate: float | None = Field(default=None, description="rows per second (> 0); none: as "
                                                         "fast as it goes")
    workers: int = Field(default=1, description=f"worker threads (1 to {MAX_WORKERS})")


@dataclass(frozen=True, kw_only=True)
class RepairDefinitions:
    assets: list[dg.AssetsDefinition]
    jobs: list[Any]            # what dg.define_asset_job returns
    sensors: list[dg.SensorDefinition]


def _options(config: BackfillRunConfig, partition_key: str | None) -> BackfillOptions:
    """The backfill the launchpad asks for; a bad value fails the run before anything is
    planned (BackfillOptions refuses it)."""
    scope = config.scope
    if scope not in SCOPES:
        raise dg.Failure(f"scope: expected one of {', '.join(SCOPES)} (got {scope!r})")
    # the materialization is recorded under the partition being launched: a backfill of
    # another day under it would show that partition repaired (the whole table covers it)
    if partition_key and config.partition and config.partition != partition_key:
        raise dg.Failure(description=f"partition: this run materializes partition "
                                     f"{partition_key}; leave partition empty, or launch "
                                     f"partition {config.partition} (got {config.partition!r})")
    partition = partition_key or config.partition
    if scope == "auto":
        scope = "partition" if partition else "run" if config.run_id is not None else "all"
    try:
        return BackfillOptions(scope=BackfillScope(scope), run_id=config.run_id,
                               partition=partition if scope == "partition" else None,
                               dry_run=config.dry_run, chunk_size=config.chunk_size,
                               rate=config.rate, workers=config.workers)
    except UsageError as exc:
        raise dg.Failure(description=str(exc)) from exc


def _require_run_of_partition(state_dsn: str, name: str, run_id: int | None,
                              partition_key: str) -> None:
    """Refuse a backfill of run ``run_id`` under a partition the run did not diff: the
    materialization would show ``partition_key`` repaired. A run that is missing or of another
    reconciliation is left to the engine, which says so."""
    with connect(state_dsn, what="state", autocommit=True) as conn:
        row = conn.execute("SELECT partition FROM trueup.runs "
                           "WHERE run_id = %s AND reconciliation = %s",
                           (run_id, name)).fetchone()
    if row is None or row["partition"] == partition_key:
        return
    found = (f"partition {row['partition']}" if row["partition"] is not None
             else "the whole table")
    launch = (f"launch partition {row['partition']}" if row["partition"] is not None
              else "launch no partition")
    raise dg.Failure(description=f"run_id: run {run_id} diffed {found}, and this run "
                                 f"materializes partition {partition_key}; {launch}, or set "
                                 f"scope partition (got {run_id})")


def _running(config: Config, name: str, launched_by: str) -> int | None:
    """The backfill of ``name`` that the run ``launched_by`` (a root run) planned, running."""
    with connect(config.state, what="state", autocommit=True) as conn:
        row = conn.execute(query("left_running"), {"reconciliation": name,
                                                   "launched_by": launched_by}).fetchone()
    return None if row is None else int(row["backfill_id"])


def _left_running(context: AssetExecutionContext, config: Config, name: str,
                  launched_by: str) -> int | None:
    """The backfill a retried (or re-executed) run continues: the one its first run planned,
    left running when that run's process died. Planning anew would meet it ("already
    running"); its done chunks stay done. A backfill someone else runs is never joined."""
    if context.run.parent_run_id is None:
        return None
    return _running(config, name, launched_by)


def _end_interrupted(context: AssetExecutionContext, config: Config, name: str,
                     launched_by: str) -> None:
    """Cancel the backfill this run was serving when the run was stopped (terminated in the
    UI, SIGTERM, Ctrl-C), as ``trueup backfill --cancel`` does: nobody serves it any more, and
    left running it would refuse every later backfill of ``name`` and keep the auto-repair
    waiting. Its unfinished chunks stay resumable (``trueup backfill --resume``)."""
    try:
        backfill_id = _running(config, name, launched_by)
        if backfill_id is None:  # stopped before planning committed (which then rolled back)
            return
        cancel_backfill(config, backfill_id)
    except (TrueupError, psycopg.Error) as exc:  # the state database is away: --cancel later
        context.log.warning(f"backfill {name}: the run was stopped, and its backfill could not "
                            f"be cancelled ({first_line(exc)}): cancel it with `trueup backfill "
                            f"--cancel ID` (see `trueup status`)")
        return
    context.log.warning(f"backfill {backfill_id} of {name} cancelled: the run was stopped; "
                        f"`trueup backfill --resume {backfill_id}` repairs what it left")


def lineage_sample(state_dsn: str, backfill_id: int) -> str:
    """A markdown table of the backfill's first repairs rows."""
    with connect(state_dsn, what="state", autocommit=True) as conn:
        rows = conn.execute(query("lineage_sample"), {"backfill_id": backfill_id,
                                                      "limit": LINEAGE_SAMPLE_ROWS}).fetchall()
    lines = ["| key | run | chunk | action | fingerprint before | fingerprint after |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['key']} | {r['run_id'] or ''} | {r['chunk']} | {r['action']} "
              f"| {r['fingerprint_before'] or ''} | {r['fingerprint_after'] or ''} |"
              for r in rows]
    return "\n".join(lines)


def summary_metadata(summary: BackfillSummary) -> dict[str, Any]:
    return {
        "backfill_id": summary.backfill_id, "status": summary.status.value,
        "chunks": summary.chunks, "chunks_done": summary.chunks_done,
        "rows_planned": summary.rows_planned, "rows_repaired": summary.rows_repaired,
        "rows_skipped": summary.rows_skipped, "seconds": summary.seconds,
        "rows_per_second": round(summary.rows_planned / summary.seconds, 1)
        if summary.seconds else 0.0,
        "dry_run": summary.dry_run,
    }


def _repairs_asset(trueup_config: Config, name: str, *, by_day: bool = True
                   ) -> dg.AssetsDefinition:
    """The repairs asset (partitioned as the reconciliation is), or with ``by_day=False`` a
    partitioned reconciliation's unpartitioned one: Dagster runs a partitioned asset only for
    a partition once its partitioned upstream (the differences) has materializations, so a
    backfill of no one day (a run of the whole table, a day given in the form, the whole
    table) goes through an asset of its own."""
    rec = trueup_config.reconciliations[name]
    partitions = partitions_of(rec) if by_day else None
    scope = "" if by_day and partitions is None else _SCOPES[by_day]

    @dg.asset(
        key=repairs_key(name, by_day=by_day), deps=[differences_key(name)],
        partitions_def=partitions,
        group_name="reconciliations", kinds={"trueup"},
        # one backfill of a reconciliation at a time, however its runs were launched (an asset
        # page's partition backfill runs in Dagster's own job, which carries no run tags)
        pool=repairs_pool(name),
        description=f"Backfills repairing {rec.target.topic or rec.target.table} from "
                    f"{rec.source.table} by {rec.repair.value} (reconciliation {name})"
                    f"{scope}.",
        metadata={"reconciliation": name, "repair": rec.repair.value},
    )
    def _repairs(context: AssetExecutionContext,
                 config: BackfillRunConfig) -> dg.MaterializeResult:  # type: ignore[type-arg]
        partition_key = context.partition_key if context.has_partition_key else None
        if partitions is not None and partition_key is None:
            raise dg.Failure(description=(
                f"{backfill_job_name(name)} backfills one day, its partition: launch it for a "
                f"day, or launch {backfill_job_name(name, by_day=False)} for a run of the "
                f"whole table, a day given in partition, or the whole table"))
        # the backfill remembers the run (its first, when retried) that planned it
        launched_by = context.run.root_run_id or context.run.run_id
        options = replace(_options(config, partition_key), launched_by=launched_by)

        def progress(done: int, total: int, repaired: int, rows_per_second: float) -> None:
            context.log.info(f"backfill {name}: {done}/{total} chunks, {repaired} rows "
                             f"repaired, {rows_per_second:.0f} rows/s")

        try:
            worker = WorkerOptions(workers=options.workers, lease_seconds=lease_seconds())
            if partition_key and options.scope is BackfillScope.RUN:
                _require_run_of_partition(trueup_config.state, name, options.run_id,
                                          partition_key)
            left = _left_running(context, trueup_config, name, launched_by)
            if left is not None:
                context.log.info(f"continuing backfill {left} of {name}, left running by the "
                                 f"run this one retries")
                summary = resume_backfill(trueup_config, left, worker, progress)
            else:
                summary = start_backfill(trueup_config, name, options, worker, progress)
        except TrueupError as exc:
            raise dg.Failure(description=str(exc)) from exc
        except Exception:
            # a crash: the backfill stays running for the run's retry (_left_running)
            raise
        except BaseException:
            # stopped (DagsterExecutionInterruptedError, KeyboardInterrupt): no retry follows
            _end_interrupted(context, trueup_config, name, launched_by)
            raise
        metadata = summary_metadata(summary)
        if not summary.dry_run:
            metadata["lineage_sample"] = dg.MetadataValue.md(
                lineage_sample(trueup_config.state, summary.backfill_id))
        if summary.status is not BackfillStatus.SUCCEEDED:
            raise dg.Failure(description=f"backfill {summary.backfill_id} of {name} "
                                         f"{summary.status.value}: {summary.error or ''}",
                             metadata=metadata)
        context.log.info(f"backfill {summary.backfill_id}: {summary.rows_repaired} repaired, "
                         f"{summary.rows_skipped} skipped (newer in the target)")
        return dg.MaterializeResult(metadata=metadata)

    return _repairs


def repairable_count(metadata: dict[str, Any]) -> int:
    """The differences of a differences materialization that a backfill can fix."""
    return sum(int(metadata.get(c.value, 0)) for c in REPAIRABLE)


def drift_count(metadata: dict[str, Any]) -> int:
    """The differences of a differences materialization that fail its checks (every class but
    in_flight): what the circuit breaker weighs. Drift a backfill leaves (ahead rows,
    unreadable messages) is drift all the same, and large drift needs a person."""
    return sum(int(metadata.get(c.value, 0)) for c in DifferenceClass
               if c is not DifferenceClass.IN_FLIGHT)


def auto_repair_decision(name: str, metadata: dict[str, Any], max_differences: int,
                         partition: str | None) -> dg.RunRequest | dg.SkipReason:
    """Launch a backfill of the run, or skip (nothing to do, or the circuit breaker opened)."""
    run_id = metadata.get("run_id")
    count = drift_count(metadata)
    if run_id is None:
        return dg.SkipReason("the materialization has no run_id")
    if count > max_differences:
        return dg.SkipReason(
            f"circuit breaker: run {run_id} of {name} found {count} differences, more than "
            f"auto_repair.max_differences ({max_differences}); not repairing automatically")
    if repairable_count(metadata) == 0:
        return dg.SkipReason(f"run {run_id} of {name} found nothing to repair")
    return dg.RunRequest(
        run_key=f"auto-repair-{name}-run-{run_id}", partition_key=partition,
        run_config={"ops": {repairs_op_name(name): {"config": {"scope": "run",
                                                               "run_id": int(run_id)}}}},
        tags={**reconciliation_tags(name), "trueup/run_id": str(run_id)})


def blocking_backfill(state_dsn: str, name: str) -> dict[str, Any] | None:
    """The backfill of ``name`` that stops the auto-repair: the active one (planning or
    running), else the newest when it failed; None when a new backfill may start."""
    with connect(state_dsn, what="state", autocommit=True) as conn:
        row = conn.execute(
            # an active one first (one at most but those run --alongside), else the one that
            # ended last (backfills run alongside others overlap: the newest planned may have
            # ended first) and was not a dry run (which repairs nothing, so neither clears nor
            # sets a pause)
            "SELECT backfill_id, status, error FROM trueup.backfills "
            "WHERE reconciliation = %s AND (status IN ('planning', 'running') OR NOT dry_run) "
            "ORDER BY status IN ('planning', 'running') DESC, finished_at DESC NULLS LAST, "
            "created_at DESC, backfill_id DESC "
            "LIMIT 1", (name,)).fetchone()
    if row is None:
        return None
    status = BackfillStatus(row["status"])
    return row if status.active or status is BackfillStatus.FAILED else None


#: A run of a backfill job that may not have planned its backfill yet (or is running it).
_IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
              dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def backfill_run_in_flight(instance: dg.DagsterInstance, name: str) -> dg.DagsterRun | None:
    """A launched run of a backfill job of reconciliation ``name`` not yet finished: its
    backfill may not be in trueup's state yet (queued, starting, planning), so a second one
    would fail."""
    for job_name in (backfill_job_name(name), backfill_job_name(name, by_day=False)):
        runs = instance.get_runs(dg.RunsFilter(job_name=job_name, statuses=_IN_FLIGHT), limit=1)
        if runs:
            return runs[0]
    return None


def _runs(requests: list[dg.RunRequest]) -> str:
    ids = [r.tags["trueup/run_id"] for r in requests]
    return f"run{'s' if len(ids) > 1 else ''} {', '.join(ids)}"


def paused_reason(name: str, backfill: dict[str, Any], requests: list[dg.RunRequest]) -> str:
    """Why no backfill of ``requests``' runs is launched while ``backfill`` is in the way, and
    what a person does about it."""
    backfill_id, status = backfill["backfill_id"], BackfillStatus(backfill["status"])
    held = f"not launching the backfill of {_runs(requests)}"
    if status.active:
        return (f"auto-repair of {name} waits: backfill {backfill_id} is still {status.value} "
                f"(one backfill per reconciliation at a time); {held}. Follow it with "
                f"`trueup status`; if its workers are gone, `trueup backfill --resume "
                f"{backfill_id}` (or `--cancel {backfill_id}`)")
    lines = (backfill["error"] or "").strip().splitlines()
    excerpt = lines[0][:ERROR_EXCERPT_CHARS] if lines else "no error recorded"
    return (f"auto-repair of {name} paused: its latest backfill {backfill_id} failed "
            f"({excerpt}); {held}. Look at it (`trueup status`, the failed run of its "
            f"backfill job), fix the cause, then `trueup backfill --resume {backfill_id}`: "
            f"auto-repair carries on once a backfill of {name} succeeds")


def _sensor(config: Config, name: str, job: Any,
            suite_tables: Collection[dg.AssetKey] | None) -> dg.SensorDefinition:
    rec = config.reconciliations[name]
    assert rec.auto_repair is not None
    limit = rec.auto_repair.max_differences
    key = differences_key(name)
    days = partitions_of(rec)
    source = source_key(config, rec)
    # a suite's results block only while the suite is there: one removed leaves its last
    # results in the state, which nothing will ever follow
    checked = [source.to_user_string()] if suite_tables is None or source in suite_tables \
        else []

    def covers(materialization: dg.AssetMaterialization) -> str | None:
        """The partition a run covers as the config stands (None: the whole table): a day's
        run is of the whole table once partitions left the config, and its backfill needs no
        day."""
        return materialization.partition if rec.partitions is not None else None

    def decide(materialization: dg.AssetMaterialization, partition: str | None
               ) -> tuple[dg.RunRequest | dg.SkipReason, bool]:
        """The run's decision (its partition as :func:`covers` tells it), and whether it
        tripped the circuit breaker."""
        metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        if partition is None and rec.partitions is not None:
            # a run of the whole table (launched without a partition, or before partitions
            # came into the config): a sensor's run of a partitioned job needs a day, and a
            # day would misrecord a backfill of the whole run
            return dg.SkipReason(
                f"run {metadata.get('run_id')} of {name} covered the whole table, not one of "
                f"its days: backfill it by hand if it still needs it (trueup backfill {name} "
                f"--run {metadata.get('run_id')}, or {backfill_job_name(name, by_day=False)} "
                f"with run_id {metadata.get('run_id')})"), False
        if days is not None and partition is not None and not days.has_partition_key(partition):
            # a day before the partitions' start as the config stands now: the job refuses
            # it, and a request for it failed the tick (and every tick after it)
            return dg.SkipReason(
                f"run {metadata.get('run_id')} of {name} covered {partition}, no longer one "
                f"of its days (they start {days.start:%Y-%m-%d}): backfill it by hand "
                f"if it still needs it (trueup backfill {name} --run "
                f"{metadata.get('run_id')})"), False
        decision = auto_repair_decision(name, metadata, limit, partition)
        tripped = isinstance(decision, dg.SkipReason) and drift_count(metadata) > limit
        if isinstance(decision, dg.RunRequest):
            # blocking checks: a failed ERROR check a backfill does not answer (unreadable
            # messages, bad values in the source table's GX suite) stops the auto-repair
            run_id = decision.tags["trueup/run_id"]
            blocking = failed_blocking_checks(
                config.state, key.to_user_string(), int(run_id),
                [*(c.value for c in REPAIRABLE), DifferenceClass.AHEAD.value], checked)
            if blocking:
                decision = dg.SkipReason(f"blocked: run {run_id} of {name} has failed ERROR "
                                         f"checks {', '.join(blocking)}")
        return decision, tripped

    # A plain sensor over the event log rather than dg.asset_sensor, which only sees the newest
    # materialization: several runs (partitions) can finish between two ticks, and each needs
    # its own decision. The cursor is the storage id of the last materialization decided, as
    # dg.asset_sensor kept it, so a running sensor carries on where it was.
    @dg.sensor(name=f"auto_repair_{name}", job=job,
               description=f"Backfill {name} after a run finds 1 to {limit} "
                           f"differences; above that only report.")
    def _auto_repair(context: SensorEvaluationContext) -> dg.SensorResult:
        after = int(context.cursor) if context.cursor else None
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after),
            # without a cursor (a new sensor) only the newest run counts, not the history
            limit=AUTO_REPAIR_BATCH if after is not None else 1,
            ascending=after is not None).records
        if not records:
            # nothing materialized yet: every materialization from now on is new
            return dg.SensorResult(skip_reason=f"no new materialization of {key.to_user_string()}",
                                   cursor=context.cursor or "0")
        requests: list[tuple[int, dg.RunRequest]] = []  # (storage id, request), oldest first
        skipped: list[str] = []
        breakers: list[str] = []
        # partition -> the newest run of the tick that opened its breaker, and its storage id
        tripped: dict[str | None, tuple[str, int]] = {}
        newest: dict[str | None, int] = {}  # partition (None: the whole table) -> storage id
        partition_of: dict[int, str | None] = {}  # storage id -> the partition it was of
        for record in records:
            materialization = record.asset_materialization
            if materialization is None:
                continue
            partition = partition_of[record.storage_id] = covers(materialization)
            newest[partition] = max(record.storage_id, newest.get(partition, record.storage_id))
            decision, opened = decide(materialization, partition)
            if isinstance(decision, dg.RunRequest):
                requests.append((record.storage_id, decision))
            elif opened:
                breakers.append(decision.skip_message or "")
                run_id = getattr(materialization.metadata.get("run_id"), "value", None)
                tripped[partition] = (str(run_id), record.storage_id)
            else:
                skipped.append(decision.skip_message or "")
        # A run needs no backfill when a newer run of its partition (of the whole table: any
        # newer run) found the differences as they are now, whether it found some or none.
        for storage_id, request in requests:
            if storage_id < newest[partition_of[storage_id]]:
                skipped.append(f"run {request.tags['trueup/run_id']} of {name} needs no "
                               f"backfill: a newer run of "
                               f"{partition_of[storage_id] or 'the table'} decides")
        requests = [(s, r) for s, r in requests if s == newest[partition_of[s]]]
        # A breaker that opened on a run holds back the tick's other runs of its partition
        # (of a reconciliation without partitions: all its runs): the next run of the
        # partition decides anew. Other partitions' runs go on as usual: their drift is theirs.
        held: dict[int, int] = {}  # storage id of a run held back -> its tripping run's
        for storage_id, request in requests:
            if (breaker := tripped.get(partition_of[storage_id])) is not None:
                held[storage_id] = breaker[1]
                breakers.append(f"held back with run {breaker[0]}: the backfill of "
                                f"{_runs([request])}")
        requests = [(s, r) for s, r in requests if s not in held]

        def deciding_again(cursor: int) -> int:
            """``cursor``, moved back where a run held back would be decided again next tick
            without the run that tripped its breaker (alone, it would be launched). A launch
            keeps its own cursor: a run held back after it, whose breaker opened before it,
            is decided again alone."""
            while early := [t for h, t in held.items() if h > cursor >= t]:
                cursor = min(early) - 1
            return cursor

        cursor = str(max(r.storage_id for r in records))  # every record decided
        launch: list[dg.RunRequest] = []
        runs = [r for _, r in requests]
        if runs:
            # One backfill per reconciliation at a time (a second one fails at once, and its
            # run would never be repaired): the oldest run goes now, the others (other
            # partitions) are decided again on later ticks.
            storage_id, first = requests[0]
            wait = str(deciding_again(storage_id - 1))  # decides them all again next tick
            backfill = blocking_backfill(config.state, name)
            if backfill is not None:  # active: wait for it; failed: paused until resumed
                breakers.append(paused_reason(name, backfill, runs))
                if BackfillStatus(backfill["status"]).active:
                    cursor = wait
            elif (launched := backfill_run_in_flight(context.instance, name)) is not None:
                status = launched.status.value.lower().replace("_", " ")
                breakers.append(
                    f"auto-repair of {name} waits: run {launched.run_id} of {launched.job_name} is "
                    f"{status} (one backfill per reconciliation at a time); not launching the "
                    f"backfill of {_runs(runs)}")
                cursor = wait
            else:
                # what follows the run launched is decided again next tick (the cursor never
                # goes back past it: it would be launched twice), a breaker after it with it
                launch, cursor = [first], str(storage_id)
        for message in breakers:
            context.log.warning(message)
        for message in skipped:
            context.log.info(message)
        if launch:
            return dg.SensorResult(run_requests=launch, cursor=cursor)
        return dg.SensorResult(skip_reason="; ".join(breakers + skipped)
                               or "not a materialization", cursor=cursor)

    return _auto_repair


def repair_definitions(config: Config, suite_tables: Collection[dg.AssetKey] | None = None
                       ) -> RepairDefinitions:
    """A repairs asset and backfill job per repairable reconciliation; sensors where
    ``auto_repair`` is set. ``suite_tables``: the tables a GX suite checks, whose failed ERROR
    checks block the auto-repair of their reconciliations (None: any table's results do)."""
    assets: list[dg.AssetsDefinition] = []
    jobs: list[Any] = []
    sensors: list[dg.SensorDefinition] = []
    for name, rec in config.reconciliations.items():
        if rec.repair is RepairMode.NONE:
            continue
        # a partitioned reconciliation: a job by day, and one for the rest (_repairs_asset)
        partitioned = partitions_of(rec) is not None
        made: dict[bool, Any] = {}
        for by_day in (True, False) if partitioned else (True,):
            assets.append(_repairs_asset(config, name, by_day=by_day))
            made[by_day] = dg.define_asset_job(
                backfill_job_name(name, by_day=by_day),
                selection=dg.AssetSelection.assets(repairs_key(name, by_day=by_day)),
                description=f"Backfill {name}: repair its target"
                            f"{_SCOPES[by_day] if partitioned else ''}.",
                tags=reconciliation_tags(name))
        jobs += made.values()
        if rec.auto_repair is not None:
            sensors.append(_sensor(config, name, made[True], suite_tables))
    return RepairDefinitions(assets=assets, jobs=jobs, sensors=sensors)
