-- 0006: a schema of their own for the tables of unreadable Kafka messages, one per mirror and
-- named as its reconciliation. In trueup_mirror they were "<name>__unreadable", which Postgres
-- cuts to 63 characters: for a 63-character name that was the mirror table itself, and
-- "orders__unreadable" could be the mirror of a reconciliation of that name. The next diff of
-- each reconciliation moves its table here (trueup.mirror._ensure_tables).

CREATE SCHEMA IF NOT EXISTS trueup_mirror_unreadable;
