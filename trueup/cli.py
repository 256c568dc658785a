"""The ``trueup`` command line (contract in docs/cli.md).

Exit status follows diff(1): 0 consistent, 1 differences found, 2 trouble. A user error prints
one line per problem on stderr and exits 2, without a traceback. A reader that closes stdout
early (``trueup status | head -1``) ends the command quietly with 141, as SIGPIPE would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import functools
import gc
import importlib
import json
import os
import re
import secrets
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, cast

from trueup import __version__
from trueup.config import Config, config_path, load_config
from trueup.errors import TrueupError, UsageError
from trueup.log import configure
from trueup.pacing import valid_rate
from trueup.statuses import DifferenceClass

EXIT_OK = 0
EXIT_DIFFERENCES = 1
EXIT_TROUBLE = 2
#: The reader of stdout went away (``| head -1``): what a shell reports of a program SIGPIPE
#: ended. Neither a result the reader did not get (0, 1) nor trouble (2).
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE
#: When set, a command serves /metrics, /healthz and /readyz on 127.0.0.1 at this port while
#: it runs (for long replays and backfills).
METRICS_PORT_ENV = "TRUEUP_METRICS_PORT"
CONFIG_HELP = "config file (default: $TRUEUP_CONFIG or trueup.yaml)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line, as for every other bad input (argparse would print the usage first)
        self.exit(EXIT_TROUBLE, f"{self.prog}: {message} (see {self.prog} --help)\n")


#: The most the state's bigint columns hold (ids, --max, --limit).
BIGINT_MAX = 2**63 - 1


def _positive_int(text: str, most: int = BIGINT_MAX) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text!r})") from None
    if not 0 < value <= most:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer up to {most} (got {text!r})" if value > 0 else
            f"expected a positive integer (got {text!r})")
    return value


def _chunk_size(text: str) -> int:
    from trueup.backfill.model import MAX_CHUNK_ROWS

    return _positive_int(text, MAX_CHUNK_ROWS)


def _workers(text: str) -> int:
    from trueup.backfill.model import MAX_WORKERS

    return _positive_int(text, MAX_WORKERS)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number (got {text!r})") from None
    if not valid_rate(value):  # above 0, and not nan or inf
        raise argparse.ArgumentTypeError(f"expected a positive number (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trueup", description="Reconcile, repair and replay: keep copies "
                     "of your data honest.")
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"trueup {__version__}")
    # --config is also taken after the command (`trueup status --config f.yaml`); SUPPRESS
    # leaves the value given before the command in place when the command has none
    config = _Parser(add_help=False)
    config.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub_parser = functools.partial(sub.add_parser, parents=[config])

    sub_parser("validate", help="check config, reach every connection, reflect tables")

    diff = sub_parser("diff", help="find differences between a source and its copy")
    diff.add_argument("name")
    diff.add_argument("--partition", metavar="P", help="one day of the source, YYYY-MM-DD")
    diff.add_argument("--json", action="store_true", help="print one JSON summary object")
    diff.add_argument("--show", action="store_true", help="print one JSON line per difference")

    backfill = sub_parser("backfill", help="repair differences in resumable chunks")
    backfill.add_argument("name", nargs="?")
    scope = backfill.add_mutually_exclusive_group(required=True)
    scope.add_argument("--run", type=_positive_int, metavar="ID",
                       help="the differences run ID found")
    scope.add_argument("--partition", metavar="P", help="one day of the source, YYYY-MM-DD")
    scope.add_argument("--all", action="store_true", help="the whole table")
    scope.add_argument("--resume", type=_positive_int, metavar="ID",
                       help="continue backfill ID from its unfinished chunks")
    scope.add_argument("--cancel", type=_positive_int, metavar="ID",
                       help="stop backfill ID: pending chunks are cancelled")
    backfill.add_argument("--dry-run", action="store_true",
                          help="plan and count what would change; write nothing")
    backfill.add_argument("--chunk-size", type=_chunk_size, metavar="N",
                          help="rows per chunk (default 10,000)")
    backfill.add_argument("--rate", type=_positive_float, metavar="ROWS_PER_S",
                          help="at most this many rows a second (this process)")
    backfill.add_argument("--workers", type=_workers, metavar="N", default=1,
                          help="chunks at once in this process (default 1, at most 32)")
    backfill.add_argument("--alongside", action="store_true",
                          help="plan it while another backfill of NAME is active")
    backfill.add_argument("--json", action="store_true", help="print one JSON summary object")

    dlq = sub_parser("dlq", help="depth, oldest age and counts by error of a DLQ")
    dlq.add_argument("name")
    dlq.add_argument("--json", action="store_true")

    replay = sub_parser("replay", help="move dead letters back where they came from")
    replay.add_argument("name")
    replay.add_argument("--max", type=_positive_int, metavar="N")
    replay.add_argument("--rate", type=_positive_float, metavar="N")
    replay.add_argument("--dry-run", action="store_true")
    replay.add_argument("--where", metavar="FILTER")
    replay.add_argument("--json", action="store_true")

    status = sub_parser("status", help="newest runs, backfills and replays")
    status.add_argument("--limit", type=_positive_int, default=20, metavar="N")
    status.add_argument("--json", action="store_true")

    lineage = sub_parser("lineage", help="every run that saw a key, every repair of it")
    lineage.add_argument("name")
    lineage.add_argument("key", help="the key's value, or a JSON array for a composite key")
    lineage.add_argument("--json", action="store_true")
    return parser


def to_json(value: Any) -> str:
    """``value`` as one line of JSON. A decimal a double holds is written as the double (2.5
    for 2.50); one it cannot hold (0.30000000000000001, a key typed exactly) with every digit:
    json.dumps writes no number it is not given as a float, so such a decimal goes in as a
    marker string (NUL-delimited, with a token of this call) that its digits then replace."""
    exact: list[str] = []
    marker = secrets.token_hex(8)

    def default(item: Any) -> Any:
        if isinstance(item, decimal.Decimal) and item.is_finite() \
                and item != item.to_integral_value() \
                and decimal.Decimal(repr(float(item))) != item:
            exact.append(format(item, "f"))
            return f"\0{marker}:{len(exact) - 1}\0"
        return _json_default(item)

    text = json.dumps(value, default=default, separators=(", ", ": "))
    if not exact:
        return text
    return re.sub(rf'"\\u0000{marker}:(\d+)\\u0000"', lambda m: exact[int(m[1])], text)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_validate(config: Config, args: argparse.Namespace) -> int:
    from trueup.validate import validate

    findings = validate(config)
    width = max((len(f.path) for f in findings), default=0)
    for finding in findings:
        if finding.ok:
            print(f"ok    {finding.path:<{width}}  {finding.message}")
    failed = [f for f in findings if not f.ok]
    for finding in failed:
        print(f"{config.path}: {finding.path}: {finding.message}", file=sys.stderr)
    if failed:
        return EXIT_TROUBLE
    print(f"{config.path}: valid ({len(config.reconciliations)} reconciliations, "
          f"{len(config.dead_letters)} dead-letter queues)")
    return EXIT_OK


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from trueup.state import open_state
    from trueup.status import status

    with open_state(config.state) as conn:
        document = status(conn, limit=args.limit)
    if args.json:
        print(to_json({k: document[k] for k in ("runs", "backfills", "replays")}))
        return EXIT_OK
    classes = [c.value for c in DifferenceClass]
    # a run that did not finish found nothing it could tell: its counts are "-", not 0
    runs = [row if row["status"] == "succeeded" else {**row, **dict.fromkeys(classes)}
            for row in document["runs"]]
    print(_table("runs", runs, ["run_id", "reconciliation", "partition", "status",
                                "started_at", *classes], errors=("run", "run_id")))
    # a dry run repaired nothing: its rows_repaired counts what it would have repaired
    print(_table("backfills", document["backfills"], ["backfill_id", "reconciliation", "status",
                                                      "dry_run", "chunks", "chunks_done",
                                                      "rows_repaired"],
                 errors=("backfill", "backfill_id")))
    print(_table("replays", document["replays"], ["replay_id", "name", "status", "dry_run",
                                                  "moved", "parked", "skipped"],
                 errors=("replay", "replay_id")))
    print(_table("checks", document["checks"], ["asset_key", "check_name", "passed",
                                                "severity", "at"]))
    return EXIT_OK


def _table(title: str, rows: list[dict[str, Any]], columns: list[str],
           errors: tuple[str, str] | None = None) -> str:
    """``rows`` as a table; with ``errors`` (a noun and its id column), each row's error on a
    line of its own below it (``run 7: <error>``): too long for a column."""
    if not rows:
        return f"{title}: none\n"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [f"{title}:", "  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths,
                                                                        strict=True))]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))
              for r in cells]
    if errors is not None:
        noun, id_column = errors
        lines += [f"  {noun} {row[id_column]}: {row['error']}" for row in rows
                  if row.get("error")]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


#: Subcommand -> "module:function" taking (config, args) and returning the exit status.
#: Imported on use, so each command pays only for the imports it needs (`trueup status` and
#: `trueup diff` of a table neither Kafka's nor Dagster's).
COMMANDS: dict[str, str | Callable[[Config, argparse.Namespace], int]] = {
    "validate": cmd_validate,
    "diff": "trueup.diff:cmd_diff",
    "backfill": "trueup.backfill:cmd_backfill",
    "dlq": "trueup.dlq:cmd_dlq",
    "replay": "trueup.replay:cmd_replay",
    "status": cmd_status,
    "lineage": "trueup.lineage:cmd_lineage",
}


def _command(name: str) -> Callable[[Config, argparse.Namespace], int]:
    target = COMMANDS[name]
    if callable(target):
        return target
    module, _, function = target.partition(":")
    found: Callable[[Config, argparse.Namespace], int] = getattr(
        importlib.import_module(module), function)
    return found


class OutputClosed(BaseException):
    """stdout's reader went away (``trueup status | head -1``, ``| true``): raised by a write to
    stdout in place of its BrokenPipeError. A BaseException, as KeyboardInterrupt is: what is
    under way ends as on a signal (a ``diff --show`` cut short records its run failed,
    ``interrupted (OutputClosed)``), and no handler of errors takes it for one of its own (a
    BrokenPipeError is a ConnectionError: a broker's or a database's connection lost)."""


class _Stdout:
    """sys.stdout while a command runs: its writes, each BrokenPipeError an OutputClosed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _discard_output(stream: TextIO) -> None:
    """Point the closed pipe's descriptor at /dev/null: the buffer still holding what the reader
    did not take then goes there when the interpreter flushes it at exit, not to a second
    BrokenPipeError ("Exception ignored ... BrokenPipeError", exit status 120). Only for a pipe
    or a socket (a test's captured stdout is neither)."""
    try:
        fd = stream.fileno()
        if not (stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)):
            return
    except (OSError, ValueError):  # no descriptor (io.UnsupportedOperation is both)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None, *, whole_process: bool = False) -> int:
    """Run one command; ``whole_process`` when the command is all this process does (the
    console script), so what is loaded before it runs may be frozen for the collector."""
    stdout = sys.stdout
    sys.stdout = cast(TextIO, _Stdout(stdout))
    try:
        try:
            return _main(argv, whole_process=whole_process)
        finally:
            sys.stdout.flush()  # what is buffered goes now, not at exit past OutputClosed's reach
    except OutputClosed:  # from the command (or --help), or the flush: no error, no traceback
        _discard_output(stdout)
        return EXIT_OUTPUT_CLOSED
    finally:
        sys.stdout = stdout


def _main(argv: Sequence[str] | None, *, whole_process: bool) -> int:
    args = build_parser().parse_args(argv)
    configure()
    metrics = None
    checked: list[str] = []
    try:
        importlib.import_module("trueup.tracing").configure_from_env()
        port = os.environ.get(METRICS_PORT_ENV)
        if port:
            # long work (a replay, a backfill) can be scraped while it runs
            from trueup.metrics import serve_metrics

            try:
                metrics = serve_metrics(_metrics_port(port))
            except OSError as exc:
                raise UsageError(f"{METRICS_PORT_ENV}: cannot serve metrics on port {port}: "
                                 f"{exc.strerror}") from exc
        if args.command == "backfill":
            _check_backfill_args(args)
        config = load_config(config_path(args.config))
        if metrics is not None:
            checked = _readiness_checks(config, args)
        command = _command(args.command)
        if whole_process:
            # What is loaded by now lives as long as the process: the collector need not walk
            # it again, during the run or at exit (0.15 s of a 2 s incremental `trueup diff`).
            gc.freeze()
        return command(config, args)
    except TrueupError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"trueup: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as exc:  # a failure nothing foresaw: trouble, never "differences found"
        from trueup.log import get_logger

        get_logger(__name__).error("cli.unexpected_error", exc_info=True)
        reason = str(exc).strip().splitlines()
        print(f"trueup: unexpected error: {type(exc).__name__}"
              f"{': ' + reason[0] if reason else ''}", file=sys.stderr)
        return EXIT_TROUBLE
    finally:
        if metrics is not None:
            metrics.close()
            from trueup.health import HEALTH

            for name in checked:
                HEALTH.remove_check(name)


def _readiness_checks(config: Config, args: argparse.Namespace) -> list[str]:
    """Make ``/readyz`` of a command serving metrics check what it depends on: the state
    database, and for ``replay`` and ``dlq`` the broker of the dead-letter queue (Kafka or
    RabbitMQ). Returns the names of the checks added (taken off again when the command ends)."""
    from trueup.health import HEALTH, Check, kafka_check, postgres_check, rabbitmq_check

    checks: dict[str, Check] = {"database": postgres_check(config.state)}
    letters = config.dead_letters.get(args.name) if args.command in ("replay", "dlq") else None
    connection = config.connections.get(letters.connection) if letters is not None else None
    if connection is not None and connection.kafka is not None:
        checks["kafka"] = kafka_check(connection.kafka)
    elif connection is not None and connection.rabbitmq is not None:
        checks["rabbitmq"] = rabbitmq_check(connection.rabbitmq)
    for name, check in checks.items():
        HEALTH.add_check(name, check)
    return list(checks)


def _metrics_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"{METRICS_PORT_ENV}: expected a port number (got {text!r})")
    return port


def _check_backfill_args(args: argparse.Namespace) -> None:
    if (args.resume or args.cancel) and args.name:
        raise UsageError("trueup backfill: --resume and --cancel take a backfill ID, not a NAME")
    if not (args.resume or args.cancel) and not args.name:
        raise UsageError("trueup backfill: NAME is required with --run, --partition or --all")
    planned = [flag for flag, given in (("--dry-run", args.dry_run),
                                        ("--chunk-size", args.chunk_size is not None),
                                        ("--rate", args.rate is not None),
                                        ("--alongside", args.alongside)) if given]
    if (args.resume or args.cancel) and planned:
        verb = "belongs" if len(planned) == 1 else "belong"
        raise UsageError(f"trueup backfill: {', '.join(planned)} {verb} to planning a "
                         f"backfill; --resume and --cancel keep the options it was planned "
                         f"with")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a supervisor, ``timeout``, Kubernetes stopping a pod) raised as a Ctrl-C is:
    what is under way ends as it does then (a diff's run is recorded failed)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run() -> NoReturn:
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main(whole_process=True))


if __name__ == "__main__":
    run()
