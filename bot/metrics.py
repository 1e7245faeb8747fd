"""In-process counters and a latency histogram, written out in the Prometheus text format by hand."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queries: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency_counts: dict[str, list[int]] = {}
        self.latency_sum: Counter[str] = Counter()
        self.latency_n: Counter[str] = Counter()

    def count_query(self, channel: str, outcome: str) -> None:
        with self._lock:
            self.queries[(channel, outcome)] += 1

    def count_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def observe_latency(self, channel: str, seconds: float) -> None:
        with self._lock:
            counts = self.latency_counts.setdefault(channel, [0] * len(LATENCY_BUCKETS_S))
            for i, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[channel] += seconds
            self.latency_n[channel] += 1

    def render(self, index_products: int, index_version: str | None, redis_ok: bool,
               extra: Callable[[], list[str]] | None = None) -> str:
        """The /metrics body. Only counts and names: nothing here may carry a token or user id."""
        lines = [
            "# HELP vsearch_queries_total Photo queries by channel and outcome.",
            "# TYPE vsearch_queries_total counter",
        ]
        with self._lock:
            for (channel, outcome), value in sorted(self.queries.items()):
                lines.append(f'vsearch_queries_total{{channel="{_label(channel)}",outcome="{_label(outcome)}"}} {value}')
            lines += [
                "# HELP vsearch_search_latency_seconds Time from receiving a photo to having its results.",
                "# TYPE vsearch_search_latency_seconds histogram",
            ]
            for channel, counts in sorted(self.latency_counts.items()):
                ch = _label(channel)
                for bound, count in zip(LATENCY_BUCKETS_S, counts, strict=True):
                    lines.append(f'vsearch_search_latency_seconds_bucket{{channel="{ch}",le="{bound}"}} {count}')
                lines.append(f'vsearch_search_latency_seconds_bucket{{channel="{ch}",le="+Inf"}} {self.latency_n[channel]}')
                lines.append(f'vsearch_search_latency_seconds_sum{{channel="{ch}"}} {self.latency_sum[channel]:.6f}')
                lines.append(f'vsearch_search_latency_seconds_count{{channel="{ch}"}} {self.latency_n[channel]}')
            lines += ["# HELP vsearch_errors_total Unexpected errors by kind.", "# TYPE vsearch_errors_total counter"]
            for kind, value in sorted(self.errors.items()):
                lines.append(f'vsearch_errors_total{{kind="{_label(kind)}"}} {value}')
        lines += [
            "# HELP vsearch_index_products Products in the index being served.",
            "# TYPE vsearch_index_products gauge",
            f"vsearch_index_products {index_products}",
            "# HELP vsearch_index_info The index version being served.",
            "# TYPE vsearch_index_info gauge",
            f'vsearch_index_info{{version="{_label(index_version or "")}"}} 1',
            "# HELP vsearch_redis_up 1 when Redis answers, 0 in degraded mode.",
            "# TYPE vsearch_redis_up gauge",
            f"vsearch_redis_up {1 if redis_ok else 0}",
        ]
        if extra is not None:
            lines += extra()
        return "\n".join(lines) + "\n"
