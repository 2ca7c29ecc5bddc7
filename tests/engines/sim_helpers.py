"""Drive a SimulatedEngineCore in virtual time."""

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.core import CoreOutput, SimulatedEngineCore
from app.protocol.engine import EngineRequest, SamplingParams

VOCAB = list(range(10, 500))
EOS = 2


def make_core(**overrides) -> SimulatedEngineCore:
    fields = {"block_size": 4, "num_blocks": 64, "max_num_seqs": 4, "max_num_batched_tokens": 64}
    fields.update(overrides)
    return SimulatedEngineCore(
        SimulatedEngineConfig(**fields), vocab_token_ids=VOCAB, eos_token_id=EOS, max_model_len=256
    )


def request(rid: str, prompt: list[int], max_tokens: int = 4, kv_transfer_params=None, **sampling) -> EngineRequest:
    sampling.setdefault("ignore_eos", True)
    return EngineRequest(
        request_id=rid,
        model="m",
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        kv_transfer_params=kv_transfer_params,
    )


def run_until_idle(core: SimulatedEngineCore, now: float = 0.0, max_steps: int = 10_000):
    """Step until no work is left; returns (outputs by request, end time, step results)."""
    outputs: dict[str, list[CoreOutput]] = {}
    steps = []
    for _ in range(max_steps):
        if not core.has_work:
            break
        result = core.step(now)
        now += result.duration
        steps.append(result)
        for out in result.outputs:
            outputs.setdefault(out.request_id, []).append(out)
    return outputs, now, steps
