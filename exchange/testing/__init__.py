"""Test and benchmark helpers (local Kafka-compatible broker harness, ...)."""
