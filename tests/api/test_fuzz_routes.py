"""A bounded property-based fuzz of every route of the gateway's own app (schemathesis, from the app's
/openapi.json): whatever a client sends, the answer is never a 5xx. The gateway routes to a simulated
engine's own server; both run on loopback in a thread of their own, as they would in a replica."""

import asyncio
import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Iterator

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation

from app.http_listener import HTTPListener
from tests.api.test_request_reading import gateway_app


@contextlib.contextmanager
def gateway_on_loopback() -> Iterator[str]:
    """The gateway app on a loopback port, served from a thread's own event loop; yields its URL."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()

    async def run() -> None:
        async with gateway_app() as app:
            listener = HTTPListener(app, "127.0.0.1", 0, name="fuzzed gateway", graceful_shutdown_s=1)
            await listener.start()
            ready.set_result(f"http://127.0.0.1:{listener.port}")
            await stop.wait()
            await listener.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 30), loop).result(timeout=35)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)


def fuzz(operation: APIOperation, mode: GenerationMode, statuses: Counter[int]) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def no_server_error(case: Case) -> None:
        if isinstance(case.body, dict) and case.operation.path.endswith("completions"):
            # Keep answers short: the fuzz is about reading requests, not generating. A well-formed
            # request names the served model, or every one would end at the model lookup.
            case.body.setdefault("max_tokens", 2)
            if mode is GenerationMode.POSITIVE:
                case.body["model"] = "sim-llama"
        response = case.call_and_validate(checks=[not_a_server_error], timeout=30)
        statuses[response.status_code] += 1

    try:
        no_server_error()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # a route that takes nothing has no malformed input


def test_no_request_gets_a_server_error():
    statuses: Counter[int] = Counter()
    with gateway_on_loopback() as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models/{model}"}
        for operation, mode in itertools.product(operations, GenerationMode):
            fuzz(operation, mode, statuses)
    # Well-formed requests were answered, malformed ones refused, none failed.
    assert statuses[200] > 20 and sum(n for status, n in statuses.items() if 400 <= status < 500) > 50, statuses
