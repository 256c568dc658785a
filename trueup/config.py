"""The ``trueup.yaml`` config file: interpolation, typed models and validation.

The file format is a contract (see docs/config.md). Every bad value is reported as one line
naming the file, the field path and what is expected; see :mod:`trueup.errors`. Checks that need
the services themselves (does this table exist?) live in :mod:`trueup.validate`.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from trueup.db import redact
from trueup.errors import ConfigError, ConfigErrors, NotFound
from trueup.messages import describe_pydantic_error

DEFAULT_CONFIG = "trueup.yaml"
CONFIG_ENV = "TRUEUP_CONFIG"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_NAME_MAX = 63  # characters: a reconciliation's name names its Kafka mirror's table
_NAME = re.compile(rf"^[A-Za-z_][A-Za-z0-9_]{{0,{_NAME_MAX - 1}}}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: Where a cron expression is asked for its next time, to prove it has one.
_CRON_PROBE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: A duration with a unit, or bare seconds (``${GRACE:-60}`` gives the text "60").
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest duration a config may give (a grace, a retry delay): a year.
MAX_DURATION = dt.timedelta(days=366)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# ---------------------------------------------------------------------------------------------
# Field types


def _duration(value: Any) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 500ms, 30s, 10m, 1h or 2d (got {value!r})")
    seconds: float | None = None
    if isinstance(value, int | float) and value >= 0:
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS_SECONDS[match.group(2) or "s"]
    if seconds is None:
        raise ValueError(f"expected a duration such as 500ms, 30s, 10m, 1h or 2d (got {value!r})")
    if not seconds <= MAX_DURATION.total_seconds():  # also false for nan
        raise ValueError(f"expected a duration of at most {MAX_DURATION.days} days "
                         f"(got {value!r})")
    return dt.timedelta(seconds=seconds)


def _identifier(value: str) -> str:
    if not _IDENT.match(value):
        raise ValueError(
            f"expected a SQL identifier (letters, digits, _ and $, not starting with a digit, "
            f"at most 63 characters; got {value!r})"
        )
    return value


def _table_name(value: str) -> str:
    parts = value.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"expected a table name such as public.orders or orders (got {value!r})")
    return value if len(parts) == 2 else f"public.{value}"


def _topic_name(value: str) -> str:
    if not _TOPIC.match(value) or value in {".", ".."}:
        raise ValueError(
            f"expected a Kafka topic name of letters, digits, '.', '_' and '-' (got {value!r})"
        )
    return value


def _cron(value: str) -> str:
    # only configs with a schedule pay for its import
    from croniter import CroniterBadDateError, croniter

    if not croniter.is_valid(value) or len(value.split()) != 5:
        raise ValueError(
            f"expected a 5-field cron expression such as '*/30 * * * *' (got {value!r})"
        )
    try:  # a day no month has (31 2, 31 4,6): Dagster refuses some, freshness all
        croniter(value, _CRON_PROBE).get_next()
    except CroniterBadDateError:
        raise ValueError(f"expected a cron expression that fires (got {value!r}, which names "
                         f"a day its months do not have)") from None
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        # say how long it is: 64 good characters look like a name of good characters
        length = f", {len(value)} characters" if len(value) > _NAME_MAX else ""
        raise ValueError(
            f"expected a name of letters, digits and underscores, not starting with a digit, "
            f"at most {_NAME_MAX} characters (got {value!r}{length})"
        )
    return value


def _columns_mapping(value: Any) -> Any:
    """Target columns may be a list (same names as the source) or a mapping source -> target."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {v: v for v in value}
    return value


def _not_bool(expected: str) -> Callable[[Any], Any]:
    """A check for a number field: pydantic's lax mode reads true as 1, which a count or a
    multiplier never means (digit strings pass: ``${ATTEMPTS:-5}`` gives the text "5")."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected} (got {str(value).lower()})")
        return value

    return check


def _client_property(value: Any) -> Any:
    if not isinstance(value, str | int | float | bool):  # one line, not one per kind
        shown = "null" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"expected a string, a number or true/false (got {shown})")
    return value


def _amqp_url(url: str) -> str:
    """Refuse what keeps ``url`` from naming a RabbitMQ to connect to: its host and port are
    read here, not first when a command connects (where pika raised a bare ValueError). The
    query's options are pika's to read."""
    shown = redact(url)
    if not url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"expected an amqp:// URL for rabbitmq (got {shown!r})")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ValueError(f"expected an amqp:// URL for rabbitmq (got {shown!r}: "
                         f"{str(exc)[:1].lower()}{str(exc)[1:]})") from None
    try:
        port_ok = parts.port != 0
    except ValueError:  # not a number, or past 65535
        port_ok = False
    if not port_ok:
        raise ValueError(f"expected a port from 1 to 65535 in the rabbitmq URL (got {shown!r})")
    return url


Duration = Annotated[dt.timedelta, BeforeValidator(_duration)]
ClientProperty = Annotated[str | int | float | bool, BeforeValidator(_client_property)]
Identifier = Annotated[str, AfterValidator(_identifier)]
TableName = Annotated[str, AfterValidator(_table_name)]
TopicName = Annotated[str, AfterValidator(_topic_name)]
Cron = Annotated[str, AfterValidator(_cron)]
Name = Annotated[str, AfterValidator(_name)]
#: A count greater than 0 (max_attempts, max_differences), never true or false.
Count = Annotated[PositiveInt, BeforeValidator(_not_bool("an integer"))]
NonEmptyStr = Annotated[str, Field(min_length=1)]
AmqpUrl = Annotated[str, Field(min_length=1), AfterValidator(_amqp_url)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Connections


class ConnectionKind(StrEnum):
    POSTGRES = "postgres"
    KAFKA = "kafka"
    RABBITMQ = "rabbitmq"


class ConnectionConfig(_Model):
    """One named connection: exactly one of ``postgres``, ``kafka`` or ``rabbitmq``."""

    postgres: NonEmptyStr | None = None
    kafka: dict[str, ClientProperty] | None = None
    rabbitmq: AmqpUrl | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ConnectionConfig:
        given = [k for k in ConnectionKind if getattr(self, k.value) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of postgres, kafka or rabbitmq")
        if self.postgres is not None and not self.postgres.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError(
                "expected a postgresql:// connection URL for postgres "
                f"(got {redact(self.postgres)!r})"
            )
        if self.kafka is not None and not self.kafka.get("bootstrap.servers"):
            raise ValueError("expected kafka properties with bootstrap.servers")
        return self

    @property
    def kind(self) -> ConnectionKind:
        return next(k for k in ConnectionKind if getattr(self, k.value) is not None)


# ---------------------------------------------------------------------------------------------
# Reconciliations


class RepairMode(StrEnum):
    REPUBLISH = "republish"
    UPSERT = "upsert"
    NONE = "none"


class SourceConfig(_Model):
    """The source of truth: a Postgres table."""

    connection: Name
    table: TableName
    key: Annotated[list[Identifier], Field(min_length=1)]
    version: Identifier | None = None
    updated_at: Identifier | None = None
    columns: Annotated[list[Identifier], Field(min_length=1)]

    @model_validator(mode="after")
    def _distinct(self) -> SourceConfig:
        _require_distinct(self.key + self.columns, "key and columns")
        return self


class ConsumerConfig(_Model):
    """The Kafka consumer group that writes a target table from a topic: differences its lag
    does not yet cover are in flight."""

    connection: Name
    topic: TopicName
    group: NonEmptyStr


class TargetConfig(_Model):
    """The copy: a Postgres table or a Kafka topic. ``columns`` maps source -> target names."""

    connection: Name
    table: TableName | None = None
    topic: TopicName | None = None
    format: Literal["json"] | None = None
    key: Annotated[list[NonEmptyStr], Field(min_length=1)]
    version: NonEmptyStr | None = None
    columns: Annotated[dict[Identifier, NonEmptyStr], BeforeValidator(_columns_mapping)]
    consumer: ConsumerConfig | None = None

    @model_validator(mode="after")
    def _table_or_topic(self) -> TargetConfig:
        if (self.table is None) == (self.topic is None):
            raise ValueError("expected exactly one of table or topic")
        if self.topic is not None and self.consumer is not None:
            raise ValueError("consumer applies to a table target: a topic target is read to "
                             "its end by each run itself")
        if self.table is not None:
            if self.format is not None:
                raise ValueError("format applies to a topic, not a table")
            for name in [*self.key, *self.columns.values(), *filter(None, [self.version])]:
                _identifier(name)
        _require_distinct(self.key + list(self.columns.values()), "key and columns")
        return self

    @property
    def is_topic(self) -> bool:
        return self.topic is not None


_DAY_TEXT = re.compile(r"\d{4}-\d{2}-\d{2}")


def _day(value: Any) -> Any:
    """A day written as a date, ``YYYY-MM-DD``: pydantic reads a number, or a text of one
    (what ``${START:-0}`` gives), as seconds since 1970 (0 would be 1970-01-01), and a
    timestamp's text as its day."""
    if isinstance(value, dt.date) or (isinstance(value, str) and _DAY_TEXT.fullmatch(value)):
        return value
    raise ValueError(f"expected a date such as 2026-01-01 (got {value!r})")


class DailyPartitions(_Model):
    start: Annotated[dt.date, BeforeValidator(_day)]


class PartitionsConfig(_Model):
    daily: DailyPartitions


class AutoRepairConfig(_Model):
    max_differences: Count


class ReconciliationConfig(_Model):
    source: SourceConfig
    target: TargetConfig
    grace: Duration = dt.timedelta(0)
    partitions: PartitionsConfig | None = None
    schedule: Cron | None = None
    repair: RepairMode = RepairMode.NONE
    auto_repair: AutoRepairConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ReconciliationConfig:
        if len(self.source.key) != len(self.target.key):
            raise ValueError(
                f"expected source.key and target.key of the same length "
                f"(got {len(self.source.key)} and {len(self.target.key)})"
            )
        if set(self.target.columns) != set(self.source.columns):
            raise ValueError(
                "expected target.columns to map every source column and only those "
                f"(source: {', '.join(self.source.columns)}; "
                f"target maps: {', '.join(self.target.columns)})"
            )
        if self.target.version is not None and self.source.version is None:
            raise ValueError("target.version needs source.version to compare against")
        if self.partitions is not None and self.source.updated_at is None:
            raise ValueError("partitions need source.updated_at (the column a day is cut on)")
        if self.grace and self.source.updated_at is None:
            raise ValueError("grace needs source.updated_at (the column that says a row was "
                             "updated within it)")
        if self.target.consumer is not None and self.source.updated_at is None:
            raise ValueError("target.consumer needs source.updated_at (the column that says "
                             "a row was updated after what the consumer has read)")
        if self.repair is RepairMode.UPSERT and self.target.is_topic:
            raise ValueError("repair: upsert needs a table target; use republish for a topic")
        if self.repair is RepairMode.REPUBLISH and not self.target.is_topic:
            raise ValueError("repair: republish needs a topic target; use upsert for a table")
        if self.auto_repair is not None and self.repair is RepairMode.NONE:
            raise ValueError("auto_repair needs repair: upsert or republish")
        return self


# ---------------------------------------------------------------------------------------------
# Dead letters


class BackoffConfig(_Model):
    initial: Duration = dt.timedelta(seconds=1)
    multiplier: Annotated[float, Field(ge=1), BeforeValidator(_not_bool("a number"))] = 2.0
    max: Duration = dt.timedelta(minutes=10)


def _replay_to(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class ReplayTo(_Model):
    """Where replayed dead letters go: a topic or queue ``name``, or an exchange and routing key."""

    name: NonEmptyStr | None = None
    exchange: NonEmptyStr | None = None
    routing_key: str = ""

    @model_validator(mode="after")
    def _one(self) -> ReplayTo:
        if (self.name is None) == (self.exchange is None):
            raise ValueError("expected a topic or queue name, or {exchange, routing_key}")
        if self.name is not None and "routing_key" in self.model_fields_set:
            raise ValueError("a routing_key goes with an exchange; a topic or queue name "
                             "takes none")
        return self


class DeadLetterConfig(_Model):
    connection: Name
    topic: TopicName | None = None
    queue: NonEmptyStr | None = None
    replay_to: Annotated[ReplayTo | None, BeforeValidator(_replay_to)] = None
    max_attempts: Count = 5
    backoff: BackoffConfig = BackoffConfig()
    parking: NonEmptyStr | None = None

    @property
    def held_in(self) -> tuple[str, str]:
        """Where the dead letters are: ``("topic", name)`` or ``("queue", name)``."""
        if self.topic is not None:
            return "topic", self.topic
        assert self.queue is not None
        return "queue", self.queue

    @model_validator(mode="after")
    def _topic_or_queue(self) -> DeadLetterConfig:
        if (self.topic is None) == (self.queue is None):
            raise ValueError("expected exactly one of topic or queue")
        if self.topic is not None and self.replay_to and self.replay_to.exchange:
            raise ValueError("a Kafka dead-letter topic replays to a topic name, not an exchange")
        kind, own = self.held_in
        if self.replay_to is not None and self.replay_to.name == own:
            raise ValueError(f"expected replay_to to name where the letters go back to, not "
                             f"the dead-letter {kind} {own!r} itself")
        if self.parking == own:
            raise ValueError(f"expected parking to name another {kind} than the dead-letter "
                             f"{kind} {own!r} itself")
        if self.topic is not None:
            named = {"parking": self.parking,
                     "replay_to": self.replay_to.name if self.replay_to else None}
            for field, name in named.items():
                try:
                    if name is not None:
                        _topic_name(name)
                except ValueError as exc:
                    raise ValueError(f"{field}: {exc}") from None
        return self


# ---------------------------------------------------------------------------------------------
# The whole file


class Config(_Model):
    state: NonEmptyStr
    connections: dict[Annotated[str, AfterValidator(_name)], ConnectionConfig]
    reconciliations: dict[Annotated[str, AfterValidator(_name)], ReconciliationConfig] = {}
    dead_letters: dict[Annotated[str, AfterValidator(_name)], DeadLetterConfig] = {}
    # The file the config was read from, for messages. Not a field: a `path:` in the file is
    # an unknown field like any other. load_config passes it as the validation context.
    _path: str = PrivateAttr(default=DEFAULT_CONFIG)

    def model_post_init(self, context: Any, /) -> None:
        if isinstance(context, dict) and isinstance(context.get("path"), str):
            self._path = context["path"]

    @property
    def path(self) -> str:
        """The config file this was read from."""
        return self._path

    def connection(self, name: str) -> ConnectionConfig:
        return self.connections[name]

    def reconciliation(self, name: str) -> ReconciliationConfig:
        try:
            return self.reconciliations[name]
        except KeyError:
            known = ", ".join(sorted(self.reconciliations)) or "none"
            raise NotFound(
                f"{self.path}: no reconciliation named {name!r} (known: {known})"
            ) from None

    def dead_letter(self, name: str) -> DeadLetterConfig:
        try:
            return self.dead_letters[name]
        except KeyError:
            known = ", ".join(sorted(self.dead_letters)) or "none"
            raise NotFound(
                f"{self.path}: no dead-letter queue named {name!r} (known: {known})"
            ) from None


def config_path(explicit: str | None = None) -> str:
    """The config file to read: ``--config``, else ``$TRUEUP_CONFIG``, else ``./trueup.yaml``."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_config(path: str | os.PathLike[str], environ: dict[str, str] | None = None) -> Config:
    """Read, interpolate and validate a config file; raise :class:`ConfigErrors` when bad."""
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"the config file is not UTF-8 text: {exc.reason} at byte "
                                    f"{exc.start}") from exc
    return parse_config(text, file, os.environ if environ is None else environ)


#: What a YAML document nested past what PyYAML's recursive reader can follow (a few hundred
#: ``[`` or mappings within each other) is refused with: Python's stack, not the text, ends.
TOO_DEEP = "lists or mappings nested too deeply"


class SafeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, raising a :class:`yaml.YAMLError` that names the line for a
    value its tag cannot read, where PyYAML's constructors raise a bare ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError) as exc:
            # PyYAML's scalar constructors raise these for a value their tag cannot read
            # (!!int abc, !!float abc, !!bool maybe, 0x_): one line naming where it is
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = f"{node.value!r} " if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value}as {tag}", node.start_mark) from exc


def load_yaml(text: str, loader: type[SafeYamlLoader] = SafeYamlLoader) -> Any:
    """``text`` read as YAML; a document nested too deeply (see :data:`TOO_DEEP`) raises a
    :class:`yaml.YAMLError` naming the line it was read to, like any other bad YAML."""
    reader = loader(text)
    try:
        return reader.get_single_data()
    except RecursionError:
        raise yaml.MarkedYAMLError(problem=TOO_DEEP, problem_mark=reader.get_mark()) from None
    finally:
        reader.dispose()


class _UniqueKeyLoader(SafeYamlLoader):
    """YAML whose mappings may not repeat a key: a second ``orders:`` under
    ``reconciliations`` would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a << merge: its keys may be overridden, as YAML says
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the SafeLoader refuses it itself
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # A day no calendar has (2026-02-30, 2026-13-01) stays text, for the field that reads
        # it to refuse as it refuses any bad date, naming itself.
        value = self.construct_scalar(node)
        if self.timestamp_regexp.match(value):
            try:
                return super().construct_yaml_timestamp(node)
            except ValueError:
                pass
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp",
                                 _UniqueKeyLoader.construct_yaml_timestamp)


def parse_config(text: str, file: str, environ: Any) -> Config:
    try:
        raw = load_yaml(text, _UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(file, where, f"expected valid YAML ({problem})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "expected a mapping with state, connections, reconciliations")
    if _expands_past(raw, MAX_VALUES):
        raise ConfigError(file, "", f"expected at most {MAX_VALUES:,} values once YAML aliases "
                                    f"are expanded (aliases nested within aliases?)")
    errors = [ConfigError(file, p, m) for p, m in _names_not_text(raw, "")]
    if errors:
        raise ConfigErrors(errors)

    errors = []
    raw = _interpolate(raw, "", environ, lambda p, m: errors.append(ConfigError(file, p, m)))
    if errors:
        raise ConfigErrors(errors)
    try:
        config = Config.model_validate(raw, context={"path": file})
    except ValidationError as exc:
        raise ConfigErrors(
            [ConfigError(file, *describe_pydantic_error(err, Config)) for err in exc.errors()]
        ) from None
    errors = [ConfigError(file, p, m) for p, m in _cross_references(config)]
    if errors:
        raise ConfigErrors(errors)
    return config


#: The most values (mappings, lists and scalars) a config may hold with its YAML aliases
#: expanded: a few aliases nested within each other (the "billion laughs") expand to more than
#: any walk of the tree could finish.
MAX_VALUES = 100_000


def _expands_past(root: Any, limit: int) -> bool:
    """Whether ``root`` holds more than ``limit`` values, counted as a walk would meet them
    (an alias's value once per use); stops counting at the limit."""
    stack, seen = [root], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _interpolate(node: Any, path: str, environ: Any, fail: Callable[[str, str], None]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the tree."""
    if isinstance(node, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else str(k), environ, fail)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", environ, fail) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                fail(path, f"environment variable {name} is not set (use ${{{name}:-default}})")
                return ""
            return default
        return str(value)

    return _VARIABLE.sub(substitute, node)


#: The columns a topic's mirror (and the stage of its sync) keeps beside the key columns, which
#: are named as the source's: a key column may not take one of these names.
MIRROR_COLUMNS = frozenset({
    "version", "fingerprint", "row_hash", "native_hash", "kafka_partition", "kafka_offset",
    "message_key", "tombstone", "fields", "reason", "native"})


#: What YAML (1.1, PyYAML's) makes of an unquoted name that is not text, as a user wrote it.
_YAML_WORDS = {True: ("true", "yes, on or true", "true"),
               False: ("false", "no, off or false", "false"), None: ("null", "null or ~", "null")}


def _names_not_text(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every mapping key of the document that YAML did not read as text (every name and
    field of the config is text): ``no:`` is the boolean false, ``null:`` is null, ``5:`` a
    number, each shown as written and told to be quoted."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _names_not_text(item, f"{path}[{i}]")
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if isinstance(key, str):
            yield from _names_not_text(value, f"{path}.{key}" if path else key)
            continue
        if isinstance(key, bool) or key is None:
            word, spellings, read_as = _YAML_WORDS[key]
            why = f"YAML reads an unquoted {spellings} as {read_as}"
        else:
            kind = ("a number" if isinstance(key, int | float) else "a date"
                    if isinstance(key, dt.date) else f"a {type(key).__name__}")
            word, why = str(key), f"YAML reads it as {kind}"
        yield (f"{path}.{word}" if path else word,
               f"expected a name (got {word}: {why}; quote it)")


def _cross_references(config: Config) -> list[tuple[str, str]]:
    """Checks across sections: connections named in reconciliations exist and fit."""
    problems: list[tuple[str, str]] = []

    def connection(path: str, name: str, expected: ConnectionKind, what: str) -> None:
        known = config.connections.get(name)
        if known is None:
            names = ", ".join(sorted(config.connections)) or "none"
            problems.append((path, f"unknown connection {name!r} (defined: {names})"))
        elif known.kind is not expected:
            problems.append(
                (path, f"connection {name!r} is {known.kind.value}; {what} needs {expected.value}")
            )

    if not config.state.startswith(("postgresql://", "postgres://")):
        problems.append(("state", f"expected a postgresql:// URL (got {redact(config.state)!r})"))
    for name, rec in config.reconciliations.items():
        base = f"reconciliations.{name}"
        connection(f"{base}.source.connection", rec.source.connection, ConnectionKind.POSTGRES,
                   "a source table")
        target_kind = ConnectionKind.KAFKA if rec.target.is_topic else ConnectionKind.POSTGRES
        connection(f"{base}.target.connection", rec.target.connection, target_kind,
                   "a topic target" if rec.target.is_topic else "a table target")
        if rec.target.consumer is not None:
            connection(f"{base}.target.consumer.connection", rec.target.consumer.connection,
                       ConnectionKind.KAFKA, "a target's consumer")
        if rec.target.is_topic:
            # the mirror keeps a version column only for a target with a version
            taken = [c for c in rec.source.key if c in MIRROR_COLUMNS
                     and (c != "version" or rec.target.version is not None)]
            if taken:
                problems.append((f"{base}.source.key", (
                    f"expected key columns named otherwise than the columns the mirror of a "
                    f"topic keeps beside them ({', '.join(sorted(MIRROR_COLUMNS))}): got "
                    f"{', '.join(map(repr, taken))}; a view over {rec.source.table} can "
                    f"rename them")))
    read_by: dict[tuple[str, str, str], str] = {}  # (broker, kind, name) -> the entry reading it
    for name, dlq in config.dead_letters.items():
        kind = ConnectionKind.KAFKA if dlq.topic is not None else ConnectionKind.RABBITMQ
        connection(f"dead_letters.{name}.connection", dlq.connection, kind,
                   "a dead-letter topic" if dlq.topic is not None else "a dead-letter queue")
        known = config.connections.get(dlq.connection)
        if known is None:
            continue
        held, own = dlq.held_in
        first = read_by.setdefault((_broker(known), held, own), name)
        if first != name:
            # each would take the letters under a lock and a record of its own
            problems.append((f"dead_letters.{name}.{held}", (
                f"expected a {held} no other entry reads (dead_letters.{first} reads {held} "
                f"{own!r} of the same broker): both would replay its letters")))
    return problems


def _broker(connection: ConnectionConfig) -> str:
    """Where a broker connection leads, told apart from the name it has in the config: Kafka's
    bootstrap servers, a RabbitMQ URL's host, port and virtual host (not its user)."""
    if connection.kafka is not None:
        servers = str(connection.kafka.get("bootstrap.servers", ""))
        return "kafka " + ",".join(sorted(s.strip().lower() for s in servers.split(",")))
    if connection.rabbitmq is not None:
        url = urllib.parse.urlsplit(connection.rabbitmq)
        vhost = urllib.parse.unquote(url.path[1:]) if len(url.path) > 1 else "/"
        try:
            port = url.port
        except ValueError:  # not a number: ConnectionConfig refused it already
            port = None
        default = 5671 if url.scheme == "amqps" else 5672
        return f"rabbitmq {(url.hostname or '').lower()}:{port or default}/{vhost}"
    return f"postgres {connection.postgres}"


def _require_distinct(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"expected distinct {what} (got {name!r} twice)")
        seen.add(name)
