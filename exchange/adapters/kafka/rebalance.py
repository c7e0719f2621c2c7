"""The consumer group's rebalance listener: what the order source does when partitions come and go.

Revoked: the refusals gathered so far are dead-lettered and what is done is committed before the
group hands the partitions to another member, then their state is dropped. Assigned: each new
partition is planned before anything of it is read (:meth:`exchange.adapters.kafka.assignment.Assignment.assign`).
"""

from __future__ import annotations

from typing import Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition

__all__ = ["GroupMember", "Rebalance"]


class GroupMember(Protocol):
    async def revoking(self, partitions: set[TopicPartition]) -> None: ...

    async def assigned(self, partitions: set[TopicPartition]) -> None: ...


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._member.revoking(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._member.assigned(assigned)
