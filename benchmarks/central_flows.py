"""Central flows: gradient descent at the edge of stability, the gradient flow and
the central flow (`gflow.flows.CentralFlow`), against the authors' JAX port.

Two problems, float64 on this machine's backend:
- "port example": the JAX port's own example (its notebook's data and initial
  parameters, drawn by flax's `nnx.Rngs(0)`), a swish MLP 8-16-16-1 on 128
  Gaussian points with Gaussian targets, lr 0.1, 1,000 steps;
- "digits": a tanh MLP 64-32-1 on 500 of sklearn's digits, regressing the digit's
  value (scaled to [-1, 1], squared error), lr 0.065, 1,000 steps: it reaches the
  edge.

Measured per problem: wall time (cold: the first call in this process, compile
included; warm: the second), work counts, and accuracy against gradient descent:
- the sharpness at every save, against the edge (2/lr)(1 + 1e-2);
- after the edge (the first save where the central flow's Σ ≠ 0), the median of
  ‖GD midpoint − central‖ / ‖GD midpoint − gradient flow‖, GD's midpoints being
  (θ_{k−1} + 2θ_k + θ_{k+1})/4 (`Trajectory.midpoints`);
- the central flow's predicted loss against GD's loss smoothed over 50 steps
  (Gaussian), after the edge plus 100 steps (the smoothing's reach), median and
  largest relative gap; the same for the central flow's own loss.

The JAX port (alex-damian/central_flows_jax: `pip install` a fetched copy, with
cvxpy and cvxopt) is an optional peer: run on the same problems with the same
number of tracked eigenvectors when it is installed, its time and accuracy
recorded the same way; without it that part is skipped and said so.

Needs the bench extra (`pip install -e ".[bench]"`: scikit-learn, scipy, flax).
Run:  python benchmarks/central_flows.py [--steps 1000] [--no-port]
Writes benchmarks/results/central_flows_<backend>.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# Cold means compiling: gflow's persistent compilation cache stays off.
os.environ["GFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter1d  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import flat_rows, timed_twice, work_of, write_results  # noqa: E402

import gflow  # noqa: E402

TRACK = 4  # eigenvectors tracked, by gflow and by the port (its example tracks 5)
SMOOTHING = 50  # steps: the Gaussian GD's loss is smoothed with
LR_DIGITS = 0.065


def mlp(sizes, activation):
    """A plain-pytree MLP: its loss (mean squared error) and initial parameters."""

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {
                "w": jax.random.normal(k, (a, b)) / np.sqrt(a),
                "b": jnp.zeros(b),
            }
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]

    def loss(params, data):
        x, y = data
        for i, layer in enumerate(params):
            x = x @ layer["w"] + layer["b"]
            if i < len(params) - 1:
                x = activation(x)
        return jnp.mean(jnp.sum((x - y) ** 2, axis=-1))

    return loss, init


def port_example():
    """The port's notebook, exactly: its data and initial parameters come from
    flax's `nnx.Rngs(0)` in the same order (float32 draws, run here in float64)."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    n, d, m = 128, 8, 16
    x, y = rngs.normal((n, d)), rngs.normal((n,))
    layers = [nnx.Linear(a, b, rngs=rngs) for a, b in ((d, m), (m, m), (m, 1))]
    params = [
        {"w": jnp.asarray(layer.kernel.value, jnp.float64),
         "b": jnp.asarray(layer.bias.value, jnp.float64)}
        for layer in layers
    ]  # fmt: skip
    data = (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)[:, None])
    loss, _ = mlp([d, m, m, 1], jax.nn.swish)
    return "port example", loss, params, data, 0.1


def digits(varying_pixels: bool = False):
    """A tanh MLP 64-32-1 on 500 digits, regressing the digit's value. With
    `varying_pixels`, on the pixels that are not 0 in every image only: a pixel
    that is always 0 gives its weights a gradient of 0 all along (for RMSProp,
    ν = 0 there)."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    x = x[:500] / 16.0
    if varying_pixels:
        x = x[:, x.max(axis=0) > 0]
    # One output: the digit's value, centred and scaled to [-1, 1] (one output
    # has one top eigenvalue; ten would bring ten to the edge together).
    data = (jnp.asarray(x), jnp.asarray(labels[:500, None] / 4.5 - 1.0))
    loss, init = mlp([x.shape[1], 32, 1], jnp.tanh)
    return "digits", loss, init(jax.random.key(1)), data, LR_DIGITS


def accuracy(
    lr, ts, sharpness, central_params, predicted, own_loss, oscillation, gd, flow
):
    """The accuracy figures of a central flow (arrays at GD's steps)."""
    mid = gd.midpoints()  # rows 1 .. steps - 1
    flat_mid = flat_rows(mid.params)
    to_flow = np.linalg.norm(flat_mid - flat_rows(flow.params)[1:-1], axis=1)
    to_central = np.linalg.norm(flat_mid - central_params[1:-1], axis=1)
    edge = int(np.argmax(oscillation > 0)) if np.any(oscillation > 0) else None
    smoothed = gaussian_filter1d(np.asarray(gd.loss), SMOOTHING, mode="nearest")
    out = {
        "max_effective_sharpness": float(np.max(lr * sharpness)),
        "sharpness_within_edge": bool(np.all(sharpness <= (2 / lr) * (1 + 1e-2))),
        "edge_step": edge,
        "edge_time": None if edge is None else float(ts[edge]),
    }
    if edge is None:
        return out
    after = slice(max(edge - 1, 0), None)  # midpoint rows are shifted by one
    ratio = to_central[after] / np.maximum(to_flow[after], 1e-300)
    settled = slice(edge + 2 * SMOOTHING, None)
    gap = np.abs(predicted[settled] - smoothed[settled]) / smoothed[settled]
    own = np.abs(own_loss[settled] - smoothed[settled]) / smoothed[settled]
    return dict(
        out,
        median_distance_ratio=float(np.median(ratio)),
        final_distance_ratio=float(ratio[-1]),
        predicted_loss_gap_median=float(np.median(gap)),
        predicted_loss_gap_max=float(np.max(gap)),
        own_loss_gap_median=float(np.median(own)),
    )


def run_gflow(loss, p0, data, lr, steps):
    t_max = steps * lr
    ts = np.arange(steps + 1) * lr
    gd = gflow.gradient_descent(loss, data, t_max, lr=lr, params0=p0, ts=ts)
    flow = gflow.simulate(loss, data, t_max, params0=p0, ts=gd.ts)
    first, central, cold, warm = timed_twice(
        lambda: gflow.simulate(
            loss,
            data,
            t_max,
            params0=p0,
            ts=gd.ts,
            flow=gflow.flows.CentralFlow(lr, track=TRACK),
        )
    )
    sharpness = np.asarray(central.metrics["sharpness"])
    figures = accuracy(
        lr,
        np.asarray(gd.ts),
        sharpness,
        flat_rows(central.params),
        np.asarray(central.metrics["predicted_loss"]),
        np.asarray(central.loss),
        np.asarray(central.metrics["oscillation"]),
        gd,
        flow,
    )
    work = work_of(central.stats)
    timing = dict(
        cold_s=cold, warm_s=warm, compile_s=float(first.stats["compile_time_s"])
    )
    return {"timing": timing, "work": work, "accuracy": figures}, gd, flow


def run_port(loss, p0, data, lr, steps, gd, flow):
    """The authors' JAX port's central flow (explicit Euler, 4 substeps per GD
    step, LOBPCG, CVXPY on the host), `steps` GD steps, same tracked count."""
    from central_flows_jax import Flow, GradientDescent
    from jax.flatten_util import ravel_pytree

    w0, unravel = ravel_pytree(p0)
    port = Flow(lambda w: loss(unravel(w), data), GradientDescent(lr=lr))
    start = jax.random.normal(jax.random.key(1), (len(w0), TRACK), w0.dtype)

    def run():
        # A step reports the loss and effective eigenvalues of the state it
        # starts from, and X averaged over its substeps: one more step than
        # GD's gives the values at each of GD's rows.
        carry = (w0, port.opt.init(w0), start)
        rows = []
        for _ in range(steps + 1):
            w = carry[0]
            carry, aux = port.central(*carry)
            rows.append((w, aux["L"], aux["eigs"], jnp.trace(aux["X"])))
        return jax.device_get(rows)

    _, rows, cold, warm = timed_twice(run)
    params, own_loss, eigs, trace = (np.stack(x) for x in zip(*rows, strict=True))
    figures = accuracy(
        lr,
        np.asarray(gd.ts),
        eigs[:, 0] / lr,
        params,
        own_loss + trace,  # the port's prediction: L + tr X (effective units)
        own_loss,
        trace,
        gd,
        flow,
    )
    return {"timing": {"cold_s": cold, "warm_s": warm}, "accuracy": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--no-port", action="store_true")
    args = parser.parse_args()
    try:
        import central_flows_jax  # noqa: F401

        port = not args.no_port
        why = None if port else "--no-port"
    except ImportError as e:
        port, why = False, f"not installed ({e})"
    results = {"track": TRACK, "steps": args.steps, "port": why or "run"}
    for problem in (port_example, digits):
        name, loss, p0, data, lr = problem()
        print(f"{name}: lr {lr}, {args.steps} steps", flush=True)
        row, gd, flow = run_gflow(loss, p0, data, lr, args.steps)
        print(f"  gflow: {row}", flush=True)
        if port:
            row["port"] = run_port(loss, p0, data, lr, args.steps, gd, flow)
            t, p = row["timing"], row["port"]["timing"]
            row["speedup"] = {
                "cold": p["cold_s"] / t["cold_s"],
                "warm": p["warm_s"] / t["warm_s"],
            }
            print(f"  port: {row['port']}; speed-up {row['speedup']}", flush=True)
        else:
            print(f"  the JAX port: skipped, {why}")
        results[name] = row
    path = write_results("central_flows", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
