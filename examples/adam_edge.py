"""Adam at its edge of stability, and the flows that model it.

A tanh MLP 64-32-1 regresses the digit's value (scaled to [-1, 1]) on 500 of
scikit-learn's digits (squared error, float64), trained by Adam (optax's,
lr 1e-3, betas 0.9/0.999) from the same start as four continuous models:
- the rod flow of Adam (`gflow.flows.RodFlow(adam)`): consecutive iterates as the
  two ends of a rod, through the edge;
- Adam's stable flow (`gflow.flows.StableFlow(adam)`), its first-order model;
- the gradient flow, for scale.

Adam's preconditioned sharpness λ_max(P⁻¹H), P = diag(√v̂ + ε), rises to its edge
2(1 + b1)/((1 − b1)·lr) = 38/lr and hovers there; the stable flow's sails past it,
the rod flow's stays on it.

The figure: (left) the loss of Adam, of the flows, and the rod flow's predicted
loss (the mean loss of its ends); (middle) λ_max(P⁻¹H) over the edge along Adam's
iterates (from the moments the run saves), the rod flow and the stable flow;
(right) the distance of Adam's midpoints to each flow.

Run:  python examples/adam_edge.py [--quick | --paper] [--out DIR]
(2,000 steps, about a minute on a 2-core CPU; --quick: 300 steps, a smoke run
that ends before the edge; --paper: 6,000 steps, long past the edge.)
Needs scikit-learn (`pip install -e ".[bench]"`).
Writes DIR/adam_edge.png and DIR/adam_edge_summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")

import gflow  # noqa: E402

LR, EVERY = 1e-3, 20  # Adam's learning rate; the sharpness every 20 steps


def problem():
    """The MLP's loss, its initial parameters, and the data."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    data = (jnp.asarray(x[:500] / 16.0), jnp.asarray(labels[:500, None] / 4.5 - 1.0))
    sizes = (64, 32, 1)
    keys = jax.random.split(jax.random.key(1), len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(params, data):
        x, y = data
        for i, layer in enumerate(params):
            x = x @ layer["w"] + layer["b"]
            x = jnp.tanh(x) if i < len(params) - 1 else x
        return jnp.mean((x - y) ** 2)

    return loss, params, data


def over_edge(loss, data, adam, traj):
    """λ_max(P⁻¹H) / edge every `EVERY` steps of a trajectory (its own
    moments)."""
    rows = traj[::EVERY]
    values = gflow.metrics.preconditioned_sharpness_along(rows, loss, data, adam)
    return np.asarray(values) / float(adam.edge())


def figure(adam_run, flows, sharpness, distances):
    fig, (ax_loss, ax_edge, ax_dist) = gflow.plot.figure(1, 3, size=(5.2, 4.2))
    steps = np.asarray(adam_run.ts) / LR
    styles = {
        "rod flow": dict(color="k", lw=1.5),
        "stable flow": dict(color="C3", lw=1.5, ls="--"),
        "gradient flow": dict(color="0.5", lw=1.5, ls=":"),
    }
    ax_loss.plot(steps, adam_run.loss, color="C0", lw=1, alpha=0.6, label="Adam")
    for name, traj in flows.items():
        ax_loss.plot(steps, traj.loss, label=name, **styles[name])
    ax_loss.plot(steps, flows["rod flow"].metrics["predicted_loss"], color="C2",
                 lw=1.5, label="rod flow: mean loss of its ends")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="Loss")
    ax_loss.legend(fontsize="small")

    every = steps[::EVERY]
    ax_edge.plot(every, sharpness["Adam"], "o", color="C0", ms=3, label="Adam")
    for name in ("rod flow", "stable flow"):
        ax_edge.plot(every, sharpness[name], label=name, **styles[name])
    ax_edge.axhline(1.0, color="k", lw=0.8, ls=":", label="edge: 38/lr")
    top = max(2.0, 1.1 * float(np.nanmax(sharpness["stable flow"])))
    ax_edge.set(xlabel="step", ylabel="λ_max(P⁻¹H) / edge", ylim=(0, top),
                title="Preconditioned sharpness")  # fmt: skip
    ax_edge.legend(fontsize="small", loc="upper left")

    for name, far in distances.items():
        ax_dist.semilogy(far.ts / LR, far.param_distance, label=name, **styles[name])
    ax_dist.set(xlabel="step", ylabel="relative parameter distance",
                title="Adam's midpoints against the flows")  # fmt: skip
    ax_dist.legend(fontsize="small")
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="300 steps (smoke run)")
    size.add_argument("--paper", action="store_true", help="6,000 steps")
    parser.add_argument("--out", default="figures", help="folder for the outputs")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 300 if args.quick else 6000 if args.paper else 2000

    loss, params0, data = problem()
    adam = gflow.optimizers.Adam(LR)
    ts = np.arange(steps + 1) * LR
    run = gflow.gradient_descent(
        loss, data, ts[-1], optimizer=adam, params0=params0, ts=ts
    )
    common = dict(params0=params0, ts=run.ts)
    flows = {
        "rod flow": gflow.simulate(
            loss, data, ts[-1], flow=gflow.flows.RodFlow(adam), **common
        ),
        "stable flow": gflow.simulate(
            loss, data, ts[-1], flow=gflow.flows.StableFlow(adam), **common
        ),
        "gradient flow": gflow.simulate(loss, data, ts[-1], **common),
    }
    sharpness = {"Adam": over_edge(loss, data, adam, run)}
    for name in ("rod flow", "stable flow"):
        sharpness[name] = over_edge(loss, data, adam, flows[name])
    midpoints = run.midpoints()
    distances = {name: gflow.compare(traj, midpoints) for name, traj in flows.items()}
    path = gflow.plot.save(
        figure(run, flows, sharpness, distances), out / "adam_edge.png"
    )
    reached = np.flatnonzero(sharpness["Adam"][1:] >= 1)
    edge = int(reached[0] + 1) * EVERY if reached.size else None
    after = slice(edge // EVERY, None) if edge is not None else slice(0, 0)
    summary = {
        "lr": LR,
        "steps": steps,
        "edge_step": edge,
        "sharpness_over_edge_after_edge": {
            name: float(np.median(values[after])) if edge is not None else None
            for name, values in sharpness.items()
        },
        "final_distance": {
            name: float(far.param_distance[-1]) for name, far in distances.items()
        },
        "wall_s": {name: float(t.stats["wall_time_s"]) for name, t in flows.items()},
    }
    (out / "adam_edge_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
