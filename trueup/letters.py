"""Dead letters as trueup reads them, and the ``--where`` filter of ``trueup replay``.

A :class:`DeadLetter` is broker-neutral: its id, key, origin, error class, attempts and failure
time, read from trueup's headers or, for messages RabbitMQ dead-lettered by itself, from the
broker's ``x-death`` header.

``--where`` holds conditions joined by ``,`` or ``and`` (all must hold)::

    error=ConnectionError          error class (full name, or its last dotted part)
    error!=rabbitmq.expired|rabbitmq.rejected     (``|`` separates alternatives; an empty
                                   one, ``a|``, is refused: quote it, ``a|''``)
    origin=orders.v1               the topic or queue the letter came from
    origin=''                      none known (``!=''``: one known); key='' likewise
    key=42                         Kafka message key; RabbitMQ message_id
    key=[1, 2]                     a composite key, as a JSON array (its commas split nothing)
    attempts>=3                    also attempts=, !=, <, <=, >
    since=2026-01-02T00:00:00Z     last failure at or after (a date or an ISO time, UTC if no
    until=2026-01-03               zone); until is exclusive
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from trueup.errors import UsageError
from trueup.headers import (
    ATTEMPTS,
    ERROR_CLASS,
    FIRST_FAILURE,
    LAST_FAILURE,
    MESSAGE_ID,
    ORIGIN,
    REPLAY_ID,
    Failure,
    format_time,
    parse_time,
)

UNKNOWN_ERROR = "unknown"
#: An epoch past this many seconds (the year 5138) is taken for milliseconds: producers often
#: set the AMQP ``timestamp`` (seconds by the spec) in milliseconds.
MILLISECONDS_FROM = 1e11


def epoch_time(value: float) -> dt.datetime | None:
    """The UTC time of an epoch in seconds (or milliseconds, past :data:`MILLISECONDS_FROM`);
    None when it is no representable time. A broker's timestamp is the producer's word: a bad
    one must cost the letter its time, never the inspection or replay of the whole queue."""
    seconds = value / 1000 if abs(value) >= MILLISECONDS_FROM else value
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None


# Not frozen (treat as frozen): a replay makes one for every letter it reads, and a frozen
# dataclass's __init__ takes three times as long (1.0 us against 0.35 us with its 9 fields).
@dataclass(kw_only=True, slots=True)
class DeadLetter:
    """One dead letter, whatever broker holds it."""

    message_id: str
    key: str | None
    origin: str | None
    error_class: str
    attempts: int
    failed_at: dt.datetime | None
    generation: int = 0   # the replay that produced this copy (0: none)
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    record: Failure | None = field(default=None, compare=False, repr=False)  # parsed headers

    def failure(self, *, replay_id: int | None = None) -> Failure:
        """trueup's headers for a copy of this letter (replayed by ``replay_id``, or moved
        within its queue when None): what the broker's own headers said, folded into ours."""
        record = self.record or Failure.read(self.headers)
        return replace(record, message_id=self.message_id, attempts=self.attempts,
                       origin=self.origin, error_class=self.error_class,
                       first_failure=record.first_failure or self.failed_at,
                       last_failure=self.failed_at or record.last_failure,
                       replay_id=replay_id if replay_id is not None else record.replay_id)

    def copy_changes(self, *, replay_id: int | None) -> dict[str, str]:
        """The trueup headers a replayed copy must set: those of :meth:`failure` whose value
        differs from this letter's own header (the others are carried over as they are).
        ``replay_id`` None: a copy kept in its own box (the replay that made it is not named).

        Same meaning as ``failure(replay_id=...).write()``, without rebuilding every header:
        a replay handles tens of thousands of letters per second.
        """
        text = self.headers
        get = text.get
        changes = {REPLAY_ID: str(replay_id)} if replay_id is not None else {}
        if get(MESSAGE_ID) != self.message_id:
            changes[MESSAGE_ID] = self.message_id
        attempts = str(self.attempts)
        if get(ATTEMPTS) != attempts:
            changes[ATTEMPTS] = attempts
        if self.origin is not None and get(ORIGIN) != self.origin:
            changes[ORIGIN] = self.origin
        if get(ERROR_CLASS) != self.error_class:
            changes[ERROR_CLASS] = self.error_class
        if self.failed_at is not None:
            last = get(LAST_FAILURE)
            if last is None or parse_time(last) != self.failed_at:
                last = changes[LAST_FAILURE] = format_time(self.failed_at)
            if not get(FIRST_FAILURE):
                changes[FIRST_FAILURE] = last
        return changes


@dataclass(frozen=True, kw_only=True)
class Destination:
    """Where a replayed letter goes: a Kafka topic or RabbitMQ queue (``name``), or a RabbitMQ
    exchange and routing key."""

    name: str | None = None
    exchange: str | None = None
    routing_key: str = ""

    def __str__(self) -> str:
        if self.exchange is not None:
            return f"{self.exchange}/{self.routing_key}"
        return self.name or "-"


_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(!=|>=|<=|=|<|>)\s*(.*?)\s*$")
#: ``and`` between conditions; at the end too, so that a script's unset variable after it
#: (``error!=X and $EMPTY``) leaves an empty condition, which is refused, not a value "X and".
_AND = re.compile(r"\s+and(?:\s+|$)", re.IGNORECASE)
#: ``or`` in an unquoted value: no joiner here (``|`` separates alternatives).
_OR = re.compile(r"\s+or\s+", re.IGNORECASE)
_OPENING, _CLOSING = "[({", "])}"
_QUOTES = "'\""
_BEFORE_QUOTE = "=<>!|[(,{ \t"  # a quote opens a value only after one of these
_FIELDS = ("error", "origin", "key", "attempts", "since", "until")
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge}

Test = Callable[[DeadLetter], bool]


@dataclass(frozen=True, kw_only=True)
class LetterFilter:
    """A parsed ``--where``; :meth:`matches` tells whether a letter is selected."""

    text: str = ""
    tests: tuple[Test, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LetterFilter:
        """``text`` parsed; None selects every letter. An empty filter is refused rather than
        taken for none: a script passing an unset variable would replay every letter."""
        if text is None:
            return cls()
        conditions = _conditions(text.strip())
        if not conditions:
            raise UsageError(f"--where: no condition in {text!r} (leave --where out to select "
                             f"every letter)")
        return cls(text=text.strip(), tests=tuple(_condition(part) for part in conditions))

    def matches(self, letter: DeadLetter) -> bool:
        return all(test(letter) for test in self.tests)


def _conditions(text: str) -> list[str]:
    """The conditions of ``text``: split at ``,`` and ``and`` outside brackets and quotes, so
    a composite key (``key=[1, 2]``) or a quoted value keeps its commas. An empty condition
    among them (``a=1,,b=2``, a trailing ``and`` or ``,``: a script's unset variable, most
    likely) is refused, as an empty ``--where`` is: dropped, the filter would select more."""
    parts: list[str] = []
    start = depth = i = 0
    quote: str | None = None
    while i < len(text):
        char = text[i]
        if quote is not None:
            if char == quote:
                quote = None
        elif char in _QUOTES and (i == 0 or text[i - 1] in _BEFORE_QUOTE):
            quote = char
        elif char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        elif depth == 0:
            joined = i + 1 if char == "," else None
            if joined is None and (found := _AND.match(text, i)) is not None:
                joined = found.end()
            if joined is not None:
                parts.append(text[start:i])
                start = i = joined
                continue
        i += 1
    if quote is not None or depth:
        # a typo must not swallow the conditions after it into one (and select more letters)
        missing = quote if quote is not None else "a closing bracket"
        raise UsageError(f"--where: {missing} missing in {text!r}")
    parts.append(text[start:])
    conditions = [part.strip() for part in parts]
    if len(conditions) > 1 and not all(conditions):
        raise UsageError(f"--where: an empty condition in {text!r} (between or after "
                         f"`,` and `and`)")
    return [c for c in conditions if c]


def _condition(text: str) -> Test:
    match = _CONDITION.match(text)
    if not match:
        raise UsageError(f"--where: cannot read {text!r} (expected FIELD=VALUE with a field "
                         f"among {', '.join(_FIELDS)})")
    name, op = match.group(1), match.group(2)
    written = _alternatives(match.group(3))
    alternatives = [_unquoted(v) for v in written]
    value = alternatives[0] if alternatives else ""
    if any(_OR.search(v) for v in written if _unquoted(v) == v):
        raise UsageError(f"--where: `or` does not join conditions in {text!r}: write "
                         f"alternatives with | ({name}{op}A|B), or quote a value holding it")
    if name not in _FIELDS:
        raise UsageError(f"--where: unknown field {name!r} (expected one of "
                         f"{', '.join(_FIELDS)})")
    if not match.group(3):  # an unset variable, most likely; quotes give an empty value
        hint = "" if name in ("attempts", "since", "until") else \
            f" (write {name}{op}'' for an empty one)"
        raise UsageError(f"--where: {name}{op} has no value in {text!r}{hint}")
    if not all(written):  # ``a|$UNSET``: an empty value would select the letters without one
        hint = "" if name in ("attempts", "since", "until") else "; write '' for an empty one"
        raise UsageError(f"--where: an empty alternative in {text!r} (before or after "
                         f"`|`{hint})")
    if len(alternatives) > 1 and (name in ("since", "until") or op not in ("=", "!=")):
        raise UsageError(f"--where: {name}{op} takes one value, not alternatives "
                         f"(got {match.group(3)!r})")
    if name == "attempts":
        numbers: set[int] = set()
        for number_text in alternatives:
            try:
                numbers.add(int(number_text))
            except ValueError:
                raise UsageError(f"--where: attempts needs a whole number (got "
                                 f"{number_text!r})") from None
        if op in ("=", "!="):
            return lambda letter: (letter.attempts in numbers) == (op == "=")
        compare, (number,) = _COMPARE[op], numbers
        return lambda letter: compare(letter.attempts, number)
    if op not in ("=", "!=") or (name in ("since", "until") and op != "="):
        raise UsageError(f"--where: {name} takes = {'' if name in ('since', 'until') else 'or != '}"
                         f"(got {op!r})")
    if name in ("since", "until"):
        at = _time(value, name)
        if name == "since":
            return lambda letter: letter.failed_at is not None and letter.failed_at >= at
        return lambda letter: letter.failed_at is not None and letter.failed_at < at
    choices = set(alternatives)
    if name == "key":
        choices = {_key_text(v) for v in choices}
    negate = op == "!="

    def test(letter: DeadLetter) -> bool:
        # A letter without the value (no origin header, a null key) has the empty one:
        # ``origin=''`` selects it and ``origin!=''`` leaves it out.
        found = _field(letter, name) or ""
        if name == "key":
            found = _key_text(found)
        hit = found in choices or (name == "error" and found.rsplit(".", 1)[-1] in choices)
        return hit != negate

    return test


def _field(letter: DeadLetter, name: str) -> str | None:
    if name == "error":
        return letter.error_class
    if name == "origin":
        return letter.origin
    return letter.key


def _alternatives(text: str) -> list[str]:
    """The values of a condition as written: split at ``|`` outside quotes and brackets (a
    composite key ``["a|b", 1]`` is one value), each trimmed; a quoted one is taken as written
    between its quotes (:func:`_unquoted`: one pair, spaces and ``|`` kept), so any value, a
    JSON string key (``key='"q"'``) too, can be selected."""
    values: list[str] = []
    start, depth, quote = 0, 0, None
    for i, char in enumerate(text):
        if quote is not None:
            if char == quote:
                quote = None
        elif char in _QUOTES and (depth or not text[start:i].strip()):
            quote = char  # a value's first character (it is quoted), or a string in a key
        elif char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        elif char == "|" and not depth:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def _unquoted(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        return text[1:-1]
    return text


def _key_text(text: str) -> str:
    """A key in one spelling: a composite key (a JSON array) compact, so ``[1, 2]`` on the
    command line matches a message key written ``[1,2]``; any other key as it is."""
    if not text.startswith("["):
        return text
    try:
        return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested past what Python reads
        return text


def _time(value: str, name: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--where: {name} needs a date or ISO time such as "
                         f"2026-01-02T15:04:05Z (got {value!r})") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
