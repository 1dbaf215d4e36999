"""Linear algebra on pytrees: Hessian-vector products and the top eigenvalues of a
symmetric linear map (power iteration). A leaf apart from `_tree`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import tree_combination, tree_dot, tree_norm, tree_unit


def hvp(loss: Callable, params: Any, data: Any, v: Any) -> Any:
    """The Hessian of `loss(·, data)` at `params` applied to `v` (forward over
    reverse: one forward-mode derivative of the gradient)."""
    return jax.jvp(lambda p: jax.grad(loss)(p, data), (params,), (v,))[1]


def power_iteration(
    apply: Callable[[Any], Any], v: Any, max_iters: int | jax.Array, rtol: float = 0.0
) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """The eigenvalue of largest magnitude of a symmetric linear map, by power
    iteration: `(Rayleigh quotient q, unit vector v, applications of the map,
    residual ‖Av − q v‖)`.

    Each iteration applies the map once. It stops after `max_iters` iterations, or
    once the residual is at most `rtol |q|`: then an eigenvalue lies within
    `rtol |q|` of q. (A test on the change of q alone stops too early when the top
    two eigenvalues are close.) `|q| + residual` bounds the top eigenvalue from above
    once v lies mostly in the span of the top eigenvectors. Warm-start it with the
    previous vector (`v`) when the map changes slowly, as it does along a flow.

    Examples:
        >>> a = jnp.diag(jnp.array([3.0, 1.0]))
        >>> q, v, count, residual = power_iteration(
        ...     lambda x: a @ x, jnp.ones(2), 100, rtol=1e-6)
        >>> round(float(q), 4)
        3.0
    """

    def cond(carry):
        i, value, residual, _ = carry
        return (i < max_iters) & ((i < 1) | (residual > rtol * jnp.abs(value)))

    def body(carry):
        i, _, _, v = carry
        w = apply(v)
        quotient = tree_dot(v, w)
        residual = tree_norm(tree_combination((1.0, w), (-quotient, v)))
        return i + 1, quotient, residual, tree_unit(w)

    dtype = jnp.result_type(*jax.tree.leaves(v))
    start = (
        jnp.zeros((), jnp.int32),
        jnp.asarray(jnp.inf, dtype),
        jnp.asarray(jnp.inf, dtype),
    )
    count, value, residual, v = jax.lax.while_loop(cond, body, (*start, tree_unit(v)))
    return value, v, count, residual


def top_eigenpairs(
    apply_rows: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    iters: int,
    count: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The k largest eigenvalues of a symmetric linear map and their eigenvectors,
    by a fixed number of LOBPCG iterations (Knyazev 2001) from `start`.

    `apply_rows` applies the map to each row of a (k, n) array; `start` is (k, n),
    its rows independent (a warm start: the previous eigenvectors). Every
    iteration applies the map to k vectors (the normalised residuals) and takes
    the Rayleigh-Ritz pairs of the span of the iterates, residuals and previous
    directions, so one call costs exactly `k * (iters + 1)` applications: a fixed
    count, as exact work counts want. Directions that have become dependent (a
    residual that is zero: converged) are left out of the Ritz problem.

    `count` (at most k, possibly traced; None or k: all) finds only the top
    `count` pairs from
    the first `count` rows of `start`: the other rows are returned as given and
    their values as 0, `apply_rows` gets zero rows there (`rows_applied` skips
    them), and the Ritz problems are those of the smallest of the sizes 8, 16,
    ..., k that holds `count` rows (`block_sizes`), so that the cost follows
    `count`, not k.

    Returns:
        `(values, vectors)`: (k,) in descending order and (k, n) orthonormal rows.

    Examples:
        >>> a = jnp.diag(jnp.arange(10.0))
        >>> values, vectors = top_eigenpairs(lambda x: x @ a, jnp.eye(10)[:2] + 0.1, 20)
        >>> values
        Array([9., 8.], dtype=float32)
    """
    k = start.shape[0]
    every = count is None or (isinstance(count, int) and count == k)
    sizes, count = ((k,), k) if every else (block_sizes(k), count)
    active = (jnp.arange(k) < count)[:, None]
    tier = jnp.searchsorted(jnp.asarray(sizes), count) if len(sizes) > 1 else 0

    def ritz(blocks, applied):
        """The top Ritz pairs of the span of the first rows of `blocks` (each
        (k, n)), in the smallest size that holds `count` of them: the new
        iterates, the map applied to them, their values, and the parts of both
        along the blocks after the first (the next search directions)."""

        def of_size(size):
            s = jnp.concatenate([b[:size] for b in blocks])
            a_s = jnp.concatenate([b[:size] for b in applied])
            c, dropped = _orthonormalising(s)
            w, values = _ritz(c.T @ a_s, c.T @ s, dropped, size)
            w = c @ w  # the Ritz vectors' coefficients on the rows of s
            grown = [w.T @ s, w.T @ a_s, w[size:].T @ s[size:], w[size:].T @ a_s[size:]]
            grown = [jnp.zeros_like(start).at[:size].set(x) for x in grown]
            values = jnp.zeros(k, values.dtype).at[:size].set(values)
            return *(jnp.where(active, x, 0) for x in grown), jnp.where(
                active[:, 0], values, 0
            )

        branches = [lambda size=size: of_size(size) for size in sizes]
        return jax.lax.switch(tier, branches) if len(sizes) > 1 else branches[0]()

    x = jnp.where(active, _unit_rows(start), 0)
    x, ax, _, _, values = ritz((x,), (apply_rows(x),))
    zeros = jnp.zeros_like(x)

    def body(_, carry):
        x, ax, values, p, ap = carry
        r = _unit_rows(ax - values[:, None] * x)
        p, ap = _unit_rows(p, ap)
        x, ax, p, ap, values = ritz((x, r, p), (ax, apply_rows(r), ap))
        return x, ax, values, p, ap

    x, _, values, _, _ = jax.lax.fori_loop(
        0, iters, body, (x, ax, values, zeros, zeros)
    )
    return values, jnp.where(active, x, start)


def block_sizes(k: int) -> tuple[int, ...]:
    """The sizes a problem on the first `count` of k rows is solved in (the
    smallest that holds `count`): 8, 16, 32, ... below k, and k."""
    return tuple(8 << i for i in range(max(k - 1, 1).bit_length()) if 8 << i < k) + (k,)


def rows_applied(
    apply: Callable[[jax.Array], jax.Array], rows: jax.Array, count, block: int = 4
) -> jax.Array:
    """`apply` (a linear map of one vector) on each of the first `count` rows of
    `rows` (possibly traced), `block` rows at a time, and zero rows for the
    others: work in proportion to `count`. A `count` of all the rows is one
    batched application."""
    k = rows.shape[0]
    if isinstance(count, int) and count == k:
        return jax.vmap(apply)(rows)
    padded = jnp.pad(rows, ((0, -k % block), (0, 0)))

    def chunk(i, out):
        at = i * block
        part = jax.lax.dynamic_slice_in_dim(padded, at, block)
        return jax.lax.dynamic_update_slice_in_dim(out, jax.vmap(apply)(part), at, 0)

    blocks = (count + block - 1) // block
    out = jax.lax.fori_loop(0, blocks, chunk, jnp.zeros_like(padded))
    return jnp.where((jnp.arange(padded.shape[0]) < count)[:, None], out, 0)[:k]


def _unit_rows(rows: jax.Array, *along: jax.Array):
    """`rows` with each row scaled to unit norm (a zero row stays zero), and the
    arrays `along` scaled by the same factors."""
    norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
    scale = 1 / jnp.where(norms > 0, norms, 1)
    if not along:
        return rows * scale
    return (rows * scale, *(a * scale for a in along))


def _orthonormalising(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A matrix C such that `C.T @ s` has orthonormal rows spanning the (unit)
    rows of `s` (from the eigenvectors of their Gram matrix), with zero columns for
    the directions dropped as dependent, and which those are."""
    d, e = jnp.linalg.eigh(s @ s.T)
    eps = jnp.finfo(s.dtype).eps
    dropped = d <= 100 * eps * s.shape[0] * jnp.max(d)
    c = e / jnp.sqrt(jnp.where(dropped, 1, d))
    return jnp.where(dropped[None, :], 0, c), dropped


def _ritz(a_basis, basis, dropped, k):
    """The coefficients (on the rows of `basis`) of the k top Ritz vectors of the
    span of `basis` (orthonormal rows, zero rows where `dropped`; `a_basis`: the
    map applied to them), and their Ritz values."""
    t = basis @ a_basis.T
    t = (t + t.T) / 2
    # Dropped (zero) rows would give Ritz values 0: keep them out of the top k.
    t = t - jnp.diag(jnp.where(dropped, 1e3 * (jnp.max(jnp.abs(t)) + 1), 0))
    values, z = jnp.linalg.eigh(t)
    return z[:, ::-1][:, :k], values[::-1][:k]


def upper_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j), i ≤ j, entries of a symmetric (k, k) matrix in `svec`'s order:
    column by column, so that the first m(m+1)/2 are the top-left m × m block."""
    j, i = np.tril_indices(k)
    return i, j


def svec(x: jax.Array) -> jax.Array:
    """The upper triangle of a symmetric (k, k) matrix as a vector of k(k+1)/2
    entries (`upper_pairs` order), the off-diagonal ones times √2, so that
    ⟨X, Y⟩ = svec(X)·svec(Y)."""
    i, j = upper_pairs(x.shape[-1])
    return x[..., i, j] * svec_weights(i, j).astype(x.dtype)


def svec_weights(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """`svec`'s weights of the pairs (i, j): 1 on the diagonal, √2 off it."""
    return np.where(i == j, 1.0, np.sqrt(2.0))


def smat(v: jax.Array) -> jax.Array:
    """The symmetric matrix of `svec`."""
    k = int(round((np.sqrt(8 * v.shape[-1] + 1) - 1) / 2))
    i, j = upper_pairs(k)
    entries = v * np.where(i == j, 1.0, 1 / np.sqrt(2.0)).astype(v.dtype)
    m = jnp.zeros((*v.shape[:-1], k, k), v.dtype).at[..., i, j].set(entries)
    return m.at[..., j, i].set(entries)


def psd_projection(x: jax.Array) -> jax.Array:
    """The nearest positive semidefinite matrix to a symmetric `x` (Frobenius)."""
    w, e = jnp.linalg.eigh(x)
    return (e * jnp.maximum(w, 0)) @ e.T


def psd_qp(q: jax.Array, a: jax.Array, iters: int = 100, polish: int = 4) -> jax.Array:
    """min over X ⪰ 0 of a·x + ½ xᵀ q x, x = svec(X), q positive semidefinite: a
    small semidefinite quadratic program (a central flow's complementarity
    problem). Returns svec(X).

    Where a ⪰ 0 (as a matrix) the answer is exactly X = 0 and is returned as such.
    Otherwise: the problem is scaled by a congruence X = D Y D (D diagonal, which
    maps the cone onto itself) giving X's diagonal entries unit curvature; `iters`
    steps of accelerated projected gradient (FISTA with adaptive restart,
    O'Donoghue & Candès 2015) from X = 0 find the answer's range; then `polish`
    Newton steps on the matrices of that rank (the entries of X's eigenbasis that
    touch its range free, the rest held at zero, the result projected on the cone)
    make it exact to rounding once the rank is right (a step is kept only where it
    lowers the objective). A fixed number of steps (no convergence test, no host
    round trip) keeps it inside one compiled program and its cost known.

    Examples:
        >>> psd_qp(jnp.array([[2.0]]), jnp.array([-1.0]))   # x = 1/2
        Array([0.5], dtype=float32)
    """
    k = smat(a).shape[-1]
    i, j = upper_pairs(k)
    curvature = jnp.diagonal(q)[np.flatnonzero(i == j)]
    d = 1 / jnp.sqrt(jnp.where(curvature > 0, curvature, 1))
    scale = d[i] * d[j]  # svec(D Y D) = scale * svec(Y)
    q, a = scale[:, None] * q * scale[None, :], scale * a
    largest = jnp.linalg.eigvalsh(q)[-1]
    step = 1 / jnp.where(largest > 0, largest, 1)

    def fista(_, carry):
        x, y, momentum = carry
        gradient = a + q @ y
        new = svec(psd_projection(smat(y - step * gradient)))
        restart = gradient @ (new - x) > 0  # the momentum points uphill
        momentum = jnp.where(restart, 1.0, momentum)
        following = (1 + jnp.sqrt(1 + 4 * momentum**2)) / 2
        y = new + jnp.where(restart, 0, (momentum - 1) / following) * (new - x)
        return new, y, following.astype(x.dtype)

    def newton(_, x):
        w, e = jnp.linalg.eigh(smat(x))
        support = w > jnp.sqrt(jnp.finfo(a.dtype).eps) * jnp.max(w)
        free = (support[i] | support[j]).astype(a.dtype)
        # svec coordinates in X's eigenbasis (an orthogonal change of basis).
        rotate = jax.vmap(lambda v: svec(e @ smat(v) @ e.T))(
            jnp.eye(len(a), dtype=a.dtype)
        ).T
        qr, gr = rotate.T @ q @ rotate, rotate.T @ (a + q @ x)
        system = free[:, None] * qr * free[None, :] + jnp.diag(1 - free)
        delta = rotate @ jnp.linalg.solve(system, -free * gr)
        new = svec(psd_projection(smat(x + delta)))
        # Kept only where it lowers the objective (the rank may be wrong).
        return jnp.where(objective(new) < objective(x), new, x)

    def objective(x):
        return a @ x + x @ q @ x / 2

    zero = jnp.zeros_like(a)
    x = jax.lax.fori_loop(0, iters, fista, (zero, zero, jnp.ones((), a.dtype)))[0]
    x = jax.lax.fori_loop(0, polish, newton, x)
    cone = jnp.linalg.eigvalsh(smat(a))[0] >= 0
    return jnp.where(cone, 0, scale * x)
