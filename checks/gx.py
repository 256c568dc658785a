"""Great Expectations 1.x suites as Dagster asset checks on the table assets.

Suites are YAML files in ``checks/suites/`` (or the folder named by ``$TRUEUP_CHECKS_DIR``),
one per table, each naming a connection and table of the config (format in
:mod:`trueup.quality` and docs/quality.md). Every suite becomes one multi-asset check on the
table's external asset (``postgres/<connection>/<schema>/<table>``): one GX validation per
execution, one Dagster check per expectation, with GX's unexpected count and percent and a
sample of failing values as metadata. Results are also stored in ``trueup.check_results``.
A job ``quality_<connection>_<schema>_<table>`` runs a table's checks (from the UI, or a
schedule someone adds).

dagster-ge is not used: it is built on GX's pre-1.0 DataContext.
"""
# No ``from __future__ import annotations``: Dagster reads the context annotations at runtime.

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import AssetCheckExecutionContext

from assets.keys import table_key
from trueup.checks import record_check_results
from trueup.config import Config
from trueup.errors import ConfigError, TrueupError
from trueup.quality import ExpectationOutcome, Suite, load_suites, validate_suite

SUITES_ENV = "TRUEUP_CHECKS_DIR"
DEFAULT_SUITES = Path(__file__).resolve().parent / "suites"


def suites_dir() -> Path:
    """Where suites live: ``$TRUEUP_CHECKS_DIR``, else ``checks/suites``."""
    return Path(os.environ.get(SUITES_ENV) or DEFAULT_SUITES)


@dataclass(frozen=True, kw_only=True)
class QualityDefinitions:
    checks: Sequence[dg.AssetChecksDefinition]
    jobs: Sequence[Any]               # what dg.define_asset_job returns
    tables: frozenset[dg.AssetKey]    # the tables a suite checks
    suites: Sequence[Suite]           # the suites of the config's tables


def quality_job_name(suite: Suite) -> str:
    return "quality_" + "_".join(table_key(suite.connection, suite.table).path[1:])


#: How much of an observed value (a list of distinct values, say) a check's description shows.
OBSERVED_CHARS = 200


def check_result(key: dg.AssetKey, outcome: ExpectationOutcome) -> dg.AssetCheckResult:
    """The Dagster form of one expectation's outcome."""
    metadata: dict[str, Any] = {
        "expectation": outcome.type,
        "kwargs": dg.MetadataValue.json(outcome.kwargs),
        "unexpected_count": outcome.unexpected_count,
        "unexpected_percent": outcome.unexpected_percent,
        "unexpected_sample": dg.MetadataValue.json(outcome.sample),
        "element_count": outcome.element_count,
    }
    if outcome.observed_value is not None:
        metadata["observed_value"] = str(outcome.observed_value)
    if outcome.error:
        metadata["error"] = outcome.error
    # an expectation on the table or a column as a whole (a row count, a mean) has no
    # unexpected values: what it observed says why it failed
    observed = (f"observed {str(outcome.observed_value)[:OBSERVED_CHARS]}"
                if outcome.observed_value is not None else None)
    described = (f"{outcome.unexpected_count} unexpected ({outcome.unexpected_percent}%), "
                 f"e.g. {outcome.sample[:5]}" if outcome.unexpected_count else
                 outcome.error if outcome.error else
                 (observed or "no unexpected values") if outcome.passed else
                 f"failed: {observed}" if observed else "failed")
    return dg.AssetCheckResult(
        asset_key=key, check_name=outcome.name, passed=outcome.passed,
        severity=dg.AssetCheckSeverity(outcome.severity.value),
        metadata={k: v for k, v in metadata.items() if v is not None},
        description=described)


def _suite_checks(config: Config, suite: Suite) -> dg.AssetChecksDefinition:
    key = table_key(suite.connection, suite.table)
    dsn = config.connections[suite.connection].postgres
    assert dsn is not None
    specs = [dg.AssetCheckSpec(
        name=e.check_name, asset=key,
        description=f"GX {e.type}({', '.join(f'{k}={v!r}' for k, v in e.kwargs.items())}) "
                    f"[{e.severity.value}]",
        metadata={"suite": Path(suite.file).name, "expectation": e.type})
        for e in suite.expectations]

    @dg.multi_asset_check(
        specs=specs, name="gx_" + "_".join(key.path[1:]),
        description=f"Great Expectations suite {Path(suite.file).name} on {suite.table} "
                    f"(connection {suite.connection}).")
    def _gx(context: AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        try:
            outcomes = validate_suite(suite, dsn)
        except TrueupError as exc:
            # Every check of the suite failed to run: recorded as failed, or the last results
            # (passed, say) would stand in `trueup status` and not block the auto-repair.
            record_check_results(config.state, key.to_user_string(), None, None, [
                (e.check_name, False, e.severity, {"error": str(exc)})
                for e in suite.expectations])
            raise dg.Failure(description=str(exc)) from exc
        record_check_results(config.state, key.to_user_string(), None, None, [
            (o.name, o.passed, o.severity, o.metadata()) for o in outcomes])
        for outcome in outcomes:
            context.log.info(f"{suite.table} {outcome.name}: "
                             f"{'passed' if outcome.passed else 'FAILED'} "
                             f"unexpected={outcome.unexpected_count}")
            yield check_result(key, outcome)

    return _gx


def quality_definitions(config: Config, directory: str | Path | None = None
                        ) -> QualityDefinitions:
    """Asset checks and a job for every suite whose table is in ``config``."""
    suites = load_suites(directory or suites_dir(), config)
    seen: dict[dg.AssetKey, str] = {}
    named: dict[str, Suite] = {}  # job name -> the suite it runs
    checks, jobs = [], []
    for suite in suites:
        key = table_key(suite.connection, suite.table)
        if key in seen:
            raise ConfigError(suite.file, "table",
                              f"expected one suite per table ({seen[key]} already checks "
                              f"{suite.connection}.{suite.table})")
        seen[key] = suite.file
        job = quality_job_name(suite)
        other = named.setdefault(job, suite)
        if other is not suite:
            # the names join the key's parts with "_": shop/a_b/c and shop/a/b_c meet
            raise ConfigError(suite.file, "table", (
                f"expected a table whose job name differs from that of {other.table} "
                f"({other.file}): both make {job}"))
        checks.append(_suite_checks(config, suite))
        jobs.append(dg.define_asset_job(
            job, selection=dg.AssetSelection.checks_for_assets(key),
            description=f"Run the Great Expectations suite of {suite.table}."))
    return QualityDefinitions(checks=checks, jobs=jobs, tables=frozenset(seen), suites=suites)
