"""The waiting queue: premium before standard before free, round-robin by customer in a tier."""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, Protocol, TypeVar

from tokenmill.events import TIERS, Tier

# Higher ranks are admitted first and preempted last.
TIER_RANK: dict[str, int] = {tier: rank for rank, tier in enumerate(TIERS)}


class Queued(Protocol):
    request_id: str
    customer_id: str
    tier: Tier


T = TypeVar("T", bound=Queued)


class FairQueue(Generic[T]):
    """Requests waiting for the engine.

    Within a tier each customer has its own line and the tier serves customers in turn, so a
    burst of one customer's requests waits behind everyone else's next request instead of in
    front of all of them.
    """

    def __init__(self) -> None:
        self._tiers: dict[str, OrderedDict[str, deque[T]]] = {t: OrderedDict() for t in TIERS}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, item: T) -> None:
        self._tiers[item.tier].setdefault(item.customer_id, deque()).append(item)
        self._count += 1

    def push_front(self, item: T) -> None:
        """Put a preempted request back at the head of its tier: it was admitted once already."""
        lines = self._tiers[item.tier]
        lines.setdefault(item.customer_id, deque()).appendleft(item)
        lines.move_to_end(item.customer_id, last=False)
        self._count += 1

    def peek(self) -> T | None:
        for tier in reversed(TIERS):
            lines = self._tiers[tier]
            if lines:
                return next(iter(lines.values()))[0]
        return None

    def pop(self) -> T:
        item = self.peek()
        assert item is not None, "pop from an empty queue"
        lines = self._tiers[item.tier]
        line = lines[item.customer_id]
        line.popleft()
        # The customer goes to the back of the tier's round; an empty line leaves it.
        if line:
            lines.move_to_end(item.customer_id)
        else:
            del lines[item.customer_id]
        self._count -= 1
        return item

    def remove(self, request_id: str) -> T | None:
        for lines in self._tiers.values():
            for customer, line in lines.items():
                for item in line:
                    if item.request_id == request_id:
                        line.remove(item)
                        if not line:
                            del lines[customer]
                        self._count -= 1
                        return item
        return None
