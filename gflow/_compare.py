"""Two trajectories compared at their common save times."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from ._checks import require_positive
from ._trajectory import Trajectory


class Comparison(eqx.Module):
    """Two trajectories compared at their common save times (see `gflow.compare`).

    Attributes:
        ts: the common save times.
        param_distance: `‖θ_b(t) − θ_a(t)‖ / max(‖θ_a(t)‖, ‖θ_b(t)‖)` over all
            parameters (0 where both are zero).
        loss_gap: `L_b(t) − L_a(t)`.
        tol: the tolerance used for `first_difference_time`.
        first_difference_time: the first common time at which `param_distance`
            exceeds `tol`, or None if it never does.
    """

    ts: np.ndarray
    param_distance: np.ndarray
    loss_gap: np.ndarray
    tol: float
    first_difference_time: float | None

    @property
    def max_param_distance(self) -> float:
        return float(np.max(self.param_distance))

    @property
    def max_loss_gap(self) -> float:
        """The largest |L_b − L_a| over the common save times."""
        return float(np.max(np.abs(self.loss_gap)))

    @property
    def max_param_distance_time(self) -> float:
        """The common time of the largest parameter distance."""
        return float(self.ts[int(np.argmax(self.param_distance))])

    def summary(self) -> str:
        """A few readable lines: the span compared, the distances, where the two
        part."""
        first = self.first_difference_time
        parted = (
            f"they differ by more than {self.tol:g} from t = {first:.5g} on"
            if first is not None
            else f"they never differ by more than {self.tol:g}"
        )
        return "\n".join(
            [
                f"Comparison at {len(self.ts)} common save times, t in "
                f"[{self.ts[0]:.5g}, {self.ts[-1]:.5g}]:",
                f"  largest relative parameter distance {self.max_param_distance:.3g}"
                f" (at t = {self.max_param_distance_time:.5g}), final "
                f"{self.param_distance[-1]:.3g};",
                f"  largest |loss gap| {self.max_loss_gap:.3g}, final "
                f"{self.loss_gap[-1]:.3g}; {parted}.",
            ]
        )

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def compare(a: Trajectory, b: Trajectory, *, tol: float = 1e-2) -> Comparison:
    """Compare trajectory `b` with the reference `a` at their common save times.

    Times are matched to a relative 1e-9, so run both with the same `ts` (gradient
    descent rounds its save times to whole steps: pass its `gd.ts` to `simulate`).

    Args:
        a: the reference (e.g. the flow).
        b: the other run (e.g. gradient descent).
        tol: the relative parameter distance that counts as "differing".

    Returns:
        A `Comparison` with `ts`, `param_distance`, `loss_gap` and
        `first_difference_time`.

    Raises:
        ValueError: different parameter structures or shapes, or fewer than two
            common save times.

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.1, key=0)
        >>> flow = gflow.simulate(model, data, 100.0, key=0, ts=gd.ts)
        >>> c = gflow.compare(flow, gd, tol=1e-3)
        >>> c.first_difference_time, c.max_param_distance
    """
    if not isinstance(a, Trajectory) or not isinstance(b, Trajectory):
        raise TypeError("compare(a, b) takes two gflow.Trajectory objects.")
    require_positive("tol", tol)
    # Compared: the trained leaves (floating-point arrays), in the same structure.
    trained_a = eqx.filter(a.params, eqx.is_inexact_array)
    trained_b = eqx.filter(b.params, eqx.is_inexact_array)
    shapes_a = jax.tree.map(lambda x: x.shape[1:], trained_a)
    shapes_b = jax.tree.map(lambda x: x.shape[1:], trained_b)
    if jax.tree.structure(shapes_a) != jax.tree.structure(shapes_b) or (
        jax.tree.leaves(shapes_a) != jax.tree.leaves(shapes_b)
    ):
        raise ValueError("the two trajectories have different parameter structures.")
    # The times at which both hold parameters (every save unless params_at=...).
    ts_a = np.asarray(a.ts, dtype=np.float64)[a.param_rows]
    ts_b = np.asarray(b.ts, dtype=np.float64)[b.param_rows]
    j = np.clip(np.searchsorted(ts_b, ts_a), 0, len(ts_b) - 1)
    j_left = np.clip(j - 1, 0, len(ts_b) - 1)
    j = np.where(np.abs(ts_b[j_left] - ts_a) < np.abs(ts_b[j] - ts_a), j_left, j)
    match = np.isclose(ts_b[j], ts_a, rtol=1e-9, atol=1e-12)
    if match.sum() < 2:
        raise ValueError(
            "the trajectories share fewer than two save times with parameters; run "
            "both with the same `ts` (e.g. simulate(..., ts=gd.ts)) and "
            "params_at='all'."
        )
    i, j = np.nonzero(match)[0], j[match]

    def flat(traj, rows):
        leaves = [
            np.asarray(x)[rows].reshape(len(rows), -1)
            for x in jax.tree.leaves(eqx.filter(traj.params, eqx.is_inexact_array))
        ]
        return np.concatenate(leaves, axis=1).astype(np.float64)

    theta_a, theta_b = flat(a, i), flat(b, j)
    # Relative to the larger of the two norms, and 0 where both are zero (e.g.
    # parameters that start at zero), so the measure is always defined.
    scale = np.maximum(np.linalg.norm(theta_a, axis=1), np.linalg.norm(theta_b, axis=1))
    gap = np.linalg.norm(theta_b - theta_a, axis=1)
    distance = np.where(scale > 0, gap / np.where(scale > 0, scale, 1.0), 0.0)
    loss_gap = (
        np.asarray(b.loss, np.float64)[b.param_rows[j]]
        - np.asarray(a.loss, np.float64)[a.param_rows[i]]
    )
    over = np.nonzero(distance > tol)[0]
    return Comparison(
        ts=ts_a[i],
        param_distance=distance,
        loss_gap=loss_gap,
        tol=float(tol),
        first_difference_time=float(ts_a[i][over[0]]) if len(over) else None,
    )
