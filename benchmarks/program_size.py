"""What each feature adds to a compiled program: kernels, optimised IR and
compile time, per feature of a call.

The flow is the canonical Markov flow (Makkuva et al., p = 0.5, q = 0.8), two
parameters, float64, to t = 200, so that nearly all of a program is the solver's
machinery, not the model. Each configuration is compiled in a fresh process with
gflow's compilation cache off and XLA's dump on; measured:
- `kernels`: the LLVM kernels of the largest program (XLA CPU compiles each
  fusion and each non-fused op of it into one), and `ir_mb` their optimised IR;
- `compile_s`: gflow's `stats["compile_time_s"]` (the hand-written solves: the
  jitted call's first run less its second), and `first_s`, the first call.

Configurations: `simulate` with Tsit5 alone (final value only), then with save
rows, a metric and a stop rule; "auto" (Tsit5 with its stiffness detector, the
program a run starts with); RKC2 alone; an ensemble of 64 members with Tsit5 and
with "auto" (both methods in one program); and, as the floor, a hand-written
`jax.jit(diffeqsolve)` (Tsit5) and its `jax.vmap`.

    python benchmarks/program_size.py          # about a minute on the 2-core CPU

Writes benchmarks/results/program_size_<backend>.json and its table
(`results/program_size_<backend>.md`, shown by docs/compilation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

T_MAX, MEMBERS = 200.0, 64

#: (name, what it adds): the configurations, in the table's order.
CONFIGS = (
    ("hand", "hand-written `jax.jit(diffeqsolve)`, Tsit5, final value"),
    ("tsit5", '`simulate`, `solver="tsit5"`, `n_save=2`'),
    ("rows", '`simulate`, `solver="tsit5"`, `n_save=101`'),
    ("metric", "the same and a metric"),
    ("stop", "the same, a metric and a stop rule (`stop_at_grad_norm`)"),
    ("auto", '`simulate` at its defaults ("auto": Tsit5 and its stiffness '
     "detector), `n_save=2`"),
    ("rkc2", '`simulate`, `solver="rkc2"`, `n_save=2`'),
    ("hand_vmap", f"hand-written `jax.jit(jax.vmap(diffeqsolve))`, {MEMBERS} members"),
    ("ensemble_tsit5", f'`simulate_ensemble`, {MEMBERS} members, `solver="tsit5"`'),
    ("ensemble_auto", f"`simulate_ensemble`, {MEMBERS} members, at its defaults "
     '("auto": Tsit5 and RKC2 in one program)'),
)  # fmt: skip


def run_one(name: str) -> dict:
    """Compile and run one configuration (in this fresh process)."""
    import diffrax
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import gflow

    model = gflow.models.MarkovCanonical(0.5, 0.8)
    points = np.random.default_rng(0).uniform(-2.0, 2.0, (MEMBERS, 2))
    one = {"e": jnp.asarray(points[0, 0]), "w": jnp.asarray(points[0, 1])}
    many = {"e": jnp.asarray(points[:, 0]), "w": jnp.asarray(points[:, 1])}
    metric = {"e2": lambda p, data: p["e"] ** 2}
    options = {
        "tsit5": dict(solver="tsit5", n_save=2),
        "rows": dict(solver="tsit5", n_save=101),
        "metric": dict(solver="tsit5", n_save=101, metrics=metric),
        "stop": dict(
            solver="tsit5", n_save=101, metrics=metric, stop_at_grad_norm=1e-12
        ),
        "auto": dict(n_save=2),
        "rkc2": dict(solver="rkc2", n_save=2),
    }  # fmt: skip

    if name in options:

        def call():
            return gflow.simulate(model, None, T_MAX, params0=one, **options[name])
    elif name.startswith("ensemble"):
        solver = "tsit5" if name == "ensemble_tsit5" else "auto"

        def call():
            return gflow.simulate_ensemble(
                model, None, T_MAX, params0=many, save="final", solver=solver
            )
    else:
        grad = jax.grad(model.loss)

        def solve(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: jax.tree.map(jnp.negative, grad(y))),
                diffrax.Tsit5(), 0.0, T_MAX, None, y0,
                stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
                max_steps=100_000,
            ).ys  # fmt: skip

        jitted = jax.jit(jax.vmap(solve) if name == "hand_vmap" else solve)
        start = {"hand": one, "hand_vmap": many}[name]

        def call():
            return jitted(start)

    seconds, results = [], []
    for _ in range(2):
        began = time.perf_counter()
        results.append(jax.block_until_ready(call()))
        seconds.append(time.perf_counter() - began)
    stats = getattr(results[0], "stats", None)
    compile_s = (
        stats["compile_time_s"] if stats is not None else seconds[0] - seconds[1]
    )
    return {"first_s": seconds[0], "compile_s": float(compile_s)}


def largest_program(folder: pathlib.Path) -> dict:
    """The kernel count and optimised IR of the dumped module with most kernels."""
    modules: dict[str, list[int]] = {}
    for path in folder.glob("module_*.ir-with-opt.ll"):
        module = path.name.split(".")[0]
        modules.setdefault(module, []).append(path.stat().st_size)
    sizes = max(modules.values(), key=len)
    return {"kernels": len(sizes), "ir_mb": sum(sizes) / 1e6}


def measure(name: str) -> dict:
    with tempfile.TemporaryDirectory() as dump:
        env = dict(
            os.environ,
            GFLOW_COMPILATION_CACHE="0",
            XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}",
        )
        done = subprocess.run(
            [sys.executable, __file__, "--one", name],
            env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        return {**row, **largest_program(pathlib.Path(dump))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="configurations to measure")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return {}
    import _tables

    names = args.only or [name for name, _ in CONFIGS]
    rows = {}
    for name in names:
        rows[name] = measure(name)
        print(f"{name}: {rows[name]}", flush=True)
    payload = {
        "problem": f"canonical Markov flow (0.5, 0.8), float64, t = {T_MAX:g}",
        "configs": dict(CONFIGS),
        "rows": rows,
    }
    path = write_results("program_size", payload, args.results)
    table = path.with_suffix(".md")
    table.write_text(_tables.program_size(json.loads(path.read_text())))
    print(f"wrote {path} and {table.name}")
    return payload


if __name__ == "__main__":
    main()
