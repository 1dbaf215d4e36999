"""Memory of large models: peak RSS against parameter count, save count and params_at.

An MLP of four square tanh layers (width w: 4 w² + 4 w parameters, float32) fits
random targets on 8 random inputs; `gflow.simulate` runs it to t = 1 with the
default solver and `n_save` linearly spaced save times, keeping the parameters at
every save time (`params_at="all"`) or only at the ends (`params_at="final"`). Each
run is its own process, whose peak resident memory (`ru_maxrss`) is the figure.
Runs whose saved parameters (and velocities) exceed 3 GiB are not started; the
table says what they would need.

The target: a 16.8M-parameter model (w = 2048) with 1,000 save times and
params_at="final" peaks at ≤ 3 GiB.

    python benchmarks/memory.py            # the table and the target (minutes)
    python benchmarks/memory.py --target   # the target run only
    python benchmarks/memory.py --quick    # small widths, for the test suite

Writes benchmarks/results/memory_<backend>.json (memory_target_<backend>.json with
--target).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import RESULTS, write_results

GiB = 2**30
# Runs whose saved parameters and velocities (2 copies per kept row) exceed this are
# not started: measured, the peak holds about three times the saved bytes (the
# loop's output buffer, its copy to the host, the trajectory's arrays), and the
# machine has 24 GiB.
_LARGEST_SAVED = 3 * GiB


def one_run(width: int, n_save: int, params_at: str) -> dict:
    """Run one simulation in this process; its peak RSS and counters."""
    import jax
    import jax.numpy as jnp

    import gflow

    keys = jax.random.split(jax.random.key(0), 6)
    params0 = [
        {
            "w": jax.random.normal(k, (width, width)) / jnp.sqrt(width),
            "b": jnp.zeros(width),
        }
        for k in keys[:4]
    ]
    x = jax.random.normal(keys[4], (8, width))
    y = jax.random.normal(keys[5], (8, width))

    def loss(layers, data):
        h, target = data
        for layer in layers:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return 0.5 * jnp.mean(jnp.sum((h - target) ** 2, axis=1))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    traj = gflow.simulate(
        loss,
        (x, y),
        1.0,
        params0=params0,
        n_save=n_save,
        spacing="linear",
        params_at=params_at,
    )
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params0))
    return dict(
        width=width,
        parameters=int(n_params),
        n_save=n_save,
        params_at=params_at,
        rows_with_params=int(len(traj.param_rows)),
        peak_rss_bytes=int(peak),
        rss_before_simulate_bytes=int(before),
        num_steps=int(traj.stats["num_steps"]),
        wall_time_s=wall,
    )


def measure(width: int, n_save: int, params_at: str) -> dict:
    """`one_run` in a fresh process, or why it was not run."""
    n_params = 4 * width * width + 4 * width
    saved = 2 * 4 * n_params * (n_save if params_at == "all" else 2)
    if saved > _LARGEST_SAVED:
        return dict(
            width=width,
            parameters=n_params,
            n_save=n_save,
            params_at=params_at,
            skipped=True,
            saved_bytes_needed=saved,
        )
    command = [sys.executable, __file__, "--one", str(width), str(n_save), params_at]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    if done.returncode != 0:  # e.g. killed for memory: recorded, not hidden
        return dict(
            width=width,
            parameters=n_params,
            n_save=n_save,
            params_at=params_at,
            failed=True,
            returncode=done.returncode,
            stderr=done.stderr[-2000:],
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(row: dict) -> None:
    label = (
        f"{row['parameters'] / 1e6:6.1f}M params, {row['n_save']:>5} saves, "
        f"params_at={row['params_at']:<5}"
    )
    if row.get("failed"):
        print(f"  {label}  failed (exit code {row['returncode']})", flush=True)
    elif row.get("skipped"):
        print(
            f"  {label}  not run: its saved rows alone need "
            f"{row['saved_bytes_needed'] / GiB:.0f} GiB",
            flush=True,
        )
    else:
        print(
            f"  {label}  peak RSS {row['peak_rss_bytes'] / GiB:5.2f} GiB  "
            f"({row['num_steps']} steps, {row['wall_time_s']:.0f} s)",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small widths")
    parser.add_argument("--target", action="store_true", help="the target run only")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        width, n_save, params_at = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(one_run(width, n_save, params_at)))
        return None
    # Widths for about 1M, 5M and 20M parameters; the target model is w = 2048.
    # (Each run is a fresh process that compiles: the quick version keeps two.)
    widths = (200,) if args.quick else (500, 1118, 2236)
    saves = (100,) if args.quick else (10, 100, 1000)
    rows = []
    for width in () if args.target else widths:
        for n_save in saves:
            for params_at in ("all", "final"):
                rows.append(measure(width, n_save, params_at))
                show(rows[-1])
    target_width = 200 if args.quick else 2048
    target = measure(target_width, 1000, "final")
    print("target:", end="")
    show(target)
    result = dict(
        rows=rows,
        target=dict(target, peak_rss_at_most_3_gib=target["peak_rss_bytes"] <= 3 * GiB),
    )
    name = "memory" + ("_quick" if args.quick else "_target" if args.target else "")
    path = write_results(name, result, args.results)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
