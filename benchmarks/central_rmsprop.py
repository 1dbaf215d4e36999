"""RMSProp's central flow (`gflow.flows.CentralFlow(RMSProp(...))`) against the
central-flows authors' JAX code (alex-damian/central_flows_jax), on the
iterates of RMSProp itself.

Two problems, float64 on this machine's backend, RMSProp with b2 = 0.99,
ε = 1e-8 outside the square root (the authors' form), no bias correction, from
ν0 = g0² (the squared gradient at the start, per coordinate: the authors'
flows divide by √ν, so they cannot start from ν = 0), 1,000 steps:
- "port example": the authors' notebook network (a swish MLP 8-16-16-1 on 128
  Gaussian points, `benchmarks/central_flows.py`), lr 0.002;
- "digits": a tanh MLP on 500 of sklearn's digits (`central_flows.py`'s, on the
  pixels that are not 0 in every image: a pixel that is always 0 gives
  its weights ν = 0, where the authors' flow turns NaN),
  lr 0.001.

Measured per problem:
- RMSProp's iterates (a hand-written `lax.scan`: ν ← b2 ν + (1 − b2) g²,
  w ← w − lr g/(√ν + ε)) and their midpoints (w[k−1] + 2w[k] + w[k+1])/4;
- gflow's stable flow (`StableFlow`), the reference every ratio divides by;
- gflow's central flow (adaptive tracked set) and the authors' (`Flow.central`:
  explicit Euler, 4 substeps per step, LOBPCG, CVXPY on the host), tracking as
  many eigenvectors as gflow's run tracked at most: after the edge (the first
  row where gflow's Σ ≠ 0), the median over rows of ‖midpoint − central‖ /
  ‖midpoint − stable flow‖;
- wall time of both central flows: cold (the first call in this process,
  compiling) and warm (the second), and gflow's work counts;
- gflow's predicted loss against RMSProp's loss smoothed over 50 steps.

Needs the bench extra and, for the authors' code, `pip install` of a fetched
copy of alex-damian/central_flows_jax with cvxpy and cvxopt; without it that
part is skipped and said so.
Run:  python benchmarks/central_rmsprop.py [--quick] [--no-port]
Writes benchmarks/results/central_rmsprop_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

# Cold means compiling: gflow's persistent compilation cache stays off.
os.environ["GFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.ndimage import gaussian_filter1d  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, flat_rows, timed_twice, work_of, write_results  # noqa: E402
from _tables import central_rmsprop  # noqa: E402
from central_flows import (  # noqa: E402
    SMOOTHING,
    digits,
    port_example,
)

import gflow  # noqa: E402

B2, EPS = 0.99, 1e-8
LRS = {"port example": 0.002, "digits": 0.001}


def iterates(loss, w0, nu0, lr, steps):
    """RMSProp's iterates w[0..steps] (flat), by hand."""

    def step(carry, _):
        w, nu = carry
        g = jax.grad(loss)(w)
        nu = B2 * nu + (1 - B2) * g**2
        w = w - lr * g / (jnp.sqrt(nu) + EPS)
        return (w, nu), (w, loss(w))

    _, (ws, losses) = jax.jit(
        lambda w, nu: jax.lax.scan(step, (w, nu), None, length=steps)
    )(w0, nu0)
    ws = np.concatenate([np.asarray(w0)[None], np.asarray(ws)])
    return ws, np.concatenate([[float(loss(w0))], np.asarray(losses)])


def run_port(loss, w0, nu0, lr, steps, track):
    """The authors' central flow, `steps` steps: their parameters at each row."""
    from central_flows_jax import Flow
    from central_flows_jax import RMSProp as PortRMSProp

    opt = PortRMSProp(lr=lr, beta2=B2, eps=EPS)
    opt.initialize_state(w0)  # sets their state layout
    state0 = ravel_pytree({"t": jnp.zeros(()), "nu": nu0})[0]
    flow = Flow(loss, opt)
    start = jax.random.normal(jax.random.key(1), (len(w0), track), w0.dtype)

    def run():
        carry, rows = (w0, state0, start), []
        for _ in range(steps + 1):
            rows.append(carry[0])
            carry, _ = flow.central(*carry)
        return np.stack(jax.device_get(rows))

    _, rows, cold, warm = timed_twice(run)
    return rows, cold, warm


def median_ratio(mid, central, stable, edge):
    """Median of ‖midpoint − central‖/‖midpoint − stable‖ after the edge
    (midpoint rows are 1 .. steps − 1)."""
    to_central = np.linalg.norm(mid - central[1:-1], axis=1)
    to_stable = np.linalg.norm(mid - stable[1:-1], axis=1)
    after = slice(max(edge - 1, 0), None)
    return float(np.median(to_central[after] / to_stable[after]))


def problem(make, steps, port):
    name, loss, p0, data, _ = make()
    lr = LRS[name]
    w0, unravel = ravel_pytree(p0)

    def flat_loss(w):
        return loss(unravel(w), data)

    nu0 = jax.grad(flat_loss)(w0) ** 2
    ws, losses = iterates(flat_loss, w0, nu0, lr, steps)
    mid = (ws[:-2] + 2 * ws[1:-1] + ws[2:]) / 4
    opt = gflow.optimizers.RMSProp(lr, B2, EPS, eps_in_sqrt=False)
    ts = np.arange(steps + 1) * lr
    moments0 = {"nu": unravel(nu0)}

    def simulate(flow):
        return gflow.simulate(loss, data, steps * lr, params0=p0, ts=ts, flow=flow)

    stable = simulate(gflow.flows.StableFlow(opt, moments0=moments0))
    first, central, cold, warm = timed_twice(
        lambda: simulate(gflow.flows.CentralFlow(opt, moments0=moments0))
    )
    at_edge = np.asarray(central.metrics["edge_count"]) > 0
    edge = int(np.argmax(at_edge)) if at_edge.any() else None
    tracked = int(np.max(central.metrics["tracked"]))
    out = {
        "lr": lr,
        "steps": steps,
        "parameters": int(w0.size),
        "edge_step": edge,
        "tracked_most": tracked,
        "gflow": {
            "cold_s": cold,
            "warm_s": warm,
            "compile_s": float(first.stats["compile_time_s"]),
            "work": work_of(central.stats),
        },
    }
    if edge is None:
        return name, out
    rows = flat_rows(central.params)
    out["gflow"]["median_distance_ratio"] = median_ratio(
        mid, rows, flat_rows(stable.params), edge
    )
    smoothed = gaussian_filter1d(losses, SMOOTHING, mode="nearest")
    settled = slice(edge + 2 * SMOOTHING, None)
    predicted = np.asarray(central.metrics["predicted_loss"])[settled]
    gap = np.abs(predicted - smoothed[settled]) / smoothed[settled]
    if gap.size:
        out["gflow"]["predicted_loss_gap_median"] = float(np.median(gap))
    if port:
        port_rows, port_cold, port_warm = run_port(
            flat_loss, w0, nu0, lr, steps, tracked
        )
        out["port"] = {
            "cold_s": port_cold,
            "warm_s": port_warm,
            "track": tracked,
            "median_distance_ratio": median_ratio(
                mid, port_rows, flat_rows(stable.params), edge
            ),
        }
        out["speedup"] = {"cold": port_cold / cold, "warm": port_warm / warm}
    return name, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 steps, no port")
    parser.add_argument("--no-port", action="store_true")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    port, why = not (args.no_port or args.quick), None
    if port:
        try:
            import central_flows_jax  # noqa: F401
        except ImportError:
            port, why = False, "central_flows_jax is not installed"
    steps = 200 if args.quick else 1000
    payload = {"b2": B2, "eps": EPS, "port": port, "port_skipped_because": why}
    # The authors' flow turns NaN where ν = 0: digits on its varying pixels.
    for make in (port_example, lambda: digits(varying_pixels=True)):
        name, figures = problem(make, steps, port)
        payload[name] = figures
        print(name, figures)
    name = "central_rmsprop_quick" if args.quick else "central_rmsprop"
    path = write_results(name, payload, args.results)
    saved = json.loads(path.read_text())
    path.with_suffix(".md").write_text(central_rmsprop(saved))
    print("wrote", path, "and its table", path.with_suffix(".md"))
    return payload


if __name__ == "__main__":
    main()
