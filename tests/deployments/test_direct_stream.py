"""The ingress streaming straight from an engine's own server, and falling back to the Serve hop."""

import json

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.api.errors import APIError
from app.deployments.direct_stream import DirectStreamEngineClient, engine_streams_counter
from app.engines.protocol import EngineOutput, EngineRequest, EngineUnavailableError, SamplingParams
from app.router.state import ClusterState, ReplicaInfo

NODE = "node-a"


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def choice(text: str, token_ids: list[int], finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish}]}


ANSWER = sse(choice("He", [7]), choice("llo", [8], "length"))


class FakeServeClient:
    """Stands in for the Serve-handle client: records what reached it."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []

    async def generate(self, request: EngineRequest):
        self.requests.append(request)
        yield EngineOutput(request_id=request.request_id, text="via serve", token_ids=[1], finish_reason="stop",
                           replica_id=request.route[0] if request.route else "serve-pick")


def fleet(**endpoints: tuple[str | None, str, str]) -> ClusterState:
    """Replicas by id: (endpoint_url, node_id, role)."""
    state = ClusterState()
    for replica_id, (url, node, role) in endpoints.items():
        state.register(ReplicaInfo(replica_id=replica_id, model="tiny", role=role, block_size=32,
                                   num_gpu_blocks=64, endpoint_url=url, node_id=node))
    return state


def request(route: list[str], **kw) -> EngineRequest:
    return EngineRequest(request_id="req-1", model="tiny", prompt_token_ids=[1, 2, 3], route=route,
                         sampling=SamplingParams(max_tokens=2), **kw)


def client(state, handler, *, retry=True):
    fallback = FakeServeClient()
    registry = CollectorRegistry()
    direct = DirectStreamEngineClient(
        fallback, state, httpx.AsyncClient(transport=httpx.MockTransport(handler)), served_model_name="tiny",
        tokenizer=None, node_id=NODE, retry=retry, streams=engine_streams_counter(registry),
    )
    return direct, fallback, registry


def streams(registry: CollectorRegistry, path: str) -> float:
    return registry.get_sample_value("gateway_engine_streams_total", {"model": "tiny", "path": path}) or 0.0


async def collect(direct, req):
    return [o async for o in direct.generate(req)]


async def test_streams_from_the_chosen_replicas_server():
    seen = []

    def server(r: httpx.Request) -> httpx.Response:
        seen.append(str(r.url))
        return httpx.Response(200, content=ANSWER)

    state = fleet(a=("http://127.0.0.1:20001", NODE, "mixed"), b=("http://127.0.0.1:20002", NODE, "mixed"))
    direct, fallback, registry = client(state, server)
    outputs = await collect(direct, request(["b", "a"]))
    assert seen == ["http://127.0.0.1:20002/v1/completions"]
    assert "".join(o.text for o in outputs) == "Hello" and outputs[0].replica_id == "b"
    assert fallback.requests == [] and streams(registry, "direct") == 1


@pytest.mark.parametrize(
    ("url", "node", "direct_expected"),
    [
        (None, NODE, False),  # a simulated engine has no server
        ("http://127.0.0.1:20001", "node-b", False),  # loopback on another node is someone else's port
        ("http://10.0.0.7:20001", "node-b", True),  # a routable server on another node
        ("http://127.0.0.1:20001", NODE, True),
    ],
)
async def test_only_reachable_servers_are_called_directly(url, node, direct_expected):
    state = fleet(a=(url, node, "mixed"))
    direct, fallback, registry = client(state, lambda r: httpx.Response(200, content=ANSWER))
    outputs = await collect(direct, request(["a"]))
    assert (streams(registry, "direct") == 1) is direct_expected
    assert (len(fallback.requests) == 0) is direct_expected
    assert outputs[-1].finished


async def test_a_dead_server_falls_back_past_it_without_the_kv_hand_off():
    def refuse(r):
        raise httpx.ConnectError("connection refused")

    state = fleet(a=("http://127.0.0.1:20001", NODE, "decode"), b=("http://127.0.0.1:20002", NODE, "decode"))
    direct, fallback, registry = client(state, refuse)
    hand_off = {"do_remote_prefill": True, "remote_engine_id": "p1"}
    outputs = await collect(direct, request(["a", "b"], kv_transfer_params=hand_off))
    assert outputs[-1].text == "via serve"
    [retried] = fallback.requests
    assert retried.route == ["b"] and retried.kv_transfer_params is None
    assert streams(registry, "direct_failed") == 1


async def test_a_failed_prefill_is_not_retried():
    def refuse(r):
        raise httpx.ConnectError("connection refused")

    state = fleet(p=("http://127.0.0.1:20001", NODE, "prefill"))
    direct, fallback, _ = client(state, refuse, retry=False)
    with pytest.raises(EngineUnavailableError) as failure:
        await collect(direct, request(["p"], kv_transfer_params={"do_remote_decode": True}))
    assert failure.value.replica_id == "p" and fallback.requests == []


async def test_a_prefill_replica_answers_in_one_piece_with_its_hand_off():
    reply = {"choices": [{"text": "x", "token_ids": [5], "finish_reason": "length"}],
             "usage": {"prompt_tokens": 3}, "kv_transfer_params": {"remote_engine_id": "p1", "remote_block_ids": [0]}}
    bodies = []

    def server(r: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(r.content))
        return httpx.Response(200, json=reply)

    state = fleet(p=("http://127.0.0.1:20001", NODE, "prefill"))
    direct, _, _ = client(state, server, retry=False)
    [output] = await collect(direct, request(["p"], kv_transfer_params={"do_remote_decode": True}))
    assert bodies[0]["stream"] is False and bodies[0]["kv_transfer_params"] == {"do_remote_decode": True}
    assert output.kv_transfer_params["remote_engine_id"] == "p1" and output.replica_id == "p"


async def test_a_server_failing_mid_answer_is_a_503_not_a_silent_cut():
    cut = b"data: " + json.dumps(choice("He", [7])).encode() + b"\n\n"
    state = fleet(a=("http://127.0.0.1:20001", NODE, "mixed"))
    direct, fallback, _ = client(state, lambda r: httpx.Response(200, content=cut))
    got = []
    with pytest.raises(APIError) as failure:
        async for output in direct.generate(request(["a"])):
            got.append(output)
    assert failure.value.status_code == 503 and [o.text for o in got] == ["He"]
    assert fallback.requests == []  # half an answer already went out: no second attempt
