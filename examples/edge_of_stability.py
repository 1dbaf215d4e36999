"""Gradient descent at the edge of stability, and the central flow that follows it.

The central flows authors' own example (Cohen et al., ICLR 2025; their JAX port's
notebook): a swish MLP 8-16-16-1 on 128 Gaussian points with Gaussian targets,
squared loss, gradient descent at lr = 0.1 for 1,000 steps (t = 100). The network
sharpens until lr·λ_max reaches 2 (near step 400), then GD oscillates along the
top eigenvector and leaves the gradient flow. Three runs at GD's steps:
- gradient descent, every step kept (its midpoints average the oscillation out);
- the gradient flow (`gflow.simulate`'s default);
- the central flow (`gflow.flows.CentralFlow(0.1)`), with its prediction of GD's
  time-averaged loss.

The figure (`gflow.plot.edge_of_stability`): (left) the loss of GD (raw, and
smoothed over 50 steps), of the two flows, and the central flow's prediction;
(middle) lr·λ_max of the central flow and of GD (every 10 steps), the edge at 2;
(right) the distance of GD's midpoints to each flow.

Run:  python examples/edge_of_stability.py [--steps 1000] [--out DIR]
Writes DIR/edge_of_stability.png and DIR/edge_of_stability_summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")

import gflow  # noqa: E402

LR, SMOOTHING = 0.1, 50


def problem():
    """The swish MLP of the central flows example: loss, parameters, data."""
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    data = (jax.random.normal(kx, (128, 8)), jax.random.normal(ky, (128, 1)))
    sizes = (8, 16, 16, 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(jax.random.split(kp, 3), sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(params, data):
        x, y = data
        for i, layer in enumerate(params):
            x = x @ layer["w"] + layer["b"]
            x = jax.nn.swish(x) if i < len(params) - 1 else x
        return jnp.mean((x - y) ** 2)

    return loss, params, data


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="GD steps")
    parser.add_argument("--out", default="figures", help="folder for the outputs")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loss, params0, data = problem()
    t_max, ts = args.steps * LR, np.arange(args.steps + 1) * LR
    gd = gflow.gradient_descent(loss, data, t_max, lr=LR, params0=params0, ts=ts)
    flow = gflow.simulate(loss, data, t_max, params0=params0, ts=gd.ts)
    central = gflow.simulate(loss, data, t_max, params0=params0, ts=gd.ts,
                             flow=gflow.flows.CentralFlow(LR))  # fmt: skip
    gd_sharpness = gflow.metrics.sharpness_along(gd[::10], loss, data)
    fig, _ = gflow.plot.edge_of_stability(
        gd,
        {"gradient flow": flow, "central flow": central},
        lr=LR,
        sharpness=gd_sharpness,
        sharpness_ts=gd.ts[::10],
        smoothing=SMOOTHING,
    )
    path = gflow.plot.save(fig, out / "edge_of_stability.png")
    midpoints = gd.midpoints()
    far_flow = gflow.compare(flow, midpoints)
    far_central = gflow.compare(central, midpoints)
    oscillation = np.asarray(central.metrics["oscillation"])
    edge = int(np.argmax(oscillation > 0))
    smooth = gflow.metrics.moving_average(gd.loss, SMOOTHING)[edge + 2 * SMOOTHING :]
    predicted = np.asarray(central.metrics["predicted_loss"])[edge + 2 * SMOOTHING :]
    summary = {
        "lr": LR,
        "steps": args.steps,
        "edge_step": edge,
        "max_effective_sharpness_central": float(
            LR * np.max(central.metrics["sharpness"])
        ),
        "final_distance_to_gradient_flow": float(far_flow.param_distance[-1]),
        "final_distance_to_central_flow": float(far_central.param_distance[-1]),
        "predicted_loss_gap_median": float(
            np.median(np.abs(predicted - smooth) / smooth)
        ),
        "central_flow_wall_s": float(central.stats["wall_time_s"]),
        "central_flow_stats": {
            k: int(v) for k, v in central.stats.items() if k.startswith("num_")
        },
    }
    (out / "edge_of_stability_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
