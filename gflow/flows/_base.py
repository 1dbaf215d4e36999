"""The flow protocol: what the engine asks of anything it integrates."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np

from .._checks import require_positive
from ..optimizers import AbstractOptimizer
from ..optimizers._optimizers import describe


class Work(eqx.Module):
    """Work in the units `stats` counts: gradients, Hessian-vector products and
    third-order products ∇(uᵀ H v). Python or traced integers; work adds, and
    multiplies by a count of evaluations.

    Examples:
        >>> Work(grads=1, hvps=2) * 3 + Work(thirds=1)
        Work(grads=3, hvps=6, thirds=1)
    """

    grads: Any = 0
    hvps: Any = 0
    thirds: Any = 0

    def __add__(self, other: Work) -> Work:
        return Work(
            self.grads + other.grads,
            self.hvps + other.hvps,
            self.thirds + other.thirds,
        )

    def __mul__(self, count: Any) -> Work:
        return Work(count * self.grads, count * self.hvps, count * self.thirds)

    __rmul__ = __mul__


class FlowState(eqx.Module):
    """What a flow integrates: the parameters θ, and the flow's own variables by
    name (a heavy-ball flow's velocity, an adaptive method's second moments; none
    for the gradient flow). Every part is integrated and error-controlled, and the
    own variables are saved at the parameter rows (`Trajectory.state`)."""

    params: Any
    extra: dict[str, Any] = eqx.field(default_factory=dict)


class AbstractFlow(eqx.Module):
    """The vector field (and noise) of a solve, built from a loss.

    A flow splits its state in two. What it *integrates* is a `FlowState`: the
    parameters and its own variables, stepped by the solver and measured by the
    step-size control. What it only *carries* (a central flow's eigenvectors, a
    warm start; None when nothing) is an argument of the vector field, brought
    up to date after every step attempt (`update`), never interpolated or
    error-controlled. Every piece of work is returned as a `Work` with the value
    it paid for, so that `stats` counts gradients, Hessian-vector products and
    third-order products exactly.

    Abstract/final in Equinox's sense: a flow implements every abstract member
    below and is not subclassed further; the concrete members here are not
    overridden.

    Attributes:
        cost: the most one evaluation of the vector field costs (`Work`).
        gradient_field: whether the vector field is −∇ of some function (its
            Jacobian symmetric, its eigenvalues real), as the stabilized solvers
            (`"rkc2"`, `"rock4"`, and `"auto"`'s switch to them) require.

    Examples:
        A flow written outside gflow, the gradient flow of a rescaled loss:

        >>> class Scaled(gflow.flows.AbstractFlow):
        ...     scale: float
        ...     cost: ClassVar[gflow.flows.Work] = gflow.flows.Work(grads=1)
        ...     gradient_field: ClassVar[bool] = True
        ...     def init(self, loss_fn, params, data):
        ...         return gflow.flows.FlowState(params), None, gflow.flows.Work()
        ...     def vector_field(self, loss_fn):
        ...         def field(t, state, data, carried):
        ...             g = gflow.flows.grad(loss_fn, state.params, data)
        ...             return gflow.flows.FlowState(jax.tree.map(
        ...                 lambda x: -self.scale * x, g))
        ...         return field
        ...     def evaluation_cost(self, carried):
        ...         return self.cost
        ...     def row(self, loss_fn, t, state, carried, data, loss, grad):
        ...         velocity = jax.tree.map(lambda x: -self.scale * x, grad)
        ...         return velocity, {}, gflow.flows.Work()
        ...     def update(self, loss_fn, t, state, carried, data):
        ...         return carried, gflow.flows.Work()
        ...     def check(self, trajectory):
        ...         pass
        >>> traj = gflow.simulate(loss, data, 1.0, params0=p0, flow=Scaled(2.0))
    """

    cost: eqx.AbstractVar[Work]
    gradient_field: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def init(
        self, loss_fn: Callable, params: Any, data: Any
    ) -> tuple[FlowState, Any, Work]:
        """The state at t = 0 from initial parameters `params`, what the flow
        carries (None: nothing), and the work that cost."""

    @abc.abstractmethod
    def vector_field(self, loss_fn: Callable) -> Callable:
        """`f(t, state, data, carried)`: the time derivative of the state (a
        `FlowState` of the same structure; an SDE flow's drift)."""

    @abc.abstractmethod
    def evaluation_cost(self, carried: Any) -> Work:
        """The work of one evaluation of the vector field with `carried` (at
        most `cost`; integers, maybe traced)."""

    @abc.abstractmethod
    def row(
        self,
        loss_fn: Callable,
        t: Any,
        state: FlowState,
        carried: Any,
        data: Any,
        loss: Any,
        grad: Any,
    ) -> tuple[Any, dict[str, Any], Work]:
        """What a saved row at time `t` holds besides the loss and gradient norm
        (`loss` and `grad` at `state`, already computed): dθ/dt, the flow's own
        metrics, and
        the work spent on them. A flow that integrates the parameters alone
        returns its vector field's dθ/dt here (the engine then starts the
        solver from the first row's)."""

    @abc.abstractmethod
    def update(
        self, loss_fn: Callable, t: Any, state: FlowState, carried: Any, data: Any
    ) -> tuple[Any, Work]:
        """What the flow carries, brought up to date at `state`, the end (time
        `t`) of a step attempt (kept if the step is), and the work that cost."""

    @abc.abstractmethod
    def check(self, trajectory: Any) -> None:
        """Raise if a finished run shows the flow's own assumptions failing."""

    @property
    def is_sde(self) -> bool:
        """Whether the flow has noise (an `AbstractSDEFlow`, solved by
        Euler–Maruyama)."""
        return isinstance(self, AbstractSDEFlow)

    def field(self, loss_fn: Callable, carried: Any) -> Callable:
        """The vector field (an SDE flow's drift) with what the flow carries
        bound: `f(t, state, data)`, as diffrax and the engine call it."""
        field = self.vector_field(loss_fn)
        return lambda t, y, data: field(t, y, data, carried)

    def terms(self, loss_fn: Callable, carried: Any, path: Any = None):
        """The diffrax terms of the equation, with `carried` as the vector
        field's argument (`path`: the Brownian motion of an SDE flow)."""
        drift = diffrax.ODETerm(self.field(loss_fn, carried))
        if not self.is_sde:
            return drift
        if path is None:
            raise ValueError(
                f"flow {type(self).__name__} needs a Brownian path (`noise_key=`)."
            )
        return diffrax.MultiTerm(drift, diffrax.ControlTerm(self.diffusion(), path))


def velocity_is_field(state: FlowState) -> bool:
    """Whether a row's velocity at `state` is the vector field there: the state
    is the parameters alone (see `AbstractFlow.row`)."""
    return not state.extra


class AbstractSDEFlow(AbstractFlow):
    """A flow with noise: the Itô SDE dθ = f dt + g dW, solved by Euler–Maruyama
    at a fixed step on a Brownian path drawn from the run's `noise_key`.

    Besides the drift (`vector_field`), it declares the diffusion `g`, the shape
    of the Brownian motion `W`, the default step, and what it takes from the
    model (`prepared`).
    """

    @property
    @abc.abstractmethod
    def default_dt0(self) -> float:
        """The Euler–Maruyama step used unless `dt0=` is given."""

    @abc.abstractmethod
    def noise_shape(self, params: Any, data: Any) -> jax.ShapeDtypeStruct:
        """The shape and dtype of the Brownian motion at parameters `params`."""

    @abc.abstractmethod
    def diffusion(self) -> Callable:
        """`g(t, state, data)`: the diffusion, a linear operator from dW to a
        `FlowState` (noise in the parameters; none in the flow's own
        variables)."""

    @abc.abstractmethod
    def prepared(self, model: Any, bind: Callable, params: Any, data: Any):
        """The flow ready to run on `model`'s data: what it takes from the model
        (SGD's per-example loss, with `bind` putting back the fixed leaves),
        checked against `params` and `data`."""


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
    ] + [
        f"{name}={describe(value)}"
        for name, value in vars(flow).items()
        if isinstance(value, AbstractOptimizer)
    ]
    return f"{type(flow).__name__}({', '.join(settings)})"


def _rate(name: str, value: Any) -> np.ndarray:
    """A positive finite rate, kept as an array so that new values reuse the
    compiled program."""
    require_positive(name, value)
    return np.asarray(value, np.float64)
