"""Optimisers at the edge of stability: rod, stable and central flows against the
optimisers' own iterates (float64).

Measured, in one run:

1. **Edges.** For each optimiser of `gflow.optimizers`, on ½x² with its
   preconditioner frozen (ε = 1e4 ≫ √v̂ for the adaptive methods), the largest
   lr/P whose optax steps do not grow over 3,000 steps, found by bisection to
   1e-4, against `stability_limit()` (2 for GD, 2(1 + β)/(1 + 2β) for Nesterov,
   2(1 + b1)/(1 − b1) for Adam, ...).
2. **Gradient descent: rod flow against the central flow** on the two networks
   of benchmarks/central_flows.py (the central flows authors' example, swish MLP
   8-16-16-1, lr 0.1; a tanh MLP 64-32-1 on 500 digits, lr 0.065), 1,000 steps
   from the same start: after the edge (the first save where the central flow's
   Σ ≠ 0), the median over saves of ‖GD midpoint − flow‖ / ‖GD midpoint −
   gradient flow‖, GD's midpoints being (θ_{k−1} + 2θ_k + θ_{k+1})/4; the
   predicted loss (the mean loss of the rod's ends; the central flow's L + ½ tr
   ΣH) against GD's loss smoothed over 50 steps; wall times, cold (first call,
   compiling, cache off) and warm.
3. **Adaptive methods: rod flow against the stable flow.** Adam (lr 1e-3),
   RMSProp (lr 2e-3, b2 0.99, ε outside the root) and heavy ball (lr 0.1,
   β 0.9) on two networks (a swish MLP 10-24-24-1 on sklearn's diabetes data,
   standardised; the digits MLP above), 2,000 steps from the same start: the
   preconditioned sharpness λ_max(P⁻¹H) along each flow against the edge, the
   edge (the first save where the stable flow's reaches it), and after it the
   median of ‖midpoint − rod‖ / ‖midpoint − stable flow‖ (over the saves where
   the stable flow still runs: past the edge it may stall, stiff).
4. **Adam's stable flow is first order**: its distance to optax's Adam at t =
   0.2 (200 steps at lr 1e-3) for lr, lr/2, lr/4 on the diabetes MLP.

    pip install -e ".[bench]"
    python benchmarks/optimizer_edges.py          # about 20 minutes on the 2-core CPU
    python benchmarks/optimizer_edges.py --quick  # small and short, for the tests

Writes benchmarks/results/optimizer_edges_<backend>.json, and the table the docs
show (docs/optimizer-edges.md) from it, optimizer_edges_<backend>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

# Cold means compiling: gflow's persistent compilation cache stays off.
os.environ["GFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter1d  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _tables  # noqa: E402
from _common import RESULTS, flat_rows, timed_twice, write_results  # noqa: E402
from central_flows import (  # noqa: E402
    SMOOTHING,
    TRACK,
    digits,
    mlp,
    port_example,
)

import gflow  # noqa: E402
from gflow import optimizers  # noqa: E402

FROZEN = 1e4  # ε of the adaptive methods on the edge quadratic


def edges(steps=3000):
    """The largest stable lr/P of each optimiser on ½x², by bisection."""
    makers = {  # name: (optimiser of lr, its frozen preconditioner P)
        "GD": (lambda lr: optimizers.GD(lr), 1.0),
        "HeavyBall(0.9)": (lambda lr: optimizers.HeavyBall(lr, 0.9), 1.0),
        "Nesterov(0.9)": (lambda lr: optimizers.Nesterov(lr, 0.9), 1.0),
        "RMSProp": (
            lambda lr: optimizers.RMSProp(lr, 0.9, FROZEN, eps_in_sqrt=False),
            FROZEN,
        ),
        "Adam": (lambda lr: optimizers.Adam(lr, 0.9, 0.999, FROZEN), FROZEN),
        "NAdam(0.8)": (lambda lr: optimizers.NAdam(lr, 0.8, 0.999, FROZEN), FROZEN),
    }
    rows = {}
    for name, (make, scale) in makers.items():

        @jax.jit
        def grows(lr, make=make):
            # One program for every lr: the learning rate is traced.
            opt = eqx.tree_at(lambda o: (o.lr, o.base_lr), make(1.0), (lr, lr))
            transformation = opt.transformation()
            # From 1e-30, so that g² stays far below ε² (P frozen at ε) through
            # Adam's first, bias-corrected and much longer steps.
            x = jnp.asarray(1e-30)

            def step(carry, _):
                x, state = carry
                update, state = transformation.update(x, state)  # ∇(½x²) = x
                return (x + update, state), jnp.abs(x)

            carry = (x, transformation.init(x))
            sizes = jax.lax.scan(step, carry, None, length=steps)[1]
            third = steps // 3
            # Growing: on the rise at the end, or up by 1e20 (Adam's first steps
            # raise it by some 1e12 at most), where an adaptive method's own
            # preconditioner thaws and stops it.
            later, earlier = jnp.max(sizes[2 * third :]), jnp.max(sizes[third:-third])
            return ~jnp.isfinite(later) | (later > earlier) | (later > 1e-10)

        low, high = 0.5, 64.0  # lr/P: stable, unstable
        while high - low > 1e-4:
            middle = (low + high) / 2
            if bool(grows(middle * scale)):
                high = middle
            else:
                low = middle
        limit = float(make(1.0).stability_limit())
        rows[name] = {"measured": low, "formula": limit, "ratio": low / limit}
        print(f"  edge {name}: measured {low:.4f}, formula {limit:.4f}")
    return rows


def distance_ratio(midpoints, flow, reference, after):
    """Median over saves from `after` of ‖midpoint − flow‖ / ‖midpoint −
    reference‖ (rows of flattened parameters, midpoints shifted by one)."""
    rows = len(midpoints) + 2  # a flow that stopped early: NaN after it

    def padded(x):
        return np.concatenate([x, np.full((rows - len(x), x.shape[1]), np.nan)])

    to_flow = np.linalg.norm(midpoints - padded(flow)[1:-1], axis=1)
    to_reference = np.linalg.norm(midpoints - padded(reference)[1:-1], axis=1)
    ratio = to_flow / np.maximum(to_reference, 1e-300)
    keep = slice(max(after - 1, 0), None)
    finite = np.isfinite(ratio[keep])
    return float(np.median(ratio[keep][finite])), int(np.sum(finite))


def loss_gap(predicted, gd_loss, edge):
    """Median relative gap of a predicted loss to GD's smoothed loss, from the
    edge plus the smoothing's reach."""
    smoothed = gaussian_filter1d(np.asarray(gd_loss), SMOOTHING, mode="nearest")
    settled = slice(edge + 2 * SMOOTHING, None)
    gap = np.abs(np.asarray(predicted)[settled] - smoothed[settled])
    return float(np.median(gap / smoothed[settled]))


def gd_part(problem, steps):
    name, loss, p0, data, lr = problem()
    t_max, ts = steps * lr, np.arange(steps + 1) * lr
    gd = gflow.gradient_descent(loss, data, t_max, lr=lr, params0=p0, ts=ts)
    plain = flat_rows(gflow.simulate(loss, data, t_max, params0=p0, ts=ts).params)
    mid = flat_rows(gd.midpoints().params)
    row = {"lr": lr, "steps": steps}
    runs = {
        "central": gflow.flows.CentralFlow(lr, track=TRACK),
        "rod": gflow.flows.RodFlow(lr),
    }
    edge = None
    for kind, flow in runs.items():
        first, traj, cold, warm = timed_twice(
            lambda flow=flow: gflow.simulate(
                loss, data, t_max, params0=p0, ts=ts, flow=flow
            )
        )
        if kind == "central":
            oscillation = np.asarray(traj.metrics["oscillation"])
            edge = int(np.argmax(oscillation > 0))
        ratio, count = distance_ratio(mid, flat_rows(traj.params), plain, edge)
        row[kind] = {
            "cold_s": cold,
            "warm_s": warm,
            "grads": int(traj.stats["num_grad_evals"]),
            "hvps": int(traj.stats["num_hvp_evals"]),
            "median_distance_ratio": ratio,
            "predicted_loss_gap_median": loss_gap(
                traj.metrics["predicted_loss"], gd.loss, edge
            ),
        }
        print(
            f"  {name} {kind}: ratio {ratio:.3f} (after step {edge}, {count} saves), "
            f"warm {warm:.2f} s, cold {cold:.2f} s"
        )
    row["edge_step"] = edge
    row["rod_over_central_warm"] = row["rod"]["warm_s"] / row["central"]["warm_s"]
    # The rod restarted from GD's iterate at the edge, with half of GD's next
    # step as its half-vector: the oscillation as it is there.
    rest = gflow.simulate(
        loss, data, t_max - ts[edge], ts=ts[edge:] - ts[edge],
        params0=jax.tree.map(lambda x: x[edge], gd.params),
        flow=gflow.flows.RodFlow(lr, step0=edge),
    )  # fmt: skip
    before = np.full((edge, mid.shape[1]), np.nan)
    padded = np.concatenate([before, flat_rows(rest.params)])
    row["rod restarted at the edge"] = {
        "median_distance_ratio": distance_ratio(mid, padded, plain, edge)[0]
    }
    print(
        f"  {name} rod restarted at the edge: ratio "
        f"{row['rod restarted at the edge']['median_distance_ratio']:.3f}"
    )
    return name, row


def diabetes():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    loss, init = mlp([10, 24, 24, 1], jax.nn.swish)
    return (
        "diabetes",
        loss,
        init(jax.random.key(0)),
        (jnp.asarray(x), jnp.asarray(y[:, None])),
    )


def preconditioned_along(loss, data, opt, traj):
    """λ_max(P⁻¹H) / edge at every save of a run or flow (its own moments)."""
    values = gflow.metrics.preconditioned_sharpness_along(traj, loss, data, opt)
    return np.asarray(values) / float(opt.edge())


def adaptive_part(problem, opt, steps, max_steps):
    """An adaptive method's iterates against its rod and stable flows: from the
    start, and restarted from the iterates' state at the edge."""
    name, loss, p0, data = problem()
    lr = float(opt.base_lr)
    ts = np.arange(steps + 1) * lr
    run = gflow.gradient_descent(loss, data, ts[-1], optimizer=opt, params0=p0, ts=ts)
    mid = flat_rows(run.midpoints().params)
    sharp = {"iterates": preconditioned_along(loss, data, opt, run)}
    reached = np.flatnonzero(sharp["iterates"][1:] >= 1)  # (step 0: no history)
    edge = int(reached[0]) + 1 if reached.size else None
    row = {"lr": lr, "steps": steps, "edge_step": edge}
    starts = {"from the start": (0, p0, None)}
    if edge is not None:
        at = lambda tree: jax.tree.map(lambda x: x[edge], tree)  # noqa: E731
        starts["restarted at the edge"] = (edge, at(run.params), at(run.state))
    for start_name, (k, params0, moments0) in starts.items():
        trajs, seconds = {}, {}
        for kind in ("stable", "rod"):
            kinds = {"stable": gflow.flows.StableFlow, "rod": gflow.flows.RodFlow}
            flow = kinds[kind](opt, moments0=moments0, step0=k)
            begin = time.perf_counter()
            traj = gflow.simulate(
                loss, data, ts[-1] - ts[k], params0=params0, ts=ts[k:] - ts[k],
                flow=flow, throw=False, max_steps=max_steps,
            )  # fmt: skip
            seconds[kind] = time.perf_counter() - begin
            trajs[kind] = np.concatenate(
                [np.full((k, mid.shape[1]), np.nan), flat_rows(traj.params)]
            )
            if k == 0:
                sharp[kind] = preconditioned_along(loss, data, opt, traj)
            row.setdefault("results", {})[f"{kind} {start_name}"] = traj.result
        if edge is None:
            continue
        ratio, count = distance_ratio(mid, trajs["rod"], trajs["stable"], edge)
        row[start_name] = {
            "median_distance_ratio": ratio,
            "saves_compared": count,
            "seconds": seconds,
        }
    row["sharpness_over_edge"] = {
        k: {
            "max": float(np.nanmax(v[1:])),
            "median_after_edge": (
                None if edge is None else float(np.nanmedian(v[edge:]))
            ),
        }
        for k, v in sharp.items()
    }
    ratios = {
        k: row[k]["median_distance_ratio"]
        for k in ("from the start", "restarted at the edge")
        if k in row
    }
    medians = {k: v["median_after_edge"] for k, v in row["sharpness_over_edge"].items()}
    print(
        f"  {name} {type(opt).__name__}: edge at step {edge}; rod/stable {ratios}; "
        f"λ(P⁻¹H)/edge after it {medians}"
    )
    return row


def adam_scaling(lrs, t_max):
    name, loss, p0, data = diabetes()
    rows = []
    for lr in lrs:
        opt = optimizers.Adam(lr)
        ts = np.arange(int(round(t_max / lr)) + 1) * lr
        run = gflow.gradient_descent(
            loss, data, ts[-1], optimizer=opt, params0=p0, ts=ts
        )
        flow = gflow.simulate(
            loss, data, ts[-1], params0=p0, ts=ts, flow=gflow.flows.StableFlow(opt),
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip
        gap = flat_rows(run.params)[-1] - flat_rows(flow.params)[-1]
        d = float(np.linalg.norm(gap))
        rows.append({"lr": lr, "distance": d})
        print(f"  Adam lr {lr:g}: stable flow {d:.3e} from Adam at t = {t_max}")
    return {
        "rows": rows,
        "quarter_lr_ratio": rows[-1]["distance"] / rows[0]["distance"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short")
    parser.add_argument("--results", default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    gd_steps, adaptive_steps = (200, 300) if args.quick else (1000, 2000)
    start = time.perf_counter()
    print("edges on ½x²:")
    edge_rows = edges(300 if args.quick else 3000)
    print("gradient descent, rod flow against the central flow:")
    # --quick: one network each, and a stalling stable flow cut short.
    gd_problems = (digits,) if args.quick else (port_example, digits)
    gd = dict(gd_part(p, gd_steps) for p in gd_problems)
    print("adaptive methods, rod flow against the stable flow:")

    def digits_problem():
        name, loss, p0, data, _ = digits()
        return name, loss, p0, data

    adaptive = {}
    max_steps = 5_000 if args.quick else 100_000
    for problem in (diabetes,) if args.quick else (diabetes, digits_problem):
        for opt in (
            optimizers.Adam(1e-3),
            optimizers.RMSProp(2e-3, 0.99, eps_in_sqrt=False),
            optimizers.HeavyBall(0.1, 0.9),
        ):
            key = f"{problem()[0]} {type(opt).__name__}"
            adaptive[key] = adaptive_part(problem, opt, adaptive_steps, max_steps)
    print("Adam's stable flow against lr:")
    scaling = adam_scaling([1e-3, 5e-4, 2.5e-4], 0.05 if args.quick else 0.2)
    targets = {
        "each optimiser's measured edge / formula (within 1e-3)": {
            k: r["ratio"] for k, r in edge_rows.items()
        },
        "GD rod flow: median distance ratio after the edge (<= 0.2)": {
            k: r["rod"]["median_distance_ratio"] for k, r in gd.items()
        },
        "GD rod flow restarted at the edge: median distance ratio (<= 0.2)": {
            k: r["rod restarted at the edge"]["median_distance_ratio"]
            for k, r in gd.items()
        },
        "GD rod flow: warm time / central flow's (<= 0.5)": {
            k: r["rod_over_central_warm"] for k, r in gd.items()
        },
        "adaptive rod flows: median distance ratio to the stable flow's (<= 0.5)": {
            f"{k}, {start}": r[start]["median_distance_ratio"]
            for k, r in adaptive.items()
            for start in ("from the start", "restarted at the edge")
            if start in r
        },
        "Adam stable flow: distance at lr/4 over at lr (<= 0.35)": scaling[
            "quarter_lr_ratio"
        ],
    }
    print("targets:")
    for target, value in targets.items():
        print(f"  {target}: {value}")
    name = "optimizer_edges" + ("_quick" if args.quick else "")
    payload = dict(
        edges=edge_rows,
        gradient_descent=gd,
        adaptive=adaptive,
        adam_stable_scaling=scaling,
        targets=targets,
        wall_s=time.perf_counter() - start,
        quick=args.quick,
    )
    path = write_results(name, payload, args.results)
    print(f"wrote {path}")
    written = json.loads(path.read_text())
    path.with_suffix(".md").write_text(_tables.optimizer_edges(written))
    print(f"wrote {path.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    sys.exit(main() is None)
