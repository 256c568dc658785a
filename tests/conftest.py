"""Shared fixtures: every test gets its own database, topic names and queue names.

Services come from ``scripts/stack up`` (``make test`` starts it). Addresses can be moved with
TRUEUP_TEST_PG (a DSN of the maintenance database), TRUEUP_TEST_KAFKA and TRUEUP_TEST_AMQP.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from trueup.quality import CACHE_DIR_ENV
from trueup.state import migrate

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("TRUEUP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KAFKA_BOOTSTRAP = os.environ.get("TRUEUP_TEST_KAFKA", "127.0.0.1:9092")
AMQP_URL = os.environ.get("TRUEUP_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
TEMPLATE = f"trueup_test_template_{os.getpid()}"


#: mypy over the whole tree, started when collection ends if its test is to run: its minute of
#: CPU then overlaps the suite's waits on services and daemons instead of adding to them.
#: (tests/unit/test_lint.py reads its outcome: the process and the file holding its output.)
#: Under pytest-xdist (``make test``) the test runs it itself, beside the other worker.
MYPY_TEST = "tests/unit/test_lint.py::test_mypy_strict_finds_nothing"
MYPY = pytest.StashKey[tuple["subprocess.Popen[bytes]", IO[bytes]]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the other keeps the CPU busy while mypy's test runs it
    if any(item.nodeid == MYPY_TEST for item in session.items):
        out = tempfile.TemporaryFile()  # noqa: SIM115 (open until the session ends)
        mypy = Path(sys.executable).parent / "mypy"
        session.config.stash[MYPY] = (
            subprocess.Popen([str(mypy)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT), out)


def pytest_sessionfinish(session: pytest.Session) -> None:
    started = session.config.stash.get(MYPY, None)
    if started is None:
        return
    mypy, out = started
    if mypy.poll() is None:  # the run ended before its test
        mypy.kill()
        mypy.wait()
    out.close()


def dsn_for(database: str) -> str:
    """A postgresql:// URL of ``database`` on the test server."""
    return urlunsplit(urlsplit(PG_ADMIN_DSN)._replace(path=f"/{database}"))


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_ADMIN_DSN, autocommit=True)


def create_database(name: str, template: str = "template0") -> str:
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)))
    return dsn_for(name)


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """trueup's cache (suites GX accepted) in a folder of the session's, not the user's; the
    processes tests start (``dagster dev`` and its runs) inherit it."""
    path = tmp_path_factory.mktemp("trueup_cache")
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture(scope="session")
def state_template() -> Iterator[str]:
    """A database with trueup's schema migrated, copied for each test that needs state."""
    drop_database(TEMPLATE)
    dsn = create_database(TEMPLATE)
    with psycopg.connect(dsn) as conn:
        migrate(conn)
    yield TEMPLATE
    drop_database(TEMPLATE)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names for databases, topics and queues: ``unique("orders")``."""
    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"
    return make


@pytest.fixture
def empty_db(unique: Callable[[str], str]) -> Iterator[str]:
    """The DSN of a new, empty database of its own (dropped afterwards)."""
    name = unique("t")
    dsn = create_database(name)
    yield dsn
    drop_database(name)


@pytest.fixture
def state_db(unique: Callable[[str], str], state_template: str) -> Iterator[str]:
    """The DSN of a database of its own with trueup's state schema already migrated."""
    name = unique("t")
    dsn = create_database(name, template=state_template)
    yield dsn
    drop_database(name)


@pytest.fixture
def kafka_bootstrap() -> str:
    return KAFKA_BOOTSTRAP


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
def new_db(unique: Callable[[str], str]) -> Iterator[Callable[[], str]]:
    """Make as many fresh databases as a test needs: ``dsn = new_db()``; all dropped after."""
    made: list[str] = []

    def make() -> str:
        name = unique("t")
        made.append(name)
        return create_database(name)

    yield make
    for name in made:
        drop_database(name)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Any]:
    """Kafka topics made for one test (``topics.make(...)``) and deleted afterwards."""
    from tests.integration.test_workers_support import Topics

    made = Topics(kafka_bootstrap)
    yield made
    made.delete()


@pytest.fixture
def queues(amqp_url: str) -> Iterator[Any]:
    """RabbitMQ queues made for one test and deleted afterwards."""
    from tests.integration.test_workers_support import Queues

    made = Queues(amqp_url)
    yield made
    made.delete()


def progress_events(stderr: str) -> list[dict[str, Any]]:
    """The ``progress`` log events among a CLI's JSON log lines, without their time."""
    events = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "progress":
                events.append({k: v for k, v in event.items() if k not in ("at", "logger")})
    return events


def unused_port() -> int:
    """A free local port below the kernel's ephemeral range, so no outgoing connection can
    take it between this probe and the server's own bind (port 0 picks from that range), and
    above the fixed ports of the private stacks (test_stack, test_broker_restart: < 20000)."""
    ceiling = min(32768, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    candidates = range(20000, ceiling)
    assert len(candidates) >= 1000, f"the ephemeral range starts at {ceiling}: no room below it"
    for port in random.sample(candidates, 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free local port below the ephemeral range")


def blocked_signals(pid: int) -> dict[int, set[int]]:
    """The signals each thread of process ``pid`` blocks, by thread id (from /proc)."""
    found: dict[int, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            for line in (task / "status").read_text().splitlines():
                if line.startswith("SigBlk:"):
                    mask = int(line.split()[1], 16)
                    found[int(task.name)] = {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return found


def terminate_diff(config: str, name: str, state: str, *, settle: float = 1.0
                   ) -> tuple[int, str, float]:
    """Run ``trueup diff NAME`` and send it SIGTERM ``settle`` seconds after its run began (its
    row in ``state``); return its exit status, its stderr and its seconds after the signal."""
    trueup = Path(sys.executable).parent / "trueup"
    process = subprocess.Popen([str(trueup), "--config", config, "diff", name],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with psycopg.connect(state) as conn:
            deadline = time.monotonic() + 60
            while conn.execute("SELECT count(*) FROM trueup.runs").fetchone() != (1,):
                assert time.monotonic() < deadline and process.poll() is None, \
                    process.communicate()
                time.sleep(0.05)
        time.sleep(settle)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = process.communicate(timeout=60)
        return process.returncode, err, time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ProgressLog:
    """The progress reports of a run (pass it as ``progress=``), to see how it went about it."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int]] = []

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.reports.append((phase, done, total))

    @property
    def plans(self) -> list[int]:
        """The segment count of each checksum pass, in order."""
        return [total for phase, done, total in self.reports
                if phase == "checksums" and done == 0]

    @property
    def segments_read(self) -> set[int]:
        """How many differing segments were read row by row (empty: none differed)."""
        return {total for phase, _, total in self.reports if phase == "segments"}
