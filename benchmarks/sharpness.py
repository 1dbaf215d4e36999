"""The sharpness along a run: as a metric inside the flow's program
(`gflow.metrics.Sharpness`, warm-started from row to row) and after it
(`gflow.metrics.sharpness_along` on the saved parameters), each timed against
the flow itself, 60 rows.

The network is the one a new user tried first (issue 33): an Equinox MLP
64-32-32-10 (tanh) on 500 of sklearn's digits, squared error on one-hot
labels, float32; its gradient flow to t = 100. Times are medians of three warm
calls, and the first call in this process (compiling; gflow's persistent cache
off). Accuracy: the largest relative difference of either against a
200-iteration solve (`sharpness_along(..., iters=200)`) at every row.

    pip install -e ".[bench]"
    python benchmarks/sharpness.py          # about a minute on the 2-core CPU
    python benchmarks/sharpness.py --quick  # t = 10, 12 rows, for the tests

Writes benchmarks/results/sharpness_<backend>.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

# Cold means compiling: gflow's persistent compilation cache stays off.
os.environ["GFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, timed, write_results  # noqa: E402

import gflow  # noqa: E402


def digits_classifier():
    """The network of issue 33, as its user wrote it: an Equinox MLP 64-32-32-10
    (tanh, `key=jax.random.key(0)`) on 500 digits, half the squared error on
    one-hot labels (summed over the classes, averaged over the images), float32.
    Returns its loss, initial parameters and data."""
    import equinox as eqx
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    x = jnp.asarray(x[:500] / 16.0, jnp.float32)
    y = jax.nn.one_hot(labels[:500], 10, dtype=jnp.float32)
    model = eqx.nn.MLP(
        64, 10, 32, 2, activation=jnp.tanh, dtype=jnp.float32, key=jax.random.key(0)
    )  # (float32 also under x64: the same initial draw)
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, data):
        images, target = data
        out = jax.vmap(eqx.combine(params, static))(images)
        return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=1))

    return loss, params, (x, y)


def first_call(run):
    """Seconds of the first call (compiling) and its result."""
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    return time.perf_counter() - start, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="t = 10, 12 rows")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    rows, t_max = (12, 10.0) if args.quick else (60, 100.0)
    loss, params0, data = digits_classifier()
    metric = {"sharpness": gflow.metrics.Sharpness(loss)}

    def flow(metrics=None):
        return gflow.simulate(
            loss, data, t_max, params0=params0, n_save=rows, metrics=metrics
        )

    cold = {}
    cold["flow"], plain = first_call(flow)
    cold["flow_with_metric"], with_metric = first_call(lambda: flow(metric))
    cold["sharpness_along"], along = first_call(
        lambda: gflow.metrics.sharpness_along(plain, loss, data)
    )
    warm = {
        "flow": timed(flow)[2],
        "flow_with_metric": timed(lambda: flow(metric))[2],
        "sharpness_along": timed(
            lambda: gflow.metrics.sharpness_along(plain, loss, data)
        )[2],
    }
    exact = np.asarray(gflow.metrics.sharpness_along(plain, loss, data, iters=200))
    from_metric = np.asarray(with_metric.metrics["sharpness"])
    error = {
        "metric": float(np.max(np.abs(from_metric - exact) / exact)),
        "sharpness_along": float(np.max(np.abs(np.asarray(along) - exact) / exact)),
    }
    payload = {
        "problem": "Equinox MLP 64-32-32-10 (tanh) on 500 digits, MSE on one-hot "
        f"labels, float32, gradient flow to t = {t_max:g}, {rows} rows",
        "rows": rows,
        "sharpness_first_last": [float(exact[0]), float(exact[-1])],
        "cold_s": cold,
        "warm_s": warm,
        "metric_cost_warm_s": warm["flow_with_metric"] - warm["flow"],
        "sharpness_along_over_flow_warm": warm["sharpness_along"] / warm["flow"],
        "metric_cost_over_flow_warm": (warm["flow_with_metric"] - warm["flow"])
        / warm["flow"],
        "max_relative_error": error,
    }
    name = "sharpness_quick" if args.quick else "sharpness"
    path = write_results(name, payload, args.results)
    print(f"λ_max from {exact[0]:.2f} to {exact[-1]:.2f} over {rows} rows")
    for name in cold:
        print(f"{name:>17}: warm {warm[name]:.3f} s, first call {cold[name]:.2f} s")
    along, metric = (
        payload["sharpness_along_over_flow_warm"],
        payload["metric_cost_over_flow_warm"],
    )
    print(f"sharpness_along / flow (warm): {along:.2f}; the metric adds {metric:.2f}")
    print(f"largest relative error: {error}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
