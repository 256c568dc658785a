"""trueup: reconciliation, backfills and dead-letter replay for Postgres, Kafka and RabbitMQ.

The engine is importable and usable without Dagster; the Dagster code location lives in the
top-level ``assets``, ``checks`` and ``pipelines`` packages and only calls into this one.
"""

__version__ = "0.1.0"
