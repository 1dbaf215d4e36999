"""gflow against torchdiffeq's dopri5 on the same co-occurrence gradient flow.

The co-occurrence transformer of Yang et al. at their scale (n = 60, L = 5, d = 64,
m = 128, m1 = 256, t = 300) written in PyTorch, same initial parameters and data,
float64 on the CPU; its gradient flow solved by `torchdiffeq.odeint(method="dopri5")`
and by gflow (Tsit5 and Dopri5) at the same tolerances. Both are compared with a
tight gflow reference (Dopri8, rtol 1e-12) at the same save times. Run times exclude
gflow's compilation (its first call); torchdiffeq has none.

Needs the optional extra: `pip install -e ".[peers]"` (torch 2.13.0 CPU build and
torchdiffeq). Without them it prints why and exits 0.

Run:  python benchmarks/peers_torchdiffeq.py [--repeats 3]
Writes benchmarks/results/peers_torchdiffeq_<backend>.json.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import (  # noqa: E402
    reference_flow,
    timed,
    trajectory_seconds,
    write_results,
)

import gflow  # noqa: E402
from gflow.models import CooccurrenceTransformer, cooccurrence_data  # noqa: E402

TOLERANCES = ((1e-6, 1e-8), (1e-8, 1e-10))


def torch_flow(model, params0, data, ts, rtol, atol):
    """The same flow in PyTorch + torchdiffeq; returns (states at ts, nfev, seconds)."""
    import torch
    import torchdiffeq

    torch.set_default_dtype(torch.float64)
    tokens = torch.as_tensor(np.array(data["tokens"]), dtype=torch.long)
    y = torch.as_tensor(np.array(data["y"]))
    a = torch.as_tensor(model.readout, dtype=torch.float64)
    names = ("W_Q", "W_K", "W_V", "W")
    shapes = [np.asarray(params0[k]).shape for k in names]
    sizes = [int(np.prod(s)) for s in shapes]

    def unpack(theta):
        parts = torch.split(theta, sizes)
        return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]

    def loss(theta):
        wq, wk, wv, w = unpack(theta)
        q, k, v = wq[:, tokens], wk[:, tokens], wv[:, tokens]  # (m, n, L)
        scores = torch.einsum("mnj,mnl->njl", k, q) / np.sqrt(model.m)  # [n, l', l]
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("mnj,nj->nm", v, attention.sum(dim=2))
        f = (pooled @ w.T) @ a
        return torch.nn.functional.softplus(-y * f).mean()

    calls = [0]

    def vector_field(t, theta):
        calls[0] += 1
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(theta), theta)
        return -grad

    theta0 = torch.cat(
        [torch.as_tensor(np.array(params0[k])).reshape(-1) for k in names]
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = torchdiffeq.odeint(
            vector_field,
            theta0,
            torch.as_tensor(ts),
            method="dopri5",
            rtol=rtol,
            atol=atol,
        )
    return out.numpy(), calls[0], time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="t = 3, one repeat")
    parser.add_argument("--results", default=None, help="output folder")
    args = parser.parse_args(argv)
    try:
        import torch
        import torchdiffeq  # noqa: F401
    except ImportError as e:
        print(
            f"skipped: this benchmark needs torch and torchdiffeq ({e}); install "
            "them with pip install -e '.[peers]'."
        )
        return None

    model = CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
    data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
    params0 = model.init(jax.random.key(1))
    t_max = 3.0 if args.quick else 300.0
    repeats = 1 if args.quick else args.repeats
    ts = gflow.save_times(t_max, 31, t_first=t_max * 1e-4)
    names = ("W_Q", "W_K", "W_V", "W")

    def flat(traj):
        return np.concatenate(
            [np.asarray(traj.params[k]).reshape(len(traj), -1) for k in names], axis=1
        )

    reference = flat(reference_flow(model, data, t_max, params0, ts))

    def error(states):
        return float(
            np.max(
                np.linalg.norm(states - reference, axis=1)
                / np.linalg.norm(reference, axis=1)
            )
        )

    rows = []
    for rtol, atol in TOLERANCES:
        for solver in ("tsit5", "dopri5"):
            run = functools.partial(
                gflow.simulate,
                model,
                data,
                t_max,
                params0=params0,
                ts=ts,
                solver=solver,
                rtol=rtol,
                atol=atol,
            )
            _, traj, seconds = timed(run, trajectory_seconds, repeats)
            rows.append(
                dict(
                    method=f"gflow {solver}",
                    rtol=rtol,
                    error=error(flat(traj)),
                    grad_evals=traj.stats["num_solver_grad_evals"],
                    run_time_s=seconds,
                )
            )
        times = []
        for _ in range(repeats):
            states, nfev, seconds = torch_flow(model, params0, data, ts, rtol, atol)
            times.append(seconds)
        rows.append(
            dict(
                method="torchdiffeq dopri5",
                rtol=rtol,
                error=error(states),
                grad_evals=nfev,
                run_time_s=statistics.median(times),
            )
        )
        torch_time = rows[-1]["run_time_s"]
        for row in rows[-3:]:
            row["speedup_vs_torchdiffeq"] = torch_time / row["run_time_s"]
    print(
        f"{'method':<20} {'rtol':>6} {'error':>9} {'grad evals':>10} {'run s':>8} "
        f"{'vs torchdiffeq':>14}"
    )
    for r in rows:
        print(
            f"{r['method']:<20} {r['rtol']:>6.0e} {r['error']:9.2e} "
            f"{r['grad_evals']:>10} {r['run_time_s']:8.3f} "
            f"{r['speedup_vs_torchdiffeq']:>13.2f}x"
        )
    versions = {
        "torch": torch.__version__,
        "torchdiffeq": torchdiffeq.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    payload = {"repeats": repeats, "t_max": t_max, "versions": versions, "rows": rows}
    folder = [args.results] if args.results else []
    path = write_results("peers_torchdiffeq", payload, *folder)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
