"""AutoTsit5 ("auto"): Tsit5 while the flow is not stiff, a stabilized method while
it is."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._compat import fsal_state, fsal_value, unvmap_all, unvmap_any
from .._tree import tree_norm
from ._protocol import AbstractGflowSolver
from ._rkc2 import RKC2
from ._stabilized import AbstractStabilized, StabilizedState


class _AutoInterpolation(diffrax.AbstractLocalInterpolation):
    """The dense output of a step of "auto": Tsit5's, or the stabilized method's
    cubic Hermite (from the first and last of `k`), whichever took the step."""

    t0: Any
    t1: Any
    y0: Any
    y1: Any
    k: Any
    stiff: Any

    def evaluate(self, t0, t1=None, left=True):
        del left
        if t1 is not None:
            return self.evaluate(t1) - self.evaluate(t0)
        tsit5 = diffrax.Tsit5.interpolation_cls(
            t0=self.t0, t1=self.t1, y0=self.y0, y1=self.y1, k=self.k
        ).evaluate(t0)
        ends = jax.tree.map(lambda k: k[jnp.array([0, -1])], self.k)
        hermite = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k(
            t0=self.t0, t1=self.t1, y0=self.y0, y1=self.y1, k=ends
        ).evaluate(t0)
        return jax.tree.map(lambda a, b: jnp.where(self.stiff, a, b), hermite, tsit5)


class AutoState(eqx.Module):
    stiff: jax.Array  # which method takes the next step
    last_stiff: jax.Array  # which method took the last step
    streak: jax.Array  # consecutive steps that argued for switching
    tsit5: Any
    stabilized: StabilizedState
    grads: jax.Array
    hvps: jax.Array


class AutoTsit5(AbstractGflowSolver):
    """Tsit5 while the flow is not stiff, a stabilized method while it is.

    In Tsit5 steps, stiffness is detected at no cost from the stages, as Hairer &
    Wanner do for Dopri5: the last two stages are both taken at the end of the step,
    so ‖k₇ − k₆‖ / ‖Y₇ − Y₆‖ estimates h·ρ. Above `threshold` (Tsit5 is stable to
    about 3.5 on the negative real axis) for `patience` accepted steps in a row, the
    stabilized method takes over, its power iteration started from k₇ − k₆ (the
    stiff direction). It hands back once h·ρ has stayed below `threshold / 2` for
    `patience` steps: Tsit5 would then be stable with room to spare.

    Its stiff steps need Hessian-vector products: for a loss without forward-mode
    derivatives, `gflow.simulate` runs Tsit5 instead and says so in a warning.
    `traj.stats["num_hvp_evals"]` counts them.

    Attributes:
        stiff: the stabilized method.
        threshold: h·ρ above which a Tsit5 step counts as stability-bound.
        patience: how many steps in a row decide a switch.

    Example:
        >>> traj = gflow.simulate(model, data, 1000.0)  # solver="auto", the default
        >>> # Another stabilized method, or a later switch:
        >>> traj = gflow.simulate(model, data, 1000.0,
        ...                       solver=gflow.AutoTsit5(stiff=gflow.ROCK4(),
        ...                                              patience=20))
    """

    stiff: AbstractStabilized = RKC2()
    threshold: float = 3.0
    patience: int = eqx.field(default=5, static=True)
    # Set by `modes`: the method every step takes, for lanes an ensemble has
    # already sorted by mode; None: each step picks from the state.
    mode: bool | None = eqx.field(default=None, static=True, repr=False)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = _AutoInterpolation
    needs_hvps: ClassVar[bool] = True
    _tsit5: ClassVar = diffrax.Tsit5()

    def order(self, terms) -> int:
        return 5

    def lands_on_saves(self, state: AutoState):
        """While a stabilized method whose dense output is weaker than its steps
        (ROCK4) steps, end the steps on the save times."""
        lands = self.stiff.lands_on_saves(state.stabilized)
        return None if lands is None else state.stiff & lands

    def error_order_of(self, terms, state: AutoState):
        stiff, nonstiff = self.stiff.error_order(None), self._tsit5.error_order(None)
        return jnp.where(state.last_stiff, stiff, nonstiff)

    def start(self, terms, t0, t1, y0, args, f0) -> AutoState:
        zero = jnp.zeros((), jnp.int32)
        return AutoState(
            stiff=jnp.zeros((), bool),
            last_stiff=jnp.zeros((), bool),
            streak=zero,
            tsit5=fsal_state(f0),
            stabilized=self.stiff.start(terms, t0, t1, y0, args, f0),
            grads=zero,
            hvps=zero,
        )

    def after_rejection(self, state: AutoState, attempt: AutoState) -> AutoState:
        stabilized = self.stiff.after_rejection(state.stabilized, attempt.stabilized)
        return eqx.tree_at(lambda s: s.stabilized, state, stabilized)

    def step_cost(self, state: AutoState):
        return state.grads, state.hvps

    def modes(self):
        """For ensembles: (the solver of lanes in Tsit5 mode, the solver of lanes in
        stiff mode, a stiff state's expected cost: 1 + the stages of its last
        stabilized step; 0 in Tsit5 mode). Under vmap, a step whose lanes are in
        both modes would take both methods on every lane; the engine instead steps
        every lane with Tsit5 and then only the stiff lanes, gathered, with the
        stabilized method."""

        def cost(state: AutoState):
            return jnp.where(state.stiff, 1 + state.stabilized.grads, 0)

        return (
            dataclasses.replace(self, mode=False),
            dataclasses.replace(self, mode=True),
            cost,
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        state = solver_state
        step = (terms, t0, t1, y0, args, state, made_jump)

        def either():  # lanes of an ensemble in both modes: take both, keep one
            return jax.tree.map(
                lambda a, b: jnp.where(state.stiff, a, b),
                self._stiff_step(*step),
                self._tsit5_step(*step),
            )

        if self.mode is not None:
            take = self._stiff_step if self.mode else self._tsit5_step
            y1, error, k, new, result = take(*step)
        else:  # Real branches when every lane (or the only one) agrees.
            y1, error, k, new, result = jax.lax.cond(
                unvmap_all(state.stiff),
                lambda: self._stiff_step(*step),
                lambda: jax.lax.cond(
                    unvmap_any(state.stiff), either, lambda: self._tsit5_step(*step)
                ),
            )
        dense = dict(y0=y0, y1=y1, k=k, stiff=new.last_stiff)
        return y1, error, dense, new, result

    def _tsit5_step(self, terms, t0, t1, y0, args, state: AutoState, made_jump):
        """A Tsit5 step, and whether the steps have been stability-bound long
        enough to switch."""
        y1, error, dense, tsit5, result = self._tsit5.step(
            terms, t0, t1, y0, args, state.tsit5, made_jump
        )
        h_radius = _tsit5_h_radius(y0, dense["k"])
        streak = jnp.where(h_radius > self.threshold, state.streak + 1, 0)
        switch = streak >= self.patience
        stabilized = eqx.tree_at(
            lambda s: (s.f0, s.radius, s.vector, s.rejections),
            state.stabilized,
            # No estimate yet: the first stabilized step makes one, starting from
            # the stiff direction.
            (
                fsal_value(tsit5),
                jnp.zeros_like(t1 - t0),
                _stiff_direction(dense["k"]),
                jnp.zeros((), jnp.int32),
            ),
        )
        new = AutoState(
            stiff=switch,
            last_stiff=jnp.zeros((), bool),
            streak=jnp.where(switch, 0, streak),
            tsit5=tsit5,
            stabilized=stabilized,
            grads=jnp.asarray(6, jnp.int32),
            hvps=jnp.zeros((), jnp.int32),
        )
        return y1, error, dense["k"], new, result

    def _stiff_step(self, terms, t0, t1, y0, args, state: AutoState, made_jump):
        """A stabilized step, and whether it has been easy long enough to hand
        back to Tsit5. Its dense output is kept in Tsit5's layout (the first and
        last of seven stages)."""
        y1, error, dense, stabilized, result = self.stiff.step(
            terms, t0, t1, y0, args, state.stabilized, made_jump
        )
        easy = (t1 - t0) * stabilized.radius < self.threshold / 2
        streak = jnp.where(easy, state.streak + 1, 0)
        switch = streak >= self.patience
        k = jax.tree.map(
            lambda k0, k1: (
                jnp.zeros((7,) + k0.shape, k0.dtype).at[0].set(k0).at[-1].set(k1)
            ),
            dense["k0"],
            dense["k1"],
        )
        new = AutoState(
            stiff=~switch,
            last_stiff=jnp.ones((), bool),
            streak=jnp.where(switch, 0, streak),
            tsit5=fsal_state(stabilized.f0),
            stabilized=stabilized,
            grads=stabilized.grads,
            hvps=stabilized.hvps,
        )
        return y1, error, k, new, result


_TSIT5_TABLEAU = diffrax.Tsit5.tableau
# Y7 - Y6 = Σ_j (b_j - a_6j) k_j: the two stages evaluated at the end of the step.
_STAGE_GAP = jnp.asarray(
    list(_TSIT5_TABLEAU.a_lower[5] - jnp.append(_TSIT5_TABLEAU.a_lower[4], 0.0)) + [0.0]
)


def _tsit5_h_radius(y0, k):
    """h·ρ from a Tsit5 step's stages: ‖k₇ − k₆‖ / ‖Y₇ − Y₆‖ (Hairer & Wanner)."""
    stage_gap = jax.tree.map(
        lambda k: jnp.tensordot(_STAGE_GAP.astype(k.dtype), k, axes=1), k
    )
    field_gap = jax.tree.map(lambda k: k[-1] - k[-2], k)
    return tree_norm(field_gap) / jnp.maximum(tree_norm(stage_gap), 1e-30)


def _stiff_direction(k):
    """k₇ − k₆: dominated by the stiffest modes, the power iteration's start."""
    return jax.tree.map(lambda k: k[-1] - k[-2], k)
