"""Weighted traffic splits at the gateway: a served name split over targets in exact proportions, sticky
callers, the client's name in the answer and the target in a header, and changes that are checked first."""

from collections import Counter

import pytest

from app.router.traffic import TrafficError, TrafficSplit
from tests.api.test_adapters import gateway_with_adapters


def split(sticky_header: str | None = None, **weights: float) -> TrafficSplit:
    return TrafficSplit(targets=[{"target": t.replace("_", "-"), "weight": w} for t, w in weights.items()],
                        sticky_header=sticky_header)


async def test_a_90_10_split_serves_90_10_under_the_clients_name():
    async with gateway_with_adapters() as (client, app, _):
        app.serving.set_traffic({"prod": split(sim_llama=90, sql_lora=10)})
        http = client._client
        targets = Counter()
        for i in range(200):
            r = await http.post("/v1/completions", json={"model": "prod", "prompt": f"q{i}", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "prod"
            targets[r.headers["x-gateway-target"]] += 1
        assert targets == {"sim-llama": 180, "sql-lora": 20}
        assert "prod" in {m.id async for m in client.models.list()}
        metrics = app.serving.metrics
        assert metrics.traffic_weight.labels("prod", "sql-lora")._value.get() == 10
        assert metrics.traffic_requests.labels("prod", "sql-lora")._value.get() == 20


async def test_sticky_callers_never_change_target_and_streams_name_the_split():
    async with gateway_with_adapters() as (client, app, _):
        app.serving.set_traffic({"prod": split(sticky_header="X-Session", sim_llama=50, chat_lora=50)})
        http = client._client
        seen: dict[str, set[str]] = {}
        for session in range(10):
            for _ in range(5):
                r = await http.post("/v1/chat/completions", headers={"x-session": f"s{session}"}, json={
                    "model": "prod", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": True})
                assert '"model":"prod"' in r.text
                seen.setdefault(f"s{session}", set()).add(r.headers["x-gateway-target"])
        assert all(len(targets) == 1 for targets in seen.values())
        assert set().union(*seen.values()) == {"sim-llama", "chat-lora"}


async def test_a_change_that_cannot_be_served_is_refused_and_the_old_split_stays():
    async with gateway_with_adapters() as (_, app, _):
        app.serving.set_traffic({"prod": split(sim_llama=1)})
        with pytest.raises(TrafficError, match="unknown target 'llama-v9'"):
            app.serving.set_traffic({"prod": TrafficSplit(targets=[{"target": "llama-v9", "weight": 1}])})
        assert app.serving.traffic.splits["prod"].weights == {"sim-llama": 1}
        with pytest.raises(TrafficError, match="takes the name of a served model"):
            app.serving.set_traffic({"sql-lora": split(sim_llama=1)})
