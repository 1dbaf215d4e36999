"""The flow protocol: what the engine asks of anything it integrates."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import require_positive


class AbstractFlow(eqx.Module):
    """The vector field (and noise) of a solve, built from a loss.

    A flow declares what it costs, so that `stats` counts every gradient,
    Hessian-vector product and third-order product exactly, and what kind of
    equation it is:

    Attributes:
        cost: (gradients, Hessian-vector products, third-order products) of one
            evaluation of the terms.
        row_cost: (Hessian-vector products, third-order products) `row_values`
            spends on a saved row, besides its gradient.
        start_cost: (gradients, Hessian-vector products, third-order products)
            `initial_state` spends.
        refresh_cost: the same for one call of `refreshed` (after every step
            attempt).
        gradient_field: whether the vector field is −∇ of some function (its
            Jacobian symmetric, its eigenvalues real), as the stabilized solvers
            (`"rkc2"`, `"rock4"`, and `"auto"`'s switch to them) require.
        is_sde: whether the flow has noise (an `AbstractSDEFlow`, solved by
            Euler–Maruyama).
        velocity_is_field: whether `velocity` at a state is the vector field
            there (its state is the parameters): the engine then starts the
            solver from the first saved row's velocity instead of evaluating the
            field again.

    Subclasses implement `vector_field`, and override `initial_state`, `params`
    and `velocity` when their state is more than the parameters. A flow whose
    state also carries what is not integrated (a central flow's tracked
    eigenvectors: a warm start) overrides `refreshed` and `controlled`; one with
    metrics of its own overrides `row_values`.
    """

    cost: ClassVar[tuple[int, int, int]] = (1, 0, 0)
    row_cost: ClassVar[tuple[int, int]] = (0, 0)
    start_cost: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    refresh_cost: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    gradient_field: ClassVar[bool] = True
    is_sde: ClassVar[bool] = False
    velocity_is_field: ClassVar[bool] = True

    def initial_state(self, loss_fn: Callable, params: Any, data: Any) -> Any:
        """The solver's state at t = 0 for initial parameters `params`."""
        return params

    def params(self, state: Any) -> Any:
        """The parameters within a solver state."""
        return state

    @abc.abstractmethod
    def vector_field(self, loss_fn: Callable) -> Callable:
        """`f(t, state, data)`: the time derivative of the state (the drift)."""

    def terms(self, loss_fn: Callable, path: Any = None) -> diffrax.AbstractTerm:
        """The diffrax terms of the equation (`path`: the Brownian motion of an
        SDE flow)."""
        return diffrax.ODETerm(self.vector_field(loss_fn))

    def velocity(self, loss_fn: Callable, state: Any, data: Any, grad: Any) -> Any:
        """dθ/dt at `state`, given the loss gradient `grad` there."""
        return self.params(self.vector_field(loss_fn)(0.0, state, data))

    def cost_at(self, state: Any) -> tuple[Any, Any, Any]:
        """`cost` for evaluations in a step from `state` (a flow whose work
        depends on where it is overrides this; integers, maybe traced)."""
        return self.cost

    def row_values(
        self, loss_fn: Callable, state: Any, data: Any, loss: Any, grad: Any
    ) -> tuple[Any, dict[str, Any], tuple[Any, Any]]:
        """What a saved row holds besides the loss and gradient norm (`loss` and
        `grad` there, already computed): dθ/dt, the flow's own metrics (none by
        default), and the work spent on them (Hessian-vector products,
        third-order products: `row_cost`)."""
        return self.velocity(loss_fn, state, data, grad), {}, self.row_cost

    def refreshed(self, loss_fn: Callable, state: Any, data: Any) -> Any:
        """The state after a step attempt, with what the flow carries besides the
        integrated variables brought up to date (nothing by default)."""
        return state

    def controlled(self, state: Any) -> Any:
        """The part of the state whose error the step-size control measures."""
        return state

    def check(self, trajectory: Any) -> None:
        """Raise if a finished run shows the flow's own assumptions failing."""

    def prepared(self, model: Any, bind: Callable, params: Any, data: Any):
        """The flow ready to run on `model`'s data: what it takes from the model
        (SGD's per-example loss, with `bind` putting back the fixed leaves),
        checked against `params` and `data`."""
        return self


class AbstractSDEFlow(AbstractFlow):
    """A flow with noise: the Itô SDE dθ = f dt + g dW, solved by Euler–Maruyama
    at a fixed step on a Brownian path drawn from the run's `noise_key`.

    Besides the drift (`vector_field`), it declares the diffusion `g`, the shape
    of the Brownian motion `W` and the default step.
    """

    is_sde: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def default_dt0(self) -> float:
        """The Euler–Maruyama step used unless `dt0=` is given."""

    @abc.abstractmethod
    def noise_shape(self, params: Any, data: Any) -> jax.ShapeDtypeStruct:
        """The shape and dtype of the Brownian motion at parameters `params`."""

    @abc.abstractmethod
    def diffusion(self) -> Callable:
        """`g(t, state, data)`: the diffusion, a linear operator on dW."""

    def terms(self, loss_fn: Callable, path: Any = None) -> diffrax.AbstractTerm:
        if path is None:
            raise ValueError(
                f"flow {type(self).__name__} needs a Brownian path (`noise_key=`)."
            )
        return diffrax.MultiTerm(
            diffrax.ODETerm(self.vector_field(loss_fn)),
            diffrax.ControlTerm(self.diffusion(), path),
        )


@eqx.filter_jit
def value_and_grad(loss_fn: Callable, params: Any, data: Any):
    """The loss and its gradient at `params`. Jitted, so that a program which
    evaluates the gradient at several places (the solver's stages, the saved rows,
    a member's start) traces it once: its trace is cached and shared."""
    return jax.value_and_grad(loss_fn)(params, data)


def grad(loss_fn: Callable, params: Any, data: Any):
    """The gradient of the loss at `params` (see `value_and_grad`)."""
    return value_and_grad(loss_fn, params, data)[1]


def describe_flow(flow: AbstractFlow) -> str:
    """The flow and its settings, e.g. "HeavyBall(lr=0.01, momentum=0.9)": for
    `Trajectory.meta` and checkpoint fingerprints (stable across processes)."""
    settings = [
        f"{name}={value.item() if isinstance(value, np.ndarray) else value}"
        for name, value in vars(flow).items()
        if isinstance(value, np.ndarray | int | float | str)
    ]
    return f"{type(flow).__name__}({', '.join(settings)})"


def _rate(name: str, value: Any) -> np.ndarray:
    """A positive finite rate, kept as an array so that new values reuse the
    compiled program."""
    require_positive(name, value)
    return np.asarray(value, np.float64)


def _like(x: Any, tree: Any) -> jax.Array:
    """`x` in the floating-point dtype of `tree` (a float32 run stays float32)."""
    return jnp.asarray(x, jnp.result_type(*jax.tree.leaves(tree)))
