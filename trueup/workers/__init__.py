"""Consumer runtimes with retries, backoff and dead letters, for Kafka and RabbitMQ.

A handler is a plain function taking a :class:`~trueup.workers.runtime.Delivery`; it returns to
say "done" and raises to say "failed" (:class:`~trueup.retry.PermanentError` for "never retry").
The runtime alone acks, commits, retries and dead-letters; handlers never do.
"""

from trueup.workers.runtime import Delivery, Handler, install_stop_signals

__all__ = ["Delivery", "Handler", "install_stop_signals"]
