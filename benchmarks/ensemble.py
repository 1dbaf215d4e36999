"""Ensembles: gflow.simulate_ensemble against the straightforward vmapped solve.

1. A grid of the canonical Markov (e, w) plane (p = 0.5, q = 0.8), each flow to
   t = 2000 at rtol 1e-6 in float64, each point labelled local/global by its final
   loss. The straightforward way, `jax.jit(jax.vmap(diffeqsolve))`, runs every
   member until the slowest is done. gflow stops each member once its limit is
   certain (loss within 1e-4 of the global minimum: the loss never increases along
   the flow; or gradient norm 1e-8) and shrinks the batch around the rest. Both
   are timed cold (compile included) and warm, in the same run, and must label
   every point the same.
2. Members per second against the ensemble size (random points of the plane).

    python benchmarks/ensemble.py            # 100 x 100 grid, sizes 64 ... 40,000
    python benchmarks/ensemble.py --quick    # small, for the test suite
"""

from __future__ import annotations

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from _common import RESULTS, write_results

import gflow
from gflow.models import MarkovCanonical, markov_reference_losses

P, Q, T_MAX, RTOL, ATOL = 0.5, 0.8, 2000.0, 1e-6, 1e-8


def naive_solver(model):
    """The straightforward batched solve: one vmapped diffeqsolve to T_MAX."""
    grad = jax.grad(model.loss)

    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, grad(y))),
            diffrax.Tsit5(),
            0.0,
            T_MAX,
            None,
            y0,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=10**6,
        )
        final = jax.tree.map(lambda y: y[-1], sol.ys)
        return model.loss(final), sol.stats["num_steps"]

    return jax.jit(jax.vmap(solve))


def gflow_ensemble(model, params0):
    _, bigram = markov_reference_losses(P, Q)
    return gflow.simulate_ensemble(model, None, T_MAX, params0=params0, save="final",
                                   rtol=RTOL, atol=ATOL, stop_at_loss=bigram + 1e-4,
                                   stop_at_grad_norm=1e-8)  # fmt: skip


def label(final_loss):
    local, bigram = markov_reference_losses(P, Q)
    final_loss = np.asarray(final_loss)
    return np.abs(final_loss - bigram) < np.abs(final_loss - local)  # True: global


def grid_race(n: int) -> dict:
    model = MarkovCanonical(P, Q)
    axis = jnp.linspace(-2.0, 2.0, n)
    params0 = gflow.grid({"e": axis, "w": axis})
    naive = naive_solver(model)

    start = time.perf_counter()
    loss, steps = jax.block_until_ready(naive(params0))
    naive_cold = time.perf_counter() - start
    start = time.perf_counter()
    loss, steps = jax.block_until_ready(naive(params0))
    naive_warm = time.perf_counter() - start

    cold = gflow_ensemble(model, params0)
    warm = gflow_ensemble(model, params0)
    same = label(loss) == label(warm.loss[:, -1])
    steps = np.asarray(steps)
    return {
        "grid": f"{n} x {n}",
        "members": n * n,
        "naive_cold_s": naive_cold,
        "naive_warm_s": naive_warm,
        "naive_member_steps": int(steps.sum()),
        "naive_lane_steps": int(steps.size * steps.max()),
        "gflow_cold_s": cold.stats["wall_time_s"],
        "gflow_compile_s": cold.stats["compile_time_s"],
        "gflow_warm_s": warm.stats["wall_time_s"],
        "gflow_member_steps": warm.stats["member_steps"],
        "gflow_lane_steps": warm.stats["lane_steps"],
        "speedup_warm": naive_warm / warm.stats["wall_time_s"],
        "speedup_cold": naive_cold / cold.stats["wall_time_s"],
        "same_labels": int(same.sum()),
        "global_fraction": float(label(warm.loss[:, -1]).mean()),
    }


def scaling(sizes) -> list[dict]:
    model = MarkovCanonical(P, Q)
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        params0 = {k: jnp.asarray(rng.uniform(-2, 2, size)) for k in ("e", "w")}
        cold = gflow_ensemble(model, params0)
        warm = gflow_ensemble(model, params0)
        seconds = warm.stats["wall_time_s"]
        rows.append(
            {
                "members": size,
                "cold_s": cold.stats["wall_time_s"],
                "compile_s": cold.stats["compile_time_s"],
                "warm_s": seconds,
                "members_per_s": size / seconds,
                "member_steps": warm.stats["member_steps"],
                "lane_steps": warm.stats["lane_steps"],
            }
        )
        print(
            f"  {size:>6} members: warm {seconds:7.3f} s ({size / seconds:9.0f} "
            f"members/s), cold {cold.stats['wall_time_s']:6.1f} s, "
            f"{warm.stats['member_steps'] / max(warm.stats['lane_steps'], 1):.0%} "
            "of paid lanes useful"
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)

    n = 12 if args.quick else 100
    sizes = [64, 256] if args.quick else [64, 256, 1024, 4096, 16384, 40000]
    race = grid_race(n)
    print(
        f"{race['grid']} grid to t = {T_MAX:g}, rtol {RTOL:g}: straightforward "
        f"jit(vmap(diffeqsolve)) {race['naive_warm_s']:.2f} s warm "
        f"({race['naive_cold_s']:.2f} s cold); gflow {race['gflow_warm_s']:.3f} s "
        f"warm ({race['gflow_cold_s']:.2f} s cold, {race['gflow_compile_s']:.2f} s "
        f"of it compiling): {race['speedup_warm']:.0f}x warm, "
        f"{race['speedup_cold']:.1f}x cold; same label for {race['same_labels']} "
        f"of {race['members']} points"
    )
    print(
        f"  steps: naive pays {race['naive_lane_steps']} lane-steps for "
        f"{race['naive_member_steps']} member steps; gflow "
        f"{race['gflow_lane_steps']} for {race['gflow_member_steps']}"
    )
    print("members per second against ensemble size (warm):")
    rows = scaling(sizes)
    path = write_results(
        "ensemble" + ("_quick" if args.quick else ""),
        {"grid_race": race, "scaling": rows},
        args.results,
    )
    print(f"wrote {path}")
    return {"grid_race": race, "scaling": rows}


if __name__ == "__main__":
    main()
