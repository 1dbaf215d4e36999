"""The exception gflow raises when a run does not reach its end, and the message
that says what happened, when, and what to try."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._results import RESULTS

if TYPE_CHECKING:
    from ._trajectory import Trajectory


class SimulationError(RuntimeError):
    """A simulation stopped before `t_max` for a reason other than a requested stop.

    Raised by [`gflow.simulate`][] with `throw=True` (the default) when the solver
    reaches `max_steps`, its step size collapses, or the flow diverges (the loss or
    the parameters become inf/NaN).

    Attributes:
        result: why the solve ended, as in `Trajectory.result`.
        trajectory: the trajectory up to the failure (valid rows only). Pass
            `throw=False` to get it returned instead of raised.
    """

    def __init__(self, message: str, result: str, trajectory: Trajectory):
        super().__init__(message)
        self.result = result
        self.trajectory = trajectory


_ADVICE = {
    "flow": "Check the loss for overflow (use float64: jax.config.update("
    "'jax_enable_x64', True)), tighten rtol/atol, or shorten t_max.",
    "discrete": "The learning rate is probably above 2 / (top Hessian eigenvalue) "
    "somewhere on the path: lower it, or use gflow.simulate for the flow itself.",
}


def failure_message(traj: Trajectory, entry: str, kind: str) -> str:
    """What went wrong in a single failed run, when, and what to try."""
    t_end = float(traj.ts[-1]) if len(traj) else 0.0
    where = (
        f"at t = {t_end:.8g} of t_max = {traj.meta['t_max']:g} (loss "
        f"{float(traj.loss[-1]):.6g}, |grad| {float(traj.grad_norm[-1]):.3g})"
        if len(traj)
        else "before the first save"
    )
    template = RESULTS[traj.result]
    reason = template.format(
        where=where, max_steps=traj.meta.get("max_steps"), advice=_ADVICE[kind]
    )
    return (
        f"gflow.{entry}: {reason} Pass throw=False to get the trajectory up to this "
        "point."
    )


def raise_if_failed(traj: Trajectory, entry: str, kind: str = "flow") -> Trajectory:
    """`traj`, or a `SimulationError` saying why it failed: for an ensemble, how many
    members failed by reason, and the first one's story."""
    if traj.batch_size is None:
        if not traj.succeeded:
            raise SimulationError(failure_message(traj, entry, kind), traj.result, traj)
        return traj
    failed = ~np.asarray(traj.succeeded)
    if failed.any():
        names, counts = np.unique(traj.result[failed], return_counts=True)
        detail = ", ".join(f"{n} {name}" for name, n in zip(names, counts, strict=True))
        first = int(np.flatnonzero(failed)[0])
        story = failure_message(traj.member(first), entry, kind).split(": ", 1)[1]
        raise SimulationError(
            f"gflow.{entry}: {int(failed.sum())} of {traj.batch_size} members failed "
            f"({detail}); the first is member {first}: {story}",
            traj.result[first],
            traj,
        )
    return traj
