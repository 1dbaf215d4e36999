"""Solver names, and what the engine needs to know of a solver: how to start it and
how many gradients (and Hessian-vector products) a step costs."""

from __future__ import annotations

from typing import Any

import diffrax
import jax.numpy as jnp

from ._stabilized import RKC2, ROCK4, AutoTsit5

SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "auto": AutoTsit5,
    "tsit5": diffrax.Tsit5,
    "rkc2": RKC2,
    "rock4": ROCK4,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
    "kvaerno5": diffrax.Kvaerno5,
    "euler": diffrax.Euler,
}


def resolve_solver(solver: str | diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """A diffrax solver from its name (case-insensitive) or an instance."""
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in SOLVERS:
        return SOLVERS[solver.lower()]()
    raise ValueError(
        f"`solver` must be one of {sorted(SOLVERS)} or a diffrax solver instance; "
        f"got {solver!r}."
    )


def is_adaptive(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver has an error estimate, so its step size can adapt."""
    return isinstance(solver, diffrax.AbstractAdaptiveSolver)


def _tableau(solver: diffrax.AbstractSolver):
    tableau = getattr(solver, "tableau", None)
    return None if tableau is None or tableau.implicit else tableau


def is_fsal(solver: diffrax.AbstractSolver) -> bool:
    """Whether each step's last stage is the next step's first (first same as last)."""
    tableau = _tableau(solver)
    return tableau is not None and tableau.fsal


def needs_f0(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver starts from the vector field at t0 (see `start`)."""
    return is_fsal(solver) or hasattr(solver, "start")


def start(solver, terms, t0, t1, y0, args, f0) -> Any:
    """The solver state at `t0`, given the vector field `f0` there.

    diffrax's FSAL Runge-Kutta methods evaluate `f0` in their first step; under
    vmap a lane on its first step makes every lane evaluate it. Handing them `f0`
    makes the first step cost what every other step costs. gflow's own solvers
    take it through their `start`.
    """
    if hasattr(solver, "start"):
        return solver.start(terms, t0, t1, y0, args, f0)
    state = solver.init(terms, t0, t1, y0, args)
    if is_fsal(solver) and isinstance(solver, diffrax.AbstractRungeKutta):
        return jnp.asarray(False), f0
    return state


def after_rejection(solver: diffrax.AbstractSolver, state: Any, attempt: Any) -> Any:
    """The solver state to retry a rejected step from: the state before it, which
    gflow's solvers may amend from the rejected attempt's state (e.g. to estimate
    the spectral radius again, from the mode that made the step fail)."""
    rejected = getattr(solver, "rejected", None)
    return state if rejected is None else rejected(state, attempt)


def error_order(solver: diffrax.AbstractSolver, terms: Any, state: Any) -> Any:
    """The order of the solver's error estimate, for the step-size controller. A
    solver that switches methods (`"auto"`) says it per state."""
    per_state = getattr(solver, "state_error_order", None)
    return solver.error_order(terms) if per_state is None else per_state(state)


def lands_on_saves(solver: diffrax.AbstractSolver, state: Any) -> Any:
    """Whether the next step should end on the next save time (a solver whose dense
    output is weaker than its steps asks for it): None when it never does."""
    lands = getattr(solver, "lands_on_saves", False)
    if callable(lands):
        return lands(state)
    return True if lands else None


def by_mode(solver: diffrax.AbstractSolver) -> tuple | None:
    """For a solver whose steps take one of two methods by the state ("auto"):
    (the solver of the common mode, the solver of the rare mode, the expected cost
    of a state's next step in the rare mode: 0 for a state in the common mode), so
    that an ensemble steps the rare lanes apart; None otherwise."""
    split = getattr(solver, "by_mode", None)
    return None if split is None else split()


def step_cost(solver: diffrax.AbstractSolver, state_after: Any) -> tuple[Any, Any]:
    """(gradients, Hessian-vector products) one step attempt spent.

    gflow's stabilized solvers report their own counts (their stage count changes
    from step to step); explicit Runge-Kutta methods evaluate every stage but the
    first of an FSAL method; Euler one. Implicit methods spend a data-dependent
    number of evaluations in their Newton iterations: -1 (not counted).
    """
    cost = getattr(solver, "step_cost", None)
    if cost is not None:
        return cost(state_after)
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = _tableau(solver)
    if tableau is None:
        return -1, 0
    return tableau.num_stages - int(tableau.fsal), 0
