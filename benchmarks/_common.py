"""Shared helpers of the benchmark scripts: timing and writing results."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "x64": bool(jax.config.jax_enable_x64),
    }


def write_results(name: str, payload: dict, folder=RESULTS) -> pathlib.Path:
    """Write `payload` and the machine description to <folder>/<name>_<backend>.json."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{jax.default_backend()}.json"
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
