"""The central flow: the time average of gradient descent at the edge of stability
(Cohen, Damian, Talwalkar, Kolter & Lee, ICLR 2025)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._checks import check_functions, check_int
from .._linalg import hvp, psd_qp, smat, svec, top_eigenpairs, upper_pairs
from .._tree import like_dtype, tree_scrambled
from ..optimizers import GD, AbstractOptimizer
from ..optimizers._optimizers import describe
from ._base import AbstractFlow, FlowState, Work, _rate, grad

#: LOBPCG iterations of the first eigen-solve, from vectors that look random.
_START_ITERS = 30
#: Third-order products are computed for the tracked eigenvalues with lr·λ at
#: least this at the start of a step (the edge is at 2); a step in which another
#: one reaches the edge is rejected, so it is included from the next step on.
_NEAR_EDGE = 1.8
#: A run is refused when every tracked eigenvalue reached this share of the edge:
#: more eigenvalues than are tracked may be near it.
_TRACKED_FLOOR = 0.75
#: The most eigenpairs a central flow tracks.
_MOST_TRACKED = 32


class CentralFlow(AbstractFlow):
    r"""The central flow of gradient descent with learning rate `lr`:

        dθ/dt = −∇L(θ) − ½ ∇_θ⟨Σ, ∇²L(θ)⟩,   Σ = U X Uᵀ ⪰ 0,

    on gflow's time axis t = lr·k. Gradient descent at a learning rate that
    people train with sharpens until lr·λ_max reaches 2, then oscillates along the
    top Hessian eigenvectors U and keeps lr·λ_max ≈ 2: the *edge of stability*.
    It leaves the gradient flow there; the central flow follows its time average.
    Σ, the covariance of the oscillation, is the solution of a small
    semidefinite complementarity problem: X ⪰ 0 keeps every eigenvalue of UᵀHU
    at or below the edge 2/lr, and is complementary to it. With no eigenvalue
    at the edge Σ = 0 and it is the gradient flow; with one, σ² =
    2⟨−∇L, ∇S⟩/‖∇S‖² (S the sharpness) and it is the gradient flow projected so
    that S stays at 2/lr.

    How it is computed, in one compiled program:
    - the top `track` eigenpairs of the Hessian by `eig_iters` LOBPCG iterations
      on Hessian-vector products after every step attempt, warm-started from
      the eigenvectors the flow's state carries, and by a Rayleigh-Ritz
      projection on their span at every evaluation;
    - the third-order products ∇_θ(u_iᵀ H u_j) (forward over reverse over
      reverse) for the pairs of tracked eigenvectors whose eigenvalues are near
      the edge (lr·λ ≥ 1.8 when the step starts): none before the edge; a step
      in which another eigenvalue reaches the edge is rejected and shortened;
    - the complementarity problem as a semidefinite quadratic program (min ⟨A, X⟩
      + ½ B[X, X] over X ⪰ 0) solved on the device (closed form for one
      eigenvalue at the edge); its constraint is kept with a relaxation at rate
      1/lr (an eigenvalue above the edge returns to it within about one step of
      gradient descent, as in the authors' discretisation), so that integration
      errors do not accumulate;
    - error-controlled adaptive steps (Tsit5 under `"auto"`: the field is not a
      gradient, the stabilized solvers are refused).

    Saved rows get the metrics `"sharpness"` (λ_max), `"effective_eigenvalues"`
    (lr·λ_i of the tracked eigenvalues, the edge at 2), `"predicted_loss"` (GD's
    time-averaged loss, L + ½⟨Σ, H⟩), `"oscillation"` (tr Σ), `"edge_count"` (the
    rank of Σ: the eigenvalues at the edge) and, for every `observables` entry,
    its predicted time average f(θ) + ½⟨Σ, ∇²f⟩. `stats` counts gradients,
    Hessian-vector products and third-order products exactly
    (`num_third_order_evals`).

    It stops being accurate where its assumptions fail: GD's oscillation must
    be small enough for a cubic model of the loss around its centre, and the
    tracked set must hold every eigenvalue at the edge. A run in which all
    `track` tracked eigenvalues rose above 3/4 of the edge is refused (raise
    `track`).

    Args:
        lr: the learning rate of the gradient descent it models (> 0), or
            `gflow.optimizers.GD(lr)` (a constant rate: schedules and the other
            optimisers have their rod flows, `gflow.flows.RodFlow(opt)`). A new
            value reuses the compiled program.
        track: how many top eigenpairs are tracked (1 to 32; default 3). An
            evaluation costs a gradient, `track` Hessian-vector products and
            m(m + 1)/2 third-order products for the m tracked eigenvalues near
            the edge; a step attempt `track * (eig_iters + 1)` more
            Hessian-vector products.
        eig_iters: LOBPCG iterations after every step attempt (default 3).
        observables: `{name: f(params, data)}`: scalar functions whose time
            average over GD's oscillation is predicted at every saved row.

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.1, key=0)
        >>> central = gflow.simulate(model, data, 100.0, key=0, ts=gd.ts,
        ...                          flow=gflow.flows.CentralFlow(0.1))
        >>> central.metrics["sharpness"] * 0.1        # ≤ 2: at or below the edge
        >>> gflow.compare(central, gd.midpoints())    # GD's oscillation averaged out
    """

    lr: np.ndarray
    track: int = eqx.field(static=True)
    eig_iters: int = eqx.field(static=True)
    observables: tuple[tuple[str, Callable], ...] = ()
    gradient_field: ClassVar[bool] = False

    def __init__(
        self,
        lr: float | GD,
        *,
        track: int = 3,
        eig_iters: int = 3,
        observables: Mapping[str, Callable] | None = None,
    ):
        if isinstance(lr, AbstractOptimizer):
            if type(lr) is not GD or callable(lr.lr):
                raise TypeError(
                    "CentralFlow models gradient descent at a constant learning "
                    "rate: `lr` must be a number or gflow.optimizers.GD(lr); got "
                    f"{describe(lr)}. Its gflow.flows.RodFlow (and StableFlow) "
                    "model it at its edge of stability."
                )
            lr = float(lr.lr)
        self.lr = _rate("lr", lr)
        for name, value, most in (
            ("track", track, _MOST_TRACKED),
            ("eig_iters", eig_iters, 100),
        ):
            if check_int(name, value, 1) > most:
                raise ValueError(f"`{name}` must be at most {most}; got {value}.")
        self.track, self.eig_iters = int(track), int(eig_iters)
        self.observables = check_functions("observables", observables)

    @property
    def _pairs(self) -> int:
        return self.track * (self.track + 1) // 2

    @property
    def cost(self) -> Work:
        """The most one evaluation costs (all tracked vectors at the edge)."""
        return Work(1, self.track, self._pairs)

    def evaluation_cost(self, carried):
        return Work(1, self.track, _pairs_at_edge(self._at_edge(carried.values)))

    def _at_edge(self, values):
        """How many tracked eigenvalues (descending) are near enough to the edge
        for a step to reach it: lr·λ ≥ `_NEAR_EDGE`."""
        lr = like_dtype(self.lr, values)
        return jnp.sum(lr * values >= _NEAR_EDGE).astype(jnp.int32)

    def init(self, loss_fn, params, data):
        """The parameters; carried, the top `track` Hessian eigenvectors there
        (rows of a (track, n) array, n the number of trained parameters) with
        their eigenvalues: what a step starts its eigen-solves from."""
        flat = ravel_pytree(params)[0]
        start = tree_scrambled(jnp.zeros((self.track, flat.size), flat.dtype))
        values, vectors = _eigen(loss_fn, params, data, start, _START_ITERS)
        work = Work(hvps=self.track * (_START_ITERS + 1))
        return FlowState(params), Eigenpairs(vectors, values), work

    def update(self, loss_fn, state, carried, data):
        """The tracked eigenpairs at the end of a step attempt, refined by
        `eig_iters` LOBPCG iterations from the last ones."""
        values, vectors = _eigen(
            loss_fn, state.params, data, carried.vectors, self.eig_iters
        )
        return Eigenpairs(vectors, values), Work(hvps=self.track * (self.eig_iters + 1))

    def vector_field(self, loss_fn: Callable) -> Callable:
        def field(t, state, data, carried):
            gradient = grad(loss_fn, state.params, data)
            velocity, values = _solve(
                self, loss_fn, state.params, carried, data, gradient
            )[:2]
            # An eigenvalue that reaches the edge within a step begun with it
            # below `_NEAR_EDGE` (no third-order products for it): the step is
            # too long. inf/NaN makes the engine reject it and shrink it, until
            # it ends below the edge; the next step then includes it.
            lr = like_dtype(self.lr, values)
            outside = jnp.arange(self.track) >= self._at_edge(carried.values)
            escaped = jnp.any(outside & (lr * values > 2))
            velocity = jax.tree.map(lambda v: jnp.where(escaped, jnp.nan, v), velocity)
            return FlowState(velocity)

        return field

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        params = state.params
        velocity, values, vectors, x = _solve(
            self, loss_fn, params, carried, data, grad
        )
        sigma = smat(x)  # Σ in the basis of the tracked eigenvectors
        spread = jnp.linalg.eigvalsh(sigma)
        support = spread > 1e-6 * spread[-1]
        metrics = {
            "sharpness": values[0],
            "effective_eigenvalues": like_dtype(self.lr, values) * values,
            "predicted_loss": loss + jnp.sum(jnp.diag(sigma) * values) / 2,
            "oscillation": jnp.trace(sigma),
            "edge_count": jnp.sum(support & (spread[-1] > 0)).astype(jnp.int32),
        }
        for name, fn in self.observables:
            metrics[name] = _predicted(fn, params, data, vectors, sigma)
        hvps = self.track * (1 + len(self.observables))
        work = Work(hvps=hvps, thirds=_pairs_at_edge(self._at_edge(carried.values)))
        return velocity, metrics, work

    def check(self, trajectory) -> None:
        """Refuse a run in which every tracked eigenvalue neared the edge (unless
        every eigenvalue is tracked): more may be at the edge than are tracked."""
        lead = 1 if trajectory.batch_size is None else 2
        trained = eqx.filter(trajectory.params, eqx.is_inexact_array)
        n = sum(int(np.prod(x.shape[lead:])) for x in jax.tree.leaves(trained))
        lowest = np.asarray(trajectory.metrics["effective_eigenvalues"])[..., -1]
        crowded = np.flatnonzero(np.reshape(lowest >= 2 * _TRACKED_FLOOR, -1))
        if crowded.size and self.track < n:
            ts = np.reshape(np.asarray(trajectory.ts), -1)
            more = min(self.track + 2, _MOST_TRACKED, n)
            advice = (
                f"Track more: CentralFlow(lr, track={more})."
                if self.track < _MOST_TRACKED
                else f"{_MOST_TRACKED} is the most CentralFlow tracks: it cannot "
                "model this run (more eigenvalues may be at the edge than it can "
                "track, as on a network of many outputs)."
            )
            raise ValueError(
                f"CentralFlow(track={self.track}): all {self.track} tracked "
                f"eigenvalues reached lr·λ ≥ {2 * _TRACKED_FLOOR:g} (at t = "
                f"{ts[crowded[0]]:.4g}); more eigenvalues than are tracked may be at "
                f"the edge 2/lr. {advice}"
            )


def _flat_gradient(loss_fn, unravel, data):
    """The loss gradient as a function of the flat parameter vector."""
    return lambda z: ravel_pytree(grad(loss_fn, unravel(z), data))[0]


class Eigenpairs(eqx.Module):
    """What a central flow carries: the tracked Hessian eigenvectors (rows) and
    eigenvalues (descending) at the end of the last step, a warm start."""

    vectors: jax.Array
    values: jax.Array


# Jitted, so that the solver's stages and the saved rows share one trace of it.
@eqx.filter_jit
def _solve(flow: CentralFlow, loss_fn, params, carried: Eigenpairs, data, gradient):
    """dθ/dt at `params`, the tracked eigenpairs there (Rayleigh-Ritz in the
    span of the carried vectors) and svec(X)."""
    flat, unravel = ravel_pytree(params)
    values, u = _eigen(loss_fn, params, data, carried.vectors, 0)
    m = flow._at_edge(carried.values)  # fixed over a step: its cost is known
    products = _edge_products(loss_fn, unravel, flat, data, u, m)
    g = ravel_pytree(gradient)[0]
    lr = like_dtype(flow.lr, flat)
    # d/dt of svec(UᵀHU) is −(products @ g) − ½ (products productsᵀ) x; the
    # edge 2/lr is kept by −d/dt ⪰ −(1/lr)(2/lr − UᵀHU) on the support of X.
    a = products @ g + svec(jnp.diag(2 / lr - values)) / lr
    x = _complementarity(products @ products.T / 2, a, m)
    velocity = unravel(-g - products.T @ x / 2)
    return velocity, values, u, x


def _pairs_at_edge(m):
    return m * (m + 1) // 2


def _edge_products(loss_fn, unravel, flat, data, u, m):
    """The third-order products w_ij ∇_θ(u_iᵀ H(θ) u_j) (w: 1 on the diagonal,
    √2 off it, as `svec` weighs) for the pairs among the first `m` vectors, rows
    in `svec` order; zero rows for the other pairs (not computed)."""
    k, n = u.shape
    i, j = upper_pairs(k)
    weight = jnp.asarray(np.where(i == j, 1.0, np.sqrt(2.0)), flat.dtype)
    flat_grad = _flat_gradient(loss_fn, unravel, data)

    def product(p, rows):
        a, b = u[jnp.asarray(i)[p]], u[jnp.asarray(j)[p]]
        third = jax.grad(lambda z: a @ jax.jvp(flat_grad, (z,), (b,))[1])(flat)
        return rows.at[p].set(weight[p] * third)

    empty = jnp.zeros((len(i), n), flat.dtype)
    return jax.lax.fori_loop(0, _pairs_at_edge(m), product, empty)


def _complementarity(q, a, m):
    """svec(X) of the complementarity problem restricted to the first `m` tracked
    vectors (X zero outside their block): none, one (closed form) or more
    (`psd_qp`)."""
    pairs = len(a)
    inside = jnp.arange(pairs) < _pairs_at_edge(m)

    def one():
        x = jnp.maximum(0, -a[0] / jnp.where(q[0, 0] > 0, q[0, 0], 1))
        return jnp.zeros_like(a).at[0].set(jnp.where(m == 1, x, 0))

    def several():
        i, j = upper_pairs(smat(a).shape[-1])
        # Outside the block: unit curvature and a positive cost on the
        # diagonal, so X is zero there.
        held = jnp.where(inside[:, None] & inside[None, :], q, jnp.eye(pairs))
        cost = jnp.where(inside, a, jnp.asarray(i == j, a.dtype))
        return psd_qp(held.astype(a.dtype), cost)

    if pairs == 1:
        return one()
    return jax.lax.cond(m <= 1, one, several)


def _eigen(loss_fn, params, data, start, iters):
    """The top eigenpairs of the loss Hessian at `params`, from rows `start`."""
    flat, unravel = ravel_pytree(params)
    flat_grad = _flat_gradient(loss_fn, unravel, data)
    hvps = jax.vmap(lambda v: jax.jvp(flat_grad, (flat,), (v,))[1])
    return top_eigenpairs(hvps, start.astype(flat.dtype), iters)


def _predicted(fn, params, data, vectors, sigma):
    """f(θ) + ½⟨Σ, ∇²f⟩, Σ = Uᵀ sigma U: f's average over the oscillation."""
    flat, unravel = ravel_pytree(params)

    def flat_fn(z, data):
        return fn(unravel(z), data)

    curvature = jax.vmap(lambda v: hvp(flat_fn, flat, data, v))(vectors)
    return flat_fn(flat, data) + jnp.sum(sigma * (vectors @ curvature.T)) / 2
