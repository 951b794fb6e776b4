"""Prometheus text-format metrics, kept in-process (no client library needed for a handful of series)."""

from __future__ import annotations

import threading
from collections import defaultdict


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (endpoint, model, status) -> count
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)

    def observe(self, endpoint: str, model: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, model, status)] += 1
            if seconds is not None:
                self.latency_sum[endpoint] += seconds
                self.latency_count[endpoint] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text: request counters, latency sums, and the gauges given (name -> (help, value))."""
        lines = ["# HELP expertkit_requests_total Requests answered, by endpoint, model and HTTP status.",
                 "# TYPE expertkit_requests_total counter"]
        with self._lock:
            for (endpoint, model, status), n in sorted(self.requests.items()):
                lines.append(f'expertkit_requests_total{{endpoint="{_label(endpoint)}",model="{_label(model)}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP expertkit_request_seconds Time to answer a successful request.",
                      "# TYPE expertkit_request_seconds summary"]
            for endpoint in sorted(self.latency_count):
                lines.append(f'expertkit_request_seconds_sum{{endpoint="{_label(endpoint)}"}} '
                             f'{self.latency_sum[endpoint]:.6f}')
                lines.append(f'expertkit_request_seconds_count{{endpoint="{_label(endpoint)}"}} '
                             f'{self.latency_count[endpoint]}')
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")[:128]
