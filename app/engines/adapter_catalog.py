"""An engine's LoRA adapters while it serves: brought to what the live settings list, through the engine's
own runtime-LoRA routes (vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`; the simulated
server answers the same).

An adapter added is loaded at once; the router sends it requests only once this engine says it serves it.
An adapter removed is unloaded only when no request for it runs or waits on this engine and it has been
gone from the list for `min_drain_s` (requests routed just before the change are still arriving), so a
removal fails no request in flight. A load that fails is retried every `retry_s`, and said once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from app.upstream import UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """The engine refused or failed to load (or unload) an adapter."""


class AdapterAdmin(Protocol):
    async def load(self, name: str, path: str, *, replace: bool = False) -> None: ...

    async def unload(self, name: str) -> None: ...


class ServerAdapterAdmin:
    """Loads and unloads through an engine's OpenAI server."""

    def __init__(self, pool: UpstreamPool, base_url: str, timeout_s: float = 120.0) -> None:
        self._pool = pool
        self._base_url = base_url
        self._timeout_s = timeout_s

    async def load(self, name: str, path: str, *, replace: bool = False) -> None:
        body = {"lora_name": name, "lora_path": path, **({"load_inplace": True} if replace else {})}
        status, text = await self._post("/v1/load_lora_adapter", body)
        if status == 200 or (status == 400 and "already been loaded" in text):  # another ingress's doing
            return
        raise AdapterLoadError(f"loading adapter {name!r} from {path}: HTTP {status}: {text[:300]}")

    async def unload(self, name: str) -> None:
        status, text = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: not there (any more)
            raise AdapterLoadError(f"unloading adapter {name!r}: HTTP {status}: {text[:300]}")

    async def _post(self, path: str, body: dict[str, object]) -> tuple[int, str]:
        try:
            response = await self._pool.request(self._base_url, path, json.dumps(body).encode(),
                                                timeout_s=self._timeout_s)
            text = (await response.read()).decode(errors="replace")
        except UpstreamError as error:
            raise AdapterLoadError(f"{path}: the engine's server failed: {error}") from None
        if response.status == 404 and "Not Found" in text and "lora" not in text.lower():
            raise AdapterLoadError(f"{path}: the engine's server has no runtime LoRA routes (vLLM needs "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)")
        return response.status, text


class AdapterCatalog:
    """One engine's adapters: those it serves (name -> path), and those the live settings want."""

    def __init__(self, admin: AdapterAdmin, serving: Mapping[str, str], *, min_drain_s: float = 2.0,
                 retry_s: float = 10.0) -> None:
        self._admin = admin
        self.serving: dict[str, str] = dict(serving)
        self.wanted: dict[str, str] = dict(serving)
        self._min_drain_s = min_drain_s
        self._retry_s = retry_s
        self._gone_since: dict[str, float] = {}
        self._failed_at: dict[tuple[str, str], float] = {}

    def want(self, adapters: Mapping[str, str], now: float) -> None:
        """The adapters the live settings list now (the whole set)."""
        self.wanted = dict(adapters)
        for name in self.serving:
            if name not in self.wanted:
                self._gone_since.setdefault(name, now)
        for name in list(self._gone_since):
            if name in self.wanted:
                del self._gone_since[name]

    @property
    def settled(self) -> bool:
        return self.serving == self.wanted

    async def reconcile(self, busy: Callable[[], set[str]], now: float) -> None:
        """Load what is wanted and not served; unload what is served, not wanted, drained. `busy`: the
        adapters with requests running or waiting on this engine now (asked just before each unload)."""
        for name, path in self.wanted.items():
            if self.serving.get(name) == path:
                continue
            failed_at = self._failed_at.get((name, path))
            if failed_at is not None and now - failed_at < self._retry_s:
                continue
            try:
                await self._admin.load(name, path, replace=name in self.serving)
            except AdapterLoadError as error:
                if failed_at is None:
                    logger.error("%s; retrying every %.0fs", error, self._retry_s)
                self._failed_at[(name, path)] = now
                continue
            self._failed_at.pop((name, path), None)
            self.serving[name] = path
            logger.info("adapter %s loaded from %s", name, path)
        for name, since in list(self._gone_since.items()):
            if now - since < self._min_drain_s or name in busy():
                continue
            try:
                await self._admin.unload(name)
            except AdapterLoadError as error:
                logger.warning("%s; trying again", error)
                continue
            del self._gone_since[name]
            self.serving.pop(name, None)
            logger.info("adapter %s unloaded", name)
