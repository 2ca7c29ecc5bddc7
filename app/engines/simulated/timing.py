"""How long a simulated engine step takes, from what the step computes."""

from __future__ import annotations

from dataclasses import dataclass

from app.engines.simulated.config import StepTimeConfig


@dataclass(frozen=True, slots=True)
class StepWork:
    prefill_tokens: int = 0
    decode_seqs: int = 0
    transferred_blocks: int = 0

    @property
    def empty(self) -> bool:
        return not (self.prefill_tokens or self.decode_seqs or self.transferred_blocks)


def step_duration(work: StepWork, cost: StepTimeConfig) -> float:
    """Modelled seconds for one step; see StepTimeConfig for the formula."""
    if work.empty:
        return 0.0
    return (
        cost.step_overhead_s
        + cost.prefill_s_per_token * work.prefill_tokens
        + cost.decode_s_per_seq * work.decode_seqs
        + cost.kv_transfer_s_per_block * work.transferred_blocks
    )
