"""What checkpoints cost: a long run with and without `checkpoint=DIR`.

The digits MLP of benchmarks/stiff.py (float64) runs with Tsit5 to t = 200 (a
minute and a half on the 2-core CPU), uncut and checkpointed at the default segment
length (about 30 s of run time), in the same process after a warm-up that compiles
both, alternately, twice each. Reported: the shorter run time of each (the machine
is shared: the shorter is the less disturbed), the overhead (checkpointed / uncut
− 1), the number of checkpoints and the time spent writing them. The results must
be the same bit for bit.

    python benchmarks/checkpoint.py
    python benchmarks/checkpoint.py --quick    # 200 images, t = 20, for the tests

Writes benchmarks/results/checkpoint_<backend>.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import equinox as eqx
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402
from stiff import digits_problem  # noqa: E402 (float64 on import)

import gflow  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short")
    parser.add_argument("--results", default=str(RESULTS), help="output folder")
    args = parser.parse_args(argv)
    t_max, n_examples = (20.0, 200) if args.quick else (200.0, 1000)
    every = 0.5 if args.quick else 30.0
    mlp, loss, data = digits_problem(n_examples)
    kwargs = dict(params0=mlp, solver="tsit5", n_save=50, max_steps=10**7)

    def run(folder=None):
        extra = (
            {} if folder is None else dict(checkpoint=folder, checkpoint_every=every)
        )
        return gflow.simulate(loss, data, t_max, **kwargs, **extra)

    with tempfile.TemporaryDirectory() as warm:  # compile both programs
        gflow.simulate(loss, data, 1.0, **kwargs, checkpoint=warm)
    uncut, cut = [], []
    for _ in range(2):
        uncut.append(run())
        with tempfile.TemporaryDirectory() as folder:
            cut.append(run(folder))
    uncut = min(uncut, key=lambda traj: traj.stats["run_time_s"])
    cut = min(cut, key=lambda traj: traj.stats["run_time_s"])

    def arrays(traj):
        return [traj.loss, *jax.tree.leaves(eqx.filter(traj.params, eqx.is_array))]

    same = all(
        np.array_equal(a, b) for a, b in zip(arrays(uncut), arrays(cut), strict=True)
    )
    result = dict(
        t_max=t_max,
        num_steps=int(uncut.stats["num_steps"]),
        uncut_run_time_s=uncut.stats["run_time_s"],
        checkpointed_run_time_s=cut.stats["run_time_s"],
        overhead=cut.stats["run_time_s"] / uncut.stats["run_time_s"] - 1,
        checkpoint_every_s=every,
        checkpoint_writes=int(cut.stats["checkpoint_writes"]),
        checkpoint_write_time_s=cut.stats["checkpoint_write_time_s"],
        same_bit_for_bit=bool(same),
    )
    for key, value in result.items():
        print(f"  {key:<28} {value}")
    path = write_results(
        "checkpoint_quick" if args.quick else "checkpoint", result, args.results
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
