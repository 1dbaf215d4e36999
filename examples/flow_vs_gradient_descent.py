"""Gradient flow against gradient descent on the co-occurrence transformer.

Yang et al.'s setting (n = 60, L = 5, d = 64, m = 128, m1 = 256) to t = 300, their
horizon. The flow (gflow's defaults: Tsit5 throughout on this flow) and gradient
descent at learning rates 0.3, 0.1 and 0.03 are saved at the same times (whole GD
steps), then compared with `gflow.compare`: how far each GD run strays from the
flow, and when it first differs by more than 1%. GD's distance to the flow shrinks
in proportion to its learning rate: it is the Euler discretisation of the flow. At
lr = 0.3 gradient descent diverges early (in float32, at t ≈ 4.5): the third panel
shows the sharpness λ_max along the flow (Hessian-vector-product power iteration)
against the stability limit 2 / lr of each learning rate. At lr = 0.1, λ_max > 2 /
lr until t ≈ 1: GD overshoots (the loss jumps at t = 0.3) and settles on a path
about 8% away from the flow for good; at lr = 0.03 it stays within 0.2% of the flow.

Run:  python examples/flow_vs_gradient_descent.py [--out DIR]
Writes DIR/flow_vs_gradient_descent.png and DIR/flow_vs_gd_summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")

import gflow  # noqa: E402
from gflow.models import CooccurrenceTransformer, cooccurrence_data  # noqa: E402

LEARNING_RATES = (0.3, 0.1, 0.03)


def figure(flow, runs, comparisons, sharpness):
    """Loss, distance to the flow and sharpness of the flow and of GD."""
    fig, (ax_loss, ax_dist, ax_sharp) = gflow.plot.figure(1, 3, size=(6.0, 4.8))
    gflow.plot.loss(flow, "gradient flow (gflow)", ax=ax_loss, color="k", lw=3)
    for i, (lr, gd) in enumerate(runs.items()):
        gflow.plot.loss(gd, f"GD, lr = {lr:g}", ax=ax_loss, color=f"C{i + 1}", lw=1.5)
    ax_loss.set(title="loss on the same time axis (step k at t = k·lr)")
    for i, (lr, c) in enumerate(comparisons.items()):
        gflow.plot.series(
            c.ts,
            c.param_distance,
            label=f"GD, lr = {lr:g}",
            ax=ax_dist,
            log_y=True,
            lw=2,
            color=f"C{i + 1}",
        )
    ax_dist.axhline(1e-2, color="0.4", ls=":", label="1% (compare's tol)")
    ax_dist.set(
        ylabel="‖θ_GD(t) − θ_flow(t)‖ / max norm",
        title="how far gradient descent strays from the flow",
    )
    ax_dist.legend()
    gflow.plot.series(
        flow.ts,
        sharpness,
        label="λ_max along the flow",
        ax=ax_sharp,
        log_y=True,
        color="k",
        lw=2,
    )
    for i, lr in enumerate(LEARNING_RATES):
        ax_sharp.axhline(
            2 / lr, color=f"C{i + 1}", ls="--", label=f"2 / lr, lr = {lr:g}"
        )
    ax_sharp.set(
        ylabel="top Hessian eigenvalue", title="GD leaves the flow where λ_max > 2 / lr"
    )
    ax_sharp.legend()
    fig.suptitle("Co-occurrence transformer (Yang et al.'s scale):\nflow vs GD")
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t-max", type=float, default=300.0)
    parser.add_argument("--out", default="out/flow_vs_gd")
    parser.add_argument(
        "--paper",
        choices=["column", "page"],
        help="also write the figures as PDF, at a paper's column or page width",
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
    data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
    params0 = model.init(jax.random.key(1))
    # Save times on a log grid, rounded to multiples of 0.3 so that every learning
    # rate lands on them exactly.
    steps = np.unique(np.rint(np.geomspace(1, args.t_max / 0.3, 60)))
    ts = np.concatenate([[0.0], steps * 0.3])
    t_max = float(ts[-1])

    flow = gflow.simulate(model, data, t_max, params0=params0, ts=ts)
    runs = {
        lr: gflow.gradient_descent(
            model, data, t_max, lr, params0=params0, ts=ts, throw=False
        )
        for lr in LEARNING_RATES
    }
    sharpness = gflow.metrics.sharpness_along(flow, model.loss, data, iters=20)
    comparisons = {lr: gflow.compare(flow, gd, tol=1e-2) for lr, gd in runs.items()}

    summary = {
        "flow": {
            "grad_evals": flow.stats["num_grad_evals"],
            "run_time_s": flow.stats["run_time_s"],
            "final_loss": float(flow.loss[-1]),
        },
        "gradient_descent": {
            str(lr): {
                "steps": runs[lr].stats["num_steps"],
                "run_time_s": runs[lr].stats["run_time_s"],
                "result": runs[lr].result,
                "last_time": float(runs[lr].ts[-1]),
                "final_loss": float(runs[lr].loss[-1]),
                "max_param_distance": c.max_param_distance,
                "first_differs_by_1pct_at": c.first_difference_time,
            }
            for lr, c in comparisons.items()
        },
        "sharpness_max_along_flow": float(np.max(sharpness)),
    }
    print(flow.summary())
    print(json.dumps(summary, indent=2))

    gflow.plot.save_versions(
        lambda: figure(flow, runs, comparisons, sharpness),
        out / "flow_vs_gradient_descent",
        paper=args.paper,
    )
    (out / "flow_vs_gd_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'flow_vs_gradient_descent.png'} and flow_vs_gd_summary.json")
    return summary


if __name__ == "__main__":
    main()
