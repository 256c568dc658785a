"""What trueup prints about a database never shows its password, however it was written."""

from __future__ import annotations

import datetime as dt

import pytest

from trueup.db import Endless, connect, redact, scrubbed
from trueup.errors import ConnectionFailed
from trueup.runs import json_value


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://u:Hunter2@h/db", "postgresql://u:***@h/db"),
    ("postgresql://:Hunter2@h/db", "postgresql://:***@h/db"),
    ("postgresql://u@h/db?sslmode=require&password=Hunter2&a=b",
     "postgresql://u@h/db?sslmode=require&password=***&a=b"),
    ("host=h user=u password=Hunter2 dbname=db", "host=h user=u password=*** dbname=db"),
    ("host=h PASSWORD = 'Hunter 2' dbname=db", "host=h PASSWORD = *** dbname=db"),
    ("postgresql://h:5432/db", "postgresql://h:5432/db"),
    # an @ written into the password unencoded: libpq reads the rest as the host's name
    ("postgresql://u:Sup3r@S3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
])
def test_redact_hides_a_password_wherever_the_dsn_puts_it(dsn: str, shown: str) -> None:
    assert redact(dsn) == shown


def test_a_driver_message_quoting_the_password_is_scrubbed_as_words_only() -> None:
    assert scrubbed('unexpected spaces found in "Hunter 2"', "postgresql://u:Hunter 2@h/db") \
        == 'unexpected spaces found in "***"'
    # a one-letter password leaves the words it is part of alone
    assert scrubbed("unexpected x", "postgresql://u@h/db?password=x") == "unexpected ***"


@pytest.mark.parametrize("dsn", [
    "postgresql://postgres:Hunter 2@127.0.0.1:1/db",          # libpq quotes it back
    "postgresql://postgres@127.0.0.1:1/db?password=Hunter2",  # refused: port 1
    "postgresql://postgres:Hunter@Hunter2@127.0.0.1:1/db",    # no host "Hunter2@127.0.0.1"
])
def test_a_failed_connection_names_the_database_without_its_password(dsn: str) -> None:
    with pytest.raises(ConnectionFailed) as caught:
        connect(dsn, what="state")
    assert "Hunter" not in str(caught.value), caught.value
    assert str(caught.value).startswith("state: cannot connect to postgresql://postgres")


def test_an_endless_time_orders_past_every_date_and_prints_as_postgres_spells_it() -> None:
    later, earlier = Endless(later=True), Endless(later=False)
    day, moment = dt.date(9999, 12, 31), dt.datetime.max.replace(tzinfo=dt.UTC)
    assert earlier < day < later and earlier < moment < later
    assert sorted([later, moment, earlier, dt.datetime.min.replace(tzinfo=dt.UTC)]) == [
        earlier, dt.datetime.min.replace(tzinfo=dt.UTC), moment, later]
    assert later == Endless(later=True) != earlier and len({later, Endless(later=True)}) == 1
    assert later != moment and not later < later
    assert json_value([later, earlier]) == ["infinity", "-infinity"]
