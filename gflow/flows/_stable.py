"""The stable flow of an optimiser: its first-order continuous model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_int
from .._tree import like_dtype
from ..optimizers import AbstractOptimizer
from ..optimizers._optimizers import OPTIMIZERS
from ._base import AbstractFlow, FlowState, Work, grad


class StableFlow(AbstractFlow):
    """The stable flow of an optimiser: the ODE its iterates follow while the
    step is stable (below the optimiser's edge of stability), in the phase space
    of the parameters and the optimiser's state.

    Each optimiser of `gflow.optimizers` defines it (see its docstring): an
    exponential moving average m ← β m + (1 − β) x becomes
    dm/ds = (−ln β)(x − m), exact between steps for a constant x, and the update
    θ ← θ − lr u(m, g) becomes dθ/ds = −lr u, per step s. On gflow's time axis
    t = s·`base_lr` (step k at t = k·base_lr, as `gflow.gradient_descent` puts
    it). `GD(lr)`'s is the gradient flow. The moments are integrated and saved
    with the parameters (`traj.state`, e.g. `"m"` and `"v"` for Adam).

    At fixed decay rates its distance to the optimiser's iterates shrinks in
    proportion to lr; past the edge of stability (Adam's preconditioned
    sharpness at 2(1 + b1)/((1 − b1)·lr)) the iterates leave it.

    Args:
        optimizer: a `gflow.optimizers` optimiser. New hyperparameter values of
            the same kind reuse the compiled program.
        moments0: the moments to start from (default: the optimiser's initial
            state), e.g. a discrete run's at a row, `traj.state` there, to
            restart the flow from that step.
        step0: the steps taken before the start (bias corrections and
            schedules go on from there; flow time 0 is step `step0`).

    Examples:
        >>> adam = gflow.optimizers.Adam(1e-3)
        >>> run = gflow.gradient_descent(model, data, 2.0, optimizer=adam, key=0)
        >>> flow = gflow.simulate(model, data, 2.0, key=0, ts=run.ts,
        ...                       flow=gflow.flows.StableFlow(adam))
        >>> gflow.compare(flow, run).max_param_distance   # ~ lr
        >>> flow.state["v"]                                # Adam's second moment
    """

    optimizer: AbstractOptimizer
    moments0: dict[str, Any] | None
    step0: np.ndarray
    cost: ClassVar[Work] = Work(grads=1)
    gradient_field: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: AbstractOptimizer,
        *,
        moments0: dict[str, Any] | None = None,
        step0: int = 0,
    ):
        self.optimizer = checked_optimizer(optimizer)
        self.moments0, self.step0 = moments0, checked_step0(step0)

    def init(self, loss_fn, params, data):
        moments = start_moments(self.optimizer, self.moments0, params)
        return FlowState(params, moments), None, Work()

    def _velocity(self, t, state, gradient):
        """(dθ/dt, d moments/dt) at flow time t."""
        base, s = step_at(self.optimizer, self.step0, t, state.params)
        velocity, rates = self.optimizer.stable_field(
            s, state.params, state.extra, gradient
        )
        return jax.tree.map(lambda x: x / base, (velocity, rates))

    def vector_field(self, loss_fn: Callable) -> Callable:
        def field(t, state, data, carried):
            velocity, rates = self._velocity(
                t, state, grad(loss_fn, state.params, data)
            )
            return FlowState(velocity, rates)

        return field

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        return self._velocity(t, state, grad)[0], {}, Work()

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass


def checked_optimizer(optimizer: Any) -> AbstractOptimizer:
    """An optimiser of `gflow.optimizers`, or a TypeError listing them."""
    if type(optimizer) not in OPTIMIZERS:
        names = ", ".join(kind.__name__ for kind in OPTIMIZERS)
        raise TypeError(
            f"`optimizer` must be one of gflow.optimizers ({names}); got "
            f"{type(optimizer).__name__}."
        )
    return optimizer


def step_at(optimizer: AbstractOptimizer, step0: Any, t: Any, like: Any):
    """(base_lr, s): the flow time per step, and the optimiser's step count s
    at flow time t (`step0` + t / base_lr), in the dtype of `like`."""
    base = like_dtype(optimizer.base_lr, like)
    return base, t / base + like_dtype(step0, like)


def checked_step0(step0: Any) -> np.ndarray:
    """A step count ≥ 0, as an array (new values reuse the program)."""
    check_int("step0", step0, 0)
    return np.asarray(step0, np.float64)


def start_moments(optimizer: AbstractOptimizer, moments0: Any, params: Any):
    """The moments a flow starts from: `moments0` in the parameters' dtype,
    checked against the optimiser's own, or its initial state."""
    initial = optimizer.moments(params)
    if moments0 is None:
        return initial
    expected = jax.tree.map(jnp.shape, initial)
    try:
        given = jax.tree.map(jnp.shape, moments0)
    except (TypeError, ValueError):
        given = None
    if given != expected:
        raise ValueError(
            f"`moments0` must be {type(optimizer).__name__}'s moments, shaped as "
            f"{expected} (e.g. a row of a discrete run's `traj.state`); got "
            f"{given if given is not None else type(moments0).__name__}."
        )
    return jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype), moments0, initial)
