"""The example shop: orders with an outbox to Kafka, a billing projection, payments on RabbitMQ."""
