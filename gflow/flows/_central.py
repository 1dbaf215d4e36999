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
    svec_weights,
    top_eigenpairs,
    upper_pairs,
)
from .._tree import like_dtype, tree_scrambled
from ..optimizers import GD, AbstractOptimizer, RMSProp
from ..optimizers._base import relaxation_rate
from ..optimizers._optimizers import describe
from ._base import AbstractFlow, FlowState, Work, grad
from ._stable import checked_step0, start_moments, step_at

#: LOBPCG iterations of the first eigen-solve, from vectors that look random.
_START_ITERS = 30
#: The optimisers a central flow models.
_SUPPORTED = (GD, RMSProp)
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
    r"""The central flow of gradient descent, or of RMSProp: the time average of
    the optimiser's iterates at its edge of stability (Cohen, Damian, Talwalkar,
    Kolter & Lee, ICLR 2025). For gradient descent with learning rate lr,

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

    RMSProp (`gflow.optimizers.RMSProp`, per coordinate or scalar, any ε
    placement, bias correction, a schedule) is preconditioned gradient descent,
    θ ← θ − lr P⁻¹∇L with P = √ν̂ + ε. Its central flow integrates θ and the
    second moment ν (saved as `traj.state["nu"]`); U are the top eigenvectors of
    H u = λ P u, the edge is lr·λ = 2, and the oscillation enters ν as well: its
    rate takes in diag(H Σ H) besides g² (‖HΣ^{1/2}‖² for a scalar ν), since ν
    averages the squared gradient over the oscillation, and the edge is kept
    through both ways Σ acts, on H (through θ) and on P (through ν). Its ν is
    the moment a step uses (after it took in that step's g²), so that P = P(ν)
    as in the authors' flows; it starts from the optimiser's initial ν after
    taking in the first g². Below the edge it is RMSProp's stable flow in that
    form (`gflow.flows.StableFlow(opt)` takes in the current g² instead: the
    two differ by O(1 − b2)).

    How it is computed, in one compiled program:
    - the top `track` eigenpairs of the (preconditioned) Hessian by `eig_iters`
      LOBPCG iterations on Hessian-vector products after every step attempt,
      warm-started from the eigenvectors the flow carries, and by a
      Rayleigh-Ritz projection at every evaluation on those near the edge and
      the next one (whose crossing of the edge within a step must be seen);
    - the third-order products ∇_θ(u_iᵀ H u_j) (forward over reverse over
      reverse) for the pairs of tracked eigenvectors whose eigenvalues are near
      the edge (lr·λ ≥ 1.8 when the step starts): none before the edge; a step
      in which another eigenvalue reaches the edge is rejected and shortened;
    - the complementarity problem as a semidefinite quadratic program (min ⟨A, X⟩
      + ½ B[X, X] over X ⪰ 0) solved on the device (closed form for one
      eigenvalue at the edge); its constraint is kept with a relaxation at rate
      one per step (an eigenvalue above the edge returns to it within about one
      step, as in the authors' discretisation), so that integration errors do
      not accumulate;
    - error-controlled adaptive steps (Tsit5 under `"auto"`: the field is not a
      gradient, the stabilized solvers are refused).

    Saved rows get the metrics `"sharpness"` (λ_max of H, or of P⁻¹H for
    RMSProp: the edge at 2/lr), `"effective_eigenvalues"` (lr·λ_i of the
    tracked eigenvalues, the edge at 2), `"predicted_loss"` (the optimiser's
    time-averaged loss, L + ½⟨Σ, H⟩), `"oscillation"` (tr Σ), `"edge_count"`
    (the rank of Σ: the eigenvalues at the edge) and, for every `observables`
    entry, its predicted time average f(θ) + ½⟨Σ, ∇²f⟩. `stats` counts
    gradients, Hessian-vector products and third-order products exactly
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

    It stops being accurate where its assumptions fail: the oscillation must
    be small enough for a cubic model of the loss around its centre, and the
    tracked set must hold every eigenvalue at the edge. A run in which every
    tracked eigenvalue rises above 3/4 of the edge with no room to track more
    is refused as soon as that happens: the flow stands still from there (so
    that the run ends in a few steps) and the call raises a ValueError naming
    the time and a larger `track`.

    Args:
        optimizer: the learning rate of the gradient descent it models (> 0), or
            an optimiser of `gflow.optimizers`: `GD(lr)` or `RMSProp(...)`, with
            a number or a schedule for lr (time axis t = k·base_lr). New
            hyperparameter values reuse the compiled program.
        track: how many top eigenpairs are tracked (1 to 32), or None (the
            default) to adapt it inside the run, 4 to 16. An evaluation costs
            a gradient, m + 1 Hessian-vector products and m(m + 1)/2
            third-order products for the m tracked eigenvalues near the edge; a
            step attempt `eig_iters + 1` more Hessian-vector products per
            tracked pair.
        eig_iters: LOBPCG iterations after every step attempt (default 3).
        observables: `{name: f(params, data)}`: scalar functions whose time
            average over the oscillation is predicted at every saved row.
        moments0: RMSProp's second moment to start from, `{"nu": ...}` (default:
            its initial state), e.g. a discrete run's `traj.state` at a row.
        step0: the steps taken before the start (bias corrections and
            schedules go on from there).

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 100.0, lr=0.1, key=0)
        >>> central = gflow.simulate(model, data, 100.0, key=0, ts=gd.ts,
        ...                          flow=gflow.flows.CentralFlow(0.1))
        >>> central.metrics["sharpness"] * 0.1        # ≤ 2: at or below the edge
        >>> gflow.compare(central, gd.midpoints())    # GD's oscillation averaged out

        RMSProp, with its second moment:

        >>> opt = gflow.optimizers.RMSProp(2e-3, b2=0.99, eps_in_sqrt=False)
        >>> run = gflow.gradient_descent(model, data, 2.0, optimizer=opt, key=0)
        >>> central = gflow.simulate(model, data, 2.0, key=0, ts=run.ts,
        ...                          flow=gflow.flows.CentralFlow(opt))
        >>> central.state["nu"]
    """

    optimizer: AbstractOptimizer
    moments0: dict | None
    step0: np.ndarray
    track: int = eqx.field(static=True)  # the most it tracks
    adapts: bool = eqx.field(static=True)  # whether the tracked set grows
    eig_iters: int = eqx.field(static=True)
    observables: tuple[tuple[str, Callable], ...] = ()
    gradient_field: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: float | AbstractOptimizer,
        *,
        track: int | None = None,
        eig_iters: int = 3,
        observables: Mapping[str, Callable] | None = None,
        moments0: dict | None = None,
        step0: int = 0,
    ):
        if not isinstance(optimizer, AbstractOptimizer):
            optimizer = GD(optimizer)
        elif type(optimizer) not in _SUPPORTED:
            names = " and ".join(kind.__name__ for kind in _SUPPORTED)
            raise TypeError(
                f"CentralFlow models {names} (gflow.optimizers); got "
                f"{describe(optimizer)}. Its gflow.flows.RodFlow (and StableFlow) "
                "model it at its edge of stability."
            )
        self.optimizer = optimizer
        self.moments0, self.step0 = moments0, checked_step0(step0)
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
        return Work(1, self._ritz_count(carried), _pairs_at_edge(m))

    def _ritz_count(self, carried):
        """How many tracked pairs an evaluation of the field re-solves (Rayleigh-
        Ritz): those near the edge and the next one, whose crossing of the edge
        within a step the field must see; the rest only matter after the step,
        where `update` refreshes them all."""
        return jnp.minimum(self._at_edge(carried.values) + 1, carried.count)

    def _at_edge(self, values):
        """How many tracked eigenvalues (descending) are near enough to the edge
        for a step to reach it: lr·λ ≥ `_NEAR_EDGE`."""
        return jnp.sum(values >= _NEAR_EDGE).astype(jnp.int32)

    def _tracked(self, carried):
        """How many eigenpairs it tracks: the carried count if it adapts
        (traced), else `track` (static, so that its solves are batched whole)."""
        return carried.count if self.adapts else self.track

    def _crowded(self, carried):
        """Whether the lowest tracked eigenvalue reached `_TRACKED_FLOOR` of the
        edge: more may be near the edge than are tracked."""
        return carried.values[carried.count - 1] >= 2 * _TRACKED_FLOOR

    def init(self, loss_fn, params, data):
        """The parameters and RMSProp's second moment, the one its first step
        uses (the initial one after taking in g²); carried, the top
        eigenvectors there (rows of a (k, n) array, k the most it tracks and n
        the number of trained parameters; the rows past those it tracks hold
        the directions it starts the next ones from) with their effective
        eigenvalues: what a step starts its eigen-solves from."""
        flat = ravel_pytree(params)[0]
        opt, work = self.optimizer, Work()
        moments = start_moments(opt, self.moments0, params)
        s = like_dtype(self.step0, flat)  # the step at t = 0
        if moments:
            taken = opt.step(s, params, moments, grad(loss_fn, params, data))[1]
            moments = jax.tree.map(jnp.add, moments, taken)
            work = Work(grads=1)
        most = min(self.track, flat.size) if self.adapts else self.track
        start = tree_scrambled(jnp.zeros((most, flat.size), flat.dtype))
        count = min(_TRACK_STEP, most) if self.adapts else most
        carried = Eigenpairs(
            start, jnp.zeros(most, flat.dtype), jnp.int32(count), jnp.bool_(False)
        )
        q = _scale_at(opt, s, moments, flat)
        carried = _eigen(
            loss_fn, params, data, carried, q, _START_ITERS, self._tracked(carried)
        )
        work = work + Work(hvps=count * (_START_ITERS + 1))
        return FlowState(params, moments), carried, work

    def update(self, loss_fn, t, state, carried, data):
        """The tracked eigenpairs at the end of a step attempt, refined by
        `eig_iters` LOBPCG iterations from the last ones; an adapting flow first
        tracks `_TRACK_STEP` more if the lowest tracked one neared the edge."""
        if self.adapts:
            count, most = carried.count, carried.values.shape[0]
            more = jnp.minimum(count + _TRACK_STEP, most)
            grown = jnp.where(self._crowded(carried), more, count)
            carried = eqx.tree_at(lambda c: c.count, carried, grown)
        flat = ravel_pytree(state.params)[0]
        s = step_at(self.optimizer, self.step0, t, flat)[1]
        q = _scale_at(self.optimizer, s, state.extra, flat)
        carried = _eigen(
            loss_fn,
            state.params,
            data,
            carried,
            q,
            self.eig_iters,
            self._tracked(carried),
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
            count = self._ritz_count(carried)
            solved = _solve(self, loss_fn, t, state, carried, data, gradient, count)
            # An eigenvalue that reaches the edge within a step begun with it
            # below `_NEAR_EDGE` (no third-order products for it): the step is
            # too long. inf/NaN makes the engine reject it and shrink it, until
            # it ends below the edge; the next step then includes it.
            values = solved.values
            outside = jnp.arange(values.shape[0]) >= self._at_edge(carried.values)
            escaped = jnp.any(outside & (values > 2))
            return jax.tree.map(
                lambda v: jnp.where(carried.refused, 0, jnp.where(escaped, jnp.nan, v)),
                solved.velocity,
            )

        return field

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        every = jnp.asarray(carried.count, jnp.int32)  # every tracked pair
        solved = _solve(self, loss_fn, t, state, carried, data, grad, every)
        values, u = solved.values, solved.vectors
        sigma = smat(solved.x)  # X: Σ = Uᵀ X U, U the rows of `u`
        spread = jnp.linalg.eigvalsh(sigma)
        support = spread > 1e-6 * spread[-1]
        tracked = jnp.arange(values.shape[0]) < carried.count
        metrics = {
            "sharpness": values[0] / solved.lr,
            # NaN past the tracked pairs (an adapting flow tracks more later).
            "effective_eigenvalues": jnp.where(tracked, values, jnp.nan),
            "tracked": jnp.asarray(carried.count, jnp.int32),
            "predicted_loss": loss + jnp.sum(jnp.diag(sigma) * values) / 2,
            "oscillation": jnp.sum(sigma * (u @ u.T)),
            "edge_count": jnp.sum(support & (spread[-1] > 0)).astype(jnp.int32),
        }
        count = self._tracked(carried)
        for name, fn in self.observables:
            metrics[name] = _predicted(fn, state.params, data, u, sigma, count)
        hvps = carried.count * (1 + len(self.observables))
        work = Work(hvps=hvps, thirds=_pairs_at_edge(self._at_edge(carried.values)))
        return solved.velocity.params, metrics, work

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
            first = "lr" if type(self.optimizer) is GD else "opt"
            advice = (
                f"Track more: CentralFlow({first}, track={more})."
                if self.track < _MOST_TRACKED
                else f"{_MOST_TRACKED} is the most CentralFlow tracks: it cannot "
                "model this run (more eigenvalues may be at the edge than it can "
                "track, as on a network of many outputs)."
            )
            name = first if self.adapts else f"{first}, track={self.track}"
            raise ValueError(
                f"CentralFlow({name}): all {most} tracked eigenvalues reached "
                f"lr·λ ≥ {2 * _TRACKED_FLOOR:g} (at t = {ts[crowded[0]]:.4g}); more "
                f"eigenvalues than are tracked may be at the edge. {advice}"
            )


def _flat_gradient(loss_fn, unravel, data):
    """The loss gradient as a function of the flat parameter vector."""
    return lambda z: ravel_pytree(grad(loss_fn, unravel(z), data))[0]


class Eigenpairs(eqx.Module):
    """What a central flow carries: the tracked eigenvectors of Q^(−1/2) H
    Q^(−1/2) (the first `count` rows; Q = P/lr, the step's preconditioner) and
    their eigenvalues (descending; 0 past `count`), the effective eigenvalues
    lr·λ with the edge at 2, at the end of the last step, a warm start; the rows
    past `count` are the directions the next tracked pairs start from.
    `refused`: every tracked eigenvalue neared the edge with no room to track
    more (the run stands still from then on)."""

    vectors: jax.Array
    values: jax.Array
    count: jax.Array
    refused: jax.Array


def _scale_at(opt, s, moments, like):
    """Q = P/lr(s) at step s: a step moves θ by −Q⁻¹∇L (Q = 1/lr for gradient
    descent; RMSProp's P from the second moment the step uses), flat like
    `like`, or of one entry (one for all)."""
    p = opt.scale(s, moments["nu"]) if moments else 1.0
    return ravel_pytree(p)[0].astype(like.dtype) / like_dtype(opt.rate(s), like)


class _Solved(eqx.Module):
    """The field at a state (per unit flow time), the tracked effective
    eigenvalues and eigenvectors U there (rows; Uᵀ Q U = I), svec(X), and lr."""

    velocity: FlowState
    values: jax.Array
    vectors: jax.Array
    x: jax.Array
    lr: jax.Array


# Jitted, so that the solver's stages and the saved rows share one trace of it.
@eqx.filter_jit
def _solve(
    flow: CentralFlow, loss_fn, t, state, carried: Eigenpairs, data, gradient, count
):
    """d(θ, ν)/dt at `state`, with the first `count` tracked eigenpairs there
    (Rayleigh-Ritz in the span of the carried vectors; the values past them 0)
    and X. Per step s, with Q the step's preconditioner and Σ = Uᵀ X U (U the
    rows of `vectors`):

        dθ/ds = −Q⁻¹(g + ½ ∇⟨Σ, H⟩),  dν/ds = rate(g² + diag(HΣH) − ν),

    and the constraint on A = 2 UᵀQU − UᵀHU ⪰ 0 (the edge), complementary to X:
    d/ds svec(A) = 2 D dQ/ds − G dθ/ds, G the third-order rows, D the pair
    products u_i ∘ u_j; HΣH = 4 QΣQ on the edge's block (HU = 2QU there), so
    that both are affine in x = svec(X) with a symmetric positive semidefinite
    part, and X solves a semidefinite quadratic program."""
    opt, moments = flow.optimizer, state.extra
    flat, unravel = ravel_pytree(state.params)
    g = ravel_pytree(gradient)[0]
    base, s = step_at(opt, flow.step0, t, flat)
    rates = opt.stable_field(s, state.params, moments, gradient)[1]
    # Q, and its derivative along the stable flow (ν's and lr(s)'s motion).
    q, along = jax.jvp(
        lambda s, moments: _scale_at(opt, s, moments, flat),
        (s, moments),
        (jnp.ones_like(s), rates),
    )
    here = _eigen(loss_fn, state.params, data, carried, q, 0, count)
    values, u = here.values, here.vectors / jnp.sqrt(q)
    m = flow._at_edge(carried.values)  # fixed over a step: its cost is known
    products = _edge_products(loss_fn, unravel, flat, data, u, m)
    a = products @ (g / q) + svec(jnp.diag(2 - values))
    if moments or callable(opt.lr):  # P moves with ν or with lr(s)
        a = a + 2 * svec(_sandwich(u, _finite(along)))
    more = None
    if moments:
        ones = jax.tree.map(jnp.ones_like, moments)
        per_nu = jax.jvp(lambda m: _scale_at(opt, s, m, flat), (moments,), (ones,))[1]
        rate = relaxation_rate(like_dtype(opt.b2, flat))  # ν's, per unit of g²
        heard = 4 * jnp.sqrt(rate * _finite(per_nu)) * q  # ≥ 0: P grows with ν

        def more(size):  # the curvature ν adds, for the pairs of the first `size`
            return _pair_products(u[:size], q.size == 1) * heard

    x = _complementarity(products / jnp.sqrt(q), a, m, more)
    velocity = unravel(-(g + products.T @ x / 2) / q)
    if moments:  # ν takes in diag(HΣH) = 4 diag(QΣQ) on the edge's block
        nu, unravel_nu = ravel_pytree(rates["nu"])
        spread = jnp.sum((smat(x) @ u) * u, axis=0)  # diag(Uᵀ X U)
        if q.size == 1:
            spread = jnp.sum(spread, keepdims=True)  # tr(Uᵀ X U)
        oscillation = rate * 4 * q**2 * spread
        rates = {"nu": unravel_nu(nu + oscillation * jnp.ones_like(nu))}
    field = jax.tree.map(lambda v: v / base, FlowState(velocity, rates))
    return _Solved(field, values, u, x, like_dtype(opt.rate(s), flat))


def _finite(dq):
    """A derivative of Q, 0 where it is not finite: at ν = 0 exactly (a gradient
    that is 0 in that coordinate all along, as for an input pixel that is 0 in
    every image) √ν has an infinite derivative, but its P does not move (its g²
    stays 0) and no eigenvector touches it (its Hessian row is 0 too)."""
    return jnp.where(jnp.isfinite(dq), dq, 0)


def _pairs_at_edge(m):
    return m * (m + 1) // 2


def _sandwich(u, d):
    """U diag(d) Uᵀ (U the rows of `u`; d of one entry: d U Uᵀ), so that
    svec of it holds w_ij Σ_c u_ic u_jc d_c: how the pairs' entries of UᵀQU
    move when Q moves by d."""
    return (u * d) @ u.T


def _pair_products(u, summed):
    """w_ij u_i ∘ u_j for every pair of rows of `u` in `svec` order (w: 1 on the
    diagonal, √2 off it), a (pairs, n) array; (pairs, 1) of w_ij u_i·u_j if
    `summed` (a preconditioner of one entry)."""
    i, j = upper_pairs(u.shape[0])
    pairs = jnp.asarray(svec_weights(i, j), u.dtype)[:, None] * u[i] * u[j]
    return jnp.sum(pairs, axis=1, keepdims=True) if summed else pairs


def _edge_products(loss_fn, unravel, flat, data, u, m):
    """The third-order products w_ij ∇_θ(u_iᵀ H(θ) u_j) (w: 1 on the diagonal,
    √2 off it, as `svec` weighs) for the pairs among the first `m` vectors, rows
    in `svec` order; zero rows for the other pairs (not computed)."""
    k, n = u.shape
    i, j = upper_pairs(k)
    weight = jnp.asarray(svec_weights(i, j), flat.dtype)
    flat_grad = _flat_gradient(loss_fn, unravel, data)

    def product(p, rows):
        a, b = u[jnp.asarray(i)[p]], u[jnp.asarray(j)[p]]
        third = jax.grad(lambda z: a @ jax.jvp(flat_grad, (z,), (b,))[1])(flat)
        return rows.at[p].set(weight[p] * third)

    empty = jnp.zeros((len(i), n), flat.dtype)
    return jax.lax.fori_loop(0, _pairs_at_edge(m), product, empty)


def _complementarity(rows, a, m, more=None):
    """svec(X) of min a·x + ½ xᵀ(R Rᵀ/2)x over X ⪰ 0 (R: `rows`, one per pair
    in `svec` order, with the columns `more(size)` gives for the pairs of the
    first `size` vectors, if given), restricted to the first `m` tracked
    vectors (X zero outside their block): none, one (closed form) or more
    (`psd_qp`), each in the smallest of the blocks 8, 16, ... that holds m, so
    that its cost follows m, not how many are tracked."""
    pairs = a.shape[0]
    k = int(round((np.sqrt(8 * pairs + 1) - 1) / 2))

    def of_block(size):
        r = rows[: _pairs_at_edge(size)]
        return r if more is None else jnp.concatenate([r, more(size)], axis=1)

    def one():
        row = of_block(1)[0]
        curvature = row @ row / 2
        safe = jnp.where(curvature > 0, curvature, 1)
        x = jnp.where(m == 1, jnp.maximum(0, -a[0] / safe), 0)
        return jnp.zeros(pairs, a.dtype).at[0].set(x)

    def block(size):
        within = _pairs_at_edge(size)
        i, j = upper_pairs(size)
        r = of_block(size)
        inside = jnp.arange(within) < _pairs_at_edge(m)
        # Outside the edge's block: unit curvature and a positive cost on the
        # diagonal, so X is zero there.
        held = jnp.where(
            inside[:, None] & inside[None, :], r @ r.T / 2, jnp.eye(within)
        )
        cost = jnp.where(inside, a[:within], jnp.asarray(i == j, a.dtype))
        x = psd_qp(held.astype(a.dtype), cost)
        return jnp.zeros(pairs, a.dtype).at[:within].set(x)

    if k == 1:
        return one()
    sizes = block_sizes(k)
    branches = [one] + [lambda size=size: block(size) for size in sizes]
    tier = jnp.where(m <= 1, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), m))
    return jax.lax.switch(tier, branches)


def _eigen(loss_fn, params, data, carried: Eigenpairs, q, iters, count) -> Eigenpairs:
    """The top `count` eigenpairs of Q^(−1/2) H Q^(−1/2) at `params` (effective
    eigenvalues: the edge at 2), by `iters` LOBPCG iterations from `carried`'s
    first `count` rows (the rest kept)."""
    flat, unravel = ravel_pytree(params)
    flat_grad = _flat_gradient(loss_fn, unravel, data)
    inverse_root = 1 / jnp.sqrt(q)

    def apply(v):
        return inverse_root * jax.jvp(flat_grad, (flat,), (inverse_root * v,))[1]

    def hvps(rows):
        return rows_applied(apply, rows, count)

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
