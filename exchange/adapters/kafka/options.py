"""What every Kafka client of the exchange shares: connection options, and the producer contract.

:func:`client_options` maps ``[kafka]`` authentication and TLS to aiokafka's arguments (the consumer,
the producer and ``exchange admin`` use it); :func:`partition_for` is where an instrument's messages
belong: murmur2 of the key, as Kafka's Java client and aiokafka place them.
"""

from __future__ import annotations

from typing import Any

from aiokafka.partitioner import murmur2

from exchange.settings import KafkaSettings

__all__ = ["client_options", "partition_for"]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The aiokafka keyword arguments for authentication and TLS, from ``[kafka]`` settings.

    Shared by the consumer, the producer and ``exchange admin``. SASL credentials
    (PLAIN or SCRAM) are sent only with ``SASL_*`` protocols; the TLS context is
    built only with ``SSL``/``SASL_SSL``: the system CAs unless ``ssl_cafile``,
    a client certificate for mutual TLS when ``ssl_certfile`` is set.
    """
    protocol = kafka.security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                       sasl_plain_password=kafka.sasl_password)
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(cafile=kafka.ssl_cafile or None, certfile=kafka.ssl_certfile or None,
                                     keyfile=kafka.ssl_keyfile or None)
        context.check_hostname = kafka.ssl_check_hostname
        options["ssl_context"] = context
    return options


def partition_for(instrument: str, partitions: int) -> int:
    """The orders partition of ``instrument`` under the producer contract: murmur2 of the key (the
    instrument's UTF-8 bytes), as Kafka's Java client and aiokafka place it (librdkafka:
    ``partitioner=murmur2_random``)."""
    return int(murmur2(instrument.encode()) & 0x7FFFFFFF) % partitions
