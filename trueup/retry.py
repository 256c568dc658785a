"""The retry policy: one value that decides, for a failed attempt, "retry at T" or "dead-letter".

Both worker runtimes (Kafka retry topics, RabbitMQ delay queues) and the replayer (parking
messages already at ``max_attempts``) ask the same :class:`RetryPolicy`. Attempts are counted
over a message's whole life, across replays, in trueup's own header (see :mod:`trueup.headers`):
``max_attempts`` bounds how often a handler ever sees one message.

Backoff is exponential with a cap and *downward* jitter: the delay after failed attempt ``n`` is
``min(max, initial * multiplier ** (n - 1))`` scaled by a random factor in ``[1 - jitter, 1]``,
so the configured delays are upper bounds (RabbitMQ delay queues rely on that: a message never
waits longer than the queue's nominal delay). Errors known to be permanent skip the retries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from trueup.config import BackoffConfig, DeadLetterConfig

DEFAULT_JITTER = 0.1  # fraction of the delay removed at random, 0 <= jitter < 1


class PermanentError(Exception):
    """Raised by a handler for a message that no retry can fix (bad payload, unknown key...).

    The message goes straight to the dead-letter queue, with its error recorded there.
    """


class Verdict(StrEnum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


class DeadLetterReason(StrEnum):
    PERMANENT = "permanent"   # the error is known not to go away
    EXHAUSTED = "exhausted"   # max_attempts reached


@dataclass(frozen=True, kw_only=True)
class RetryDecision:
    """What to do with a message whose attempt number ``attempt`` (1-based) just failed."""

    verdict: Verdict
    attempt: int
    delay_seconds: float = 0.0
    reason: DeadLetterReason | None = None

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Attempts, backoff (initial delay, multiplier, cap), jitter, and errors that skip retries."""

    max_attempts: int = 5
    initial_seconds: float = 1.0
    multiplier: float = 2.0
    max_seconds: float = 600.0
    jitter: float = DEFAULT_JITTER
    permanent: tuple[type[BaseException], ...] = (PermanentError,)
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {self.max_attempts})")
        if self.initial_seconds < 0 or self.max_seconds < 0:
            raise ValueError("delays must not be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1 (got {self.multiplier})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1) (got {self.jitter})")

    @classmethod
    def from_backoff(cls, backoff: BackoffConfig, max_attempts: int, *,
                     jitter: float = DEFAULT_JITTER,
                     permanent: tuple[type[BaseException], ...] = (PermanentError,)
                     ) -> RetryPolicy:
        """The policy of a config file's ``backoff`` block and ``max_attempts``."""
        return cls(max_attempts=max_attempts,
                   initial_seconds=backoff.initial.total_seconds(),
                   multiplier=backoff.multiplier,
                   max_seconds=backoff.max.total_seconds(),
                   jitter=jitter, permanent=permanent)

    @classmethod
    def from_config(cls, dead_letters: DeadLetterConfig, *, jitter: float = DEFAULT_JITTER,
                    permanent: tuple[type[BaseException], ...] = (PermanentError,)
                    ) -> RetryPolicy:
        """The policy of one ``dead_letters`` entry (its ``backoff`` and ``max_attempts``)."""
        return cls.from_backoff(dead_letters.backoff, dead_letters.max_attempts, jitter=jitter,
                                permanent=permanent)

    @property
    def retries(self) -> int:
        """How many retries a message gets at most (attempts after the first)."""
        return self.max_attempts - 1

    def nominal_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next, without jitter."""
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1 (got {attempt})")
        # Cap the exponent too: multiplier ** huge overflows a float long before the cap.
        exponent = min(attempt - 1, 1024)
        try:
            raw = self.initial_seconds * self.multiplier ** exponent
        except OverflowError:
            raw = self.max_seconds
        return min(self.max_seconds, raw)

    def delay(self, attempt: int) -> float:
        """The jittered delay after failed attempt ``attempt``: within ``[1 - jitter, 1]`` of
        :meth:`nominal_delay`."""
        return self.nominal_delay(attempt) * (1.0 - self.jitter * self.random())

    def is_permanent(self, error: BaseException) -> bool:
        return isinstance(error, self.permanent)

    def exhausted(self, attempts: int) -> bool:
        """True when a message that failed ``attempts`` times may not be tried again."""
        return attempts >= self.max_attempts

    def decide(self, attempt: int, error: BaseException) -> RetryDecision:
        """Retry after a delay, or dead-letter, after attempt ``attempt`` failed with ``error``."""
        if attempt < 1:
            raise ValueError(f"attempt must be at least 1 (got {attempt})")
        if self.is_permanent(error):
            return RetryDecision(verdict=Verdict.DEAD_LETTER, attempt=attempt,
                                 reason=DeadLetterReason.PERMANENT)
        if self.exhausted(attempt):
            return RetryDecision(verdict=Verdict.DEAD_LETTER, attempt=attempt,
                                 reason=DeadLetterReason.EXHAUSTED)
        return RetryDecision(verdict=Verdict.RETRY, attempt=attempt,
                             delay_seconds=self.delay(attempt))
