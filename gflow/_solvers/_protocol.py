"""What gflow's engine needs of a solver beyond diffrax's step API.

The engine drives any diffrax solver with `solver.step` (as `diffeqsolve` does). It
also asks a few questions diffrax's API does not answer; each is one hook below, a
`functools.singledispatch` function registered for the diffrax solvers gflow knows
(the way lineax declares properties of operators it does not own), and answered by
gflow's own solvers through the methods `AbstractGflowSolver` declares.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import diffrax
import jax

from .._compat import fsal_state


class Modes(NamedTuple):
    """The two methods of a solver that steps with one or the other by its state.

    Attributes:
        common: the solver stepping with the common method only.
        rare: the solver stepping with the rare method only.
        rare_beside_common: the same, for lanes that share a program with lanes
            in the common mode: every lane takes the common method's attempt
            there (under vmap), so each rare step of such a lane also pays one
            common attempt, which its choice of method must count.
        rare_cost: a state's expected cost of a step in the rare mode (> 0), or 0
            for a state in the common mode.
        names: the methods' names, for progress reports.
        min_steps: the fewest steps a lane must still have to take for the rare
            method to be worth compiling, once the run has started without it.
    """

    common: diffrax.AbstractSolver
    rare: diffrax.AbstractSolver
    rare_beside_common: diffrax.AbstractSolver
    rare_cost: Callable[[Any], Any]
    names: tuple[str, str]
    min_steps: int = 0


class AbstractGflowSolver(diffrax.AbstractAdaptiveSolver):
    """A solver written for gflow's engine: diffrax's step API, and the hooks below.

    Attributes:
        needs_hvps: its steps use Hessian-vector products (forward-mode
            derivatives of the vector field).
    """

    needs_hvps: ClassVar[bool] = False

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        return self.start(terms, t0, t1, y0, args, terms.vf(t0, y0, args))

    @abc.abstractmethod
    def start(self, terms, t0, t1, y0, args, f0) -> Any:
        """The solver state at `t0`, given the vector field `f0` there."""

    @abc.abstractmethod
    def step_cost(self, state_after: Any) -> tuple[Any, Any]:
        """(gradients, Hessian-vector products) of the step that made this state
        (in evaluations of the vector field, for gradients)."""

    def after_rejection(self, state: Any, attempt: Any) -> Any:
        """The state to retry a rejected step from (default: the state before it)."""
        return state

    def error_order_of(self, terms: Any, state: Any) -> Any:
        """The order of the error estimate of the next step (default: fixed)."""
        return self.error_order(terms)

    def lands_on_saves(self, state: Any) -> Any:
        """Whether the next step should end on the next save time (its dense output
        weaker than its steps); None when it never should."""
        return None

    def modes(self) -> Modes | None:
        """For a solver whose steps take one of two methods by the state, its
        `Modes`: for one member the engine compiles the rare method only once the
        member wants it; an ensemble compiles both and steps the rare lanes apart.
        None for a solver of one method."""
        return None


def _tableau(solver: diffrax.AbstractSolver):
    tableau = getattr(solver, "tableau", None)
    return None if tableau is None or tableau.implicit else tableau


def _is_fsal(solver: diffrax.AbstractSolver) -> bool:
    tableau = _tableau(solver)
    return (
        tableau is not None
        and tableau.fsal
        and isinstance(solver, diffrax.AbstractRungeKutta)
    )


@functools.singledispatch
def needs_f0(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver starts from the vector field at t0 (see `start`)."""
    return _is_fsal(solver)


@needs_f0.register
def _(solver: AbstractGflowSolver) -> bool:
    return True


@functools.singledispatch
def start(solver: diffrax.AbstractSolver, terms, t0, t1, y0, args, f0) -> Any:
    """The solver state at `t0`, given the vector field `f0` there (None unless
    `needs_f0`).

    diffrax's FSAL Runge-Kutta methods evaluate `f0` in their first step; under
    vmap a lane on its first step makes every lane evaluate it. Handing them `f0`
    makes the first step cost what every other step costs.
    """
    if _is_fsal(solver):
        return fsal_state(f0)
    return solver.init(terms, t0, t1, y0, args)


@start.register
def _(solver: AbstractGflowSolver, terms, t0, t1, y0, args, f0) -> Any:
    return solver.start(terms, t0, t1, y0, args, f0)


@functools.singledispatch
def step_cost(solver: diffrax.AbstractSolver, state_after: Any) -> tuple[Any, Any]:
    """(evaluations of the vector field, Hessian-vector products) of one step
    attempt: every stage but the first of an explicit Runge-Kutta method (an FSAL
    method's first is the last one's), one for Euler, -1 (not counted) for implicit
    methods, whose Newton iterations spend a data-dependent number."""
    tableau = _tableau(solver)
    if tableau is None:
        return -1, 0
    return tableau.num_stages - int(tableau.fsal), 0


@step_cost.register
def _(solver: diffrax.Euler, state_after: Any) -> tuple[Any, Any]:
    return 1, 0


@step_cost.register
def _(solver: AbstractGflowSolver, state_after: Any) -> tuple[Any, Any]:
    return solver.step_cost(state_after)


@functools.singledispatch
def after_rejection(solver: diffrax.AbstractSolver, state: Any, attempt: Any) -> Any:
    """The solver state to retry a rejected step from: the state before it."""
    return state


@after_rejection.register
def _(solver: AbstractGflowSolver, state: Any, attempt: Any) -> Any:
    return solver.after_rejection(state, attempt)


@functools.singledispatch
def error_order(solver: diffrax.AbstractSolver, terms: Any, state: Any) -> Any:
    """The order of the solver's error estimate, for the step-size controller."""
    return solver.error_order(terms)


@error_order.register
def _(solver: AbstractGflowSolver, terms: Any, state: Any) -> Any:
    return solver.error_order_of(terms, state)


@functools.singledispatch
def lands_on_saves(solver: diffrax.AbstractSolver, state: Any) -> jax.Array | None:
    """Whether the next step should end on the next save time: None when it never
    should (diffrax's solvers interpolate to the save times)."""
    return None


@lands_on_saves.register
def _(solver: AbstractGflowSolver, state: Any) -> jax.Array | None:
    return solver.lands_on_saves(state)


@functools.singledispatch
def modes(solver: diffrax.AbstractSolver) -> Modes | None:
    """See `AbstractGflowSolver.modes`; None for diffrax's solvers."""
    return None


@modes.register
def _(solver: AbstractGflowSolver) -> Modes | None:
    return solver.modes()


@functools.singledispatch
def needs_hvps(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver's steps use Hessian-vector products."""
    return False


@needs_hvps.register
def _(solver: AbstractGflowSolver) -> bool:
    return solver.needs_hvps
