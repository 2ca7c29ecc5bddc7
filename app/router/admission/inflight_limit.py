"""Admission stage: at most `max_inflight_requests` requests in flight on this ingress replica."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.router.admission.base import AdmissionRequest, FleetLoad, Refusal


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


class InflightLimitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_inflight_requests: int | None = Field(default=None, ge=1, description="None: no limit.")


class InflightLimitStage:
    Params = InflightLimitParams

    def __init__(self, params: InflightLimitParams, *, retry_after_s: float) -> None:
        self._limit = InflightLimit(params.max_inflight_requests)
        self._retry_after_s = retry_after_s

    @property
    def inflight(self) -> int:
        return self._limit.inflight

    def admit(self, request: AdmissionRequest, fleet: FleetLoad) -> Refusal | None:
        if self._limit.try_acquire():
            return None
        return Refusal(429, "too_many_requests",
                       "The gateway is at its limit of requests in flight; retry after the indicated delay.",
                       self._retry_after_s)

    def release(self, request: AdmissionRequest) -> None:
        self._limit.release()
