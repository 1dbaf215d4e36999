"""How a run ended: the results enumeration, and what every entry point does with it.

One place for: the outcome of a run (`RESULTS`, whose items carry the message and
the hint a user sees), the rows a trajectory may show (cut at the first inf/NaN),
and the error raised when a run failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import numpy as np

from ._errors import SimulationError

if TYPE_CHECKING:
    from ._trajectory import Trajectory


class RESULTS(eqx.Enumeration):
    """Why a run ended. Each message is a template: `{where}` says when and at what
    loss, `{max_steps}` the step budget, `{advice}` what to try for this kind of run.
    """

    successful = ""
    stopped_at_loss = "the loss fell to `stop_at_loss` {where}."
    stopped_at_grad_norm = "the gradient norm fell to `stop_at_grad_norm` {where}."
    stopped_by_condition = "`stop_when` held {where}."
    max_steps_reached = (
        "the solver used all max_steps={max_steps} steps {where}. Raise `max_steps`, "
        "loosen rtol/atol, or, if the flow is stiff (its steps pinned near "
        "3/sharpness), use solver='auto' or a stabilized solver ('rkc2', 'rock4'). "
        "If the loss or |grad| is exploding, the flow itself may blow up in finite "
        "time."
    )
    diverged = (
        "the run diverged: the loss or the parameters became inf/NaN after the last "
        "finite save {where}. {advice}"
    )
    dt_min_reached = (
        "the step size collapsed to the resolution of t {where}: the solver cannot "
        "advance. The flow may blow up in finite time there; otherwise use float64 "
        "or a stiff solver (solver='auto')."
    )
    solver_failed = "the solver failed {where}."


#: Names of the results, in the order of their codes.
RESULT_NAMES: tuple[str, ...] = tuple(RESULTS._name_to_item)
#: Results that mean a run ended where it was asked to.
SUCCESS_RESULTS = (
    "successful",
    "stopped_at_loss",
    "stopped_at_grad_norm",
    "stopped_by_condition",
)
_ADVICE = {
    "flow": "Check the loss for overflow (use float64: jax.config.update("
    "'jax_enable_x64', True)), tighten rtol/atol, or shorten t_max.",
    "discrete": "The learning rate is probably above 2 / (top Hessian eigenvalue) "
    "somewhere on the path: lower it, or use gflow.simulate for the flow itself.",
}


def result_code(name: str) -> int:
    """The integer code of a result name."""
    return RESULT_NAMES.index(name)


def result_names(codes: Any) -> Any:
    """Result names from codes: a string for a scalar, an array of strings else."""
    names = np.asarray(RESULT_NAMES)[np.asarray(codes)]
    return str(names) if names.ndim == 0 else names


def finite_rows(loss: np.ndarray, params: Any, rows: np.ndarray) -> np.ndarray:
    """Whether each row has a finite loss and finite parameters (`rows` marks the
    rows that hold parameters; the others are judged by their loss alone). Leading
    axes of `loss`: (..., T)."""
    finite = np.isfinite(loss)
    for leaf in jax.tree.leaves(params):
        leaf = np.asarray(leaf)
        ok = np.isfinite(leaf.reshape(leaf.shape[: loss.ndim] + (-1,))).all(axis=-1)
        # Parameters are kept only at some rows: spread them over the row axis.
        spread = np.ones_like(finite)
        spread[..., rows] = ok
        finite &= spread
    return finite


def cut_at_nonfinite(n_rows: np.ndarray, codes: np.ndarray, finite: np.ndarray):
    """Rows kept and result codes once each run is cut at its first non-finite row:
    a trajectory never presents inf/NaN states as data. Works on a single run
    (scalars, `finite` of shape (T,)) or a batch."""
    rows = np.arange(finite.shape[-1])
    bad = ~finite & (rows < np.expand_dims(n_rows, -1))
    first_bad = np.where(bad.any(-1), bad.argmax(-1), n_rows)
    codes = np.where(first_bad < n_rows, result_code("diverged"), codes)
    return first_bad, codes


def failure_message(traj: Trajectory, entry: str, kind: str) -> str:
    """What went wrong in a single failed run, when, and what to try."""
    t_end = float(traj.ts[-1]) if len(traj) else 0.0
    where = (
        f"at t = {t_end:.8g} of t_max = {traj.meta['t_max']:g} (loss "
        f"{float(traj.loss[-1]):.6g}, |grad| {float(traj.grad_norm[-1]):.3g})"
        if len(traj)
        else "before the first save"
    )
    template = RESULTS[getattr(RESULTS, traj.result)]
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
