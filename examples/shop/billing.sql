-- The billing service's database: invoices projected from the orders.v1 events.
CREATE SCHEMA IF NOT EXISTS billing;
CREATE TABLE IF NOT EXISTS billing.invoices (
    order_id       bigint      PRIMARY KEY,
    order_version  bigint      NOT NULL,
    status         text        NOT NULL,
    total_cents    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The ledger worker's settled payments (one row per payment id: settling twice changes nothing).
CREATE TABLE IF NOT EXISTS billing.ledger (
    payment_id    text        PRIMARY KEY,
    order_id      bigint      NOT NULL,
    kind          text        NOT NULL,
    amount_cents  bigint      NOT NULL,
    currency      text        NOT NULL,
    settled_at    timestamptz NOT NULL DEFAULT now()
);

-- Feature flags the running billing consumer and ledger read: what "deploying" a release of
-- billing changes (examples/shop/deploy.py), without restarting the workers.
CREATE TABLE IF NOT EXISTS billing.features (
    name     text    PRIMARY KEY,
    enabled  boolean NOT NULL
);
