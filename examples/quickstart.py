"""Quickstart: the gradient flow of a two-layer linear network, beside gradient descent.

A two-layer linear network W2 W1 learns a target matrix with singular values
3, 2, 1 and 0.5 from a small initialisation. Under gradient flow it learns the
modes one at a time, the strongest first (Saxe, McClelland & Ganguli 2014): the mode
with singular value s rises near t = log(s / u0) / (2 s), u0 being its small initial
strength, so the loss falls in a staircase.
gflow integrates the flow exactly (to the solver's tolerance) with about a
thousand gradient evaluations (its summary prints the count); gradient descent
with a large learning rate is shown beside it on the same time axis (step k at
t = k * lr).

Run:  python examples/quickstart.py [--out DIR]
Writes DIR/quickstart.png (default DIR: out/quickstart) and prints a summary.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import gflow  # noqa: E402

TARGET_SINGULAR_VALUES = (3.0, 2.0, 1.0, 0.5)


def make_data(key, dim=6, n=200):
    """Whitened inputs X and targets Y = M X, M with known singular values."""
    k1, k2, k3 = jax.random.split(key, 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (dim, dim)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (dim, dim)))
    s = (
        jnp.zeros(dim)
        .at[: len(TARGET_SINGULAR_VALUES)]
        .set(jnp.array(TARGET_SINGULAR_VALUES))
    )
    target = u @ jnp.diag(s) @ v.T
    x = jax.random.normal(k3, (dim, n))
    # Whiten, so that the loss is ½|W2 W1 − M|²_F up to a constant.
    x = jnp.linalg.cholesky(jnp.linalg.inv(x @ x.T / n)).T @ x
    return {"x": x, "y": target @ x}, target


def loss(params, data):
    """Mean squared error of the two-layer linear network W2 W1."""
    prediction = params["W2"] @ (params["W1"] @ data["x"])
    return 0.5 * jnp.mean(jnp.sum((prediction - data["y"]) ** 2, axis=0))


def product_singular_values(params):
    return jnp.linalg.svd(params["W2"] @ params["W1"], compute_uv=False)


def figure(flow, gd, lr):
    """The loss, and the singular values of W2 W1, of the flow and of GD."""
    fig, (ax_loss, ax_sv) = gflow.plot.figure(1, 2, size=(5.5, 4.2))
    ax_loss.semilogy(flow.ts, flow.loss, lw=2.5, label="gradient flow (gflow)")
    ax_loss.semilogy(gd.ts, gd.loss, "--", lw=1.5, label=f"gradient descent, lr={lr}")
    ax_loss.set(
        xlabel="gradient-flow time t",
        ylabel="loss",
        title="(a) the loss falls one mode at a time",
    )
    ax_loss.legend()
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(TARGET_SINGULAR_VALUES)))
    for i, (s, c) in enumerate(zip(TARGET_SINGULAR_VALUES, colors, strict=True)):
        ax_sv.plot(
            flow.ts,
            flow.metrics["singular_values"][:, i],
            color=c,
            lw=2.5,
            label=f"mode {i + 1} (target {s:g})",
        )
        ax_sv.plot(gd.ts, gd.metrics["singular_values"][:, i], "--", color=c, lw=1)
        ax_sv.axhline(s, color=c, ls=":", lw=1)
    ax_sv.set(
        xlabel="gradient-flow time t",
        ylabel="singular value of W2 W1",
        title="(b) strongest mode first\n(dashed: GD; dotted: target)",
    )
    ax_sv.set_ylim(-0.1, 4.2)  # room for the legend above the targets
    ax_sv.legend(loc="upper center", ncol=2, fontsize="x-small")
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart", help="output folder")
    parser.add_argument(
        "--paper",
        choices=["column", "page"],
        help="also write the figures as PDF, at a paper's column or page width",
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data, _ = make_data(jax.random.key(0))
    dim, hidden, scale = data["x"].shape[0], 8, 1e-3
    k1, k2 = jax.random.split(jax.random.key(1))
    params0 = {
        "W1": scale * jax.random.normal(k1, (hidden, dim)),
        "W2": scale * jax.random.normal(k2, (dim, hidden)),
    }
    t_max, lr = 20.0, 0.25
    metrics = {"singular_values": lambda p, d: product_singular_values(p)}

    flow = gflow.simulate(
        loss, data, t_max, params0=params0, n_save=400, metrics=metrics
    )
    gd = gflow.simulate(
        loss,
        data,
        t_max,
        params0=params0,
        solver="euler",
        dt0=lr,
        ts=np.arange(0.0, t_max + lr / 2, lr),
        metrics=metrics,
    )
    print(flow.summary())
    print(
        f"gradient descent, lr = {lr}: {gd.stats['num_steps']} steps, "
        f"final loss {float(gd.loss[-1]):.3g}"
    )

    paths = gflow.plot.save_versions(
        lambda: figure(flow, gd, lr), out / "quickstart", paper=args.paper
    )
    print("wrote " + " and ".join(map(str, paths)))
    return flow, gd


if __name__ == "__main__":
    main()
