"""Broker adapters. Kafka and RabbitMQ modules share one shape: connect, inspect, error
translation (and, as the workers land, publish-with-confirm and consume)."""
