"""Shared timing helpers for the benchmarks: medians, a device-aware clock, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, repeats: int = 9, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA: event-timed on the current stream)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(path: str, name: str, device: str, headers: list[str], rows: list[list[object]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    doc = {
        "benchmark": name,
        "machine": machine_description(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [dict(zip(headers, r)) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"\nwrote {path}")
