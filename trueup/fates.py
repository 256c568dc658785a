"""The fate of one dead letter in a replay: move it, park it, skip it, or leave it be.

A pure decision from the letter, its queue's config and what earlier replays did; the replay
loop (:mod:`trueup.replay`) acts on it. Kept apart so the rules read in one place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from trueup.config import DeadLetterConfig
from trueup.letterboxes import Settle
from trueup.letters import DeadLetter, Destination
from trueup.retry import RetryPolicy
from trueup.statuses import ReplayOutcome


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What happens to one letter. ``outcome`` None: filtered out (counted as skipped, not
    recorded as an event)."""

    outcome: ReplayOutcome | None
    destination: Destination | None
    settle: Settle
    reason: str = ""

    @functools.cached_property
    def destination_text(self) -> str | None:
        """The destination as recorded in ``trueup.replay_events``."""
        return str(self.destination) if self.destination is not None else None

    # Cached: plans are shared by many letters (see _Planner) and asked for each one.
    @functools.cached_property
    def sends(self) -> bool:
        return self.outcome in (ReplayOutcome.MOVED, ReplayOutcome.PARKED)

    @functools.cached_property
    def counts_toward_max(self) -> bool:
        return self.outcome in (ReplayOutcome.MOVED, ReplayOutcome.PARKED,
                                ReplayOutcome.WOULD_MOVE, ReplayOutcome.WOULD_PARK)


def plan(letter: DeadLetter, dlq: DeadLetterConfig, *, selected: bool,
         replayed_by: int | None, dry_run: bool, policy: RetryPolicy | None = None) -> Plan:
    """The fate of one letter; ``replayed_by`` is the newest replay that moved its id.

    ``policy`` is the queue's retry policy (built from ``dlq`` when not given).
    """
    if not selected:
        return Plan(outcome=None, destination=None, settle=Settle.KEEP, reason="filtered out")
    if replayed_by is not None and replayed_by > letter.generation:
        # This copy was moved already (the process stopped before removing it): drop it.
        return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.DONE,
                    reason=f"already replayed by replay {replayed_by}")
    if (policy or RetryPolicy.from_config(dlq)).exhausted(letter.attempts):
        if dlq.parking is None:
            return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.TAIL,
                        reason=f"{letter.attempts} attempts and no parking configured")
        return Plan(outcome=ReplayOutcome.WOULD_PARK if dry_run else ReplayOutcome.PARKED,
                    destination=Destination(name=dlq.parking), settle=Settle.DONE,
                    reason=f"{letter.attempts} attempts (max_attempts {dlq.max_attempts})")
    if dlq.replay_to is not None:
        destination = Destination(name=dlq.replay_to.name, exchange=dlq.replay_to.exchange,
                                  routing_key=dlq.replay_to.routing_key)
    elif letter.origin is not None:
        destination = Destination(name=letter.origin)
    else:
        return Plan(outcome=ReplayOutcome.SKIPPED, destination=None, settle=Settle.TAIL,
                    reason="no origin header and no replay_to")
    return Plan(outcome=ReplayOutcome.WOULD_MOVE if dry_run else ReplayOutcome.MOVED,
                destination=destination, settle=Settle.DONE)
