"""Prometheus metrics of one router (its own registry, so that several routers can live in one process).

Where sglang-router 0.3.2 has a metric (checked against the package), the router exports it under the same
name and labels (``smg_*``: HTTP requests and responses, router requests by model and endpoint, worker
selection, health, active requests and pool sizes), so that dashboards built on the stock router keep working;
what is DualPath's own is ``dualpath_*``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dualpath.router.decide import Decider
from dualpath.router.engines import EngineRegistry

disable_created_metrics()  # no *_created series: the stock router has none, and a dashboard needs none
STOCK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 45, 60, 90, 120, 180, 240)
PD = {"router_type": "http", "backend_type": "pd", "connection_mode": "http"}  # the stock labels of a PD router
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _StateCollector(Collector):
    """Gauges read at scrape time from the engine registry, the store and the scheduler queue."""

    def __init__(self, registry: EngineRegistry, decider: Decider) -> None:
        self.registry = registry
        self.decider = decider

    def collect(self) -> Iterator[Metric]:
        read_bytes = CounterMetricFamily("dualpath_storage_read_bytes", "Bytes read through each node's storage NIC "
                                         "(all processes of the node, lifetime)", labels=["node"])
        queue_tokens = GaugeMetricFamily("dualpath_storage_read_queue_tokens",
                                         "Tokens queued or in flight on each node's storage NIC", labels=["node"])
        for node in self.registry.dualpath_nodes():
            report = self.registry.node_report(node)
            if report is not None:
                read_bytes.add_metric([node], report.read_bytes)
                queue_tokens.add_metric([node], report.pending_tokens)
        yield read_bytes
        yield queue_tokens
        yield GaugeMetricFamily("dualpath_router_queue_length",
                                "Requests waiting for a prefill or decode server with room", value=self.decider.waiting)
        up = GaugeMetricFamily("dualpath_engine_up", "1 when the engine answers its load polls",
                               labels=["engine", "role"])
        inflight = GaugeMetricFamily("dualpath_engine_inflight_requests", "The router's unfinished requests per engine",
                                     labels=["engine", "role"])
        tokens = GaugeMetricFamily("dualpath_engine_tokens", "Unfinished tokens per engine (tok_e) as scheduled",
                                   labels=["engine", "role"])
        health = GaugeMetricFamily("smg_worker_health", "1 when the worker is healthy", labels=["worker"])
        active = GaugeMetricFamily("smg_worker_requests_active", "Requests in flight per worker", labels=["worker"])
        pool = GaugeMetricFamily("smg_worker_pool_size", "Workers by type and model",
                                 labels=["worker_type", "connection_mode", "model"])
        cb_state = GaugeMetricFamily("smg_worker_cb_state", "Circuit breaker: 0 closed, 1 open, 2 half-open",
                                     labels=["worker"])
        cb_failures = GaugeMetricFamily("smg_worker_cb_consecutive_failures", "Failed requests in a row",
                                        labels=["worker"])
        cb_successes = GaugeMetricFamily("smg_worker_cb_consecutive_successes", "Successful requests in a row",
                                         labels=["worker"])
        cb_outcomes = CounterMetricFamily("smg_worker_cb_outcomes", "Request outcomes counted by the circuit breaker",
                                          labels=["worker", "outcome"])
        sizes: dict[tuple[str, str], int] = {}
        for engine in self.registry.engines:
            breaker = engine.breaker
            cb_state.add_metric([engine.url], int(breaker.state))
            cb_failures.add_metric([engine.url], breaker.consecutive_failures)
            cb_successes.add_metric([engine.url], breaker.consecutive_successes)
            cb_outcomes.add_metric([engine.url, "success"], breaker.successes)
            cb_outcomes.add_metric([engine.url, "failure"], breaker.failures)
            labels = [engine.url, engine.role]
            up.add_metric(labels, int(engine.up))
            inflight.add_metric(labels, engine.inflight_reqs)
            tokens.add_metric(labels, engine.tokens)
            health.add_metric([engine.url], int(engine.up))
            active.add_metric([engine.url], engine.inflight_reqs)
            for model in engine.models or ("default",):
                sizes[engine.role, model] = sizes.get((engine.role, model), 0) + 1
        for (role, model), size in sorted(sizes.items()):
            pool.add_metric([role, "http", model], size)
        yield from (up, inflight, tokens, health, active, pool, cb_state, cb_failures, cb_successes, cb_outcomes)


class RouterMetrics:
    """Counters and histograms the request path updates; the rest is collected at scrape time."""

    def __init__(self, registry: EngineRegistry, decider: Decider, duration_buckets: Sequence[float] | None = None,
                 policy: str = "dualpath") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(registry, decider))
        self.policy = policy
        buckets = tuple(duration_buckets or STOCK_BUCKETS)
        self.http_requests = Counter("smg_http_requests", "HTTP requests by method and route",
                                     ["method", "path"], registry=self.registry)
        self.http_responses = Counter("smg_http_responses", "HTTP responses by status and error kind",
                                      ["status_code", "error_code"], registry=self.registry)
        self.http_duration = Histogram("smg_http_request_duration_seconds", "HTTP request duration by route",
                                       ["method", "path"], buckets=buckets, registry=self.registry)
        self.router_requests = Counter("smg_router_requests", "Generation requests by model and endpoint",
                                       [*PD, "model", "endpoint", "streaming"], registry=self.registry)
        self.router_duration = Histogram("smg_router_request_duration_seconds", "Generation request duration",
                                         [*PD, "model", "endpoint"], buckets=buckets, registry=self.registry)
        self.worker_selection = Counter("smg_worker_selection", "Workers chosen for requests, by type and model",
                                        ["worker_type", "connection_mode", "model", "policy"], registry=self.registry)
        self.requests = Counter("dualpath_router_requests", "Placed requests by read path side",
                                ["side", "model"], registry=self.registry)
        self.hit_tokens = Counter("dualpath_router_hit_tokens", "Estimated hit tokens by read path side",
                                  ["side", "model"], registry=self.registry)
        self.errors = Counter("dualpath_router_errors", "Requests answered with an error, by kind",
                              ["kind"], registry=self.registry)
        self.retries = Counter("dualpath_router_retries", "Requests retried on another pair after an engine failure",
                               registry=self.registry)
        self.ttft = Histogram("dualpath_router_ttft_seconds", "Time to first token (streaming: first chunk)",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("dualpath_router_tpot_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("dualpath_router_e2e_seconds", "Request latency through the router",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def placed(self, model: str, side: str, hit_tokens: int) -> None:
        """One placement: the read side and its hit (ours), a prefill and a decode chosen (stock's)."""
        self.requests.labels(side, model).inc()
        self.hit_tokens.labels(side, model).inc(hit_tokens)
        for role in ("prefill", "decode"):
            self.worker_selection.labels(role, "http", model, self.policy).inc()

    def generation(self, model: str, endpoint: str, streaming: bool, seconds: float) -> None:
        self.router_requests.labels(*PD.values(), model, endpoint, str(streaming).lower()).inc()
        self.router_duration.labels(*PD.values(), model, endpoint).observe(seconds)

    def http(self, method: str, path: str, status: int, error_code: str, seconds: float) -> None:
        self.http_requests.labels(method, path).inc()
        self.http_responses.labels(str(status), error_code).inc()
        self.http_duration.labels(method, path).observe(seconds)

    def observe_completion(self, e2e_s: float, ttft_s: float | None, output_tokens: int | None) -> None:
        self.e2e.observe(e2e_s)
        if ttft_s is None:
            return
        self.ttft.observe(ttft_s)
        if output_tokens is not None and output_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))


def output_tokens(response: Any) -> int | None:
    """Generated tokens in a final SGLang (``meta_info``) or OpenAI (``usage``) response object."""
    if not isinstance(response, dict):
        return None
    for section in ("meta_info", "usage"):
        value = response.get(section)
        if isinstance(value, dict) and isinstance(value.get("completion_tokens"), int):
            return value["completion_tokens"]
    return None


def meta_ttft(response: Any, e2e_s: float) -> float | None:
    """TTFT of a non-streaming ``/generate`` answer, from the decode throughput SGLang reports in meta_info
    (with its metrics on): e2e minus the time the tokens after the first took; None when not reported."""
    meta = response.get("meta_info") if isinstance(response, dict) else None
    if not isinstance(meta, dict):
        return None
    rate, tokens = meta.get("decode_throughput"), meta.get("completion_tokens")
    if not isinstance(rate, int | float) or rate <= 0 or not isinstance(tokens, int) or tokens < 2:
        return None
    return max(e2e_s - (tokens - 1) / rate, 0.0)
