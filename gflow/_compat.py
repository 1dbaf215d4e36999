"""The one place where gflow touches diffrax's and equinox's internals.

gflow drives diffrax's solvers step by step (`solver.step`), as `diffeqsolve` does,
and needs a few things `diffeqsolve` keeps to itself. Each is here, written once,
and pinned by `tests/test_compat.py`, which fails with a message naming the
upgrade that moved it:

* `with_controller_tolerances`: an implicit solver's root finder takes the step
  controller's tolerances where it asks for them (diffrax's `use_stepsize_tol`
  sentinel), as `diffeqsolve` arranges;
* `fsal_state` / `fsal_value`: the solver state of diffrax's first-same-as-last
  Runge-Kutta methods, `(made_jump, f1)`, which gflow builds from a vector field it
  already has (so the first step costs what every other step costs);
* `clip_to_end`: diffrax's rule for a step that ends within 100 ulp of the end;
* `unvmap_any` / `unvmap_all`: whether a condition holds in any / every lane of a
  vmapped batch (equinox's internal primitives), so that a `lax.cond` stays a
  branch under vmap.
"""

from __future__ import annotations

from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from diffrax._root_finder import use_stepsize_tol

unvmap_any = eqxi.unvmap_any
unvmap_all = eqxi.unvmap_all

_TOLERANCES = ("rtol", "atol", "norm")


def with_controller_tolerances(
    solver: diffrax.AbstractSolver, controller: diffrax.AbstractStepSizeController
) -> diffrax.AbstractSolver:
    """The solver, with an implicit solver's root-finder tolerances taken from an
    adaptive `controller` wherever they are diffrax's `use_stepsize_tol`."""
    adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
    if not (isinstance(solver, diffrax.AbstractImplicitSolver) and adaptive):
        return solver
    names = [
        name
        for name in _TOLERANCES
        if getattr(solver.root_finder, name) is use_stepsize_tol
    ]
    return eqx.tree_at(
        lambda s: [getattr(s.root_finder, name) for name in names],
        solver,
        [getattr(controller, name) for name in names],
    )


def fsal_state(f0: Any) -> tuple[jax.Array, Any]:
    """The state of a diffrax FSAL Runge-Kutta method (e.g. Tsit5) whose next step
    starts where the vector field is `f0`."""
    return jnp.asarray(False), f0


def fsal_value(state: tuple[jax.Array, Any]) -> Any:
    """The vector field at the end of the step that produced `state`."""
    return state[1]


def clip_to_end(tprev, tnext, t1, keep_step):
    """The next step's end, as diffrax clips it: a step ending within 100 ulp of
    `t1` ends at `t1` (halved instead after a rejected step), so that no sliver of
    a step, with an ill-conditioned dense output, is left."""
    clipped = jnp.where(keep_step, t1, tprev + 0.5 * (t1 - tprev))
    return jnp.where(tnext > _ulps_below(t1, 100), clipped, tnext)


def _ulps_below(t, n):
    """`n` steps of `nextafter` from `t` > 0 towards 0, as one subtraction on its
    bits (a positive float's bits count its representable predecessors): diffrax's
    loop of 100 `prevbefore`, without 100 unrolled operations."""
    bits = jax.lax.bitcast_convert_type(t, jnp.dtype(f"int{8 * t.dtype.itemsize}"))
    return jax.lax.bitcast_convert_type(jnp.maximum(bits - n, 0), t.dtype)
