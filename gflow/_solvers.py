"""Solver names, and what the engine needs to know of a solver: how to start it and
how many gradients (and Hessian-vector products) a step costs."""

from __future__ import annotations

from typing import Any

import diffrax
import jax.numpy as jnp

SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
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


def start(solver, terms, t0, t1, y0, args, f0) -> Any:
    """The solver state at `t0`, given the vector field `f0` there.

    diffrax's FSAL Runge-Kutta methods evaluate `f0` in their first step; under
    vmap a lane on its first step makes every lane evaluate it. Handing them `f0`
    makes the first step cost what every other step costs.
    """
    state = solver.init(terms, t0, t1, y0, args)
    if is_fsal(solver) and isinstance(solver, diffrax.AbstractRungeKutta):
        return jnp.asarray(False), f0
    return state


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
