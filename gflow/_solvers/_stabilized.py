"""The base of the stabilized explicit Runge-Kutta solvers for stiff gradient flows.

The Jacobian of a gradient flow's vector field is minus the Hessian: symmetric,
with real eigenvalues. An explicit Runge-Kutta method of s stages is stable on the
negative real axis up to about 3/h·λ for Tsit5, but a Chebyshev method of s stages
is stable up to about 0.65 s² (RKC2): a step of size h costs sqrt(h·ρ / 0.65)
gradients instead of h·ρ / 3, where ρ is the spectral radius of the Jacobian.

ρ comes from Hessian-vector products (forward-mode derivatives of the vector field:
`jax.jvp`), by power iteration warm-started from the previous eigenvector and
multiplied by a safety factor. It is re-estimated only when needed: when the step
size has grown well past the one it was estimated for, every `refresh` steps, and
when a step is rejected twice in a row (the engine reports rejections through
`after_rejection`), starting from the rejected step's error, which an instability
makes point along the mode that outgrew the stability interval. One power
iteration is the only place a Hessian-vector product is compiled.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._compat import unvmap_any
from .._linalg import power_iteration
from .._tree import tree_scrambled, tree_unit
from ._protocol import AbstractGflowSolver


class StabilizedState(eqx.Module):
    """What a stabilized solver carries from step to step."""

    f0: Any  # the vector field at the start of the step
    radius: jax.Array  # the spectral radius estimate (safety factor included)
    vector: Any  # the eigenvector estimate, for the next warm start
    error: Any  # the step's error estimate (after a rejection: the rejected one's)
    h_estimated: jax.Array  # the step size the radius was last estimated for
    age: jax.Array  # accepted steps since the radius was estimated
    rejections: jax.Array  # rejected attempts at this step so far
    grads: jax.Array  # gradients the last step spent
    hvps: jax.Array  # Hessian-vector products the last step spent


class AbstractStabilized(AbstractGflowSolver):
    """A Chebyshev-type stabilized explicit Runge-Kutta method of adaptive stage
    count, for ODEs whose Jacobian has a (nearly) real, negative spectrum.

    Attributes:
        safety: the spectral radius is estimated times this factor (power
            iteration approaches it from below).
        error_scale: the error estimate is multiplied by this before the step-size
            control sees it (a calibration: see `AutoTsit5`).
        refresh: re-estimate the radius at least every this many steps.
        max_stages: the most stages of one step; a step that would need more is
            rejected (its error is infinite), so the step size shrinks.
        power_iters: the most power iterations of one estimate.
    """

    safety: float = 1.2
    error_scale: float = 1.0
    refresh: int = eqx.field(default=25, static=True)
    max_stages: int = eqx.field(default=2000, static=True)
    power_iters: int = eqx.field(default=30, static=True)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation
    )
    needs_hvps: ClassVar[bool] = True

    @abc.abstractmethod
    def stages_for(self, h_radius: jax.Array) -> jax.Array:
        """The fewest stages whose stability interval covers `h·ρ` (more than
        `max_stages` when none does)."""

    @abc.abstractmethod
    def advance(self, field, t0, h, y0, f0, stages):
        """One step of `stages` stages (each one gradient): `(y1, f1, error)`,
        where `f1` is the vector field at `y1` and `error` the embedded estimate of
        the local error."""

    def error_order(self, terms) -> int:
        # The error estimate is of the local error, one order above the method's.
        return self.order(terms) + 1

    def start(self, terms, t0, t1, y0, args, f0) -> StabilizedState:
        """The state at `t0` given the vector field `f0` there (no evaluation). The
        first power iteration starts from a fixed vector that looks random, which
        has a component along the stiff modes."""
        dtype = jnp.result_type(*jax.tree.leaves(y0))
        noise = tree_scrambled(y0)
        zero = jnp.zeros((), jnp.int32)
        return StabilizedState(
            f0=f0,
            radius=jnp.zeros((), dtype),
            vector=noise,
            error=noise,
            h_estimated=jnp.zeros((), dtype),
            age=zero,
            rejections=zero,
            grads=zero,
            hvps=zero,
        )

    @property
    def stage_limit(self) -> int:
        return self.max_stages

    def after_rejection(
        self, state: StabilizedState, attempt: StabilizedState
    ) -> StabilizedState:
        """The state to retry a rejected step from: the one before it, with the
        rejected step's error, which the retry examines (see `step`)."""
        return eqx.tree_at(
            lambda s: (s.rejections, s.error),
            state,
            (state.rejections + 1, attempt.error),
        )

    def step_cost(self, state: StabilizedState):
        """(gradients, Hessian-vector products) of the step that produced `state`."""
        return state.grads, state.hvps

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        state = solver_state
        h = t1 - t0

        def field(t, y):
            return terms.vf(t, y, args)

        def jvp(v):
            return jax.jvp(lambda y: field(t0, y), (y0,), (v,))[1]

        radius, vector, due, hvps = self.spectral_radius(jvp, state, h)
        stages = self.stages_for(h * radius)
        too_many = stages > self.stage_limit
        stages = jnp.minimum(stages, self.stage_limit)
        y1, f1, error = self.advance(field, t0, h, y0, state.f0, stages)
        error = jax.tree.map(
            lambda e: jnp.where(too_many, jnp.inf, self.error_scale * e), error
        )
        new_state = StabilizedState(
            f0=f1,
            radius=radius,
            vector=vector,
            error=error,
            h_estimated=jnp.where(due, h, state.h_estimated),
            age=jnp.where(due, 0, state.age + 1),
            rejections=jnp.zeros((), jnp.int32),
            grads=stages.astype(jnp.int32),
            hvps=hvps.astype(jnp.int32),
        )
        dense = dict(
            y0=y0,
            y1=y1,
            k0=jax.tree.map(lambda f: h * f, state.f0),
            k1=jax.tree.map(lambda f: h * f, f1),
        )
        return y1, error, dense, new_state, diffrax.RESULTS.successful

    def spectral_radius(self, jvp, state: StabilizedState, h):
        """The spectral radius for a step of size `h` from `state` (safety factor
        included), the eigenvector estimate, whether it was estimated anew, and the
        Hessian-vector products (`jvp`s) that cost.

        Under vmap (ensembles) the conditions below differ between lanes: an
        iteration runs when any lane needs it, for the lanes that do (the others
        take 0 steps).
        """
        # A step rejected twice in a row may have been unstable: its error is then
        # dominated by the mode that outgrew the stability interval, sharper than
        # the estimate. The estimate is made again, starting from that error.
        suspect = state.rejections >= 2
        # Estimate at the start, after a suspect step, every `refresh` steps, and
        # once the step has grown past four times the one the estimate served.
        due = (
            suspect
            | (state.radius == 0)
            | (state.age >= self.refresh)
            | (h > 4 * state.h_estimated)
        )
        iters = jnp.where(
            (state.radius > 0) & ~suspect, self.power_iters // 3, self.power_iters
        )
        start = jax.tree.map(
            lambda a, b: jnp.where(suspect, a, b), state.error, state.vector
        )
        # The estimate |q| + residual bounds the top eigenvalue once the vector is
        # mostly in the top eigenvectors' span (close top eigenvalues slow the
        # iteration down, not the bound).
        value, vector, count, residual = jax.lax.cond(
            unvmap_any(due),
            lambda: power_iteration(jvp, start, jnp.where(due, iters, 0), rtol=0.05),
            # The vector is kept of unit norm, as the iteration returns it, so that
            # lanes that skip it and lanes that run none of its steps agree.
            lambda: (
                state.radius / self.safety,
                tree_unit(start),
                jnp.zeros((), jnp.int32),
                jnp.zeros((), state.radius.dtype),
            ),
        )
        radius = jnp.where(due, self.safety * (jnp.abs(value) + residual), state.radius)
        return radius, vector, due, count
