"""The rod flow of an optimiser: consecutive iterates as the two ends of a rod."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._tree import like_dtype, tree_norm
from ..optimizers import GD, AbstractOptimizer
from ._base import AbstractFlow, FlowState, Work, value_and_grad
from ._stable import checked_optimizer, checked_step0, start_moments, step_at

_SIGNS = (1.0, -1.0)  # the rod's two ends, c + r and c − r


class RodFlow(AbstractFlow):
    """The rod flow of an optimiser (Regis & Chewi 2026): a continuous model that
    follows the optimiser through its edge of stability, where the iterates
    oscillate about a path the stable flow does not take.

    Past the edge, consecutive iterates z_k and z_{k+1} (the parameters, and a
    momentum where the optimiser has one) sit on either side of a slowly moving
    centre. The rod flow integrates that centre c and the half-vector r from it
    to an end, z_k ≈ c ± r. One step z ↦ z + Δ(z) maps the end c + r to
    c − r' and c − r to c + r', so per step

        Δc = ½ [Δ(c + r) + Δ(c − r)],    Δr = −½ [Δ(c + r) − Δ(c − r)] − 2r,

    and per unit flow time (t = k·lr, `base_lr` for a schedule) each divided by
    lr. For gradient descent, Δ = −lr ∇L:

        dc/dt = −½ [∇L(c + r) + ∇L(c − r)],
        dr/dt = ½ [∇L(c + r) − ∇L(c − r)] − (2/lr) r.

    Near c, r grows exactly where the step's Jacobian has an eigenvalue below
    −1: where lr·λ(P⁻¹H) passes the optimiser's own limit (`stability_limit`; 2
    for gradient descent), since Δ is its step. The centre moves by the mean
    of the optimiser's *stable* field at the two ends instead of its discrete
    step (the same for gradient descent): with r = 0 the rod flow is then the
    stable flow, which follows a momentum method's iterates far more closely
    than the flow of its discrete map. A second moment (RMSProp's ν, Adam's v)
    averages g² over the oscillation rather than oscillating with it: it has no
    half-vector, and moves by the mean of the two ends'. It costs two gradients
    per evaluation (at c ± r, batched), no eigenvectors and no third
    derivatives.

    The rod starts centred at the initial state, with the half-vector of the
    first step, r = Δ(z_0)/2; its centre c(t) is to be compared with the
    iterates' midpoints (z_{k−1} + 2 z_k + z_{k+1})/4 (`Trajectory.midpoints`).
    The half-vector and the moments are saved with the parameters
    (`traj.state["r"]`, and `"m"`, `"r_m"`, `"v"` for Adam). Rows hold
    `"predicted_loss"`, the mean loss of the rod's ends (the iterates' loss
    averaged over the oscillation), and `"rod_length"`, ‖r‖ in the parameters.

    Args:
        optimizer: a `gflow.optimizers` optimiser (GD, HeavyBall, Nesterov,
            RMSProp, Adam, NAdam), or a number, the learning rate of plain
            gradient descent.
        moments0: the moments to start from (default: the optimiser's initial
            state), e.g. a discrete run's `traj.state` at a row, to restart
            the flow from that step (`params0` its parameters there).
        step0: the steps taken before the start (flow time 0 is step `step0`).

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.2, key=0)
        >>> rod = gflow.simulate(model, data, 100.0, key=0, ts=gd.ts,
        ...                      flow=gflow.flows.RodFlow(0.2))
        >>> gflow.compare(rod, gd.midpoints()).max_param_distance
        >>> rod.metrics["predicted_loss"], rod.state["r"]
    """

    optimizer: AbstractOptimizer
    moments0: dict[str, Any] | None
    step0: np.ndarray
    cost: ClassVar[Work] = Work(grads=2)
    gradient_field: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: AbstractOptimizer | float,
        *,
        moments0: dict[str, Any] | None = None,
        step0: int = 0,
    ):
        if isinstance(optimizer, int | float) and not isinstance(optimizer, bool):
            optimizer = GD(optimizer)
        self.optimizer = checked_optimizer(optimizer)
        self.moments0, self.step0 = moments0, checked_step0(step0)

    def _halves(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The rod's half-vectors, by the name of what they belong to."""
        return {name: extra[_half(name)] for name in self._rod_names}

    @property
    def _rod_names(self) -> tuple[str, ...]:
        """What oscillates: the parameters, and a momentum."""
        return ("params", *self.optimizer.oscillating)

    def _moments(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The centre of the optimiser's moments."""
        halves = {_half(name) for name in self._rod_names}
        return {k: v for k, v in extra.items() if k not in halves}

    def init(self, loss_fn, params, data):
        moments = start_moments(self.optimizer, self.moments0, params)
        gradient = value_and_grad(loss_fn, params, data)[1]
        step0 = like_dtype(self.step0, params)
        first = _named(self.optimizer.step(step0, params, moments, gradient))
        halves = {
            _half(name): jax.tree.map(lambda x: x / 2, first[name])
            for name in self._rod_names
        }
        return FlowState(params, {**moments, **halves}), None, Work(grads=1)

    def _ends(self, loss_fn, t, state, data):
        """The losses at the two ends c ± r, and what a step adds at each: one
        batched gradient for both."""
        moments = self._moments(state.extra)
        halves = self._halves(state.extra)
        lr, s = step_at(self.optimizer, self.step0, t, state.params)

        def end(sign):
            def moved(x, r):
                return x + sign * r

            params = jax.tree.map(moved, state.params, halves["params"])
            at = {
                k: jax.tree.map(moved, v, halves[k]) if k in halves else v
                for k, v in moments.items()
            }
            loss, gradient = value_and_grad(loss_fn, params, data)
            stable, steps = (
                self.optimizer.increments(s, params, at, gradient, discrete)
                for discrete in (False, True)
            )
            return loss, _named(stable), _named(steps)

        signs = jnp.asarray(_SIGNS, jnp.result_type(lr))
        return jax.vmap(end)(signs)

    def _derivative(self, loss_fn, t, state, data):
        """d(state)/dt, and the losses at the rod's ends."""
        losses, stable, steps = self._ends(loss_fn, t, state, data)
        lr = like_dtype(self.optimizer.base_lr, state.params)

        def mean(x):
            return (x[0] + x[1]) / (2 * lr)

        def spread(x):
            return (x[0] - x[1]) / (2 * lr)

        centre = jax.tree.map(mean, stable)
        halves = self._halves(state.extra)
        rates = {
            _half(name): jax.tree.map(
                lambda d, r: -spread(d) - 2 * r / lr, steps[name], halves[name]
            )
            for name in halves
        }
        moments = {k: centre[k] for k in self._moments(state.extra)}
        return FlowState(centre["params"], {**moments, **rates}), losses

    def vector_field(self, loss_fn: Callable) -> Callable:
        def field(t, state, data, carried):
            return self._derivative(loss_fn, t, state, data)[0]

        return field

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        derivative, losses = self._derivative(loss_fn, t, state, data)
        length = tree_norm(state.extra[_half("params")])
        metrics = {"predicted_loss": jnp.mean(losses), "rod_length": length}
        return derivative.params, metrics, self.cost

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass


def _named(change: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    """(Δparams, Δmoments) as one dict, the parameters' under "params"."""
    params, moments = change
    return {"params": params, **moments}


def _half(name: str) -> str:
    """The name a half-vector is saved under: "r" for the parameters', "r_m"
    for a momentum's."""
    return "r" if name == "params" else f"r_{name}"
