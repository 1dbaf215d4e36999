"""AutoTsit5 ("auto"): Tsit5 while the flow is not stiff, a stabilized method while
it is."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._compat import fsal_state, fsal_value, unvmap_all, unvmap_any
from .._tree import tree_norm, tree_zeros
from ._protocol import AbstractGflowSolver, Modes
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
        return jax.tree.map(
            lambda a, b: jnp.where(self.stiff, a, b),
            self._hermite(t0),
            self._tsit5(t0),
        )

    def _tsit5(self, t):
        return diffrax.Tsit5.interpolation_cls(
            t0=self.t0, t1=self.t1, y0=self.y0, y1=self.y1, k=self.k
        ).evaluate(t)

    def _hermite(self, t):
        ends = jax.tree.map(lambda k: k[jnp.array([0, -1])], self.k)
        return diffrax.ThirdOrderHermitePolynomialInterpolation.from_k(
            t0=self.t0, t1=self.t1, y0=self.y0, y1=self.y1, k=ends
        ).evaluate(t)


class _Tsit5Interpolation(_AutoInterpolation):
    """The dense output of "auto" in its Tsit5 mode: Tsit5's alone."""

    def evaluate(self, t0, t1=None, left=True):
        del left
        return self._tsit5(t0) if t1 is None else self._tsit5(t1) - self._tsit5(t0)


class _StiffInterpolation(_AutoInterpolation):
    """The dense output of "auto" in its stiff mode: the cubic Hermite alone."""

    def evaluate(self, t0, t1=None, left=True):
        del left
        if t1 is None:
            return self._hermite(t0)
        return self._hermite(t1) - self._hermite(t0)


class Rate(eqx.Module):
    """Gradient-equivalents (gradients + 2 Hessian-vector products) per unit of
    time of one method's recent steps: sums over its steps, older ones weighing
    less (each new accepted step multiplies the past by `_MEMORY`); rejected
    attempts count their cost and no time."""

    cost: jax.Array
    time: jax.Array

    @classmethod
    def zero(cls, dtype) -> Rate:
        return cls(jnp.zeros((), dtype), jnp.zeros((), dtype))

    def accepted(self, cost, h) -> Rate:
        return Rate(_MEMORY * self.cost + cost, _MEMORY * self.time + h)

    def rejected(self, cost) -> Rate:
        return Rate(self.cost + cost, self.time)

    @property
    def value(self):
        return self.cost / jnp.maximum(self.time, jnp.finfo(self.time.dtype).tiny)


# The weight of the past in a `Rate`: about the last five steps count.
_MEMORY = 0.8
# The vector fields of a Tsit5 step (FSAL: its first is the last step's last).
_TSIT5_GRADS = 6


class AutoState(eqx.Module):
    stiff: jax.Array  # which method takes the next step
    last_stiff: jax.Array  # which method took the last step
    streak: jax.Array  # consecutive steps that argued for switching
    tsit5: Any
    stabilized: StabilizedState
    grads: jax.Array
    hvps: jax.Array
    explicit: Rate  # the cost rate of Tsit5's recent steps
    stabilized_rate: Rate  # the cost rate of the stabilized method since the switch
    stiff_steps: jax.Array  # accepted stabilized steps since the switch
    switched_at: jax.Array  # when the stabilized method last took over
    not_before: jax.Array  # no switch to the stabilized method before this time
    failures: jax.Array  # switches undone because the stabilized steps cost more


class AutoTsit5(AbstractGflowSolver):
    """Tsit5 while the flow is not stiff, a stabilized method while it is.

    In Tsit5 steps, stiffness is detected at no cost from the stages, as Hairer &
    Wanner do for Dopri5: the last two stages are both taken at the end of the step,
    so ‖k₇ − k₆‖ / ‖Y₇ − Y₆‖ estimates h·ρ. Above `threshold` (Tsit5 is stable to
    about 3.5 on the negative real axis) for `patience` accepted steps in a row, the
    stabilized method takes over, its power iteration started from k₇ − k₆ (the
    stiff direction). It hands back once h·ρ has stayed below `threshold / 2` for
    `patience` steps: Tsit5 would then be stable with room to spare.

    It switches only where the stabilized method is cheaper. Both methods' cost
    per unit of time is measured as they step (gradient-equivalents: gradients
    and twice the Hessian-vector products, rejected attempts included). If, after
    `2 * patience` stabilized steps, they cost more per unit of time than Tsit5's
    last steps did (a flow stiff enough to bind Tsit5, but whose accuracy keeps
    the second-order stabilized steps short), Tsit5 takes over again and the
    stabilized method is not tried again for 8 times as long as that trial lasted,
    twice as long after each further failed trial: a flow on which it never pays
    costs at most a few percent more than Tsit5 alone. (In an ensemble a trial
    costs more, in gathered batches: for members that never turn stiff,
    `solver="tsit5"` is faster; the "Ensembles" page has figures.)

    Its stiff steps need Hessian-vector products: for a loss without forward-mode
    derivatives, `gflow.simulate` runs Tsit5 instead and says so in a warning.
    `traj.stats["num_hvp_evals"]` counts them.

    Attributes:
        stiff: the stabilized method.
        threshold: h·ρ above which a Tsit5 step counts as stability-bound.
        patience: how many steps in a row decide a switch.
        min_steps: the stabilized method is compiled (`gflow.simulate` starts
            without it) only for a run that would still take at least this many
            Tsit5 steps at their present size; until then the run goes on with
            Tsit5, which is sooner than compiling (a second or more).

    Examples:
        >>> traj = gflow.simulate(model, data, 1000.0)  # solver="auto", the default
        >>> # Another stabilized method, or a later switch:
        >>> traj = gflow.simulate(model, data, 1000.0,
        ...                       solver=gflow.AutoTsit5(stiff=gflow.ROCK4(),
        ...                                              patience=20))
    """

    stiff: AbstractStabilized = RKC2()
    threshold: float = 3.0
    patience: int = eqx.field(default=5, static=True)
    min_steps: int = eqx.field(default=1000, static=True)
    # Set by `modes`: the method every step takes, for lanes an ensemble has
    # already sorted by mode; None: each step picks from the state.
    mode: bool | None = eqx.field(default=None, static=True, repr=False)
    # Set by `modes`: the gradients of the Tsit5 attempt each stabilized step
    # also pays (an ensemble's lanes in both modes share a program).
    beside: int = eqx.field(default=0, static=True, repr=False)

    term_structure: ClassVar = diffrax.AbstractTerm
    needs_hvps: ClassVar[bool] = True
    _tsit5: ClassVar = diffrax.Tsit5()

    def order(self, terms) -> int:
        return 5

    @property
    def interpolation_cls(self):
        """The dense output: of the method a mode steps with, or, each step
        picking its method, of whichever took the step."""
        if self.mode is None:
            return _AutoInterpolation
        return _StiffInterpolation if self.mode else _Tsit5Interpolation

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
        dtype = jnp.result_type(t0, t1)
        return AutoState(
            stiff=jnp.zeros((), bool),
            last_stiff=jnp.zeros((), bool),
            streak=zero,
            tsit5=fsal_state(f0),
            stabilized=self.stiff.start(terms, t0, t1, y0, args, f0),
            grads=zero,
            hvps=zero,
            explicit=Rate.zero(dtype),
            stabilized_rate=Rate.zero(dtype),
            stiff_steps=zero,
            switched_at=jnp.zeros((), dtype),
            not_before=jnp.zeros((), dtype),
            failures=zero,
        )

    def after_rejection(self, state: AutoState, attempt: AutoState) -> AutoState:
        """The state before the rejected attempt, with its cost counted in the
        rate of the method that took it."""
        stabilized = self.stiff.after_rejection(state.stabilized, attempt.stabilized)
        cost = _equivalents(attempt)
        return eqx.tree_at(
            lambda s: (s.stabilized, s.explicit, s.stabilized_rate),
            state,
            (
                stabilized,
                jax.tree.map(
                    lambda a, b: jnp.where(attempt.last_stiff, a, b),
                    state.explicit,
                    state.explicit.rejected(cost),
                ),
                jax.tree.map(
                    lambda a, b: jnp.where(attempt.last_stiff, a, b),
                    state.stabilized_rate.rejected(cost),
                    state.stabilized_rate,
                ),
            ),
        )

    def step_cost(self, state: AutoState):
        return state.grads, state.hvps

    def modes(self) -> Modes:
        """Tsit5 (common) and the stabilized method (rare). A stiff state's
        expected cost is 1 + the stages of its last stabilized step; 0 in Tsit5
        mode. Under vmap, a step whose lanes are in both modes would take both
        methods on every lane; the engine instead steps every lane with Tsit5 and
        then only the stiff lanes, gathered, with the stabilized method."""

        def cost(state: AutoState):
            return jnp.where(state.stiff, 1 + state.stabilized.grads, 0)

        return Modes(
            dataclasses.replace(self, mode=False),
            dataclasses.replace(self, mode=True),
            dataclasses.replace(self, mode=True, beside=_TSIT5_GRADS),
            cost,
            ("tsit5", type(self.stiff).__name__.lower()),
            self.min_steps,
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        state = solver_state
        step = (terms, t0, t1, y0, args, state, made_jump)

        if self.mode is not None:
            take = self._stiff_step if self.mode else self._tsit5_step
            y1, error, k, new, result = take(*step)
        else:
            # Each method once, a real branch taken when any lane (or the only
            # one) needs it; lanes in both modes keep their own method's step.
            def only_if(needed, method):
                def skip():
                    return tree_zeros(eqx.filter_eval_shape(method, *step))

                return jax.lax.cond(needed, lambda: method(*step), skip)

            stiff = only_if(unvmap_any(state.stiff), self._stiff_step)
            tsit5 = only_if(~unvmap_all(state.stiff), self._tsit5_step)
            y1, error, k, new, result = jax.tree.map(
                lambda a, b: jnp.where(state.stiff, a, b), stiff, tsit5
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
        switch = (streak >= self.patience) & (t0 >= state.not_before)
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
        new = dataclasses.replace(
            state,
            stiff=switch,
            last_stiff=jnp.zeros((), bool),
            streak=jnp.where(switch, 0, streak),
            tsit5=tsit5,
            stabilized=stabilized,
            grads=jnp.asarray(_TSIT5_GRADS, jnp.int32),
            hvps=jnp.zeros((), jnp.int32),
            explicit=state.explicit.accepted(_TSIT5_GRADS, t1 - t0),
            stabilized_rate=Rate.zero(state.explicit.cost.dtype),
            stiff_steps=jnp.zeros((), jnp.int32),
            switched_at=jnp.where(switch, t1, state.switched_at),
        )
        return y1, error, dense["k"], new, result

    def _stiff_step(self, terms, t0, t1, y0, args, state: AutoState, made_jump):
        """A stabilized step, and whether it has been easy long enough to hand
        back to Tsit5. Its dense output is kept in Tsit5's layout (the first and
        last of seven stages)."""
        y1, error, dense, stabilized, result = self.stiff.step(
            terms, t0, t1, y0, args, state.stabilized, made_jump
        )
        h = t1 - t0
        easy = h * stabilized.radius < self.threshold / 2
        streak = jnp.where(easy, state.streak + 1, 0)
        # The first stabilized step's estimate of the spectral radius is an
        # investment of the switch, not a cost of the steps that follow.
        first = state.stiff_steps == 0
        cost = self.beside + jnp.where(
            first, stabilized.grads, stabilized.grads + 2 * stabilized.hvps
        )
        rate = state.stabilized_rate.accepted(cost, h)
        costly = (state.stiff_steps + 1 >= 2 * self.patience) & (
            rate.value > state.explicit.value
        )
        switch = (streak >= self.patience) | costly
        failures = state.failures + costly
        trial = t1 - state.switched_at
        # (failures is an int: 2.0 ** failures would be float64 under x64, whatever
        # the dtype of the times.)
        wait = 8.0 * trial * jnp.exp2(failures - 1).astype(trial.dtype)
        not_before = jnp.where(costly, t1 + wait, state.not_before).astype(
            state.not_before.dtype
        )
        k = jax.tree.map(
            lambda k0, k1: (
                jnp.zeros((7,) + k0.shape, k0.dtype).at[0].set(k0).at[-1].set(k1)
            ),
            dense["k0"],
            dense["k1"],
        )
        new = dataclasses.replace(
            state,
            stiff=~switch,
            last_stiff=jnp.ones((), bool),
            streak=jnp.where(switch, 0, streak),
            tsit5=fsal_state(stabilized.f0),
            stabilized=stabilized,
            grads=stabilized.grads,
            hvps=stabilized.hvps,
            stabilized_rate=rate,
            stiff_steps=state.stiff_steps + 1,
            not_before=not_before,
            failures=failures,
        )
        return y1, error, k, new, result


def _equivalents(state: AutoState):
    """The gradient-equivalents of the step that made `state`."""
    return (state.grads + 2 * state.hvps).astype(state.explicit.cost.dtype)


_TSIT5_TABLEAU = diffrax.Tsit5.tableau
# Y7 - Y6 = Σ_j (b_j - a_6j) k_j: the two stages evaluated at the end of the step.
# (NumPy: nothing runs on a device at import, or while a program is traced.)
_STAGE_GAP = np.append(
    np.asarray(_TSIT5_TABLEAU.a_lower[5]) - np.append(_TSIT5_TABLEAU.a_lower[4], 0.0),
    0.0,
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
