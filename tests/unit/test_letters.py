"""Dead letters as trueup reads them (times, keys) and the ``--where`` filter of a replay."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import replace
from typing import Any

import pika
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME

from trueup import headers
from trueup.errors import UsageError
from trueup.letterboxes import kafka as letterbox_kafka
from trueup.letterboxes import rabbitmq as letterbox_rabbitmq
from trueup.letters import DeadLetter, LetterFilter, epoch_time

NEW_YEAR = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NEW_YEAR_SECONDS = 1767225600


def _letter(*, key: str | None = None, error: str = "ValueError", attempts: int = 1,
            origin: str | None = "orders.v1") -> DeadLetter:
    return DeadLetter(message_id="m1", key=key, origin=origin, error_class=error,
                      attempts=attempts, failed_at=NEW_YEAR)


# ---------------------------------------------------------------------------------------------
# --where


@pytest.mark.parametrize("where", [
    "key=[1, 2]",
    "key=[1,2]",
    "key = [1, 2] and attempts>=1",
    "attempts>=1, key=[1, 2]",
    "key=[1, 2], error=ValueError and origin=orders.v1",
    "key='[1, 2]'",
    "key=[3, 4]|[1, 2]",
])
def test_where_key_takes_a_composite_key_as_a_json_array_with_its_commas(where: str) -> None:
    selection = LetterFilter.parse(where)
    assert selection.matches(_letter(key="[1, 2]")), f"{where!r} did not select key [1, 2]"
    assert selection.matches(_letter(key="[1,2]")), f"{where!r} did not select key [1,2]"
    assert not selection.matches(_letter(key="[1, 3]")), f"{where!r} selected key [1, 3]"
    assert not selection.matches(_letter(key="1")), f"{where!r} selected key 1"


def test_where_composite_key_conditions_count_each_condition_once() -> None:
    selection = LetterFilter.parse("key=[1, 2], error=KeyError")
    assert len(selection.tests) == 2
    assert not selection.matches(_letter(key="[1, 2]"))   # error differs
    assert LetterFilter.parse("key!=[1, 2]").matches(_letter(key="[2, 1]"))
    assert not LetterFilter.parse("key!=[1, 2]").matches(_letter(key="[1,2]"))


def test_where_still_splits_plain_conditions_at_commas_and_and() -> None:
    assert len(LetterFilter.parse("error=ValueError,attempts>=1 AND origin=orders.v1").tests) == 3
    assert len(LetterFilter.parse("error='a, b' and key=it's").tests) == 2
    assert LetterFilter.parse("key=it's").matches(_letter(key="it's"))
    with pytest.raises(UsageError, match="cannot read"):
        LetterFilter.parse("key=[1, 2], colour")


@pytest.mark.parametrize("where, key", [
    # every quote was stripped from both ends: a JSON string key could never be selected
    ("""key='"q"'""", '"q"'),
    # a quoted value was still split at | and trimmed
    ("key='x|y'", "x|y"),
    ("key=' padded '", " padded "),
    ("""key="a"|'b|c'""", "b|c"),
    ("key=''", ""),
])
def test_where_takes_a_quoted_value_as_written_between_its_quotes(where: str, key: str) -> None:
    assert LetterFilter.parse(where).matches(_letter(key=key)), f"{where!r} missed {key!r}"
    assert not LetterFilter.parse(where).matches(_letter(key="q")), f"{where!r} took q"


def test_where_alternatives_are_trimmed_unless_quoted() -> None:
    selection = LetterFilter.parse("error=KeyError | ValueError")
    assert selection.matches(_letter(error="ValueError"))
    assert selection.matches(_letter(error="builtins.KeyError"))
    assert not selection.matches(_letter(error="TypeError"))


@pytest.mark.parametrize(("where", "refused"), [
    # a script's unset variable after a joiner: "PoisonError and" was the value, and != took
    # the poison letters too
    ("error!=PoisonError and", "an empty condition"),
    ("error!=PoisonError AND  ", "an empty condition"),
    ("error=ValueError,", "an empty condition"),
    ("error=ValueError,, origin=orders.v1", "an empty condition"),
    # or is no joiner: "ValueError or error=PoisonError" was one value, matching nothing
    ("error=ValueError or error=PoisonError", "`or` does not join conditions"),
    # alternatives where one value is taken: only the first was
    ("since=2026-01-01|2026-02-01", "since= takes one value"),
    ("attempts>=3|5", "attempts>= takes one value"),
])
def test_a_where_that_would_select_other_letters_than_it_says_is_refused(
        where: str, refused: str) -> None:
    with pytest.raises(UsageError, match=re.escape(refused)):
        LetterFilter.parse(where)


def test_where_alternatives_of_attempts_and_of_composite_keys_are_all_taken() -> None:
    """attempts=3|5 took 3 alone; a | inside a composite key split it (a , did not)."""
    assert LetterFilter.parse("attempts=3|5").matches(_letter(attempts=5))
    assert not LetterFilter.parse("attempts=3|5").matches(_letter(attempts=4))
    assert LetterFilter.parse("attempts!=3|5").matches(_letter(attempts=4))
    assert not LetterFilter.parse("attempts!=3|5").matches(_letter(attempts=5))
    assert LetterFilter.parse('key=["a|b", 1]').matches(_letter(key='["a|b",1]'))
    assert LetterFilter.parse('key=["x", 2]|["a|b", 1]').matches(_letter(key='["a|b", 1]'))
    assert not LetterFilter.parse('key=["a|b", 1]').matches(_letter(key='["a", 1]'))
    assert LetterFilter.parse("key='black or white'").matches(_letter(key="black or white"))


def test_a_key_nested_deeper_than_python_reads_is_a_plain_key_not_a_crash() -> None:
    """One letter whose key was 3,000 [ failed every replay filtering on key."""
    deep = "[" * 3000
    assert not LetterFilter.parse("key=1").matches(_letter(key=deep))
    assert LetterFilter.parse(f"key='{deep}'").matches(_letter(key=deep))


# ---------------------------------------------------------------------------------------------
# Times a producer set


def test_epoch_time_reads_seconds_and_milliseconds_and_gives_none_out_of_range() -> None:
    assert epoch_time(NEW_YEAR_SECONDS) == NEW_YEAR
    assert epoch_time(NEW_YEAR_SECONDS * 1000) == NEW_YEAR
    assert epoch_time(NEW_YEAR_SECONDS * 1_000_000) is None       # microseconds: no time
    assert epoch_time(2**63 - 1) is None
    assert epoch_time(float("nan")) is None


@pytest.mark.parametrize(("stamp", "expected"), [
    (NEW_YEAR_SECONDS, NEW_YEAR),
    (NEW_YEAR_SECONDS * 1000, NEW_YEAR),            # milliseconds, as many producers write it
    (NEW_YEAR_SECONDS * 1_000_000, None),           # still out of range: no time, no error
    (2**64 - 1, None),
])
def test_rabbitmq_letter_reads_an_amqp_timestamp_in_seconds_or_milliseconds(
        stamp: int, expected: dt.datetime | None) -> None:
    properties = pika.BasicProperties(message_id="m1", timestamp=stamp,
                                      headers={headers.ORIGIN: "payments"})
    letter = letterbox_rabbitmq.letter_of(properties, b"{}")
    assert letter.failed_at == expected


class _KafkaMessage:
    """The parts of a confluent_kafka Message a letter is read from."""

    def __init__(self, timestamp_ms: int) -> None:
        self.stamp = timestamp_ms

    def headers(self) -> list[tuple[str, Any]]:
        return [(headers.ORIGIN, b"orders.v1")]

    def key(self) -> bytes:
        return b"[1, 2]"

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, self.stamp

    def topic(self) -> str:
        return "orders.v1.dlq"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7


@pytest.mark.parametrize(("stamp_ms", "expected"), [
    (NEW_YEAR_SECONDS * 1000, NEW_YEAR),
    (NEW_YEAR_SECONDS * 1_000_000, NEW_YEAR),       # microseconds in the milliseconds field
    (2**63 - 1, None),
])
def test_kafka_letter_with_a_timestamp_out_of_range_has_no_time_instead_of_failing(
        stamp_ms: int, expected: dt.datetime | None) -> None:
    letter = letterbox_kafka.letter_of(_KafkaMessage(stamp_ms))  # type: ignore[arg-type]
    assert letter.failed_at == expected
    assert letter.message_id == "orders.v1.dlq:0:7"


@pytest.mark.parametrize("where", ["key=[1, error=ValueError", "error='ValueError, attempts>=3",
                                   "key!=[1, error=X"])
def test_where_with_a_bracket_or_quote_left_open_is_refused_not_read_as_one_condition(
        where: str) -> None:
    with pytest.raises(UsageError, match="missing"):
        LetterFilter.parse(where)


@pytest.mark.parametrize(("where", "refused"), [
    ("", "no condition in ''"), ("  ", "no condition in '  '"),
    (",", "an empty condition in ','"),
    ("error=", "error= has no value in 'error=' (write error='' for an empty one)"),
    ("origin=orders.v1, key!=", "key!= has no value in 'key!='"),
    ("attempts>=", "attempts>= has no value in 'attempts>='$"),
    ("colour=", "unknown field 'colour'"),  # not "write colour=''", which it would refuse
])
def test_a_where_without_a_condition_or_a_value_is_refused_not_taken_for_every_letter(
        where: str, refused: str) -> None:
    """``--where ""`` (a script's unset variable) selected every letter, and ``error=`` none."""
    with pytest.raises(UsageError, match="^--where: " + re.escape(refused).replace(
            r"\$", "$")):
        LetterFilter.parse(where)
    # no --where selects every letter; a quoted empty value is a value
    letter = DeadLetter(message_id="x", key="", origin="orders", error_class="E", attempts=1,
                        failed_at=None)
    assert LetterFilter.parse(None).matches(letter)
    assert LetterFilter.parse("key=''").matches(letter)
    assert not LetterFilter.parse("key=''").matches(replace(letter, key="1"))


@pytest.mark.parametrize(("where", "refused"), [
    ("origin=orders|", "an empty alternative in 'origin=orders|' (before or after `|`; "
                       "write '' for an empty one)"),
    ("key=42|", "an empty alternative in 'key=42|'"),
    ("origin=|orders", "an empty alternative in 'origin=|orders'"),
    ("key=42 |  ", "an empty alternative in 'key=42 |'"),
    ("key=a||b", "an empty alternative in 'key=a||b'"),
    ("key=|", "an empty alternative in 'key=|'"),
    ("error!=PoisonError|, origin=orders", "an empty alternative in 'error!=PoisonError|'"),
    ("attempts=3|", "an empty alternative in 'attempts=3|' (before or after `|`)$"),
    ("attempts>=3|", "an empty alternative in 'attempts>=3|' (before or after `|`)$"),
    ("since=2026-01-01|", "an empty alternative in 'since=2026-01-01|' (before or after `|`)$"),
])
def test_an_empty_alternative_is_refused_not_taken_for_the_letters_without_the_field(
        where: str, refused: str) -> None:
    """``--where "key=a|$X"`` with X unset selected every letter without a key: the empty
    piece after ``|`` was kept, and an empty value means the letters without one."""
    with pytest.raises(UsageError, match="^--where: " + re.escape(refused).replace(
            r"\$", "$")):
        LetterFilter.parse(where)


@pytest.mark.parametrize(("where", "refused"), [
    ("attempts=3|x", "(got 'x')"), ("attempts=x|3", "(got 'x')"),
    ("attempts!=3|4|five", "(got 'five')"), ("attempts=3|''", "(got '')"),
])
def test_attempts_names_the_alternative_that_is_no_whole_number(where: str,
                                                                 refused: str) -> None:
    """``attempts=3|x`` was refused with "attempts needs a whole number (got '3')"."""
    with pytest.raises(UsageError, match="^--where: attempts needs a whole number " +
                       re.escape(refused) + "$"):
        LetterFilter.parse(where)


@pytest.mark.parametrize(("where", "selected"), [
    ("origin=''", {"none", "empty_key"}), ("origin!=''", {"keyed", "null_key"}),
    ('key=""', {"null_key", "empty_key"}), ("key!=''", {"keyed", "none"}),
    ("origin=orders|''", {"keyed", "null_key", "none", "empty_key"}),
    # a quoted empty alternative is the explicit ask (an unquoted one is refused)
    ("origin=''|orders", {"keyed", "null_key", "none", "empty_key"}),
    ("key=1|''", {"keyed", "null_key", "empty_key"}), ('key!=""|1', {"none"}),
])
def test_a_quoted_empty_value_selects_the_letters_without_one(
        where: str, selected: set[str]) -> None:
    """``origin=''`` selected none of the letters without an origin (those trueup dlq lists
    under unknown), and ``origin!=''`` selected them too."""
    letters = {"keyed": ("orders", "1"), "null_key": ("orders", None), "none": (None, "2"),
               "empty_key": (None, "")}
    chosen = LetterFilter.parse(where)
    assert {name for name, (origin, key) in letters.items() if chosen.matches(_letter(
        origin=origin, key=key))} == selected


def _died(at: dt.datetime, reason: str = "rejected", queue: str = "payments.settle") -> dict[
        str, Any]:
    # as pika reads an x-death entry: its time naive, in UTC
    return {"queue": queue, "reason": reason, "count": 1, "exchange": "",
            "time": at.astimezone(dt.UTC).replace(tzinfo=None)}


@pytest.mark.parametrize(("death_day", "expected"), [
    (1, ("payments", "ValueError", 5)),                # trueup's failure is the latest
    (9, ("payments.settle", "rabbitmq.rejected", 9)),  # the broker's death came after it
])
def test_a_rabbitmq_letter_s_failure_is_its_latest_trueup_s_or_the_broker_s(
        death_day: int, expected: tuple[str, str, int]) -> None:
    """Any x-death replaced trueup's record of the failure, even one older than it."""
    failure = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    properties = pika.BasicProperties(message_id="m1", headers={
        headers.ORIGIN: "payments", headers.ERROR_CLASS: "ValueError",
        headers.ATTEMPTS: "2", headers.LAST_FAILURE: failure.isoformat(),
        "x-death": [_died(dt.datetime(2026, 1, death_day, tzinfo=dt.UTC))]})
    letter = letterbox_rabbitmq.letter_of(properties, b"{}")
    origin, error, day = expected
    assert (letter.origin, letter.error_class, letter.failed_at) == (
        origin, error, dt.datetime(2026, 1, day, tzinfo=dt.UTC))
    assert letter.attempts == 3  # trueup's 2 and the broker's one death, either way


def test_a_wait_in_a_worker_s_delay_queue_is_no_failure_and_says_nothing_of_one() -> None:
    failure = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    properties = pika.BasicProperties(message_id="m1", headers={
        headers.ORIGIN: "payments", headers.ERROR_CLASS: "ValueError",
        headers.ATTEMPTS: "2", headers.LAST_FAILURE: failure.isoformat(),
        "x-death": [_died(dt.datetime(2026, 1, 9, tzinfo=dt.UTC), "expired",
                          "payments.retry.1")]})
    letter = letterbox_rabbitmq.letter_of(properties, b"{}")
    assert (letter.origin, letter.error_class, letter.failed_at, letter.attempts) == (
        "payments", "ValueError", failure, 2)
