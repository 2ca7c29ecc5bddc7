"""The gateway's OpenAI endpoints: prepare each request once, route it, relay the engine's answer.

Per request: the cheap checks (schema, model, refused options), then admission, then the heavy part
(tokens and block keys), then the model's relay client forwards the client's body to the chosen
engine and hands back its answer as bytes. This is the only place that turns the gateway core's
errors into OpenAI error bodies. Knows nothing of HTTP servers or Ray: the gateway's own listener,
the FastAPI routes behind Serve's proxy and the handle API for batch jobs all call `open`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.gateway.errors import EngineOverloaded, NoReplicaAvailable
from app.gateway.relay import EngineReply, ForwardedCall
from app.openai.errors import APIError, bad_request
from app.openai.metrics import ServingMetrics
from app.openai.prepare import ENDPOINT_PATHS, USAGE_CHUNK_ENDPOINTS, Endpoint, PreparedRequest, ServedModel
from app.openai.serving_base import ServingBase
from app.protocol.engine import EngineRequestRejected, EngineUnavailableError
from app.router.admission import Admission, AdmissionRequest, AdmissionStage, FleetLoad, UnknownFleet
from app.router.admission.inflight_limit import InflightLimitParams, InflightLimitStage
from app.router.traffic import TrafficSplit, TrafficSplitter, check_splits

logger = logging.getLogger("ray.serve")

_DONE_EVENT = b"data: [DONE]\n\n"


@dataclass
class GatewayResponse:
    """An accepted request's answer: status and media type now, then bytes.

    `first` is ready to send with the headers; `rest()` yields the remainder of a stream. Always
    `aclose()` it (the HTTP layer does, in a finally): that ends the engine's request if the client
    went away, and records the request's outcome in the metrics.
    """

    request_id: str
    media_type: str
    first: bytes
    stream: bool
    _reply: EngineReply
    _on_close: Callable[[EngineReply, str], None]
    _failed: bool = False
    _closed: bool = False
    target: str | None = None
    """The traffic split's target that served a request to a split name (the x-gateway-target header)."""

    async def rest(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._reply.rest():
                yield data
        except EngineUnavailableError:
            # Headers and part of the answer are out: report in-band, as OpenAI and vLLM do.
            self._failed = True
            error = APIError(503, "The engine serving this request failed mid-answer; retry the request.")
            yield b"data: " + json.dumps(error.to_dict()).encode() + b"\n\n" + _DONE_EVENT

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reply.close()
        outcome = "503" if self._failed else "200" if self._reply.completed else "499"
        self._on_close(self._reply, outcome)


class GatewayServing(ServingBase):
    """The OpenAI API of the gateway over relay clients, one per served model."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        metrics: ServingMetrics | None = None,
        max_inflight_requests: int | None = None,
        retry_after_s: float = 1.0,
        admission_stages: Sequence[AdmissionStage] = (),
        fleet: FleetLoad | None = None,
        traffic: Mapping[str, TrafficSplit] | None = None,
    ) -> None:
        """Admission runs the in-flight limit first, then `admission_stages` in order. `traffic`: names whose
        requests are split over targets (raises TrafficError if one cannot be served)."""
        super().__init__(models, metrics=metrics, forwards_bodies=True, on_key_fallback=self._key_fallback)
        self.traffic = TrafficSplitter()
        self.set_traffic(traffic or {})
        self._fallbacks_said: set[tuple[str, str]] = set()
        limit = InflightLimitStage(InflightLimitParams(max_inflight_requests=max_inflight_requests),
                                   retry_after_s=retry_after_s)
        self._admission = Admission([limit, *admission_stages])
        self._fleet = fleet or UnknownFleet()
        self._retry_after_s = retry_after_s

    def set_traffic(self, splits: Mapping[str, TrafficSplit]) -> None:
        """Put these splits in force, all at once, for the next request on; a split that cannot be served
        raises TrafficError and the splits in force stay. Requests already routed are not touched."""
        self.set_served(list(self.models.values()), splits)

    def set_served(self, models: Sequence[ServedModel], splits: Mapping[str, TrafficSplit]) -> None:
        """Serve these models (adapters come and go) and splits together, from the next request on. Refused
        as a whole (ValueError, TrafficError) if a name is taken twice or a split names what is not served;
        what was served stays. Requests already resolved finish on the model they resolved to."""
        by_name = {name: model for model in models for name in (model.name, *model.aliases)}
        check_splits(splits, by_name)
        lengths = {name: min(by_name[t].max_model_len for t in split.weights) for name, split in splits.items()}
        self.preparer.set_models(models)  # refuses a name used twice before anything changes
        old = self.traffic
        self.traffic = TrafficSplitter(splits)
        self.preparer.split_lengths = lengths
        gauge = self.metrics.traffic_weight
        for name, split in old.splits.items():
            for target in split.weights:
                gauge.labels(name, target).set(0)
        for name, split in self.traffic.splits.items():
            for target, weight in split.weights.items():
                gauge.labels(name, target).set(weight)

    def _key_fallback(self, model: str, reason: str) -> None:
        self.metrics.key_fallbacks.labels(model, reason).inc()
        if (model, reason) not in self._fallbacks_said:
            self._fallbacks_said.add((model, reason))  # said once per ingress replica; the metric counts
            logger.warning("model %s: a request has %s, which the engine renders into tokens the gateway cannot "
                           "compute; such requests are routed on load, not prefix keys "
                           "(gateway_prefix_key_fallbacks_total)", model, reason.replace("_", " "))

    def _admit(self, request: AdmissionRequest) -> AdmissionRequest:
        """Run admission; raises the refusal as an OpenAI error (counted), or returns the ticket to release."""
        refusal = self._admission.admit(request, self._fleet)
        if refusal is not None:
            self.metrics.requests.labels(request.model, request.endpoint, str(refusal.status)).inc()
            raise APIError(refusal.status, refusal.message, code=refusal.code, retry_after_s=refusal.retry_after_s)
        return request

    async def open(
        self, endpoint: Endpoint, body: Any, headers: Mapping[str, str] | None = None
    ) -> GatewayResponse:
        """Run a request up to the engine's acceptance; raises APIError before anything is sent. `headers`:
        the request's, for splits that keep callers on a target by a header."""
        started = time.monotonic()
        split_name = target = None
        if self.traffic.splits and isinstance(body, dict) and isinstance(body.get("model"), str):
            user = body.get("user")
            target = self.traffic.pick(body["model"], user=user if isinstance(user, str) else None, headers=headers)
            if target is not None:
                split_name, body = body["model"], {**body, "model": target}
        try:
            validated = self.preparer.validate(endpoint, body)
        except APIError as error:
            self._count_refusal(endpoint, body, error)
            raise
        name = validated.model.name
        if split_name is not None:
            self.metrics.traffic_requests.labels(split_name, name).inc()
        # Admission comes before the heavy work, so a flood of large prompts is refused cheaply.
        request = validated.request
        ticket = self._admit(AdmissionRequest(name, endpoint, priority=request.priority, tenant=request.user,
                                              stream=getattr(request, "stream", False)))
        self.metrics.inflight.inc()
        released = False

        def release(status: str) -> None:
            nonlocal released
            if not released:
                released = True
                self._admission.release(ticket)
                self.metrics.inflight.dec()
                self.metrics.requests.labels(name, endpoint, status).inc()

        try:
            prepared = await self.preparer.prepare(validated)
            reply = await self._open_engine(prepared, client_model=split_name)
        except APIError as error:
            release(str(error.status_code))
            raise
        except asyncio.CancelledError:
            release("499")
            raise
        except BaseException:
            release("500")
            logger.exception("request to model %s failed", name)
            raise APIError(500, "The gateway failed to serve this request; see its logs.") from None
        response = self._response(prepared, reply, started, release, split_name)
        response.target = name if split_name is not None else None
        return response

    async def _open_engine(self, prepared: PreparedRequest, client_model: str | None = None) -> EngineReply:
        """`client_model`: the name the answer carries, when not the model's own (a traffic split's)."""
        model = prepared.model
        call = ForwardedCall(ENDPOINT_PATHS[prepared.endpoint], forward_body(prepared),
                             client_model=client_model or model.name,
                             engine_model=model.served_name,
                             keep_usage=prepared.include_usage or prepared.endpoint not in USAGE_CHUNK_ENDPOINTS)
        try:
            return await model.engine.open(prepared.engine_request, call)
        except EngineRequestRejected as error:
            # Through Ray the exception arrives wrapped; its `cause` is the engine's own.
            cause = getattr(error, "cause", None) or error
            default_param = "messages" if prepared.endpoint == "chat" else "prompt"
            raise bad_request(str(cause), param=getattr(cause, "param", None) or default_param) from None
        except NoReplicaAvailable as error:
            raise APIError(503, str(error), code="no_healthy_endpoint", retry_after_s=self._retry_after_s) from None
        except EngineOverloaded as error:
            raise APIError(503, str(error), code="engine_overloaded", retry_after_s=self._retry_after_s) from None
        except EngineUnavailableError as error:
            raise APIError(503, str(error), retry_after_s=self._retry_after_s) from None

    def _response(
        self, prepared: PreparedRequest, reply: EngineReply, started: float, release: Callable[[str], None],
        split_name: str | None = None,
    ) -> GatewayResponse:
        """`split_name`: the traffic split the request named, whose metrics count it by target too."""
        metrics, name = self.metrics, prepared.model.name
        if reply.stream:
            ttft = time.monotonic() - started
            metrics.ttft.labels(name).observe(ttft)
            if split_name is not None:
                metrics.traffic_ttft.labels(split_name, name).observe(ttft)

        def closed(reply: EngineReply, outcome: str) -> None:
            if outcome == "200":
                metrics.e2e.labels(name).observe(time.monotonic() - started)
            usage = reply.usage or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            if prompt_tokens:
                metrics.prompt_tokens.labels(name).inc(prompt_tokens)
                details = usage.get("prompt_tokens_details") or {}
                metrics.cached_prompt_tokens.labels(name).inc(int(details.get("cached_tokens") or 0))
            generated = int(usage.get("completion_tokens") or 0)
            metrics.generation_tokens.labels(name).inc(generated)
            if split_name is not None:
                metrics.traffic_tokens.labels(split_name, name, "prompt").inc(prompt_tokens)
                metrics.traffic_tokens.labels(split_name, name, "generation").inc(generated)
            release(outcome)

        return GatewayResponse(request_id=prepared.request_id, media_type=reply.media_type, first=reply.first,
                               stream=reply.stream, _reply=reply, _on_close=closed)

    # -- the handle API (Python batch jobs): the same answers, as dicts ------------------------

    async def create(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.open(endpoint, body if endpoint == "embeddings" else {**body, "stream": False})
        try:
            return json.loads(response.first)
        finally:
            await response.aclose()

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = await self.open(endpoint, {**body, "stream": True})
        try:
            for chunk in _events(response.first):
                yield chunk
            async for data in response.rest():
                for chunk in _events(data):
                    if "error" in chunk:
                        error = chunk["error"]
                        raise APIError(503, str(error.get("message")), retry_after_s=self._retry_after_s)
                    yield chunk
        finally:
            await response.aclose()


def forward_body(prepared: PreparedRequest) -> dict[str, Any]:
    """The client's body as the engine gets it: the engine's name for the model, and a stream's usage
    always on (the gateway reads it for its metrics, and drops it if the client did not ask)."""
    # An explicit null means the default, as OpenAI reads it; say it by leaving the field out, which
    # every engine reads the same way.
    body = {key: value for key, value in prepared.body.items() if value is not None}
    body["model"] = prepared.model.served_name
    if prepared.stream and prepared.endpoint in USAGE_CHUNK_ENDPOINTS:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


def _events(data: bytes) -> list[dict[str, Any]]:
    chunks = []
    for event in data.split(b"\n\n"):
        event = event.strip()
        if event.startswith(b"data:"):
            payload = event[5:].strip()
            if payload and payload != b"[DONE]":
                chunks.append(json.loads(payload))
    return chunks
