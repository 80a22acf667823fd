"""Counters and gauges of a server, rendered as Prometheus text (exposition format 0.0.4)."""
from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "adapterhub_serve_"

HELP = {
    "requests_total": ("counter", "Requests answered, by endpoint, model and HTTP status."),
    "prompt_tokens_total": ("counter", "Prompt tokens of answered requests (soft prompt positions excluded)."),
    "completion_tokens_total": ("counter", "Tokens generated."),
    "adapter_loads_total": ("counter", "Adapters and prompts read from the registry into memory."),
    "adapter_load_seconds": ("summary", "Seconds spent loading adapters (read, verify, decode, place)."),
    "switch_seconds": ("summary", "Seconds from a request's arrival to its adapter being resident and pinned."),
    "cache_hits_total": ("counter", "Adapter look-ups answered by the resident LRU."),
    "cache_misses_total": ("counter", "Adapter look-ups that had to load from the registry."),
    "cache_evictions_total": ("counter", "Resident adapters evicted to stay within the budget."),
    "resident_adapters": ("gauge", "Adapters and prompts resident now."),
    "resident_bytes": ("gauge", "Bytes of resident adapter and prompt tensors."),
    "active_sequences": ("gauge", "Sequences being generated now."),
    "pending_sequences": ("gauge", "Sequences waiting for a batch slot."),
    "batches_total": ("counter", "Batches started (requests that arrived together)."),
    "batch_rows_total": ("counter", "Sequences in started batches (divide by batches_total: mean batch size)."),
    "batch_adapters_total": ("counter", "Distinct adapters in started batches."),
    "forward_passes_total": ("counter", "Model forward passes."),
    "cancelled_total": ("counter", "Sequences dropped because their client went away."),
    "errors_total": ("counter", "Requests that failed, by HTTP status."),
}


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe named values with labels; :meth:`render` gives the /metrics body."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = float(value)

    def get(self, name: str, **labels) -> float:
        """One series' value (0 when never set); with no labels given, the sum over all series."""
        with self._lock:
            series = self._values.get(name, {})
            if labels:
                return series.get(tuple(sorted(labels.items())), 0.0)
            return sum(series.values())

    def render(self) -> str:
        lines = []
        with self._lock:
            snapshot = {k: dict(v) for k, v in self._values.items()}
        for name in sorted(set(HELP) | {n for n in snapshot if not n.endswith(("_sum", "_count"))}):
            kind, text = HELP.get(name, ("untyped", name))
            full = PREFIX + name
            lines.append(f"# HELP {full} {text}")
            lines.append(f"# TYPE {full} {kind}")
            parts = ("_sum", "_count") if kind == "summary" else ("",)
            for suffix in parts:
                series = snapshot.get(name + suffix) or {(): 0.0}
                for labels, value in sorted(series.items()):
                    lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    num = str(int(value)) if float(value).is_integer() else repr(float(value))
                    lines.append(f"{full}{suffix}{{{lab}}} {num}" if lab else f"{full}{suffix} {num}")
        return "\n".join(lines) + "\n"

    def observe(self, name: str, seconds: float, **labels) -> None:
        """One observation of a summary: adds to ``<name>_sum`` and ``<name>_count``."""
        self.inc(name + "_sum", seconds, **labels)
        self.inc(name + "_count", 1, **labels)
