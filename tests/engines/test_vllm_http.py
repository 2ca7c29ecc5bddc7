"""The pieces that talk to a vLLM server, against recorded vLLM 0.32 responses (no vLLM needed)."""

import importlib.util
import json
import os
import subprocess
import sys

import httpx
import pytest

from app.engines.vllm.client import VLLMCompletionsClient, completion_body
from app.engines.vllm.config import VLLMEngineConfig
from app.engines.vllm.metrics import MetricsFormatError, engine_stats
from app.engines.vllm.process import ENGINE_HOOK_DIR, kv_transfer_config, server_argv, server_env
from app.protocol.engine import EngineRequest, EngineRequestRejected, EngineUnavailableError, SamplingParams

# Trimmed from a vLLM 0.32 CPU server's /metrics.
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 158.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny"} 1.795251353250501e+09
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 64.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="tiny"} 96.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 64.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 2.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 1.0
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",engine="0",\
num_gpu_blocks="32768",prefix_caching_hash_algo="sha256"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
"""


def test_metrics_page_becomes_engine_stats():
    stats = engine_stats(METRICS, engine_id="r1", model="tiny", hash_seed="0")
    assert (stats.num_requests_running, stats.num_requests_waiting) == (3, 1)
    assert stats.kv_cache_usage_perc == 0.25
    assert (stats.prefix_cache_hits, stats.prefix_cache_queries) == (64, 158)
    assert (stats.external_prefix_cache_hits, stats.external_prefix_cache_queries) == (64, 96)
    assert stats.request_success == 3  # summed over finished_reason
    assert stats.cache_config.block_size == 32 and stats.cache_config.num_gpu_blocks == 32768


def test_data_parallel_ranks_are_summed_and_usage_averaged():
    second = METRICS.replace('engine="0"', 'engine="1"')
    stats = engine_stats(METRICS + second, engine_id="r1", model="tiny")
    assert stats.num_requests_running == 6 and stats.kv_cache_usage_perc == 0.25


def test_a_page_that_is_not_vllm_says_so():
    with pytest.raises(MetricsFormatError, match="vllm:num_requests_running"):
        engine_stats("process_cpu_seconds_total 1.0\n", engine_id="r1", model="tiny")


def request(**sampling) -> EngineRequest:
    return EngineRequest(request_id="req-1", model="tiny", prompt_token_ids=[1, 2, 3],
                         sampling=SamplingParams(max_tokens=4, **sampling))


def test_completion_body_sends_token_ids_and_only_set_options():
    body = completion_body(request(temperature=0, stop=["x"], logprobs=2), "tiny", stream=True)
    assert body["prompt"] == [1, 2, 3] and body["model"] == "tiny" and body["stop"] == ["x"]
    assert body["logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "priority" not in body and "seed" not in body and "kv_transfer_params" not in body


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def choice(text, token_ids, finish=None, logprobs=None):
    return {"choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish,
                         "stop_reason": None, "logprobs": logprobs}]}


async def collect(handler, req=None, decode=None):
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = VLLMCompletionsClient(http, "http://vllm", "tiny", decode=decode)
        return [o async for o in client.stream(req or request())]


async def test_stream_holds_the_last_output_for_the_usage():
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 32}}}
    body = sse(choice("He", [7]), choice("llo", [8], "length"), usage)
    outputs = await collect(lambda r: httpx.Response(200, content=body))
    assert [o.text for o in outputs] == ["He", "llo"]
    assert outputs[-1].finish_reason == "length"
    assert (outputs[-1].num_prompt_tokens, outputs[-1].num_cached_tokens) == (3, 32)


async def test_logprob_tokens_come_back_as_text_and_ids():
    logprobs = {"tokens": ["token_id:7"], "token_logprobs": [-0.5], "top_logprobs": [
        {"token_id:7": -0.5, "token_id:9": -1.5}]}
    body = sse(choice("He", [7], "length", logprobs))
    outputs = await collect(lambda r: httpx.Response(200, content=body), decode=lambda i: f"<{i}>")
    entry = outputs[0].logprobs[0]
    assert (entry.token, entry.token_id, entry.logprob) == ("<7>", 7, -0.5)
    assert [(t.token, t.token_id) for t in entry.top_logprobs] == [("<7>", 7), ("<9>", 9)]


async def test_a_400_from_vllm_is_a_rejected_request():
    error = {"error": {"message": "This model's maximum context length is 1024 tokens.", "code": 400}}
    with pytest.raises(EngineRequestRejected, match="maximum context length"):
        await collect(lambda r: httpx.Response(400, json=error))


async def test_an_error_inside_the_stream_is_the_clients_or_the_servers_as_it_says():
    # vLLM (and the simulated server) report some refusals after the 200, as an error event.
    refusal = sse({"choices": [{"delta": {"role": "assistant"}}]},
                  {"error": {"message": "logprobs are not supported", "type": "BadRequestError", "code": 400}})
    with pytest.raises(EngineRequestRejected, match="logprobs are not supported"):
        await collect(lambda r: httpx.Response(200, content=refusal))
    crash = sse({"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}})
    with pytest.raises(EngineUnavailableError, match="engine dead"):
        await collect(lambda r: httpx.Response(200, content=crash))


async def test_a_stream_cut_short_is_an_engine_failure():
    with pytest.raises(EngineUnavailableError, match="before the request finished"):
        await collect(lambda r: httpx.Response(200, content=b'data: {"choices": [{"text": "a"}]}\n\n'))


async def test_a_refused_connection_is_an_engine_failure():
    def refuse(r):
        raise httpx.ConnectError("refused")

    with pytest.raises(EngineUnavailableError):
        await collect(refuse)


def cpu_config(**kw) -> VLLMEngineConfig:
    return VLLMEngineConfig(model="/models/tiny", device="cpu", block_size=32, **kw)


def test_server_flags_and_cpu_environment():
    config = cpu_config(enforce_eager=True, extra_args=["--seed", "1"])
    argv = server_argv(config, served_model_name="tiny", max_model_len=1024, port=8100, role="mixed",
                       kv_events_endpoint="tcp://127.0.0.1:5557")
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    assert flags["--host"] == "127.0.0.1" and flags["--block-size"] == "32" and flags["--max-model-len"] == "1024"
    assert json.loads(argv[argv.index("--kv-events-config") + 1])["endpoint"] == "tcp://127.0.0.1:5557"
    assert "--enforce-eager" in argv and argv[-2:] == ["--seed", "1"] and "--kv-transfer-config" not in argv
    env = server_env(config, "mixed", side_channel_host="127.0.0.1", side_channel_port=5600)
    assert env["PYTHONHASHSEED"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env


def test_prefill_and_decode_roles_get_their_kv_connector():
    nixl = cpu_config()
    assert kv_transfer_config(nixl, "prefill")["kv_connector"] == "NixlConnector"
    assert kv_transfer_config(nixl, "prefill")["kv_role"] == "kv_producer"
    assert kv_transfer_config(nixl, "decode")["kv_role"] == "kv_consumer"
    assert kv_transfer_config(nixl, "decode")["kv_buffer_device"] == "cpu"
    env = server_env(nixl, "decode", side_channel_host="127.0.0.1", side_channel_port=5600)
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600" and env["UCX_NET_DEVICES"] == "lo"
    shared = cpu_config(kv_transfer={"connector": "shared_storage", "shared_storage_path": "/tmp/kv"})
    assert kv_transfer_config(shared, "prefill")["kv_role"] == "kv_producer"
    assert kv_transfer_config(shared, "decode")["kv_role"] == "kv_consumer"
    assert kv_transfer_config(shared, "mixed") is None


def test_cpu_block_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        VLLMEngineConfig(model="m", device="cpu", block_size=16)


def test_nixl_engines_on_cpu_get_a_progress_thread_that_sleeps():
    env = server_env(cpu_config(), "prefill", side_channel_host="127.0.0.1", side_channel_port=5600)
    assert env["GATEWAY_NIXL_PROGRESS_DELAY_US"] == "10000"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_HOOK_DIR)
    # GPUs keep NIXL's own busy loop unless asked; 0 turns the hook off on CPU too.
    gpu = VLLMEngineConfig(model="/models/tiny", device="cuda")
    assert "GATEWAY_NIXL_PROGRESS_DELAY_US" not in server_env(gpu, "decode", side_channel_host="10.0.0.2",
                                                             side_channel_port=5600)
    off = cpu_config(kv_transfer={"progress_delay_us": 0})
    assert "GATEWAY_NIXL_PROGRESS_DELAY_US" not in server_env(off, "decode", side_channel_host="127.0.0.1",
                                                             side_channel_port=5600)
    mixed = server_env(cpu_config(), "mixed", side_channel_host="127.0.0.1", side_channel_port=5600)
    assert "GATEWAY_NIXL_PROGRESS_DELAY_US" not in mixed


def test_cpu_engines_sleep_between_checks_of_vllms_step_queue():
    for role in ("mixed", "prefill", "decode"):
        env = server_env(cpu_config(), role, side_channel_host="127.0.0.1", side_channel_port=5600)
        assert env["GATEWAY_SHM_POLL_SLEEP_US"] == "200"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ENGINE_HOOK_DIR)
    gpu = server_env(VLLMEngineConfig(model="/models/tiny", device="cuda"), "mixed", side_channel_host="10.0.0.2",
                     side_channel_port=5600)
    assert "GATEWAY_SHM_POLL_SLEEP_US" not in gpu
    assert str(ENGINE_HOOK_DIR) not in gpu.get("PYTHONPATH", "")
    off = server_env(cpu_config(shm_poll_sleep_us=0), "mixed", side_channel_host="127.0.0.1", side_channel_port=5600)
    assert "GATEWAY_SHM_POLL_SLEEP_US" not in off


def test_the_hook_makes_vllms_queue_readers_sleep_instead_of_spinning():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("GATEWAY_REQUIRE_VLLM") == "1":
            pytest.fail("vllm is not installed but GATEWAY_REQUIRE_VLLM=1")
        pytest.skip("vLLM is not installed")
    # A waiting reader calls the module's sched_yield in a loop: each call should sleep (2 ms here)
    # instead of returning at once.
    code = ("import time; import vllm.distributed.device_communicators.shm_broadcast as q; "
            "end = time.monotonic() + 0.03; slow = 0\n"
            "while time.monotonic() < end:\n"
            "    t = time.monotonic(); q.sched_yield(); slow += time.monotonic() - t >= 0.0015\n"
            "print(q.sched_yield.__name__, slow)")
    env = server_env(cpu_config(shm_poll_sleep_us=2000), "mixed", side_channel_host="127.0.0.1",
                     side_channel_port=5600)
    patched = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, sleeps = patched.stdout.split()
    assert name == "pause" and int(sleeps) >= 5, patched.stdout + patched.stderr
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert plain.stdout.split()[0] == "sched_yield"


def test_the_hook_sets_nixls_progress_thread_timeout():
    if importlib.util.find_spec("nixl_cu12") is None:
        if os.environ.get("GATEWAY_REQUIRE_VLLM") == "1":
            pytest.fail("nixl_cu12 is not installed but GATEWAY_REQUIRE_VLLM=1")
        pytest.skip("NIXL is not installed")
    code = "import nixl_cu12._bindings as b; c = b.nixlAgentConfig(); c.pthrDelay = 0; print(c.pthrDelay)"
    env = server_env(cpu_config(), "decode", side_channel_host="127.0.0.1", side_channel_port=5600)
    patched = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert patched.stdout.strip() == "10000", patched.stderr
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "0"
