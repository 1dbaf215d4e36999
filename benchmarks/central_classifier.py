"""The central flow of a 10-class classifier at its defaults (issue 33).

The network a new user tried first: an Equinox MLP 64-32-32-10 (tanh) on 500 of
sklearn's digits, squared error on one-hot labels, float32
(`sharpness.digits_classifier`). Gradient descent at lr 0.2 passes the edge
near step 75 and brings several eigenvalues to it, about one per class being
learned. Three runs at GD's steps, 500 steps (t = 100):
- gradient descent, every step kept;
- the gradient flow;
- `gflow.flows.CentralFlow(0.2)` at its defaults (its tracked set adapts),
  timed cold (the first call in this process, compiling) and warm.

Accuracy, per GD midpoint (θ_{k−1} + 2θ_k + θ_{k+1})/4: the ratio
‖midpoint − central flow‖ / ‖midpoint − gradient flow‖, its median after the
edge (the first row where the central flow's Σ ≠ 0), and its median after
GD's own onset: the first row past the edge where GD's oscillation
‖θ_k − midpoint_k‖ reaches half the central flow's predicted size √(tr Σ).
GD's oscillation grows from round-off at a rate |1 − lr·λ| per step, so it
reaches the edge's size tens of steps after the central flow's edge, and
GD's midpoints follow the gradient flow (past the edge) until it does.

    pip install -e ".[bench]"
    python benchmarks/central_classifier.py          # about 2 minutes, 2-core CPU
    python benchmarks/central_classifier.py --quick  # 100 steps, for the tests

Writes benchmarks/results/central_classifier_<backend>.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, flat_rows, timed_twice, work_of, write_results  # noqa: E402
from sharpness import digits_classifier  # noqa: E402 (cache off, as cold wants)

import gflow  # noqa: E402

LR = 0.2


def median_after(ratio, row):
    return None if row is None else float(np.median(ratio[row - 1 :]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    steps = 100 if args.quick else 500
    loss, params0, data = digits_classifier()
    t_max, ts = steps * LR, np.arange(steps + 1) * LR
    gd = gflow.gradient_descent(loss, data, t_max, lr=LR, params0=params0, ts=ts)
    flow = gflow.simulate(loss, data, t_max, params0=params0, ts=ts)
    central, _, cold, warm = timed_twice(
        lambda: gflow.simulate(
            loss, data, t_max, params0=params0, ts=ts,
            flow=gflow.flows.CentralFlow(LR),
        )
    )  # fmt: skip

    iterates, mid = flat_rows(gd.params), flat_rows(gd.midpoints().params)
    to_central = np.linalg.norm(mid - flat_rows(central.params)[1:-1], axis=1)
    to_flow = np.linalg.norm(mid - flat_rows(flow.params)[1:-1], axis=1)
    ratio = to_central / to_flow  # rows 1 .. steps - 1
    trace = np.asarray(central.metrics["oscillation"])
    edge = int(np.argmax(trace > 0)) if np.any(trace > 0) else None
    swing = np.linalg.norm(iterates[1:-1] - mid, axis=1)
    caught = (np.arange(1, steps) >= (edge or steps)) & (
        swing >= 0.5 * np.sqrt(trace[1:-1])
    )
    onset = int(np.argmax(caught)) + 1 if np.any(caught) else None
    after_edge = median_after(ratio, edge)
    payload = {
        "problem": "Equinox MLP 64-32-32-10 (tanh) on 500 digits, MSE on one-hot "
        f"labels, float32, GD at lr {LR}, {steps} steps",
        "steps": steps,
        "timing": {
            "cold_s": cold,
            "warm_s": warm,
            "compile_s": float(central.stats["compile_time_s"]),
        },
        "work": work_of(central.stats),
        "most_tracked": int(np.max(central.metrics["tracked"])),
        "most_at_edge": int(np.max(central.metrics["edge_count"])),
        "max_effective_sharpness": float(LR * np.max(central.metrics["sharpness"])),
        "edge_step": edge,
        "gd_onset_step": onset,
        "median_distance_ratio": after_edge,
        "closer_than_gradient_flow": None if edge is None else 1 / after_edge,
        "median_distance_ratio_after_onset": median_after(ratio, onset),
        "distance_ratio_every_25_steps": [float(r) for r in ratio[24::25]],
    }
    path = write_results(
        "central_classifier_quick" if args.quick else "central_classifier",
        payload,
        args.results,
    )
    for key in (
        "timing",
        "work",
        "most_tracked",
        "most_at_edge",
        "edge_step",
        "gd_onset_step",
        "median_distance_ratio",
        "closer_than_gradient_flow",
        "median_distance_ratio_after_onset",
    ):
        print(f"{key}: {payload[key]}")  # fmt: skip
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
