"""Adapters to the outside world: storage, brokers, market data."""
