"""Solver names, and how many gradient evaluations a solver spends per step."""

from __future__ import annotations

import diffrax

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


def grad_evals_per_step(solver: diffrax.AbstractSolver) -> int | None:
    """Vector-field evaluations per step attempt (accepted or rejected).

    Explicit Runge-Kutta methods evaluate every stage but the first when the first
    is the previous step's last (FSAL). Implicit methods spend a data-dependent number
    of evaluations in their Newton iterations and Jacobians: None (not counted).
    """
    if isinstance(solver, diffrax.Euler):
        return 1
    tableau = getattr(solver, "tableau", None)
    if tableau is None or tableau.implicit:
        return None
    return tableau.num_stages - int(tableau.fsal)


def initial_grad_evals(solver: diffrax.AbstractSolver) -> int:
    """Evaluations before the first step: the first stage of an FSAL method.

    (The PID controller's automatic choice of the first step evaluates the vector
    field too, but inside `diffeqsolve` those evaluations are shared with the
    solver's: tests/test_simulate.py counts executions to check this formula.)
    """
    tableau = getattr(solver, "tableau", None)
    return int(tableau is not None and tableau.fsal)
