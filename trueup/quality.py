"""Data-quality suites: Great Expectations 1.x expectations on Postgres tables.

A suite is a YAML file naming a table (a connection of the config and a table in it) and a
list of GX expectations with their keyword arguments::

    connection: shop
    table: public.orders
    expectations:
      - type: expect_column_values_to_be_between
        kwargs: {column: amount_cents, min_value: 0}
      - type: expect_column_values_to_be_in_set
        kwargs: {column: currency, value_set: [EUR, USD]}
        severity: WARN            # ERROR (the default) or WARN
        name: known_currency      # the check's name; derived from type and column if absent

:func:`validate_suite` runs the suite against the real table through SQLAlchemy, with GX's own
API (an ephemeral context, a Postgres data source, a whole-table batch), and returns one
:class:`ExpectationOutcome` per expectation: passed or not, GX's unexpected count and percent,
and a sample of the failing values. Nothing here knows about Dagster (see ``checks/gx.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from trueup.config import Config, ConnectionKind, TableName, load_yaml
from trueup.db import first_line, redact, scrubbed, sqlalchemy_url
from trueup.errors import ConfigError, TrueupError
from trueup.runs import json_value
from trueup.statuses import CheckSeverity

SUITE_SUFFIXES = (".yaml", ".yml")
#: Part of every marker's name: change it when what decides a suite's acceptance here
#: (:func:`_expectation`) changes, so that older markers are no longer found.
_MARKER_SCHEME = "2"
#: Where markers of suites GX accepted are kept (see :func:`check_expectations`).
CACHE_DIR_ENV = "TRUEUP_CACHE_DIR"
#: Failing values kept per expectation (GX's ``partial_unexpected_list``).
SAMPLE_SIZE = 20
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHORT_PREFIXES = ("expect_column_values_to_", "expect_column_", "expect_table_", "expect_")


class QualityFailed(TrueupError):
    """A suite could not be run (the table is unreachable, an expectation is malformed)."""


class ExpectationSpec(BaseModel):
    """One expectation of a suite: GX's snake_case type and its keyword arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    severity: CheckSeverity = CheckSeverity.ERROR
    name: str | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if not value.startswith("expect_"):
            raise ValueError(f"expected a GX expectation type like "
                             f"expect_column_values_to_not_be_null (got {value!r})")
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"expected letters, digits and underscores (got {value!r})")
        return value

    @property
    def check_name(self) -> str:
        """The name of the check: ``name``, else ``<column>__<short type>``."""
        if self.name:
            return self.name
        short = self.type
        for prefix in _SHORT_PREFIXES:
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        column = self.kwargs.get("column")
        if isinstance(column, str):
            return re.sub(r"[^A-Za-z0-9_]", "_", f"{column}__{short}")
        return short

    @property
    def columns(self) -> list[tuple[str, str]]:
        """The table columns the expectation reads, each with where its kwargs name it
        (``column``, ``column_list[1]``): columns it needs, none for an expectation about
        which columns the table has (their absence is what it reports)."""
        if self.type in _TABLE_SHAPE:
            return []
        found = [(arg, value) for arg in _COLUMN_ARGS
                 if isinstance(value := self.kwargs.get(arg), str)]
        listed = self.kwargs.get("column_list")
        if isinstance(listed, list):
            found += [(f"column_list[{i}]", v) for i, v in enumerate(listed)
                      if isinstance(v, str)]
        return found


#: The kwargs of GX 1.x expectations that name one column the expectation reads.
_COLUMN_ARGS = ("column", "column_A", "column_B")
#: GX 1.x expectations whose columns are what they check the table for, not what they read.
_TABLE_SHAPE = frozenset({"expect_column_to_exist", "expect_table_columns_to_match_set",
                          "expect_table_columns_to_match_ordered_list"})


_TABLE: TypeAdapter[str] = TypeAdapter(TableName)


class Suite(BaseModel):
    """A table and the expectations its rows must meet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connection: str
    table: TableName  # "orders" reads as "public.orders", as in the config
    expectations: list[ExpectationSpec] = Field(min_length=1)
    file: str = ""

    @property
    def schema_name(self) -> str:
        return self.table.partition(".")[0] if "." in self.table else "public"

    @property
    def table_name(self) -> str:
        return self.table.rpartition(".")[2]


@dataclass(frozen=True, kw_only=True)
class ExpectationOutcome:
    """The result of one expectation on one table."""

    name: str
    type: str
    passed: bool
    severity: CheckSeverity
    element_count: int | None
    unexpected_count: int | None
    unexpected_percent: float | None
    sample: list[Any]
    observed_value: Any
    kwargs: dict[str, Any]
    error: str | None = None

    def metadata(self) -> dict[str, Any]:
        """What a check result carries (and what ``trueup.check_results`` stores)."""
        return {
            "expectation": self.type, "kwargs": self.kwargs,
            "element_count": self.element_count,
            "unexpected_count": self.unexpected_count,
            "unexpected_percent": self.unexpected_percent,
            "unexpected_sample": self.sample, "observed_value": self.observed_value,
            **({"error": self.error} if self.error else {}),
        }


def read_suite(path: Path) -> Suite:
    """Read one suite file and validate its shape (not yet what GX makes of it: see
    :func:`check_expectations`); a bad value raises a one-line :class:`ConfigError`."""
    return _suite_of(path, _read_yaml(path))


def _read_yaml(path: Path) -> Any:
    try:
        # a safe loader (no arbitrary objects) whose errors are YAMLErrors: a value its tag
        # cannot read, or lists nested too deeply, are the suite's mistake, in one line
        return load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "", f"the suite file is not UTF-8 text: {exc.reason} at "
                                         f"byte {exc.start}") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), "",
                          f"expected a readable YAML suite ({first_line(exc)})") from exc


def _suite_of(path: Path, raw: Any) -> Suite:
    file = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "expected a mapping with connection, table, expectations")
    try:
        suite = Suite.model_validate({**raw, "file": file})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(file, where, err["msg"]) from None
    names = [e.check_name for e in suite.expectations]
    signatures = [_signature(e.type, e.kwargs) for e in suite.expectations]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(file, f"expectations.{i}.name",
                              f"expected a unique check name ({name!r} is used twice)")
        if signatures[i] in signatures[:i]:
            # GX keeps one of two equal expectations: the other would have no result
            raise ConfigError(file, f"expectations.{i}", "expected each expectation once (the "
                              f"same {suite.expectations[i].type} and kwargs as expectations."
                              f"{signatures.index(signatures[i])})")
    return suite


def check_expectations(suite: Suite) -> Suite:
    """Build every expectation of ``suite`` with GX: an unknown type or kwargs GX rejects raise
    a one-line :class:`ConfigError` naming the file and the expectation.

    Importing GX costs seconds of CPU, and every process that loads the code location (the
    code server, then each run's) checks its suites. Expectations GX accepted once are
    remembered by an empty marker file in the cache directory, named by a hash of them (every
    value with its type) and of what judged them (GX's and pydantic's versions, the Python
    environment), and not built again; a suite GX rejects is never remembered.
    """
    marker = _accepted_marker(suite)
    try:
        if marker is not None and marker.exists():
            return suite
    except OSError:  # a cache folder it may not enter: check, and remember nothing
        marker = None
    built: list[Any] = []
    for i, spec in enumerate(suite.expectations):
        try:
            expectation = _expectation(spec)
        except QualityFailed as exc:
            raise ConfigError(suite.file, f"expectations.{i}", str(exc)) from None
        # GX keeps one of two expectations it takes for equal (0 and 0.0, a default written
        # out): the other would have no result, and every run of the suite would fail
        same = next((j for j, other in enumerate(built) if _equalish(other, expectation)), None)
        if same is not None:
            raise ConfigError(suite.file, f"expectations.{i}", (
                f"expected each expectation once (GX takes this {spec.type} for "
                f"expectations.{same}: the same kwargs once its defaults are applied)"))
        built.append(expectation)
    if marker is not None:
        with contextlib.suppress(OSError):  # an unwritable cache only costs the next check
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    return suite


def cache_dir() -> Path:
    """``$TRUEUP_CACHE_DIR``, else ``trueup`` in ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trueup"


def _accepted_marker(suite: Suite) -> Path | None:
    """The marker of ``suite``'s expectations as this environment's GX judges them; None when
    there is none to be had (then the suite is checked every time)."""
    try:
        judges = [sys.prefix, _MARKER_SCHEME, *(importlib.metadata.version(package)
                                                for package in ("great_expectations",
                                                                "pydantic"))]
        expectations = _typed([[spec.type, spec.kwargs] for spec in suite.expectations])
        digest = hashlib.sha256(repr([judges, expectations]).encode()).hexdigest()
        return cache_dir() / "gx-accepted" / digest
    except (importlib.metadata.PackageNotFoundError, RuntimeError, OSError):
        return None  # no GX, or no home folder to keep a cache in


def _typed(value: Any) -> Any:
    """``value`` with every part's type spelled out, so that values of different types never
    read alike (a date and the string of its repr, ``1`` and ``"1"``), and mappings in a fixed
    order whatever their keys' types."""
    if isinstance(value, dict):
        return ("dict", sorted(((repr(_typed(k)), _typed(v)) for k, v in value.items()),
                               key=lambda item: item[0]))
    if isinstance(value, list | tuple | set | frozenset):
        parts = [_typed(v) for v in value]
        if isinstance(value, set | frozenset):
            parts.sort(key=repr)
        return (type(value).__name__, parts)
    return (type(value).__module__, type(value).__qualname__, repr(value))


def load_suite(path: Path) -> Suite:
    """Read one suite file and check its expectations with GX (:func:`read_suite`, then
    :func:`check_expectations`)."""
    return check_expectations(read_suite(path))


def load_suites(directory: str | Path, config: Config | None = None) -> list[Suite]:
    """Every suite in ``directory`` (sorted by file name); a missing directory has none.
    With ``config``, only the suites of its tables (:func:`suites_for`), and only theirs are
    checked with GX."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    paths = [p for p in sorted(folder.iterdir()) if p.suffix in SUITE_SUFFIXES and p.is_file()]
    ours = _tables_of(config) if config is not None else None
    suites = []
    for path in paths:
        raw = _read_yaml(path)
        # a suite another config's table names is not read further: its mistakes are not
        # this config's to report (a file whose table cannot be told is read, and reported)
        if ours is not None and (table := _table_named(raw)) is not None and table not in ours:
            continue
        suites.append(_suite_of(path, raw))
    if config is not None:
        suites = suites_for(config, suites)
    return [check_expectations(s) for s in suites]


def _table_named(raw: Any) -> tuple[str, str] | None:
    """The (connection, table) a suite file's YAML names, when it can be told without
    validating the rest of it."""
    if isinstance(raw, dict) and isinstance(raw.get("connection"), str):
        with contextlib.suppress(ValidationError):
            return raw["connection"], _TABLE.validate_python(raw.get("table"))
    return None


def _tables_of(config: Config) -> set[tuple[str, str]]:
    """The (connection, table) of every Postgres table ``config`` reconciles."""
    tables = {(r.source.connection, r.source.table) for r in config.reconciliations.values()}
    tables |= {(r.target.connection, r.target.table) for r in config.reconciliations.values()
               if r.target.table is not None}
    return {(c, t) for c, t in tables
            if c in config.connections
            and config.connections[c].kind is ConnectionKind.POSTGRES}


def suites_for(config: Config, suites: Sequence[Suite]) -> list[Suite]:
    """The suites whose table is a Postgres table of ``config`` (source or target)."""
    tables = _tables_of(config)
    return [s for s in suites if (s.connection, s.table) in tables]


def _expectation(spec: ExpectationSpec) -> Any:
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        cls = get_expectation_impl(spec.type)
    except Exception as exc:
        raise QualityFailed(f"type: unknown GX expectation {spec.type!r}") from exc
    try:
        return cls(**spec.kwargs)
    except Exception as exc:
        raise QualityFailed(f"kwargs: not valid for {spec.type}: "
                            f"{first_line(exc)}") from exc


#: What GX 1.x leaves out when it tells whether a suite holds an expectation already
#: (ExpectationSuite._expectations_are_equalish): these do not make two expectations apart.
_NOT_TELLING_APART = {"id", "rendered_content", "notes", "meta"}


def _equalish(a: Any, b: Any) -> bool:
    """Whether a GX suite takes expectations ``a`` and ``b`` for one (and keeps only one)."""
    return bool(a.expectation_type == b.expectation_type
                and a.dict(exclude=_NOT_TELLING_APART) == b.dict(exclude=_NOT_TELLING_APART))


def _raised(exception_info: Any) -> str | None:
    """The message of an expectation that raised. GX 1.x gives ``{"raised_exception": ...}``
    for the expectation itself, and one such mapping per metric (keyed by the metric's id)
    when a metric failed, as when the column does not exist."""
    if not isinstance(exception_info, dict):
        return None
    for info in (exception_info, *exception_info.values()):
        if isinstance(info, dict) and info.get("raised_exception"):
            # the first line: SQLAlchemy appends the statement and its parameters
            message = str(info.get("exception_message") or "").strip()
            return message.splitlines()[0] if message else "expectation raised"
    return None


def validate_suite(suite: Suite, dsn: str) -> list[ExpectationOutcome]:
    """Run ``suite`` against its table at ``dsn``; one outcome per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    gx_suite = gx.ExpectationSuite(name=f"{suite.connection}.{suite.table}")
    expectations = [_expectation(spec) for spec in suite.expectations]
    for expectation in expectations:
        gx_suite.add_expectation(expectation)
    try:
        source = context.data_sources.add_postgres(
            suite.connection, connection_string=sqlalchemy_url(dsn))
        with warnings.catch_warnings():
            # GX 1.x would rather have the schema in the connection's search_path; a table
            # asset per schema-qualified table is clearer and still supported
            warnings.filterwarnings("ignore", "`schema_name` is deprecated", DeprecationWarning)
            # a name in quotes is GX's case-sensitive one ("Orders", as the config means it)
            asset = source.add_table_asset(suite.table, table_name=_gx_name(suite.table_name),
                                           schema_name=suite.schema_name)
        batch = asset.add_batch_definition_whole_table("whole_table").get_batch()
        result = batch.validate(gx_suite, result_format={
            "result_format": "SUMMARY", "partial_unexpected_count": SAMPLE_SIZE})
    except QualityFailed:
        raise
    except Exception as exc:
        raise QualityFailed(f"{suite.file or suite.table}: cannot validate {suite.table} at "
                            f"{redact(dsn)}: {scrubbed(first_line(exc), dsn)}") from exc
    outcomes = []
    for spec, res in _pair(suite.expectations, expectations, result.results):
        info: dict[str, Any] = dict(res.result or {})
        error = _raised(getattr(res, "exception_info", None))
        percent = info.get("unexpected_percent")
        outcomes.append(ExpectationOutcome(
            name=spec.check_name, type=spec.type, passed=bool(res.success),
            severity=spec.severity, element_count=info.get("element_count"),
            unexpected_count=info.get("unexpected_count"),
            unexpected_percent=round(float(percent), 4) if percent is not None else None,
            # plain JSON (a numeric's Decimal, a date: Dagster's JSON metadata refuses them)
            sample=json_value(list(info.get("partial_unexpected_list") or [])[:SAMPLE_SIZE]),
            observed_value=json_value(info.get("observed_value")),
            kwargs=json_value(dict(spec.kwargs)), error=error))
    return outcomes


def _gx_name(name: str) -> str:
    return name if name == name.lower() else f'"{name}"'


def _signature(type_: str, kwargs: dict[str, Any]) -> str:
    return repr((type_, sorted((k, repr(v)) for k, v in kwargs.items() if k != "batch_id")))


def _pair(specs: Sequence[ExpectationSpec], expectations: Sequence[Any],
          results: Sequence[Any]) -> list[tuple[ExpectationSpec, Any]]:
    """Each spec with its GX result (GX does not promise to keep the suite's order)."""
    waiting: dict[str, list[Any]] = {}
    for res in results:
        config = res.expectation_config
        waiting.setdefault(_signature(config.type, dict(config.kwargs)), []).append(res)
    pairs = []
    for spec, expectation in zip(specs, expectations, strict=True):
        config = expectation.configuration
        found = waiting.get(_signature(config.type, dict(config.kwargs))) or []
        if not found:
            raise QualityFailed(f"GX returned no result for {spec.type} {spec.kwargs}")
        pairs.append((spec, found.pop(0)))
    return pairs
