"""Flows that predict optimisers: how close each continuous model is to the optimiser.

An equinox MLP 64 -> 32 -> 32 -> 10 (tanh) fits the first 500 images of
scikit-learn's digits (pixels / 16) with the squared error on one-hot labels, in
float64 (a smaller network than benchmarks/stiff.py's, so that the 64 SDE paths
fit in minutes on the 2-core CPU). Measured, in one run:

1. gradient descent at lr h in {0.0025, 0.005, 0.01, 0.02} to t = 20: its largest
   relative parameter distance over 21 save times to the plain gradient flow and
   to flows.ModifiedGD(h) (Dopri8, rtol 1e-10), and the slopes of both against h;
2. heavy-ball momentum (optax.sgd(lr, momentum=0.9), step k at t = k lr / 0.1) at
   lr in {0.0005, 0.001, ..., 0.016} to t = 20: the distance to the plain flow
   on that time axis and to flows.HeavyBall(lr, 0.9) from its matched start and
   from rest (Tsit5, rtol 1e-10), and the slope;
3. minibatch SGD (lr 0.05 and 0.02, B = 16, drawn without replacement) over 64
   seeds against 64 paths of flows.SGD(lr, 16) (simulate_ensemble, Euler-Maruyama
   at dt = lr / 4): the mean and standard deviation of the loss at 40 save times to
   t = 10; the deterministic flows' distance to SGD's mean in standard errors; the
   cost of one SDE path per unit time against one SGD run.

    pip install -e ".[bench]"
    python benchmarks/optimizer_flows.py          # about 6 minutes on the 2-core CPU
    python benchmarks/optimizer_flows.py --quick  # small and short, for the tests

Writes benchmarks/results/optimizer_flows_<backend>.json and
docs/figures/optimizer_flows_<backend>.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import FIGURES, RESULTS, write_results  # noqa: E402

import gflow  # noqa: E402
from gflow import flows, models  # noqa: E402

TIGHT = dict(rtol=1e-10, atol=1e-12, max_steps=10**6)


class DigitsMLP(models.AbstractExampleModel):
    """An MLP 64 -> width -> width -> 10 (tanh), float64, with the squared error
    on one-hot labels per example."""

    width: int = eqx.field(static=True)

    def init(self, key):
        mlp = eqx.nn.MLP(64, 10, self.width, 2, activation=jnp.tanh, key=key)
        return jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp
        )

    def per_example_loss(self, mlp, data):
        x, y = data
        return 0.5 * jnp.sum((jax.vmap(mlp)(x) - y) ** 2, axis=1)


def digits(n_examples):
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    return (
        jnp.asarray(x[:n_examples] / 16.0),
        jax.nn.one_hot(jnp.asarray(labels[:n_examples]), 10, dtype=jnp.float64),
    )


def slope(rows, column):
    """The log-log slope of `column` (a distance) against the rows' learning rates."""
    lrs, distances = [r["lr"] for r in rows], [r[column] for r in rows]
    return float(np.polyfit(np.log(lrs), np.log(distances), 1)[0])


def distance(a, b):
    return gflow.compare(a, b).max_param_distance


def tight_flow(model, data, p0, t_max, ts, flow=None):
    """A flow solved tightly (Dopri8, rtol 1e-10): the reference for a part."""
    return gflow.simulate(
        model, data, t_max, params0=p0, ts=ts, flow=flow, solver="dopri8", **TIGHT
    )


def gradient_descent_part(model, data, p0, t_max, ts, lrs, plain):
    """GD against the plain flow and the modified flow."""
    rows = []
    for lr in lrs:
        gd = gflow.gradient_descent(model, data, t_max, lr, params0=p0, ts=ts)
        modified = tight_flow(model, data, p0, t_max, gd.ts, flows.ModifiedGD(lr))
        rows.append(
            dict(
                lr=lr,
                to_plain=distance(plain, gd),
                to_modified=distance(modified, gd),
                modified_hvps=int(modified.stats["num_hvp_evals"]),
            )
        )
        print(
            f"  GD lr {lr:<7} to plain flow {rows[-1]['to_plain']:.3e}   to "
            f"ModifiedGD {rows[-1]['to_modified']:.3e}   "
            f"({rows[-1]['to_plain'] / rows[-1]['to_modified']:.1f}x closer)"
        )
    return dict(
        rows=rows,
        slope_plain=slope(rows, "to_plain"),
        slope_modified=slope(rows, "to_modified"),
    )


def heavy_ball_part(model, data, p0, t_max, ts, lrs, beta, plain):
    """Momentum GD against the plain flow on its time axis and the heavy-ball flow."""
    rows = []
    for lr in lrs:
        momentum = gflow.gradient_descent(
            model,
            data,
            t_max,
            lr,
            params0=p0,
            ts=ts,
            optimizer=optax.sgd(lr, momentum=beta),
            time_per_step=lr / (1 - beta),
        )
        row = dict(lr=lr, to_plain=distance(plain, momentum))
        for start in ("matched", "rest"):
            hb = gflow.simulate(
                model,
                data,
                float(momentum.ts[-1]),  # whole steps of h: t_max rounded
                params0=p0,
                ts=momentum.ts,
                flow=flows.HeavyBall(lr, beta, start=start),
                solver="tsit5",
                **TIGHT,
            )
            row[f"to_heavy_ball_{start}"] = distance(hb, momentum)
        row["ratio"] = row["to_plain"] / row["to_heavy_ball_matched"]
        rows.append(row)
        print(
            f"  momentum lr {lr:<7} to plain flow {row['to_plain']:.3e}   to "
            f"HeavyBall {row['to_heavy_ball_matched']:.3e} (from rest "
            f"{row['to_heavy_ball_rest']:.3e})   {row['ratio']:.1f}x closer"
        )
    return dict(
        rows=rows,
        beta=beta,
        slope_heavy_ball=slope(rows, "to_heavy_ball_matched"),
        slope_heavy_ball_rest=slope(rows, "to_heavy_ball_rest"),
        slope_plain=slope(rows, "to_plain"),
        min_ratio=min(r["ratio"] for r in rows),
    )


def sgd_part(model, data, p0, t_max, ts, lr, batch, seeds):
    """Minibatch SGD over seeds against as many paths of its SDE."""
    sgd_loss, times = [], []
    for seed in range(seeds):
        start = time.perf_counter()
        run = gflow.gradient_descent(
            model, data, t_max, lr, params0=p0, ts=ts, batch_size=batch, batch_key=seed
        )
        times.append(time.perf_counter() - start)
        sgd_loss.append(np.asarray(run.loss))
    sgd_loss = np.array(sgd_loss)
    ts = np.asarray(run.ts)
    batch_p0 = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (seeds,) + x.shape) if eqx.is_array(x) else x, p0
    )

    def paths(**options):
        return gflow.simulate_ensemble(
            model,
            data,
            t_max,
            params0=batch_p0,
            ts=ts,
            flow=flows.SGD(lr, batch),
            noise_key=jax.random.split(jax.random.key(2026), seeds),
            **options,
        )

    sde = paths()
    sde_loss = np.asarray(sde.loss)
    # The same paths' mean at twice the step: the Euler-Maruyama error, against
    # the model's.
    coarse = paths(dt0=2 * sde.meta["dt0"])
    step_effect = np.abs(np.asarray(coarse.loss).mean(0) - sde_loss.mean(0))
    plain = tight_flow(model, data, p0, t_max, ts)
    modified = tight_flow(model, data, p0, t_max, ts, flows.ModifiedGD(lr))
    later = ts > 0  # at t = 0 every run has the same loss
    mean_sgd, mean_sde = sgd_loss.mean(0), sde_loss.mean(0)
    std_sgd, std_sde = sgd_loss.std(0, ddof=1), sde_loss.std(0, ddof=1)
    se_sgd = std_sgd / np.sqrt(seeds)
    se_difference = np.sqrt(std_sgd**2 + std_sde**2) / np.sqrt(seeds)
    mean_gap = np.abs(mean_sde - mean_sgd)[later] / se_difference[later]
    std_ratio = std_sde[later] / std_sgd[later]
    agree = (mean_gap <= 3) & (std_ratio <= 1.5) & (std_ratio >= 1 / 1.5)
    plain_gap = np.abs(np.asarray(plain.loss) - mean_sgd)[later] / se_sgd[later]
    modified_gap = np.abs(np.asarray(modified.loss) - mean_sgd)[later] / se_sgd[later]
    sgd_s = float(np.median(times[1:]))  # the first call compiles
    sde_s = sde.stats["run_time_s"] / seeds
    result = dict(
        lr=lr,
        batch_size=batch,
        seeds=seeds,
        t_max=t_max,
        n_examples=int(data[0].shape[0]),
        dt0=sde.meta["dt0"],
        ts=ts.tolist(),
        sgd_mean=mean_sgd.tolist(),
        sgd_std=std_sgd.tolist(),
        sde_mean=mean_sde.tolist(),
        sde_std=std_sde.tolist(),
        plain_flow_loss=np.asarray(plain.loss).tolist(),
        modified_flow_loss=np.asarray(modified.loss).tolist(),
        share_means_within_3_se=float(np.mean(mean_gap <= 3)),
        share_std_within_1_5=float(
            np.mean((std_ratio <= 1.5) & (std_ratio >= 1 / 1.5))
        ),
        share_both=float(np.mean(agree)),
        max_mean_gap_se=float(mean_gap.max()),
        std_ratio_range=[float(std_ratio.min()), float(std_ratio.max())],
        plain_flow_gap_se_median=float(np.median(plain_gap)),
        plain_flow_gap_se_max=float(plain_gap.max()),
        modified_flow_gap_se_median=float(np.median(modified_gap)),
        sgd_run_s=sgd_s,
        sde_path_s=sde_s,
        sde_compile_s=sde.stats["compile_time_s"],
        sde_steps_per_path=int(np.max(sde.stats["num_steps"])),
        sgd_steps_per_run=int(run.stats["num_steps"]),
        sde_cost_per_unit_time_vs_sgd=(sde_s / t_max) / (sgd_s / t_max),
        doubled_step_mean_shift_se_max=float(
            np.max(step_effect[later] / se_sgd[later])
        ),
        mean_gap_to_sgd_se_median=float(np.median(mean_gap)),
    )
    print(
        f"  SGD lr {lr}, B = {batch}, {seeds} seeds vs {seeds} SDE paths, t <= {t_max}:"
    )
    print(
        f"    means within 3 SE at {result['share_means_within_3_se']:.0%} of save "
        f"times (largest gap {result['max_mean_gap_se']:.2f} SE); std ratio "
        f"{std_ratio.min():.2f}..{std_ratio.max():.2f}, within 1.5x at "
        f"{result['share_std_within_1_5']:.0%}; both at {result['share_both']:.0%}"
    )
    print(
        f"    plain flow off SGD's mean by {result['plain_flow_gap_se_median']:.1f} SE "
        f"(median; max {result['plain_flow_gap_se_max']:.1f}); ModifiedGD by "
        f"{result['modified_flow_gap_se_median']:.1f} SE"
    )
    print(
        f"    Euler-Maruyama at 2 dt moves the SDE's mean by at most "
        f"{result['doubled_step_mean_shift_se_max']:.2f} SE"
    )
    print(
        f"    cost: one SDE path {sde_s:.3f} s ({result['sde_steps_per_path']} Euler "
        f"steps, compile {result['sde_compile_s']:.1f} s once), one SGD run "
        f"{sgd_s:.3f} s ({result['sgd_steps_per_run']} steps): "
        f"{result['sde_cost_per_unit_time_vs_sgd']:.1f}x per unit time"
    )
    return result


def figure(gd, hb, sgds, path):
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 9))
    panels = [
        (
            gd,
            "Gradient descent",
            [
                ("to_plain", "o-", "plain flow", "slope_plain"),
                ("to_modified", "s-", "ModifiedGD(lr)", "slope_modified"),
            ],
        ),
        (
            hb,
            f"Heavy ball, momentum {hb['beta']}, t = k·lr/(1 − momentum)",
            [
                ("to_plain", "o-", "plain flow", "slope_plain"),
                (
                    "to_heavy_ball_rest",
                    "^-",
                    "HeavyBall, from rest",
                    "slope_heavy_ball_rest",
                ),
                (
                    "to_heavy_ball_matched",
                    "s-",
                    "HeavyBall, matched start",
                    "slope_heavy_ball",
                ),
            ],
        ),
    ]
    for ax, (part, title, lines) in zip(axes[0], panels, strict=True):
        lrs = [r["lr"] for r in part["rows"]]
        for key, style, label, slope_key in lines:
            ax.loglog(
                lrs,
                [r[key] for r in part["rows"]],
                style,
                label=f"{label} (slope {part[slope_key]:.2f})",
            )
        ax.set(xlabel="learning rate", title=title)
        ax.set_xticks(lrs)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
    axes[0, 0].set_ylabel("largest relative distance to the iterates")
    for ax in axes[1][len(sgds) :]:  # (the quick run measures one rate)
        ax.set_visible(False)
    for ax, sgd in zip(axes[1], sgds, strict=False):
        # The loss above the gradient flow's: what the noise (and lr) add.
        ts = np.asarray(sgd["ts"])
        base = np.asarray(sgd["plain_flow_loss"])
        for name, label, color in [
            ("sgd", f"minibatch SGD, {sgd['seeds']} seeds", "C0"),
            ("sde", f"flows.SGD, {sgd['seeds']} paths", "C3"),
        ]:
            mean = np.asarray(sgd[f"{name}_mean"]) - base
            std = np.asarray(sgd[f"{name}_std"])
            se = std / np.sqrt(sgd["seeds"])
            ax.plot(ts, mean, color=color, label=f"{label}: mean ± std")
            ax.fill_between(ts, mean - std, mean + std, color=color, alpha=0.15)
            ax.fill_between(
                ts, mean - 3 * se, mean + 3 * se, color=color, alpha=0.4, lw=0
            )
        ax.plot(
            ts,
            np.asarray(sgd["modified_flow_loss"]) - base,
            "k:",
            lw=1.2,
            label="ModifiedGD(lr) (deterministic)",
        )
        ax.axhline(0, color="k", ls="--", lw=1, label="gradient flow")
        ax.set(
            xlabel="t = k · lr",
            title=f"SGD, lr {sgd['lr']}, batch {sgd['batch_size']}: means within "
            f"3 SE at {sgd['share_means_within_3_se']:.0%} of save times",
        )
        ax.legend(loc="lower right", fontsize=8.5)
    axes[1, 0].set_ylabel(
        "training loss − gradient flow's loss\n(dark band: mean ± 3 SE)"
    )
    for ax in axes.ravel():
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short")
    parser.add_argument("--results", default=RESULTS, help="folder for the JSON")
    parser.add_argument("--figures", default=FIGURES, help="folder for the figure")
    args = parser.parse_args(argv)
    if args.quick:
        n, width, t_max, seeds, t_sgd = 100, 16, 2.0, 8, 1.0
    else:
        n, width, t_max, seeds, t_sgd = 500, 32, 20.0, 64, 10.0
    data = digits(n)
    model = DigitsMLP(width)
    p0 = model.init(jax.random.key(0))
    ts = np.linspace(0, t_max, 21)
    start = time.perf_counter()
    print(f"digits MLP 64-{width}-{width}-10, {n} examples, float64")
    # One plain flow for both parts (same times).
    plain = tight_flow(model, data, p0, t_max, ts)
    gd_lrs = [0.0025, 0.005, 0.01, 0.02]
    gd = gradient_descent_part(model, data, p0, t_max, ts, gd_lrs, plain)
    hb_lrs = [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016]
    sgd_lrs = (0.05, 0.02)
    if args.quick:
        hb_lrs, sgd_lrs = hb_lrs[::2], sgd_lrs[:1]
    hb = heavy_ball_part(model, data, p0, t_max, ts, hb_lrs, 0.9, plain)
    sgd_ts = np.linspace(0, t_sgd, 41)
    sgd = [sgd_part(model, data, p0, t_sgd, sgd_ts, lr, 16, seeds) for lr in sgd_lrs]
    at_001 = next(r for r in gd["rows"] if r["lr"] == 0.01)
    targets = {
        "GD distance to the plain flow ~ lr (slope ~ 1)": gd["slope_plain"],
        "GD distance to ModifiedGD ~ lr^2 (slope >= 1.8)": gd["slope_modified"],
        "ModifiedGD closer at lr 0.01 (>= 10x)": (
            at_001["to_plain"] / at_001["to_modified"]
        ),
        "HeavyBall closer than the plain flow at every lr (>= 20x)": hb["min_ratio"],
    }
    for r in sgd:
        targets[
            f"SGD lr {r['lr']}: means within 3 SE and stds within 1.5x "
            "(>= 90% of save times)"
        ] = r["share_both"]
    print("targets:")
    for name, value in targets.items():
        print(f"  {name}: {value:.3g}")
    name = "optimizer_flows" + ("_quick" if args.quick else "")
    payload = dict(
        model=f"MLP 64-{width}-{width}-10 tanh",
        n_examples=n,
        gradient_descent=gd,
        heavy_ball=hb,
        sgd=sgd,
        targets=targets,
        wall_s=time.perf_counter() - start,
        quick=args.quick,
    )
    print(f"wrote {write_results(name, payload, args.results)}")
    figures = pathlib.Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / f"{name}_{jax.default_backend()}.png"
    figure(gd, hb, sgd, path)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(main() is None)
