"""Admission: whether the gateway takes a request now or asks the client to come back.

For now a bound on requests in flight per ingress replica; priority classes and shedding build on it.
"""

from __future__ import annotations


class InflightLimit:
    """Admits at most `limit` concurrent requests; `None` admits everything."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.limit = limit
        self.inflight = 0

    def try_acquire(self) -> bool:
        if self.limit is not None and self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)
