"""Time to the first answer: gflow's first call against hand-written JAX.

A researcher's runs are small and many, so the first call of a fresh process
(tracing, lowering, XLA compilation, then the run) matters as much as the run.
Every measurement is its own fresh process with an empty compilation cache:

* gflow's first call at its defaults (`simulate`, solver "auto"), and its warm
  run (a second call in that process);
* the hand-written `jax.jit(diffeqsolve)` of the same flow and saves (Tsit5, the
  same PID tolerances, `SaveAt(ts=...)`, the loss at the saves);
* a second process that finds gflow's programs in the persistent cache the first
  one wrote: its first call, without and with `progress=True`;
* `gradient_descent` against a hand-written `lax.scan` of optax updates;
* two ensembles against the straightforward `jax.jit(jax.vmap(diffeqsolve))`,
  at gflow's defaults and with Tsit5 alone: 1,000 members of the canonical Markov
  flow, and 512 small tanh networks (`ensemble_problem`).

Where the compile time goes is read from JAX's monitoring events: tracing (jaxpr),
lowering (to StableHLO) and the backend's compilation (XLA passes and code).

    python benchmarks/compile.py              # about 16 minutes on the 2-core CPU
    python benchmarks/compile.py --quick      # two models, one repeat (test suite)

Writes benchmarks/results/compile_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("cooccurrence", "markov", "condensation", "digits", "equinox_mlp")
T_MAX = {"cooccurrence": 30.0, "markov": 60.0, "condensation": 100.0}
RTOL, ATOL = 1e-6, 1e-8  # gflow's defaults
ENSEMBLE_MEMBERS = 1000
NETWORK_MEMBERS = 512
#: The ensembles measured against the straightforward vmap (`ensemble_problem`).
ENSEMBLES = ("ensemble", "networks")
GD_LR = 0.1


def problem(name):
    """(loss, data, params0, t_max) of a model, float32 as JAX's default."""
    import jax

    from gflow import models

    key = jax.random.key(0)
    if name == "cooccurrence":
        model = models.CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
        data = models.cooccurrence_data(key, n=60, L=5, d=64)
    elif name == "markov":
        model = models.MarkovTransformer(d=8, seq_len=16, init="makkuva")
        data = models.markov_data(key, 0.5, 0.8, n_seqs=256, seq_len=16)
    elif name == "condensation":
        model = models.CondensationTransformer(d_m=8, s=10, eps=1e-3)
        data = models.anchor_data(key, n=64, d_m=8)
    else:
        return digits_problem(equinox=name == "equinox_mlp")
    return model.loss, data, model.init(jax.random.key(1)), T_MAX[name]


def digits_problem(equinox: bool):
    """A tanh MLP 64-32-10 on 500 of scikit-learn's digits, squared error on one-hot
    labels, to t = 50: a plain pytree of weights, or an Equinox MLP."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    data = (
        jnp.asarray(x[:500] / 16.0, jnp.float32),
        jax.nn.one_hot(jnp.asarray(labels[:500]), 10, dtype=jnp.float32),
    )
    if equinox:
        mlp = eqx.nn.MLP(64, 10, 32, 1, activation=jnp.tanh, key=jax.random.key(0))

        def loss(model, data):
            x, y = data
            return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1))

        return loss, data, mlp, 50.0
    keys = jax.random.split(jax.random.key(0), 2)
    sizes = (64, 32, 10)
    params = [
        {"w": jax.random.normal(k, (o, i)) / np.sqrt(i), "b": jnp.zeros(o)}
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(params, data):
        x, y = data
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"].T + layer["b"])
        out = x @ params[-1]["w"].T + params[-1]["b"]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=1))

    return loss, data, params, 50.0


class Events:
    """JAX's compile events of this process: tracing, lowering, backend compile."""

    NAMES = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "backend_s",
    }

    def __init__(self):
        import jax.monitoring

        self.totals = dict.fromkeys(self.NAMES.values(), 0.0)
        self.programs = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event in self.NAMES:
            self.totals[self.NAMES[event]] += duration
            self.programs += event.endswith("backend_compile_duration")

    def take(self) -> dict:
        out = dict(self.totals, programs=self.programs)
        self.totals = dict.fromkeys(self.NAMES.values(), 0.0)
        self.programs = 0
        return out


def timed(call):
    """(seconds, result) of one call, waited for."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(call())
    return time.perf_counter() - start, result


def measure_one(model: str, way: str) -> dict:
    """In this (fresh) process: the first call and a warm call of one way."""
    events = Events()
    import jax

    loss, data, params0, t_max = (
        problem(model) if model not in ENSEMBLES else ((None,) * 4)
    )
    events.take()
    if way.startswith("gflow"):
        calls = gflow_calls(loss, data, params0, t_max, progress="progress" in way)
    elif way == "hand":
        calls = hand_calls(loss, data, params0, t_max)
    elif way == "gd":
        calls = gd_calls(loss, data, params0, t_max)
    elif way == "gd_hand":
        calls = scan_calls(loss, data, params0, t_max)
    elif way == "ensemble":
        calls = ensemble_calls(model)
    elif way == "ensemble_tsit5":
        calls = ensemble_calls(model, solver="tsit5")
    else:
        calls = vmap_calls(model)
    first, result = timed(calls)
    compile_events = events.take()
    warm, _ = timed(calls)
    info = result if isinstance(result, dict) else {}
    return dict(
        model=model,
        way=way,
        first_s=first,
        warm_s=warm,
        backend=jax.default_backend(),
        **compile_events,
        **info,
    )


def save_ts(t_max):
    import gflow

    return gflow.save_times(t_max, 101)


def gflow_calls(loss, data, params0, t_max, progress=False):
    import gflow

    def call():
        traj = gflow.simulate(loss, data, t_max, params0=params0, progress=progress)
        return dict(
            steps=int(traj.stats["num_steps"]),
            grads=int(traj.stats["num_grad_evals"]),
            compiled=bool(traj.stats["compiled"]),
            cache_hits=int(traj.stats["compile_cache_hits"]),
            final_loss=float(traj.loss[-1]),
        )

    return call


def hand_calls(loss, data, params0, t_max):
    """The flow of the arrays of `params0` (an Equinox model's functions held
    apart), as one would write it with diffrax."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    arrays0, static = eqx.partition(params0, eqx.is_inexact_array)

    def loss_of(arrays, data):
        return loss(eqx.combine(arrays, static), data)

    grad = jax.grad(loss_of)

    @jax.jit
    def solve(arrays0, data, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, d: jax.tree.map(jnp.negative, grad(y, d))),
            diffrax.Tsit5(),
            0.0,
            ts[-1],
            None,
            arrays0,
            args=data,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=100_000,
        )
        losses = jax.vmap(loss_of, (0, None))(sol.ys, data)
        return losses, sol.stats["num_steps"]

    ts = jnp.asarray(save_ts(t_max), jnp.float32)

    def call():
        losses, steps = solve(arrays0, data, ts)
        return dict(steps=int(steps), final_loss=float(losses[-1]))

    return call


def gd_calls(loss, data, params0, t_max):
    import gflow

    def call():
        gd = gflow.gradient_descent(loss, data, t_max, GD_LR, params0=params0)
        return dict(steps=int(gd.stats["num_steps"]), final_loss=float(gd.loss[-1]))

    return call


def scan_calls(loss, data, params0, t_max):
    """Gradient descent by hand: `lax.scan` of optax updates, the loss each step."""
    import jax
    import optax

    optimizer = optax.sgd(GD_LR)
    n_steps = round(t_max / GD_LR)

    @jax.jit
    def descend(params, data):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params, data)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), losses = jax.lax.scan(
            step, (params, optimizer.init(params)), None, length=n_steps
        )
        return params, losses

    def call():
        _, losses = descend(params0, data)
        return dict(steps=n_steps, final_loss=float(losses[-1]))

    return call


def ensemble_problem(kind: str):
    """(loss, data, params0 with a member axis, t_max) of an ensemble, float32:
    "ensemble", 1,000 random points of the canonical Markov plane to t = 2000;
    "networks", 512 small tanh networks (2-16-1, 65 parameters) from random
    starts, fitting a tanh teacher on 64 points, to t = 200."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gflow

    if kind == "ensemble":
        model = gflow.models.MarkovCanonical(0.5, 0.8)
        rng = np.random.default_rng(0)
        points = rng.uniform(-2.0, 2.0, (ENSEMBLE_MEMBERS, 2)).astype(np.float32)
        params0 = {"e": jnp.asarray(points[:, 0]), "w": jnp.asarray(points[:, 1])}
        return model.loss, None, params0, 2000.0

    def net(params, x):
        hidden = jnp.tanh(x @ params["w1"] + params["b1"])
        return hidden @ params["w2"] + params["b2"]

    def start(key, scale=1.0):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (2, 16)) * scale / jnp.sqrt(2.0),
            "b1": jnp.zeros(16),
            "w2": jax.random.normal(k2, (16, 1)) * scale / 4.0,
            "b2": jnp.zeros(1),
        }

    def loss(params, data):
        x, y = data
        return 0.5 * jnp.mean((net(params, x) - y) ** 2)

    kx, kt, km = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 2))
    data = (x, net(start(kt, scale=2.0), x))
    params0 = jax.vmap(start)(jax.random.split(km, NETWORK_MEMBERS))
    return loss, data, params0, 200.0


def ensemble_calls(kind: str, solver: str = "auto"):
    import gflow

    loss, data, params0, t_max = ensemble_problem(kind)

    def call():
        ens = gflow.simulate_ensemble(
            loss, data, t_max, params0=params0, save="final", solver=solver
        )
        return dict(
            member_steps=int(ens.stats["member_steps"]),
            final_loss=float(ens.loss[:, -1].mean()),
        )

    return call


def vmap_calls(kind: str):
    """The straightforward `jax.jit(jax.vmap(diffeqsolve))` of the ensemble."""
    import diffrax
    import jax
    import jax.numpy as jnp

    loss, data, params0, t_max = ensemble_problem(kind)
    grad = jax.grad(loss)

    @jax.jit
    def solve(params0, data):
        def one(y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(
                    lambda t, y, data: jax.tree.map(jnp.negative, grad(y, data))
                ),
                diffrax.Tsit5(),
                0.0,
                t_max,
                None,
                y0,
                args=data,
                stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                max_steps=100_000,
            )
            return loss(jax.tree.map(lambda y: y[-1], sol.ys), data)

        return jax.vmap(one)(params0)

    def call():
        return dict(final_loss=float(solve(params0, data).mean()))

    return call


def in_fresh_process(model, way, cache_dir) -> dict:
    env = dict(os.environ, GFLOW_COMPILATION_CACHE="1", GFLOW_CACHE_DIR=cache_dir)
    done = subprocess.run(
        [sys.executable, __file__, "--one", model, way],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{model} {way} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model, repeats) -> dict:
    """Each way `repeats` times, in fresh processes; the median first call."""
    ways = {"hand": [], "gflow": [], "gflow_cached": [], "gflow_cached_progress": []}
    if model in ("digits",):
        ways.update(gd=[], gd_hand=[])
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            ways["hand"].append(in_fresh_process(model, "hand", cache))
            ways["gflow"].append(in_fresh_process(model, "gflow", cache))
            ways["gflow_cached"].append(in_fresh_process(model, "gflow_cached", cache))
            ways["gflow_cached_progress"].append(
                in_fresh_process(model, "gflow_cached_progress", cache)
            )
        for way in ("gd", "gd_hand"):
            if way in ways:
                with tempfile.TemporaryDirectory() as cache:
                    ways[way].append(in_fresh_process(model, way, cache))
    return {way: median_run(runs) for way, runs in ways.items()}


def measure_ensemble(kind, repeats) -> dict:
    """The ensemble at gflow's defaults, with Tsit5 alone, and the straightforward
    vmap, `repeats` fresh processes each, each with an empty cache (a shared one
    would make every run after the first a cache hit)."""
    runs = {"vmap": [], "ensemble": [], "ensemble_tsit5": []}
    for _ in range(repeats):
        for way, done in runs.items():
            with tempfile.TemporaryDirectory() as cache:
                done.append(in_fresh_process(kind, way, cache))
    return {
        "vmap": median_run(runs["vmap"]),
        "gflow": median_run(runs["ensemble"]),
        "gflow_tsit5": median_run(runs["ensemble_tsit5"]),
    }


def jax_backend() -> str:
    import jax

    return jax.default_backend()


def median_run(runs):
    """The run of median first call, with every run's first call."""
    ordered = sorted(runs, key=lambda r: r["first_s"])
    middle = dict(ordered[len(ordered) // 2])
    middle["first_s_all"] = [r["first_s"] for r in runs]
    middle["first_s"] = statistics.median(middle["first_s_all"])
    return middle


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WAY"))
    parser.add_argument(
        "--models",
        nargs="+",
        choices=(*MODELS, *ENSEMBLES),
        help="measure only these; their rows replace those of the results file",
    )
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import RESULTS, write_results

    repeats = 1 if args.quick else args.repeats
    models = ("markov", "digits", "ensemble") if args.quick else (*MODELS, *ENSEMBLES)
    rows = {}
    for model in args.models or models:
        if model in ENSEMBLES:
            rows[model] = row = measure_ensemble(model, repeats)
            print(describe_ensemble(model, row), flush=True)
        else:
            rows[model] = row = measure(model, repeats)
            print(describe(model, row), flush=True)
    folder = pathlib.Path(args.out or RESULTS)
    earlier = folder / f"compile_{jax_backend()}.json"
    if args.models and earlier.exists():
        rows = {**json.loads(earlier.read_text())["models"], **rows}
    path = write_results("compile", {"repeats": repeats, "models": rows}, folder=folder)
    print(f"wrote {path}")
    return rows


def describe(model, row) -> str:
    hand, gf = row["hand"], row["gflow"]
    cached, progress = row["gflow_cached"], row["gflow_cached_progress"]
    ratio = gf["first_s"] / hand["first_s"]
    lines = [
        f"{model}: first call gflow {gf['first_s']:.2f} s / hand "
        f"{hand['first_s']:.2f} s = {ratio:.2f}x (gflow: trace {gf['trace_s']:.2f} s,"
        f" lower {gf['lower_s']:.2f} s, XLA {gf['backend_s']:.2f} s, "
        f"{gf['programs']} programs; hand: trace {hand['trace_s']:.2f} s, lower "
        f"{hand['lower_s']:.2f} s, XLA {hand['backend_s']:.2f} s); warm gflow "
        f"{gf['warm_s']:.3f} s / hand {hand['warm_s']:.3f} s",
        f"  second process with the cache: {cached['first_s']:.2f} s "
        f"({cached['first_s'] / gf['first_s']:.2f}x the first), with progress "
        f"{progress['first_s']:.2f} s ({progress['first_s'] / gf['first_s']:.2f}x)",
    ]
    if "gd" in row:
        gd, scan = row["gd"], row["gd_hand"]
        lines.append(
            f"  gradient_descent first call {gd['first_s']:.2f} s / lax.scan "
            f"{scan['first_s']:.2f} s = {gd['first_s'] / scan['first_s']:.2f}x"
        )
    return "\n".join(lines)


def describe_ensemble(kind, row) -> str:
    vmap, gf, tsit5 = row["vmap"], row["gflow"], row["gflow_tsit5"]
    name = {
        "ensemble": f"ensemble of {ENSEMBLE_MEMBERS} Markov flows",
        "networks": f"ensemble of {NETWORK_MEMBERS} tanh networks",
    }[kind]
    return (
        f"{name}: first call gflow {gf['first_s']:.2f} s / vmap "
        f"{vmap['first_s']:.2f} s ({vmap['first_s'] / gf['first_s']:.2f}x faster);"
        f" warm {gf['warm_s']:.3f} s / {vmap['warm_s']:.3f} s "
        f"({vmap['warm_s'] / gf['warm_s']:.2f}x); with Tsit5 alone first call "
        f"{tsit5['first_s']:.2f} s, warm {tsit5['warm_s']:.3f} s (the defaults "
        f"{gf['warm_s'] / tsit5['warm_s']:.2f}x its warm time)"
    )


if __name__ == "__main__":
    main()
