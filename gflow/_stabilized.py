"""Stabilized explicit Runge-Kutta solvers for stiff gradient flows, as diffrax solvers.

The Jacobian of a gradient flow's vector field is minus the Hessian: symmetric,
with real eigenvalues. An explicit Runge-Kutta method of s stages is stable on the
negative real axis up to about 3/h·λ for Tsit5, but a Chebyshev method of s stages
is stable up to about 0.65 s² (RKC2): a step of size h costs sqrt(h·ρ / 0.65)
gradients instead of h·ρ / 3, where ρ is the spectral radius of the Jacobian.

ρ comes from Hessian-vector products (forward-mode derivatives of the vector field:
`jax.jvp`), by power iteration warm-started from the previous eigenvector and
multiplied by a safety factor. It is re-estimated only when needed: when the step
size has grown well past the one it was estimated for, every `refresh` steps, and
when a step is rejected twice in a row for instability (the engine reports
rejections through `rejected`; one Hessian-vector product tells an unstable step
from an inaccurate one).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from ._tree import tree_norm
from .metrics import power_iteration


def _unit(tree):
    return jax.tree.map(lambda x: x / tree_norm(tree), tree)


def _axpy(*terms):
    """Σ coefficient · tree over `(coefficient, tree)` pairs."""
    (c0, t0), *rest = terms
    out = jax.tree.map(lambda x: c0 * x, t0)
    for c, t in rest:
        out = jax.tree.map(lambda o, x, c=c: o + c * x, out, t)
    return out


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


class AbstractStabilized(diffrax.AbstractAdaptiveSolver):
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
    #: gflow's engine tells the solver about rejected steps (see `rejected`).
    uses_jvp: ClassVar[bool] = True

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

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args) -> StabilizedState:
        f0 = terms.vf(t0, y0, args)
        return self.start(terms, t0, t1, y0, args, f0)

    def start(self, terms, t0, t1, y0, args, f0) -> StabilizedState:
        """The state at `t0` given the vector field `f0` there (no evaluation). The
        first power iteration starts from a fixed pseudo-random vector, which has a
        component along the stiff modes."""
        dtype = jnp.result_type(*jax.tree.leaves(y0))
        leaves, treedef = jax.tree.flatten(y0)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        noise = jax.tree.unflatten(
            treedef,
            [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves,
                                                                    strict=True)],
        )  # fmt: skip
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

    def rejected(
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

        # Under vmap (ensembles) the conditions below differ between lanes: an
        # iteration runs when any lane needs it, for the lanes that do (the others
        # take 0 steps).
        # A step rejected for instability has an error dominated by the mode that
        # outgrew the stability interval, sharper than the estimate; one rejected
        # for accuracy has not. The error's Rayleigh quotient tells. Most
        # rejections are for accuracy and the shrunk step passes: only a second
        # rejection in a row is worth the Hessian-vector product.
        suspect = state.rejections >= 2
        quotient, sharper, checked, _ = jax.lax.cond(
            eqxi.unvmap_any(suspect),
            lambda: power_iteration(jvp, state.error, jnp.where(suspect, 1, 0)),
            lambda: (jnp.zeros_like(state.radius), state.error,
                     jnp.zeros((), jnp.int32), jnp.zeros_like(state.radius)),
        )  # fmt: skip
        unstable = suspect & (self.safety * jnp.abs(quotient) > state.radius)
        # Estimate at the start, after an unstable step, every `refresh` steps, and
        # once the step has grown past four times the one the estimate served.
        due = (
            unstable
            | (state.radius == 0)
            | (state.age >= self.refresh)
            | (h > 4 * state.h_estimated)
        )
        iters = jnp.where(
            (state.radius > 0) & ~unstable, self.power_iters // 3, self.power_iters
        )
        start = jax.tree.map(
            lambda a, b: jnp.where(unstable, a, b), sharper, state.vector
        )
        # The estimate |q| + residual bounds the top eigenvalue once the vector is
        # mostly in the top eigenvectors' span (close top eigenvalues slow the
        # iteration down, not the bound).
        value, vector, count, residual = jax.lax.cond(
            eqxi.unvmap_any(due),
            lambda: power_iteration(jvp, start, jnp.where(due, iters, 0), rtol=0.05),
            # The vector is kept of unit norm, as the iteration returns it, so that
            # lanes that skip it and lanes that run none of its steps agree.
            lambda: (state.radius / self.safety, _unit(start),
                     jnp.zeros((), jnp.int32), jnp.zeros((), state.radius.dtype)),
        )  # fmt: skip
        radius = jnp.where(due, self.safety * (jnp.abs(value) + residual), state.radius)
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
            hvps=(checked + count).astype(jnp.int32),
        )
        dense = dict(
            y0=y0,
            y1=y1,
            k0=jax.tree.map(lambda f: h * f, state.f0),
            k1=jax.tree.map(lambda f: h * f, f1),
        )
        return y1, error, dense, new_state, diffrax.RESULTS.successful


def _chebyshev(j, theta):
    """T_j(w0), T_j'(w0), T_j''(w0) at w0 = cosh(theta) > 1, j >= 1 (array)."""
    j = jnp.asarray(j, theta.dtype)
    t = jnp.cosh(j * theta)
    d = j * jnp.sinh(j * theta) / jnp.sinh(theta)
    w0 = jnp.cosh(theta)
    # (w0² - 1) T'' = j² T - w0 T', with w0² - 1 = sinh²(theta).
    dd = (j * j * t - w0 * d) / jnp.sinh(theta) ** 2
    return t, d, dd


class RKC2(AbstractStabilized):
    """The second-order Runge-Kutta-Chebyshev method of Sommeijer, Shampine & Verwer
    (1997): s stages built on damped Chebyshev polynomials, stable on the negative
    real axis up to about 0.65 s², with their embedded error estimate and a cubic
    Hermite dense output. Each step costs s gradients, with s = 1 +
    ceil(sqrt(1 + 1.54 h ρ)).

    The embedded estimate is of the local error of one step; on sharpening flows
    the global error it leaves grows well past the tolerance (about 8× on the
    digits MLP of `benchmarks/stiff.py` at rtol 1e-6), so by default the estimate is
    scaled by 4, which brings the error at the default tolerances under 1e-5 there.
    The radius bound of the power iteration (|q| + residual) is already an upper
    bound once the vector lies in the top eigenvectors' span, hence the small
    safety factor.

    Attributes:
        damping: the damping ε of the Chebyshev polynomial (2/13, as in RKC).

    Example:
        >>> traj = gflow.simulate(model, data, 1000.0, solver="rkc2")
        >>> traj.stats["num_hvp_evals"]  # the power iterations' cost
        >>> # The raw local-error control, and at most 200 stages a step:
        >>> traj = gflow.simulate(model, data, 1000.0,
        ...                       solver=gflow.RKC2(error_scale=1.0, max_stages=200))
    """

    safety: float = 1.1
    error_scale: float = 4.0
    damping: float = 2.0 / 13.0

    def order(self, terms) -> int:
        return 2

    def stages_for(self, h_radius):
        return 1 + jnp.ceil(jnp.sqrt(1.0 + 1.54 * h_radius)).astype(jnp.int32)

    def advance(self, field, t0, h, y0, f0, stages):
        s = stages.astype(h.dtype)
        x = self.damping / s**2  # w0 = 1 + x; theta = acosh(w0) without 1 + x
        theta = jnp.log1p(x + jnp.sqrt(x * (2.0 + x)))
        w0 = jnp.cosh(theta)
        _, ds, dds = _chebyshev(s, theta)
        w1 = ds / dds

        def b(j):  # b_j = T_j''/T_j'^2 for j >= 2; b_0 = b_1 = b_2
            _, d, dd = _chebyshev(jnp.maximum(j, 2), theta)
            return dd / d**2

        def a(j):  # a_j = 1 - b_j T_j
            t, _, _ = _chebyshev(jnp.maximum(j, 1), theta)
            return jnp.where(j == 0, 0.0, 1.0 - b(j) * t)

        def c(j):  # the stage times (fractions of h)
            _, d, dd = _chebyshev(jnp.maximum(j, 2), theta)
            c2 = w1 * _chebyshev(2.0, theta)[2] / _chebyshev(2.0, theta)[1]
            return jnp.where(j >= 2, w1 * dd / d, c2 / (4.0 * w0))

        mu1 = b(1) * w1
        y_1 = _axpy((1.0, y0), (mu1 * h, f0))

        def body(carry):
            j, y_prev2, y_prev = carry
            jf = j.astype(h.dtype)
            mu = 2.0 * w0 * b(jf) / b(jf - 1)
            nu = -b(jf) / b(jf - 2)
            mu_tilde = 2.0 * w1 * b(jf) / b(jf - 1)
            gamma_tilde = -a(jf - 1) * mu_tilde
            f = field(t0 + c(jf - 1) * h, y_prev)
            y = _axpy(
                (1.0 - mu - nu, y0), (mu, y_prev), (nu, y_prev2),
                (mu_tilde * h, f), (gamma_tilde * h, f0),
            )  # fmt: skip
            return j + 1, y_prev, y

        _, _, y1 = jax.lax.while_loop(
            lambda carry: carry[0] <= stages, body, (jnp.asarray(2, jnp.int32), y0, y_1)
        )
        f1 = field(t0 + h, y1)
        # Their estimate of the local error: (12 (y0 - y1) + 6 h (f0 + f1)) / 15.
        error = _axpy((0.8, y0), (-0.8, y1), (0.4 * h, f0), (0.4 * h, f1))
        return y1, f1, error


class _Rock4Coefficients(eqx.Module):
    """The stored methods of `_rock4_tables` (see there), as arrays."""

    degrees: jax.Array
    lengths: jax.Array
    finishing: jax.Array
    embedded: jax.Array
    offset: jax.Array
    mu: jax.Array
    nu: jax.Array
    kappa: jax.Array


def _load_rock4() -> dict:
    from ._rock4_tables import PATH

    with np.load(PATH) as tables:
        return {name: tables[name] for name in _Rock4Coefficients.__annotations__}


class ROCK4(AbstractStabilized):
    """A fourth-order stabilized method of the ROCK4 kind (Abdulle 2002), with
    coefficients derived by gflow (`gflow/_rock4_tables.py`).

    s stages: s - 4 of a three-term recurrence of orthogonal polynomials, then a
    4-stage finishing procedure; stable on the negative real axis up to about
    0.35 s²; an embedded third-order method estimates the error. Stage counts
    run from 5 to 600 (every count to 60, then in steps of 5 and 20). Dense output:
    cubic Hermite.

    On stiff linear problems (a quadratic loss) it reaches a given error for a
    fraction of RKC2's gradients. On a sharpening network its embedded estimate
    keeps the step far below RKC2's (see "Choosing a solver" in the docs), which is
    why `"auto"` uses RKC2.

    Example:
        >>> traj = gflow.simulate(loss, data, 1.0, params0=theta0, solver="rock4",
        ...                       rtol=1e-8, atol=1e-10)
    """

    #: Its cubic dense output is of lower order than its steps: gflow's engine ends
    #: steps on the save times.
    lands_on_saves: ClassVar[bool] = True

    def order(self, terms) -> int:
        return 4

    def error_order(self, terms) -> int:
        # The embedded method is of order 3: the estimate is O(h⁴).
        return 4

    @property
    def stage_limit(self) -> int:
        degrees = _rock4().degrees
        return int(degrees[np.searchsorted(degrees, self.max_stages, "right") - 1])

    def stages_for(self, h_radius):
        tables = _rock4_arrays(h_radius.dtype)
        index = jnp.searchsorted(tables.lengths, h_radius)
        return jnp.where(
            index < tables.degrees.size,
            tables.degrees[jnp.minimum(index, tables.degrees.size - 1)],
            jnp.iinfo(jnp.int32).max,
        )

    def advance(self, field, t0, h, y0, f0, stages):
        tables = _rock4_arrays(h.dtype)
        index = jnp.searchsorted(tables.degrees, stages)
        start = tables.offset[index]
        m = stages - 4

        def body(carry):
            j, c_prev, c, y_prev, y, f = carry
            k = start + j
            mu, nu, kappa = tables.mu[k], tables.nu[k], tables.kappa[k]
            y_next = _axpy((nu, y), (kappa, y_prev), (mu * h, f))
            c_next = nu * c + kappa * c_prev + mu
            # The last stage of the recurrence is U_1: its field starts the finish.
            return j + 1, c, c_next, y, y_next, field(t0 + c_next * h, y_next)

        zero = jnp.zeros((), h.dtype)
        _, _, c, _, u1, f1 = jax.lax.while_loop(
            lambda carry: carry[0] < m,
            body,
            (jnp.asarray(0, jnp.int32), zero, zero, y0, y0, f0),
        )
        a21, a31, a32, a41, a42, a43, b1, b2, b3, b4 = tables.finishing[index]
        e1, e2, e3, e4, e5 = tables.embedded[index]
        u2 = _axpy((1.0, u1), (a21 * h, f1))
        f2 = field(t0 + (c + a21) * h, u2)
        u3 = _axpy((1.0, u1), (a31 * h, f1), (a32 * h, f2))
        f3 = field(t0 + (c + a31 + a32) * h, u3)
        u4 = _axpy((1.0, u1), (a41 * h, f1), (a42 * h, f2), (a43 * h, f3))
        f4 = field(t0 + (c + a41 + a42 + a43) * h, u4)
        y1 = _axpy((1.0, u1), (b1 * h, f1), (b2 * h, f2), (b3 * h, f3), (b4 * h, f4))
        f_end = field(t0 + h, y1)
        # y1 - ŷ, with ŷ the embedded third-order solution (which also uses f_end).
        error = _axpy(
            ((b1 - e1) * h, f1), ((b2 - e2) * h, f2), ((b3 - e3) * h, f3),
            ((b4 - e4) * h, f4), (-e5 * h, f_end),
        )  # fmt: skip
        return y1, f_end, error


_ROCK4_CACHE: dict = {}


def _rock4() -> _Rock4Coefficients:
    if "numpy" not in _ROCK4_CACHE:
        _ROCK4_CACHE["numpy"] = _Rock4Coefficients(**_load_rock4())
    return _ROCK4_CACHE["numpy"]


def _rock4_arrays(dtype) -> _Rock4Coefficients:
    """The tables as JAX arrays of `dtype` (integers as int32)."""
    tables = _rock4()
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else dtype), tables
    )


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


class AutoTsit5(diffrax.AbstractAdaptiveSolver):
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
    # Set by `by_mode`: the method every step takes, for lanes an ensemble has
    # already sorted by mode; None: each step picks from the state.
    mode: bool | None = eqx.field(default=None, static=True, repr=False)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = _AutoInterpolation
    uses_jvp: ClassVar[bool] = True
    _tsit5: ClassVar = diffrax.Tsit5()

    def order(self, terms) -> int:
        return 5

    def lands_on_saves(self, state: AutoState):
        """While the stabilized method steps (its dense output is cubic), end the
        steps on the save times."""
        lands = getattr(self.stiff, "lands_on_saves", False)
        return state.stiff & lands

    def state_error_order(self, state: AutoState):
        stiff, nonstiff = self.stiff.error_order(None), self._tsit5.error_order(None)
        return jnp.where(state.last_stiff, stiff, nonstiff)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args) -> AutoState:
        return self.start(terms, t0, t1, y0, args, terms.vf(t0, y0, args))

    def start(self, terms, t0, t1, y0, args, f0) -> AutoState:
        zero = jnp.zeros((), jnp.int32)
        return AutoState(
            stiff=jnp.zeros((), bool),
            last_stiff=jnp.zeros((), bool),
            streak=zero,
            tsit5=(jnp.zeros((), bool), f0),
            stabilized=self.stiff.start(terms, t0, t1, y0, args, f0),
            grads=zero,
            hvps=zero,
        )

    def rejected(self, state: AutoState, attempt: AutoState) -> AutoState:
        stabilized = self.stiff.rejected(state.stabilized, attempt.stabilized)
        return eqx.tree_at(lambda s: s.stabilized, state, stabilized)

    def step_cost(self, state: AutoState):
        return state.grads, state.hvps

    def by_mode(self):
        """For ensembles: (the solver of lanes in Tsit5 mode, the solver of lanes in
        stiff mode, a stiff state's expected cost: 1 + the stages of its last
        stabilized step; 0 in Tsit5 mode). Under vmap, a step whose lanes are in
        both modes would take both methods on every lane; the engine instead steps
        every lane with Tsit5 and then only the stiff lanes, gathered, with the
        stabilized method."""

        def cost(state: AutoState):
            return jnp.where(state.stiff, 1 + state.stabilized.grads, 0)

        return (dataclasses.replace(self, mode=False),
                dataclasses.replace(self, mode=True), cost)  # fmt: skip

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        state = solver_state
        h = t1 - t0

        def nonstiff():
            y1, error, dense, tsit5, result = self._tsit5.step(
                terms, t0, t1, y0, args, state.tsit5, made_jump
            )
            h_radius = _tsit5_h_radius(y0, dense["k"])
            streak = jnp.where(h_radius > self.threshold, state.streak + 1, 0)
            switch = streak >= self.patience
            f1 = tsit5[1]
            stabilized = eqx.tree_at(
                lambda s: (s.f0, s.radius, s.vector, s.rejections),
                state.stabilized,
                # No estimate yet: the first stabilized step makes one, starting
                # from the stiff direction.
                (f1, jnp.zeros_like(h), _stiff_direction(dense["k"]),
                 jnp.zeros((), jnp.int32)),
            )  # fmt: skip
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

        def stiff():
            y1, error, dense, stabilized, result = self.stiff.step(
                terms, t0, t1, y0, args, state.stabilized, made_jump
            )
            easy = h * stabilized.radius < self.threshold / 2
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
                tsit5=(jnp.zeros((), bool), stabilized.f0),
                stabilized=stabilized,
                grads=stabilized.grads,
                hvps=stabilized.hvps,
            )
            return y1, error, k, new, result

        def either():  # lanes of an ensemble in both modes: take both, keep one
            return jax.tree.map(
                lambda a, b: jnp.where(state.stiff, a, b), stiff(), nonstiff()
            )

        if self.mode is not None:
            y1, error, k, new, result = stiff() if self.mode else nonstiff()
        else:  # Real branches when every lane (or the only one) agrees.
            y1, error, k, new, result = jax.lax.cond(
                eqxi.unvmap_all(state.stiff),
                stiff,
                lambda: jax.lax.cond(eqxi.unvmap_any(state.stiff), either, nonstiff),
            )
        dense = dict(y0=y0, y1=y1, k=k, stiff=new.last_stiff)
        return y1, error, dense, new, result


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
