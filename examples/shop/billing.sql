-- The billing service's database: invoices projected from the orders.v1 events.
CREATE SCHEMA IF NOT EXISTS billing;
CREATE TABLE IF NOT EXISTS billing.invoices (
    order_id       bigint      PRIMARY KEY,
    order_version  bigint      NOT NULL,
    status         text        NOT NULL,
    total_cents    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
