"""The routed client: a request goes down the scheduler's ranking to the first engine server that
accepts it, over real HTTP on loopback; what a failure costs depends on when it happens."""

import json

import pytest

from app.api.gateway_serving import GatewayServing
from app.gateway.errors import EngineFailed, EngineOverloaded
from app.gateway.metrics import engine_streams_counter
from app.gateway.relay import ForwardedCall
from app.gateway.routed import reachable_from
from app.openai.errors import APIError
from app.openai.prepare import ServedModel
from app.protocol.engine import EngineRequest, EngineRequestRejected, EngineUnavailableError, SamplingParams
from app.router.scheduler import Decision, RoutingRequest
from app.router.state import ReplicaInfo, ReplicaState
from tests.gateway.servers import Recorder, fleet, routed_client, serving, sse_app
from tests.helpers import free_port

NODE = "node-a"


def event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def delta(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
    d = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "engine-name",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


ANSWER = [event(delta("", role="assistant")), event(delta("He")), event(delta("llo")),
          event(delta(finish="length")),
          event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                          "prompt_tokens_details": {"cached_tokens": 0}}}),
          b"data: [DONE]\n\n"]


def request(**kw) -> EngineRequest:
    return EngineRequest(request_id="req-1", model="m", prompt_token_ids=[1, 2, 3], block_hashes=[7],
                         sampling=SamplingParams(max_tokens=2), **kw)


def chat_call(**body) -> ForwardedCall:
    return ForwardedCall("/v1/chat/completions", {"model": "engine-name", "messages": [{"role": "user",
                         "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}, **body},
                         client_model="m", engine_model="engine-name", keep_usage=False)


def decision(*ranked: str) -> Decision:
    return Decision(ranked=list(ranked), reason="load", policy="test")


ROUTING = RoutingRequest(model="m", block_hashes=[7], num_prompt_tokens=3, block_size=16)


async def read(reply) -> bytes:
    return reply.first + b"".join([data async for data in reply.rest()])


async def test_the_chosen_replicas_server_answers_and_the_client_gets_its_own_dialect():
    from prometheus_client import CollectorRegistry

    a, b = Recorder(sse_app(ANSWER)), Recorder(sse_app(ANSWER))
    registry = CollectorRegistry()
    async with serving(a) as url_a, serving(b) as url_b:
        client = routed_client(fleet(("a", url_a, "mixed"), ("b", url_b, "mixed")),
                               streams=engine_streams_counter(registry))
        reply = await client.serve(request(), chat_call(), ROUTING, decision("b", "a"))
        body = await read(reply)
        reply.close()
    assert (len(a.bodies), len(b.bodies)) == (0, 1) and reply.replica_id == "b"
    # The engine's events pass as they are, with the client's model name, and no usage it did not ask for.
    assert body.count(b'"model": "m"') == 4 and b"engine-name" not in body and b'"usage"' not in body
    assert body.endswith(b"data: [DONE]\n\n") and reply.completed and reply.usage["completion_tokens"] == 2
    assert registry.get_sample_value("gateway_engine_streams_total", {"model": "m", "path": "direct"}) == 1


@pytest.mark.parametrize(
    ("url", "node", "reachable"),
    [
        (None, NODE, False),  # no server
        ("http://127.0.0.1:20001", "node-b", False),  # loopback on another node is someone else's port
        ("http://10.0.0.7:20001", "node-b", True),  # a routable server on another node
        ("http://127.0.0.1:20001", NODE, True),
    ],
)
def test_only_reachable_servers_are_called_directly(url, node, reachable):
    replica = ReplicaState(ReplicaInfo(replica_id="a", model="m", block_size=16, num_gpu_blocks=8,
                                       endpoint_url=url, node_id=node))
    assert reachable_from(replica, NODE) is reachable


async def test_a_dead_server_is_skipped_for_the_next_without_the_kv_hand_off():
    b = Recorder(sse_app(ANSWER))
    dead = f"http://127.0.0.1:{free_port()}"
    async with serving(b) as url_b:
        client = routed_client(fleet(("a", dead, "decode"), ("b", url_b, "decode")), roles=("decode",))
        hand_off = {"do_remote_prefill": True, "remote_engine_id": "p1"}
        reply = await client.serve(request(), chat_call(kv_transfer_params=hand_off), ROUTING, decision("a", "b"))
        await read(reply)
        reply.close()
    assert reply.replica_id == "b" and "kv_transfer_params" not in b.bodies[0]
    # The dead server goes to the back of later rankings for a while.
    assert client._order(["a", "b"]) == ["b", "a"]


async def test_a_failed_prefill_is_not_retried():
    spare = Recorder(sse_app(ANSWER))
    dead = f"http://127.0.0.1:{free_port()}"
    async with serving(spare) as url:
        client = routed_client(fleet(("p", dead, "prefill"), ("q", url, "prefill")), roles=("prefill",),
                               max_attempts=1)
        with pytest.raises(EngineFailed):
            await client.serve(request(), chat_call(), ROUTING, decision("p", "q"))
    assert spare.bodies == []


async def test_a_split_sends_the_clients_body_to_prefill_whole_and_its_hand_off_to_decode():
    from prometheus_client import CollectorRegistry

    from app.gateway.metrics import DisaggregationMetrics
    from app.gateway.split import SplitClient

    async def prefill_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        answer = {"id": "x", "object": "chat.completion", "model": "engine-name",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                               "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                  "kv_transfer_params": {"remote_engine_id": "p1", "remote_block_ids": [0]}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    prefill, decode = Recorder(prefill_app), Recorder(sse_app(ANSWER))
    async with serving(prefill) as url_p, serving(decode) as url_d:
        state = fleet(("p", url_p, "prefill"), ("d", url_d, "decode"))
        metrics = DisaggregationMetrics(CollectorRegistry())
        split = SplitClient(routed_client(state, roles=("decode", "mixed")),
                            routed_client(state, roles=("prefill",), max_attempts=1),
                            model="m", min_split_tokens=0, prefill_timeout_s=5, metrics=metrics)
        reply = await split.open(request(), chat_call(response_format={"type": "json_object"}))
        await read(reply)
        reply.close()
    [sent_prefill], [sent_decode] = prefill.bodies, decode.bodies
    assert sent_prefill["stream"] is False and sent_prefill["max_tokens"] == 1
    assert sent_prefill["kv_transfer_params"]["do_remote_decode"] is True and "stream_options" not in sent_prefill
    # Both hops carry the client's own fields: the decode continues what the prefill started.
    assert sent_prefill["response_format"] == sent_decode["response_format"] == {"type": "json_object"}
    assert sent_decode["kv_transfer_params"] == {"remote_engine_id": "p1", "remote_block_ids": [0]}
    assert metrics.requests.labels("m", "split")._value.get() == 1


def served(client) -> GatewayServing:
    from app.kv.text_keys import ApproximateBlockKeys

    model = ServedModel(name="m", tokenizer=None, engine=client, max_model_len=4096, block_size=16,
                        text_keys=ApproximateBlockKeys(16, 4.0), engine_model_name="engine-name")
    return GatewayServing([model], retry_after_s=2)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_a_server_failing_mid_answer_is_a_503_not_a_silent_cut():
    cut = ANSWER[:2]  # the role and one token, then the connection ends
    async with serving(sse_app(cut)) as url:
        gateway = served(routed_client(fleet(("a", url, "mixed"))))
        got = []
        with pytest.raises(APIError) as failure:
            async for chunk in gateway.stream("chat", CHAT):
                got.append(chunk)
    assert failure.value.status_code == 503
    assert [c["choices"][0]["delta"].get("content") for c in got] == ["", "He"]


async def test_an_error_the_engine_sends_before_any_output_is_a_status_not_an_event():
    refusal = [event({"error": {"message": "logprobs are not supported", "type": "BadRequestError",
                                "param": "logprobs", "code": 400}}), b"data: [DONE]\n\n"]
    overload = [event({"error": {"message": "engine busy", "type": "ServiceUnavailableError", "code": 503}}),
                b"data: [DONE]\n\n"]
    async with serving(sse_app(refusal)) as refusing, serving(sse_app(overload)) as busy:
        with pytest.raises(APIError) as refused:
            await served(routed_client(fleet(("a", refusing, "mixed")))).open("chat", CHAT)
        with pytest.raises(APIError) as overloaded:
            await served(routed_client(fleet(("a", busy, "mixed"), ("b", busy, "mixed")))).open("chat", CHAT)
    assert (refused.value.status_code, refused.value.param) == (400, "logprobs")
    assert overloaded.value.status_code == 503 and overloaded.value.code == "engine_overloaded"
    assert overloaded.value.headers() == {"Retry-After": "2"}


async def test_http_refusals_map_to_the_clients_error_or_the_next_server():
    async with serving(sse_app([b'{"error": {"message": "bad field", "param": "top_k"}}'], status=400)) as bad, \
            serving(sse_app([b"overloaded"], status=503)) as busy:
        with pytest.raises(EngineRequestRejected, match="bad field"):
            await routed_client(fleet(("a", bad, "mixed"))).open(request(), chat_call())
        with pytest.raises(EngineOverloaded):
            await routed_client(fleet(("a", busy, "mixed"), ("b", busy, "mixed"))).open(request(), chat_call())
        with pytest.raises(EngineUnavailableError):
            await routed_client(fleet(("a", f"http://127.0.0.1:{free_port()}", "mixed"))).open(request(), chat_call())


async def test_a_request_for_an_adapter_waits_for_a_replica_that_serves_it_then_goes_there():
    import asyncio

    from app.protocol.engine import AdapterLoad
    from app.router.state import ReplicaStats

    a, b = Recorder(sse_app(ANSWER)), Recorder(sse_app(ANSWER))
    async with serving(a) as url_a, serving(b) as url_b:
        state = fleet(("a", url_a, "mixed"), ("b", url_b, "mixed"))
        for rid in ("a", "b"):  # engine replicas that list their adapters, before their stats say any
            state.replicas[rid].info = state.replicas[rid].info.model_copy(update={"lists_adapters": True})
        client = routed_client(state, adapter_wait_s=5.0)
        routing = RoutingRequest(model="m", block_hashes=[7], num_prompt_tokens=3, block_size=16, adapter="sql")

        async def loaded_on_b() -> None:
            await asyncio.sleep(0.3)
            state.update_stats("b", ReplicaStats(adapters=AdapterLoad(max_loras=2, served=["sql"])), now=0.0)

        task = asyncio.create_task(loaded_on_b())
        # No ranking yet (the fleet was not known when the request was routed): it waits, not the fallback.
        reply = await client.serve(request(lora_name="sql"), chat_call(), routing, None)
        await read(reply)
        reply.close()
        await task
    assert (len(a.bodies), len(b.bodies)) == (0, 1)

    quick = routed_client(fleet(("a", None, "mixed")), adapter_wait_s=0.2)
    quick._scheduler.state.replicas["a"].info = quick._scheduler.state.replicas["a"].info.model_copy(
        update={"lists_adapters": True})
    with pytest.raises(Exception, match="serves adapter 'sql' yet"):
        await quick.serve(request(lora_name="sql"), chat_call(), routing, None)
