"""The simulated engine as a standalone OpenAI-compatible HTTP server, like `vllm serve`.

    python -m app.engines.simulated --port 8100 [--model sim-llama] [--engine-config engine.yaml]
        [--kv-events-endpoint tcp://127.0.0.1:5557]

Serves /v1/completions, /v1/chat/completions, /v1/responses (streaming and not), /v1/embeddings,
/v1/models[/{id}], /health and /metrics
(vLLM metric names), so any HTTP router or benchmark tool can drive it. With --kv-events-endpoint it
also publishes its KV-cache events over ZMQ, as vLLM's zmq publisher does.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from app.engines.simulated.config import SimulatedEngineConfig
from app.engines.simulated.engine import SimulatedEngine
from app.engines.simulated.kv_publisher import KVEventPublisher
from app.engines.simulated.metrics import sglang_page
from app.kv.hashing import get_hasher
from app.openai.engine_serving import OpenAIServing, ServedModel
from app.openai.http import PROMETHEUS_CONTENT_TYPE, OpenAIHTTP, install_error_handlers
from app.tokenizer import BUILTIN_TOKENIZER_DIR, PromptTokenizer


class LoadLoRAAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapter(BaseModel):
    lora_name: str = Field(min_length=1)


def _lora_error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def create_app(
    engine_config: SimulatedEngineConfig,
    *,
    model: str = "sim-llama",
    tokenizer_dir: Path = BUILTIN_TOKENIZER_DIR,
    max_model_len: int = 4096,
    max_body_bytes: int = 8 * 1024 * 1024,
    kv_events_endpoint: str | None = None,
    engine: SimulatedEngine | None = None,
    metrics_dialect: str = "vllm",
    adapters: Mapping[str, str] | None = None,
) -> FastAPI:
    """The server's app. With `engine`, it serves that engine (started and stopped by its owner, an engine
    replica); without, it makes one and runs it for the app's lifetime. `metrics_dialect`: /metrics under
    vLLM's names, SGLang's, or none at all (404), to stand in for servers of each kind. `adapters`: LoRA
    adapters served under their own names (name -> path), as `vllm serve --lora-modules` does."""
    owned = engine is None
    tokenizer = PromptTokenizer.from_dir(tokenizer_dir) if engine is None else engine.tokenizer
    if engine is None:
        engine = SimulatedEngine(engine_config, tokenizer, model=model, max_model_len=max_model_len)
    served = ServedModel(
        name=model,
        tokenizer=tokenizer,
        engine=engine,
        max_model_len=max_model_len,
        block_size=engine_config.block_size,
        hasher=get_hasher(engine_config.hash_algo, engine_config.hash_seed),
    )
    adapters = dict(adapters if adapters is not None else (engine.adapters if not owned else {}))

    def served_models() -> list[ServedModel]:
        return [served, *(replace(served, name=name, adapter_of=served.name, adapter_path=path)
                          for name, path in adapters.items())]

    serving = OpenAIServing(served_models())
    http = OpenAIHTTP(serving, max_body_bytes=max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not owned:
            yield
            return
        await engine.start()
        publisher = KVEventPublisher(engine, kv_events_endpoint) if kv_events_endpoint else None
        if publisher is not None:
            publisher.start()
        try:
            yield
        finally:
            if publisher is not None:
                await publisher.close()
            await engine.shutdown()

    app = FastAPI(title="Simulated vLLM", lifespan=lifespan)
    app.state.engine = engine
    app.state.http = http
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await http.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await http.completions(request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await http.embeddings(request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await http.responses(request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return http.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        return http.model(model_id)

    # vLLM's runtime LoRA routes (with VLLM_ALLOW_RUNTIME_LORA_UPDATING), with its answers.
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapter) -> Response:
        if request.lora_name in adapters and not request.load_inplace:
            return _lora_error(400, f"The lora adapter '{request.lora_name}' has already been loaded. If you want "
                               "to load the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        adapters[request.lora_name] = request.lora_path
        serving.set_models(served_models())
        return Response(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapter) -> Response:
        if adapters.pop(request.lora_name, None) is None:
            return _lora_error(404, f"The lora adapter '{request.lora_name}' cannot be found.", "NotFoundError")
        serving.set_models(served_models())
        return Response(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if metrics_dialect == "none":
            return Response(status_code=404)
        page = engine.metrics.render() if metrics_dialect == "vllm" else sglang_page(engine.stats(), model)
        return Response(page, media_type=PROMETHEUS_CONTENT_TYPE)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.engines.simulated", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="sim-llama", help="served model name")
    parser.add_argument("--tokenizer", type=Path, default=BUILTIN_TOKENIZER_DIR, help="tokenizer folder")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--engine-config", type=Path, help="YAML or JSON with SimulatedEngineConfig fields")
    parser.add_argument("--time-scale", type=float, help="wall seconds per modelled second (0.1 = 10x faster)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                        help="LoRA adapters served under their own names, as vllm serve's flag")
    parser.add_argument("--metrics-dialect", choices=["vllm", "sglang", "none"], default="vllm",
                        help="/metrics under vLLM's names, SGLang's, or none (404): to stand in for other servers")
    parser.add_argument("--kv-events-endpoint", metavar="ZMQ_ENDPOINT",
                        help="publish KV-cache events here as vLLM does, e.g. tcp://127.0.0.1:5557")
    args = parser.parse_args(argv)

    fields = yaml.safe_load(args.engine_config.read_text()) if args.engine_config else {}
    if args.time_scale is not None:
        fields["time_scale"] = args.time_scale
    if args.seed is not None:
        fields["seed"] = args.seed
    app = create_app(
        SimulatedEngineConfig.model_validate(fields or {}),
        model=args.model,
        tokenizer_dir=args.tokenizer,
        max_model_len=args.max_model_len,
        kv_events_endpoint=args.kv_events_endpoint,
        metrics_dialect=args.metrics_dialect,
        adapters=dict(item.split("=", 1) for item in args.lora_modules),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
