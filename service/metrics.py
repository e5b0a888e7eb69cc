"""Prometheus metrics in the text exposition format (0.0.4), written by hand: the gateway
keeps its dependencies to numpy, tokenizers, pillow, onnxruntime and fastapi.

Requests by route template and status, request latency histograms by route, the
batcher's batch-size histogram and queue depth, and prompt-cache hits / misses.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**kv: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in kv.items())
    return "{" + inner + "}"


# The methods the API has (plus the ones clients and probes commonly send); any other
# method token is counted as "other", so a caller cannot add series by inventing methods.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_counts: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS_S))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_n: dict[str, int] = defaultdict(int)
        self.loop_lag = None  # a service.looplag.LoopLagProbe while the app runs

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        with self._lock:
            self.requests[(method, route, int(status))] += 1
            counts = self.latency_counts[route]
            for i, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[route] += seconds
            self.latency_n[route] += 1

    def render(self, batchers: dict | None = None, backend=None) -> str:
        """batchers: task name -> MicroBatcher."""
        out: list[str] = []
        with self._lock:
            out += ["# HELP glipv2_requests_total HTTP requests by method, route and status.",
                    "# TYPE glipv2_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f"glipv2_requests_total{_labels(method=method, route=route, status=str(status))} {n}")
            out += ["# HELP glipv2_request_duration_seconds HTTP request latency by route.",
                    "# TYPE glipv2_request_duration_seconds histogram"]
            for route in sorted(self.latency_n):
                for bound, c in zip(LATENCY_BUCKETS_S, self.latency_counts[route]):
                    out.append(f"glipv2_request_duration_seconds_bucket{_labels(route=route, le=repr(bound))} {c}")
                out.append(f"glipv2_request_duration_seconds_bucket{_labels(route=route, le='+Inf')} {self.latency_n[route]}")
                out.append(f"glipv2_request_duration_seconds_sum{_labels(route=route)} {self.latency_sum[route]:.6f}")
                out.append(f"glipv2_request_duration_seconds_count{_labels(route=route)} {self.latency_n[route]}")
        if batchers:
            out += ["# HELP glipv2_batch_size Images per engine call, by task.", "# TYPE glipv2_batch_size histogram"]
            for task, batcher in batchers.items():
                sizes = dict(batcher.batch_sizes)
                for bound in BATCH_BUCKETS:
                    n = sum(c for s, c in sizes.items() if s <= bound)
                    out.append(f"glipv2_batch_size_bucket{_labels(task=task, le=str(bound))} {n}")
                out.append(f"glipv2_batch_size_bucket{_labels(task=task, le='+Inf')} {sum(sizes.values())}")
                out.append(f"glipv2_batch_size_sum{_labels(task=task)} {sum(s * n for s, n in sizes.items())}")
                out.append(f"glipv2_batch_size_count{_labels(task=task)} {sum(sizes.values())}")
            out += ["# HELP glipv2_queue_depth Images waiting in the batcher, by task.", "# TYPE glipv2_queue_depth gauge"]
            out += [f"glipv2_queue_depth{_labels(task=task)} {b.depth}" for task, b in batchers.items()]
        if backend is not None:
            stats = backend.stats()
            for key, help_ in (("cache_hits", "Prompts whose text features came from the cache."),
                               ("cache_misses", "Prompts that ran the text encoder.")):
                if key in stats:
                    out += [f"# HELP glipv2_prompt_{key}_total {help_}", f"# TYPE glipv2_prompt_{key}_total counter",
                            f"glipv2_prompt_{key}_total {stats[key]}"]
        if self.loop_lag is not None:
            out += self.loop_lag.render()
        return "\n".join(out) + "\n"
