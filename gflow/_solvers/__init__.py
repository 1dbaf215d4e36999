"""Solvers: names for diffrax's, gflow's stabilized methods, and the hooks the engine
asks every solver (`_protocol`)."""

from __future__ import annotations

import diffrax

from ._auto import AutoTsit5 as AutoTsit5
from ._protocol import AbstractGflowSolver as AbstractGflowSolver
from ._protocol import Modes as Modes
from ._protocol import after_rejection as after_rejection
from ._protocol import error_order as error_order
from ._protocol import lands_on_saves as lands_on_saves
from ._protocol import modes as modes
from ._protocol import needs_f0 as needs_f0
from ._protocol import needs_hvps as needs_hvps
from ._protocol import start as start
from ._protocol import step_cost as step_cost
from ._rkc2 import RKC2 as RKC2
from ._rock4 import ROCK4 as ROCK4
from ._stabilized import AbstractStabilized as AbstractStabilized


class _Names(dict):
    """A dict whose repr names its classes as users import them."""

    def __repr__(self) -> str:
        def name(cls):
            module = "gflow" if cls.__module__.startswith("gflow") else "diffrax"
            return f"{module}.{cls.__qualname__}"

        return "{" + ", ".join(f"{k!r}: {name(v)}" for k, v in self.items()) + "}"


#: The solvers a name in `solver=` stands for.
SOLVERS: dict[str, type[diffrax.AbstractSolver]] = _Names(
    {
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
)


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


def solver_name(solver: diffrax.AbstractSolver) -> str:
    """The name of a solver in `SOLVERS`, or its class name."""
    names = [name for name, cls in SOLVERS.items() if type(solver) is cls]
    return names[0] if names else type(solver).__name__


def is_adaptive(solver: diffrax.AbstractSolver) -> bool:
    """Whether the solver has an error estimate, so its step size can adapt."""
    return isinstance(solver, diffrax.AbstractAdaptiveSolver)
