"""``trueup dlq``: how many dead letters wait, how old the oldest is, and why they failed.

Nothing is taken off the queue: Kafka letters are read with ``assign()`` from the replay group's
committed offsets without committing; RabbitMQ's depth is a passive declare, and the breakdown
reads messages without acking them, which puts them back in place (see
:mod:`trueup.letterboxes.rabbitmq`). The breakdown covers at most :data:`INSPECT_LIMIT` letters
(the oldest); the depth is always exact (for Kafka, in offsets, as consumer lag counts them:
transaction markers count too).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trueup import metrics
from trueup.config import Config
from trueup.headers import now
from trueup.letterboxes import open_letterbox
from trueup.log import get_logger

log = get_logger(__name__)

INSPECT_LIMIT = 100_000   # letters read for the breakdown and the oldest age
BATCH_SIZE = 1000
NO_ORIGIN = "unknown"


@dataclass(frozen=True, kw_only=True)
class DlqReport:
    name: str
    depth: int
    oldest_age_seconds: float | None
    by_error: dict[str, int] = field(default_factory=dict)
    by_origin: dict[str, int] = field(default_factory=dict)
    inspected: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "depth": self.depth,
                "oldest_age_seconds": (round(self.oldest_age_seconds, 3)
                                       if self.oldest_age_seconds is not None else None),
                "by_error": self.by_error, "by_origin": self.by_origin}


def inspect(config: Config, name: str, *, limit: int = INSPECT_LIMIT,
            breakdown: bool = True) -> DlqReport:
    """Depth, oldest age and counts by error class and origin of dead-letter queue ``name``.

    ``breakdown=False`` only asks for the depth (cheap: nothing is read).
    """
    box = open_letterbox(config, name)
    try:
        depth = box.depth()
        metrics.DLQ_DEPTH.labels(name).set(depth)
        if depth == 0:
            metrics.DLQ_OLDEST_AGE.labels(name).set(0)
        elif not breakdown:
            # letters waiting, none read: an age set before (0 of an empty queue, say) would
            # now be wrong, and an unknown one is not reported
            with contextlib.suppress(KeyError):
                metrics.DLQ_OLDEST_AGE.remove(name)
        if not breakdown or depth == 0:
            # Without reading, the oldest age is unknown.
            return DlqReport(name=name, depth=depth, oldest_age_seconds=None)
        errors: Counter[str] = Counter()
        origins: Counter[str] = Counter()
        # each Kafka partition's oldest letter, whichever partition the first letters read are of
        oldest: dt.datetime | None = min(
            (letter.failed_at for letter in box.heads() if letter.failed_at is not None),
            default=None)
        seen = 0
        batches = box.letters(batch_size=min(BATCH_SIZE, limit), take=False)
        try:
            for batch in batches:
                for item in batch[: limit - seen]:
                    letter = item.letter
                    errors[letter.error_class] += 1
                    origins[letter.origin or NO_ORIGIN] += 1
                    if letter.failed_at is not None and (oldest is None
                                                         or letter.failed_at < oldest):
                        oldest = letter.failed_at
                seen += len(batch[: limit - seen])
                if seen >= limit:
                    break
        finally:
            batches.close()
    finally:
        box.close()
    age = (now() - oldest).total_seconds() if oldest is not None else None
    report = DlqReport(name=name, depth=depth, oldest_age_seconds=age,
                       by_error=dict(errors.most_common()), by_origin=dict(origins.most_common()),
                       inspected=seen)
    if age is not None:
        metrics.DLQ_OLDEST_AGE.labels(name).set(age)
    log.info("dlq.inspected", name=name, depth=depth, inspected=seen)
    return report


def cmd_dlq(config: Config, args: argparse.Namespace) -> int:
    """``trueup dlq NAME [--json]``."""
    from trueup.cli import EXIT_OK, to_json

    report = inspect(config, args.name)
    if args.json:
        print(to_json(report.as_json()))
        return EXIT_OK
    dlq = config.dead_letter(args.name)
    where = f"topic {dlq.topic}" if dlq.topic else f"queue {dlq.queue}"
    age = (f"{report.oldest_age_seconds:.0f}s" if report.oldest_age_seconds is not None
           else "-")
    print(f"{report.name} ({where}): depth {report.depth}, oldest {age}")
    if report.inspected < report.depth:
        print(f"  (breakdown of the oldest {report.inspected})")
    for title, counts in (("by error", report.by_error), ("by origin", report.by_origin)):
        if counts:
            print(f"  {title}:")
            width = max(len(k) for k in counts)
            for key, count in counts.items():
                print(f"    {key:<{width}}  {count}")
    return EXIT_OK
