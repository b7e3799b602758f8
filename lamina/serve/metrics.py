"""Server metrics in Prometheus' text format (``GET /metrics``), without a client library.

Counters, gauges and histograms live in one ``Metrics`` object shared by the routes (requests by route
and status) and the scheduler threads (tokens, batch sizes, latencies); every update takes its lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """Cumulative bucket counts, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Thread-safe counters, gauges and histograms, rendered as Prometheus text.

    Gauges may be callables, read at render time (the scheduler's queue depth, running batch size).
    ``tokens_per_second`` is the generation rate over the last ``window`` seconds.
    """

    def __init__(self, prefix: str = "lamina", window: float = 10.0) -> None:
        self.prefix, self.window = prefix, window
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, float | Callable[[], float]]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._hist_buckets: dict[str, Sequence[float]] = {}
        self._recent: dict[Labels, deque[tuple[float, int]]] = defaultdict(deque)
        self._declare()

    def _declare(self) -> None:
        c, g, h = "counter", "gauge", "histogram"
        for name, kind, text in [
            ("requests_total", c, "HTTP requests answered, by route and status code"),
            ("prompt_tokens_total", c, "prompt tokens of admitted requests (tokens in)"),
            ("generation_tokens_total", c, "generated tokens (tokens out)"),
            ("sequences_finished_total", c, "finished sequences by finish reason (stop, length, abort)"),
            ("request_timeouts_total", c, "requests cut off by the server's --timeout"),
            ("requests_rejected_total", c, "requests refused because the queue was full (429)"),
            ("decode_steps_total", c, "engine steps that decoded a batch"),
            ("engine_failures_total", c, "engine steps that raised (requests in flight got 500)"),
            ("running_sequences", g, "sequences in the running batch now"),
            ("running_sequences_max", g, "the largest running batch since the server started"),
            ("queued_requests", g, "requests waiting to join the batch (queue depth)"),
            ("kv_cache_bytes_max", g, "the largest KV cache storage of the running batch so far"),
            ("tokens_per_second", g, "generated tokens per second over the last 10 s"),
            ("draft_tokens_proposed", g, "speculative decoding: draft tokens proposed (and verified)"),
            ("draft_tokens_accepted", g, "speculative decoding: draft tokens the model agreed with"),
            ("time_to_first_token_seconds", h, "from arrival to the first generated token"),
            ("inter_token_latency_seconds", h, "between successive tokens of a sequence"),
            ("request_duration_seconds", h, "from arrival to the last token"),
            ("batch_size", h, "running sequences at each decode step"),
        ]:
            self._help[name] = (kind, text)
        for name in (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "request_duration_seconds",
        ):
            self._hist_buckets[name] = LATENCY_BUCKETS
        self._hist_buckets["batch_size"] = BATCH_BUCKETS

    # -- updates -------------------------------------------------------------------------------------------
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to counter ``name``."""
        key = _labels(labels)
        with self._lock:
            self._counters[name][key] = self._counters[name].get(key, 0.0) + value

    def set(self, name: str, value: float | Callable[[], float], **labels: str) -> None:
        """Set gauge ``name`` to a value, or to a callable read at render time."""
        with self._lock:
            self._gauges[name][_labels(labels)] = value

    def set_max(self, name: str, value: float, **labels: str) -> None:
        """Raise gauge ``name`` to ``value`` if it is larger."""
        key = _labels(labels)
        with self._lock:
            old = self._gauges[name].get(key, 0.0)
            if callable(old) or value > old:
                self._gauges[name][key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add an observation to histogram ``name``."""
        key = _labels(labels)
        with self._lock:
            hist = self._hists[name].get(key)
            if hist is None:
                hist = self._hists[name][key] = Histogram(self._hist_buckets[name])
            hist.observe(value)

    def generated(self, tokens: int, **labels: str) -> None:
        """Count ``tokens`` generated now (tokens out and the tokens/s window)."""
        key, now = _labels(labels), time.monotonic()
        with self._lock:
            self._counters["generation_tokens_total"][key] = (
                self._counters["generation_tokens_total"].get(key, 0.0) + tokens
            )
            recent = self._recent[key]
            recent.append((now, tokens))
            while recent and recent[0][0] < now - self.window:
                recent.popleft()

    # -- reading ------------------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never set)."""
        key = _labels(labels)
        with self._lock:
            if name in self._counters and key in self._counters[name]:
                return self._counters[name][key]
            g = self._gauges.get(name, {}).get(key, 0.0)
        return float(g() if callable(g) else g)

    def render(self) -> str:
        """Everything in Prometheus' text exposition format (version 0.0.4)."""
        now = time.monotonic()
        with self._lock:
            counters = {k: dict(v) for k, v in self._counters.items()}
            gauges = {k: dict(v) for k, v in self._gauges.items()}
            hists = {
                k: {lk: (h.buckets, list(h.counts), h.sum, h.count) for lk, h in v.items()}
                for k, v in self._hists.items()
            }
            rates = {
                key: sum(n for t, n in recent if t >= now - self.window) / self.window
                for key, recent in self._recent.items()
            }
        gauges.setdefault("tokens_per_second", {}).update(rates)
        lines: list[str] = []
        for name, (kind, text) in self._help.items():
            full = f"{self.prefix}_{name}"
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            if kind == "counter":
                for key, v in sorted(counters.get(name, {}).items()):
                    lines.append(f"{full}{_fmt_labels(key)} {_num(v)}")
            elif kind == "gauge":
                for key, g in sorted(gauges.get(name, {}).items(), key=lambda kv: kv[0]):
                    lines.append(f"{full}{_fmt_labels(key)} {_num(float(g() if callable(g) else g))}")
            else:
                for key, (buckets, counts, total, count) in sorted(hists.get(name, {}).items()):
                    cum = 0
                    for le, n in zip([*buckets, float("inf")], counts, strict=True):
                        cum += n
                        bound = "+Inf" if le == float("inf") else _num(le)
                        lines.append(f"{full}_bucket{_fmt_labels((*key, ('le', bound)))} {cum}")
                    lines.append(f"{full}_sum{_fmt_labels(key)} {_num(total)}")
                    lines.append(f"{full}_count{_fmt_labels(key)} {count}")
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt_labels(key: Labels) -> str:
    if not key:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in key]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{labels}': value}`` (for tests and the benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
