"""Overhead of gflow.simulate per gradient evaluation, against a bare jitted gradient.

A 41,473-parameter tanh MLP (32 -> 256 -> 128 -> 1) regresses a random teacher on
1,024 examples. We time

* one call of `jax.jit(jax.grad(loss))` (the cost a hand-written loop would pay),
* `gflow.simulate` to t_max (compile excluded: the median over repeated calls, which
  reuse the compiled program),

and report simulate's run time divided by (number of gradient evaluations x bare
gradient time). A ratio of 1.0 means the solver costs nothing beyond its gradients.
Both are measured in the same run. It also measures the compile time of simulate
(its first call minus nothing else: JAX's own compile events) for each built-in
model at the sizes the examples use. The number of gradient evaluations counts every
gradient simulate evaluated: solver stages plus the loss/gradient of each saved
state (the latter batched, so cheaper per gradient).

Run:  python benchmarks/overhead.py [--repeats 5] [--x64]
Writes benchmarks/results/overhead_<backend>.json.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _common import timed, write_results  # noqa: E402

import gflow  # noqa: E402
from gflow import models  # noqa: E402

SIZES = (32, 256, 128, 1)
N_EXAMPLES = 1024


def init_mlp(key, sizes=SIZES):
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        w = jax.random.normal(k, (n_out, n_in)) / jnp.sqrt(n_in)
        params.append({"w": w, "b": jnp.zeros(n_out)})
    return params


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(layer["w"] @ x + layer["b"][:, None])
    return params[-1]["w"] @ x + params[-1]["b"][:, None]


def loss(params, data):
    return 0.5 * jnp.mean((mlp(params, data["x"]) - data["y"]) ** 2)


def make_problem(seed=0):
    k_teacher, k_student, k_x = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (SIZES[0], N_EXAMPLES))
    data = {"x": x, "y": mlp(init_mlp(k_teacher), x)}
    return data, init_mlp(k_student)


def compile_cases():
    """The built-in models at the sizes the examples use, with their data."""
    key = jax.random.key(0)
    return {
        "CooccurrenceTransformer (paper scale)": (
            models.CooccurrenceTransformer(d=64, L=5, m=128, m1=256),
            models.cooccurrence_data(key, n=60, L=5, d=64),
        ),
        "MarkovTransformer (d=8, 256 x 16)": (
            models.MarkovTransformer(d=8, seq_len=16, init="makkuva"),
            models.markov_data(key, 0.5, 0.8, n_seqs=256, seq_len=16),
        ),
        "MarkovCanonical": (models.MarkovCanonical(0.5, 0.8), None),
        "CondensationTransformer (d_m=8, 64 x 10)": (
            models.CondensationTransformer(d_m=8, s=10, eps=1e-3),
            models.anchor_data(key, n=64, d_m=8),
        ),
        "DeepLinearNetwork (6-8-6)": (
            models.DeepLinearNetwork((6, 8, 6)),
            {"x": jnp.ones((32, 6)), "y": jnp.zeros((32, 6))},
        ),
    }


def model_compile_times():
    """simulate's compile time for each built-in model (float32, default solver)."""
    times = {}
    for name, (model, data) in compile_cases().items():
        traj = gflow.simulate(model, data, 1.0, key=1)
        times[name] = traj.stats["compile_time_s"]
        print(f"compile time, {name:<42} {times[name]:.2f} s")
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--t-max", type=float, default=50.0)
    parser.add_argument("--x64", action="store_true", help="run in float64")
    parser.add_argument("--results", default=None, help="output folder")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)

    data, params0 = make_problem()
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    # The bare gradient at the matmul precision simulate uses ("highest"): on GPUs
    # JAX's default would use TF32, a cheaper (and less accurate) gradient.
    with jax.default_matmul_precision("highest"):
        grad = jax.jit(jax.grad(loss))
        _, _, t_grad = timed(lambda: grad(params0, data), repeats=50)

    first = gflow.simulate(loss, data, args.t_max, params0=params0)
    compile_s = first.stats["compile_time_s"]
    evals = first.stats["num_grad_evals"]

    def run():
        traj = gflow.simulate(loss, data, args.t_max, params0=params0)
        assert not traj.stats["compiled"]
        return traj.loss

    _, _, t_sim = timed(run, repeats=args.repeats)
    ratio = t_sim / (evals * t_grad)
    rows = {
        "parameters": n_params,
        "examples": N_EXAMPLES,
        "dtype": str(jax.tree.leaves(params0)[0].dtype),
        "t_max": args.t_max,
        "num_steps": first.stats["num_steps"],
        "num_grad_evals": evals,
        "num_solver_grad_evals": first.stats["num_solver_grad_evals"],
        "bare_grad_s": t_grad,
        "simulate_run_s": t_sim,
        "simulate_compile_s": compile_s,
        "overhead_ratio": ratio,
        "final_loss": float(first.loss[-1]),
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(
            f"{key:<{width}}  {value:.4g}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    compile_times = model_compile_times()
    payload = {"repeats": args.repeats, "results": rows, "compile_s": compile_times}
    folder = [args.results] if args.results else []
    path = write_results("overhead", payload, *folder)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
