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

The figure: (left) the loss of GD (raw, and smoothed over 50 steps), of the two
flows, and the central flow's prediction; (middle) the effective eigenvalues
lr·λ_i the central flow tracks, GD's own lr·λ_max (every 10 steps), the edge at
2; (right) the distance of GD's midpoints to each flow.

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


def smoothed(values, width):
    """A Gaussian moving average (standard deviation `width` samples), the ends
    padded with the end values."""
    offsets = np.arange(-4 * width, 4 * width + 1)
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    padded = np.pad(values, 4 * width, mode="edge")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def figure(gd, flow, central, gd_sharpness, far_flow, far_central):
    fig, (ax_loss, ax_eig, ax_dist) = gflow.plot.figure(1, 3, size=(5.2, 4.2))
    steps = np.asarray(gd.ts) / LR
    ax_loss.plot(steps, gd.loss, color="C0", alpha=0.25, lw=1, label="GD")
    ax_loss.plot(steps, smoothed(np.asarray(gd.loss), SMOOTHING), color="C0",
                 lw=3, label=f"GD smoothed ({SMOOTHING} steps)")  # fmt: skip
    ax_loss.plot(steps, flow.loss, "r--", lw=1.5, label="gradient flow")
    ax_loss.plot(steps, central.loss, "k", lw=1.5, label="central flow")
    ax_loss.plot(steps, central.metrics["predicted_loss"], "k:", lw=2,
                 label="central flow: predicted GD loss")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="loss", ylim=(0, None), title="Loss")
    ax_loss.legend(fontsize="small")

    effective = np.asarray(central.metrics["effective_eigenvalues"])
    for i in range(effective.shape[1]):
        ax_eig.plot(steps, effective[:, i], color=f"C{i}", lw=1.5,
                    label="central flow: lr·λ_i" if i == 0 else None)  # fmt: skip
    every = slice(None, None, 10)
    ax_eig.plot(steps[every], LR * gd_sharpness, "o", color="0.4", ms=2.5,
                label="GD: lr·λ_max")  # fmt: skip
    ax_eig.axhline(2.0, color="k", ls=":", lw=1, label="edge of stability (2)")
    ax_eig.set(xlabel="step", ylabel="lr · eigenvalue", ylim=(0, 2.6),
               title="Effective eigenvalues")  # fmt: skip
    ax_eig.legend(fontsize="small", loc="lower right")

    ax_dist.semilogy(far_flow.ts / LR, far_flow.param_distance, "r--",
                     label="‖GD midpoint − gradient flow‖")  # fmt: skip
    ax_dist.semilogy(far_central.ts / LR, far_central.param_distance, "k",
                     label="‖GD midpoint − central flow‖")  # fmt: skip
    ax_dist.set(xlabel="step", ylabel="relative parameter distance",
                title="GD's midpoints against the flows")  # fmt: skip
    ax_dist.legend(fontsize="small")
    return fig


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
    gd_sharpness = np.asarray(gflow.metrics.sharpness_along(gd[::10], loss, data))
    midpoints = gd.midpoints()
    far_flow = gflow.compare(flow, midpoints)
    far_central = gflow.compare(central, midpoints)

    path = gflow.plot.save(
        figure(gd, flow, central, gd_sharpness, far_flow, far_central),
        out / "edge_of_stability.png",
    )
    oscillation = np.asarray(central.metrics["oscillation"])
    edge = int(np.argmax(oscillation > 0))
    smooth = smoothed(np.asarray(gd.loss), SMOOTHING)[edge + 2 * SMOOTHING :]
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
