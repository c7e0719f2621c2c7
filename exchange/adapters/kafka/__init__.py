"""Kafka at the edges: the order source (consumer) and the event publisher (producer).

- :mod:`.source`: :class:`OrderSource`, the orders topic into the instruments' loops (the edge's guard,
  one partition per instrument, dead letters exactly once, offsets that went backwards as incidents),
  split by role: :mod:`.accounting` (offsets read, dispatched, durable, committed), :mod:`.deadletters`,
  :mod:`.homes` (each instrument's partition), :mod:`.assignment` (plans, incidents, operator resets)
  and :mod:`.rebalance` (the group's listener);
- :mod:`.publisher`: :class:`KafkaEventPublisher`, durable events and trades out, dead letters and
  seq-0 rejections, every record bounded;
- :mod:`.tracing`: an order's W3C trace headers carried to the records of its events;
- :mod:`.logs`: what the broker really holds (a partition's log end, the dead letters already sent);
- :mod:`.options`: client options (SASL, TLS) and :func:`partition_for`, the producer contract.
"""

from exchange.adapters.kafka.assignment import Incident
from exchange.adapters.kafka.options import client_options, partition_for
from exchange.adapters.kafka.publisher import KafkaEventPublisher, OutRecord
from exchange.adapters.kafka.source import OrderSource

__all__ = ["Incident", "KafkaEventPublisher", "OrderSource", "OutRecord", "client_options",
           "partition_for"]
