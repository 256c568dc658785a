-- The shop's own database: orders and the transactional outbox that feeds Kafka orders.v1.
CREATE TABLE IF NOT EXISTS public.orders (
    id            bigint      PRIMARY KEY,
    customer_id   bigint      NOT NULL,
    status        text        NOT NULL,
    amount_cents  bigint      NOT NULL,
    currency      text        NOT NULL,
    version       bigint      NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- daily partitions of reconciliations cut on updated_at
CREATE INDEX IF NOT EXISTS orders_updated_at_idx ON public.orders (updated_at);

CREATE TABLE IF NOT EXISTS public.outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic         text        NOT NULL,
    key           text        NOT NULL,
    payload       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unpublished_idx ON public.outbox (id) WHERE published_at IS NULL;
