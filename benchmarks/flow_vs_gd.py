"""Work-precision: gflow against gradient descent and peer stepping rules.

For each problem a tight float64 flow (Dopri8, rtol 1e-12) is the reference. Every
method produces the parameters at the same save times (multiples of 0.3, so that
every GD learning rate below lands on them exactly); its trajectory error is the
largest relative parameter distance to the reference over those times. We report
that error, the gradient evaluations spent stepping, and the run time: each method
runs once first (compiling), then the median of three timed runs (one timed run
for those over 10 s), all in one run.

Methods:
* gflow.simulate with Tsit5, Dopri5, Dopri8 at rtol 1e-4, 1e-6 (default), 1e-8;
* gradient descent (gflow.gradient_descent) at lr 0.1, 0.03, 0.01, 0.003;
* fixed-step RK4 with dt = 1 / λ_max, λ_max re-estimated every 10 steps by 10
  Hessian-vector-product power iterations (the edge-of-stability papers' flow);
  each HVP is counted as 2 gradient evaluations;
* adaptive Euler: a step is accepted when consecutive gradients agree
  (cosine > 0.99) and then grows by 1.2x, else it is halved;
* scipy.integrate.solve_ivp (RK45, DOP853) on the flattened parameters with a
  jitted gradient, at rtol 1e-6 and 1e-8.

Problems: the co-occurrence transformer at Yang et al.'s scale (n = 60, L = 5,
d = 64, m = 128, m1 = 256, t = 300: their 30,000 GD steps at lr 0.01) and the Markov
transformer (d = 8, 256 sequences of length 16, proposed init, t = 60).

Run:  python benchmarks/flow_vs_gd.py [--problems cooccurrence markov] [--quick]
Writes benchmarks/results/flow_vs_gd_<backend>.json and
docs/figures/flow_vs_gd_<backend>.png (work-precision plot).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import scipy.integrate  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import (  # noqa: E402
    FIGURES,
    RESULTS,
    reference_flow,
    timed,
    trajectory_seconds,
    write_results,
)

import gflow  # noqa: E402
from gflow.models import (  # noqa: E402
    CooccurrenceTransformer,
    MarkovTransformer,
    cooccurrence_data,
    markov_data,
)

SAVE_UNIT = 0.3  # a multiple of every GD learning rate used here


def problem(name):
    if name == "quadratic":  # a tiny problem with a known flow, for the test suite
        data = {"x": 4 * jnp.diag(jnp.linspace(0.2, 1.0, 8)), "y": jnp.ones(8)}
        params0 = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.array(0.5)}
        return gflow.models.LinearRegression(n_features=8), data, params0, 30.0
    if name == "cooccurrence":
        model = CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
        data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
        return model, data, model.init(jax.random.key(1)), 300.0
    if name == "markov":
        model = MarkovTransformer(d=8, seq_len=16, init="makkuva")
        data = markov_data(jax.random.key(0), 0.5, 0.8, n_seqs=256, seq_len=16)
        return model, data, model.init(jax.random.key(2)), 60.0
    raise ValueError(name)


def save_grid(t_max, n=31):
    steps = np.unique(np.rint(np.geomspace(1, t_max / SAVE_UNIT, n)))
    return np.concatenate([[0.0], steps * SAVE_UNIT])


def flat_trajectory(traj):
    return np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(traj.params))


# --- peer stepping rules, written as a researcher would, but compiled ---------------


def rk4_sharpness(grad, x0, ts, refresh=10, power_iters=10):
    """RK4 with dt = 1/λ_max; λ_max by power iteration on HVPs every `refresh` steps."""

    def hvp(x, v):
        return jax.jvp(grad, (x,), (v,))[1]

    def sharpness(x, v):
        v = jax.lax.fori_loop(
            0,
            power_iters,
            lambda _, v: (lambda w: w / jnp.linalg.norm(w))(hvp(x, v)),
            v,
        )
        return v, v @ hvp(x, v)

    def cond(state):
        return state["save"] < len(ts)

    def body(s):
        v, lam = jax.lax.cond(
            s["steps"] % refresh == 0,
            lambda: sharpness(s["x"], s["v"]),
            lambda: (s["v"], s["lam"]),
        )
        hvps = s["hvps"] + jnp.where(s["steps"] % refresh == 0, power_iters + 1, 0)
        target = ts[s["save"]]
        dt = jnp.minimum(1.0 / jnp.abs(lam), target - s["t"])
        x = s["x"]
        k1 = -grad(x)
        k2 = -grad(x + dt / 2 * k1)
        k3 = -grad(x + dt / 2 * k2)
        k4 = -grad(x + dt * k3)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = s["t"] + dt
        hit = dt >= target - s["t"]
        saved = jnp.where(hit, s["saved"].at[s["save"]].set(x), s["saved"])
        return dict(
            x=x,
            t=jnp.where(hit, target, t),
            v=v,
            lam=lam,
            steps=s["steps"] + 1,
            hvps=hvps,
            save=s["save"] + hit,
            saved=saved,
        )

    saved = jnp.zeros((len(ts), x0.size), x0.dtype).at[0].set(x0)
    v0 = jnp.ones_like(x0) / jnp.sqrt(x0.size)
    state = dict(
        x=x0,
        t=jnp.asarray(0.0, x0.dtype),
        v=v0,
        lam=jnp.asarray(1.0, x0.dtype),
        steps=0,
        hvps=0,
        save=1,
        saved=saved,
    )
    out = jax.lax.while_loop(cond, body, state)
    return out["saved"], 4 * out["steps"] + 2 * out["hvps"]


def adaptive_euler(grad, x0, ts, dt0=1e-3, agree=0.99, grow=1.2, max_iters=2_000_000):
    """Euler steps accepted while consecutive gradients agree (cosine > `agree`)."""

    def cond(s):
        return (s["save"] < len(ts)) & (s["iters"] < max_iters)

    def body(s):
        target = ts[s["save"]]
        step = jnp.minimum(s["dt"], target - s["t"])
        x_new = s["x"] - step * s["g"]
        g_new = grad(x_new)
        cosine = g_new @ s["g"] / (jnp.linalg.norm(g_new) * jnp.linalg.norm(s["g"]))
        accept = cosine > agree
        hit = accept & (step >= target - s["t"])
        x = jnp.where(accept, x_new, s["x"])
        saved = jnp.where(hit, s["saved"].at[s["save"]].set(x), s["saved"])
        return dict(
            x=x,
            g=jnp.where(accept, g_new, s["g"]),
            t=jnp.where(hit, target, jnp.where(accept, s["t"] + step, s["t"])),
            dt=jnp.where(accept, s["dt"] * grow, s["dt"] / 2),
            save=s["save"] + hit,
            saved=saved,
            iters=s["iters"] + 1,
        )

    saved = jnp.zeros((len(ts), x0.size), x0.dtype).at[0].set(x0)
    state = dict(
        x=x0,
        g=grad(x0),
        t=jnp.asarray(0.0, x0.dtype),
        dt=jnp.asarray(dt0, x0.dtype),
        save=1,
        saved=saved,
        iters=0,
    )
    out = jax.lax.while_loop(cond, body, state)
    return out["saved"], out["iters"] + 1


def run_problem(name, quick):
    model, data, params0, t_max = problem(name)
    if quick:
        t_max = 30.0
    ts = save_grid(t_max)
    flat0, unravel = ravel_pytree(params0)

    def flat_loss(x, data):
        return model.loss(unravel(x), data)

    grad = jax.jit(jax.grad(flat_loss))
    reference = reference_flow(model, data, t_max, params0, ts)
    ref = flat_trajectory(reference)
    ref_norm = np.linalg.norm(ref, axis=1)

    def error(flat):
        return float(np.max(np.linalg.norm(flat - ref, axis=1) / ref_norm))

    rows = []

    def add(method, family, flat, evals, seconds, compile_s=None):
        rows.append(
            dict(
                method=method,
                family=family,
                # What tells the family's points apart, written beside each.
                label=method.removeprefix(family).strip().replace("=", " "),
                error=error(flat),
                grad_evals=int(evals),
                run_time_s=seconds,
                compile_time_s=compile_s,
            )
        )
        r = rows[-1]
        print(
            f"  {method:<26} error {r['error']:9.2e}  grad evals {r['grad_evals']:>9,}"
            f"  run {seconds:8.3f} s",
            flush=True,
        )

    print(
        f"{name}: t_max = {t_max}, {flat0.size:,} parameters, reference "
        f"{reference.stats['num_steps']} Dopri8 steps",
        flush=True,
    )
    for solver in ("tsit5", "dopri5", "dopri8"):
        for rtol in (1e-4, 1e-6, 1e-8):
            run = functools.partial(
                gflow.simulate,
                model,
                data,
                t_max,
                params0=params0,
                ts=ts,
                solver=solver,
                rtol=rtol,
                atol=rtol * 1e-2,
            )
            first, traj, seconds = timed(run, trajectory_seconds, slow_s=10.0)
            add(
                f"gflow {solver} rtol={rtol:g}",
                f"gflow {solver}",
                flat_trajectory(traj),
                traj.stats["num_solver_grad_evals"],
                seconds,
                first.stats["compile_time_s"],
            )
    for lr in (0.1, 0.03) if quick else (0.1, 0.03, 0.01, 0.003):
        run = functools.partial(
            gflow.gradient_descent,
            model,
            data,
            t_max,
            lr,
            params0=params0,
            ts=ts,
            throw=False,
        )
        first, gd, seconds = timed(run, trajectory_seconds, slow_s=10.0)
        flat = flat_trajectory(gd)
        if len(gd) < len(ts):  # diverged: infinite error
            flat = np.full_like(ref, np.inf)
        add(
            f"GD lr={lr:g}",
            "gradient descent",
            flat,
            gd.stats["num_steps"],
            seconds,
            first.stats["compile_time_s"],
        )

    ts_j = jnp.asarray(ts)
    rk4 = jax.jit(lambda x0, d: rk4_sharpness(lambda x: grad(x, d), x0, ts_j))
    _, (flat, evals), seconds = timed(lambda: rk4(flat0, data), slow_s=10.0)
    add("RK4 dt=1/λmax", "RK4 dt=1/λmax", np.asarray(flat), evals, seconds)
    euler = jax.jit(lambda x0, d: adaptive_euler(lambda x: grad(x, d), x0, ts_j))
    _, (flat, evals), seconds = timed(lambda: euler(flat0, data), slow_s=10.0)
    add("adaptive Euler", "adaptive Euler", np.asarray(flat), evals, seconds)

    def rhs(t, y):
        return -np.asarray(grad(jnp.asarray(y), data))

    grad(flat0, data).block_until_ready()
    for method in ("RK45", "DOP853"):
        for rtol in (1e-6, 1e-8):
            solve = functools.partial(
                scipy.integrate.solve_ivp,
                rhs,
                (0.0, t_max),
                np.asarray(flat0),
                method=method,
                t_eval=ts,
                rtol=rtol,
                atol=rtol * 1e-2,
            )
            _, sol, seconds = timed(solve, slow_s=10.0)
            add(
                f"scipy {method} rtol={rtol:g}",
                f"scipy {method}",
                sol.y.T,
                sol.nfev,
                seconds,
            )
    return dict(
        t_max=t_max,
        parameters=int(flat0.size),
        save_times=len(ts),
        reference_steps=reference.stats["num_steps"],
        rows=rows,
    )


def plot(results, path):
    fig, axes = plt.subplots(
        1, len(results), figsize=(7.5 * len(results), 5.5), squeeze=False
    )
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        gflow.plot.work_precision(
            result["rows"], ax=ax, title=f"{name} (t = {result['t_max']:g})"
        )
    fig.suptitle(
        "Work–precision: error against a tight float64 flow (lower left is better)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["cooccurrence", "markov"])
    parser.add_argument("--quick", action="store_true", help="t = 30, two GD rates")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    parser.add_argument("--figures", default=str(FIGURES), help="figure folder")
    args = parser.parse_args(argv)
    results = {name: run_problem(name, args.quick) for name in args.problems}
    payload = {"quick": args.quick, "problems": results}
    path = write_results("flow_vs_gd", payload, args.results)
    png = pathlib.Path(args.figures) / f"flow_vs_gd_{jax.default_backend()}.png"
    plot(results, png)
    print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
