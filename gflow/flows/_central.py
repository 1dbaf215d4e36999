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
from .._linalg import (
    block_sizes,
    hvp,
    psd_qp,
    rows_applied,
    smat,
    svec,
    top_eigenpairs,
    upper_pairs,
)
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
#: A central flow that adapts its tracked set (`track=None`) starts with this
#: many eigenpairs and adds as many whenever the lowest tracked eigenvalue
#: reaches `_TRACKED_FLOOR` of the edge, up to `_MOST_ADAPTED`: each size class
#: it may reach (8, 16) compiles its own Ritz and complementarity problems,
#: about 2.7 s each on the 2-core CPU, so the default stops at 16 (a
#: 10-class classifier needs about that) and a fixed `track` goes to 32.
_TRACK_STEP = 4
_MOST_ADAPTED = 16


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

    The tracked set must hold every eigenvalue at the edge. By default it
    adapts inside the run: it starts with the top 4 eigenpairs and takes 4 more
    (from directions that look random, refined by the next steps' LOBPCG)
    whenever the lowest tracked eigenvalue reaches 3/4 of the edge, up to 16
    (or the number of parameters), so that a classifier, which brings about one
    eigenvalue per class to the edge, needs no setting; the row metric
    `"tracked"` says how many it tracks. The cost follows the tracked count:
    its Hessian-vector products, the Ritz problems and the complementarity
    problem are sized by it (in blocks of 8 and 16).

    It stops being accurate where its assumptions fail: GD's oscillation must
    be small enough for a cubic model of the loss around its centre, and the
    tracked set must hold every eigenvalue at the edge. A run in which every
    tracked eigenvalue rises above 3/4 of the edge with no room to track more
    is refused as soon as that happens: the flow stands still from there (so
    that the run ends in a few steps) and the call raises a ValueError naming
    the time and a larger `track`.

    Args:
        lr: the learning rate of the gradient descent it models (> 0), or
            `gflow.optimizers.GD(lr)` (a constant rate: schedules and the other
            optimisers have their rod flows, `gflow.flows.RodFlow(opt)`). A new
            value reuses the compiled program.
        track: how many top eigenpairs are tracked (1 to 32), or None (the
            default) to adapt it inside the run, 4 to 16. An evaluation costs
            a gradient, one Hessian-vector product per tracked pair and
            m(m + 1)/2 third-order products for the m tracked eigenvalues near
            the edge; a step attempt `eig_iters + 1` more Hessian-vector
            products per tracked pair.
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
    track: int = eqx.field(static=True)  # the most it tracks
    adapts: bool = eqx.field(static=True)  # whether the tracked set grows
    eig_iters: int = eqx.field(static=True)
    observables: tuple[tuple[str, Callable], ...] = ()
    gradient_field: ClassVar[bool] = False

    def __init__(
        self,
        lr: float | GD,
        *,
        track: int | None = None,
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
        self.adapts = track is None
        for name, value, most in (
            ("track", _MOST_TRACKED if track is None else track, _MOST_TRACKED),
            ("eig_iters", eig_iters, 100),
        ):
            if check_int(name, value, 1) > most:
                raise ValueError(f"`{name}` must be at most {most}; got {value}.")
        self.track = _MOST_ADAPTED if track is None else int(track)
        self.eig_iters = int(eig_iters)
        self.observables = check_functions("observables", observables)

    @property
    def _pairs(self) -> int:
        return self.track * (self.track + 1) // 2

    @property
    def cost(self) -> Work:
        """The most one evaluation costs (all tracked vectors at the edge)."""
        return Work(1, self.track, self._pairs)

    def evaluation_cost(self, carried):
        m = self._at_edge(carried.values)
        return Work(1, carried.count, _pairs_at_edge(m))

    def _at_edge(self, values):
        """How many tracked eigenvalues (descending) are near enough to the edge
        for a step to reach it: lr·λ ≥ `_NEAR_EDGE`."""
        lr = like_dtype(self.lr, values)
        return jnp.sum(lr * values >= _NEAR_EDGE).astype(jnp.int32)

    def _tracked(self, carried):
        """How many eigenpairs it tracks: the carried count if it adapts
        (traced), else `track` (static, so that its solves are batched whole)."""
        return carried.count if self.adapts else self.track

    def _crowded(self, carried):
        """Whether the lowest tracked eigenvalue reached `_TRACKED_FLOOR` of the
        edge: more may be near the edge than are tracked."""
        lowest = carried.values[carried.count - 1]
        return like_dtype(self.lr, lowest) * lowest >= 2 * _TRACKED_FLOOR

    def init(self, loss_fn, params, data):
        """The parameters; carried, the top Hessian eigenvectors there (rows of a
        (k, n) array, k the most it tracks and n the number of trained
        parameters; the rows past those it tracks hold the directions it starts
        the next ones from) with their eigenvalues: what a step starts its
        eigen-solves from."""
        flat = ravel_pytree(params)[0]
        most = min(self.track, flat.size) if self.adapts else self.track
        start = tree_scrambled(jnp.zeros((most, flat.size), flat.dtype))
        count = min(_TRACK_STEP, most) if self.adapts else most
        carried = Eigenpairs(
            start, jnp.zeros(most, flat.dtype), jnp.int32(count), jnp.bool_(False)
        )
        carried = _eigen(
            loss_fn, params, data, carried, _START_ITERS, self._tracked(carried)
        )
        work = Work(hvps=count * (_START_ITERS + 1))
        return FlowState(params), carried, work

    def update(self, loss_fn, state, carried, data):
        """The tracked eigenpairs at the end of a step attempt, refined by
        `eig_iters` LOBPCG iterations from the last ones; an adapting flow first
        tracks `_TRACK_STEP` more if the lowest tracked one neared the edge."""
        if self.adapts:
            count, most = carried.count, carried.values.shape[0]
            more = jnp.minimum(count + _TRACK_STEP, most)
            grown = jnp.where(self._crowded(carried), more, count)
            carried = eqx.tree_at(lambda c: c.count, carried, grown)
        carried = _eigen(
            loss_fn, state.params, data, carried, self.eig_iters, self._tracked(carried)
        )
        # Every tracked eigenvalue near the edge with no room to track more: the
        # run will be refused (`check`). From here the flow stands still, so that
        # it reaches its end in a few steps instead of computing what is refused.
        most, n = carried.vectors.shape
        full = (carried.count >= most) & (most < n)
        refused = carried.refused | (self._crowded(carried) & full)
        carried = eqx.tree_at(lambda c: c.refused, carried, refused)
        return carried, Work(hvps=carried.count * (self.eig_iters + 1))

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
            outside = jnp.arange(values.shape[0]) >= self._at_edge(carried.values)
            escaped = jnp.any(outside & (lr * values > 2))
            velocity = jax.tree.map(
                lambda v: jnp.where(carried.refused, 0, jnp.where(escaped, jnp.nan, v)),
                velocity,
            )
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
        tracked = jnp.arange(values.shape[0]) < carried.count
        effective = like_dtype(self.lr, values) * values
        metrics = {
            "sharpness": values[0],
            # NaN past the tracked pairs (an adapting flow tracks more later).
            "effective_eigenvalues": jnp.where(tracked, effective, jnp.nan),
            "tracked": jnp.asarray(carried.count, jnp.int32),
            "predicted_loss": loss + jnp.sum(jnp.diag(sigma) * values) / 2,
            "oscillation": jnp.trace(sigma),
            "edge_count": jnp.sum(support & (spread[-1] > 0)).astype(jnp.int32),
        }
        count = self._tracked(carried)
        for name, fn in self.observables:
            metrics[name] = _predicted(fn, params, data, vectors, sigma, count)
        hvps = carried.count * (1 + len(self.observables))
        work = Work(hvps=hvps, thirds=_pairs_at_edge(self._at_edge(carried.values)))
        return velocity, metrics, work

    def check(self, trajectory) -> None:
        """Refuse a run in which every tracked eigenvalue neared the edge with no
        room to track more (unless every eigenvalue is tracked): more may be at
        the edge than are tracked."""
        lead = 1 if trajectory.batch_size is None else 2
        trained = eqx.filter(trajectory.params, eqx.is_inexact_array)
        n = sum(int(np.prod(x.shape[lead:])) for x in jax.tree.leaves(trained))
        effective = np.asarray(trajectory.metrics["effective_eigenvalues"])
        tracked = np.asarray(trajectory.metrics["tracked"])
        lowest = np.min(np.where(np.isnan(effective), np.inf, effective), -1)
        most = min(self.track, n)
        full = (lowest >= 2 * _TRACKED_FLOOR) & (tracked >= most)
        crowded = np.flatnonzero(np.reshape(full, -1))
        if crowded.size and most < n:
            ts = np.reshape(np.asarray(trajectory.ts), -1)
            more = min(
                self.track + (2 * _TRACK_STEP if self.adapts else 2), _MOST_TRACKED, n
            )
            advice = (
                f"Track more: CentralFlow(lr, track={more})."
                if self.track < _MOST_TRACKED
                else f"{_MOST_TRACKED} is the most CentralFlow tracks: it cannot "
                "model this run (more eigenvalues may be at the edge than it can "
                "track, as on a network of many outputs)."
            )
            name = "lr" if self.adapts else f"lr, track={self.track}"
            raise ValueError(
                f"CentralFlow({name}): all {most} tracked eigenvalues reached "
                f"lr·λ ≥ {2 * _TRACKED_FLOOR:g} (at t = {ts[crowded[0]]:.4g}); more "
                f"eigenvalues than are tracked may be at the edge 2/lr. {advice}"
            )


def _flat_gradient(loss_fn, unravel, data):
    """The loss gradient as a function of the flat parameter vector."""
    return lambda z: ravel_pytree(grad(loss_fn, unravel(z), data))[0]


class Eigenpairs(eqx.Module):
    """What a central flow carries: the tracked Hessian eigenvectors (the first
    `count` rows) and eigenvalues (descending; 0 past `count`) at the end of the
    last step, a warm start; the rows past `count` are the directions the next
    tracked pairs start from. `refused`: every tracked eigenvalue neared the
    edge with no room to track more (the run stands still from then on)."""

    vectors: jax.Array
    values: jax.Array
    count: jax.Array
    refused: jax.Array


# Jitted, so that the solver's stages and the saved rows share one trace of it.
@eqx.filter_jit
def _solve(flow: CentralFlow, loss_fn, params, carried: Eigenpairs, data, gradient):
    """dθ/dt at `params`, the tracked eigenpairs there (Rayleigh-Ritz in the
    span of the carried vectors) and svec(X)."""
    flat, unravel = ravel_pytree(params)
    here = _eigen(loss_fn, params, data, carried, 0, flow._tracked(carried))
    values, u = here.values, here.vectors
    m = flow._at_edge(carried.values)  # fixed over a step: its cost is known
    products = _edge_products(loss_fn, unravel, flat, data, u, m)
    g = ravel_pytree(gradient)[0]
    x, correction = _complementarity(products, g, values, like_dtype(flow.lr, flat), m)
    return unravel(-g - correction), values, u, x


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


def _complementarity(products, g, values, lr, m):
    """svec(X) of the complementarity problem restricted to the first `m` tracked
    vectors (X zero outside their block), and the flow's correction ½ Gᵀx (G:
    `products`): none, one (closed form) or more (`psd_qp`), each in the
    smallest of the blocks 8, 16, ... that holds m, so that its cost follows
    m, not how many are tracked.

    d/dt of svec(UᵀHU) is −(G g) − ½ (G Gᵀ) x; the edge 2/lr is kept by −d/dt
    ⪰ −(1/lr)(2/lr − UᵀHU) on the support of X: min a·x + ½ xᵀ(G Gᵀ/2)x over X
    ⪰ 0, with a = G g + svec(2/lr − UᵀHU)/lr."""
    k = len(values)
    pairs = _pairs_at_edge(k)

    def one():
        row = products[0]
        a = row @ g + (2 / lr - values[0]) / lr
        curvature = row @ row / 2
        x = jnp.where(
            m == 1, jnp.maximum(0, -a / jnp.where(curvature > 0, curvature, 1)), 0
        )
        return jnp.zeros(pairs, g.dtype).at[0].set(x), row * x / 2

    def block(size):
        within = _pairs_at_edge(size)
        i, j = upper_pairs(size)
        rows = products[:within]
        a = rows @ g + svec(jnp.diag(2 / lr - values[:size])) / lr
        inside = jnp.arange(within) < _pairs_at_edge(m)
        # Outside the edge's block: unit curvature and a positive cost on the
        # diagonal, so X is zero there.
        q = rows @ rows.T / 2
        held = jnp.where(inside[:, None] & inside[None, :], q, jnp.eye(within))
        cost = jnp.where(inside, a, jnp.asarray(i == j, a.dtype))
        x = psd_qp(held.astype(a.dtype), cost)
        return jnp.zeros(pairs, g.dtype).at[:within].set(x), rows.T @ x / 2

    if k == 1:
        return one()
    sizes = block_sizes(k)
    branches = [one] + [lambda size=size: block(size) for size in sizes]
    tier = jnp.where(m <= 1, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), m))
    return jax.lax.switch(tier, branches)


def _eigen(loss_fn, params, data, carried: Eigenpairs, iters, count) -> Eigenpairs:
    """The top `count` eigenpairs of the loss Hessian at `params`, by `iters`
    LOBPCG iterations from `carried`'s first `count` rows (the rest kept)."""
    flat, unravel = ravel_pytree(params)
    flat_grad = _flat_gradient(loss_fn, unravel, data)

    def hvps(rows):
        return rows_applied(lambda v: jax.jvp(flat_grad, (flat,), (v,))[1], rows, count)

    start = carried.vectors.astype(flat.dtype)
    values, vectors = top_eigenpairs(hvps, start, iters, count)
    return eqx.tree_at(lambda c: (c.vectors, c.values), carried, (vectors, values))


def _predicted(fn, params, data, vectors, sigma, count):
    """f(θ) + ½⟨Σ, ∇²f⟩, Σ = Uᵀ sigma U (U the first `count` rows of
    `vectors`): f's average over the oscillation."""
    flat, unravel = ravel_pytree(params)

    def flat_fn(z, data):
        return fn(unravel(z), data)

    tracked = jnp.where((jnp.arange(len(vectors)) < count)[:, None], vectors, 0)
    curvature = rows_applied(lambda v: hvp(flat_fn, flat, data, v), tracked, count)
    return flat_fn(flat, data) + jnp.sum(sigma * (tracked @ curvature.T)) / 2
