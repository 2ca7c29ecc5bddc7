"""The chain of engine clients, built in one place and driven with fake engine servers (no Ray)."""

import json

from app.gateway.client_builder import ClientBuilder, ModelPlan, Reach, SplitPlan, UnrankedClient
from app.gateway.relay import ForwardedCall
from app.gateway.routed import HTTPTransport, RoutedClient
from app.gateway.split import SplitClient
from app.protocol.engine import EngineRequest, SamplingParams
from app.router.scheduler import Scheduler
from app.upstream import UpstreamPool
from tests.gateway.servers import Recorder, fleet, serving, sse_app

ANSWER = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n',
          b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
          b'data: {"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":1}}\n\n', b"data: [DONE]\n\n"]


def request() -> EngineRequest:
    return EngineRequest(request_id="r1", model="m", prompt_token_ids=list(range(40)), block_hashes=[1, 2],
                         sampling=SamplingParams(max_tokens=4))


def call() -> ForwardedCall:
    return ForwardedCall("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                         "stream": True}, client_model="m", engine_model="m", keep_usage=False)


class PickingTransport:
    """A transport that picks the replica itself (as Serve's handle does for the baselines)."""

    path = "serve"

    def __init__(self, url: str, pool: UpstreamPool) -> None:
        self.http, self.url, self.calls = HTTPTransport(pool), url, 0

    async def open(self, request, call, replica, ranking):
        self.calls += 1
        from app.gateway.relay import open_on_server

        return await open_on_server(self.http._pool, self.url, call, "picked")


async def read(reply) -> bytes:
    data = reply.first + b"".join([piece async for piece in reply.rest()])
    reply.close()
    return data


async def test_a_plain_model_is_routed_over_its_replicas_servers():
    engine = Recorder(sse_app(ANSWER))
    async with serving(engine) as url:
        state = fleet(("a", url, "mixed"), node_id="here")
        builder = ClientBuilder(Scheduler(state))
        client = builder.build(ModelPlan("m", 16, max_ongoing={"mixed": 4}, max_queued={"mixed": 8}),
                               Reach(http=HTTPTransport(UpstreamPool()), node_id="here"))
        assert isinstance(client, RoutedClient)
        assert b'"content":"Hi"' in await read(await client.open(request(), call()))
    assert engine.paths == ["/v1/chat/completions"]


async def test_a_split_model_sends_long_prompts_through_a_prefill_replica_then_decode():
    async def prefill_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        body = {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "length"}],
                "kv_transfer_params": {"remote_engine_id": "p"}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    prefill, decode = Recorder(prefill_app), Recorder(sse_app(ANSWER))
    async with serving(prefill) as url_p, serving(decode) as url_d:
        state = fleet(("p", url_p, "prefill"), ("d", url_d, "decode"), node_id="here")
        client = ClientBuilder(Scheduler(state)).build(
            ModelPlan("m", 16, split=SplitPlan(min_split_tokens=8, prefill_timeout_s=5)),
            Reach(http=HTTPTransport(UpstreamPool()), node_id="here"),
        )
        assert isinstance(client, SplitClient)
        await read(await client.open(request(), call()))
    assert prefill.bodies[0]["max_tokens"] == 1
    assert decode.bodies[0]["kv_transfer_params"] == {"remote_engine_id": "p"}


async def test_without_a_ranking_at_the_gateway_the_transport_picks():
    async with serving(sse_app(ANSWER)) as url:
        picking = PickingTransport(url, UpstreamPool())
        client = ClientBuilder(Scheduler(fleet()), ranks_requests=False).build(
            ModelPlan("m", 16), Reach(by_role={"mixed": picking})
        )
        assert isinstance(client, UnrankedClient)
        await read(await client.open(request(), call()))
    assert picking.calls == 1


async def test_before_any_replica_registers_the_deployments_transport_serves():
    async with serving(sse_app(ANSWER)) as url:
        picking = PickingTransport(url, UpstreamPool())
        client = ClientBuilder(Scheduler(fleet())).build(
            ModelPlan("m", 16), Reach(by_role={"mixed": picking}, http=HTTPTransport(UpstreamPool()))
        )
        await read(await client.open(request(), call()))
    assert picking.calls == 1


def test_a_client_over_several_roles_queues_up_to_the_largest_limit():
    builder = ClientBuilder(Scheduler(fleet()))
    plan = ModelPlan("m", 16, max_ongoing={"decode": 2, "prefill": 1}, max_queued={"decode": 10, "mixed": 30})
    decode = builder.routed(plan, Reach(), ("decode", "mixed"))
    assert decode._max_queued == 30 and decode._max_ongoing == {"decode": 2}
    assert builder.routed(ModelPlan("m", 16, max_queued={"mixed": None}), Reach(), ("mixed",))._max_queued is None
