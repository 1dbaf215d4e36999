"""What a solve integrates: the gradient flow, or a continuous model of an optimiser.

A flow turns a loss into the differential equation gflow solves. Its state may be
more than the parameters (a heavy-ball flow carries a velocity); `params(state)`
says which part they are, and `velocity(...)` gives dθ/dt at a saved state, which
`Trajectory.at` uses to interpolate between saves.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp


class AbstractFlow(eqx.Module):
    """The vector field (and noise) of a solve, built from a loss."""

    def initial_state(self, params: Any) -> Any:
        """The solver's state at t = 0 for initial parameters `params`."""
        return params

    def params(self, state: Any) -> Any:
        """The parameters within a solver state."""
        return state

    @abc.abstractmethod
    def vector_field(self, loss_fn: Callable) -> Callable:
        """`f(t, state, data)`: the time derivative of the state."""

    def terms(self, loss_fn: Callable, noise_key: Any = None) -> diffrax.AbstractTerm:
        """The diffrax terms of the equation."""
        return diffrax.ODETerm(self.vector_field(loss_fn))

    def velocity(self, loss_fn: Callable, state: Any, data: Any, grad: Any) -> Any:
        """dθ/dt at `state`, given the loss gradient `grad` there."""
        return self.params(self.vector_field(loss_fn)(0.0, state, data))

    @property
    def is_sde(self) -> bool:
        return False


class GradientFlow(AbstractFlow):
    """The gradient flow dθ/dt = −∇L(θ): the η → 0 limit of gradient descent.

    Example:
        >>> traj = gflow.simulate(loss, data, 10.0, params0=p0,
        ...                       flow=gflow.flows.GradientFlow())  # the default
    """

    def vector_field(self, loss_fn: Callable) -> Callable:
        grad = jax.grad(loss_fn)

        def field(t, params, data):
            return jax.tree.map(jnp.negative, grad(params, data))

        return field

    def velocity(self, loss_fn, state, data, grad):
        return jax.tree.map(jnp.negative, grad)
