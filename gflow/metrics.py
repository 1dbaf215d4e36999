"""Diagnostics of parameters along a trajectory: ranks, condensation, drift,
sharpness.

Pure JAX functions of arrays, usable inside `simulate(..., metrics=...)` (wrap them
as `lambda params, data: effective_rank(params["W_Q"])`) or on a saved trajectory
(`jax.vmap(effective_rank)(traj.params["W_Q"])`). `Sharpness(loss)` is a metric
that carries its eigenvector from one saved row to the next
(`AbstractCarriedMetric`): `metrics={"sharpness": Sharpness(loss)}`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._checks import check_int
from ._linalg import hvp, top_eigenpairs
from ._tree import tree_dot, tree_norm, tree_random_normal


def effective_rank(matrix: jax.Array) -> jax.Array:
    """The entropy effective rank of Roy & Vetterli (2007).

    `exp(−Σ p_i log p_i)` with `p_i = σ_i / Σ_j σ_j` the normalised singular values:
    1 for a rank-one matrix, n for a multiple of an n × n orthogonal matrix, and
    continuous in between. Scale-invariant, so it measures the rank of
    `W / ‖W‖_F`.

    Examples:
        >>> gflow.metrics.effective_rank(jnp.eye(4))
        Array(4., dtype=float32)
    """
    s = jnp.linalg.svd(matrix, compute_uv=False)
    p = s / jnp.sum(s)
    # 0 log 0 = 0: singular values that are exactly zero contribute nothing.
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)))


def stable_rank(matrix: jax.Array) -> jax.Array:
    """‖W‖_F² / ‖W‖_2²: between 1 (rank one) and the rank."""
    s = jnp.linalg.svd(matrix, compute_uv=False)
    return jnp.sum(s**2) / s[0] ** 2


def row_cosine_similarity(matrix: jax.Array) -> jax.Array:
    """The matrix of cosine similarities between the rows of `matrix`."""
    unit = matrix / jnp.linalg.norm(matrix, axis=-1, keepdims=True)
    return unit @ unit.T


def row_condensation(matrix: jax.Array) -> jax.Array:
    """Mean |cosine similarity| between distinct rows: near 1 when the rows have
    condensed onto ± one direction (Chen & Luo), near 0 for orthogonal rows.

    Examples:
        >>> gflow.metrics.row_condensation(jnp.array([[1.0, 0.0], [-2.0, 0.0]]))
        Array(1., dtype=float32)
    """
    n = matrix.shape[0]
    cos = jnp.abs(row_cosine_similarity(matrix))
    return (jnp.sum(cos) - jnp.trace(cos)) / (n * (n - 1))


def relative_drift(x, x0) -> jax.Array:
    """‖x − x0‖ / ‖x0‖ over all leaves of two pytrees (or two arrays)."""
    diff = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), x, x0)
    base = jax.tree.map(lambda b: jnp.sum(b**2), x0)
    return jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(base)))


def cosine(u, v) -> jax.Array:
    """Cosine between two pytrees (or arrays) taken as flat vectors."""
    return tree_dot(u, v) / (tree_norm(u) * tree_norm(v))


def norms_by_key(tree: dict) -> dict[str, jax.Array]:
    """The Euclidean norm of each top-level entry of a parameter dict.

    Examples:
        >>> gflow.metrics.norms_by_key({"W": jnp.ones((2, 2)), "b": jnp.zeros(3)})
        {'W': Array(2., dtype=float32), 'b': Array(0., dtype=float32)}
    """
    return {
        key: jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(value)))
        for key, value in tree.items()
    }


def grad_norms_by_key(loss: Callable) -> Callable:
    """A metric `fn(params, data)`: the gradient norm of each top-level entry."""

    def metric(params, data):
        return norms_by_key(jax.grad(loss)(params, data))

    return metric


def group_means(values: jax.Array, groups: jax.Array, n_groups: int) -> jax.Array:
    """Mean of `values` within each group `0..n_groups−1` (NaN for an empty group)."""
    onehot = jax.nn.one_hot(groups, n_groups, dtype=values.dtype)
    return (onehot.T @ values) / jnp.sum(onehot, axis=0)


def gradient_balance(weights: jax.Array, groups: jax.Array, a: int, b: int):
    """Yang et al.'s Lemma 4.4 ratio `|Σ_a g − Σ_b g| / min(Σ_a g, Σ_b g)`.

    `weights` are per-sample gradient weights g_i (e.g.
    `CooccurrenceTransformer.gradient_weights`), `groups` their groups; for their
    one-target groups I2 and I3 use a = 1, b = 2. Small values mean the two groups'
    losses fall at the same rate.
    """
    sum_a = jnp.sum(jnp.where(groups == a, weights, 0))
    sum_b = jnp.sum(jnp.where(groups == b, weights, 0))
    return jnp.abs(sum_a - sum_b) / jnp.minimum(sum_a, sum_b)


def sharpness(
    loss: Callable,
    params: Any,
    data: Any,
    *,
    v0: Any = None,
    iters: int = 50,
    key: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """The top (algebraically largest) Hessian eigenvalue λ_max, by LOBPCG on one
    vector (`iters` iterations, `iters + 1` Hessian-vector products).

    Uses Hessian-vector products only (forward-over-reverse), never the Hessian.
    LOBPCG maximises the Rayleigh quotient, so it finds λ_max itself, also where
    the Hessian is indefinite and its largest magnitude is negative, and it
    converges far faster than power iteration where the top two eigenvalues are
    close: on a 10-class MLP whose λ_max rises fast (`benchmarks/sharpness.py`),
    10 warm-started iterations a row are within 1e-5, where power iteration's
    were 0.4% off. Pass the previous eigenvector as `v0` to warm-start along a
    trajectory.

    Gradient descent with learning rate η stays close to the flow only while
    λ_max < 2/η (see `gd_is_stable`).

    Args:
        loss: `loss(params, data)`.
        params: where to evaluate the Hessian.
        data: the data of the loss.
        v0: starting vector (a pytree like params); default random from `key`.
        iters: LOBPCG iterations (each one HVP, plus one for the start).
        key: PRNG key for the default `v0` (default key 0).

    Returns:
        `(λ_max, eigenvector)`: the eigenvalue (a scalar) and its unit eigenvector
        (a pytree like `params`).
    """
    # Any pytree (an equinox Module included): the Hessian of its floating-point
    # leaves, the others held fixed.
    params, fixed = eqx.partition(params, eqx.is_inexact_array)
    if v0 is None:
        v0 = tree_random_normal(jax.random.key(0) if key is None else key, params)
    v0 = eqx.filter(v0, eqx.is_inexact_array)

    def apply(v):
        return hvp(lambda p, d: loss(eqx.combine(p, fixed), d), params, data, v)

    # One-vector LOBPCG: the algebraically largest eigenvalue directly (no
    # shifted second pass for an indefinite Hessian), and from a warm start far
    # fewer products than power iteration where the top two are close.
    flat0, unravel = ravel_pytree(v0)

    def apply_rows(rows):
        def one(v):
            return ravel_pytree(apply(unravel(v)))[0]

        return jax.vmap(one)(rows)

    values, vectors = top_eigenpairs(apply_rows, flat0[None], iters)
    return values[0], unravel(vectors[0])


class AbstractCarriedMetric(eqx.Module):
    """A metric that carries something from one saved row to the next, inside the
    compiled program: a warm start, as an eigenvector is for the next row's
    eigen-solve. Usable wherever a metric function is (`metrics=` of
    `simulate`, `simulate_ensemble` and `gradient_descent`); each member of an
    ensemble carries its own.

    Subclasses implement `init(params, data)`, what the first row starts from,
    and `__call__(params, data, carried) -> (value, carried)`. Rows are
    evaluated in time order, each from what the row before it left.
    """

    @abc.abstractmethod
    def init(self, params: Any, data: Any) -> Any:
        """What the first saved row starts from."""

    @abc.abstractmethod
    def __call__(self, params: Any, data: Any, carried: Any) -> tuple[Any, Any]:
        """The metric's value at `params`, and what the next row starts from."""


#: Iterations of a carried sharpness's first row, from a random vector.
_FIRST_ITERS = 50


class Sharpness(AbstractCarriedMetric):
    """λ_max of the loss Hessian at every saved row, as a `metrics=` entry: LOBPCG
    (`sharpness`) warm-started from the previous row's eigenvector,
    so that `iters` Hessian-vector products per row suffice where rows are
    close (the first row takes 50 from a random vector, as `sharpness` does).

    Args:
        loss: `loss(params, data)`, the loss whose Hessian it is.
        iters: LOBPCG iterations per row after the first (default 10).

    Examples:
        >>> traj = gflow.simulate(model, data, 100.0, n_save=60,
        ...                       metrics={"sharpness": gflow.metrics.Sharpness(loss)})
        >>> traj.metrics["sharpness"] * lr     # gradient descent's edge is at 2
    """

    loss: Callable
    iters: int = eqx.field(static=True)

    def __init__(self, loss: Callable, iters: int = 10):
        if not callable(loss):
            raise TypeError(
                f"`loss` must be a function loss(params, data); got {loss!r}."
            )
        self.loss, self.iters = loss, check_int("iters", iters, 1)

    def init(self, params, data):
        return sharpness(self.loss, params, data, iters=_FIRST_ITERS)[1]

    def __call__(self, params, data, carried):
        return sharpness(self.loss, params, data, v0=carried, iters=self.iters)


def preconditioned_sharpness(
    loss: Callable,
    params: Any,
    data: Any,
    optimizer: Any,
    moments: dict[str, Any] | None = None,
    *,
    step: Any = 0,
    v0: Any = None,
    iters: int = 50,
) -> tuple[jax.Array, Any]:
    """The sharpness an optimiser's edge of stability bounds: λ_max(P⁻¹H), H the
    Hessian and P the diagonal preconditioner of the optimiser's next step from
    there (`preconditioner`: 1 for gradient descent and momentum, √v̂ + ε for
    Adam, v̂ having taken in the gradient there), by LOBPCG (`sharpness`) on
    P^(−1/2) H P^(−1/2) (Hessian-vector products only).

    The optimiser's steps are stable while it is below `optimizer.edge(step)`
    (2/lr for GD and RMSProp, 2(1 + β1)/((1 − β1) lr) for Adam); training drives
    it up to the edge and holds it there. `2 * value / optimizer.edge(step)` is
    its effective sharpness, at 2 on the edge for every optimiser.

    Args:
        loss: `loss(params, data)`.
        params: where to evaluate the Hessian.
        data: the data of the loss.
        optimizer: a `gflow.optimizers` optimiser.
        moments: the optimiser's moments there (e.g. a flow's `traj.state` at
            a row; `optimizer.moments(params)` when None).
        step: how many steps the moments have taken (for bias corrections):
            the preconditioner is that of step `step + 1`.
        v0: starting vector (a pytree like params), e.g. the last eigenvector.
        iters: LOBPCG iterations.

    Returns:
        `(λ_max, vector)`: λ_max(P⁻¹H) and the unit eigenvector of
        P^(−1/2) H P^(−1/2) (a pytree like the trained parameters).

    Examples:
        >>> adam = gflow.optimizers.Adam(1e-3)
        >>> rod = gflow.simulate(model, data, 2.0, flow=gflow.flows.RodFlow(adam))
        >>> last = lambda tree: jax.tree.map(lambda x: x[-1], tree)
        >>> value, _ = gflow.metrics.preconditioned_sharpness(
        ...     loss, last(rod.params), data, adam, last(rod.state),
        ...     step=rod.ts[-1] / adam.base_lr)
        >>> value / adam.edge()    # ~ 1 at Adam's edge of stability
    """
    if moments is None:
        moments = optimizer.moments(params)
    trained, fixed = eqx.partition(params, eqx.is_inexact_array)
    gradient = jax.grad(lambda p: loss(eqx.combine(p, fixed), data))(trained)
    scale = jax.tree.map(
        lambda p, x: jnp.broadcast_to(1 / jnp.sqrt(p), jnp.shape(x)),
        _like(optimizer.preconditioner(step, moments, gradient), trained),
        trained,
    )

    def scaled(u, d):  # the loss in the coordinates u = P^(1/2)(θ − params)
        moved = jax.tree.map(lambda p, s, x: p + s * x, trained, scale, u)
        return loss(eqx.combine(moved, fixed), d)

    zeros = jax.tree.map(jnp.zeros_like, trained)
    return sharpness(scaled, zeros, data, v0=v0, iters=iters)


def _like(preconditioner: Any, params: Any) -> Any:
    """A preconditioner as a tree like `params` (a scalar P broadcast)."""
    if jax.tree.structure(preconditioner) == jax.tree.structure(params):
        return preconditioner
    return jax.tree.map(lambda _: preconditioner, params)


def preconditioned_sharpness_along(
    traj, loss: Callable, data: Any, optimizer: Any, *, iters: int = 20, step0=0
):
    """λ_max(P⁻¹H) at every save that holds parameters (`traj.param_rows`),
    with the optimiser's moments saved there (`traj.state`: a discrete run's, a
    stable or rod flow's), each eigen-solve warm-started from the previous
    save's vector. Divide by `optimizer.edge(step)` for its distance to the
    edge. One compiled program for all rows, cached.

    Args:
        traj: a trajectory of `optimizer` (its moments in `traj.state`).
        loss: `loss(params, data)`.
        data: the data of the loss.
        optimizer: the `gflow.optimizers` optimiser.
        iters: LOBPCG iterations per row (the first row: three times as many).
        step0: the steps taken before the trajectory's t = 0 (a restarted flow's
            `step0`); the step at time t is `step0 + t / optimizer.base_lr`.

    Returns:
        An array of shape `(len(traj.param_rows),)`.

    Examples:
        >>> adam = gflow.optimizers.Adam(1e-3)
        >>> run = gflow.gradient_descent(model, data, 2.0, optimizer=adam)
        >>> values = gflow.metrics.preconditioned_sharpness_along(run, loss, data, adam)
        >>> values / adam.edge()    # hovers at 1 past Adam's edge of stability
    """
    names = set(optimizer.optax_fields)  # the moments, by name
    if not names <= set(traj.state):
        raise ValueError(
            f"the trajectory's state {sorted(traj.state)} holds no moments of "
            f"{type(optimizer).__name__}: run it with this optimiser (a discrete "
            "run with optimizer=, or its StableFlow or RodFlow)."
        )
    moments = {k: traj.state[k] for k in names}
    rows = np.asarray(traj.ts)[np.asarray(traj.param_rows)]
    steps = step0 + rows / float(optimizer.base_lr)
    return _preconditioned_along(
        loss, traj.params, moments, steps, data, optimizer, iters
    )


@eqx.filter_jit
def _preconditioned_along(loss, params, moments, steps, data, optimizer, iters):
    first = jax.tree.map(lambda x: x[0], (params, moments))
    _, v0 = preconditioned_sharpness(
        loss, first[0], data, optimizer, first[1], step=steps[0], iters=3 * iters
    )

    def row(v, at):
        p, m, k = at
        value, v = preconditioned_sharpness(
            loss, p, data, optimizer, m, step=k, v0=v, iters=iters
        )
        return v, value

    return jax.lax.scan(row, v0, (params, moments, steps))[1]


def gd_is_stable(top_eigenvalue, lr) -> jax.Array:
    """Whether GD with learning rate `lr` is locally stable there: λ_max < 2 / lr."""
    return top_eigenvalue < 2.0 / lr


def sharpness_along(traj, loss, data, *, iters: int = 10):
    """λ_max at every save that holds parameters (`traj.param_rows`), as the
    `Sharpness` metric computes it during a run: each eigen-solve (`sharpness`,
    `iters` iterations) warm-started from the previous save's eigenvector, the
    first from a random vector (50 iterations). Shape
    `(len(traj.param_rows),)`. One compiled program for all rows, cached: a
    second trajectory of the same shapes reuses it."""
    return _sharpness_along(Sharpness(loss, iters), traj.params, data)


@eqx.filter_jit
def _sharpness_along(metric: Sharpness, params: Any, data: Any):
    # Rows of the trained leaves; the others (an Equinox model's activation,
    # say) are the same at every row and have no row axis.
    trained, fixed = eqx.partition(params, eqx.is_inexact_array)

    def row(v, trained):
        value, v = metric(eqx.combine(trained, fixed), data, v)
        return v, value

    first = eqx.combine(jax.tree.map(lambda x: x[0], trained), fixed)
    return jax.lax.scan(row, metric.init(first, data), trained)[1]


def moving_average(values: Any, width: float) -> np.ndarray:
    """A Gaussian moving average along the first axis (standard deviation
    `width` samples), the ends padded with the end values: e.g. gradient
    descent's loss at the edge of stability, averaged over its oscillation, to
    compare with a central flow's predicted loss.

    Examples:
        >>> gflow.metrics.moving_average(gd.loss, 50)
    """
    values = np.asarray(values, float)
    reach = int(np.ceil(4 * width))
    offsets = np.arange(-reach, reach + 1)
    kernel = np.exp(-0.5 * (offsets / width) ** 2)
    padded = np.pad(values, reach, mode="edge")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def drift(values) -> jax.Array:
    """max_t |q(t) − q(0)| of a conserved quantity saved along a trajectory
    (leading time axis; any trailing shape)."""
    values = jnp.asarray(values)
    return jnp.max(jnp.abs(values - values[0]))
