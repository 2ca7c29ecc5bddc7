"""Settings of engines the gateway does not run: OpenAI-compatible servers (vLLM, or anything that
speaks vLLM's API and metrics) at fixed URLs or found through Kubernetes.

The router treats each server as one replica. It cannot ask a server for its cache geometry or
hash function, so those are declared here and must match how the servers were started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r}: give a base URL like http://10.0.0.5:8000 (scheme and host)")
    if parts.path.rstrip("/") not in ("", "/v1"):
        raise ValueError(f"{value!r}: give the server's base URL, without a path")
    return f"{parts.scheme}://{parts.netloc}"


def _check_zmq_endpoint(value: str) -> str:
    if not value.startswith("tcp://") or ":" not in value[6:]:
        raise ValueError(f"{value!r}: give a ZMQ endpoint like tcp://10.0.0.5:5557")
    return value


class ExternalEndpoint(_Strict):
    """One server: its base URL and, when it publishes them, where its KV events come from."""

    url: str = Field(description="The server's base URL, e.g. http://10.0.0.5:8000.")
    kv_events: str | None = Field(
        default=None,
        description="The server's KV-event publisher (vLLM's --kv-events-config endpoint, seen from the "
        "gateway), e.g. tcp://10.0.0.5:5557. With it the router knows exactly what the server caches; "
        "without it, it guesses from what it sent there.",
    )

    @field_validator("url")
    @classmethod
    def _url_valid(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("kv_events")
    @classmethod
    def _events_valid(cls, value: str | None) -> str | None:
        return None if value is None else _check_zmq_endpoint(value)


class KubernetesDiscovery(_Strict):
    """Find the servers as the ready addresses of pods that match a label selector."""

    namespace: str = Field(default="default", min_length=1)
    label_selector: str = Field(min_length=1, description="Pods to route to, e.g. app=vllm,model=llama.")
    port: int = Field(default=8000, ge=1, le=65535, description="The pods' OpenAI server port.")
    scheme: Literal["http", "https"] = "http"
    kv_events_port: int | None = Field(
        default=None, ge=1, le=65535, description="The pods' KV-event publisher port, when they publish."
    )
    in_cluster: bool | None = Field(
        default=None,
        description="Use the pod's service account (true) or a kubeconfig (false); default: the service "
        "account when running in a pod, else `kubeconfig`, $KUBECONFIG or ~/.kube/config.",
    )
    kubeconfig: Path | None = Field(
        default=None, description="A kubeconfig file to use (its current context), e.g. for a gateway outside "
        "the cluster; default: $KUBECONFIG or ~/.kube/config.",
    )

    @field_validator("kubeconfig")
    @classmethod
    def _kubeconfig_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"no kubeconfig file at {value}")
        return value.resolve()  # replicas may start in another directory

    @model_validator(mode="after")
    def _one_credential(self) -> KubernetesDiscovery:
        if self.in_cluster is True and self.kubeconfig is not None:
            raise ValueError("in_cluster: true uses the pod's service account; remove `kubeconfig`, or set "
                             "in_cluster: false")
        return self


class ExternalEngineConfig(_Strict):
    """OpenAI-compatible servers someone else runs: fixed URLs, or Kubernetes discovery."""

    kind: Literal["external"] = "external"
    endpoints: list[ExternalEndpoint] = Field(
        default_factory=list, description="Fixed servers: base URLs, or {url, kv_events} entries."
    )
    kubernetes: KubernetesDiscovery | None = Field(default=None, description="Discover the servers instead.")
    served_model_name: str | None = Field(
        default=None, description="The model name the servers answer to; default: the gateway's model name."
    )
    block_size: int = Field(default=16, ge=1, description="The servers' --block-size.")
    hash_algo: Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] = Field(
        default="sha256", description="The servers' --prefix-caching-hash-algo."
    )
    hash_seed: str = Field(default="0", description="The servers' PYTHONHASHSEED (it seeds vLLM's block hashes).")
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = Field(default=None, ge=1, description="The servers' --max-num-seqs, if known.")
    metrics: Literal["auto", "vllm", "sglang", "none"] = Field(
        default="auto",
        description="The dialect of the servers' /metrics: vLLM's, SGLang's, or none (any other OpenAI-compatible "
        "server: routed on the gateway's own in-flight counts, alive while `health_path` answers). auto: read "
        "from each server's page.",
    )
    health_path: str = Field(default="/health", pattern=r"^/", description="For servers without readable metrics: "
                             "the route that answers 200 while the server is up.")
    num_blocks: int | None = Field(
        default=None, ge=1,
        description="The servers' KV cache in blocks, when their metrics do not say it (SGLang's and other servers' "
        "pages); bounds the router's record of what each caches.",
    )
    chars_per_token: float = Field(
        default=4.0, gt=0, le=64,
        description="Only without the model's `tokenizer`: characters per token of the approximate text keys "
        "(a key per block_size tokens' worth of characters) and of the prompt-length estimate.",
    )
    scrape_interval_s: float = Field(
        default=0.5, gt=0,
        description="How often each server's /metrics is read for load and health. Between reads the router "
        "counts its own requests in flight, and KV events (when the servers publish them) arrive as they come.",
    )
    down_after_s: float = Field(
        default=3.0, gt=0,
        description="A server whose /metrics scrapes have failed this long since its last good one leaves the "
        "routing candidates; when it answers again its cache is taken to be empty (it may have restarted).",
    )
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="The most requests one ingress replica keeps on one server; beyond it requests wait at the "
        "gateway for a server with room. Default: no limit (the servers queue).",
    )
    max_queued_requests: int | None = Field(
        default=None, ge=0,
        description="With max_ongoing_requests: requests that may wait at one ingress replica; beyond it 503 "
        "engine_overloaded with Retry-After. Default: no limit.",
    )
    max_attempts: int = Field(
        default=3, ge=1,
        description="Servers tried for one request when the chosen one cannot be reached (before any output).",
    )
    connect_timeout_s: float = Field(default=2.0, gt=0, description="Connecting to a server for a request.")

    @field_validator("endpoints", mode="before")
    @classmethod
    def _urls_as_entries(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_as_string(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_source(self) -> ExternalEngineConfig:
        if bool(self.endpoints) == (self.kubernetes is not None):
            raise ValueError("give either `endpoints` (a list of server URLs) or `kubernetes` (discovery), "
                             "exactly one of them")
        urls = [endpoint.url for endpoint in self.endpoints]
        duplicate = next((url for url in urls if urls.count(url) > 1), None)
        if duplicate is not None:
            raise ValueError(f"endpoint {duplicate} is listed twice")
        return self
