"""Stiff gradient flows: a network that sharpens as it trains, and the solvers for it.

An equinox MLP 64 -> 128 -> 128 -> 10 (tanh) fits the first 1,000 images of
scikit-learn's digits (pixels / 16) with the squared error on one-hot labels
(0.5 * mean over examples of the error summed over classes), in float64, to
t = 1000. Its top Hessian eigenvalue grows along the flow (progressive sharpening),
so explicit Runge-Kutta methods end up stability-bound.

Measured, in one run:

0. first, back to back, the runs the targets compare: Tsit5 and auto at gflow's
   defaults, and gradient descent at lr 0.01 and 0.03;
1. sharpness along a tight reference flow (Dopri8, rtol 1e-11);
2. work-precision: the largest relative parameter distance to the reference over
   31 log-spaced save times, against gradient-equivalents (gradients + 2 x
   Hessian-vector products) and run time, for Tsit5, Dopri8, RKC2, ROCK4 and auto at
   rtol 1e-4, 1e-6 and 1e-8, and gradient descent at lr 0.01 and 0.03;
3. the targets: auto at its default tolerances against Tsit5 at its defaults and
   against GD at lr 0.01;
4. auto against Tsit5 on the three papers' flows (gradient evaluations), and the
   largest step count of a member of the 100 x 100 Markov canonical basin grid.

    pip install -e ".[bench]"
    python benchmarks/stiff.py            # about 1.5 hours on the 2-core CPU
    python benchmarks/stiff.py --quick    # 200 images, t = 30, for the test suite

Writes benchmarks/results/stiff_<backend>.json and docs/figures/stiff_<backend>.png.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import FIGURES, RESULTS, write_results  # noqa: E402

import gflow  # noqa: E402
from gflow import models  # noqa: E402


def digits_problem(n_examples=1000):
    """The MLP (an equinox Module: gflow trains its floating-point leaves), the
    squared-error loss and the data."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    data = (
        jnp.asarray(x[:n_examples] / 16.0),
        jax.nn.one_hot(jnp.asarray(labels[:n_examples]), 10, dtype=jnp.float64),
    )
    mlp = eqx.nn.MLP(64, 10, 128, 2, activation=jnp.tanh, key=jax.random.key(0))
    mlp = jax.tree.map(
        lambda leaf: leaf.astype(jnp.float64) if eqx.is_inexact_array(leaf) else leaf,
        mlp,
    )

    def loss(model, data):
        x, y = data
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1))

    return mlp, loss, data


def row(name, family, label, traj, ref):
    geq = traj.stats["num_grad_evals"] + 2 * traj.stats["num_hvp_evals"]
    error = gflow.compare(ref, traj).max_param_distance if traj.succeeded else np.inf
    stats = traj.stats
    print(
        f"  {name:<24} error {error:9.2e}  gradient-equivalents {geq:>8,}  "
        f"run {stats['run_time_s']:8.2f} s  compile {stats['compile_time_s']:5.1f} s",
        flush=True,
    )
    return dict(
        method=name,
        family=family,
        label=label,
        error=float(error),
        grad_evals=int(geq),
        num_grad_evals=int(stats["num_grad_evals"]),
        num_hvp_evals=int(stats["num_hvp_evals"]),
        num_steps=int(stats["num_steps"]),
        run_time_s=float(stats["run_time_s"]),
        compile_time_s=float(stats["compile_time_s"]),
    )


def save_grid(t_max, lrs):
    """31 log-spaced save times rounded to whole steps of every learning rate, so
    that gradient descent saves at the same times as the flows (but the last)."""
    step = max(lrs)
    assert all(abs(step / lr - round(step / lr)) < 1e-9 for lr in lrs)
    ts = np.unique(np.round(gflow.save_times(t_max, 31) / step) * step)
    ts[-1] = t_max  # the flows end at t_max; GD shares every save time before it
    return ts


def work_precision(mlp, loss, data, t_max, solvers, rtols, lrs):
    ts = save_grid(t_max, lrs)
    kwargs = dict(params0=mlp, ts=ts, max_steps=10**7)
    # The runs the targets compare come first, back to back: Tsit5 and auto at
    # gflow's defaults, and gradient descent.
    first = {}
    for solver in ("tsit5", "auto"):
        first[solver] = gflow.simulate(loss, data, t_max, solver=solver, **kwargs)
    for lr in lrs:
        first[lr] = gflow.gradient_descent(
            loss, data, t_max, lr, params0=mlp, ts=ts, throw=False
        )
    start = time.perf_counter()
    ref = gflow.simulate(
        loss, data, t_max, solver="dopri8", rtol=1e-11, atol=1e-13, **kwargs
    )
    print(
        f"reference: Dopri8 rtol 1e-11, {ref.stats['num_steps']} steps, "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    defaults = {}
    for solver in ("tsit5", "auto"):
        traj = first[solver]
        defaults[solver] = row(f"{solver} (defaults)", solver, "", traj, ref)
        defaults[solver]["tolerances"] = (traj.meta["rtol"], traj.meta["atol"])
    rows = []
    for solver in solvers:
        for rtol in rtols:
            label = f"rtol {rtol:g}"
            # A sweep point with the defaults' tolerances (atol = rtol / 100 at
            # rtol 1e-6) is the same run, not repeated.
            if defaults.get(solver, {}).get("tolerances") == (rtol, rtol * 1e-2):
                rows.append(
                    dict(
                        defaults[solver], method=f"{solver} rtol={rtol:g}", label=label
                    )
                )
                continue
            traj = gflow.simulate(
                loss,
                data,
                t_max,
                solver=solver,
                rtol=rtol,
                atol=rtol * 1e-2,
                throw=False,
                **kwargs,
            )
            rows.append(row(f"{solver} rtol={rtol:g}", solver, label, traj, ref))
    for lr in lrs:
        rows.append(
            row(f"GD lr={lr:g}", "gradient descent", f"lr {lr:g}", first[lr], ref)
        )
    return ref, rows, defaults


def targets(defaults, rows):
    auto, tsit5 = defaults["auto"], defaults["tsit5"]
    gd = next(r for r in rows if r["method"] == "GD lr=0.01")
    out = {
        "auto_error": auto["error"],
        "auto_error_at_most_1e-5": auto["error"] <= 1e-5,
        "gradient_equivalents_tsit5_over_auto": tsit5["grad_evals"]
        / auto["grad_evals"],
        "run_time_tsit5_over_auto": tsit5["run_time_s"] / auto["run_time_s"],
        "run_time_gd_lr_0.01_over_auto": gd["run_time_s"] / auto["run_time_s"],
    }
    for key, value in out.items():
        print(f"  {key:<40} {value}")
    return out


def papers(quick):
    """Auto against Tsit5 on the papers' flows: their gradient evaluations."""
    key = jax.random.key(0)
    cases = {
        "co-occurrence": (
            models.CooccurrenceTransformer(d=64, L=5, m=128, m1=256),
            models.cooccurrence_data(key, n=60, L=5, d=64),
            30.0 if quick else 300.0,
        ),
        "Markov transformer": (
            models.MarkovTransformer(d=8, seq_len=16, init="makkuva"),
            models.markov_data(key, 0.5, 0.8, n_seqs=128, seq_len=16),
            60.0 if quick else 600.0,
        ),
        "condensation": (
            models.CondensationTransformer(d_m=8, s=10, eps=1e-3),
            models.anchor_data(key, n=64, d_m=8),
            1200.0 if quick else 12000.0,
        ),
    }
    out = {}
    for name, (model, data, t_max) in cases.items():
        evals = {}
        for solver in ("tsit5", "auto"):
            traj = gflow.simulate(
                model, data, t_max, key=1, solver=solver, max_steps=10**6
            )
            evals[solver] = (
                traj.stats["num_grad_evals"] + 2 * traj.stats["num_hvp_evals"]
            )
        out[name] = dict(evals, t_max=t_max, ratio=evals["auto"] / evals["tsit5"])
        label = f"{name} (t = {t_max:g})"
        print(
            f"  {label:<30} Tsit5 {evals['tsit5']:>7,}  auto {evals['auto']:>7,}  "
            f"ratio {out[name]['ratio']:.3f}",
            flush=True,
        )
    return out


def markov_grid(n):
    """The largest per-member step count on the canonical Markov basin grid."""
    model = models.MarkovCanonical(0.5, 0.8)
    axis = jnp.linspace(-2.0, 2.0, n)
    params0 = gflow.grid({"e": axis, "w": axis})
    out = {}
    for solver in ("tsit5", "auto"):
        ens = gflow.simulate_ensemble(
            model, None, 2000.0, params0=params0, save="final", solver=solver
        )
        steps = ens.stats["num_steps"]
        out[solver] = dict(
            max_steps=int(steps.max()),
            mean_steps=float(steps.mean()),
            wall_time_s=ens.stats["wall_time_s"],
        )
        print(
            f"  Markov {n}x{n} grid, {solver}: largest member {steps.max():,} steps, "
            f"mean {steps.mean():.0f}",
            flush=True,
        )
    return out


def figure(ts, sharpness, rows, path):
    fig, (ax_s, ax_g, ax_t) = plt.subplots(1, 3, figsize=(17, 5.2))
    gflow.plot.series(ts, sharpness, ax=ax_s, color="k", lw=2.5)
    ax_s.set(
        ylabel="top Hessian eigenvalue λ_max", title="(a) sharpening along the flow"
    )
    ax_s.grid(True, which="both", alpha=0.3)
    gflow.plot.work_precision(rows, ax=ax_g, title="(b) error against work")
    ax_g.set_xlabel("gradient-equivalents (gradients + 2 × Hessian-vector products)")
    gflow.plot.work_precision(
        rows, ax=ax_t, work="run_time_s", title="(c) error against run time"
    )
    fig.suptitle(
        "Digits MLP (64-128-128-10, tanh, 1,000 images), gradient flow to "
        f"t = {ts[-1]:g}, float64",
        fontsize=13,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rows_from_log(path):
    """The work-precision rows a run printed (its lines `  name  error E
    gradient-equivalents N  run T s ...`), for a run that printed them but stopped
    before writing its JSON."""
    pattern = re.compile(
        r"^  (\S+ (?:rtol|lr)=\S+|\S+ \(defaults\))\s+error\s+(\S+)\s+"
        r"gradient-equivalents\s+([\d,]+)\s+run\s+(\S+) s"
    )
    rows = []
    for line in pathlib.Path(path).read_text().splitlines():
        match = pattern.match(line)
        if not match:
            continue
        name, error, work, run = match.groups()
        # The defaults (rtol 1e-6, atol 1e-8) are the sweep's rtol 1e-6 point.
        name = name.replace("(defaults)", "rtol=1e-06")
        family, setting = name.split(" ")
        family = "gradient descent" if family == "GD" else family
        label = setting.replace("=", " ")
        rows.append(
            dict(
                method=name,
                family=family,
                label=label,
                error=float(error),
                grad_evals=int(work.replace(",", "")),
                run_time_s=float(run),
            )
        )
    # In sweep order (the defaults' lines come first in the log): loose to tight.
    families = list(dict.fromkeys(row["family"] for row in rows))
    return sorted(
        rows,
        key=lambda row: (
            families.index(row["family"]),
            -float(row["label"].split()[1]),
        ),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="t = 30, small grids")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    parser.add_argument("--figures", default=str(FIGURES), help="figure folder")
    parser.add_argument(
        "--rows-from",
        help="a log of a run that printed its "
        "work-precision rows but stopped before writing them: run "
        "only the rest (sharpness, papers, grid) and plot those rows",
    )
    args = parser.parse_args(argv)
    if args.rows_from:
        return finish(args)
    if args.quick:
        t_max, n_examples, rtols = 30.0, 200, (1e-4, 1e-6)
        solvers = ("tsit5", "rkc2", "rock4", "auto")
    else:
        t_max, n_examples, rtols = 1000.0, 1000, (1e-4, 1e-6, 1e-8)
        solvers = ("tsit5", "dopri8", "rkc2", "rock4", "auto")
    mlp, loss, data = digits_problem(n_examples)
    print(f"digits MLP ({n_examples} images) to t = {t_max:g}", flush=True)
    ref, rows, defaults = work_precision(
        mlp, loss, data, t_max, solvers, rtols, (0.01, 0.03)
    )
    sharpness = np.asarray(gflow.metrics.sharpness_along(ref, loss, data, iters=40))
    print(f"  λ_max from {sharpness[0]:.1f} to {sharpness[-1]:.1f}", flush=True)
    result = dict(
        t_max=t_max,
        sharpness=dict(ts=np.asarray(ref.ts).tolist(), values=sharpness.tolist()),
        rows=rows,
        defaults=defaults,
        targets=targets(defaults, rows),
        papers=papers(args.quick),
        markov_grid=markov_grid(12 if args.quick else 100),
    )
    name = "stiff_quick" if args.quick else "stiff"
    path = write_results(name, result, args.results)
    png = pathlib.Path(args.figures) / f"{name}_{jax.default_backend()}.png"
    figure(np.asarray(ref.ts), sharpness, rows, png)
    print(f"wrote {path} and {png}")
    return result


def finish(args):
    """Sharpness along an accurate flow (auto at rtol 1e-8), the papers' flows and
    the Markov grid; the work-precision figure from the rows of `args.rows_from`."""
    mlp, loss, data = digits_problem(1000)
    ts = save_grid(1000.0, (0.01, 0.03))
    flow = gflow.simulate(
        loss, data, 1000.0, params0=mlp, rtol=1e-8, atol=1e-10, ts=ts, max_steps=10**7
    )
    sharpness = np.asarray(gflow.metrics.sharpness_along(flow, loss, data, iters=40))
    print(f"  λ_max from {sharpness[0]:.1f} to {sharpness[-1]:.1f}", flush=True)
    rows = rows_from_log(args.rows_from)
    result = dict(
        t_max=1000.0,
        rows_from=str(args.rows_from),
        sharpness=dict(ts=np.asarray(flow.ts).tolist(), values=sharpness.tolist()),
        rows=rows,
        papers=papers(False),
        markov_grid=markov_grid(100),
    )
    path = write_results("stiff_finish", result, args.results)
    png = pathlib.Path(args.figures) / f"stiff_{jax.default_backend()}.png"
    figure(np.asarray(flow.ts), sharpness, rows, png)
    print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()
