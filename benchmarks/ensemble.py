"""Ensembles: gflow.simulate_ensemble against the straightforward vmapped solve.

1. Grids. 100 x 100 grids of the canonical Markov (e, w) plane for (p, q) =
   (0.5, 0.8) and (0.2, 0.3), each flow to t = 2000 in float64, each point labelled
   local/global by its final loss. The straightforward way is
   `jax.jit(jax.vmap(diffeqsolve))` with Tsit5 at gflow's default tolerances: it
   runs every member until the slowest is done. gflow runs with its defaults (no
   stopping rule), and with the documented stopping rule (loss within 1e-4 of the
   global minimum: the loss never increases along a flow; or gradient norm 1e-8).
   "Cold" is a fresh process with an empty compilation cache; "warm" a second call
   in that process. Every way must label every point the same.
2. Members per second against the ensemble size (random points of the plane, with
   the stopping rule, warm), and the useful share of the lanes' steps until the
   queue drains.

On a CPU, JAX runs one device on one core; gflow splits its lanes across devices,
so each gflow measurement is also taken with one virtual CPU device per core
(`XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`, as the docs advise).
The straightforward vmap runs on one device either way.

    python benchmarks/ensemble.py            # about 8 minutes on the 2-core CPU
    python benchmarks/ensemble.py --quick    # small, for the test suite

Writes benchmarks/results/ensemble_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import RESULTS, write_results  # noqa: E402

import gflow  # noqa: E402
from gflow.models import MarkovCanonical, markov_reference_losses  # noqa: E402

T_MAX, RTOL, ATOL = 2000.0, 1e-6, 1e-8  # gflow's default tolerances


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


def stopping_rule(p, q) -> dict:
    """The documented rule: stop once the limit is certain."""
    _, bigram = markov_reference_losses(p, q)
    return dict(stop_at_loss=bigram + 1e-4, stop_at_grad_norm=1e-8)


def is_global(p, q, final_loss):
    local, bigram = markov_reference_losses(p, q)
    final_loss = np.asarray(final_loss)
    return np.abs(final_loss - bigram) < np.abs(final_loss - local)


def one_grid(way: str, p: float, q: float, n: int) -> dict:
    """In this (fresh) process: a cold and a warm solve of the grid one way."""
    model = MarkovCanonical(p, q)
    axis = jnp.linspace(-2.0, 2.0, n)
    params0 = gflow.grid({"e": axis, "w": axis})
    times, labels = [], None
    if way == "naive":
        solve = naive_solver(model)
        for _ in range(2):
            start = time.perf_counter()
            loss, steps = jax.block_until_ready(solve(params0))
            times.append(time.perf_counter() - start)
        labels, steps = is_global(p, q, loss), np.asarray(steps)
        extra = dict(
            member_steps=int(steps.sum()),
            max_steps=int(steps.max()),
            lane_steps=int(steps.size * steps.max()),
            devices=1,
        )
        compile_s = None
    else:
        rule = stopping_rule(p, q) if way == "gflow stopping" else {}
        for _ in range(2):
            ens = gflow.simulate_ensemble(
                model, None, T_MAX, params0=params0, save="final", **rule
            )
            times.append(ens.stats["wall_time_s"])
            if len(times) == 1:
                compile_s = ens.stats["compile_time_s"]
        labels, steps = is_global(p, q, ens.loss[:, -1]), ens.stats["num_steps"]
        extra = dict(
            member_steps=int(steps.sum()),
            max_steps=int(steps.max()),
            lane_steps=ens.stats["lane_steps"],
            lanes=ens.meta["lanes"],
            devices=len(jax.devices()),
        )
    return dict(
        way=way,
        cold_s=times[0],
        warm_s=times[1],
        compile_s=compile_s,
        labels=labels.astype(int).tolist(),
        **extra,
    )


def device_counts(quick: bool) -> list[int]:
    """1, and on a CPU with several cores one virtual device per core (only that
    in a quick run)."""
    cores = os.cpu_count() or 1
    counts = [1, cores] if jax.default_backend() == "cpu" and cores > 1 else [1]
    return counts[-1:] if quick else counts


def in_fresh_process(*args, devices: int = 1):
    """This script with `args` in a new process with an empty compilation cache
    (and `devices` virtual CPU devices): the last line it prints, as JSON."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GFLOW_CACHE_DIR=cache)
        env.pop("GFLOW_COMPILATION_CACHE", None)
        if devices > 1:
            flag = f"--xla_force_host_platform_device_count={devices}"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        command = [sys.executable, __file__, *map(str, args)]
        here = os.path.dirname(os.path.abspath(__file__))
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=here
        )
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def grids(n: int, pairs, quick: bool) -> list[dict]:
    out = []
    for p, q in pairs:
        naive = in_fresh_process("--one", "naive", p, q, n)
        row = dict(
            p=p,
            q=q,
            grid=f"{n} x {n}",
            members=n * n,
            gflow=[],
            global_fraction=float(np.mean(naive["labels"])),
        )
        print(f"({p}, {q}) {n} x {n} grid to t = {T_MAX:g}:", flush=True)
        print(
            f"  straightforward vmap: cold {naive['cold_s']:.2f} s, warm "
            f"{naive['warm_s']:.2f} s; its slowest member "
            f"{naive['max_steps']:,} steps",
            flush=True,
        )
        for devices in device_counts(quick):
            for way in ("gflow default", "gflow stopping"):
                run = in_fresh_process("--one", way, p, q, n, devices=devices)
                same = int(np.sum(np.equal(run["labels"], naive["labels"])))
                run = dict(
                    {k: v for k, v in run.items() if k != "labels"},
                    speedup_cold=naive["cold_s"] / run["cold_s"],
                    speedup_warm=naive["warm_s"] / run["warm_s"],
                    same_labels=same,
                )
                row["gflow"].append(run)
                print(
                    f"  {way:<15} {devices} device(s): cold {run['cold_s']:6.2f} s "
                    f"({run['compile_s']:.2f} s compiling), warm "
                    f"{run['warm_s']:6.3f} s: {run['speedup_cold']:.1f}x cold, "
                    f"{run['speedup_warm']:.1f}x warm; slowest member "
                    f"{run['max_steps']:,} steps; same label at {same} of "
                    f"{n * n} points",
                    flush=True,
                )
        row["naive"] = {k: v for k, v in naive.items() if k != "labels"}
        out.append(row)
    return out


def scaling(sizes) -> list[dict]:
    """In this process: members per second at each size (warm)."""
    p, q = 0.5, 0.8
    model = MarkovCanonical(p, q)
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        params0 = {k: jnp.asarray(rng.uniform(-2, 2, size)) for k in ("e", "w")}
        runs = [
            gflow.simulate_ensemble(
                model, None, T_MAX, params0=params0, save="final", **stopping_rule(p, q)
            )
            for _ in range(2)
        ]
        warm = runs[1].stats
        rows.append(
            dict(
                members=size,
                devices=len(jax.devices()),
                first_call_s=runs[0].stats["wall_time_s"],
                compile_s=runs[0].stats["compile_time_s"],
                warm_s=warm["wall_time_s"],
                members_per_s=size / warm["wall_time_s"],
                member_steps=warm["member_steps"],
                lane_steps=warm["lane_steps"],
                useful_share_until_drained=warm["useful_share_until_drained"],
                lanes=runs[1].meta["lanes"],
            )
        )
    return rows


def scaling_per_device_count(sizes, quick: bool) -> list[dict]:
    rows = []
    for devices in device_counts(quick):
        for row in in_fresh_process("--scaling", *sizes, devices=devices):
            rows.append(row)
            print(
                f"  {row['members']:>7,} members, {devices} device(s): warm "
                f"{row['warm_s']:7.3f} s ({row['members_per_s']:9,.0f} members/s), "
                f"{row['lanes']} lanes, {row['useful_share_until_drained']:.1%} of "
                "lane-steps useful until the queue drained",
                flush=True,
            )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--scaling", nargs="+", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        way, p, q, n = args.one
        print(json.dumps(one_grid(way, float(p), float(q), int(n))))
        return None
    if args.scaling:
        print(json.dumps(scaling(args.scaling)))
        return None
    n = 12 if args.quick else 100
    pairs = [(0.5, 0.8)] if args.quick else [(0.5, 0.8), (0.2, 0.3)]
    sizes = [64, 256] if args.quick else [64, 256, 1024, 4096, 16384, 40000, 100000]
    result = {"grids": grids(n, pairs, args.quick)}
    print("members per second against ensemble size (warm, with the stopping rule):")
    result["scaling"] = scaling_per_device_count(sizes, args.quick)
    path = write_results(
        "ensemble" + ("_quick" if args.quick else ""), result, args.results
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
