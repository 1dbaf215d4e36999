"""Shared helpers of the benchmark scripts: timing and writing results."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"
# Figures live once, in the documentation, which shows them.
FIGURES = pathlib.Path(__file__).parent.parent / "docs" / "figures"


def timed(run, seconds_of=None, repeats=3, slow_s=float("inf")):
    """Warm up (compile) with one call, then the median time of `repeats` calls.

    Runs slower than `slow_s` are timed once (GD at lr 0.003 takes minutes on the
    CPU). `seconds_of(result)` reads the time from the result (a Trajectory's own
    wall time); by default the call is timed from outside. Returns
    (first result, last result, median seconds).
    """
    first = run()
    times = []
    while len(times) < repeats and not (times and times[0] > slow_s):
        start = time.perf_counter()
        result = jax.block_until_ready(run())
        elapsed = time.perf_counter() - start
        times.append(elapsed if seconds_of is None else seconds_of(result))
    return first, result, statistics.median(times)


def trajectory_seconds(traj) -> float:
    return traj.stats["wall_time_s"]


def reference_flow(model, data, t_max, params0, ts):
    """The tight float64 flow every method is compared with: Dopri8 at rtol 1e-12."""
    import gflow

    return gflow.simulate(
        model,
        data,
        t_max,
        params0=params0,
        ts=ts,
        solver="dopri8",
        rtol=1e-12,
        atol=1e-14,
        max_steps=10**6,
    )


def timed_twice(run):
    """(first result, second result, cold seconds, warm seconds): a first call
    (compiling), then a second."""
    start = time.perf_counter()
    first = jax.block_until_ready(run())
    cold = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    return first, result, cold, time.perf_counter() - start


def flat_rows(params) -> np.ndarray:
    """A trajectory's parameters as one (rows, parameters) array."""
    leaves = jax.tree.leaves(params)
    return np.concatenate(
        [np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1
    )


def work_of(stats) -> dict:
    """A central flow's work counts, from its `stats`."""
    keys = ("num_steps", "num_rejected_steps", "num_grad_evals", "num_hvp_evals")
    return {k: int(stats[k]) for k in (*keys, "num_third_order_evals")}


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
