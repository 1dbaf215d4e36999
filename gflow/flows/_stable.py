"""The stable flow of an optimiser: its first-order continuous model."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import jax

from .._tree import like_dtype
from ..optimizers import AbstractOptimizer
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

    Examples:
        >>> adam = gflow.optimizers.Adam(1e-3)
        >>> run = gflow.gradient_descent(model, data, 2.0, optimizer=adam, key=0)
        >>> flow = gflow.simulate(model, data, 2.0, key=0, ts=run.ts,
        ...                       flow=gflow.flows.StableFlow(adam))
        >>> gflow.compare(flow, run).max_param_distance   # ~ lr
        >>> flow.state["v"]                                # Adam's second moment
    """

    optimizer: AbstractOptimizer
    cost: ClassVar[Work] = Work(grads=1)
    gradient_field: ClassVar[bool] = False

    def __init__(self, optimizer: AbstractOptimizer):
        if not isinstance(optimizer, AbstractOptimizer):
            raise TypeError(
                "`optimizer` must be one of gflow.optimizers (GD, HeavyBall, "
                "Nesterov, RMSProp, Adam, NAdam); got "
                f"{type(optimizer).__name__}."
            )
        self.optimizer = optimizer

    def init(self, loss_fn, params, data):
        return FlowState(params, self.optimizer.moments(params)), None, Work()

    def _velocity(self, t, state, gradient):
        """(dθ/dt, d moments/dt) at flow time t."""
        base = like_dtype(self.optimizer.base_lr, state.params)
        velocity, rates = self.optimizer.stable_field(
            t / base, state.params, state.extra, gradient
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

    def update(self, loss_fn, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass
