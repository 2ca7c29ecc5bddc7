"""Predicting a replica's time to first token, calibrated online from observed TTFTs.

TTFT ~ c0 + c1 * (prefill tokens ahead of the request + its own uncached tokens)
          + c2 * load + c3 * queued,
where load is the replica's running plus waiting requests (a bigger batch makes every step slower)
and queued is how many of them exceed the engine's max_num_seqs: those wait for a batch slot, and
a newcomer waits behind them for running requests to finish, which costs far more per request than
a slightly slower step. The coefficients start at priors from the engine's step-time profile and
are refit after every observed first token by recursive least squares with forgetting, so the
model follows the hardware and the traffic it actually sees. Coefficients are kept non-negative at
prediction time: more work never predicts a faster start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# Features are scaled to similar magnitudes so one forgetting factor suits all three.
_TOKEN_SCALE = 1000.0
_LOAD_SCALE = 10.0
_MAX_COVARIANCE_TRACE = 40.0


class TTFTPrior(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(default=0.01, ge=0, description="Fixed cost: routing hop plus one engine step.")
    per_prefill_token_s: float = Field(default=5e-5, ge=0, description="Seconds per prompt token to prefill.")
    per_running_request_s: float = Field(default=2e-3, ge=0, description="Seconds added per request in the batch.")
    per_queued_request_s: float = Field(
        default=0.03, ge=0, description="Seconds added per request waiting for a batch slot (beyond max_num_seqs)."
    )
    min_miss_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Floor of a cache miss's price, as a fraction of the prior."
    )
    forgetting: float = Field(default=0.995, gt=0.9, le=1.0, description="RLS forgetting factor per observation.")


@dataclass(frozen=True, slots=True)
class TTFTFeatures:
    prefill_tokens: float
    """Tokens ahead of the request plus its own uncached tokens."""
    load: float
    queued: float = 0.0
    """Requests beyond the engine's batch capacity, waiting for a slot."""

    def vector(self) -> np.ndarray:
        return np.array(
            [1.0, self.prefill_tokens / _TOKEN_SCALE, self.load / _LOAD_SCALE, self.queued / _LOAD_SCALE]
        )


class TTFTModel:
    def __init__(self, prior: TTFTPrior | None = None) -> None:
        self.prior = prior or TTFTPrior()
        self.theta = np.array(
            [
                self.prior.base_s,
                self.prior.per_prefill_token_s * _TOKEN_SCALE,
                self.prior.per_running_request_s * _LOAD_SCALE,
                self.prior.per_queued_request_s * _LOAD_SCALE,
            ]
        )
        # Confidence in the prior: loose enough that a few dozen observations dominate it.
        self._p = np.eye(4) * 1.0
        self.observations = 0

    def predict(self, features: TTFTFeatures) -> float:
        theta = np.maximum(self.theta, 0.0)
        return float(theta @ features.vector())

    def predict_many(self, prefill_tokens: np.ndarray, load: np.ndarray, queued: np.ndarray) -> np.ndarray:
        c0, c1, c2, c3 = np.maximum(self.theta, 0.0)
        return c0 + c1 * (prefill_tokens / _TOKEN_SCALE) + c2 * (load / _LOAD_SCALE) + c3 * (queued / _LOAD_SCALE)

    def miss_seconds(self, tokens: np.ndarray) -> np.ndarray:
        """What a cache miss of this many tokens costs, for pricing affinity.

        Under heavy queueing TTFT is mostly waiting, and the fit can credit nearly all of it to load,
        leaving the token coefficient near zero: misses would look free exactly when they hurt most.
        So this price never drops below `min_miss_fraction` of the prior's per-token cost.
        """
        floor = self.prior.min_miss_fraction * self.prior.per_prefill_token_s * _TOKEN_SCALE
        return max(float(self.theta[1]), floor) * (tokens / _TOKEN_SCALE)

    def observe(self, features: TTFTFeatures, ttft_s: float) -> None:
        if not np.isfinite(ttft_s) or ttft_s < 0:
            return
        x = features.vector()
        lam = self.prior.forgetting
        px = self._p @ x
        gain = px / (lam + x @ px)
        self.theta = self.theta + gain * (ttft_s - self.theta @ x)
        p = (self._p - np.outer(gain, px)) / lam
        p = (p + p.T) / 2  # rounding must not make it lose symmetry
        # With forgetting, P grows without bound along directions traffic does not excite (a queue
        # that is always empty), and the first observation that does excite one then moves the fit
        # wildly. Scaling the whole matrix down keeps it positive definite; clipping entries would not.
        trace = float(np.trace(p))
        if trace > _MAX_COVARIANCE_TRACE:
            p *= _MAX_COVARIANCE_TRACE / trace
        self._p = p
        self.observations += 1

    @property
    def coefficients(self) -> dict[str, float]:
        c0, c1, c2, c3 = self.theta
        return {
            "base_s": float(c0),
            "per_prefill_token_s": float(c1 / _TOKEN_SCALE),
            "per_running_request_s": float(c2 / _LOAD_SCALE),
            "per_queued_request_s": float(c3 / _LOAD_SCALE),
        }
