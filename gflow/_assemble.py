"""The back half every entry point shares: the engine's outputs, on the host, become
a `Trajectory` (cut at its first inf/NaN row, padded past each member's end, with
its counters and timings), and a failed run raises `SimulationError` if asked to."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ._checks import require_finite
from ._engine import Outputs
from ._errors import raise_if_failed
from ._options import Options
from ._results import result_code, result_names
from ._trajectory import Trajectory, take_fields


def assemble(
    out: Outputs,
    opts: Options,
    meta: dict,
    timer,
    *,
    batched: bool,
    stats: dict | None = None,
    fixed: Any = None,
) -> Trajectory:
    """The Trajectory of the engine's outputs: a batch of members, or member 0.

    Each member is cut at its first row with an inf/NaN loss or parameters (its
    result becomes "diverged"); it then ends at the last row before that which holds
    parameters, so its last row always holds its final parameters. Rows past a
    member's end repeat its last row. The leaves held `fixed` are put back into the
    parameters, velocities and the flow's variables of the parameters' structure,
    which keep the user's structure.
    """
    param_rows = opts.saves.param_rows
    out = _unpadded(jax.device_get(out), len(opts.saves.ts), len(param_rows))
    n, code, row_source, slot_source = _valid_rows(out, param_rows, len(opts.saves.ts))
    members = np.arange(n.size)[:, None]
    t_end = np.asarray(out.ts)[members[:, 0], np.maximum(n, 1) - 1]
    all_stats = dict(
        work_stats(
            out.steps, out.accepted, out.grads, out.row_grads, out.hvps, out.thirds
        ),
        num_saved=n,
        t_end=t_end,
        **(stats or {}),
        **timings(timer),
    )
    fields = take_fields(
        out,
        lambda x: np.asarray(x)[members, row_source],
        lambda x: np.asarray(x)[members, slot_source],
    )
    if fixed is not None:
        trained = jax.tree.structure(fields["params"])

        def with_fixed(tree):  # a tree of the parameters' structure
            same = jax.tree.structure(tree) == trained
            return eqx.combine(tree, fixed) if same else tree

        fields.update(
            params=with_fixed(fields["params"]),
            velocity=with_fixed(fields["velocity"]),
            state={k: with_fixed(v) for k, v in fields["state"].items()},
        )
    batch = Trajectory(
        **fields,
        result=result_names(code),
        stats=all_stats,
        meta=meta,
        param_rows=param_rows,
    )
    return batch if batched else _single(batch, all_stats, meta)


def _unpadded(out: Outputs, n_times: int, n_kept: int) -> Outputs:
    """The outputs without the padding of their save rows and parameter slots."""
    fields = take_fields(out, lambda x: x[:, :n_times], lambda x: x[:, :n_kept])
    return dataclasses.replace(out, **fields)


def _valid_rows(out: Outputs, param_rows: np.ndarray, n_times: int):
    """Each member's number of valid rows and result after the cut at its first
    inf/NaN row, and the source row of every row and parameter slot (rows past a
    member's end repeat its last row and final parameters)."""
    n_slots = len(param_rows)
    n, code = np.asarray(out.n_rows).copy(), np.asarray(out.code).copy()
    # The row each slot holds for each member: its save row before the member's
    # last row, the last row for the final slot, none (-1) otherwise.
    slot_row = np.where(param_rows < n[:, None] - 1, param_rows, -1)
    slot_row[:, -1] = n - 1
    rows = np.arange(n_times)
    ok = np.isfinite(out.loss) | (rows >= n[:, None])
    for leaf in jax.tree.leaves(out.params):
        finite = np.isfinite(leaf.reshape(leaf.shape[:2] + (-1,))).all(-1)
        bad = ~finite & (slot_row >= 0)
        ok[np.nonzero(bad)[0], slot_row[bad]] = False
    # Row 0 is always kept: a trajectory shows where it started.
    first_bad = np.where(ok.all(1), n, np.maximum(ok.argmin(1), 1))
    cut = first_bad < n
    # A member cut short ends at its last row before the cut that holds parameters.
    usable = np.where((slot_row >= 0) & (slot_row < first_bad[:, None]), slot_row, -1)
    n = np.where(cut, usable.max(1) + 1, n)
    code = np.where(cut, result_code("diverged"), code)
    final = np.where(cut, usable.argmax(1), n_slots - 1)
    row_source = np.minimum(rows[None, :], np.maximum(n, 1)[:, None] - 1)
    slot_source = np.where(
        param_rows[None, :] < n[:, None] - 1, np.arange(n_slots), final[:, None]
    )
    return n, code, row_source, slot_source


def _single(batch: Trajectory, all_stats: dict, meta: dict) -> Trajectory:
    """Member 0 of a batch of one, with the run's totals among its stats."""
    single = batch.member(0)
    stats = {k: v for k, v in single.stats.items() if k != "t_end"}
    stats.update({k: v for k, v in all_stats.items() if np.ndim(v) == 0 or v is None})
    return Trajectory(
        **take_fields(single, jax.device_put, jax.device_put),
        result=single.result,
        stats=stats,
        meta=meta,
        param_rows=single.param_rows,
    )


def work_stats(steps, accepted, grads, row_grads, hvps, thirds) -> dict[str, Any]:
    """The counters of runs (arrays: one entry per member): steps, gradients,
    Hessian-vector products and third-order products (∇(uᵀHv), a central flow's).
    Solvers whose cost is not counted (implicit methods) report None gradients."""
    steps, accepted = np.asarray(steps), np.asarray(accepted)
    grads, row_grads = np.asarray(grads), np.asarray(row_grads)
    counted = np.all(grads >= 0)
    return {
        "num_steps": steps,
        "num_accepted_steps": accepted,
        "num_rejected_steps": steps - accepted,
        "num_solver_grad_evals": grads if counted else None,
        "num_save_grad_evals": row_grads,
        "num_grad_evals": grads + row_grads if counted else None,
        "num_hvp_evals": np.asarray(hvps),
        "num_third_order_evals": np.asarray(thirds),
    }


def timings(timer) -> dict[str, Any]:
    """The wall, compile and run time of a call, and whether it compiled."""
    return dict(
        wall_time_s=timer.wall_time_s,
        compile_time_s=timer.compile_time_s,
        run_time_s=timer.run_time_s,
        compiled=timer.num_compilations > 0,
        programs_compiled=timer.num_compilations,
        compile_cache_hits=timer.num_cache_hits,
    )


def finish(
    traj: Trajectory,
    entry: str,
    throw: bool,
    kind: str = "flow",
    inputs: dict[str, Any] | None = None,
    flow: Any = None,
):
    """`traj`, or the `SimulationError` of its failure when `throw`. A loss that
    is undefined at the initial parameters is bad input, a ValueError always,
    naming the cause: an input of `inputs` (`{name: pytree}`, read on the host
    only then) with inf/NaN values, or else the loss itself. Then `flow` checks
    its own assumptions on the run (`AbstractFlow.check`)."""
    first_loss = np.atleast_1d(np.asarray(traj.loss)[..., 0])
    undefined = np.flatnonzero(
        (np.atleast_1d(traj.result) == "nonfinite_start") | ~np.isfinite(first_loss)
    )
    if undefined.size:
        for name, tree in (inputs or {}).items():
            require_finite(name, tree)
        members = ""
        if traj.batch_size is not None:
            more = " ..." if undefined.size > 10 else ""
            members = f" (members {undefined[:10].tolist()}{more})"
        raise ValueError(
            f"gflow.{entry}: the loss or its gradient is inf/NaN at the initial "
            f"parameters{members}, though they and the data are finite: the loss is "
            "undefined there (a log or a division at 0, an overflow). Start from "
            "other parameters, or make the loss finite there."
        )
    if flow is not None:
        flow.check(traj)
    return raise_if_failed(traj, entry, kind) if throw else traj
