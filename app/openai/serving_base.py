"""What every OpenAI serving shares, the gateway's and an engine's own: the served models, request
preparation and the request metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.openai.errors import APIError
from app.openai.metrics import ServingMetrics
from app.openai.prepare import Endpoint, KeyFallback, RequestPreparer, ServedModel
from app.protocol.openai import ModelCard, ModelList


class ServingBase:
    """What every OpenAI serving shares: the models and their preparation, and the request metrics."""

    def __init__(
        self, models: Sequence[ServedModel], *, metrics: ServingMetrics | None = None, forwards_bodies: bool = False,
        on_key_fallback: KeyFallback | None = None,
    ) -> None:
        """`forwards_bodies`: the engine gets the client's body and decides what it supports (the gateway)."""
        self.preparer = RequestPreparer(models, forwards_bodies=forwards_bodies, on_key_fallback=on_key_fallback)
        self.metrics = metrics or ServingMetrics()

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.preparer.models

    def set_models(self, models: Sequence[ServedModel]) -> None:
        """Serve these models from the next request on (adapters come and go while serving)."""
        self.preparer.set_models(models)

    def list_models(self) -> ModelList:
        return self.preparer.model_list()

    def model_card(self, requested: str) -> ModelCard:
        """A served model, an alias or a traffic split by name (`GET /v1/models/{id}`); 404 model_not_found if none."""
        if requested not in self.preparer.split_lengths:
            self.preparer.resolve(requested)
        return next(card for card in self.preparer.model_list().data if card.id == requested)

    def _count_refusal(self, endpoint: Endpoint, body: Any, error: APIError) -> None:
        requested = body.get("model") if isinstance(body, dict) else None
        label = requested if isinstance(requested, str) and requested in self.models else "unknown"
        self.metrics.requests.labels(label, endpoint, str(error.status_code)).inc()
