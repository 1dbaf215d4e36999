"""The exception gflow raises when a solve does not reach its end."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
