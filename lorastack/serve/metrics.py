"""Prometheus metrics for one server (its own registry, so several apps in a process - the
tests - never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], batch_size: Callable[[], float],
                 resident: Callable[[], float]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorastack_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("lorastack_tokens", "Tokens processed", ["kind"], registry=r)
        self.adapter_requests = Counter("lorastack_adapter_requests", "Generation requests per adapter ('base' = none)", ["adapter"], registry=r)
        self.rejected = Counter("lorastack_rejected", "Requests refused before reaching the engine", ["reason"], registry=r)
        self.cancelled = Counter("lorastack_cancelled", "Requests cancelled by a client disconnect", registry=r)
        self.latency = Histogram("lorastack_request_seconds", "End-to-end generation latency", ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorastack_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.routing = Histogram("lorastack_routing_seconds", "Time spent choosing a route", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        Gauge("lorastack_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(queue_depth)
        Gauge("lorastack_batch_size", "Rows decoding right now", registry=r).set_function(batch_size)
        Gauge("lorastack_resident_adapters", "Adapters resident in LoRA slots", registry=r).set_function(resident)

    def render(self) -> bytes:
        return generate_latest(self.registry)
